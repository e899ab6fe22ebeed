"""The public API: wrap a model with a strategy, undo it, inspect what it kept, save and load setups."""

from __future__ import annotations

import copy
import os
import sys
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import torch
from torch import nn

from vtoken.frames import VTOKEN_FOLDER, first_frame_outside
from vtoken.config import PruneConfig, check_budget_order, option_defaults, read_config_file
from vtoken.signals import ANNOTATIONS, LLM_ATTENTION, LLM_ATTENTION_OBSERVED, MEANING, PATCH_GRID, Needs, Signal
from vtoken.registry import get_strategy, strategy_names
from vtoken.schedule import Schedule, ScoringCost, Stage, StageShapes, is_integer

_STATE_ATTR = "_vtoken_state"


@dataclass
class WrapState:
    """What ``wrap`` put on a model: held on one attribute so ``unwrap`` can take it all back."""

    method: str
    config: PruneConfig
    strategy: Any
    adapter: Any
    pruner: Any
    undo: Any


def _config_for(method: str | None, config: PruneConfig | str | os.PathLike | dict | None, options: dict) -> PruneConfig:
    if config is not None:
        if isinstance(config, PruneConfig):
            if options:
                raise ValueError("give either a config object or keyword options, not both")
            if method is not None and method != config.method:
                raise ValueError(f"config is for {config.method!r} but method {method!r} was asked for")
            # The model runs on a copy: the caller's object, changed or reused later, changes nothing here.
            return copy.deepcopy(config)
        if isinstance(config, dict):
            data = dict(config)
            if "method" not in data and method is None:
                raise ValueError(
                    "the config dict has no 'method' key; add one (config={'method': 'fastv', ...}) "
                    "or name the method: vtoken.wrap(model, 'fastv', config=...)"
                )
            data.setdefault("method", method)
        elif isinstance(config, (str, os.PathLike)):
            data = read_config_file(config)
        else:
            raise ValueError(
                f"config must be a config object, a dict or the path of a saved config, got {type(config).__name__}"
            )
        saved_method = data.pop("method")
        if method is not None and method != saved_method:
            raise ValueError(f"the saved config is for {saved_method!r}, not {method!r}")
        data.update(options)
        return get_strategy(saved_method).Config.from_options(**data)
    if method is None:
        raise ValueError(f"name a method; known methods: {', '.join(strategy_names())}")
    strategy_cls = get_strategy(method)
    site = options.get("site")
    if site is not None and site not in strategy_cls.sites:
        raise ValueError(
            f"method {method!r} cannot prune at the {site!r} site; it supports: {', '.join(strategy_cls.sites)}"
        )
    return strategy_cls.Config.from_options(**options)


