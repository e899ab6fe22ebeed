"""Configuration shared by every strategy: the budget, where pruning happens, and how positions work.

Each strategy subclasses :class:`PruneConfig` with its own options. A config validates itself on
construction, and saves to / loads from JSON so a setup can be reproduced from a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vtoken.schedule import SITES, check_site, is_integer, is_number

CONFIG_FILE = "vtoken_config.json"
POSITION_MODES = ("original", "contiguous", "pre_llm")
ROUNDINGS = ("round", "floor")
#: The largest ``keep_tokens``: counts become int64 tensors, and no image has anywhere near as many.
MAX_KEEP_TOKENS = 2**63 - 1
#: ``seed`` goes to ``torch.Generator.manual_seed``, which takes a 64-bit value.
SEED_RANGE = (-(2**63), 2**64 - 1)


def plain_value(value: Any) -> Any:
    """``value`` with every number that is not a Python ``int`` or ``float`` (NumPy's, ``Fraction``)
    made one, inside lists, tuples and dicts too (new containers; bools and everything else as given).
    A config holds plain values: ``json`` writes them, ``torch.Generator.manual_seed`` takes them,
    and the methods' own ``isinstance(value, int)`` checks see what the user meant."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if is_integer(value):
        return int(value)
    if is_number(value):
        return float(value)
    if isinstance(value, (list, tuple)):
        return type(value)(plain_value(v) for v in value)
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    return value


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, short for a huge integer (``str`` of one over 4300
    digits raises, and hundreds of digits make no readable line)."""
    if is_integer(value) and int(value).bit_length() > 64:
        return f"an integer of about {int(int(value).bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class StageSpec:
    """One pruning stage as the user writes it: a site, a layer where the site needs one, a budget.

    The budget is per image: ``keep`` is a fraction of that image's visual tokens, ``keep_tokens`` a
    count. At the ``"vision"`` site the same fraction applies to every crop of the image.
    """

    site: str
    layer: int | None = None
    keep: float | None = None
    keep_tokens: int | None = None
    #: How a fraction becomes a count: ``"round"`` to the nearest (vtoken's default), or ``"floor"``
    #: (``int(keep * n)``, as the official code of some methods computes it; at least 1 either way).
    rounding: str = "round"

    def __post_init__(self) -> None:
        for name in ("layer", "keep", "keep_tokens"):  # plain numbers, as PruneConfig's fields
            object.__setattr__(self, name, plain_value(getattr(self, name)))
        check_site(self.site, self.layer)
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if (self.keep is None) == (self.keep_tokens is None):
            raise ValueError("give exactly one budget: keep=<fraction in (0, 1]> or keep_tokens=<count>")
        # Types first: a string or a bool would otherwise fail deep inside (or, True, pass as 1).
        if self.keep is not None and (not is_number(self.keep) or not (0.0 < self.keep <= 1.0)):
            raise ValueError(
                f"keep must be a fraction in (0, 1] (a number, not a string or bool), got {shown(self.keep)}; "
                "use keep_tokens for counts"
            )
        if self.keep_tokens is not None and (
            not is_integer(self.keep_tokens) or not 0 < self.keep_tokens <= MAX_KEEP_TOKENS
        ):
            raise ValueError(
                f"keep_tokens must be a positive integer below 2**63 (a count of tokens per image, not a string "
                f"or bool), got {shown(self.keep_tokens)}"
            )

    @property
    def name(self) -> str:
        return self.site if self.layer is None else f"{self.site}:{self.layer}"

    def budget(self, visual_tokens: int) -> int:
        """Tokens this stage keeps of an image that has ``visual_tokens`` visual tokens."""
        if self.keep_tokens is not None:
            return self.keep_tokens
        exact = self.keep * visual_tokens
        return max(1, int(exact) if self.rounding == "floor" else round(exact))

    def fraction(self, visual_tokens: int) -> float:
        return self.keep if self.keep is not None else self.keep_tokens / visual_tokens

    def crop_budget(self, crop_tokens: int, image_tokens: int) -> int:
        """Tokens one vision-encoder crop of ``crop_tokens`` patches keeps at this (vision) stage, for
        an image of ``image_tokens`` visual tokens: the image's fraction of the crop (at least 1). A
        method whose count is not linear in the token count (ToMe) overrides it."""
        exact = self.fraction(image_tokens) * crop_tokens
        return max(1, int(exact) if self.rounding == "floor" else round(exact))


@dataclass
class PruneConfig:
    """Options every strategy has.

    Attributes:
        keep: fraction of each image's visual tokens that survives (``0.25`` = 144 of 576).
        keep_tokens: the same budget as a count per image; give ``keep`` or ``keep_tokens``.
        site: ``"vision"`` (inside the vision encoder, after layer ``layer``), ``"projector"``
            (between projector and LLM) or ``"llm"`` (inside the LLM, before decoder layer ``layer``).
        layer: the layer index the site needs.
        stages: progressive pruning: a list of ``{"site", "layer", "keep" | "keep_tokens"}`` applied in
            order; each budget is relative to the image's original token count. Overrides
            ``site``/``layer``/``keep``.
        positions: ``"original"``: kept tokens keep their rotary positions (FastV);
            ``"contiguous"``: they are renumbered 0..n-1 (PyramidDrop); ``"pre_llm"``: renumbered
            where they are dropped before the LLM (vision, projector sites), kept inside it
            (VFlowOpt's official code: the LLM input is built from the survivors, later stages
            gather position ids).
        text_only: what a prompt without visual tokens does: ``"error"`` or ``"passthrough"``.
        seed: seed of any randomness (used by ``random``, recorded for every method).
    """

    method: ClassVar[str] = ""
    #: The budget used when neither ``keep`` nor ``keep_tokens`` is given (each paper's default).
    default_keep: ClassVar[float] = 0.25

    keep: float | None = None
    keep_tokens: int | None = None
    site: str = "projector"
    layer: int | None = None
    stages: list[dict[str, Any]] | None = None
    positions: str = "original"
    text_only: str = "error"
    seed: int = 0

    def __setattr__(self, name: str, value: Any) -> None:
        # Every field, as the dataclass's __init__ sets it or a later assignment does, holds plain
        # Python numbers (see plain_value): a NumPy seed or count passes every check and then works.
        super().__setattr__(name, plain_value(value))

    def __post_init__(self) -> None:
        if not is_integer(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be an integer (a 64-bit value, as torch.manual_seed takes), got {shown(self.seed)}")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        if self.text_only not in ("error", "passthrough"):
            raise ValueError(f"text_only must be 'error' or 'passthrough', got {self.text_only!r}")
        if self.stages is not None and (not isinstance(self.stages, (list, tuple)) or not self.stages):
            # (an empty or false value would otherwise fall back to the method's default stage, silently)
            if isinstance(self.stages, (list, tuple)):
                raise ValueError("stages=[] holds no stage; give at least one stage dict, or omit stages for the "
                                 "method's default")
            raise ValueError(
                f"stages must be a list of dicts like {{'site': 'llm', 'layer': 2, 'keep': 0.5}}, got {shown(self.stages)}")
        self.resolved_stages()  # validates

    def resolved_stages(self) -> tuple[StageSpec, ...]:
        """The stages this config asks for, validated and in execution order."""
        if self.stages:
            stages = tuple(StageSpec(**_stage_options(s)) for s in _stage_list(self.stages))
        else:
            keep = self.default_keep if self.keep is None and self.keep_tokens is None else self.keep
            stages = (StageSpec(self.site, self.layer, keep, self.keep_tokens),)
        order = {site: i for i, site in enumerate(SITES)}
        keys = [(order[s.site], -1 if s.layer is None else s.layer) for s in stages]
        if keys != sorted(keys) or len(set(keys)) != len(keys):
            raise ValueError("stages must run in order: vision layers, then projector, then LLM layers, each once")
        return stages

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def save(self, directory: str | os.PathLike) -> str:
        if not isinstance(directory, (str, os.PathLike)):
            raise ValueError(f"give the directory to hold {CONFIG_FILE} as a path, got {shown(directory)}")
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as error:  # a file where the directory should be, or on the way to it
            raise ValueError(f"cannot make the directory {os.fspath(directory)!r} ({error.strerror or error}); "
                             f"give a directory (created if missing) to hold {CONFIG_FILE}") from None
        path = os.path.join(directory, CONFIG_FILE)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"  # whole before a byte is written
        partial = f"{path}.{os.getpid()}.tmp"
        try:
            # Written beside the file and moved over it: a failed write leaves the old file (or none),
            # never half a config that vtoken.load would refuse.
            with open(partial, "w") as f:
                f.write(text)
            os.replace(partial, path)
        except OSError as error:  # a directory of that name, a read-only place, /proc
            if os.path.exists(partial):
                os.remove(partial)
            raise ValueError(f"cannot write {path!r} ({error.strerror or error}); give a directory you can "
                             "write to") from None
        return path

    @classmethod
    def from_options(cls, /, **options: Any) -> "PruneConfig":
        """Build from keyword options, naming any option this method does not have."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for method {cls.method!r}; "
                f"its options are: {', '.join(sorted(known))}"
            )
        return cls(**options)


