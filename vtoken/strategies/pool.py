"""``pool``: spatial average pooling of each image's patch grid down to the budget.

The budget ``k`` is met exactly: the grid is cut into ``h'`` horizontal bands (``h'`` chosen so the
pooled grid is as square as the original) and each band is average-pooled into its share of ``k``
windows; when ``k = h' x w'`` this is plain adaptive ``h' x w'`` pooling (576 -> 64 is 8 x 8 windows
of 3 x 3 patches). A row made of several grids (LLaVA-NeXT: base view and high-resolution view) splits
the budget between them in proportion to their size. Separator tokens (NeXT's newlines) are dropped,
unless the budget covers every grid token, in which case nothing is pooled and separators fill the
rest of the budget (so ``keep=1.0`` keeps everything).
Each pooled token takes the place (and position id) of the top-left patch of its window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtoken import signals
from vtoken.config import PruneConfig
from vtoken.context import Grid, Reduction, ScoreContext
from vtoken.registry import register
from vtoken.signals import Needs, Signal
from vtoken.strategies.base import Strategy


@dataclass
class PoolConfig(PruneConfig):
    method = "pool"

    def __post_init__(self) -> None:
        super().__post_init__()
        # Pooling needs each image's whole patch grid: after a stage that pruned, there is none left
        # (the forward would stop at that stage), so only the first stage may cut. A keep_tokens
        # budget may keep every token (its count is the image's); the forward refuses one that cuts.
        stages = self.resolved_stages()
        for earlier, later in zip(stages, stages[1:]):
            if earlier.keep is not None and earlier.keep != 1.0:
                raise ValueError(
                    f"pool needs each image's full patch grid, but stage {later.name} follows {earlier.name}, which "
                    f"already pruned it; give pool one stage (site, layer, keep), or keep=1.0 at the earlier stages"
                )


def band_widths(height: int, width: int, tokens: int) -> list[int]:
    """How many pooled tokens each horizontal band of the grid gets, ``sum == tokens`` exactly.

    The number of bands is the one closest to a square pooled grid of the grid's aspect
    (``sqrt(tokens * height / width)``); tokens are spread over the bands as evenly as possible, so
    when ``tokens`` factors as ``bands x columns`` this is plain ``h' x w'`` adaptive pooling.
    """
    if not 1 <= tokens <= height * width:
        raise ValueError(f"pool cannot make {tokens} tokens from a {height}x{width} grid")
    bands = round(math.sqrt(tokens * height / width))
    bands = min(max(bands, math.ceil(tokens / width), 1), height, tokens)
    base, extra = divmod(tokens, bands)
    return [base + (1 if b < extra else 0) for b in range(bands)]


def split_budget(sizes: list[int], budget: int) -> list[int]:
    """Split ``budget`` across grids proportionally to ``sizes`` (largest remainders), at least 1 each."""
    total = sum(sizes)
    raw = [budget * s / total for s in sizes]
    shares = [max(1, math.floor(r)) for r in raw]
    order = sorted(range(len(sizes)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    i = 0
    while sum(shares) < budget:
        shares[order[i % len(order)]] += 1
        i += 1
    while sum(shares) > budget:
        j = max(range(len(shares)), key=lambda t: shares[t])
        shares[j] -= 1
    return shares


def pool_grid(features: torch.Tensor, grid: Grid, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average-pool one grid of ``features`` (``[N, d]``) to exactly ``tokens`` vectors.

    Returns the pooled ``[tokens, d]`` features (band by band, left to right), the row index of
    each window's top-left patch, and for every row index of the grid the window (0..tokens-1) that
    holds it (adjacent windows overlap by a patch where the grid does not divide evenly: such a
    patch is given to the later window). Windows follow adaptive pooling: band b spans grid rows
    ``[floor(b H / h'), ceil((b + 1) H / h'))`` and likewise for columns.
    """
    cells = features[grid.index().reshape(-1).to(features.device)]
    image = cells.reshape(grid.height, grid.width, -1).permute(2, 0, 1).float()
    widths = band_widths(grid.height, grid.width, tokens)
    bands = len(widths)
    pooled, anchors = [], []
    window = torch.zeros(grid.height, grid.width, dtype=torch.long)
    first = 0
    for b, cols in enumerate(widths):
        top = (b * grid.height) // bands
        bottom = -((-(b + 1) * grid.height) // bands)
        band = F.adaptive_avg_pool2d(image[:, top:bottom], (1, cols))  # [d, 1, cols]
        pooled.append(band[:, 0].T)
        left = (torch.arange(cols) * grid.width) // cols
        anchors.append(grid.offset + top * grid.row_stride + left)
        for c in range(cols):
            window[top:bottom, left[c] :] = first + c
        first += cols
    holds = torch.full((int(grid.index().max()) + 1,), -1, dtype=torch.long)
    holds[grid.index().reshape(-1)] = window.reshape(-1)
    return torch.cat(pooled).to(features.dtype), torch.cat(anchors), holds


@register
class PoolStrategy(Strategy):
    name = "pool"
    Config = PoolConfig
    reads = (signals.PATCH_GRID,)

    def needs(self) -> Needs:
        return Needs.of(Signal(signals.PATCH_GRID))

    def reduce(self, ctx: ScoreContext) -> Reduction:
        rows = ctx.tokens
        k = int(rows.budget.max())
        keep = torch.full((rows.num_rows, k), -1, dtype=torch.long, device=rows.features.device)
        merged = rows.features.new_zeros(rows.num_rows, k, rows.features.shape[-1])
        merged_into = torch.full(rows.valid.shape, -1, dtype=torch.long, device=keep.device)
        for r in range(rows.num_rows):
            grids = rows.grids[r]
            if not grids:
                raise ValueError(
                    "pool needs the image's full patch grid, which an earlier stage already pruned; "
                    "make pool the first stage"
                )
            budget = int(rows.budget[r])
            grid_tokens = sum(g.size for g in grids)
            if budget >= grid_tokens:
                # Nothing to pool: keep every grid token, then separators in order up to the budget.
                in_grid = torch.cat([g.index().reshape(-1) for g in grids])
                others = torch.tensor(
                    [i for i in range(int(rows.valid[r].sum())) if i not in set(in_grid.tolist())], dtype=torch.long
                )
                chosen = torch.sort(torch.cat([in_grid, others[: budget - grid_tokens]])).values.to(keep.device)
                keep[r, :budget] = chosen
                merged[r, :budget] = rows.features[r, chosen]
                merged_into[r, chosen] = torch.arange(budget, device=keep.device)
                continue
            if budget < len(grids):
                raise ValueError(
                    f"pool makes at least one token of each grid (a crop of an image, a frame of a video), but this "
                    f"one has {len(grids)} grids and a budget of {budget} tokens; raise keep or keep_tokens to give "
                    f"it at least {len(grids)}"
                )
            shares = split_budget([g.size for g in grids], budget)
            pieces = [pool_grid(rows.features[r], g, n) for g, n in zip(grids, shares)]
            feats = torch.cat([p[0] for p in pieces])
            anchors = torch.cat([p[1] for p in pieces]).to(keep.device)
            order = torch.argsort(anchors)
            keep[r, :budget] = anchors[order]
            merged[r, :budget] = feats[order]
            column = torch.empty_like(order)  # window (in pooled order) -> its column in keep
            column[order] = torch.arange(budget, device=keep.device)
            first = 0
            for (_, _, holds), n in zip(pieces, shares):  # each grid cell's window, as a column
                cells = torch.nonzero(holds >= 0).squeeze(-1)
                merged_into[r, cells.to(keep.device)] = column[first + holds[cells].to(keep.device)]
                first += n
        return Reduction(keep=keep, features=merged, merged_into=merged_into)
