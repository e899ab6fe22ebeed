"""VFlowOpt: each formula on hand-made tensors (entropy, context set, relevance, importance, recycling,
Eq. 5 budgets), then end to end on the tiny LLaVA and LLaVA-NeXT: the map computed beside SDPA
equals the one from eager attention weights, it is made once per prefill and never leaks, budgets
are exact, newlines are kept, cached generation equals recomputation, bad options fail at wrap."""

import dataclasses
import math

import pytest
import torch

import vtoken
from vtoken.adapters.llava import LlavaAdapter
from vtoken.context import Grid, VisionAttention
from vtoken.kernels import received_attention
from vtoken.registry import register
from vtoken.strategies.vflowopt import (
    CLIP_MEAN,
    CLIP_STD,
    VFlowOptConfig,
    VFlowOptStrategy,
    context_relevance,
    context_set,
    denormalize,
    gray_levels,
    grid_cells,
    importance_map,
    paper_llm_layers,
    patch_entropy,
    recycle,
    stage_budgets,
)
from tiny import greedy_without_cache, llava_inputs, llava_next_inputs, tiny_llava, tiny_llava_next


# --- formulas on hand-made tensors ----------------------------------------------------------------
def test_entropy_of_constant_uniform_and_two_level_patches():
    constant = torch.full((16, 16), 77)
    uniform = torch.arange(256).view(16, 16)  # every gray level exactly once
    two = torch.tensor([10, 200]).repeat(128).view(16, 16)
    levels = torch.stack([constant, uniform, two]).flatten(-2)
    assert patch_entropy(levels).tolist() == [0.0, 8.0, 1.0]


def test_gray_levels_average_channels_of_denormalised_pixels():
    # Build normalised pixels from known 0..255 values, so de-normalising must give them back.
    rgb = torch.tensor([[30.0, 60.0, 90.0], [0.0, 0.0, 255.0]])  # two pixels
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    normalised = (rgb / 255.0 - mean) / std  # [2, 3]
    pixels = normalised.T.reshape(3, 1, 2)  # [channels, p=1, 2]... as a 1 x 2 patch
    back = denormalize(pixels, CLIP_MEAN, CLIP_STD)
    assert torch.allclose(back, rgb.T.reshape(3, 1, 2), atol=1e-3)
    assert gray_levels(back).tolist() == [60, 85]


def test_context_set_is_the_threshold_on_received_attention():
    received = torch.tensor([[0.1, 0.5, 0.2, 0.1, 0.1]])  # mean 0.2
    assert context_set(received, 2.0).tolist() == [[False, True, False, False, False]]  # > 0.4
    assert context_set(received, 0.9).tolist() == [[False, True, True, False, False]]  # > 0.18
    # Nothing above 3 x mean: the most-attended token stands in.
    assert context_set(received, 3.0).tolist() == [[False, True, False, False, False]]


def _attention_from(matrix: torch.Tensor) -> VisionAttention:
    """A VisionAttention over hand-made head-averaged maps ``[C, P, P]``."""

    def rows(index):
        picked = matrix[torch.arange(matrix.shape[0])[:, None], index.clamp(min=0)]
        return picked * (index >= 0)[..., None]

    crops, patches = matrix.shape[:2]
    return VisionAttention(rows=rows, keys=torch.zeros(crops, patches, 1), cls=None,
                           column_mass=lambda: matrix.mean(dim=1))


def test_context_relevance_is_the_mean_or_sum_of_the_context_rows():
    a = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1],
         [0.6, 0.2, 0.1, 0.1],
         [0.1, 0.1, 0.4, 0.4],
         [0.5, 0.1, 0.3, 0.1]]
    )[None]
    # received = column means [0.475, 0.125, 0.225, 0.175], mean 0.25: K = {0} at t = 1.5, {0, 2} at t = 0.8.
    assert torch.allclose(context_relevance(_attention_from(a), 1.5), a[0, 0][None])
    assert torch.allclose(context_relevance(_attention_from(a), 0.8), ((a[0, 0] + a[0, 2]) / 2)[None])
    assert torch.allclose(context_relevance(_attention_from(a), 0.8, "sum"), (a[0, 0] + a[0, 2])[None])


def test_importance_adds_the_softmax_of_entropy():
    relevance = torch.tensor([[0.1, 0.2, 0.3]])
    entropy = torch.tensor([[0.0, 1.0, 2.0]])
    soft = torch.exp(entropy) / torch.exp(entropy).sum()
    assert torch.allclose(importance_map(relevance, entropy, 0.5), relevance + 0.5 * soft)
    assert torch.equal(importance_map(relevance, entropy, 0.0), relevance)


