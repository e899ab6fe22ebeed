"""``vflowopt``: VFlowOpt (Yang, Xu, Cui, Wang, Lin, Pang, "VFlowOpt: A Token Pruning Framework for
LMMs with Visual Information Flow-Guided Optimization", ICCV 2025; arXiv 2508.05211; official code
``sihany077/VFlowOpt``).

**Importance map** (paper §3.1, Eqs. 1-4), from the self-attention ``A`` (head-averaged, rows are
queries, columns keys) of ONE vision-encoder layer, per crop:

- context set (Eqs. 1-2): ``K = {j : mean_i A_ij > t * mean_j(mean_i A_ij)}``, the tokens that
  receive more than ``t`` times the average attention (the paper writes the threshold as
  ``tau = t * (1/N) sum_ij A_ij`` on column sums; the two are the same set);
- context relevance (Eq. 3): ``rel_i = mean_{k in K} A_ki``, the attention the context tokens pay to
  token i (``relevance="mean"``, the official code; the paper's text sums over K, ``"sum"``, which
  only rescales ``alpha`` by ``|K|``);
- patch entropy: the Shannon entropy (bits) of the 256-bin histogram of the gray levels (mean of
  R, G, B, rounded to 0..255) of the image patch behind each token;
- importance (Eq. 4): ``I = rel + alpha * softmax_patches(H)``, the softmax over the crop's patches.

(The full text was read through the project's notes, which tie Eq. 4 to the score and Eqs. 1-4 as a
group to the map; the numbers 1-3 given here for the threshold, set and relevance follow their order
in §3.1.)

For CLIP towers (LLaVA-1.5, LLaVA-NeXT) the CLS token is neither a query nor a key of the map (the
softmax is still the layer's own, over every token); it never reaches the LLM. The pixels are
de-normalised with ``image_mean``/``image_std`` (default: CLIP's, what the LLaVA-1.5/NeXT processors
and this project's VQA processor use; give the image processor's values for other towers, e.g.
``[0.5, 0.5, 0.5]`` for SigLIP). The official code skips this step (it casts the normalised values
to uint8, which wraps negative values); here the histogram is of the real gray levels. If no token
passes the threshold (``t`` too high for a small grid), ``K`` is the most-attended token, the limit
of the set as ``t`` grows. The map comes from vision layer ``vision_layer`` (default: the
second-to-last, the one whose output LLaVA-1.5/NeXT read, ``vision_feature_layer=-2``; the paper
uses the last layer whose output the LLM reads). It is computed beside SDPA: the adapter keeps the
layer's attention input and recomputes q and k, summing the received attention chunk by chunk, so
no ``N x N`` map exists at once and the tower keeps its attention implementation.

LLaVA-NeXT: each crop's map is computed on its own, then mapped onto the packed tokens (base view,
unpadded high-resolution crops). The newline tokens have no patch and get importance
``newline_importance`` = 1.0, as in the official code (so they are kept before any patch: their
importance is far above a patch's, which is about ``1 / patches``).

**Progressive pruning with recycling** (§3.2, Eqs. 5-7). Stage 1 runs before the LLM (projector
site) on the projected features: the lowest-importance tokens are dropped; the dropped tokens of
each ``a x a`` cell of the patch grid (cell ``(floor(row / a), floor(col / a))``, separately for
NeXT's base and high-resolution grids) are recycled into ``sum I_i t_i / sum I_i`` (Eq. 7), written
into the slot of the cell's dropped token of highest importance, which is kept. The paper drops
``round(N (1 - R1)) + floor(N / a^2)`` tokens and gets one recycled token per non-empty cell, so its
count is only about ``R1 N``; here the number kept by importance, ``k``, is the largest with ``k +
(non-empty cells among the dropped) = n1`` exactly (such a ``k`` always exists when ``n1`` is at least
the number of cells; otherwise every token is dropped and the ``n1`` cells whose best token ranks
highest are recycled). With ``alpha < 0`` an importance can be negative: the weights are then
clamped at 0 (a cell with no positive weight is averaged uniformly); for ``alpha >= 0`` this is
Eq. 7 exactly. Stages 2 and 3 run inside the LLM, before the layers that split it evenly
(``llm_layers``, default ``L // 3`` and ``2 * (L // 3)``: 10 and 20 for 32 layers, 9 and 18 for
28, as the paper), and drop the lowest-importance tokens of the SAME map (it is not recomputed; a
recycled token keeps its slot's importance, as in the official code). Nothing is recycled there.
Kept tokens keep their position ids (``positions="original"``; the paper: "position IDs of visual
tokens remain unchanged following pruning"). The official code renumbers after stage 1 only (its
LLM input is built from the survivors) and gathers positions in the LLM: ``positions="pre_llm"``
(tested to give the official code's logits).

**Budget** (Eq. 5): ``keep`` / ``keep_tokens`` is the paper's ``R-bar``, the number of visual
tokens averaged over the LLM layers: ``(n1 L1 + n2 L2 + n3 L3) / L`` with ``L1, L2, L3`` the layers
each stage's tokens pass through. Stage 1 keeps ``n1 = stage1 x budget`` (the paper's ``R1 =
stage1 * R-bar``; ``stage1 >= 1``), stage 2 keeps ``r2`` of those (``R2``), and ``R3`` follows
from the budget, as in the official optimiser. With ``keep`` the stage fractions meet Eq. 5
exactly and each stage rounds its fraction of the image's tokens; with ``keep_tokens`` the counts
are integers chosen so that ``n1 L1 + n2 L2 + n3 L3`` is as close to ``budget x L`` as integers
allow (``r2`` is the tie-break), exact whenever a solution exists. ``r2`` is clamped so that ``R3``
stays in [0.01, 1]. Defaults: the released 25% LLaVA-OneVision-7B configuration (``R1 = 0.2651 =
1.0604 x 0.25``, ``R2 = 0.9833``, ``t = 34.76``, ``a = 15.58``, ``alpha = 0``: the optimiser switched
the entropy term off in every released setting). ``llm_layers=[]`` is the "w/o progressive pruning"
ablation (one stage keeping the budget), ``recycle=False`` the "w/o token merging" one. Explicit
``stages=[...]`` are run as given (recycling at a projector stage, plain drops inside the LLM).

``vtoken.tune(model, "vflowopt", calibration=...)`` searches ``stage1, r2, t, a, alpha`` (§3.3,
Eq. 8; see :mod:`vtoken.tuning`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from vtoken.config import PruneConfig, StageSpec, shown
from vtoken.context import Grid, Reduction, ScoreContext, TokenRows, VisionAttention
from vtoken.kernels import masked_topk
from vtoken.registry import register
from vtoken import signals
from vtoken.signals import Needs, Signal
from vtoken.schedule import ScoringCost, StageShapes, is_integer, is_number
from vtoken.strategies.base import Strategy

#: The image mean / std of the CLIP image processor (LLaVA-1.5, LLaVA-NeXT).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: ``R3`` is kept at least this (a smaller ``r2`` is forced when the budget would need less).
MIN_R3 = 0.01
RELEVANCE = ("mean", "sum")


# --- the formulas ---------------------------------------------------------------------------------
def denormalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised pixel values ``[..., channels, p, p]`` back to 0..255 (``(x * std + mean) * 255``)."""
    shape = (-1, 1, 1)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(shape)
    std = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(shape)
    return (pixels.float() * std + mean) * 255.0


