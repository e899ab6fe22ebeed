"""ZOO-Prune (``vtoken/strategies/zoo_prune.py``): the zeroth-order sensitivity and the
sensitivity-weighted max-min selection on tensors whose answer is known by construction, then
end-to-end on the tiny LLaVA and LLaVA-NeXT (the generic checks are in test_all_methods.py)."""

import math
import warnings

import pytest
import torch
from torch import nn

import vtoken
from vtoken.config import StageSpec
from vtoken.context import ScoreContext, TokenRows
from vtoken.schedule import ScoringCost
from vtoken.strategies.zoo_prune import (
    ZooPruneConfig,
    ZooPruneStrategy,
    float32_projector,
    normalise_sensitivity,
    random_directions,
    weighted_maxmin_order,
    zo_sensitivity,
)
from families import FAMILIES
from tiny import greedy_without_cache, llava_inputs, llava_next_inputs, tiny_llava, tiny_llava_next


def _directions(m=16, dim=6, seed=0):
    return random_directions(m, dim, torch.Generator().manual_seed(seed))


def _selected(scores, count):
    """The indices a top-``count`` of ``weighted_maxmin_order`` scores keeps, in pick order."""
    return torch.argsort(scores, descending=True, stable=True)[:count].tolist()


class Quadratic(nn.Module):
    """M(x) = (x_0^2, x_1, ..., x_{d-1}): Jacobian diag(2 x_0, 1, ..., 1)."""

    def forward(self, x):
        return torch.cat([x[..., :1] ** 2, x[..., 1:]], dim=-1)