def test_grid_cells_of_a_grid_with_separators():
    # NeXT-like: a 2 x 3 grid whose rows are followed by a separator, a = 2: cells (0,0) and (0,1).
    cells = grid_cells((Grid(0, 2, 3, 4),), 8, 2.0)
    assert cells.tolist() == [0, 0, 1, -1, 0, 0, 1, -1]
    # Two grids are numbered apart; a fractional a cuts at floor(col / a): columns 0 1 | 0 1 2 -> 0 0 | 0 0 1.
    cells = grid_cells((Grid(0, 1, 2, 2), Grid(2, 1, 3, 3)), 5, 1.5)
    assert cells.tolist() == [0, 0, 1, 1, 2]


def test_recycling_writes_the_weighted_mean_into_each_cells_best_dropped_slot():
    # 4 x 4 grid, a = 2: cells {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}.
    importance = torch.tensor([16, 1, 2, 3, 4, 15, 5, 6, 7, 8, 14, 9, 10, 11, 12, 13], dtype=torch.float)
    features = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    cells = grid_cells((Grid(0, 4, 4, 4),), 16, 2.0)
    keep, merged = recycle(features, importance, cells, budget=5)
    # Keeping only token 0 leaves a dropped token in all 4 cells: 1 + 4 = 5 (keeping 0 and 5 would give 6).
    # Hosts: the best dropped token of each cell: 5 (15), 7 (6), 13 (11), 10 (14).
    assert keep.tolist() == [0, 5, 7, 10, 13]

    def mean(members):
        w = importance[members]
        return (w[:, None] * features[members]).sum(0) / w.sum()

    expected = torch.stack([
        features[0],
        mean([1, 4, 5]),
        mean([2, 3, 6, 7]),
        mean([10, 11, 14, 15]),
        mean([8, 9, 12, 13]),
    ])
    assert torch.allclose(merged, expected, atol=1e-6)


def test_recycling_meets_every_budget_and_skips_separators():
    g = torch.Generator().manual_seed(1)
    cells = grid_cells((Grid(0, 3, 3, 4),), 12, 2.0)  # 3 separators (-1)
    for budget in range(1, 13):
        for a in (1.0, 2.0, 5.0):
            importance = torch.rand(12, generator=g)
            keep, merged = recycle(torch.randn(12, 2, generator=g), importance, grid_cells((Grid(0, 3, 3, 4),), 12, a), budget)
            assert keep.numel() == budget == merged.shape[0] and len(set(keep.tolist())) == budget
    # Separators are never recycled: a dropped separator is simply gone.
    importance = torch.tensor([9.0, 8, 7, 0.1, 6, 5, 4, 0.2, 3, 2, 1, 0.3])
    features = torch.arange(12.0)[:, None]
    keep, merged = recycle(features, importance, cells, budget=3)
    # k = 1 (token 0) leaves dropped tokens in cells (0,0), (0,1), (1,0), (1,1): 5 > 3; k = 0 gives 4 cells,
    # more than 3: every token is dropped and the three best-ranked cells survive.
    assert keep.numel() == 3 and not set(keep.tolist()) & {3, 7, 11}
    assert torch.allclose(merged[0], (9 * features[0] + 8 * features[1] + 6 * features[4] + 5 * features[5]) / 28)


def test_recycling_with_negative_importance_stays_a_convex_combination():
    importance = torch.tensor([1.0, -0.5, -0.2, -0.1])
    features = torch.tensor([[0.0], [10.0], [20.0], [30.0]])
    keep, merged = recycle(features, importance, torch.zeros(4, dtype=torch.long), budget=2)
    assert keep.tolist() == [0, 3]
    assert merged[1].item() == pytest.approx(20.0)  # no positive weight: the plain mean of 10, 20, 30


def test_eq5_fractions_reproduce_the_released_configs():
    # LLaVA-OneVision-7B (28 layers; stages before layers 9 and 18): released (R1, R2, R3) per budget.
    assert paper_llm_layers(28) == [9, 18] and paper_llm_layers(32) == [10, 20]
    for budget, (r1, r2, r3) in {0.1: (0.1166, 1.0, 0.6011), 0.25: (0.2651, 0.9833, 0.8773),
                                 0.5: (0.7233, 0.7487, 0.487)}.items():
        k1, k2, k3 = stage_budgets(28, [9, 18], r1 / budget, r2, keep=budget)
        assert k1 == pytest.approx(r1) and k2 == pytest.approx(r1 * r2)
        assert k3 / k2 == pytest.approx(r3, abs=0.01)  # the released R3s are rounded
        assert (9 * k1 + 9 * k2 + 10 * k3) / 28 == pytest.approx(budget, abs=1e-12)