def gray_levels(pixels: torch.Tensor) -> torch.Tensor:
    """``[..., channels, p, p]`` values in 0..255 to ``[..., p * p]`` integer gray levels (mean of the
    channels, rounded, clamped to 0..255)."""
    gray = pixels.float().mean(dim=-3)
    return gray.round().clamp(0, 255).long().flatten(-2)


def patch_entropy(levels: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of the 256-bin histogram of each patch's gray levels ``[..., M]``
    (integers 0..255): 0 for a constant patch, 8 for a patch holding every level equally often."""
    flat = levels.reshape(-1, levels.shape[-1])
    hist = torch.zeros(flat.shape[0], 256, dtype=torch.float32, device=levels.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    prob = hist / flat.shape[1]
    terms = torch.where(prob > 0, prob * torch.log2(prob.clamp(min=1e-30)), torch.zeros_like(prob))
    return (-terms.sum(-1)).reshape(levels.shape[:-1])


def context_set(received: torch.Tensor, t: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eqs. 1-2: ``[C, P]`` True for the tokens receiving more than ``t`` times the crop's mean
    received attention (over its ``valid`` patches where crops are padded); a crop where none does
    gets its most-attended token."""
    if valid is None:
        mean = received.mean(dim=-1, keepdim=True)
    else:
        mean = (received * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    chosen = received > t * mean
    if valid is not None:
        chosen &= valid
    empty = ~chosen.any(dim=-1)
    if bool(empty.any()):
        top = received.argmax(dim=-1)
        chosen[empty, top[empty]] = True
    return chosen


def context_relevance(attention: VisionAttention, t: float, relevance: str = "mean") -> torch.Tensor:
    """Eq. 3: ``[C, P]`` attention paid to each patch by the crop's context set (its mean, or sum,
    over the context rows)."""
    chosen = context_set(attention.received, t, attention.valid)
    counts = chosen.sum(dim=-1)
    width = int(counts.max())
    # Context indices per crop, ascending, padded with -1.
    ranked = torch.where(chosen, torch.arange(chosen.shape[1], device=chosen.device), chosen.shape[1])
    index = torch.sort(ranked, dim=-1).values[:, :width]
    index = torch.where(index < chosen.shape[1], index, -1)
    total = attention.rows(index).sum(dim=1)  # [C, P]; padded rows are zero
    return total / counts[:, None].to(total.dtype) if relevance == "mean" else total


def importance_map(relevance: torch.Tensor, entropy: torch.Tensor | None, alpha: float,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4: ``I = relevance + alpha * softmax(H)`` over each crop's patches (``[C, P]``; the
    softmax over its ``valid`` patches where crops are padded)."""
    if entropy is None or alpha == 0:
        return relevance.float()
    entropy = entropy.float() if valid is None else entropy.float().masked_fill(~valid, float("-inf"))
    return relevance.float() + alpha * torch.softmax(entropy, dim=-1)


def grid_cells(grids: tuple[Grid, ...], length: int, a: float) -> torch.Tensor:
    """``[length]`` the ``a x a`` cell of each token (``(floor(row / a), floor(col / a))`` numbered
    across the row's grids; -1 for tokens in no grid, such as NeXT's newlines)."""
    cells = torch.full((length,), -1, dtype=torch.long)
    first = 0
    for grid in grids:
        rows = torch.floor(torch.arange(grid.height, dtype=torch.float64) / a).long()
        cols = torch.floor(torch.arange(grid.width, dtype=torch.float64) / a).long()
        per_row = int(cols[-1]) + 1
        ids = first + rows[:, None] * per_row + cols[None, :]
        cells[grid.index().reshape(-1)] = ids.reshape(-1)
        first += (int(rows[-1]) + 1) * per_row
    return cells


def recycle(
    features: torch.Tensor, importance: torch.Tensor, cells: torch.Tensor | None, budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 6-7 on one image: keep ``budget`` of the ``n`` tokens (``features [n, d]``,
    ``importance [n]``, ``cells [n]``, -1 for no cell); return the kept indices (ascending) and
    their features, recycled tokens holding the importance-weighted mean of their cell's dropped
    tokens. See the module docstring for how the count is made exact."""
    n = features.shape[0]
    order = torch.sort(importance.float(), descending=True, stable=True).indices
    if budget >= n:
        return torch.arange(n, device=features.device), features
    if cells is None or not bool((cells >= 0).any()):
        keep = torch.sort(order[:budget]).values
        return keep, features[keep]
    cells = cells.to(features.device)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=order.device)
    in_cell = cells >= 0
    ids, inverse = torch.unique(cells[in_cell], return_inverse=True)
    # A cell holds a dropped token when its lowest-ranked token ranks at or past the kept count k.
    last = torch.full((ids.numel(),), -1, dtype=torch.long, device=order.device)
    last = last.scatter_reduce(0, inverse, rank[in_cell], reduce="amax")
    k_values = torch.arange(budget + 1, device=order.device)
    total = k_values + (last[None, :] >= k_values[:, None]).sum(-1)  # kept + recycled, per k
    exact = (total == budget).nonzero()
    kept_count = int(exact.max()) if exact.numel() else 0
    dropped = in_cell & (rank >= kept_count)
    group = torch.unique(cells[dropped], return_inverse=True)[1]
    members = dropped.nonzero().squeeze(-1)
    groups = int(group.max()) + 1 if members.numel() else 0
    weight = importance[members].float().clamp(min=0)
    sums = torch.zeros(groups, device=features.device).index_add(0, group, weight)
    uniform = sums[group] <= 0
    weight = torch.where(uniform, torch.ones_like(weight), weight)
    sums = torch.zeros(groups, device=features.device).index_add(0, group, weight)
    merged = torch.zeros(groups, features.shape[1], device=features.device)
    merged = merged.index_add(0, group, weight[:, None] * features[members].float()) / sums[:, None]
    # The host is the cell's dropped token of highest importance (lowest rank).
    best = torch.full((groups,), n, dtype=torch.long, device=order.device)
    best = best.scatter_reduce(0, group, rank[members], reduce="amin")
    hosts = order[best]
    if groups + kept_count > budget:  # more cells than the budget: the best-ranked cells survive
        chosen = torch.sort(best).indices[: budget - kept_count]
        hosts, merged = hosts[chosen], merged[chosen]
    out = features.clone()
    out[hosts] = merged.to(features.dtype)
    keep = torch.sort(torch.cat([order[:kept_count], hosts])).values
    return keep, out[keep]


def paper_llm_layers(depth: int) -> list[int]:
    """The in-LLM pruning layers that split a ``depth``-layer LLM evenly as the paper does (before
    layers 10 and 20 of 32, 9 and 18 of 28)."""
    third = depth // 3
    return [third, 2 * third]


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def stage_budgets(
    depth: int, layers: list[int], stage1: float, r2: float, keep: float | None = None, keep_tokens: int | None = None
) -> list[float] | list[int]:
    """Eq. 5: the stage budgets whose layer-averaged visual-token count is the budget.

    ``layers`` are the in-LLM pruning layers (0, 1 or 2 of them). With ``keep`` (the paper's
    ``R-bar``) returns fractions of the image's tokens ``[R1, R1 R2, R1 R2 R3]`` meeting Eq. 5
    exactly; with ``keep_tokens`` integer counts ``[n1, n2, n3]`` whose layer sum is as close to
    ``keep_tokens x depth`` as integers allow.
    """
    spans = [b - a for a, b in zip([0, *layers], [*layers, depth])]
    if keep is not None:
        return _fraction_budgets(spans, stage1, r2, keep)
    return _count_budgets(spans, stage1, r2, keep_tokens)


def _fraction_budgets(spans: list[int], stage1: float, r2: float, f: float) -> list[float]:
    depth = sum(spans)
    if len(spans) == 1:
        return [f]
    k1 = min(1.0, stage1 * f)
    rest = depth * f - spans[0] * k1  # token-layers left for the later stages (as fractions)
    if len(spans) == 2:
        return [k1, min(k1, rest / spans[1])]
    q = rest / k1  # R2 (L2 + L3 R3) = q
    low, high = q / (spans[1] + spans[2]), q / (spans[1] + MIN_R3 * spans[2])
    k2 = k1 * min(max(r2, low), high, 1.0)
    k3 = (rest - spans[1] * k2) / spans[2]
    return [k1, k2, min(k2, k3)]


def _count_budgets(spans: list[int], stage1: float, r2: float, budget: int) -> list[int]:
    depth = sum(spans)
    total = budget * depth
    if len(spans) == 1:
        return [budget]
    later = sum(spans[1:])
    n1_max = (total - later) // spans[0]  # leaves at least one token for every later layer
    target = max(budget, min(_round(stage1 * budget), n1_max))
    if len(spans) == 2:
        return [target, min(target, max(1, _round((total - spans[0] * target) / spans[1])))]
    # Integers n1 >= n2 >= n3 >= 1 meeting n1 L1 + n2 L2 + n3 L3 = budget x L: exactness first, then
    # n1 closest to stage1 x budget, then n2 closest to r2 x n1 (n1 is searched around its target).
    best = None
    for n1 in range(max(budget, target - depth), min(n1_max, target + depth) + 1):
        rest = total - spans[0] * n1
        n2 = torch.arange(1, n1 + 1, dtype=torch.float64)
        n3 = torch.minimum(n2, torch.floor((rest - spans[1] * n2) / spans[2] + 0.5).clamp(min=1))
        error = (rest - spans[1] * n2 - spans[2] * n3).abs()
        key = error * 1e12 + abs(n1 - stage1 * budget) * 1e6 + (n2 - r2 * n1).abs()
        i = int(torch.argmin(key))
        candidate = (float(key[i]), [n1, int(n2[i]), int(n3[i])])
        if best is None or candidate[0] < best[0]:
            best = candidate
    return best[1]


# --- the config -----------------------------------------------------------------------------------
@dataclass
class VFlowOptConfig(PruneConfig):
    """VFlowOpt options (see the module docstring for each formula).

    Attributes:
        keep / keep_tokens: the budget: visual tokens averaged over the LLM layers (Eq. 5's R-bar).
        stage1: stage 1 (before the LLM) keeps ``stage1 x`` the budget (the paper's ``R1 / R-bar``).
        r2: the fraction of stage 1's tokens stage 2 keeps (``R2``); ``R3`` follows from the budget.
        t: the context threshold (Eqs. 1-2), in multiples of the mean received attention.
        a: the side of the recycling cells, in patches (may be fractional).
        alpha: the weight of the patch-entropy term (Eq. 4).
        llm_layers: the in-LLM pruning layers (default: the paper's even split, ``L//3, 2*(L//3)``).
        vision_layer: the vision layer whose attention makes the map (default: the layer the projector
            reads, from the model's vision_feature_layer; the second-to-last for LLaVA-1.5).
        relevance: ``"mean"`` (official code) or ``"sum"`` (paper text) over the context set.
        recycle: recycle the dropped tokens at stage 1 (Eqs. 6-7).
        newline_importance: importance of visual tokens with no patch (NeXT's newlines).
        image_mean / image_std: the image processor's normalisation, to recover gray levels.
    """

    method = "vflowopt"
    default_keep = 0.25
    #: What ``vtoken.tune`` searches, with the official optimiser's bounds (its R1 in [0.25, 0.375]
    #: at R-bar = 0.25 is stage1 in [1, 1.5]; R2 in [0.2 / 0.375, 1]).
    search_space = {"stage1": (1.0, 1.5), "r2": (0.2 / 0.375, 1.0), "t": (0.0, 50.0), "a": (3.0, 24.0),
                    "alpha": (-1.0, 1.0)}

    stage1: float = 1.0604
    r2: float = 0.9833
    t: float = 34.76
    a: float = 15.58
    alpha: float = 0.0
    llm_layers: list[int] | None = None
    vision_layer: int | None = None
    relevance: str = "mean"
    recycle: bool = True
    newline_importance: float = 1.0
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))

    def __post_init__(self) -> None:
        # Types first: a string or None would otherwise fail inside a comparison (or, True, pass as 1).
        for name in ("stage1", "r2", "t", "a", "alpha", "newline_importance"):
            if not is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a number, got {shown(getattr(self, name))}")
        if not isinstance(self.recycle, bool):
            raise ValueError(f"recycle must be True or False, got {shown(self.recycle)}")
        if self.llm_layers is not None and not isinstance(self.llm_layers, (list, tuple)):
            raise ValueError(f"llm_layers must be a list of LLM layer indices, got {shown(self.llm_layers)}")
        if self.stages:
            defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in ("stage1", "r2")}
            ignored = [name for name, value in defaults.items() if getattr(self, name) != value]
            ignored += ["llm_layers"] if self.llm_layers is not None else []
            if ignored:
                raise ValueError(
                    f"{', '.join(ignored)} shape vflowopt's default schedule, which stages=[...] replaces; "
                    f"drop {' and '.join(ignored)} or drop stages="
                )
        else:
            if self.site != "projector" or self.layer is not None:
                raise ValueError(
                    "vflowopt's first stage is in front of the LLM (site='projector', no layer); its "
                    "in-LLM stages are set with llm_layers=[...], or give every stage with stages=[...]"
                )
        if not (math.isfinite(self.stage1) and self.stage1 >= 1.0):
            raise ValueError(
                f"stage1 must be >= 1 (stage 1 keeps stage1 x the layer-averaged budget, and later stages "
                f"only drop), got {self.stage1}"
            )
        if not (0.0 < self.r2 <= 1.0):
            raise ValueError(f"r2 (the fraction stage 2 keeps of stage 1's tokens) must be in (0, 1], got {self.r2}")
        if not (math.isfinite(self.t) and self.t >= 0):
            raise ValueError(f"t (the context threshold) must be a number >= 0, got {self.t}")
        if not (math.isfinite(self.a) and self.a > 0):
            raise ValueError(f"a (the recycling cell side, in patches) must be > 0, got {self.a}")
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha}")
        if not math.isfinite(self.newline_importance):
            raise ValueError(f"newline_importance must be a finite number, got {self.newline_importance}")
        for name in ("stage1", "r2", "t", "a", "alpha", "newline_importance"):
            # (an integer past 64 bits passes every check above and would reach torch as one)
            setattr(self, name, float(getattr(self, name)))
        if self.relevance not in RELEVANCE:
            raise ValueError(f"relevance must be one of {RELEVANCE}, got {self.relevance!r}")
        if self.vision_layer is not None and (not is_integer(self.vision_layer) or self.vision_layer < 0):
            raise ValueError(f"vision_layer must be a layer index >= 0, got {self.vision_layer!r}")
        if self.llm_layers is not None:
            layers = list(self.llm_layers)
            if len(layers) > 2 or any(not isinstance(x, int) or x < 1 for x in layers) or layers != sorted(set(layers)):
                raise ValueError(
                    f"llm_layers must hold at most two increasing LLM layer indices >= 1 (the paper's "
                    f"stages 2 and 3), got {self.llm_layers!r}"
                )
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(is_number(v) for v in value):
                raise ValueError(f"{name} must be a list of 3 numbers (one per RGB channel) or 1, got {shown(value)}")
            if len(value) not in (1, 3) or any(not math.isfinite(float(v)) for v in value):
                raise ValueError(f"{name} must hold 3 numbers (one per RGB channel) or 1 for all, got {value!r}")
        if any(float(v) <= 0 for v in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std!r}")
        super().__post_init__()


