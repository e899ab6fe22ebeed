"""``repshift``: Representation Shift (J. Choi, S. Lee, B. Ko, E. Kim, J. Kil, H. J. Kim,
"Representation Shift: Unifying Token Compression with FlashAttention", ICCV 2025, arXiv 2508.00367).

A token's importance is how much a layer changes it (Eq. 4): ``s = D(F(x), x)``, with ``D`` the L2
distance. For a pre-LN block, ``x' = SA(LN(x)) + x`` (Eq. 5) and ``x̂ = MLP(LN(x')) + x'`` (Eq. 6),
the paper compares three operations (Fig. 5a) and three distances (Fig. 5b):

- ``operation="mlp"`` (default, best in the paper): ``D(MLP(LN(x')), x')``;
- ``operation="attention"``: ``D(SA(LN(x)), x)``;
- ``operation="block"``: ``D(x̂, x)``;
- ``distance="l2"`` (default, best), ``"l1"``, or ``"cos"`` (``1 - cos``).

Which tensors are compared. Read literally, Eqs. 4-6 compare the sub-layer's *branch output* (before
the residual add) with the sub-layer's *input* ``x'`` (the residual stream before the LayerNorm).
That is the default, ``shift="branch"``: a token has zero shift exactly when its MLP branch output
equals the residual-stream vector that entered the MLP sub-layer. ``shift="residual"`` instead
measures how much the residual stream moves across the sub-layer, ``D(x' + MLP(LN(x')), x')`` (zero
exactly when the branch output is zero, i.e. the sub-layer's output equals its input); the notes
list both readings and the official code could not be read, so both are offered and the literal one
is the default. ``operation="block"`` is the same in both modes. What the adapters hand ``observe``
(``vtoken.adapters.observe``): for HF CLIP and Llama layers, ``io["mlp"]`` is (``LN(x')``, branch
output before the residual add), ``io["attention"]`` is (``LN(x)``, attention branch output) and
``io["block"]`` is (``x``, ``x̂``). Neither ``LN(x')`` nor ``LN(x)`` is what the paper compares, so
``x'`` is rebuilt as the layer computes it, ``io["block"][0] + io["attention"][1]`` (bit-exact), and
``x̂`` is ``io["block"][1]``. Distances are computed in float32.

Where. The paper prunes inside ViTs and never evaluates a VLM. Its image setting (DeiT, Table 5)
drops 20% of the *current* tokens after (1-based) blocks 1, 4 and 7 of 12; the default here is that
schedule scaled to the bound vision tower's depth (``default_layers``: 0-based layers 1, 7, 13 of
CLIP-L's 24; 0, 1 of a 4-layer tower), kept at least two layers before the last so LLaVA's read of
the penultimate layer comes after them, with each stage keeping the same fraction of the current
tokens so the last one meets the budget (``keep ** (i/n)`` of the original after stage ``i`` of
``n``). The default budget is the paper's, ``0.8 ** 3 = 0.512``. A single ``layer=`` or a list of
``stages=`` replaces the schedule. At the ``"vision"`` site the shift is the one across the MLP of
vision layer ``layer`` itself (the stage acts on that layer's output); CLS is never a candidate
(the adapter keeps every token before the patches), so it is always kept. At the ``"llm"`` site
(before decoder layer ``K``) the score is the shift across decoder layer ``K - 1``, the last one that
ran; ``K = 0`` is refused. The score never needs attention weights, so SDPA/FlashAttention run in
every layer.

Merging (``mode="merge"``). The paper defines no merge rule of its own: for Table 3 it puts the
shift into vid-TLDR (Choi et al., CVPR 2024) in place of vid-TLDR's attention-entropy saliency, on
UMT, a video ViT without a class token. The default follows that code, mlvlab/vid-TLDR at
``a25051d4a4808ce2b480bd1a80a96f68c21aa5cb`` (``multi_modality/utils/vid_TLDR.py``: ``vidTLDR``,
``get_objective_score``, ``merging``, ``merge_wavg``; ``multi_modality/models/backbones/vit/vit.py``:
``Block``), which is ToMe's bipartite soft matching (facebookresearch/ToMe at
``af95e4b1befa172dadccd8c81e223b10090f9579``, ``tome/merge.py``) with a saliency-weighted average.
One merging round on a row (an image's crop at the vision site, an image at the LLM site), through
:func:`vtoken.strategies.tome.merge_round`:

- **Sequence and split** (ToMe): the prefix tokens (CLS, registers: ``TokenRows.offset``) then the
  candidates in *ToMe's order*, split alternately into A (even places) and B (odd); the class token
  is A's first and never merges (``class_token=True``); other prefix tokens are protected as in
  ``tome.py``. Without a prefix (vid-TLDR's UMT, SigLIP, Qwen-VL, the LLM site) A starts with the
  first candidate.
- **Matching**: cosine similarity of the hidden states (vid-TLDR's metric is the block's hidden
  state, ``merging(x, ...)``; ToMe's are the attention keys); each A token's most similar B token;
  the ``r`` A tokens with the strongest edge merge into it. vid-TLDR ranks ``(cos + 1) / 2``, the
  same order.
- **Per-round cap** (ToMe and vid-TLDR): ``r = min(r, n // 2)`` for ``n`` candidates (ToMe's
  ``(t - protected) // 2``, vid-TLDR's ``T // 2``). One stage repeats rounds until its budget is
  met (vtoken's budget; both codes merge one round per block); the paper's schedule (20% of the
  current tokens per stage) needs one round.
- **Saliency weighting** (``merge_weight="shift"``, default; vid-TLDR's ``merge_wavg`` with
  ``merging``'s ``src * src_so``): a token that merges away enters its target with weight
  ``size x saliency``, the target (and every staying token) with weight ``size``, in the averaged
  features and in the summed size alike, so a merged token is the convex combination
  ``sum(w x) / sum(w)`` and its size becomes ``sum(w)`` (a saliency-weighted size, carried to the
  next stage; vid-TLDR's ``size / size_max`` scaling cancels). The saliency is the shift through
  ``get_objective_score``'s normalisation, per row over its candidates (:func:`vid_tldr_saliency`:
  min-max to [0, 1]; "background removing": tokens below the mean get 0, so they vanish from the
  average they join; "foreground sharpening": the rest ``(s - mean) / max``). Which part of
  ``get_objective_score`` the shift replaced (only the entropy, as here, or the whole function) is
  not stated, and Representation Shift's code could not be read; the normalisation is kept because
  the rule needs the saliency on the scale of the (unscaled) target weight 1. ``merge_weight="size"``
  is ToMe's ``merge_wavg`` (every member weighs its size, sizes are counts).
- **Order** (ToMe and vid-TLDR): the round's output is ``[prefix, staying A in place order, B]``, and
  the next round and the next stage split *that* sequence. The staying A tokens are always sorted
  (vid-TLDR sorts them; ToMe does when a class token leads, and leaves them in edge order otherwise).
  The order is kept in ``ctx.state`` (as ``tome.py`` does); the tokens themselves always reach the
  next block, the projector and the LLM in spatial order (a merged token keeps its B member's place;
  ``Reduction.merged_into`` tells the pipeline which patches each one holds, for ``vtoken.show``), so
  the LLM reads the image in raster order, as unpruned. In the vision tower (position embeddings
  added before the first block, attention without a mask) the blocks are permutation-equivariant, so
  this equals running the tower in ToMe's order and sorting its output at the end. At the LLM site
  ToMe's order only decides the split: the tokens keep their places in the causal sequence.

At the vision site every real encoder token takes part (also those the LLM never sees, LLaVA-NeXT's
unpadding), as in ``tome.py``. Order and sizes carry from one stage to the next at the same site
within a request; a stage at a new site (``"vision"`` then ``"llm"``) starts again from spatial order
and size 1.

Where. A stage merges the *output* of its block (after the MLP), not between the block's attention
and MLP as ToMe and vid-TLDR do. The default score is the shift across that block's MLP, which
exists only once the MLP has run on every token; merging before the MLP would have to score with
something else (the previous block's shift, or this block's attention shift) or run the MLP on every
token first, which is merging after the block. Against ToMe's placement in the same block, the MLP of
the stage's block runs on the ``r`` merged-away tokens too (one MLP over ``r`` tokens), and the match
compares ``x̂`` rather than ``x'``. Proportional attention (vid-TLDR and ToMe add ``log size`` to the
later blocks' attention logits) is not applied: vtoken's pipeline adds that bias only for stages run
inside their block, and FlashAttention, the paper's point, takes no additive bias; the paper does not
say how its "+Ours" runs combined the two.

Cost. The shift is an element-wise distance over tensors the layer computes anyway (O(n d), like the
norms the FLOPs convention ignores), so pruning reports no scoring cost. Merging reports the
similarity products of the bipartite matching (``*_token_matching`` in ``vtoken.accounting``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtoken.config import PruneConfig, StageSpec
from vtoken.kernels import token_shift
from vtoken.context import Reduction, ScoreContext
from vtoken.registry import register
from vtoken import signals
from vtoken.signals import Needs, Signal
from vtoken.schedule import ScoringCost, StageShapes
from vtoken.strategies.base import Strategy
from vtoken.strategies.tome import GroupMerge, merge_round, merge_rows

OPERATIONS = ("mlp", "attention", "block")
DISTANCES = ("l2", "l1", "cos")
SHIFTS = ("branch", "residual")
MODES = ("prune", "merge")
MERGE_WEIGHTS = ("shift", "size")
#: Where merge mode keeps ToMe's token order and the sizes in ``ctx.state``.
STATE_KEY = "repshift"

#: The paper's image schedule (DeiT, Table 5): 20% of the current tokens dropped after these
#: 1-based blocks of a 12-block ViT.
PAPER_BLOCKS = (1, 4, 7)
PAPER_DEPTH = 12
PAPER_KEEP_PER_STAGE = 0.8
#: Depth the default schedule is resolved against before a model is bound (LLaVA-1.5's CLIP-L/14).
REFERENCE_DEPTH = 24


def default_layers(depth: int) -> list[int]:
    """0-based vision layers of the paper's schedule on a ``depth``-layer tower: 1-based block ``b``
    of 12 becomes the layer after which ``b / 12`` of the tower has run, clamped to
    ``[0, depth - 3]`` (LLaVA reads the penultimate layer, and a stage must come before it), with
    duplicates merged."""
    if depth < 1:
        raise ValueError(f"the vision tower needs at least one layer, got depth {depth}")
    last = max(0, depth - 3)
    return sorted({min(last, max(0, int(b * depth / PAPER_DEPTH + 0.5) - 1)) for b in PAPER_BLOCKS})


@dataclass(frozen=True)
class ScheduledStage(StageSpec):
    """Stage ``step`` of ``steps`` of the default progressive schedule. Its ``keep``/``keep_tokens`` is
    the final budget; the stage keeps ``fraction ** (step / steps)`` of the image's tokens, so every
    stage keeps the same share of the tokens it receives and the last one meets the budget."""

    step: int = 1
    steps: int = 1

    def fraction(self, visual_tokens: int) -> float:
        return super().fraction(visual_tokens) ** (self.step / self.steps)

    def budget(self, visual_tokens: int) -> int:
        final = super().budget(visual_tokens)
        if self.step == self.steps:
            return final
        return min(visual_tokens, max(final, round(self.fraction(visual_tokens) * visual_tokens)))


@dataclass
class RepShiftConfig(PruneConfig):
    """Representation Shift options.

    Attributes:
        site: ``"vision"`` (default; inside the vision encoder) or ``"llm"`` (before decoder layer
            ``layer``, scored by the shift across layer ``layer - 1``).
        layer: one pruning layer; ``None`` at the vision site runs the paper's progressive schedule
            scaled to the tower's depth (see ``default_layers``).
        operation: the transformation whose shift is measured: ``"mlp"`` (default, the paper's
            choice), ``"attention"`` or ``"block"``.
        distance: ``"l2"`` (default, the paper's choice), ``"l1"`` or ``"cos"`` (1 - cosine).
        shift: ``"branch"`` (default, Eq. 4-6 literally: branch output against the sub-layer input)
            or ``"residual"`` (the residual stream after the sub-layer against before it).
        mode: ``"prune"`` (default, the paper's main use: keep the highest shifts) or ``"merge"``
            (vid-TLDR's merging with the shift as saliency, as in the paper's Table 3: ToMe's
            bipartite matching, class-token split, per-round cap and token order).
        merge_weight: in merge mode, ``"shift"`` (default; vid-TLDR's rule: a token merging away
            weighs size x normalised shift, its target its size) or ``"size"`` (ToMe's
            size-weighted mean).
    """

    method = "repshift"
    # 0.8 ** 3 = 0.512: the paper's three stages, each dropping 20% of the current tokens (rounded so
    # that 0.8 ** 3's float tail does not show in vtoken.methods()).
    default_keep = round(PAPER_KEEP_PER_STAGE ** len(PAPER_BLOCKS), 12)

    site: str = "vision"
    layer: int | None = None
    operation: str = "mlp"
    distance: str = "l2"
    shift: str = "branch"
    mode: str = "prune"
    merge_weight: str = "shift"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("operation", OPERATIONS), ("distance", DISTANCES), ("shift", SHIFTS),
            ("mode", MODES), ("merge_weight", MERGE_WEIGHTS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"repshift: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        super().__post_init__()
        for stage in self.resolved_stages():
            if stage.site not in RepShiftStrategy.sites:
                raise ValueError(
                    f"repshift scores tokens by how a vision or LLM layer changes them, so it cannot prune at "
                    f"the {stage.site!r} site; use site='vision' (default) or site='llm' with layer=K >= 1"
                )
            if stage.site == "llm" and stage.layer == 0:
                raise ValueError(
                    "repshift at llm layer 0 has no earlier decoder layer whose shift it could measure; use layer >= 1"
                )

    def resolved_stages(self, depth: int | None = None) -> tuple[StageSpec, ...]:
        """The stages; the default vision schedule is resolved against a tower of ``depth`` layers
        (``REFERENCE_DEPTH`` until a model is bound)."""
        if self.stages or self.layer is not None or self.site != "vision":
            return super().resolved_stages()
        layers = default_layers(depth or REFERENCE_DEPTH)
        keep = self.default_keep if self.keep is None and self.keep_tokens is None else self.keep
        return tuple(
            ScheduledStage("vision", layer, keep, self.keep_tokens, step=i + 1, steps=len(layers))
            for i, layer in enumerate(layers)
        )


# --------------------------------------------------------------------------------------------------
# The score


def token_distance(after: torch.Tensor, before: torch.Tensor, distance: str = "l2") -> torch.Tensor:
    """Per-token distance ``D(after, before)`` over the last dimension, in float32 (Fig. 5b)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    return token_shift(after, before, distance)  # one pass (a Triton kernel on CUDA)


def representation_shift(
    io: dict[str, tuple[torch.Tensor, torch.Tensor]], operation: str = "mlp", distance: str = "l2",
    shift: str = "branch",
) -> torch.Tensor:
    """``[B, L]`` shift of every token across one pre-LN block's sub-layer (Eq. 4 with Eqs. 5-6).

    ``io`` is what ``Strategy.observe`` receives: ``"block"`` (x, x̂), ``"attention"`` (LN(x),
    SA(LN(x))) and ``"mlp"`` (LN(x'), MLP(LN(x'))), branch outputs before the residual add.
    """
    x, x_hat = io["block"]
    if operation == "block":
        return token_distance(x_hat, x, distance)
    attention_branch = io["attention"][1]
    x_mid = x + attention_branch  # x' (Eq. 5), computed as the layer computes it
    if operation == "attention":
        before, branch, after_residual = x, attention_branch, x_mid
    elif operation == "mlp":
        before, branch, after_residual = x_mid, io["mlp"][1], x_hat
    else:
        raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")
    return token_distance(branch if shift == "branch" else after_residual, before, distance)


# --------------------------------------------------------------------------------------------------
# Merging


def vid_tldr_saliency(score: torch.Tensor, take_part: torch.Tensor) -> torch.Tensor:
    """``[R, N]`` vid-TLDR's saliency of each token from a per-token ``score`` (higher = more salient),
    per row over the tokens that ``take_part``: ``get_objective_score`` after its first lines (which
    compute the attention's negative entropy; Representation Shift puts the shift there). Min-max
    normalise to [0, 1]; "background removing": tokens below the row's mean get 0; "foreground
    sharpening": the others become ``(s - mean) / max(s - mean)``, so the most salient token has 1.
    A row whose scores are all equal (where the official code divides 0 by 0) gets 1 everywhere, i.e.
    plain size weighting. Tokens not taking part get 0."""
    big = torch.finfo(torch.float32).max
    s = score.float()
    s = s - s.masked_fill(~take_part, big).amin(dim=-1, keepdim=True)
    high = s.masked_fill(~take_part, -big).amax(dim=-1, keepdim=True)
    flat = high <= 0
    s = s / torch.where(flat, torch.ones_like(high), high)
    count = take_part.sum(dim=-1, keepdim=True).clamp(min=1)
    mean = (s * take_part).sum(dim=-1, keepdim=True) / count
    background = s < mean
    s = s - mean
    top = s.masked_fill(~take_part, -big).amax(dim=-1, keepdim=True)
    s = s / torch.where(top > 0, top, torch.ones_like(top))
    s = s.masked_fill(background, 0.0)
    s = torch.where(flat, torch.ones_like(s), s)
    return s.masked_fill(~take_part, 0.0)


def bipartite_merge(
    features: torch.Tensor, take_part: torch.Tensor, budget: torch.Tensor, sizes: torch.Tensor | None = None,
    offset: int = 0, position: torch.Tensor | None = None, saliency: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge each row's tokens that ``take_part`` down to ``budget[r]`` by rounds of ToMe's bipartite
    soft matching (:func:`vtoken.strategies.tome.merge_round`, the hidden states as the metric), each
    merging ``min(n - budget, n // 2)`` of the row's ``n`` tokens.

    Args:
        features: ``[R, N, d]``; take_part: ``[R, N]``; budget: ``[R]`` (at most the row's count).
        sizes: ``[R, N]`` the (weighted) size of each token (default 1).
        offset: protected prefix tokens (CLS, registers) before the candidates in the sequence.
        position: ``[R, N]`` each token's place in ToMe's order among the row's tokens taking part
            (a permutation of ``0 .. n-1``, -1 elsewhere); default their ascending (spatial) order.
        saliency: ``[R, N]`` vid-TLDR's saliency (:func:`vid_tldr_saliency`): a token merging away
            weighs ``size x saliency``; None: ToMe's size-weighted mean. In a later round of the
            same call a token keeps its own saliency (a merged token its B member's).

    Returns ``keep`` ``[R, K]`` (ascending, -1 padded), the kept tokens' features ``[R, K, d]`` (input
    dtype; a row with nothing to merge comes back bit-exact), ``merged_into`` ``[R, N]`` (the column of ``keep`` holding each
    token, -1 for tokens not taking part), their places in ToMe's order ``[R, K]`` and their sizes
    ``[R, K]`` (float32).
    """
    dim, device = features.shape[-1], features.device
    take_part = take_part.to(device)
    if sizes is None:
        sizes = take_part.float()
    if position is None:
        position = torch.where(take_part, take_part.long().cumsum(dim=-1) - 1, -1)

    def merge_group(group, columns, n, target) -> GroupMerge:
        x = features[group].gather(1, columns[..., None].expand(-1, -1, dim))
        s = sizes[group].to(device).float().gather(1, columns)
        p = position[group].to(device).gather(1, columns)
        w = saliency[group].to(device).float().gather(1, columns) if saliency is not None else None
        local = torch.arange(n, device=device).expand(len(group), n)  # current token -> its column among the n
        holder = torch.arange(n, device=device).expand(len(group), n)  # each of the n -> the current token holding it
        while x.shape[1] > target:
            m = x.shape[1]
            kept, x, p, into, s = merge_round(x, x, s, p, min(m - target, m // 2), offset, saliency=w,
                                              sort_unmerged=True)
            local, holder = local.gather(1, kept), into.gather(1, holder)
            if w is not None:
                w = w.gather(1, kept)
        return local, x.to(features.dtype), p, holder, s

    return merge_rows("repshift", features, take_part, budget.to(device), merge_group)


# --------------------------------------------------------------------------------------------------
# The strategy


@register
class RepShiftStrategy(Strategy):
    name = "repshift"
    Config = RepShiftConfig
    sites = ("vision", "llm")

    def stages(self) -> tuple[StageSpec, ...]:
        return self.config.resolved_stages(self.depths.get("vision"))

    @staticmethod
    def scored_layer(stage: StageSpec) -> int:
        """The layer whose shift decides ``stage``: the vision layer the stage follows, or the
        decoder layer before the LLM pruning layer."""
        return stage.layer if stage.site == "vision" else stage.layer - 1

    reads = (signals.VISION_OBSERVED, signals.LLM_OBSERVED)

    def needs(self) -> Needs:
        kind = {"vision": signals.VISION_OBSERVED, "llm": signals.LLM_OBSERVED}
        return Needs.of(*(Signal(kind[s.site], self.scored_layer(s)) for s in self.stages()))

    def observe(self, site: str, layer: int, io: dict, valid: torch.Tensor) -> torch.Tensor:
        config = self.config
        return representation_shift(io, config.operation, config.distance, config.shift)

    def scoring_cost(self, stage: StageSpec, shapes: StageShapes | None = None) -> list[ScoringCost]:
        if self.config.mode != "merge":
            return []  # element-wise distances of tensors the layer computes anyway
        return [ScoringCost(f"{stage.site}_token_matching", layer=stage.layer)]

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        observed = ctx.require("observed", self.name)
        shift = observed(self.scored_layer(ctx.stage))[..., 0].float()
        return shift.masked_fill(~ctx.tokens.valid, 0.0)

    def reduce(self, ctx: ScoreContext) -> Reduction:
        if self.config.mode == "prune":
            return super().reduce(ctx)
        rows = ctx.tokens
        device = rows.features.device
        # At the vision site every real encoder token takes part (also those the LLM never sees:
        # LLaVA-NeXT's unpadding), as the encoder merges its whole sequence (tome.py does the same).
        vision = ctx.stage.site == "vision" and rows.sizes is not None
        take_part = (rows.sizes > 0 if vision else rows.valid).to(device)
        position, sizes = self._carried(ctx, take_part)
        saliency = None
        if self.config.merge_weight == "shift":
            shift = ctx.require("observed", self.name)(self.scored_layer(ctx.stage))[..., 0].float()
            saliency = vid_tldr_saliency(shift.to(device), take_part)
        keep, merged, merged_into, position, sizes = bipartite_merge(
            rows.features, take_part, rows.budget, sizes, offset=int(rows.offset), position=position, saliency=saliency,
        )
        # ToMe's order and the (weighted) sizes this stage leaves, in the request's scratch (the same
        # dict at every stage of one prefill), so the next stage at the same site continues from them.
        ctx.state[STATE_KEY] = {"stage_index": ctx.stage_index, "site": ctx.stage.site, "position": position,
                                "sizes": sizes}
        ctx.report(merged=(take_part.sum(-1) - rows.budget.to(device)).cpu())
        return Reduction(keep=keep, features=merged, merged_into=merged_into)

    @staticmethod
    def _carried(ctx: ScoreContext, take_part: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """ToMe's order and the sizes of the current rows: what the previous stage of this request
        left when it ran at the same site just before (its kept tokens are then exactly these rows,
        in order), else (None, None): spatial order, size 1."""
        previous = ctx.state.get(STATE_KEY) if ctx.state is not None else None
        if previous is None or previous["stage_index"] != ctx.stage_index - 1 or previous["site"] != ctx.stage.site:
            return None, None
        position = previous["position"].to(take_part.device)
        if position.shape != take_part.shape or not torch.equal(position >= 0, take_part):
            raise RuntimeError(
                "repshift: the candidates of this stage are not the tokens the previous merging stage kept, in the "
                "order it returned them; ToMe's token order cannot be followed"
            )
        return position, previous["sizes"].to(take_part.device)