def test_eq5_counts_meet_the_layer_averaged_budget():
    for depth, budget in ((32, 64), (32, 128), (32, 192), (28, 73), (4, 5)):
        layers = paper_llm_layers(depth)
        n1, n2, n3 = stage_budgets(depth, layers, 1.0604, 0.9833, keep_tokens=budget)
        spans = [layers[0], layers[1] - layers[0], depth - layers[1]]
        assert budget <= n1 and n3 <= n2 <= n1 and n3 >= 1
        assert spans[0] * n1 + spans[1] * n2 + spans[2] * n3 == budget * depth
    # r2 is clamped so the budget is still met: stage 2 cannot keep less than the budget allows.
    k1, k2, k3 = stage_budgets(32, [10, 20], 1.0, 0.1, keep=0.25)
    assert k1 == k2 == k3 == 0.25
    assert stage_budgets(32, [], 1.3, 0.5, keep_tokens=64) == [64]


def test_received_attention_in_chunks_equals_the_dense_map():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    dense = torch.softmax(q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3, dim=-1)  # [2, 4, 9, 11]
    for chunk in (1, 4, None):
        out = received_attention(q, k, 0.3, chunk=chunk)
        assert torch.allclose(out, dense.mean(1).sum(1), atol=1e-5)


# --- end to end ------------------------------------------------------------------------------------
@dataclasses.dataclass
class _ProbeConfig(VFlowOptConfig):
    method = "_test_vflowopt_probe"


@register
class _Probe(VFlowOptStrategy):
    """Test-only VFlowOpt that records its map, its scores and how often the map is made."""

    name = "_test_vflowopt_probe"
    Config = _ProbeConfig
    log: list = []

    def crop_importance(self, ctx):
        made = []
        inner = ctx.vision_attention

        def counted(layer):
            made.append(layer)
            return inner(layer)

        ctx.vision_attention = counted
        out = super().crop_importance(ctx)
        type(self).log.append({"stage": ctx.stage.name, "made": len(made), "importance": out.clone(),
                               "state": id(ctx.state)})
        return out

    def score(self, ctx):
        scores = super().score(ctx)
        type(self).log[-1]["scores"] = scores.clone()
        type(self).log[-1]["valid"] = ctx.tokens.valid.clone()
        return scores


def _reference_importance(model, pixel_values, layer, t, alpha):
    """The map from the eager model's attention weights and the raw pixels (formulas written out)."""
    with torch.no_grad():
        attn = model.model.vision_tower(pixel_values, output_attentions=True).attentions[layer]
    a = attn.float().mean(1)[:, 1:, 1:]  # CLS out of rows and columns
    received = a.mean(1)
    out = []
    size = model.config.vision_config.patch_size
    pixels = (pixel_values * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]) * 255
    gray = pixels.mean(1).round().clamp(0, 255).long()  # [C, H, W]
    for c in range(a.shape[0]):
        context = received[c] > t * received[c].mean()
        relevance = a[c][context].mean(0)
        entropy = []
        side = gray.shape[-1] // size
        for i in range(side):
            for j in range(side):
                counts = torch.bincount(gray[c, i * size:(i + 1) * size, j * size:(j + 1) * size].reshape(-1), minlength=256)
                p = counts[counts > 0].double() / counts.sum()
                entropy.append(float(-(p * torch.log2(p)).sum()))
        out.append(relevance + alpha * torch.softmax(torch.tensor(entropy), 0).float())
    return torch.stack(out)


