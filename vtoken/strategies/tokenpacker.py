"""``tokenpacker``: TokenPacker (Li et al., "TokenPacker: Efficient Visual Projector for Multimodal LLM", IJCV 2025).

A trained projector that turns each ``s x s`` region of an image's patch grid into one token by
coarse-to-fine injection (interpolated point queries attending to their region's multi-level features,
paper §3.2; the module and its formulas are in :mod:`vtoken.packer`). Here it is a projector-site
reduction: for every image it keeps one token per region, at the place (and position id) of the
region's top-left patch, with the packed feature as its value; the LLM never sees the other tokens.
The budget is therefore fixed by the scale: ``ceil(h/s) * ceil(w/s)`` tokens per ``h x w`` grid (144 of
576 at ``s=2``, 64 at 3, 36 at 4). ``keep``/``keep_tokens`` may be left out; given, they must equal it.

Inputs: the features the original projector was fed (the point-query source, LLaVA's
``vision_feature_layer``) and the block outputs of the packer's multi-level vision layers, both aligned
with the candidate rows by the projector-site context. The original projector still runs on every
patch (its outputs for the packed places are replaced), so the model itself is never modified and
``unwrap`` gives the exact original back; its FLOPs stay in the report and the packer's are added as
scoring work.

Positions: ``positions="contiguous"`` by default, because a TokenPacker LLaVA places its ``M`` packed
tokens at consecutive positions (the image simply is ``M`` tokens long); ``"original"`` keeps each packed
token at its region's top-left patch position.

Needs weights: wrap with ``weights=<dir>`` written by ``vtoken.train_projector`` / ``vtoken
train-projector`` (or a :class:`~vtoken.packer.TokenPackerModule` in memory). Supported: LLaVA-1.5-style
models whose visual tokens are one patch grid (``vision_feature_select_strategy="default"``). LLaVA-NeXT
(AnyRes) is refused by ``wrap`` (it needs the ``one_grid_per_image`` signal): its rows hold a base grid, a high-resolution
grid of varying shape and newline tokens, so the packed count differs per image and cannot be the one
budget that a projector stage gives every image (the official TokenPacker-HD packs each crop and adds
its own separators, a different pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vtoken.config import PruneConfig, StageSpec
from vtoken.context import Reduction, ScoreContext
from vtoken.packer import TokenPackerModule
from vtoken.registry import register
from vtoken import signals
from vtoken.signals import Needs, Signal
from vtoken.schedule import ScoringCost, StageShapes
from vtoken.strategies.base import Strategy

_NO_WEIGHTS = (
    "tokenpacker is a trained projector and needs its weights: train them with "
    "vtoken.train_projector(model, data=..., processor=..., out=DIR, scale=2) or "
    "`vtoken train-projector --model MODEL_DIR --data DATA.jsonl --scale 2 --out DIR`, then wrap with "
    "weights=DIR"
)


@dataclass
class TokenPackerConfig(PruneConfig):
    """TokenPacker options.

    ``weights``: a directory written by ``vtoken.train_projector`` (``packer_config.json`` +
    ``packer.safetensors``) or a :class:`~vtoken.packer.TokenPackerModule`. ``scale``: the region side the
    weights were trained for (2, 3 or 4 in the paper); optional, checked against the weights. The budget
    follows from the scale; ``keep``/``keep_tokens``, if given, must match it.
    """

    method = "tokenpacker"
    default_keep = 0.25  # s = 2, the paper's main setting (144 of 576)

    weights: Any = None
    scale: int | None = None
    positions: str = "contiguous"

    def __post_init__(self) -> None:
        if self.weights is None:
            raise ValueError(_NO_WEIGHTS)
        if not isinstance(self.weights, (str, TokenPackerModule)) and not hasattr(self.weights, "__fspath__"):
            raise ValueError(f"weights must be a directory or a TokenPackerModule, got {type(self.weights).__name__}")
        if self.stages:
            raise ValueError("tokenpacker is one projector-site stage; remove stages=[...]")
        if self.site != "projector" or self.layer is not None:
            raise ValueError("tokenpacker replaces the projector: it runs at site='projector' with no layer")
        if self.scale is not None and (not isinstance(self.scale, int) or self.scale < 1):
            raise ValueError(f"scale must be a positive integer (2, 3 or 4), got {self.scale!r}")
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        if isinstance(self.weights, TokenPackerModule):
            raise ValueError(
                "this config holds an in-memory packer; save it with packer.save_pretrained(DIR) and wrap with "
                "weights=DIR to get a config that can be saved"
            )
        data = super().to_dict()
        data["weights"] = str(self.weights)
        return data


@register
class TokenPackerStrategy(Strategy):
    name = "tokenpacker"
    Config = TokenPackerConfig
    sites = ("projector",)
    trained = True
    reads = (signals.PROJECTOR_INPUT, signals.ONE_GRID_PER_IMAGE, signals.VISION_OBSERVED)

    def __init__(self, config: TokenPackerConfig):
        super().__init__(config)
        weights = config.weights
        self.packer: TokenPackerModule = (
            weights if isinstance(weights, TokenPackerModule) else TokenPackerModule.from_pretrained(weights)
        )
        packer = self.packer.config
        if config.scale is not None and config.scale != packer.scale:
            raise ValueError(
                f"scale={config.scale} was asked for but these weights were trained at scale {packer.scale}; "
                f"train a packer at scale {config.scale} or drop scale="
            )
        if packer.grid is None:
            raise ValueError("these TokenPacker weights do not record the patch grid they were trained for")
        height, width = packer.grid
        self.tokens = packer.tokens(height, width)
        visual = height * width
        spec = config.resolved_stages()[0]
        asked = None
        if config.keep is not None or config.keep_tokens is not None:
            asked = spec.budget(visual)
        if asked is not None and asked != self.tokens:
            raise ValueError(
                f"tokenpacker at scale {packer.scale} on the {height}x{width} patch grid gives {self.tokens} tokens "
                f"per image ({-(-height // packer.scale)}x{-(-width // packer.scale)} regions), but the budget asks "
                f"for {asked}; drop keep/keep_tokens (the budget follows from the scale) or pass keep_tokens={self.tokens}"
            )

    def bind(self, depths: dict[str, int]) -> None:
        super().bind(depths)
        packer = self.packer.config
        vision = depths.get("vision")
        if packer.vision_layers is not None and vision is not None and vision != packer.vision_layers:
            raise ValueError(
                f"these TokenPacker weights were trained with a {packer.vision_layers}-layer vision tower; this "
                f"model's has {vision}: train a packer for this model"
            )
        if vision is not None and max(packer.layers) > vision:
            raise ValueError(
                f"the packer reads vision hidden states {packer.layers} but the tower has only {vision} layers"
            )

    def stages(self) -> tuple[StageSpec, ...]:
        return (StageSpec("projector", keep_tokens=self.tokens),)

    def needs(self) -> Needs:
        # hidden_states[j] (what the official code reads) is the output of encoder layer j - 1.
        levels = [Signal(signals.VISION_OBSERVED, j - 1) for j in self.packer.config.layers]
        return Needs.of(Signal(signals.PROJECTOR_INPUT), Signal(signals.ONE_GRID_PER_IMAGE), *levels)

    def observe(self, site, layer, io, valid) -> torch.Tensor:
        return io["block"][1]  # the layer's output, [crops, T, d_vision]

    def scoring_cost(self, stage: StageSpec, shapes: StageShapes | None = None) -> list[ScoringCost]:
        height, width = self.packer.config.grid
        return [ScoringCost("flops", flops=float(self.packer.flops(height, width)))]

    def reduce(self, ctx: ScoreContext) -> Reduction:
        rows = ctx.tokens
        query_source = ctx.require("projector_input", self.name)
        grids = []
        for r in range(rows.num_rows):
            found = rows.grids[r]
            count = int(rows.valid[r].sum())
            if found is None or len(found) != 1:
                raise ValueError(
                    "tokenpacker packs one patch grid per image (LLaVA-1.5); this image has "
                    f"{'no intact grid' if found is None else f'{len(found)} grids'} (LLaVA-NeXT AnyRes: a base "
                    "view, a high-resolution view and newline tokens), which it does not support: use a "
                    "LLaVA-1.5-style model, or a training-free method (pool, fastv) on LLaVA-NeXT"
                )
            grid = found[0]
            if grid.row_stride != grid.width or grid.size != count:
                raise ValueError(
                    f"tokenpacker packs patch grids only, but this image has {count - grid.size} visual token(s) "
                    "outside its grid (the CLS token under vision_feature_select_strategy='full', or separators); "
                    "use vision_feature_select_strategy='default'"
                )
            grids.append(grid)
        shapes = {(g.offset, g.height, g.width) for g in grids}
        if len(shapes) != 1:
            raise ValueError(f"tokenpacker needs every image of a batch on the same grid; got {sorted(shapes)}")
        grid = grids[0]
        index = grid.index().reshape(-1).to(rows.features.device)
        packer = self.packer
        device = rows.features.device
        if packer.q_proj.weight.device != device:
            packer.to(device)
        query = query_source[:, index].reshape(rows.num_rows, grid.height, grid.width, -1)
        levels = torch.cat([ctx.observed(j - 1)[:, index] for j in packer.config.layers], dim=-1)
        levels = levels.reshape(rows.num_rows, grid.height, grid.width, -1)
        packed = packer(query, levels)  # [R, M, d_llm]
        if packed.shape[-1] != rows.features.shape[-1]:
            raise ValueError(
                f"the packer outputs {packed.shape[-1]}-wide tokens but the LLM is {rows.features.shape[-1]} wide; "
                "these weights were trained for another model"
            )
        scale = packer.config.scale
        anchors = grid.offset + (torch.arange(0, grid.height, scale)[:, None] * grid.row_stride
                                 + torch.arange(0, grid.width, scale)[None, :]).reshape(-1)
        tokens = anchors.numel()
        if bool((rows.budget != tokens).any()):
            raise ValueError(
                f"tokenpacker makes {tokens} tokens from this {grid.height}x{grid.width} grid but the stage budget "
                f"is {rows.budget.tolist()}; these weights were trained for a {packer.config.grid} grid"
            )
        keep = anchors.to(device).expand(rows.num_rows, -1).clone()
        return Reduction(keep=keep, features=packed.to(rows.features.dtype))