def wrap(model: nn.Module, method: str | None = None, *, config=None, **options: Any) -> nn.Module:
    """Install pruning strategy ``method`` into ``model`` in place and return the model.

    ``options`` are the method's config fields (``keep=0.25`` or ``keep_tokens=64``, ``site``,
    ``layer``, ...); ``config`` may instead be a config object, a dict, or a file/directory written
    by :func:`save_config`. Everything is validated before the model is touched, so an error leaves
    it unchanged. Wrapping a wrapped model is an error: ``unwrap`` it first.
    """
    from vtoken.adapters import adapter_for  # adapters sit above the core in the import order
    from vtoken.adapters.base import UndoStack
    from vtoken.pruner import Pruner

    if not isinstance(model, nn.Module):
        raise ValueError(f"vtoken.wrap takes a torch model (an nn.Module, e.g. from from_pretrained), got "
                         f"{type(model).__name__}")
    original = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(original, nn.Module):
        # torch.compile(model): the hooks go on the original's modules, which the compiled module runs.
        wrap(original, method, config=config, **options)
        return model
    existing = getattr(model, _STATE_ATTR, None)
    if existing is not None:
        raise ValueError(
            f"this model is already wrapped with {existing.method!r}; call vtoken.unwrap(model) before wrapping again"
        )
    _refuse_nested(model)
    adapter = adapter_for(model)(model)
    if config is None and method is not None:
        # A family may place a method whose default site it lacks (a ViT has only the vision site).
        options = adapter.placed_options(get_strategy(method), options)
    cfg = _config_for(method, config, options)
    strategy_cls = get_strategy(cfg.method)
    strategy = strategy_cls(cfg)
    depths = {"vision": len(adapter.vision_layers()), "llm": len(adapter.decoder_layers())}
    read = adapter.vision_feature_layer()
    if read is not None:
        depths["vision_read"] = read
    try:
        strategy.bind(depths)
    except ValueError:
        # What the family cannot give at any layer (TokenPacker's one grid per image on Qwen2-VL) is
        # the reason to name, before what the method's options or weights say about this model's
        # depth. (Unbound, a strategy's layered needs may name layers this model lacks: not those.)
        _refuse_missing_signal(adapter, cfg.method, strategy, layered=False)
        raise
    # A mask stage (AIF) is checked like any stage: its layer exists, its budget fits an image.
    mask = strategy.mask_stage()
    adapter.validate(strategy.stages() + ((mask.stage,) if mask is not None else ()))
    per_image = adapter.visual_tokens_per_image()
    check_budget_order(strategy.stages(), per_image, adapter.vision_tokens_for(per_image) if per_image else None)
    _refuse_missing_signal(adapter, cfg.method, strategy)
    pruner = Pruner(strategy)
    undo = UndoStack()
    undo.push(pruner.release)  # run last by unwrap: what the calls left in this thread's context
    try:
        adapter.install(pruner, undo)
    except Exception:
        undo.run()
        raise
    undo.set_attribute(model, _STATE_ATTR, WrapState(cfg.method, cfg, strategy, adapter, pruner, undo))
    _forget_compiled_code()
    undo.push(_forget_compiled_code)
    # copy.deepcopy and pickle look these up on the instance: a copy is a fresh wrap of a copy of the
    # model without vtoken's changes, made without unwrapping the model.
    undo.set_attribute(model, "__deepcopy__", partial(_deepcopy_wrapped, model))
    undo.set_attribute(model, "__reduce_ex__", partial(_reduce_wrapped, model))
    _WRAPPED.add(model)
    undo.push(lambda: _WRAPPED.discard(model))
    return model


def _refuse_missing_signal(adapter, method: str, strategy, layered: bool = True) -> None:
    """A ValueError naming the first signal ``strategy`` needs that ``adapter``'s model cannot give,
    why, and methods that do without it (``layered=False``: of the signals read at no layer only)."""
    needs = strategy.needs()
    if not layered:
        needs = Needs.of(*(signal for signal in needs.signals if signal.layer is None))
    missing = adapter.missing_signal(needs)
    if missing is None:
        return
    signal, reason = missing
    # Methods that read no attention and need no CLS token; fastv only where there is an LLM whose
    # attention it can read (an LLM layer TransPrune cannot observe may still be one FastV cannot
    # read), pool only where the grid is whole.
    reads_llm = signal.name in (LLM_ATTENTION, LLM_ATTENTION_OBSERVED)
    fastv_runs = (len(adapter.decoder_layers()) and not reads_llm
                  and adapter.missing_signal(Needs.of(Signal(LLM_ATTENTION))) is None)
    names = ["pool", "fastv"] if fastv_runs else ["random", "pool"]
    if signal.name == PATCH_GRID:
        names = ["random" if name == "pool" else name for name in names]
    raise ValueError(
        f"{method} needs {MEANING[signal.name]} (signal {str(signal)!r}), but this {adapter.family_name} model "
        f"gives {reason}; use a model that provides it, or a method that does not need it ({', '.join(names)})"
    )


#: Every model wrapped now (weakly), to refuse wrapping a part of one or a model holding one.
_WRAPPED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _refuse_nested(model: nn.Module) -> None:
    """One wrap per model: not a module inside a wrapped model (its hooks would run inside the
    other's), nor a model holding a wrapped module."""
    for other in list(_WRAPPED):
        if other is not model and any(part is model for part in other.modules()):
            raise ValueError(
                f"this {type(model).__name__} is part of a {type(other).__name__} wrapped by vtoken; wrap a model once, "
                "as a whole: call vtoken.unwrap on the outer model first to wrap this part alone"
            )
    inner = next((part for part in model.modules() if part is not model and _STATE_ATTR in vars(part)), None)
    if inner is not None:
        raise ValueError(
            f"this {type(model).__name__} holds a {type(inner).__name__} already wrapped by vtoken; call vtoken.unwrap "
            "on that one first (a model is wrapped once, as a whole)"
        )