@pytest.mark.parametrize("name", ["llava", "next"])
def test_map_beside_sdpa_equals_the_eager_attention_map(name):
    make = tiny_llava if name == "llava" else tiny_llava_next
    x = llava_inputs(3) if name == "llava" else llava_next_inputs(make())
    pixels = x["pixel_values"]
    if name == "next":  # the crops the encoder sees, image after image
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = make().config
        crops = [image_size_to_num_patches(s.tolist(), config.image_grid_pinpoints, 32) for s in x["image_sizes"]]
        pixels = torch.cat([p[:n] for p, n in zip(pixels, crops)])
    options = dict(keep=0.25, t=1.0, alpha=0.5, a=2.0)
    maps, selections = [], []
    for attn in ("sdpa", "eager"):
        model = make(attn)
        _Probe.log = []
        with vtoken.pruned(model, "_test_vflowopt_probe", **options):
            with torch.no_grad():
                model(**x)
            selections.append(vtoken.selection(model))
        maps.append(_Probe.log[0]["importance"])
    reference = _reference_importance(make("eager"), pixels, 2, 1.0, 0.5)
    assert torch.allclose(maps[0], reference, atol=1e-6)
    assert torch.allclose(maps[1], reference, atol=1e-6)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*selections) for k in a)


def test_the_map_is_made_once_per_prefill_and_never_leaks():
    model = tiny_llava()
    x1, x2 = llava_inputs(3, seed=1), llava_inputs(3, seed=2)
    with vtoken.pruned(model, "_test_vflowopt_probe", keep=0.3, t=1.0):
        _Probe.log = []
        with torch.no_grad():
            model(**x1)
        first = list(_Probe.log)
        with torch.no_grad():
            model(**x2)
        second_in_same_wrap = vtoken.selection(model)
        second_log = _Probe.log[len(first):]
    assert [e["stage"] for e in first] == ["projector", "llm:1", "llm:2"]
    assert [e["made"] for e in first] == [1, 0, 0]  # stages 2 and 3 reuse stage 1's map
    assert len({e["state"] for e in first}) == 1
    assert [e["made"] for e in second_log] == [1, 0, 0]  # a new prefill starts from an empty state
    assert not torch.equal(first[0]["importance"], second_log[0]["importance"])
    with vtoken.pruned(model, "vflowopt", keep=0.3, t=1.0):
        with torch.no_grad():
            model(**x2)
        fresh = vtoken.selection(model)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(second_in_same_wrap, fresh) for k in a)


def test_keep_tokens_is_the_layer_averaged_count():
    model = tiny_llava()  # 4 LLM layers: stages before layers 1 and 2
    x = llava_inputs(3)
    for budget in (3, 5, 8):
        with vtoken.pruned(model, "vflowopt", keep_tokens=budget, stage1=1.5, r2=0.8):
            with torch.no_grad():
                model(**x)
            for sample in vtoken.selection(model):
                n1, n2, n3 = (len(sample[k]) for k in ("projector", "llm:1", "llm:2"))
                assert (1 * n1 + 1 * n2 + 2 * n3) == 4 * budget and n1 >= n2 >= n3
                assert set(sample["llm:2"].tolist()) <= set(sample["llm:1"].tolist()) <= set(sample["projector"].tolist())
            assert abs(n1 - 1.5 * budget) <= 1


def test_keep_fraction_on_next_meets_eq5_per_image():
    model = tiny_llava_next()
    x = llava_next_inputs(model)
    _Probe.log = []
    with vtoken.pruned(model, "_test_vflowopt_probe", keep=0.3):
        with torch.no_grad():
            model(**x)
        selection = vtoken.selection(model)
    counts = x["input_ids"].eq(model.config.image_token_id).sum(-1).tolist()
    for sample, n in zip(selection, counts):
        average = (len(sample["projector"]) + len(sample["llm:1"]) + 2 * len(sample["llm:2"])) / 4
        assert abs(average - 0.3 * n) <= 0.5
    # Newlines (no patch behind them) score newline_importance = 1.0 and all survive stage 1.
    scores, valid = _Probe.log[0]["scores"], _Probe.log[0]["valid"]
    for r, sample in enumerate(selection):
        ones = ((scores[r] == 1.0) & valid[r]).nonzero().squeeze(-1)
        assert len(ones) > 0 and set(ones.tolist()) <= set(sample["projector"].tolist())
        patches = scores[r][valid[r] & (scores[r] != 1.0)]
        assert bool((patches < 1.0).all()) and bool((patches >= 0).all())


@pytest.mark.parametrize("name", ["llava", "next"])
def test_generate_with_cache_equals_recomputation_with_options(name):
    model = tiny_llava() if name == "llava" else tiny_llava_next()
    x = llava_inputs(3) if name == "llava" else llava_next_inputs(model)
    options = dict(keep=0.35, t=1.0, alpha=0.7, a=2.0, relevance="sum", stage1=1.3, r2=0.7)
    with vtoken.pruned(model, "vflowopt", **options):
        cached = model.generate(**x, max_new_tokens=5, do_sample=False)
        uncached = greedy_without_cache(model, x, 5)
        selection = vtoken.selection(model)
    assert torch.equal(uncached, cached)
    assert all(len(s["llm:2"]) < len(s["projector"]) for s in selection)  # really progressive