def check_budget_options(keep: Any, keep_tokens: Any) -> None:
    """``keep`` / ``keep_tokens`` as given to a method that builds its own stages from them: at most
    one, of the right type and range (the checks of :class:`StageSpec`)."""
    if keep is not None or keep_tokens is not None:
        StageSpec("projector", None, keep, keep_tokens)


def _stage_list(stages: Any) -> list:
    if not isinstance(stages, (list, tuple)):
        raise ValueError(
            f"stages must be a list of dicts like {{'site': 'llm', 'layer': 2, 'keep': 0.5}}, got {shown(stages)}"
        )
    return list(stages)


def _stage_options(stage: Any) -> dict[str, Any]:
    """One entry of ``stages`` as StageSpec's options, naming what is wrong with it."""
    if not isinstance(stage, dict):
        raise ValueError(
            f"each entry of stages must be a dict like {{'site': 'llm', 'layer': 2, 'keep': 0.5}}, got {shown(stage)}"
        )
    known = {f.name for f in dataclasses.fields(StageSpec)}
    unknown = sorted(str(k) for k in set(stage) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in a stage; a stage takes {', '.join(sorted(known))}")
    if "site" not in stage:
        raise ValueError(f"a stage needs its site: add 'site': 'vision', 'projector' or 'llm' to {stage!r}")
    return dict(stage)


def check_budget_order(stages: tuple[StageSpec, ...], visual_tokens: int | None = None,
                       vision_tokens: int | None = None) -> None:
    """Refuse stages whose budgets grow: every budget counts from the image's original tokens, so a
    stage cannot keep more than the stage before it left (it would fail at the first forward).

    With the model's token counts per image (``visual_tokens`` reaching the LLM, ``vision_tokens``
    patches per crop) the stages' own counts are compared, within the vision encoder and within the
    projector and LLM, and across the two where the encoder's patches are the LLM's visual tokens one
    to one; without them, only budgets of the same kind (two fractions, two counts)."""
    known = visual_tokens is not None and vision_tokens is not None

    def count(stage: StageSpec) -> int | None:
        if not known:
            return None
        if stage.site == "vision":
            return stage.crop_budget(vision_tokens, visual_tokens)
        return stage.budget(visual_tokens)

    def budget_text(stage: StageSpec) -> str:
        return f"keep={stage.keep!r}" if stage.keep is not None else f"keep_tokens={stage.keep_tokens!r}"

    previous: dict[str, StageSpec] = {}  # the last stage in each token space
    for stage in stages:
        space = "vision" if stage.site == "vision" else "visual"
        candidates = [previous.get(space)]
        if space == "visual" and known and visual_tokens == vision_tokens:
            candidates.append(previous.get("vision"))  # one encoder patch per visual token (LLaVA-1.5)
        for earlier in filter(None, candidates):
            before, now = count(earlier), count(stage)
            if before is not None:
                if now > before:
                    raise ValueError(
                        f"stage {stage.name} keeps {now} tokens per image, more than the {before} the earlier stage "
                        f"{earlier.name} leaves (budgets count from the image's original tokens); give {stage.name} "
                        f"a budget of at most {before} tokens, or {earlier.name} a larger one"
                    )
            elif (earlier.keep is not None and stage.keep is not None and stage.keep > earlier.keep) or (
                earlier.keep_tokens is not None and stage.keep_tokens is not None and stage.keep_tokens > earlier.keep_tokens
            ):
                raise ValueError(
                    f"stage {stage.name} ({budget_text(stage)}) keeps more than the earlier stage {earlier.name} "
                    f"({budget_text(earlier)}) leaves (budgets count from the image's original tokens); "
                    "budgets must not grow from one stage to the next"
                )
        previous[space] = stage


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The saved options (with their ``method``) from a config file or a directory holding one; what
    is not one is refused in one line naming the file."""
    if not isinstance(path, (str, os.PathLike)):  # an int would be read as an open file descriptor
        raise ValueError(f"give the path of a vtoken config (a {CONFIG_FILE} or its directory), got {shown(path)}")
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"no vtoken config at {os.fspath(path)!r}: write one with vtoken.save_config(model, DIR) "
                         f"and give DIR or DIR/{CONFIG_FILE}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"{os.fspath(path)} is not a vtoken config: not valid JSON ({error})") from None
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError(f"{os.fspath(path)} is not a vtoken config: it needs a JSON object with a 'method' key")
    if not isinstance(data["method"], str):
        raise ValueError(f"{os.fspath(path)}: 'method' must be a method's name, got {shown(data['method'])}")
    return data


def option_defaults(config_cls: type[PruneConfig]) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


__all__ = ["PruneConfig", "StageSpec", "check_budget_order", "read_config_file", "option_defaults", "CONFIG_FILE", "field"]