def _forget_compiled_code() -> None:
    """torch.compile's code for a module does not notice hooks added or removed after it compiled:
    a model compiled and run before ``wrap`` would keep running unpruned. Dropping every compiled
    graph (torch._dynamo.reset) makes a compiled caller retrace with vtoken's hooks in place (they run
    eagerly, between graphs); other compiled models only recompile."""
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()


def _deepcopy_wrapped(model: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a wrapped model: a copy of the model without vtoken's changes (its hooks
    and entry points close over this model's pruner, so a plain copy would run into the original's
    state), wrapped with a copy of the same config. The model itself is left as it is.

    A module that forwards unknown attributes to the one it holds (a PEFT model, ``torch.compile``'s
    module) hands copy.deepcopy this model's ``__deepcopy__`` for itself: that object is copied as
    copy.deepcopy would have copied it (reaching this model through its attributes)."""
    target = _object_being_deep_copied()
    if target is not None and target is not model:
        return _reconstruct_copy(target, memo)
    return wrap(_unwrapped_copy(model, memo), config=copy.deepcopy(_state(model).config, memo))


def _unwrapped_copy(model: nn.Module, memo: dict) -> nn.Module:
    """A deep copy of ``model`` as it was before ``wrap``: what wrapping added is not copied (its
    objects are entered in ``memo`` as None) and its changes are taken back in the copy."""
    undo = _state(model).undo
    for added in undo.added_objects():
        memo.setdefault(id(added), None)
    clone = _reconstruct_copy(model, memo)
    undo.revert_in_copy(memo)
    return clone


def _reconstruct_copy(obj: Any, memo: dict) -> Any:
    """What copy.deepcopy does for an object without ``__deepcopy__``: its class's
    ``__reduce_ex__(4)``, rebuilt with the copied state (``copy._reconstruct``, the stdlib's own step;
    the instance's ``__reduce_ex__`` is vtoken's pickling and is skipped)."""
    return copy._reconstruct(obj, memo, *type(obj).__reduce_ex__(obj, 4))


def _object_being_deep_copied() -> Any:
    """The object of the copy.deepcopy call that called ``__deepcopy__`` (its argument ``x``), or
    None when the caller is not copy.deepcopy."""
    caller = sys._getframe(2)  # 0: this function, 1: _deepcopy_wrapped (through functools.partial)
    return caller.f_locals.get("x") if caller.f_code is copy.deepcopy.__code__ else None


def _reduce_wrapped(model: nn.Module, protocol: int):
    """Pickling a wrapped model (``pickle``, ``torch.save(model)``): a copy without vtoken's changes,
    wrapped again with the same config when loaded (the copy costs the model's memory once more while
    pickling)."""
    return _wrap_unpickled, (_unwrapped_copy(model, {}), _state(model).config)


def _wrap_unpickled(model: nn.Module, config: PruneConfig) -> nn.Module:
    return wrap(model, config=config)


def _state(model: nn.Module) -> WrapState:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("this model is not wrapped by vtoken; call vtoken.wrap(model, method) first")
    return state


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every hook and attribute ``wrap`` added; the model is then exactly the original."""
    _state(model).undo.run()
    return model


