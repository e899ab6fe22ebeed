"""``visionzip``: VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision
Language Models", CVPR 2025; official code ``dvlab-research/VisionZip``, ``visionzip/clip_encoder.py``
at 3151f6df).

Pre-LLM selection plus merging, from one vision layer (the one the projector reads: LLaVA's
``vision_feature_layer=-2``):

- **Dominant tokens** (paper §3.2): the patches the CLS token attends to most, from that layer's
  attention, summed (here averaged; the ranking is the same) over heads.
- **Contextual tokens** (§3.2): the remaining patches, compared by their keys of the same layer
  (averaged over heads, L2-normalised); ``contextual`` targets are taken uniformly from them (every
  ``len // contextual``-th, in patch order), every other remaining patch joins the target it is most
  similar to (cosine), and a contextual token is the target's feature **plus** the mean of the
  features that joined it (the official ``target_hidden + aggregated_hidden``; a target nobody
  joined stays itself).

Merging happens on the vision features (the projector's input) and the merged vectors go through
the projector, exactly as the official code merges before LLaVA's projector; dominant tokens keep
their projected features unchanged.

The budget splits as the paper's settings do: 54 dominant + 10 contextual at 64 tokens, 108 + 20 at
128, 162 + 30 at 192, i.e. ``dominant = round(budget * 54 / 64)`` (``dominant_share``).

Where this differs from the official code (LLaVA-1.5 in the LLaVA repository):

- The official code counts the CLS token as one of the dominant tokens (``visionzip(model,
  dominant=54)`` keeps CLS + 53 patches) and hands it to the LLM. transformers' LLaVA drops CLS
  (``vision_feature_select_strategy="default"``), so here all dominant tokens are patches.
- The official code puts the contextual tokens after the dominant ones; here every kept token keeps
  its place in the image (a contextual token sits at its target patch), with the kept tokens
  renumbered contiguously (``positions="contiguous"``, as the official shorter sequence is).

Scoring cost: the CLS query row against every key of the layer (``vision_attention_rows``, 1 row)
and, from the stage's shapes, the merge's key similarities (:func:`contextual_matching_flops`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtoken import signals
from vtoken.config import PruneConfig, StageSpec
from vtoken.context import Reduction, ScoreContext
from vtoken.registry import register
from vtoken.schedule import ScoringCost, StageShapes, is_integer
from vtoken.signals import Needs, Signal
from vtoken.strategies.base import Strategy

#: The paper's split: 54 dominant of 64 tokens (108 of 128, 162 of 192).
PAPER_DOMINANT_SHARE = 54 / 64


@dataclass
class VisionZipConfig(PruneConfig):
    """VisionZip options.

    Attributes:
        dominant_share: the share of the budget kept as dominant tokens (the rest are contextual).
        vision_layer: the vision layer whose CLS attention and keys are read (default: the layer
            the projector reads, LLaVA's ``vision_feature_layer``; at the vision site, the layer the
            stage prunes after).
    """

    method = "visionzip"
    default_keep = 64 / 576

    site: str = "projector"
    positions: str = "contiguous"
    dominant_share: float = PAPER_DOMINANT_SHARE
    vision_layer: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dominant_share, bool) or not isinstance(self.dominant_share, (int, float)) or not (
            0.0 <= self.dominant_share <= 1.0
        ):
            raise ValueError(f"dominant_share must be a fraction in [0, 1] (54/64 in the paper), got {self.dominant_share!r}")
        if self.vision_layer is not None and (not is_integer(self.vision_layer) or self.vision_layer < 0):
            raise ValueError(f"vision_layer must be a layer index >= 0, got {self.vision_layer!r}")
        stages = self.resolved_stages()
        for stage in stages:
            if stage.site not in VisionZipStrategy.sites:
                raise ValueError(
                    f"visionzip selects from the vision features in front of the projector (site='projector') or "
                    f"inside a vision tower (site='vision', a vision-only model), not at {stage.site!r}"
                )
            if stage.site == "vision" and self.vision_layer is not None and stage.layer != self.vision_layer:
                raise ValueError(
                    f"at the vision site visionzip reads the attention of the layer it prunes after; give layer="
                    f"{self.vision_layer} or drop vision_layer (got layer={stage.layer})"
                )
        if len(stages) != 1:
            raise ValueError("visionzip selects once; give one stage (site and layer), not a list of stages")
        super().__post_init__()


def split_budget(budget: int, dominant_share: float) -> tuple[int, int]:
    """``(dominant, contextual)`` counts of a budget (54 + 10 of 64 at the paper's share)."""
    dominant = min(budget, max(0, round(budget * dominant_share)))
    return dominant, budget - dominant


def stage_split(shapes: StageShapes, dominant_share: float) -> tuple[int, int, int]:
    """``(dominant, contextual, remaining)`` patches of one image at a stage, as :meth:`reduce` splits
    them: the budget is taken from the image's patches (its newlines and a CLS token are no
    candidates), and the ``remaining`` patches are the ones that merge into the contextual targets."""
    patches = shapes.tokens - shapes.patchless
    dominant, contextual = split_budget(min(shapes.kept, patches), dominant_share)
    return dominant, contextual, max(patches - dominant - contextual, 0)


def contextual_matching_flops(shapes: StageShapes, dominant_share: float) -> int:
    """FLOPs of the contextual merge's key similarities per image: every remaining patch against
    every target (2 FLOPs per multiply-add over the head-averaged keys)."""
    _, contextual, remaining = stage_split(shapes, dominant_share)
    return 2 * remaining * contextual * shapes.head_dim if contextual else 0


def contextual_merge(features: torch.Tensor, keys: torch.Tensor, count: int, assignment: bool = False):
    """VisionZip's contextual tokens from the non-dominant tokens of one image: ``features`` ``[M, d]``
    (what is merged), ``keys`` ``[M, k]`` (the similarity metric). Returns the indices of the
    ``count`` targets within the M tokens (ascending) and their merged features ``[count, d]``:
    target + mean of the tokens most similar (cosine) to it; with ``assignment``, also ``[M]``: the
    target (0..count-1) each token joined (a target joins itself)."""
    total = features.shape[0]
    step = max(1, total // count)
    targets = torch.arange(0, total, step, device=features.device)[:count]
    others = torch.ones(total, dtype=torch.bool, device=features.device)
    others[targets] = False
    metric = F.normalize(keys.float(), dim=-1)
    similarity = metric[others] @ metric[targets].T  # [M - count, count]
    assign = similarity.argmax(dim=-1)
    joined = features[others].float()
    sums = torch.zeros(len(targets), features.shape[-1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, assign, joined)
    counts = torch.bincount(assign, minlength=len(targets)).clamp(min=1).to(sums.dtype)
    merged = features[targets].float() + sums / counts[:, None]
    if not assignment:
        return targets, merged.to(features.dtype)
    joined = torch.empty(total, dtype=torch.long, device=features.device)
    joined[targets] = torch.arange(len(targets), device=features.device)
    joined[others] = assign
    return targets, merged.to(features.dtype), joined


@register
class VisionZipStrategy(Strategy):
    name = "visionzip"
    Config = VisionZipConfig
    sites = ("projector", "vision")
    reads = (signals.VISION_ATTENTION, signals.VISION_CLS, signals.PROJECTOR_INPUT)

    def __init__(self, config: VisionZipConfig):
        super().__init__(config)
        self.vision_layer: int | None = config.vision_layer

    def bind(self, depths: dict[str, int]) -> None:
        super().bind(depths)
        vision = depths.get("vision", 0)
        layer = self.config.vision_layer
        (stage,) = self.config.resolved_stages()
        if stage.site == "vision":
            layer = stage.layer
        elif layer is None:
            layer = depths.get("vision_read", max(vision - 2, 0))
        if layer >= vision:
            raise ValueError(f"vision_layer={layer} does not exist: the vision encoder has {vision} layers (0..{vision - 1})")
        self.vision_layer = layer

    def needs(self) -> Needs:
        layer = self.vision_layer if self.vision_layer is not None else max(self.depths.get("vision", 2) - 2, 0)
        needs = [Signal(signals.VISION_ATTENTION, layer), Signal(signals.VISION_CLS)]
        if self.config.resolved_stages()[0].site == "projector":  # merged in front of the projector
            needs.append(Signal(signals.PROJECTOR_INPUT))
        return Needs.of(*needs)

    def scoring_cost(self, stage: StageSpec, shapes: StageShapes | None = None) -> list[ScoringCost]:
        costs = [ScoringCost("vision_attention_rows", layer=self.vision_layer, rows=1)]
        if shapes is not None:
            costs.append(ScoringCost("flops", flops=float(contextual_matching_flops(shapes, self.config.dominant_share))))
            _, contextual, remaining = stage_split(shapes, self.config.dominant_share)
            if stage.site == "projector" and contextual > 0 and remaining > 0:
                # The contextual tokens merge the projector's inputs, so each is projected again.
                costs.append(ScoringCost("projector_rows", rows=contextual))
        return costs

    def reduce(self, ctx: ScoreContext) -> Reduction:
        rows = ctx.tokens
        attention = ctx.require("vision_attention", self.name)(self.vision_layer)
        if attention.cls is None:
            raise ValueError(
                "visionzip ranks patches by the vision CLS token's attention, and this vision tower has no CLS "
                "token; use a method that does not need it (pool, random)"
            )
        if ctx.stage.site == "vision":
            # Inside the tower (a vision-only model): rows are crops and candidates their patches in
            # order; what merges is the layer's own output, with no projector after it.
            inputs, project = rows.features, (lambda merged: merged)
            cls, keys = attention.cls, attention.keys
            has_patch = torch.ones_like(rows.valid)
            # Every crop keeps the same count (the tower batches crops); patches LLaVA-NeXT's unpadding
            # cuts never reach the LLM and only fill a crop whose other patches cannot.
            filler = ~rows.valid
        else:
            inputs = ctx.require("projector_input", self.name)
            project = ctx.require("projector", self.name)
            from_crops = ctx.require("from_crops", self.name)
            cls = from_crops(attention.cls)  # [R, N]
            keys = from_crops(attention.keys)  # [R, N, k]
            has_patch = from_crops(torch.ones_like(attention.cls)) > 0  # NeXT's newlines have none
            filler = rows.valid & ~has_patch
        merged_into = torch.full(rows.valid.shape, -1, dtype=torch.long, device=rows.valid.device)
        width = int(rows.budget.max())
        keep = torch.full((rows.num_rows, width), -1, dtype=torch.long, device=rows.valid.device)
        features = rows.features.new_zeros(rows.num_rows, width, rows.features.shape[-1])
        for r in range(rows.num_rows):
            budget = int(rows.budget[r])
            patches = torch.nonzero(rows.valid[r] & has_patch[r]).squeeze(-1)
            plain = torch.nonzero(filler[r]).squeeze(-1)
            dominant_count, contextual_count = split_budget(min(budget, len(patches)), self.config.dominant_share)
            order = torch.argsort(cls[r, patches].float(), descending=True, stable=True)
            dominant = patches[order[:dominant_count]]
            rest = torch.sort(patches[order[dominant_count:]]).values
            chosen = [dominant]
            merged = None
            if 0 < contextual_count < len(rest):  # (when every remaining patch is a target, nothing merges)
                targets, merged, assign = contextual_merge(inputs[r, rest], keys[r, rest], contextual_count, assignment=True)
                chosen.append(rest[targets])
            else:
                chosen.append(rest[:contextual_count])
            # Tokens with no patch behind them (NeXT's newlines) or cut by unpadding (at the vision
            # site) only when the patches cannot fill it.
            chosen.append(plain[: budget - dominant_count - contextual_count])
            kept = torch.sort(torch.cat(chosen)).values
            keep[r, : len(kept)] = kept
            features[r, : len(kept)] = rows.features[r, kept]
            # Vectorised bookkeeping (a Python loop over every token cost more than the scoring):
            # each kept token merges into its own column, each joined patch into its target's.
            merged_into[r, kept] = torch.arange(len(kept), device=kept.device)
            if merged is not None:
                target_slots = torch.searchsorted(kept, rest[targets])
                features[r, target_slots] = project(merged).to(features.dtype)
                merged_into[r, rest] = target_slots[assign]
        return Reduction(keep=keep, features=features, merged_into=merged_into)