class Recording(nn.Module):
    """Wraps a projector and records the largest batch of rows it was called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.largest = 0

    def forward(self, x):
        self.largest = max(self.largest, x.reshape(-1, x.shape[-1]).shape[0])
        return self.inner(x)


def _context(features, inputs, budget, projector, seed=0, valid=None):
    rows, n = features.shape[:2]
    valid = torch.ones(rows, n, dtype=torch.bool) if valid is None else valid
    tokens = TokenRows(
        features=features, valid=valid, budget=torch.as_tensor(budget), sample=torch.arange(rows),
        grids=[None] * rows,
    )
    return ScoreContext(
        stage=StageSpec("projector", keep_tokens=int(max(budget))), tokens=tokens,
        generator=torch.Generator().manual_seed(seed), projector=projector, projector_input=inputs,
        diagnostics={},
    )


def _keep(strategy, ctx):
    return strategy.reduce(ctx).keep


def _sensitivity(ctx):
    """The sensitivity the strategy reported while deciding ``ctx``."""
    return ctx.diagnostics[ctx.stage.name]["sensitivity"]


# --------------------------------------------------------------------------------------------------
# Sensitivity S(i) = (1/m) sum_j ||M(x + h u_j) - M(x - h u_j)|| / 2h


def test_directions_are_unit_norm_and_seeded():
    u = _directions(8, 5, seed=3)
    assert u.shape == (8, 5) and u.dtype == torch.float32
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(8))
    assert torch.equal(u, _directions(8, 5, seed=3))
    assert not torch.allclose(u, _directions(8, 5, seed=4))


def test_linear_projector_gives_constant_sensitivity():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    x = torch.randn(10, 6) * torch.logspace(-1, 1, 10)[:, None]  # very different tokens
    u = _directions(16, 6)
    s = zo_sensitivity(float32_projector(linear), x, u, step=0.01)
    # The Jacobian is W for every token: S = mean_j ||W u_j|| exactly, whatever x.
    expected = (u @ linear.weight.detach().T).norm(dim=-1).mean()
    torch.testing.assert_close(s, expected.expand(10), rtol=1e-5, atol=0)
    weight, flat = normalise_sensitivity(s[None], torch.ones(1, 10, dtype=torch.bool))
    assert bool(flat[0]) and torch.equal(weight, torch.ones(1, 10))


def test_quadratic_projector_gives_known_sensitivity_and_ordering():
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    x[:, 0] = torch.tensor([0.5, -3.0, 0.0, 2.0, -1.0])
    u = _directions(16, 6)
    s = zo_sensitivity(float32_projector(Quadratic()), x, u, step=0.01)
    # The central difference of a quadratic is exact: delta_j = (2 x_0 u_j0, u_j1, ..., u_jd).
    delta = torch.cat([2 * x[:, None, :1] * u[None, :, :1], u[None, :, 1:].expand(5, -1, -1)], dim=-1)
    torch.testing.assert_close(s, delta.norm(dim=-1).mean(-1), rtol=1e-4, atol=0)
    # More curvature along x_0 (larger |x_0|) means more sensitive.
    assert torch.argsort(s, descending=True).tolist() == [1, 3, 4, 0, 2]
    weight, flat = normalise_sensitivity(s[None], torch.ones(1, 5, dtype=torch.bool))
    assert not bool(flat[0])
    assert weight[0, 1] == pytest.approx(1.0, abs=1e-6) and weight[0, 2] == 0.0


def test_chunking_bounds_memory_and_does_not_change_the_result():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 4))
    x = torch.randn(9, 6)
    u = _directions(5, 6)
    results = []
    for chunk in (2, 7, 16, 10_000):
        recording = Recording(mlp)
        results.append(zo_sensitivity(float32_projector(recording), x, u, step=0.01, chunk_size=chunk))
        assert recording.largest <= chunk
    # Equal up to float32 rounding (a matrix product may round differently for another batch size,
    # and the difference quotient divides by 2h): far below the spread of S across tokens.
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-4, atol=0)
    assert (results[0].max() - results[0].min()) / results[0].max() > 1e-2
    # Through the strategy: the same selection for every chunk size.
    features = torch.randn(2, 9, 4)
    keeps = [
        _keep(ZooPruneStrategy(ZooPruneConfig(directions=5, chunk_size=chunk)),
              _context(features, torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(1)), [3, 4], mlp))
        for chunk in (2, 10_000)
    ]
    assert torch.equal(keeps[0], keeps[1])


def test_bf16_projector_and_inputs_are_scored_in_float32():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).to(torch.bfloat16)
    x = (torch.randn(6, 16) * 3).to(torch.bfloat16)
    u = _directions(8, 16)
    s = zo_sensitivity(float32_projector(mlp), x, u, step=0.01)
    assert s.dtype == torch.float32
    reference = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    reference.load_state_dict({k: v.float() for k, v in mlp.state_dict().items()})
    torch.testing.assert_close(s, zo_sensitivity(reference, x.float(), u, step=0.01), rtol=1e-5, atol=0)
    # In bf16 the step h u (~0.0025 per component) is lost in rounding: a different, wrong answer.
    naive = torch.stack([
        ((mlp(x + 0.01 * uj.to(torch.bfloat16)) - mlp(x - 0.01 * uj.to(torch.bfloat16))).float().norm(dim=-1) / 0.02)
        for uj in u
    ]).mean(0)
    assert not torch.allclose(naive, s, rtol=0.05)
    assert all(p.dtype == torch.bfloat16 for p in mlp.parameters())  # the module is untouched


# --------------------------------------------------------------------------------------------------
# Sensitivity-weighted greedy max-min selection


def _on_circle(degrees):
    angles = torch.tensor(degrees, dtype=torch.float32) * math.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None]  # [1, N, 2]


def test_maxmin_picks_the_known_farthest_points():
    # Unit vectors at these angles; cosine distance 1 - cos(angle between).
    z = _on_circle([0, 10, 90, 180, 100, 330])
    ones = torch.ones(1, 6)
    valid = torch.ones(1, 6, dtype=torch.bool)
    order = weighted_maxmin_order(z, ones, valid, valid, torch.tensor([4]))
    # Flat weights: first the first token (0°), then its opposite (180°), then 90° (distance 1 to
    # both; 100° is only 1 - cos 80° from 180°), then 330° (30° from its nearest pick; 10° and 100°
    # are 10° from theirs).
    assert _selected(order[0], 4) == [0, 3, 2, 5]
    # Scaling all points changes nothing (cosine distance).
    assert torch.equal(weighted_maxmin_order(z * 7, ones, valid, valid, torch.tensor([4])), order)


def test_sensitivity_weights_the_maxmin_choice():
    z = _on_circle([0, 180, 90])
    valid = torch.ones(1, 3, dtype=torch.bool)
    # First pick = argmax Ŝ (the tie between 0° and 90° goes to the lower index); then
    # 180° scores 0.3 * 2 = 0.6 and 90° scores 1 * 1 = 1: the weighting overrides pure distance.
    weight = torch.tensor([[1.0, 0.3, 1.0]])
    assert _selected(weighted_maxmin_order(z, weight, valid, valid, torch.tensor([2]))[0], 2) == [0, 2]
    assert _selected(weighted_maxmin_order(z, torch.ones(1, 3), valid, valid, torch.tensor([2]))[0], 2) == [0, 1]
    # The first pick follows the sensitivity, not the index.
    weight = torch.tensor([[0.2, 0.9, 0.5]])
    assert _selected(weighted_maxmin_order(z, weight, valid, valid, torch.tensor([1]))[0], 1) == [1]


def _reference_selection(z, weight, eligible, count):
    """The official loop, literally: full cosine-distance matrix, min over the selected set each step."""
    zn = torch.nn.functional.normalize(z.double(), dim=-1)
    distance = 1 - zn @ zn.T
    chosen = [int(torch.where(eligible, weight.double(), -1.0).argmax())]
    while len(chosen) < count:
        nearest = distance[:, chosen].min(dim=1).values
        score = torch.where(eligible, weight.double() * nearest, torch.full_like(nearest, -1.0))
        score[chosen] = -math.inf
        chosen.append(int(score.argmax()))
    return chosen


def test_running_minimum_equals_the_full_matrix_reference():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 20, 8, generator=g)
    weight = torch.rand(3, 20, generator=g)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[2, 15:] = False  # a padded row
    eligible = valid.clone()
    eligible[1, [3, 7]] = False  # two separators
    count = torch.tensor([6, 19, 15])
    order = weighted_maxmin_order(z, weight, eligible, valid, count)
    for r in range(3):
        n = int(count[r])
        assert _selected(order[r], n) == _reference_selection(z[r, valid[r]], weight[r, valid[r]], eligible[r, valid[r]], n)
        assert int((order[r] > -21).sum()) == n
    # Row 1 keeps 19 of 20: every eligible token, then the first separator.
    assert _selected(order[1], 19)[-1] == 3


# --------------------------------------------------------------------------------------------------
# The strategy on hand-made contexts


def test_tokens_without_projector_input_are_kept_only_to_fill_the_budget():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 4))
    inputs = torch.randn(1, 8, 6)
    inputs[0, [2, 5]] = 0  # two newline-like tokens
    features = torch.randn(1, 8, 4)
    strategy = ZooPruneStrategy(ZooPruneConfig(directions=4))
    for budget in range(1, 7):
        keep = _keep(strategy, _context(features, inputs, [budget], mlp))[0].tolist()
        assert len(keep) == budget and not {2, 5} & set(keep)
    ctx = _context(features, inputs, [7], mlp)
    assert _keep(strategy, ctx)[0].tolist() == [0, 1, 2, 3, 4, 6, 7]
    sensitivity = _sensitivity(ctx)
    assert torch.all(sensitivity[0, [2, 5]] == 0) and torch.all(sensitivity[0, [0, 1, 3]] > 0)


def test_same_seed_same_selection_other_seed_other_directions():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 4))
    inputs, features = torch.randn(2, 30, 6), torch.randn(2, 30, 4)
    strategy = ZooPruneStrategy(ZooPruneConfig(directions=3))
    ctx = _context(features, inputs, [5, 9], mlp, seed=0)
    first = _keep(strategy, ctx)
    s0 = _sensitivity(ctx)
    again = _context(features, inputs, [5, 9], mlp, seed=0)
    assert torch.equal(_keep(strategy, again), first)
    assert torch.equal(_sensitivity(again), s0)
    other = _context(features, inputs, [5, 9], mlp, seed=1)
    _keep(strategy, other)
    assert not torch.allclose(_sensitivity(other), s0)  # other directions, other estimates


def test_linear_projector_warns_once():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    inputs, features = torch.randn(1, 10, 6), torch.randn(1, 10, 4)
    strategy = ZooPruneStrategy(ZooPruneConfig(directions=4))
    with pytest.warns(UserWarning, match="linear"):
        keep = _keep(strategy, _context(features, inputs, [3], linear))
    # Flat Ŝ: plain max-min diversity from the first token.
    order = weighted_maxmin_order(features, torch.ones(1, 10), torch.ones(1, 10, dtype=torch.bool),
                                  torch.ones(1, 10, dtype=torch.bool), torch.tensor([3]))
    assert keep[0].tolist() == sorted(_selected(order[0], 3)) and 0 in keep[0].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _keep(strategy, _context(features, inputs, [3], linear))  # no second warning


# --------------------------------------------------------------------------------------------------
# Options, cost and the models


@pytest.mark.parametrize("options, message", [
    (dict(directions=0), "directions"),
    (dict(directions=2.5), "directions"),
    (dict(step=0.0), "step"),
    (dict(step=float("nan")), "step"),
    (dict(chunk_size=1), "chunk_size"),
    (dict(flat_rtol=-1.0), "flat_rtol"),
    (dict(precision="float8"), "precision must be one of"),
    (dict(precision="bfloat16"), "precision='bfloat16' is refused"),
    (dict(site="llm", layer=2), "projector"),
])
def test_bad_options_are_refused_before_the_model_changes(options, message):
    model = tiny_llava()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        vtoken.wrap(model, "zoo_prune", **options)
    assert not vtoken.is_wrapped(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_scoring_cost_follows_how_the_projector_is_scored():
    """LLaVA's two-layer projector is scored from its structure: its first layer once over the 16 patch
    tokens and the 8 directions, and m = 8 second-layer passes (on the activation differences), rank r
    with projector_rank; then the diverse selection, each of the 4 picks against the 16 projected
    tokens (2·k·N·d); a projector of another shape gets the generic 2m full passes."""
    model = tiny_llava()
    selection = 2 * 4 * 16 * 64
    with vtoken.pruned(model, "zoo_prune", keep_tokens=4, directions=8):
        assert vtoken.schedule_of(model).scoring == (ScoringCost("projector_sensitivity", passes=8),)
        report = vtoken.flops(model, vtoken.schedule_of(model))
        # Linear(32 -> 64) once over 16 tokens and 8 directions, then 8 x Linear(64 -> 64) over 16 tokens.
        assert report.scoring == 2 * (16 + 8) * 32 * 64 + 8 * 2 * 16 * 64 * 64 + selection
    with vtoken.pruned(model, "zoo_prune", keep_tokens=4, directions=8, projector_rank=5):
        assert vtoken.flops(model, vtoken.schedule_of(model)).scoring == \
            2 * (16 + 8) * 32 * 64 + 8 * 2 * 16 * 64 * 5 + selection
    # Qwen's merger (a LayerNorm over each of the G = 4 encoder tokens of a merged row first): its first
    # layer once, and per (token, direction) pair the norm's G cross terms (2·in), per sign a
    # (G + 1)-term and a G-term sum of hidden-wide rows (8·G·hidden + 4·hidden) and the second layer
    # on the difference.
    from tiny import tiny_qwen2_vl

    from vtoken.accounting import model_dims

    qwen = tiny_qwen2_vl()
    with vtoken.pruned(qwen, "zoo_prune", directions=8):
        report = vtoken.flops(qwen, image_size=(32, 32))
    tokens, p = report.visual_tokens, model_dims(qwen.config).projector  # merge units: the merger's input rows
    assert p.norm_groups == 4
    kept = report.layer_visual_tokens[0]  # the default budget's picks
    assert report.scoring == 2 * (tokens + 8) * p.in_dim * p.hidden + 8 * tokens * (
        2 * p.hidden * p.out_dim + 2 * p.in_dim + (8 * 4 + 4) * p.hidden) + 2 * kept * tokens * p.out_dim


@pytest.mark.parametrize("name", ["llava", "next"])
def test_non_default_options_cached_generation_equals_recomputation(name):
    model = tiny_llava() if name == "llava" else tiny_llava_next()
    x = llava_inputs(3) if name == "llava" else llava_next_inputs(model)
    options = dict(keep=0.3, directions=6, step=0.05, chunk_size=7, positions="original", seed=3)
    with vtoken.pruned(model, "zoo_prune", **options):
        cached = model.generate(**x, max_new_tokens=4, do_sample=False)
        selection = vtoken.selection(model)
        uncached = greedy_without_cache(model, x, 4)
        # Query-agnostic and seeded: the recomputation's last prefill chose the same tokens.
        assert all(torch.equal(a["projector"], b["projector"]) for a, b in zip(selection, vtoken.selection(model)))
    assert torch.equal(cached, uncached)


def test_next_newlines_are_not_kept_while_patches_remain(monkeypatch):
    model = tiny_llava_next()
    x = llava_next_inputs(model)
    seen = {}
    original = ZooPruneStrategy.score

    def spy(self, ctx):
        seen["inputs"], seen["valid"] = ctx.projector_input, ctx.tokens.valid
        seen["grids"] = ctx.tokens.grids
        return original(self, ctx)

    monkeypatch.setattr(ZooPruneStrategy, "score", spy)
    with vtoken.pruned(model, "zoo_prune", keep=0.5):
        with torch.no_grad():
            model(**x)
        kept = [s["projector"] for s in vtoken.selection(model)]
    for r in range(3):
        n = int(seen["valid"][r].sum())
        in_grid = torch.cat([g.index().reshape(-1) for g in seen["grids"][r]])
        newlines = sorted(set(range(n)) - set(in_grid.tolist()))
        assert newlines, "a NeXT image has newline tokens"
        # The context gives them no projector input, and the strategy never keeps them here.
        assert torch.all(seen["inputs"][r, newlines] == 0)
        assert torch.all(seen["inputs"][r, in_grid].abs().amax(-1) > 0)
        assert not set(newlines) & set(kept[r].tolist())
        assert len(kept[r]) == round(0.5 * n)


def test_linear_projector_model_warns_once_and_still_prunes():
    model = tiny_llava()
    model.model.multi_modal_projector.act = nn.Identity()  # Linear -> Linear: an affine projector
    x = llava_inputs(3)
    with vtoken.pruned(model, "zoo_prune", keep_tokens=4):
        with pytest.warns(UserWarning, match="linear") as caught:
            with torch.no_grad():
                model(**x)
                model(**x)
        kept = [s["projector"] for s in vtoken.selection(model)]
    assert sum("zoo_prune" in str(w.message) for w in caught) == 1
    assert all(len(k) == 4 and 0 in k.tolist() for k in kept)  # flat Ŝ: the first pick is token 0


def _llava_projector(d_in=64, hidden=96, seed=0):
    from transformers import LlavaConfig

    from vtoken import compat

    torch.manual_seed(seed)
    config = LlavaConfig(vision_config={"hidden_size": d_in, "num_attention_heads": 4},
                         text_config={"hidden_size": hidden, "num_attention_heads": 4})
    return compat.llava_projector(config).eval()


def test_a_two_layer_projector_is_scored_from_its_structure_as_the_generic_passes_would():
    """W2 (σ(a + h v) - σ(a - h v)) with a = W1 x + b1, v = W1 u equals the +h / -h passes of the
    whole projector (b2 cancels), to float32 rounding; a projector that is not Linear-activation-Linear
    in that order is not taken for one."""
    from vtoken.projector_parts import two_layer_projector
    from vtoken.strategies.zoo_prune import zo_sensitivity_two_layer

    projector = _llava_projector()
    g = torch.Generator().manual_seed(1)
    x, u = torch.randn(50, 64, generator=g), random_directions(16, 64, g)
    parts = two_layer_projector(projector)
    assert parts is not None
    exact = zo_sensitivity(float32_projector(projector), x, u, step=0.01)
    # float32: both difference nearly equal values (h = 0.01), so rounding is ~1e-5 of S
    torch.testing.assert_close(zo_sensitivity_two_layer(parts, x, u, step=0.01), exact, rtol=5e-5, atol=0)
    assert two_layer_projector(torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU())) is None
    order = torch.nn.Module()  # the right children, used in another order by forward: refused by the probe
    order.linear_1, order.act, order.linear_2 = torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)
    order.forward = lambda t: order.act(order.linear_2(order.linear_1(t)))
    assert two_layer_projector(order) is None


def test_the_rank_r_proxy_is_exact_at_full_rank_and_close_at_low_rank():
    """``projector_rank`` scores with ``Σ_r V_r^T`` of W2's SVD (the official LLaVA-NeXT proxy): at full
    rank the norms are W2's, at a low rank the sensitivity stays close and the ranking mostly agrees."""
    from vtoken.projector_parts import two_layer_projector
    from vtoken.strategies.zoo_prune import zo_sensitivity_two_layer

    projector = _llava_projector()
    g = torch.Generator().manual_seed(2)
    x, u = torch.randn(80, 64, generator=g), random_directions(16, 64, g)
    exact = zo_sensitivity_two_layer(two_layer_projector(projector), x, u, step=0.01)
    full = zo_sensitivity_two_layer(two_layer_projector(projector, rank=96), x, u, step=0.01)
    torch.testing.assert_close(full, exact, rtol=1e-4, atol=0)
    low = zo_sensitivity_two_layer(two_layer_projector(projector, rank=48), x, u, step=0.01)
    assert bool((low <= exact * (1 + 1e-5)).all())  # a truncated SVD can only shorten W2 d
    top = lambda s: set(s.topk(20).indices.tolist())  # noqa: E731
    assert len(top(low) & top(exact)) >= 14


