"""The pruning schedule: which site removes visual tokens, after which layer, and how many survive.

A schedule is what the FLOPs model, the KV-cache estimate and the benchmark read to know what a
strategy does to a model, without running it. A wrapped model reports its own schedule for a given
input (``vtoken.schedule(model, ...)``); a user can also write one by hand.

Sites, in the order a token meets them:

- ``"vision"``: inside the vision encoder, after encoder layer ``layer`` (0-based). The encoder layers
  after it run on the kept patches only (the CLS token, where the tower has one, is always kept and is
  not counted in ``keep_tokens``). ``keep_tokens`` is per image (per crop for AnyRes models).
- ``"projector"``: between projector and LLM; the LLM never sees the dropped tokens.
  ``keep_tokens`` is the number of visual tokens per sample that reach the LLM.
- ``"llm"``: inside the LLM at prefill, before decoder layer ``layer`` runs (FastV's K). Layers
  ``< layer`` keep every token (and their KV cache does too); layers ``>= layer`` see only the kept
  ones. ``keep_tokens`` is the number of visual tokens per sample that survive.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Literal

Site = Literal["vision", "projector", "llm"]
SITES: tuple[str, ...] = ("vision", "projector", "llm")


#: Far past any model's depth: a larger layer is a typo, refused before it is printed (Python will
#: not turn an integer of over 4300 digits into text).
MAX_LAYER = 1_000_000


def is_integer(value) -> bool:
    """An integer option (Python or NumPy), never a bool: ``keep_tokens=True`` is not 1 token."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number (Python or NumPy), never a bool: ``keep=True`` is not a fraction."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def patches_along(pixels: int, patch: int, pads: bool = False) -> int:
    """Patches a patch embedding makes along a side of ``pixels``: whole patches only, or, for an
    embedding that pads the side up to whole patches (timm's ``dynamic_img_pad``), rounded up."""
    return -(-pixels // patch) if pads else pixels // patch


def check_site(site: str, layer: int | None) -> None:
    """Refuse a site name that does not exist, and a layer where the site takes none (or none where it needs one)."""
    if site not in SITES:
        raise ValueError(f"unknown pruning site {site!r}; choose one of {', '.join(SITES)}")
    if site in ("vision", "llm") and layer is None:
        raise ValueError(f"a {site!r} stage needs `layer` (the {site} layer index)")
    if site == "projector" and layer is not None:
        raise ValueError("the 'projector' site takes no `layer`; remove it")
    # A bool, a float or a string is no layer index (True would pass as layer 1, 1.5 fail deep inside).
    if layer is not None and not is_integer(layer):
        raise ValueError(f"layer must be a layer index (an integer >= 0), got {layer!r}")
    if layer is not None and abs(layer) > MAX_LAYER:  # no model is this deep; printing it may itself fail
        raise ValueError(f"layer must be a layer index of the model (0 to its depth - 1), got an integer of "
                         f"{int(layer).bit_length()} bits")
    if layer is not None and layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")


@dataclass(frozen=True)
class Stage:
    """One pruning step: at ``site`` (after/before ``layer``), ``keep_tokens`` visual tokens survive.

    ``inside``: a vision stage that runs inside block ``layer``, between its attention and its MLP
    (ToMe): that block's MLP already runs on the kept tokens."""

    site: Site
    keep_tokens: int
    layer: int | None = None
    inside: bool = False

    def __post_init__(self) -> None:
        check_site(self.site, self.layer)
        if self.inside and self.site != "vision":
            raise ValueError("only a 'vision' stage can run inside its block (inside=True)")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")


#: Instruction tokens (the prompt's text after the image) assumed when a method's scoring reads their
#: attention rows (TransPrune's IGA, AIF's probe) and the caller did not say how many: about half of
#: the accounting's default 64 text tokens, a LLaVA-1.5 VQA question with "Answer the question using a
#: single word or phrase. ASSISTANT:".
ASSUMED_INSTRUCTION_TOKENS = 32


@dataclass(frozen=True)
class StageShapes:
    """The sizes one stage works on, per image, so a strategy can state its own scoring FLOPs:
    ``tokens`` candidates enter the stage and ``kept`` leave it; ``width`` is the feature width at
    the site (vision hidden size at the vision and projector sites' inputs, LLM hidden size in the
    LLM), ``head_dim`` the attention head size there; ``instruction_tokens`` the prompt's text tokens
    after the image (None: not known, :data:`ASSUMED_INSTRUCTION_TOKENS`); ``patchless`` of the
    ``tokens``, the ones no patch stands behind (LLaVA-NeXT's and OneVision's row newlines, the CLS
    token a LLaVA under ``vision_feature_select_strategy="full"`` hands the LLM), which a method
    ranking patches never scores (0 where none or not known)."""

    tokens: int
    kept: int
    width: int
    head_dim: int
    instruction_tokens: int | None = None
    patchless: int = 0


def instruction_rows(shapes: StageShapes | None) -> int:
    """Query rows of a scoring that reads the instruction's attention: the caller's instruction
    tokens, or :data:`ASSUMED_INSTRUCTION_TOKENS` where they are not known."""
    given = shapes.instruction_tokens if shapes is not None else None
    return ASSUMED_INSTRUCTION_TOKENS if given is None else given


@dataclass(frozen=True)
class ScoringCost:
    """Extra work a strategy does to score tokens, reported apart so that net savings stay honest.

    kinds:
      - ``"llm_attention_rows"``: ``rows`` query rows against every key of LLM layer ``layer``
        (q projection of the rows, k projection of all tokens, scores and softmax). With
        ``keys_reused`` the stage at ``layer`` hands the keys of the tokens it keeps to the layer
        (``vtoken/adapters/key_reuse.py``), so only the dropped tokens' key projections are extra work;
        with ``keys_cached`` layer ``layer`` has already run and its KV cache holds the keys, so no
        key is projected (FastV's layer K-1, AIF's probe; a prefill with a KV cache, as ``generate``
        runs it: without one they are projected again); with ``queries_cached`` layer ``layer`` has
        just run on the rows and its own query projection of them is kept (AIF's observed rows,
        ``DecoderPruning._keep_layer_queries``), so no query is projected either, unless the LLM
        fuses q, k and v into one projection.
      - ``"vision_attention_rows"``: the same for vision-encoder layer ``layer``.
      - ``"projector_sensitivity"``: ZOO-Prune's sensitivity along ``passes`` directions (``rows``
        > 0: a rank-``rows`` SVD proxy of the projector's second layer). A family whose projector is
        a plain two-layer MLP (LLaVA, OneVision) is scored from its structure: its first layer once
        over the visual tokens, then ``passes`` second-layer passes on activation differences; any
        other (Qwen's merger, a LayerNorm first) by ``2 * passes`` full projector passes.
      - ``"projector_passes"``: ``passes`` extra forward passes of the projector over the visual
        tokens of a sample (ZOO-Prune's 2m perturbed passes, for example).
      - ``"projector_rows"``: the projector over ``rows`` more tokens of each image (VisionZip's
        merged contextual tokens, projected again from their merged inputs).
      - ``"vision_token_matching"`` / ``"llm_token_matching"``: the token similarities of ToMe
        bipartite matching that merges the tokens entering the stage at vision / LLM layer
        ``layer`` down to that stage's count (Representation Shift's merge mode).
      - ``"vision_attention_map"``: every token of vision-encoder layer ``layer`` as a query (the
        layer's whole attention map, recomputed beside the model's own attention; VFlowOpt), its
        column sums, and ``rows`` context rows per crop.
      - ``"llm_rerun_rows"``: ``rows`` tokens run (again) through every LLM layer from ``layer``
        on, each attending to all the prompt's tokens (AIF's masked text rows, its probe step).
        With ``later_images``, a sample of several images reruns every image after the first too
        (AIF recomputes every slot from the first text token after the first image's masked tokens):
        :func:`vtoken.accounting.per_sample` adds their visual tokens to ``rows``; the text between
        the images is not known to the schedule and not counted (one or two template tokens each).
      - ``"lm_head_rows"``: ``rows`` hidden states through the LM head (the logits of AIF's probe,
        whose greedy token is the next-token query, ``query="next"``).
      - ``"flops"``: an explicit count, ``flops``, for anything else.

    ``own_keys`` (``llm_attention_rows``, ``llm_rerun_rows``): keys the rows add to the prompt's
    and attend to as well (a decoding step's rows, which see the prompt and themselves: AIF's probe
    step attends to every prompt token and to its own).
    """

    kind: Literal[
        "llm_attention_rows", "vision_attention_rows", "projector_passes", "projector_rows", "projector_sensitivity",
        "vision_token_matching",
        "llm_token_matching", "vision_attention_map", "llm_rerun_rows", "lm_head_rows", "flops",
    ]
    layer: int | None = None
    rows: int = 0
    passes: int = 0
    flops: float = 0.0
    keys_reused: bool = False
    keys_cached: bool = False
    queries_cached: bool = False
    later_images: bool = False
    own_keys: int = 0


@dataclass(frozen=True)
class Schedule:
    """An ordered list of stages plus the scoring work that decides them.

    ``visual_tokens`` is the number of visual tokens per sample before any pruning as the LLM would
    see them (576 for LLaVA-1.5 at 336 px), ``vision_tokens`` the patch tokens per image (or crop) that
    the vision encoder processes, excluding CLS; ``None`` means "take it from the model config".
    """

    stages: tuple[Stage, ...] = ()
    scoring: tuple[ScoringCost, ...] = ()
    visual_tokens: int | None = None
    vision_tokens: int | None = None
    images: int = 1
    notes: tuple[str, ...] = field(default=())
    #: ``(layer, visual tokens)``: after the prefill, the KV cache of LLM layers ``>= layer`` holds only
    #: that many visual tokens per image (a mask stage that evicts what it hides: AIF's
    #: ``mode="evict"``); the prefill itself runs every token. None: the cache holds what the stages kept.
    cache_evicted: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        order = {site: i for i, site in enumerate(SITES)}
        keys = [(order[s.site], -1 if s.layer is None else s.layer) for s in self.stages]
        if keys != sorted(keys):
            raise ValueError("stages must be ordered by site (vision, projector, llm) and layer")
        kept = [s.keep_tokens for s in self.stages if s.site != "vision"]
        if any(b > a for a, b in zip(kept, kept[1:])):
            raise ValueError("a later stage cannot keep more tokens than an earlier one")

    @property
    def is_identity(self) -> bool:
        return not self.stages