# --- the strategy ---------------------------------------------------------------------------------
@register
class VFlowOptStrategy(Strategy):
    name = "vflowopt"
    Config = VFlowOptConfig
    sites = ("projector", "llm")
    reads = (signals.VISION_ATTENTION, signals.PIXEL_PATCHES)

    def __init__(self, config: VFlowOptConfig):
        super().__init__(config)
        self._stages: tuple[StageSpec, ...] | None = None
        self.vision_layer: int | None = config.vision_layer

    def bind(self, depths: dict[str, int]) -> None:
        super().bind(depths)
        config = self.config
        vision = depths.get("vision", 0)
        # Default: the layer whose output the projector reads (LLaVA's vision_feature_layer; the
        # second-to-last for LLaVA-1.5's -2), as the official code reads the selected layer's attention.
        default = depths.get("vision_read", max(vision - 2, 0))
        layer = config.vision_layer if config.vision_layer is not None else default
        if layer >= vision:
            raise ValueError(
                f"vision_layer={layer} does not exist: the vision encoder has {vision} layers (0..{vision - 1})"
            )
        self.vision_layer = layer
        if config.stages:
            self._stages = None
            return
        depth = depths.get("llm", 0)
        layers = list(config.llm_layers) if config.llm_layers is not None else paper_llm_layers(depth)
        if config.llm_layers is None and depth < 3:
            layers = []
        if layers and layers[-1] >= depth:
            raise ValueError(
                f"llm_layers={layers} does not fit an LLM of {depth} layers; use layers in 1..{depth - 1}"
            )
        if layers and config.stage1 * layers[0] >= depth:
            raise ValueError(
                f"stage1={config.stage1} leaves no budget for the in-LLM stages: stage 1's tokens pass "
                f"{layers[0]} of {depth} layers, so stage1 must be < {depth / layers[0]:.3g}"
            )
        if config.keep_tokens is not None:
            budgets = stage_budgets(depth, layers, config.stage1, config.r2, keep_tokens=config.keep_tokens)
        else:
            keep = config.keep if config.keep is not None else config.default_keep
            budgets = stage_budgets(depth, layers, config.stage1, config.r2, keep=keep)
        sites = [("projector", None)] + [("llm", x) for x in layers]
        if config.keep_tokens is not None:
            specs = [StageSpec(s, x, keep_tokens=int(b)) for (s, x), b in zip(sites, budgets)]
        else:
            specs = [StageSpec(s, x, keep=min(1.0, float(b))) for (s, x), b in zip(sites, budgets)]
        self._stages = tuple(specs)

    def stages(self) -> tuple[StageSpec, ...]:
        return self._stages if self._stages is not None else self.config.resolved_stages()

    def needs(self) -> Needs:
        # The chosen vision layer's attention makes the map; the pixels behind each patch give its
        # gray-level entropy term.
        layer = self.vision_layer if self.vision_layer is not None else max(self.depths.get("vision", 2) - 2, 0)
        return Needs.of(Signal(signals.VISION_ATTENTION, layer), Signal(signals.PIXEL_PATCHES))

    def scoring_cost(self, stage: StageSpec, shapes: StageShapes | None = None) -> list[ScoringCost]:
        # The map is made once per request, for the first stage: the chosen vision layer's queries
        # and keys recomputed, every patch's scores and their column sums, and the context rows
        # (Eqs. 1-3). How many tokens pass the context threshold depends on the image: one per crop
        # is counted, the fewest there can be (a crop where none passes takes its most-attended one);
        # each further context token adds 2·n·D (under 0.2% of the map at 576 tokens).
        if stage != self.stages()[0]:
            return []
        return [ScoringCost("vision_attention_map", layer=self.vision_layer, rows=1)]

    # --- scoring --------------------------------------------------------------------------------
    def crop_importance(self, ctx: ScoreContext) -> torch.Tensor:
        """``[C, P]`` the importance of every patch of every crop (Eq. 4), made once per request and
        reused by every stage of its prefill (``ctx.state``)."""
        state = ctx.state if ctx.state is not None else {}
        if "importance" not in state:
            config = self.config
            attention = ctx.require("vision_attention", self.name)(self.vision_layer)
            relevance = context_relevance(attention, config.t, config.relevance)
            entropy = None
            if config.alpha != 0:
                patches = ctx.require("pixel_patches", self.name)()
                entropy = patch_entropy(gray_levels(denormalize(patches, config.image_mean, config.image_std)))
            state["importance"] = importance_map(relevance, entropy, config.alpha, attention.valid)
        return state["importance"]

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """``[R, N]`` the importance of each candidate (its patch's; ``newline_importance`` for
        tokens with no patch)."""
        table = self.crop_importance(ctx)
        from_crops = ctx.require("from_crops", self.name)
        return from_crops(table, fill=float(self.config.newline_importance)).to(ctx.tokens.features.device)

    def reduce(self, ctx: ScoreContext) -> Reduction:
        importance = self.score(ctx)
        rows = ctx.tokens
        if ctx.stage.site != "projector" or not self.config.recycle:
            return Reduction(keep=masked_topk(importance, rows.valid, rows.budget))
        return recycle_rows(rows, importance, self.config.a)


def recycle_rows(rows: TokenRows, importance: torch.Tensor, a: float) -> Reduction:
    """Stage 1 on every row (image): :func:`recycle` over the row's valid tokens and its grids."""
    count, width = rows.num_rows, int(rows.budget.max())
    device = rows.features.device
    keep = torch.full((count, width), -1, dtype=torch.long, device=device)
    features = rows.features.new_zeros(count, width, rows.features.shape[-1])
    for r in range(count):
        valid = rows.valid[r].nonzero().squeeze(-1)
        budget = int(rows.budget[r])
        grids = rows.grids[r]
        cells = grid_cells(grids, rows.features.shape[1], a)[valid.cpu()] if grids else None
        kept, merged = recycle(rows.features[r, valid], importance[r, valid], cells, budget)
        keep[r, :budget] = valid[kept]
        features[r, :budget] = merged
    return Reduction(keep=keep, features=features)