def test_projector_rank_on_a_projector_that_is_not_two_layer_is_refused():
    from tiny import llava_inputs, tiny_llava

    model = tiny_llava()
    model.model.multi_modal_projector.forward = lambda t: t @ torch.ones(t.shape[-1], 64) * 0.0  # not two-layer
    with pytest.raises(ValueError, match=r"needs a two-layer .*without projector_rank"):  # at wrap
        vtoken.wrap(model, "zoo_prune", projector_rank=8)
    model = tiny_llava()  # a projector changed after wrap: refused at the forward
    with pytest.raises(ValueError, match="projector_rank needs a two-layer"):
        with vtoken.pruned(model, "zoo_prune", projector_rank=8):
            model.model.multi_modal_projector.forward = lambda t: t @ torch.ones(t.shape[-1], 64) * 0.0
            model(**llava_inputs(2))
    with pytest.raises(ValueError, match="projector_rank must be a positive integer"):
        vtoken.wrap(tiny_llava(), "zoo_prune", projector_rank=0)


def test_half_precision_passes_run_in_float16_and_stay_close():
    """The perturbed passes in float16 (the official code's fp16 projector): both estimators differ from
    float32 (so they ran in float16: h = 0.01 differences lose mantissa bits), by less than 10% of S
    (measured 7.4%); bfloat16 would be off by up to 150% (measured here), which is why it is refused."""
    from vtoken.projector_parts import two_layer_projector
    from vtoken.strategies.zoo_prune import projector_in, zo_sensitivity_two_layer

    precision, rtol, dtype = "float16", 0.1, torch.float16
    projector = _llava_projector()
    g = torch.Generator().manual_seed(3)
    x, u = torch.randn(60, 64, generator=g), random_directions(16, 64, g)
    parts = two_layer_projector(projector)
    exact = zo_sensitivity_two_layer(parts, x, u, step=0.01)
    half = zo_sensitivity_two_layer(parts, x, u, step=0.01, dtype=dtype)
    generic = zo_sensitivity(projector_in(projector, dtype), x, u, step=0.01, dtype=dtype)
    assert half.dtype == torch.float32 and not torch.equal(half, exact)
    torch.testing.assert_close(half, exact, rtol=rtol, atol=0)
    torch.testing.assert_close(generic, exact, rtol=rtol, atol=0)
    bf16 = zo_sensitivity(projector_in(projector, torch.bfloat16), x, u, step=0.01, dtype=torch.bfloat16)
    assert float(((bf16 - exact).abs() / exact).max()) > 0.5
    model = tiny_llava()
    with vtoken.pruned(model, "zoo_prune", keep_tokens=4, precision=precision):
        with torch.no_grad():
            model(**llava_inputs(1))
        assert len(vtoken.selection(model)[0]["projector"]) == 4


