"""ToMe (``tome``) against the official code, facebookresearch/ToMe at commit
af95e4b1befa172dadccd8c81e223b10090f9579: ``tome/merge.py`` (bipartite_soft_matching, merge_wavg,
merge_source), ``tome/utils.py`` (parse_r) and ``tome/patch/timm.py`` (ToMeBlock, ToMeAttention),
whose rules are written below as independent test-local references (loops, not the official code).

- Tensor-level parity: the official functions applied layer after layer to ``[B, 1 + 196, d]`` (and
  without a class token, and with a distillation token) against the strategy driven the way the
  pipeline drives it (candidates in ascending order, sizes and sources carried through
  ``merged_into``), for r = 16, an int, a list, an ``(r, inflection)`` pair and keep budgets.
- The schedule (clamp included) from ``fraction``/``budget`` before anything runs.
- Config parsing and refusals.
- Model-level: a tiny timm ViT wrapped with ``tome`` against the same ViT patched with the official
  timm patch (skipped until ``vtoken.wrap`` runs ToMe on timm ViTs).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import vtoken
from vtoken.context import ScoreContext, TokenRows
from vtoken.schedule import ScoringCost
from vtoken.strategies.base import InsideBlock
from vtoken.strategies.tome import (
    OFFICIAL,
    STATE_KEY,
    ToMeConfig,
    ToMeStage,
    ToMeStrategy,
    merge_capacity,
    parse_r,
    spread_plan,
)

COMMIT = "af95e4b1befa172dadccd8c81e223b10090f9579"


# --------------------------------------------------------------------------------------------------
# An independent reference written from the rules of the official code (tome/merge.py and
# tome/utils.py at COMMIT): the similarity is a matrix product, but who merges into whom, and the
# merges themselves, are decided one row and one token at a time in plain Python, sharing nothing
# with the strategy's batched tensor code. Same interface as the official functions.


def do_nothing(x, mode=None):
    return x


def bipartite_soft_matching(metric, r: int, class_token: bool = False, distill_token: bool = False):
    """The rules: at most half of the unprotected tokens merge; places alternate between A (even)
    and B (odd); the class token (A's first) never merges away and nothing merges into the
    distillation token (B's first); the ``r`` A tokens whose best cosine match in B is strongest
    join it; the output is the staying A tokens (by place when a class token leads, else strongest
    edge first) then B (with a distillation token: its first tokens of A and B lead)."""
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    if r <= 0:
        return do_nothing, do_nothing
    plans = []
    for row in metric:
        unit = row / row.norm(dim=-1, keepdim=True)
        similarity = unit[0::2] @ unit[1::2].T
        if class_token:
            similarity[0, :] = -math.inf
        if distill_token:
            similarity[:, 0] = -math.inf
        best, partner = similarity.max(dim=-1)
        ranked = sorted(range(len(best)), key=lambda i: -float(best[i]))
        staying = sorted(ranked[r:]) if class_token else ranked[r:]
        plans.append((staying, [(i, int(partner[i])) for i in ranked[:r]]))

    def merge(x, mode: str = "mean"):
        rows = []
        for row, (staying, moves) in zip(x, plans):
            side_a, side_b = row[0::2], row[1::2]
            groups = [[side_b[j]] for j in range(len(side_b))]
            for i, j in moves:
                groups[j].append(side_a[i])
            combine = {"sum": lambda g: torch.stack(g).sum(0), "mean": lambda g: torch.stack(g).mean(0),
                       "amax": lambda g: torch.stack(g).amax(0)}[mode]
            side_b = [combine(g) for g in groups]
            side_a = [side_a[i] for i in staying]
            order = [side_a[0], side_b[0], *side_a[1:], *side_b[1:]] if distill_token else side_a + side_b
            rows.append(torch.stack(order))
        return torch.stack(rows)

    return merge, None


def merge_wavg(merge, x, size=None):
    """Size-weighted means: each merged token is sum(size * x) / sum(size) of its members."""
    size = torch.ones_like(x[..., :1]) if size is None else size
    total = merge(size, mode="sum")
    return merge(x * size, mode="sum") / total, total


def merge_source(merge, x, source=None):
    """Which original tokens each token holds (0/1 rows, starting from the identity)."""
    if source is None:
        batch, tokens = x.shape[:2]
        source = torch.eye(tokens).expand(batch, tokens, tokens)
    return merge(source, mode="amax")


def official_parse_r(num_layers: int, r):
    """The schedule rule: a list is r per layer (padded with zeros); an int r is constant; a pair
    (r, inflection) runs linearly from ``int(r (1 - inflection))`` to ``2 r`` minus that."""
    if isinstance(r, list):
        return r + [0] * max(0, num_layers - len(r))
    base, inflection = r if isinstance(r, tuple) else (r, 0)
    low = int(base * (1.0 - inflection))
    step = (2 * base - 2 * low) / (num_layers - 1)
    return [int(low + step * i) for i in range(num_layers)]


# --------------------------------------------------------------------------------------------------
# A stand-in for the blocks: token-wise, so it commutes with any token order (as a block's MLP and
# LayerNorm do), and a random metric per layer computed from the tokens (as the keys are)

DEPTH, PATCHES, DIM, KEY_DIM = 12, 196, 32, 16


def _weights(depth: int = DEPTH, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mix = [torch.randn(DIM, DIM, generator=g) / math.sqrt(DIM) for _ in range(depth)]
    keys = [torch.randn(DIM, KEY_DIM, generator=g) for _ in range(depth)]
    return mix, keys


def _block(weights, layer: int, x: torch.Tensor) -> torch.Tensor:
    return x + 0.5 * torch.tanh(x @ weights[0][layer])


def _metric(weights, layer: int, x: torch.Tensor) -> torch.Tensor:
    return x @ weights[1][layer]


def _tokens(batch: int = 3, prefix: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, prefix + PATCHES, DIM, generator=torch.Generator().manual_seed(seed))


def official_run(x, rates, weights, class_token: bool, distill_token: bool = False):
    """The official ToMeBlock loop (``tome/patch/timm.py``): per layer, the block, then merge with r
    popped from the schedule; sizes and sources as ``_tome_info`` carries them. Returns each layer's
    (tokens, sizes, source) after its merge."""
    size, source, out = None, None, []
    for layer, r in enumerate(rates):
        x = _block(weights, layer, x)
        if r > 0:
            merge, _ = bipartite_soft_matching(_metric(weights, layer, x), r, class_token, distill_token)
            source = merge_source(merge, x, source)
            x, size = merge_wavg(merge, x, size)
        out.append((x, size if size is not None else torch.ones_like(x[..., :1]), source))
    return out


def vtoken_run(x, config: ToMeConfig, weights, offset: int, depth: int = DEPTH, check_order=True):
    """The strategy driven as the pipeline drives it: prefix tokens apart, the candidates in
    ascending original order, each stage's budget ``round(fraction(P) * P)``, the kept candidates
    compacted in ``keep`` order, sizes and sources carried through ``merged_into``. Returns per layer
    (prefix, candidates in ToMe's order, sizes in that order, sources in that order)."""
    strategy = ToMeStrategy(config)
    strategy.bind({"vision": depth})
    stages = {stage.layer: stage for stage in strategy.stages()}
    batch, patches = x.shape[0], x.shape[1] - offset
    prefix, cand = x[:, :offset], x[:, offset:]
    sizes = torch.ones(batch, patches)
    source = torch.eye(patches).expand(batch, patches, patches).clone()
    state, index, out = {}, 0, []
    for layer in range(depth):
        full = _block(weights, layer, torch.cat([prefix, cand], dim=1))
        prefix, cand = full[:, :offset], full[:, offset:]
        stage = stages.get(layer)
        if stage is not None:
            width = cand.shape[1]
            budget = max(1, round(stage.fraction(patches) * patches))
            assert budget == stage.budget(patches)
            rows = TokenRows(
                features=cand, valid=torch.ones(batch, width, dtype=torch.bool),
                budget=torch.full((batch,), budget, dtype=torch.long), sample=torch.arange(batch),
                grids=[None] * batch, sizes=sizes, offset=offset,
            )
            ctx = ScoreContext(
                stage=stage, tokens=rows, generator=torch.Generator(), stage_index=index, state=state,
                keys=_metric(weights, layer, full)[:, offset:],
            )
            reduction = strategy.reduce(ctx)
            keep, into = reduction.keep, reduction.merged_into
            # What the pipeline checks and relies on.
            assert torch.equal(keep >= 0, (torch.arange(keep.shape[1])[None] < budget).expand(batch, -1))
            assert bool((keep[:, 1:] > keep[:, :-1]).all())
            assert bool((into >= 0).all()) and torch.equal(into.gather(1, keep), torch.arange(budget).expand(batch, -1))
            assert reduction.features.dtype == cand.dtype
            cand = reduction.features
            sizes = torch.zeros(batch, budget).scatter_add_(1, into, sizes)
            source = torch.zeros(batch, budget, patches).scatter_add_(1, into[..., None].expand(-1, -1, patches), source)
            index += 1
        if STATE_KEY in state:
            position = state[STATE_KEY]["position"]
        else:
            position = torch.arange(cand.shape[1]).expand(batch, -1)
        seq = torch.empty_like(position).scatter_(1, position, torch.arange(position.shape[1]).expand(batch, -1))
        out.append((
            prefix, cand.gather(1, seq[..., None].expand(-1, -1, DIM)), sizes.gather(1, seq),
            source.gather(1, seq[..., None].expand(-1, -1, patches)) > 0,
        ))
    return out


def _compare(official, mine, offset):
    """Every layer: the prefix, then the candidates in ToMe's order, their sizes and sources."""
    assert len(official) == len(mine)
    for layer, ((x, size, source), (prefix, cand, sizes, src)) in enumerate(zip(official, mine)):
        assert x.shape[1] == offset + cand.shape[1], f"layer {layer}: token counts differ"
        torch.testing.assert_close(x[:, :offset], prefix, rtol=0, atol=0, msg=f"layer {layer}: prefix")
        torch.testing.assert_close(x[:, offset:], cand, rtol=1e-6, atol=1e-6, msg=f"layer {layer}: tokens")
        assert torch.equal(size[:, :offset, 0], torch.ones(x.shape[0], offset)), f"layer {layer}: prefix sizes"
        assert torch.equal(size[:, offset:, 0], sizes), f"layer {layer}: sizes"
        if source is not None:
            assert torch.equal(source[:, offset:, offset:] > 0, src), f"layer {layer}: sources"
            assert not bool((source[:, offset:, :offset] > 0).any())


SCHEDULES = {
    "r16": 16,  # the README's example; the last layer is clamped to 10
    "r13": 13,
    "list": [0, 8, 20, 0, 30, 5, 16, 2, 9, 40, 3, 50],  # some clamped, some layers idle
    "decreasing": (16, -1.0),
    "increasing": (9, 0.5),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("class_token", [True, False])
def test_layer_by_layer_parity_with_the_official_functions(schedule, class_token):
    r = SCHEDULES[schedule]
    offset = int(class_token)
    x = _tokens(prefix=offset)
    weights = _weights()
    official = official_run(x, official_parse_r(DEPTH, r), weights, class_token)
    mine = vtoken_run(x, ToMeConfig(r=r), weights, offset)
    _compare(official, mine, offset)


def test_parity_with_a_distillation_token_as_a_second_protected_prefix_token():
    x = _tokens(prefix=2, seed=4)
    weights = _weights(seed=5)
    official = official_run(x, official_parse_r(DEPTH, 16), weights, class_token=True, distill_token=True)
    mine = vtoken_run(x, ToMeConfig(r=16), weights, offset=2)
    _compare(official, mine, 2)


@pytest.mark.parametrize("budget", [dict(keep_tokens=40), dict(keep=0.3), dict(keep_tokens=12), dict()])
def test_keep_budgets_run_the_official_merge_on_their_spread_schedule(budget):
    x = _tokens(seed=2)
    weights = _weights(seed=3)
    config = ToMeConfig(**budget)
    final = budget.get("keep_tokens") or round(budget.get("keep", ToMeConfig.default_keep) * PATCHES)
    rates = list(spread_plan(PATCHES, final, DEPTH))
    assert sum(rates) == PATCHES - final
    mine = vtoken_run(x, config, weights, 1)
    assert mine[-1][1].shape[1] == final
    _compare(official_run(x, rates, weights, class_token=True), mine, 1)


def test_the_order_tracking_matters():
    """Without following ToMe's order (plain ascending order at every stage), the A/B split of the
    second merging layer differs and the tokens do not match: the parity above is not vacuous."""
    x = _tokens()
    weights = _weights()
    official = official_run(x, official_parse_r(DEPTH, 16), weights, True)

    class Forgetful(dict):
        def __setitem__(self, key, value):  # never keeps ToMe's order
            pass

    strategy = ToMeStrategy(ToMeConfig(r=16))
    strategy.bind({"vision": DEPTH})
    stages = strategy.stages()
    prefix, cand = x[:, :1], x[:, 1:]
    sizes = torch.ones(3, PATCHES)
    for index, stage in enumerate(stages[:2]):
        full = _block(weights, stage.layer, torch.cat([prefix, cand], 1))
        prefix, cand = full[:, :1], full[:, 1:]
        rows = TokenRows(cand, torch.ones(cand.shape[:2], dtype=torch.bool),
                         torch.full((3,), stage.budget(PATCHES)), torch.arange(3), [None] * 3, sizes=sizes, offset=1)
        ctx = ScoreContext(stage, rows, torch.Generator(), stage_index=index, state=Forgetful(),
                           keys=_metric(weights, stage.layer, full)[:, 1:])
        red = strategy.reduce(ctx)
        sizes = torch.zeros(3, red.keep.shape[1]).scatter_add_(1, red.merged_into, sizes)
        cand = red.features
    ref = official[1][0][:, 1:]
    same_sets = all(
        torch.allclose(torch.sort(ref[b].sum(-1)).values, torch.sort(cand[b].sum(-1)).values, atol=1e-5)
        for b in range(3)
    )
    assert not same_sets


# --------------------------------------------------------------------------------------------------
# The reduction itself on hand-checkable rows


def test_merged_tokens_are_size_weighted_means_and_keep_their_b_member():
    g = torch.Generator().manual_seed(7)
    features = torch.randn(2, 9, 4, generator=g)
    keys = torch.randn(2, 9, 3, generator=g)
    sizes = torch.randint(1, 5, (2, 9), generator=g).float()
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 7:] = False  # row 1: 7 tokens taking part, then padding (size 0)
    sizes[1, 7:] = 0
    budget = torch.tensor([5, 4])
    stage = ToMeStage("vision", 0, keep_tokens=5, layers=1)
    rows = TokenRows(features, valid, budget, torch.arange(2), [None, None], sizes=sizes, offset=1)
    red = ToMeStrategy(ToMeConfig()).reduce(ScoreContext(stage, rows, torch.Generator(), keys=keys, state={}))
    assert red.keep.tolist()[1][-1] == -1 and (red.keep[1, :4] >= 0).all()
    for row in range(2):
        into = red.merged_into[row]
        assert (into[~valid[row]] == -1).all()
        for column, index in enumerate(red.keep[row, : int(budget[row])].tolist()):
            members = (into == column).nonzero().squeeze(-1)
            assert index in members.tolist() and into[index] == column
            # Candidates sit at sequence place offset + i in the first stage: A (even place) holds odd i.
            assert all(m == index or (1 + m) % 2 == 0 for m in members.tolist())
            if len(members) > 1:
                assert (1 + index) % 2 == 1  # a merged token keeps its B (odd place) member's index
            w = sizes[row, members]
            expected = (features[row, members] * w[:, None]).sum(0) / w.sum()
            torch.testing.assert_close(red.features[row, column], expected)


def test_real_tokens_that_never_reach_the_llm_still_take_part():
    """LLaVA-NeXT's unpadding marks some encoder tokens invalid (they reach no LLM token); the
    encoder still merges its whole sequence, so they are matched like the others."""
    g = torch.Generator().manual_seed(8)
    features, keys = torch.randn(1, 8, 4, generator=g), torch.randn(1, 8, 3, generator=g)
    stage = ToMeStage("vision", 0, keep_tokens=5, layers=1)
    valid = torch.tensor([[True] * 5 + [False] * 3])
    reductions = [
        ToMeStrategy(ToMeConfig()).reduce(ScoreContext(
            stage, TokenRows(features, v, torch.tensor([5]), torch.arange(1), [None], sizes=torch.ones(1, 8), offset=1),
            torch.Generator(), keys=keys, state={},
        ))
        for v in (valid, torch.ones(1, 8, dtype=torch.bool))
    ]
    assert torch.equal(reductions[0].keep, reductions[1].keep)
    assert torch.equal(reductions[0].merged_into, reductions[1].merged_into)
    assert bool((reductions[0].merged_into >= 0).all())


def test_anyres_crops_run_the_schedule_on_their_own_sequence():
    """``crop_budget``: an image of several crops runs the schedule on each crop's patches (what the
    encoder merges), with the image's final budget shared in proportion."""
    by_r = ToMeStrategy(ToMeConfig(r=3))
    by_r.bind({"vision": 4, "llm": 4, "vision_read": 2})
    assert [s.crop_budget(16, 52) for s in by_r.stages()] == [13, 10] == [s.budget(16) for s in by_r.stages()]
    by_keep = ToMeStrategy(ToMeConfig(keep_tokens=13))
    by_keep.bind({"vision": 4, "llm": 4, "vision_read": 2})
    assert [s.crop_budget(16, 52) for s in by_keep.stages()] == [8, 4]  # round(13 * 16 / 52) = 4
    assert [s.crop_budget(52, 52) for s in by_keep.stages()] == [s.budget(52) for s in by_keep.stages()] == [26, 13]
    by_fraction = ToMeStrategy(ToMeConfig(keep=0.4))
    by_fraction.bind({"vision": 4, "llm": 4, "vision_read": 2})
    assert by_fraction.stages()[-1].crop_budget(16, 52) == 6


def test_a_merge_past_set_a_and_missing_keys_are_refused():
    stage = ToMeStage("vision", 0, keep_tokens=2, layers=1)
    features = torch.randn(1, 6, 4)
    rows = TokenRows(features, torch.ones(1, 6, dtype=torch.bool), torch.tensor([2]), torch.arange(1), [None],
                     sizes=torch.ones(1, 6), offset=1)
    with pytest.raises(RuntimeError, match="only 3 are in set A"):
        ToMeStrategy(ToMeConfig()).reduce(ScoreContext(stage, rows, torch.Generator(), keys=torch.randn(1, 6, 3)))
    with pytest.raises(RuntimeError, match="keys of the block's attention"):
        ToMeStrategy(ToMeConfig()).reduce(ScoreContext(stage, rows, torch.Generator()))


# --------------------------------------------------------------------------------------------------
# The schedule


def _official_counts(rates, patches, class_token):
    """Patch tokens after each layer per the official clamp, t counting the class token."""
    protected = int(class_token)
    t, out = patches + protected, []
    for r in rates:
        t -= max(0, min(r, (t - protected) // 2))
        out.append(t - protected)
    return out


@pytest.mark.parametrize("r", [16, 13, 40, [5] * 12, (16, -1.0), (8, 1.0)])
def test_stage_budgets_are_the_official_token_counts_clamp_included(r):
    strategy = ToMeStrategy(ToMeConfig(r=r))
    strategy.bind({"vision": DEPTH})
    rates = official_parse_r(DEPTH, r)
    assert list(parse_r(DEPTH, r)) == rates
    for class_token in (True, False):
        counts = _official_counts(rates, PATCHES, class_token)
        by_layer = {s.layer: (s.budget(PATCHES), round(s.fraction(PATCHES) * PATCHES)) for s in strategy.stages()}
        assert sorted(by_layer) == [i for i, rate in enumerate(rates) if rate > 0]
        for layer, (budget, from_fraction) in by_layer.items():
            assert budget == from_fraction == counts[layer]


def test_r16_leaves_10_of_196_and_the_default_is_r13_on_vit_b16():
    strategy = ToMeStrategy(ToMeConfig(r=16))
    strategy.bind({"vision": 12})
    assert strategy.stages()[-1].budget(196) == 10
    default, r13 = ToMeStrategy(ToMeConfig()), ToMeStrategy(ToMeConfig(r=13))
    default.bind({"vision": 12})
    r13.bind({"vision": 12})
    assert [s.budget(196) for s in default.stages()] == [s.budget(196) for s in r13.stages()]
    assert default.stages()[-1].budget(196) == 40


def test_keep_spread_is_even_with_the_remainder_first_and_respects_the_clamp():
    assert spread_plan(196, 40, 12) == (13,) * 12
    assert spread_plan(196, 150, 12) == (4,) * 10 + (3, 3)
    assert spread_plan(16, 4, 2) == (8, 4)  # (6, 6) would ask 6 of 10 at layer 1
    assert spread_plan(16, 5, 2) == (6, 5)
    for patches, layers in [(196, 12), (576, 22), (16, 2), (17, 3)]:
        for final in range(patches - merge_capacity(patches, layers), patches + 1):
            plan = spread_plan(patches, final, layers)
            n = patches
            for r in plan:
                assert 0 <= r <= n // 2
                n -= r
            assert n == final
            assert max(plan) - min(plan) <= 1 or plan[0] >= plan[-1]


def test_an_unreachable_budget_is_refused_with_the_smallest_one_that_works():
    strategy = ToMeStrategy(ToMeConfig(keep_tokens=3))
    strategy.bind({"vision": 4, "llm": 4, "vision_read": 2})
    assert [s.layer for s in strategy.stages()] == [0, 1]
    with pytest.raises(ValueError, match=r"use keep >= 0.25 \(keep_tokens >= 4 for an image of 16 patches\)"):
        strategy.stages()[0].budget(16)


def test_vision_language_models_merge_only_before_the_read_layer():
    strategy = ToMeStrategy(ToMeConfig(r=3))
    strategy.bind({"vision": 24, "llm": 32, "vision_read": 22})
    assert [s.layer for s in strategy.stages()] == list(range(22))
    assert ToMeStrategy(ToMeConfig(r=(6, -1.0))).config.rates(24, 22)[:22] == tuple(parse_r(22, (6, -1.0)))
    with pytest.raises(ValueError, match=r"at or after layer 22 .* set r\[22:\] to 0"):
        ToMeStrategy(ToMeConfig(r=[1] * 24)).bind({"vision": 24, "llm": 32, "vision_read": 22})


def test_keep_all_has_no_stage():
    strategy = ToMeStrategy(ToMeConfig(keep=1.0))
    strategy.bind({"vision": 12})
    assert strategy.stages() == ()


# --------------------------------------------------------------------------------------------------
# Config parsing and refusals


def test_r_with_keep_is_refused():
    for budget in (dict(keep=0.5), dict(keep_tokens=40)):
        with pytest.raises(ValueError, match="not both; drop keep/keep_tokens to use r"):
            ToMeConfig(r=16, **budget)


def test_a_list_of_the_wrong_length_is_refused_naming_the_depth():
    strategy = ToMeStrategy(ToMeConfig(r=[2] * 5))
    with pytest.raises(ValueError, match="r has 5 values but the vision encoder has 12 layers"):
        strategy.bind({"vision": 12})


def test_wrap_refuses_a_wrong_list_before_touching_the_model():
    from tiny import tiny_llava

    model = tiny_llava()
    with pytest.raises(ValueError, match="the vision encoder has 4 layers"):
        vtoken.wrap(model, "tome", r=[1, 1])
    assert not vtoken.is_wrapped(model)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(r=-1), "r must be >= 0"),
        (dict(r=True), "r must be an int"),
        (dict(r=(4, 2.0)), r"inflection must be a number in \[-1, 1\]"),
        (dict(r=(4.5, 0.0)), "r must be an integer >= 0"),
        (dict(r=[1, 2.5, 3]), "one integer >= 0 per vision layer"),
        (dict(site="llm", layer=2), "inside the vision encoder"),
        (dict(layer=3), "takes no layer=/stages="),
        (dict(proportional_attention="yes"), "proportional_attention must be True or False"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ToMeConfig(**options)


def test_r_forms_and_their_json_round_trip(tmp_path):
    assert ToMeConfig(r=(16, -1)).r == (16, -1.0)
    assert ToMeConfig(r=[16, -1.0]).r == (16, -1.0)  # what JSON makes of a saved pair
    assert ToMeConfig(r=[16, 0]).r == [16, 0]  # two ints in a list: per layer
    for r in (13, (16, -1.0), [1, 2, 0, 3]):
        config = ToMeConfig(r=r, proportional_attention=False)
        loaded = vtoken.load(config.save(tmp_path / str(hash(str(r)))))
        assert loaded == config and loaded.r == config.r


def test_registered_with_its_placement_and_cost():
    listed = {m["name"]: m for m in vtoken.methods()}["tome"]
    assert listed["sites"] == ["vision"] and listed["default_keep"] == pytest.approx(40 / 196)
    assert listed["summary"].startswith("``tome``: Token Merging")
    strategy = ToMeStrategy(ToMeConfig(proportional_attention=False))
    assert strategy.inside_block() == InsideBlock(proportional_attention=False)
    stage = strategy.stages()[3]
    assert strategy.scoring_cost(stage) == [ScoringCost("vision_token_matching", layer=3)]
    import vtoken.strategies.tome as module

    assert COMMIT in OFFICIAL and COMMIT in module.__doc__


# --------------------------------------------------------------------------------------------------
# Model level: the official timm patch (tome/patch/timm.py at COMMIT), re-implemented on timm 1.0's
# Block/Attention (LayerScale and q/k norms are identities on these models; fused attention with the
# log-size bias as an additive mask)


def _tiny_vit(seed: int = 0, **options):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, depth=6, **options)
    return model.eval()


def _pipeline_ready() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    model = _tiny_vit()
    try:
        vtoken.wrap(model, "tome", r=2)
    except (NotImplementedError, ValueError):
        return False
    except Exception:  # anything else is a failure the test itself should show
        return True
    vtoken.unwrap(model)
    return True


def _official_timm_patch(model, r, prop_attn: bool = True):
    """``tome.patch.timm.apply_patch`` with ToMeBlock / ToMeAttention / ToMeVisionTransformer."""
    import torch.nn.functional as F
    from timm.models.vision_transformer import Attention, Block

    info = {"r": r, "size": None, "source": None, "prop_attn": prop_attn,
            "class_token": model.cls_token is not None, "distill_token": False}

    def block_forward(self, x):
        attn_size = info["size"] if info["prop_attn"] else None
        x_attn, metric = self.attn(self.norm1(x), attn_size)
        x = x + self.drop_path1(self.ls1(x_attn))
        r = info["r"].pop(0)
        if r > 0:
            merge, _ = bipartite_soft_matching(metric, r, info["class_token"], info["distill_token"])
            info["source"] = merge_source(merge, x, info["source"])
            x, info["size"] = merge_wavg(merge, x, info["size"])
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def attn_forward(self, x, size=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None
        if size is not None:  # Apply proportional attention
            bias = size.log()[:, None, None, :, 0].to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.proj(self.norm(x))
        return x, k.mean(1)

    original_forward = model.forward

    def vit_forward(*args, **kwargs):
        info["r"] = parse_r(len(model.blocks), r)
        info["size"] = None
        info["source"] = None
        return original_forward(*args, **kwargs)

    for module in model.modules():
        if isinstance(module, Block):
            module.forward = block_forward.__get__(module)
        elif isinstance(module, Attention):
            module.forward = attn_forward.__get__(module)
    model.forward = vit_forward
    return model, info


@pytest.mark.skipif(not _pipeline_ready(), reason="vtoken.wrap does not run tome on timm ViTs yet")
@pytest.mark.parametrize(
    "r,prop_attn,options",
    [
        (2, True, {}),
        ((3, -1.0), True, {}),
        ([4, 0, 3, 2, 1, 0], True, {}),
        (3, False, {}),
        (2, True, dict(class_token=False, global_pool="avg")),  # no class token: edge order kept
    ],
    ids=["r2", "decreasing", "list", "no-prop-attn", "no-cls"],
)
def test_tome_matches_official_on_timm_vit(r, prop_attn, options):
    model = _tiny_vit(**options)
    assert all(block.attn.fused_attn for block in model.blocks)
    reference, info = _official_timm_patch(copy.deepcopy(model), r, prop_attn)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
    vtoken.wrap(model, "tome", r=r, proportional_attention=prop_attn)
    try:
        with torch.no_grad():
            got = model(x)
        selection = vtoken.selection(model)
    finally:
        vtoken.unwrap(model)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # The patch tokens left: one per source group of the official model, each held by one of its
    # members (the B member that absorbed the others).
    prefix = int(info["class_token"])
    final = info["source"][:, prefix:, prefix:]
    kept = [list(s.values())[-1] for s in selection]
    assert [len(k) for k in kept] == [final.shape[1]] * 3
    for b in range(3):
        holders = {int(i) for i in kept[b]}
        groups = [set(row.nonzero().squeeze(-1).tolist()) for row in final[b] > 0]
        assert all(len(holders & g) == 1 for g in groups)


def test_a_budget_the_tower_cannot_reach_is_refused_at_wrap_and_skipped_by_the_bench():
    """The shipped tiny LLaVA merges in 2 vision layers (it reads layer 2): 144 patches cannot go below
    36. ``wrap`` refuses keep=2/9 (32) before anything runs, and ``vtoken bench`` skips that point,
    saying why, and measures the others."""
    from fractions import Fraction

    from transformers import LlavaForConditionalGeneration

    from vtoken.bench import run

    path = Path(vtoken.__file__).parent / "assets" / "tiny-llava"
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    with pytest.raises(ValueError, match="so at least 36 remain"):
        vtoken.wrap(model, "tome", keep=2 / 9)
    assert not vtoken.is_wrapped(model)
    said = []
    rows = run(methods=["tome"], budgets=[Fraction(2, 9), Fraction(1, 3)], repeats=1, batch=1, limit=10,
               progress=said.append)
    assert [(r.method, str(r.budget)) for r in rows] == [("none", "1"), ("tome", "1/3")]
    assert any(line.startswith("tome @ 2/9: skipped: tome cannot merge 144") for line in said)
