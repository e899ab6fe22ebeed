"""Strategy formulas on hand-made tensors, where the right answer is known by construction."""

import torch

from vtoken.config import StageSpec
from vtoken.context import Grid, ScoreContext, TokenRows
from vtoken.registry import get_strategy
from vtoken.strategies.pool import band_widths, pool_grid, split_budget


def _ctx(features, budget, grids=None, attention=None, site="projector"):
    rows = features.shape[0]
    valid = torch.ones(features.shape[:2], dtype=torch.bool)
    stage = StageSpec(site, 2 if site == "llm" else None, keep_tokens=int(max(budget)))
    return ScoreContext(
        stage=stage,
        tokens=TokenRows(features, valid, torch.tensor(budget), torch.zeros(rows, dtype=torch.long), grids or [None] * rows),
        generator=torch.Generator().manual_seed(0),
        attention=attention,
        row_seeds=lambda: [1000 + r for r in range(rows)],
    )


def test_band_widths_give_exact_counts_and_square_grids():
    assert band_widths(24, 24, 64) == [8] * 8
    assert band_widths(24, 24, 144) == [12] * 12
    for tokens in range(1, 17):
        widths = band_widths(4, 4, tokens)
        assert sum(widths) == tokens and max(widths) <= 4 and len(widths) <= 4


def test_pool_grid_averages_windows():
    # A 4x4 grid whose feature is the patch index: 2x2 pooling gives the window means.
    features = torch.arange(16, dtype=torch.float).view(16, 1)
    pooled, anchors, holds = pool_grid(features, Grid(0, 4, 4, 4), 4)
    assert pooled.view(-1).tolist() == [2.5, 4.5, 10.5, 12.5]
    assert anchors.tolist() == [0, 2, 8, 10]
    # Each patch's window: the mean of a window's patches is its pooled value.
    assert holds.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    assert all(features[holds == w].mean().item() == pooled[w].item() for w in range(4))


def test_pool_grid_with_separators_uses_row_stride():
    # 2x2 grid, each row followed by a separator: tokens 0 1 [s] 3 4 [s]
    features = torch.tensor([[1.0], [3.0], [100.0], [5.0], [7.0], [100.0]])
    pooled, anchors, holds = pool_grid(features, Grid(0, 2, 2, 3), 1)
    assert pooled.item() == 4.0 and anchors.tolist() == [0]
    assert holds.tolist() == [0, 0, -1, 0, 0]  # the separator belongs to no window


def test_split_budget_is_exact_and_proportional():
    assert split_budget([576, 2304], 640) == [128, 512]
    assert sum(split_budget([16, 40], 7)) == 7


def test_pool_strategy_keeps_budget_and_merges():
    strategy = get_strategy("pool")(get_strategy("pool").Config(keep_tokens=4))
    features = torch.arange(16, dtype=torch.float).view(1, 16, 1)
    out = strategy.reduce(_ctx(features, [4], grids=[(Grid(0, 4, 4, 4),)]))
    assert out.keep.tolist() == [[0, 2, 8, 10]]
    assert out.features.view(-1).tolist() == [2.5, 4.5, 10.5, 12.5]


def test_random_is_seeded():
    cls = get_strategy("random")
    features = torch.zeros(2, 10, 3)
    a = cls(cls.Config(keep_tokens=4)).reduce(_ctx(features, [4, 4])).keep
    b = cls(cls.Config(keep_tokens=4)).reduce(_ctx(features, [4, 4])).keep
    assert torch.equal(a, b) and (a >= 0).all()
    assert all(len(set(r.tolist())) == 4 for r in a)


def test_fastv_keeps_the_most_attended_tokens():
    cls = get_strategy("fastv")
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05], [0.4, 0.1, 0.1, 0.1, 0.3]])
    # Two heads: the mean over heads is what counts.
    per_head = torch.stack([probs * 2, probs * 0], dim=1)[:, :, None, :]  # [R, H, 1, N]

    def attention(query="last", layer="previous"):
        assert (query, layer) == ("last", "previous")
        return per_head

    out = cls(cls.Config(keep_tokens=2)).reduce(_ctx(torch.zeros(2, 5, 3), [2, 2], attention=attention, site="llm"))
    assert out.keep.tolist() == [[1, 3], [0, 4]]