def test_mixed_precision_is_float32_on_float32_weights_and_multiplies_w2_in_half_weights_dtype():
    """``precision="mixed"`` (the default): the central difference is formed in float32 and only W2's
    product runs in the projector's weight dtype. On float32 weights it is the float32 estimator bit for
    bit; on bfloat16 and float16 weights it ran in that dtype (not bit-equal to float32) and stays within
    1e-3 of the float32 sensitivity of the same weights (LLaVA-1.5-7B's projector shape measured 3.5e-5:
    eval/results/zoo_prune_speed_bf16.md), where the official float16 passes are off by over 1%."""
    from vtoken.projector_parts import two_layer_projector
    from vtoken.strategies.zoo_prune import ZooPruneConfig, zo_sensitivity_two_layer

    assert ZooPruneConfig().precision == "mixed"
    g = torch.Generator().manual_seed(5)
    x, u = torch.randn(60, 64, generator=g), random_directions(16, 64, g)
    parts = two_layer_projector(_llava_projector())
    assert parts.weight_dtype == torch.float32
    exact = zo_sensitivity_two_layer(parts, x, u, step=0.01)
    assert torch.equal(zo_sensitivity_two_layer(parts, x, u, step=0.01, matmul_dtype=parts.weight_dtype), exact)
    for half in (torch.bfloat16, torch.float16):
        parts = two_layer_projector(_llava_projector().to(half))
        assert parts.weight_dtype == half
        rows = x.to(half).float()  # the tokens as a model of that dtype hands them over
        exact = zo_sensitivity_two_layer(parts, rows, u, step=0.01)
        mixed = zo_sensitivity_two_layer(parts, rows, u, step=0.01, matmul_dtype=half)
        assert mixed.dtype == torch.float32 and not torch.equal(mixed, exact)
        torch.testing.assert_close(mixed, exact, rtol=1e-3, atol=0)
        official = zo_sensitivity_two_layer(parts, rows, u, step=0.01, dtype=torch.float16)
        assert float(((official - exact).abs() / exact).max()) > 1e-2


