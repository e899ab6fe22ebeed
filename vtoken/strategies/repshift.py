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

Merging (``mode="merge"``). The paper plugs the shift into vid-TLDR (Table 3) as its saliency:
ToMe's bipartite soft matching (tokens split alternately into sets A and B, cosine similarity, the
``r`` A tokens with the most similar B partner merged into it), with merged tokens combined by
size-weighted averages. Here the matching runs on the site's features (vid-TLDR matches on the
hidden states too; ToMe on attention keys, which SDPA does not expose), and one stage repeats the
matching until the budget is met (ToMe removes at most half the tokens per round). With
``merge_weight="shift"`` (default) a merged token is the mean of its members weighted by
``size x shift``, so salient tokens dominate the average (vid-TLDR scales only the merged-in tokens
by saliency and divides by the plain size sum, which shrinks the result; a normalised weighted mean
keeps it a convex combination); with ``merge_weight="size"`` it is ToMe's size-weighted mean, which
preserves ``sum(size * x)`` exactly. Sizes (how many original tokens each one stands for) are
carried from one stage to the next of the same site within a request; a stage at a new site starts
again at size 1 (the token sets are laid out differently there). ToMe's proportional attention
(``log size`` added to the attention logits) is not applied: it needs an additive attention bias,
which FlashAttention lacks, and the paper does not say how it combined the two.

Cost. The shift is an element-wise distance over tensors the layer computes anyway (O(n d), like the
norms the FLOPs convention ignores), so pruning reports no scoring cost. Merging reports the
similarity products of the bipartite matching (``*_token_matching`` in ``vtoken.accounting``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtoken.config import PruneConfig, StageSpec
from vtoken.kernels import token_shift
from vtoken.context import Reduction, ScoreContext
from vtoken.registry import register
from vtoken import signals
from vtoken.signals import Needs, Signal
from vtoken.schedule import ScoringCost, StageShapes
from vtoken.strategies.base import Strategy

OPERATIONS = ("mlp", "attention", "block")
DISTANCES = ("l2", "l1", "cos")
SHIFTS = ("branch", "residual")
MODES = ("prune", "merge")
MERGE_WEIGHTS = ("shift", "size")

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
            (ToMe bipartite matching with the shift as saliency, as in the paper's vid-TLDR runs).
        merge_weight: in merge mode, ``"shift"`` (default; members weighted by size x shift) or
            ``"size"`` (ToMe's size-weighted mean).
    """

    method = "repshift"
    default_keep = 0.512  # 0.8 ** 3: the paper's three stages, each dropping 20% of the current tokens

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


def bipartite_merge(
    features: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor, weights: torch.Tensor, sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge each row's valid tokens down to ``budget[r]`` by repeated ToMe bipartite soft matching.

    Each round splits the row's current tokens (in index order) alternately into A (even) and B
    (odd), finds each A token's most cosine-similar B token, and merges the ``r`` A tokens with the
    highest similarity into their partners (``r = min(tokens - budget, |A|)``; ties go to the lower
    index). A merged token is ``sum(w x) / sum(w)`` over its members, with weight ``sum(w)`` and size
    ``sum(size)``; it keeps its B member's index. Invalid tokens take no part; they fill a row only
    when its budget exceeds its valid count (lowest index first, as ``masked_topk`` does).

    Args:
        features: ``[R, N, d]``; valid: ``[R, N]``; budget: ``[R]``;
        weights: ``[R, N]`` averaging weight of each token (its size, or size x saliency);
        sizes: ``[R, N]`` original tokens each token stands for.

    Returns ``keep`` ``[R, K]`` (ascending, -1 padded), merged features ``[R, K, d]`` (in the input
    dtype) and sizes ``[R, K]``.
    """
    rows, width, dim = features.shape
    k = int(budget.max()) if rows else 0
    device = features.device
    keep = torch.full((rows, k), -1, dtype=torch.long, device=device)
    merged = features.new_zeros(rows, k, dim)
    new_sizes = sizes.new_zeros(rows, k, dtype=torch.float32)
    for r in range(rows):
        target = int(budget[r])
        ids = valid[r].nonzero().squeeze(-1)
        if target >= ids.numel():
            filler = (~valid[r]).nonzero().squeeze(-1)[: target - ids.numel()]
            chosen = torch.sort(torch.cat([ids, filler])).values
            keep[r, :target] = chosen
            merged[r, :target] = features[r, chosen]
            new_sizes[r, :target] = sizes[r, chosen].float()
            continue
        x = features[r, ids].float()
        w = weights[r, ids].float()
        s = sizes[r, ids].float()
        while ids.numel() > target:
            count = ids.numel()
            a, b = torch.arange(0, count, 2, device=device), torch.arange(1, count, 2, device=device)
            unit = F.normalize(x, dim=-1)
            similarity = unit[a] @ unit[b].T  # [|A|, |B|]
            best, partner = similarity.max(dim=-1)
            order = torch.sort(best, descending=True, stable=True).indices
            n_merge = min(count - target, a.numel())
            src, rest = order[:n_merge], order[n_merge:]
            dst, src = b[partner[src]], a[src]
            total = w.index_add(0, dst, w[src])
            mass = (x * w[:, None]).index_add(0, dst, x[src] * w[src, None])
            touched = torch.unique(dst)
            x = x.clone()
            x[touched] = mass[touched] / total[touched, None]  # untouched tokens stay bit-exact
            w, s = total, s.index_add(0, dst, s[src])
            survivors = torch.sort(torch.cat([a[rest], b])).values
            ids, x, w, s = ids[survivors], x[survivors], w[survivors], s[survivors]
        keep[r, :target] = ids
        merged[r, :target] = x.to(features.dtype)
        new_sizes[r, :target] = s
    return keep, merged, new_sizes


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
        sizes = self._carried_sizes(ctx)
        weights = sizes
        if self.config.merge_weight == "shift":
            shift = self.score(ctx).clamp(min=0)
            # A tiny floor so a group of zero-shift tokens still averages instead of dividing by 0.
            floor = 1e-6 * shift.amax(dim=-1, keepdim=True).clamp(min=1e-12)
            weights = sizes * (shift + floor)
        keep, merged, new_sizes = bipartite_merge(rows.features, rows.valid, rows.budget, weights, sizes)
        # Merge mode: the sizes this stage leaves, in the request's scratch (the same dict at every
        # stage of one prefill), so the next stage at the same site continues from them.
        ctx.state["repshift_sizes"] = (ctx.stage_index, ctx.stage.site, new_sizes, rows.budget.clone())
        return Reduction(keep=keep, features=merged)

    def _carried_sizes(self, ctx: ScoreContext) -> torch.Tensor:
        """Sizes of the current rows: those the previous stage of this request left, when it ran at
        the same site just before (its kept tokens are then exactly these rows, in order), else 1."""
        rows = ctx.tokens
        ones = torch.ones(rows.valid.shape, dtype=torch.float32, device=rows.features.device)
        previous = ctx.state.get("repshift_sizes") if ctx.state is not None else None
        if previous is None:
            return ones
        index, site, sizes, counts = previous
        if index != ctx.stage_index - 1 or site != ctx.stage.site or sizes.shape[0] != rows.num_rows:
            return ones
        width = rows.valid.shape[1]
        if site == "vision":
            same = sizes.shape[1] == width
        else:
            same = torch.equal(rows.valid.sum(-1).cpu(), counts.cpu()) and sizes.shape[1] >= width
        if not same:
            return ones
        return torch.where(rows.valid, sizes[:, :width].to(ones.device), ones)