def test_recycle_false_is_plain_top_k_and_differs_from_recycling():
    model = tiny_llava()
    x = llava_inputs(3)
    logits = {}
    for recycle_on in (True, False):
        with vtoken.pruned(model, "vflowopt", keep=0.25, t=1.0, a=2.0, recycle=recycle_on, llm_layers=[]):
            with torch.no_grad():
                logits[recycle_on] = model(**x).logits[:, -1]
            kept = [len(s["projector"]) for s in vtoken.selection(model)]
        assert kept == [4, 4, 4]  # llm_layers=[]: one stage that keeps the budget
    assert not torch.allclose(logits[True], logits[False])


def test_scoring_cost_and_schedule():
    model = tiny_llava()
    with vtoken.pruned(model, "vflowopt", keep=0.25):
        schedule = vtoken.schedule_of(model)
        report = vtoken.flops(model, schedule=schedule)
    assert [(c.kind, c.layer) for c in schedule.scoring] == [("vision_attention_map", 2)]
    n, p, d, h = 17, 16, 32, 4  # CLS + 16 patches, vision width, heads
    # q and k of every token, the 16 patch queries' scores and their column sums per head, one
    # context row (the fewest a crop takes)
    assert report.scoring == 4 * n * d * d + 2 * p * n * d + 2 * h * p * n + 2 * 1 * n * d
    assert [s.layer for s in schedule.stages] == [None, 1, 2]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(stage1=0.9), "stage1 must be >= 1"),
        (dict(r2=1.2), "r2"),
        (dict(a=0), "cell side"),
        (dict(site="llm", layer=2), "site='projector'"),
        (dict(relevance="max"), "relevance"),
        (dict(llm_layers=[3, 1]), "llm_layers"),
        (dict(image_std=[0.2, 0.0, 0.2]), "image_std"),
        (dict(llm_layers=[1, 5]), "does not fit"),
        (dict(vision_layer=9), "vision_layer=9"),
        (dict(stage1=3.9, llm_layers=[2, 3]), "stage1 must be <"),
    ],
)
def test_bad_options_fail_at_wrap_and_leave_the_model_untouched(options, message):
    model = tiny_llava()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        vtoken.wrap(model, "vflowopt", **options)
    assert not vtoken.is_wrapped(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not LlavaAdapter(model).vision_layers()[2].self_attn._forward_pre_hooks


def test_config_round_trips_through_json(tmp_path):
    model = tiny_llava()
    with vtoken.pruned(model, "vflowopt", keep_tokens=5, t=3.5, alpha=0.25, llm_layers=[2], image_mean=[0.5] * 3):
        vtoken.save_config(model, tmp_path)
        config = vtoken.config_of(model)
    loaded = vtoken.load(tmp_path)
    assert loaded == config and loaded.llm_layers == [2]
    with vtoken.pruned(model, config=tmp_path):
        assert [s.name for s in vtoken.strategy_of(model).stages()] == ["projector", "llm:2"]
    assert math.isclose(VFlowOptConfig().stage1 * 0.25, 0.2651)


def test_schedule_options_are_refused_beside_stages():
    """llm_layers, stage1 and r2 shape the default schedule; with stages=[...] they would be silently
    ignored, so they are an error naming both fixes."""
    import pytest as _pytest

    from vtoken.registry import get_strategy as strategy_class

    cls = strategy_class("vflowopt")
    stages = [{"site": "projector", "keep": 0.5}]
    for extra in ({"llm_layers": [2]}, {"stage1": 1.2}, {"r2": 0.5}):
        with _pytest.raises(ValueError, match=f"{next(iter(extra))}.*drop .* or drop stages="):
            cls.Config(stages=stages, **extra)
    cls.Config(stages=stages)  # alone: fine


def test_default_vision_layer_follows_the_layer_the_projector_reads():
    from tiny import tiny_llava

    for feature_layer, expected in ((-2, 2), (-1, 3), (2, 1)):
        model = tiny_llava()
        model.config.vision_feature_layer = feature_layer
        model.model.config.vision_feature_layer = feature_layer
        with vtoken.pruned(model, "vflowopt", keep=0.5):
            assert vtoken.strategy_of(model).vision_layer == expected