def test_chunk_size_none_is_chosen_by_the_inputs_device(monkeypatch):
    """``chunk_size=None`` (the default) is 1024 perturbed copies per block on a CPU and 8192 on an
    accelerator (``default_chunk_size``), as the strategy hands it to the estimator; a number given is
    used as it is."""
    from vtoken.strategies import zoo_prune
    from vtoken.strategies.zoo_prune import ZooPruneConfig, default_chunk_size

    assert ZooPruneConfig().chunk_size is None
    assert default_chunk_size(torch.device("cpu")) == 1024 and default_chunk_size(torch.device("cuda")) == 8192
    seen = []
    original = zoo_prune.zo_sensitivity_two_layer

    def spy(parts, inputs, directions, step, chunk_size, *args, **kwargs):
        seen.append(chunk_size)
        return original(parts, inputs, directions, step, chunk_size, *args, **kwargs)

    monkeypatch.setattr(zoo_prune, "zo_sensitivity_two_layer", spy)
    model = tiny_llava()
    for options in ({}, {"chunk_size": 6}):
        with vtoken.pruned(model, "zoo_prune", keep_tokens=4, **options), torch.no_grad():
            model(**llava_inputs(1))
    assert seen == [1024, 6]


def test_a_projector_cast_after_its_structure_was_read_is_read_again():
    """``model.to(torch.bfloat16)`` swaps the weights' storage without bumping their version: the cached
    structure must follow (the cast weights and their dtype), not keep the float32 ones."""
    from vtoken.projector_parts import cached_two_layer_projector

    projector = _llava_projector()
    before = cached_two_layer_projector(projector)
    assert cached_two_layer_projector(projector) is before and before.weight_dtype == torch.float32
    projector.to(torch.bfloat16)
    after = cached_two_layer_projector(projector)
    assert after is not before and after.weight_dtype == torch.bfloat16
    assert torch.equal(after.w1, projector.linear_1.weight.float())


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_a_bfloat16_model_scores_with_mixed_precision_as_float32_would(family):
    """Through the strategy on a bfloat16 model (LLaVA's projector; Qwen2-VL's merger, its norm first):
    the default's sensitivity (``vtoken.diagnostics``) is within 1e-3 of ``precision="float32"``'s and
    not bit-equal to it (W2's product ran in bfloat16)."""
    model = FAMILIES[family].make().to(torch.bfloat16)
    x = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in FAMILIES[family].inputs(model).items()}
    reported = {}
    for precision in ("mixed", "float32"):
        with vtoken.pruned(model, "zoo_prune", keep_tokens=3, directions=8, precision=precision):
            with torch.no_grad():
                model(**x)
            reported[precision] = torch.cat([v["sensitivity"] for v in vtoken.diagnostics(model).values()])
    assert reported["mixed"].abs().sum() > 0 and not torch.equal(reported["mixed"], reported["float32"])
    torch.testing.assert_close(reported["mixed"], reported["float32"], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_half_precision_model_of_every_family_is_scored_and_left_as_it_was(family):
    """A bfloat16 model: the perturbations run on float32 copies of the projector's weights, Qwen-VL's
    merging projector included (it once got float32 rows against its bfloat16 weights and failed);
    the budget is kept and the model's own parameters stay bfloat16."""
    model = FAMILIES[family].make().to(torch.bfloat16)
    x = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in FAMILIES[family].inputs(model).items()}
    with vtoken.pruned(model, "zoo_prune", keep_tokens=3, directions=8):
        with torch.no_grad():
            logits = model(**x).logits
        assert [len(s["projector"]) for s in vtoken.selection(model)] == [3] * x["input_ids"].shape[0]  # one image each
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