def is_wrapped(model: nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


@contextmanager
def pruned(model: nn.Module, method: str | None = None, *, config=None, **options: Any) -> Iterator[nn.Module]:
    """``with vtoken.pruned(model, "fastv", keep=0.25): ...`` wraps for the block, unwraps after."""
    wrap(model, method, config=config, **options)
    try:
        yield model
    finally:
        unwrap(model)


def methods() -> list[dict[str, Any]]:
    """Every registered method with its options and their defaults, the signals it reads, and per
    model family whether it runs there (``"runs"``) or why not; ``limits``: for a family where it
    runs, the models of that family it does not run on (a signal only some of them give)."""
    from vtoken.adapters import FAMILY_GAPS, FAMILY_LIMITS, MISSING_SITES, VISION_ONLY  # adapters sit above the core
    from vtoken.adapters.vision_encoder import LANGUAGE_SIGNALS

    out = []
    for name in strategy_names():
        cls = get_strategy(name)
        families = {}
        for family, gaps in FAMILY_GAPS.items():
            # A vision-only family has the vision site alone: what a method reads at other sites is moot.
            reads = [s for s in cls.reads if not (family in VISION_ONLY and s in LANGUAGE_SIGNALS)]
            lacking = [f"needs {MEANING[s]}: {gaps[s]}" for s in reads if s in gaps]
            missing = MISSING_SITES.get(family, {})
            if all(site in missing for site in cls.sites):
                reason = missing[cls.sites[0]]
                lacking.insert(0, f"prunes at the {' / '.join(cls.sites)} site, which it lacks: {reason}")
            families[family] = "; ".join(lacking) if lacking else "runs"
        limits = {}
        for family, limits_by_signal in FAMILY_LIMITS.items():
            notes = list(dict.fromkeys(limits_by_signal[s] for s in cls.reads if s in limits_by_signal))
            if families.get(family) == "runs" and notes:
                limits[family] = "; ".join(notes)
        out.append(
            {
                "name": name,
                "options": option_defaults(cls.Config),
                "default_keep": cls.Config.default_keep,
                "sites": list(cls.sites),
                "trained": cls.trained,
                "reads": list(cls.reads),
                "needs_annotations": ANNOTATIONS in cls.reads,
                "families": families,
                "limits": limits,
                "summary": (sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0],
            }
        )
    return out


def config_of(model: nn.Module) -> PruneConfig:
    """A copy of the config the wrapped model runs: changing it changes nothing in the model (wrap
    again with it, ``vtoken.wrap(other, config=...)``, to run what it says)."""
    return copy.deepcopy(_state(model).config)


def strategy_of(model: nn.Module):
    """The strategy instance a wrapped model runs (to set per-input data, as the oracle needs)."""
    return _state(model).strategy


def selection(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per sample of the last prefill: stage name (``"projector"``, ``"llm:2"``, ``"vision:10"``) to the
    indices, within that sample's visual tokens, that survived the stage (ascending)."""
    run = _state(model).pruner.last_run
    if run is None:
        raise ValueError("no forward pass has run since wrapping; call the model (or generate) first")
    return [dict(s) for s in run.selections]


def diagnostics(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """What the strategy reported while deciding the last prefill (``ScoreContext.report``): stage
    name -> named values, per image row (AIF's dynamics and entropy, ZOO-Prune's sensitivity, ...)."""
    run = _state(model).pruner.last_run
    if run is None:
        raise ValueError("no forward pass has run since wrapping; call the model (or generate) first")
    return {stage: dict(values) for stage, values in run.diagnostics.items()}


@contextmanager
def annotate(model: nn.Module, **annotations: Any) -> Iterator[nn.Module]:
    """Hand the calls made inside the block per-input annotations (the oracle's ``relevant``: one
    list of image-local token indices per image, in batch order). They belong to this thread's calls
    only; the strategy reads them from ``ScoreContext.annotations``."""
    pruner = _state(model).pruner
    token = pruner.annotations.set(dict(annotations))
    try:
        yield model
    finally:
        pruner.annotations.reset(token)


def save_config(model: nn.Module, directory: str | os.PathLike) -> str:
    """Write the wrapped model's config as JSON into ``directory``; returns the file's path."""
    return _state(model).config.save(directory)


def load(path: str | os.PathLike) -> PruneConfig:
    """The config saved at ``path`` (a file or a directory holding ``vtoken_config.json``);
    ``vtoken.wrap(model, config=vtoken.load(path))`` gives the same setup back."""
    data = read_config_file(path)
    method = data.pop("method")
    return get_strategy(method).Config.from_options(**data)


def _warn_if_scoring_uncounted(strategy) -> None:
    """A method written outside vtoken that does not say what its scoring costs (no ``scoring_cost``)
    would have its scoring counted as free by ``vtoken.flops`` without a word: say so, at the caller's
    line (Python's default filter shows it once per line). The built-in methods that do not define
    it (random, pool, the oracle) score for free."""
    from vtoken.strategies.base import Strategy

    kind = type(strategy)
    if kind.scoring_cost is Strategy.scoring_cost and not kind.__module__.startswith("vtoken."):
        warnings.warn(
            f"{kind.name}: the method defines no scoring_cost(), so vtoken.flops counts its scoring as 0 FLOPs; "
            f"define scoring_cost() returning ScoringCost items for its work (or [] if it scores for free)",
            UserWarning, stacklevel=_frames_inside_vtoken() + 1)


def _frames_inside_vtoken() -> int:
    """How many frames up from the caller the first one outside the vtoken package is (a warning's
    ``stacklevel`` that names the user's line, however deep inside vtoken it was raised)."""
    return first_frame_outside((VTOKEN_FOLDER,), sys._getframe(1))[0]


def schedule_of(model: nn.Module, visual_tokens: int | None = None, instruction_tokens: int | None = None,
                patchless_tokens: int = 0) -> Schedule:
    """The pruning schedule of a wrapped model for one image of ``visual_tokens`` visual tokens
    (default: the model's tokens per image). ``instruction_tokens``: the prompt's text tokens after
    the image, whose attention rows TransPrune's and AIF's scoring read (default: an assumed 32,
    ``vtoken.schedule.ASSUMED_INSTRUCTION_TOKENS``). ``patchless_tokens``: of the ``visual_tokens``,
    those no patch stands behind (the row newlines LLaVA-NeXT and OneVision pack in, the CLS token a
    LLaVA under ``vision_feature_select_strategy="full"`` hands the LLM; ``vtoken.flops`` passes the
    image's own), which a method ranking patches (VisionZip) does not score."""
    if instruction_tokens is not None and (not is_integer(instruction_tokens) or instruction_tokens < 0):
        raise ValueError(f"instruction_tokens must be a count of text tokens >= 0, got {instruction_tokens!r}")
    if not is_integer(patchless_tokens) or patchless_tokens < 0:
        raise ValueError(f"patchless_tokens must be a count of an image's tokens with no patch (newlines, CLS) >= 0, "
                         f"got {patchless_tokens!r}")
    if visual_tokens is not None and (not is_integer(visual_tokens) or visual_tokens < 1):
        raise ValueError(f"visual_tokens must be a count of an image's visual tokens >= 1, got {visual_tokens!r}")
    state = _state(model)
    adapter = state.adapter
    tokens = visual_tokens or adapter.visual_tokens_per_image()
    if tokens is None:
        raise ValueError("this model's visual token count depends on the image; pass visual_tokens=")
    _warn_if_scoring_uncounted(state.strategy)
    stages, scoring, notes = [], [], []
    vision_tokens = adapter.vision_tokens_for(tokens)
    entering = {"vision": vision_tokens, "visual": tokens}  # tokens reaching the next stage, per image
    inside = state.strategy.inside_block() is not None  # vision stages between attention and MLP (ToMe)
    for spec in state.pruner.stages:
        if spec.site == "vision":
            kept = adapter.vision_stage_keeps(spec, vision_tokens, tokens)
            before, entering["vision"] = entering["vision"], kept
        else:
            kept = spec.budget(tokens)
            before, entering["visual"] = entering["visual"], kept
        stages.append(Stage(spec.site, kept, spec.layer, inside=inside and spec.site == "vision"))
        # The patchless tokens are known among an image's whole visual tokens only: a stage that
        # dropped some of them leaves an unknown number behind (0 is then the count).
        patchless = patchless_tokens if spec.site != "vision" and before == tokens else 0
        shapes = StageShapes(before, kept, *adapter.site_width(spec.site), instruction_tokens=instruction_tokens,
                             patchless=patchless)
        scoring.extend(state.strategy.scoring_cost(spec, shapes))
    evicted = None
    if state.pruner.mask is not None:  # a mask stage (AIF) removes nothing but still costs its scoring
        mask = state.pruner.mask
        shapes = StageShapes(tokens, mask.budget(tokens), *adapter.site_width(mask.site),
                             instruction_tokens=instruction_tokens, patchless=patchless_tokens)
        scoring.extend(state.strategy.scoring_cost(mask, shapes))
        if state.pruner.masking.evict:  # ... and, evicting, leaves only what it kept in the cache after
            evicted = (mask.layer, mask.budget(tokens))
            if state.pruner.masking.adaptive_budget:
                notes.append(
                    f"the cache keeps what each image's attention decides (an adaptive count, AIF's Eq. 5): the KV "
                    f"cache and decoding are counted at the configured {evicted[1]} of {tokens} visual tokens")
    return Schedule(tuple(stages), tuple(scoring), visual_tokens=tokens, vision_tokens=vision_tokens,
                    cache_evicted=evicted, notes=tuple(notes))


__all__ = [
    "wrap", "unwrap", "pruned", "methods", "selection", "save_config", "load", "config_of", "strategy_of", "is_wrapped",
    "schedule_of", "ScoringCost",
]
