"""What a strategy sees at a pruning stage: the candidate tokens as padded rows, and how to score them.

A *row* is the set of visual tokens of one image (one crop at the vision site), padded to the longest
row of the batch. Strategies return one score per token, or a :class:`Reduction` when they merge.
Nothing here knows which model produced the tensors: model-specific work (attention rows, positions)
is reached through the callables the adapter puts on :class:`ScoreContext`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from vtoken.config import StageSpec


@dataclass(frozen=True)
class Grid:
    """A 2-D patch grid inside a row: ``height x width`` tokens starting at ``offset``, row-major.

    ``row_stride`` is the distance between the starts of two grid rows; it exceeds ``width`` when each
    row is followed by separator tokens (LLaVA-NeXT's newline embedding).
    """

    offset: int
    height: int
    width: int
    row_stride: int

    @property
    def size(self) -> int:
        return self.height * self.width

    def index(self) -> torch.Tensor:
        """Row indices of the grid's tokens, shape ``[height, width]``."""
        rows = torch.arange(self.height)[:, None] * self.row_stride
        return self.offset + rows + torch.arange(self.width)[None, :]


@dataclass
class TokenRows:
    """Candidate visual tokens at one stage.

    Attributes:
        features: ``[R, N, d]`` token features at the site (vision hidden states, projected features,
            or LLM hidden states at the input of the pruning layer); padded entries are zero.
        valid: ``[R, N]`` True for real tokens.
        budget: ``[R]`` how many tokens each row keeps.
        sample: ``[R]`` the batch sample each row belongs to (at the vision site, where samples are
            not known yet, the image index).
        grids: per row, the patch grids that the row's tokens form, or ``None`` once earlier pruning has
            broken the grid.
        local_index: ``[R, N]`` each candidate's index among its image's visual tokens as the LLM sees
            them (-1 for padding, and at the vision site for tokens that never reach the LLM).
        sizes: ``[R, N]`` float (vision site): how many original patch tokens each candidate holds
            (1 until a merging stage folds tokens into it; 0 for padding).
        offset: (vision site) the place of the first candidate in the encoder's sequence: the
            tokens before it (CLS, registers) are never candidates.
    """

    features: torch.Tensor
    valid: torch.Tensor
    budget: torch.Tensor
    sample: torch.Tensor
    grids: list[tuple[Grid, ...] | None]
    local_index: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    offset: int = 0

    @property
    def num_rows(self) -> int:
        return self.features.shape[0]


@dataclass
class Reduction:
    """A strategy's decision for each row.

    ``keep``: ``[R, K]`` kept token indices per row, ascending, padded with -1 past the row's budget.
    ``features``: optional ``[R, K, d]`` replacement features for the kept tokens (merging methods put
    the merged vectors here; each one takes the position of the kept token it replaces).
    ``merged_into``: optional ``[R, N]`` long, for merging methods at the vision site: for each
    candidate, the column of ``keep`` whose token now holds it (a kept token holds itself), -1 for
    candidates dropped outright and for padding. The pipeline follows it to carry sizes (how many
    patches each token holds) and the source map ``vtoken.show`` draws; None means plain pruning.
    """

    keep: torch.Tensor
    features: torch.Tensor | None = None
    merged_into: torch.Tensor | None = None

    def columns(self, candidates: int) -> torch.Tensor:
        """``[R, candidates]``: the column of :attr:`keep` whose token holds each candidate
        (:attr:`merged_into`, or for plain pruning the candidate's own column), -1 if dropped."""
        if self.merged_into is not None:
            return self.merged_into.to(self.keep.device).long()
        rows = self.keep.shape[0]
        columns = torch.full((rows, candidates + 1), -1, dtype=torch.long, device=self.keep.device)
        own = torch.arange(self.keep.shape[1], device=self.keep.device).expand(rows, -1)
        columns.scatter_(1, torch.where(self.keep >= 0, self.keep, candidates), own)
        return columns[:, :candidates]


@dataclass(init=False)
class VisionAttention:
    """The self-attention of one vision-encoder layer, per crop, over the crop's patch tokens.

    Rows are queries and columns keys, both restricted to the patch tokens (a CLS token, where the
    tower has one, is neither); each probability is the layer's own softmax over every token of
    the crop (CLS included), averaged over heads. Computed beside SDPA/FlashAttention from the
    layer's input, never as a whole N x N map.

    ``received``: ``[C, P]`` the mean over the crop's P patch queries of the probability each patch
    receives (computed on first use: every patch as a query). ``rows(index)``: for ``[C, Q]`` patch
    indices (-1 for none) the ``[C, Q, P]`` probability rows of those query patches (zero rows for
    -1). ``cls``: ``[C, P]`` the CLS token's row (its attention to each patch; computed on first use
    by ``cls_row``), or None for a tower without CLS. ``keys``: ``[C, P, head_dim]`` each patch's key,
    averaged over heads (before the softmax scale; VisionZip's similarity metric).
    """

    rows: Callable[[torch.Tensor], torch.Tensor]
    keys: torch.Tensor
    #: ``() -> [C, P]``: the CLS token's row; None for a tower without CLS. Called on first use of
    #: :attr:`cls` only, so a method that never reads it (VFlowOpt) neither projects that query nor
    #: scores it (work ``vtoken.flops`` would otherwise have to count as scoring).
    cls_row: Callable[[], torch.Tensor] | None
    column_mass: Callable[[], torch.Tensor]
    #: ``[C, P]`` True for real patches where crops differ in size and are padded to the largest
    #: (Qwen-VL's images); None when every crop has all ``P`` patches.
    valid: torch.Tensor | None = None

    def __init__(self, rows: Callable[[torch.Tensor], torch.Tensor], keys: torch.Tensor,
                 cls: torch.Tensor | None = None, column_mass: Callable[[], torch.Tensor] | None = None,
                 valid: torch.Tensor | None = None, *, cls_row: Callable[[], torch.Tensor] | None = None):
        if column_mass is None:
            raise TypeError("VisionAttention needs column_mass")
        if cls is not None and cls_row is not None:
            raise TypeError("give VisionAttention the CLS row as cls= (a tensor) or cls_row= (made on first use), not both")
        self.rows, self.keys, self.column_mass, self.valid, self.cls_row = rows, keys, column_mass, valid, cls_row
        if cls_row is None:  # a row given as it is (or no CLS): what the cached property returns
            self.__dict__["cls"] = cls

    @functools.cached_property
    def received(self) -> torch.Tensor:
        return self.column_mass()

    @functools.cached_property
    def cls(self) -> torch.Tensor | None:
        return self.cls_row()  # (only reached with a cls_row: __init__ stored any other value)


@dataclass
class ScoreContext:
    """Everything a strategy may use to decide one stage.

    ``attention(query, layer)`` is present at the ``"llm"`` site: it returns ``[R, H, Q, N]`` softmax
    probabilities from ``Q`` query rows of the sample (``query="last"``: its last token) to each
    candidate token, from the attention of LLM layer ``layer`` (``"previous"``: the layer before the
    pruning layer, as FastV; ``"current"``: the pruning layer itself). It is computed beside SDPA or
    FlashAttention without an N x N map; eager attention gives the same numbers. ``query`` may also
    be ``"instruction"``: every valid text token after the sample's last image (question and chat
    template tail, TransPrune's IGA rows); rows past a sample's count are zero. The result may be a
    view of the layer's whole map (an image's columns are one slice of it): read it, reshape it, but
    do not write into it or ``view`` it.

    ``observed(layer)`` returns ``[R, N, k]``: what the strategy's ``observe`` summarised per token
    at ``layer`` of this site (vision-encoder or LLM layer), aligned with the current rows (zeros
    for tokens it did not see). Strategies declare the layers in ``needs()`` (``vision_observed``,
    ``llm_observed`` signals).
    ``observed_attention(layer)`` (``"llm"`` site and mask stages) is the same for what the
    strategy's ``observe_attention`` summarised of LLM ``layer``'s attention rows; strategies declare
    the layers and the query rows in ``needs()`` (``llm_attention_observed`` signals).

    At the ``"projector"`` site, ``projector`` is the model's projector as a callable on any
    ``[..., d_vision]`` tensor and ``projector_input`` (``[R, N, d_vision]``) the features it was fed
    for each candidate (zeros for tokens with no vision feature, such as NeXT's newlines); present
    when the strategy's ``needs()`` holds the ``projector_input`` signal.

    At the ``"projector"`` and ``"llm"`` sites, for strategies that read the vision encoder itself
    (VFlowOpt; signals ``vision_attention`` at a layer and ``pixel_patches`` in ``needs()``):
    ``vision_attention(layer)`` gives a :class:`VisionAttention` of
    vision layer ``layer`` for every crop of the request; ``pixel_patches()`` the ``[C, P, channels,
    p, p]`` pixel values (as the model received them, still normalised) behind each crop's patch
    tokens; ``from_crops(table, fill=0.0)`` maps a per-crop patch table ``[C, P, ...]`` onto the
    candidate rows ``[R, N, ...]`` (``fill`` for candidates with no patch behind them: NeXT's
    newlines, a CLS token kept as a visual token). ``state`` is a dict private to the strategy
    that lives for one request's prefill: the same object at every stage of that prefill, a fresh
    empty one for the next prefill.
    """

    stage: StageSpec
    tokens: TokenRows
    generator: torch.Generator
    stage_index: int = 0
    attention: Callable[..., torch.Tensor] | None = None
    observed: Callable[[int], torch.Tensor] | None = None
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None
    projector_input: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    observed_attention: Callable[[int], torch.Tensor] | None = None
    vision_attention: Callable[[int], VisionAttention] | None = None
    pixel_patches: Callable[[], torch.Tensor] | None = None
    from_crops: Callable[..., torch.Tensor] | None = None
    state: dict = field(default_factory=dict)
    #: Per row, a seed that depends only on the config's seed, the row's own image (its pixels), its
    #: place in that image (crop) and the stage; computed on first call.
    row_seeds: Callable[[], list[int]] | None = None
    #: Per-input annotations the caller handed this request (``vtoken.annotate``), e.g. the oracle's
    #: ``relevant`` patches; empty when none.
    annotations: dict = field(default_factory=dict)
    #: Where ``report`` puts what the strategy wants inspectable after the call (``vtoken.diagnostics``).
    diagnostics: dict | None = None
    #: ``[R, N, head_dim]`` (vision stages that run inside their block, ``Strategy.inside_block``):
    #: each candidate's key in this block's attention, averaged over heads (ToMe's matching metric).
    keys: torch.Tensor | None = None

    def report(self, **values) -> None:
        """Keep named values of this stage's decision (scores, statistics) for ``vtoken.diagnostics``
        after the call; they belong to this request, never to the strategy instance."""
        if self.diagnostics is not None:
            self.diagnostics.setdefault(self.stage.name, {}).update(values)

    def uniform(self) -> torch.Tensor:
        """``[R, N]`` uniform draws in [0, 1) for the valid candidates (0 for padding). A row's draws
        depend only on its own image, place and stage and the config's seed, never on the other
        images of the batch: an image is pruned the same alone and in any batch."""
        seeds = self.require("row_seeds", "per-image random draws")()
        valid = self.tokens.valid.cpu()
        out = torch.zeros(valid.shape, dtype=torch.float32)
        for r, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(seed)
            out[r, valid[r]] = torch.rand(int(valid[r].sum()), generator=generator)
        return out.to(self.tokens.valid.device)

    def require(self, what: str, method: str):
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"{method} needs `{what}`, which the {self.stage.site!r} site does not provide here")
        return value

    def require_attention(self, method: str) -> Callable[..., torch.Tensor]:
        if self.attention is None:
            raise ValueError(
                f"{method} scores tokens by LLM attention, which exists only at the 'llm' site; "
                f"use site='llm' with a layer, not site={self.stage.site!r}"
            )
        return self.attention