QWEN = ["qwen2", "qwen2_5", "qwen3"]


def _merger(family):
    """The family's merging projector as its adapter hands it to ZOO-Prune (``ctx.projector``, on
    per-LLM-token rows), and 40 merged input rows of its width."""
    from families import FAMILIES

    model = FAMILIES[family].make()
    with vtoken.pruned(model, "zoo_prune"):
        adapter = model._vtoken_state.adapter
        projector = adapter.projector_on_tokens()
        width = adapter.description.projector.unit * adapter.description.vision.width
    return projector, torch.randn(40, width, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("family", QWEN)
def test_a_merger_is_scored_from_its_structure_as_the_generic_passes_would(family):
    """Qwen-VL's mergers, N (LayerNorm / RMSNorm per encoder token) then Linear, GELU, Linear, are read
    as two layers after a row norm: W2 (σ(W1 N(x + h u) + b1) - σ(W1 N(x - h u) + b1)) equals the
    +h / -h passes of the whole merger in float64, both with W1 moved outside the norm (its LayerNorm /
    RMSNorm form read off it; any chunking) and with W1 on each perturbed copy (the path of a norm of
    another form), to float32 rounding: the first within 5e-5 (it never rounds a perturbed copy), the
    second and the generic float32 passes within 2e-4; the rank-r proxy is exact at full rank and only
    shortens W2 d below it."""
    import copy
    import dataclasses

    from vtoken.projector_parts import two_layer_projector
    from vtoken.strategies.zoo_prune import zo_sensitivity_two_layer

    projector, x = _merger(family)
    x = x * 3 + 0.5  # off-centre rows of several units: the LayerNorm's centring and scale both matter
    parts = two_layer_projector(projector)
    assert parts is not None and parts.norm is not None and parts.norm_width * 4 == x.shape[-1]
    assert parts.norm_form is not None and parts.norm_form.centred == (family != "qwen2_5")  # 2.5: RMSNorm
    u = random_directions(16, x.shape[-1], torch.Generator().manual_seed(5))
    merger64, x64 = copy.deepcopy(projector).double(), x.double()
    with torch.no_grad():
        reference = torch.stack([(merger64(x64 + 0.01 * uj) - merger64(x64 - 0.01 * uj)).norm(dim=-1) / 0.02
                                 for uj in u.double()], dim=-1).mean(-1).float()
    # Blocks of all tokens x all directions, 3 tokens x 5 directions (the last of each shorter), 1 x 2.
    for chunk in (8192, 30, 4):
        torch.testing.assert_close(zo_sensitivity_two_layer(parts, x, u, step=0.01, chunk_size=chunk), reference,
                                   rtol=5e-5, atol=0)
    per_copy = dataclasses.replace(parts, norm_form=None)
    torch.testing.assert_close(zo_sensitivity_two_layer(per_copy, x, u, step=0.01), reference, rtol=2e-4, atol=0)
    exact = zo_sensitivity(float32_projector(projector), x, u, step=0.01)
    torch.testing.assert_close(exact, reference, rtol=2e-4, atol=0)
    hidden = parts.w1.shape[0]
    full = zo_sensitivity_two_layer(two_layer_projector(projector, rank=hidden), x, u, step=0.01)
    torch.testing.assert_close(full, reference, rtol=1e-4, atol=0)
    low = zo_sensitivity_two_layer(two_layer_projector(projector, rank=hidden // 4), x, u, step=0.01)
    assert bool((low <= reference * (1 + 1e-5)).all()) and not torch.allclose(low, reference, rtol=1e-3)


def test_a_merger_whose_norm_is_used_otherwise_is_not_taken_for_one():
    """The structure is checked on a probe: a norm applied over the whole merged row (not per encoder
    token, as the leaves' widths say) is refused, so the generic passes run."""
    from vtoken.projector_parts import two_layer_projector

    projector, x = _merger("qwen2")
    merger = projector.projector
    merger.forward = lambda t: merger.mlp(merger.ln_q(t.view(-1, merger.ln_q.weight.numel())).reshape(-1, x.shape[-1]) * 2)
    assert two_layer_projector(projector) is None


@pytest.mark.parametrize("family", QWEN)
def test_a_rank_proxy_runs_on_a_merger(family):
    """projector_rank on Qwen-VL (the merger's second matrix factored): wrap accepts it, the budget is
    kept and the FLOPs line counts one first-layer pass, the norm's per-pair terms and m rank-r
    second-layer passes."""
    from families import FAMILIES

    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    rows = x["input_ids"].shape[0]
    with vtoken.pruned(model, "zoo_prune", keep_tokens=3, directions=8, projector_rank=8):
        with torch.no_grad():
            model(**x)
        assert [len(s["projector"]) for s in vtoken.selection(model)] == [3] * rows
        assert vtoken.schedule_of(model, visual_tokens=16).scoring == (
            ScoringCost("projector_sensitivity", passes=8, rows=8),)
        report = vtoken.flops(model, image_size=(32, 32))
        from vtoken.accounting import model_dims

        p, tokens = model_dims(model.config).projector, report.visual_tokens
        assert report.scoring == 2 * (tokens + 8) * p.in_dim * p.hidden + 8 * tokens * (
            2 * p.hidden * 8 + 2 * p.in_dim + (8 * 4 + 4) * p.hidden) + 2 * 3 * tokens * p.out_dim
