"""TransPrune: each formula on hand-made tensors with answers known by construction, the
depth-relative schedule (the paper's layers for 32 layers exactly), the whole score against a
recomputation from the unwrapped eager model, and generate() with a KV cache on left-padded batches
of LLaVA and LLaVA-NeXT with the default and the non-default options."""

import math

import pytest
import torch
import torch.nn.functional as F

import vtoken
from vtoken.accounting import flops
from vtoken.config import StageSpec
from vtoken.context import ScoreContext, TokenRows
from vtoken.schedule import Schedule, Stage
from vtoken.strategies.transprune import (
    TransPruneConfig,
    TransPruneStrategy,
    combined_score,
    direction_change,
    instruction_guided_attention,
    l1_normalise,
    layer_transition_variation,
    magnitude_change,
    paper_prune_layers,
    transition_variation,
)
from tiny import IMAGE_TOKEN, greedy_without_cache, llava_inputs, llava_next_inputs, tiny_llava, tiny_llava_next
from families import FAMILIES

LLAVA = "llava-hf/llava-1.5-7b-hf"
E1, E2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])


# --- formulas on hand-made tensors ---------------------------------------------------------------
def test_direction_term_is_zero_aligned_one_at_right_angle_and_depends_on_the_option_when_reversed():
    x_in = torch.stack([E1, E1, E1, E1])
    x_out = torch.stack([3 * E1, 2 * E2, -E1, E1 + E2])
    signed = direction_change(x_in, x_out, "signed")
    absolute = direction_change(x_in, x_out, "abs")
    assert torch.allclose(signed, torch.tensor([0.0, 1.0, 2.0, 1 - math.sqrt(0.5)]), atol=1e-6)
    assert torch.allclose(absolute, torch.tensor([0.0, 1.0, 0.0, 1 - math.sqrt(0.5)]), atol=1e-6)
    assert torch.allclose(magnitude_change(x_in, x_out), torch.tensor([3.0, 2.0, 1.0, math.sqrt(2)]))


@pytest.mark.parametrize("direction", ["signed", "abs"])
def test_ttv_is_softmax_of_the_direction_term_times_the_magnitude(direction):
    # Token 0: the sub-module adds nothing (its representation does not change) -> TTV 0.
    # Token 1: turned by 90 degrees, doubled. Token 2: reversed, tripled.
    x_in = torch.stack([E1, E1, E1])[None]
    x_out = torch.stack([torch.zeros(3), 2 * E2, -3 * E1])[None]
    valid = torch.ones(1, 3, dtype=torch.bool)
    ttv = transition_variation(x_in, x_out, valid, direction)
    turn = torch.tensor([1.0, 1.0, 2.0 if direction == "signed" else 0.0])  # a zero vector has cos 0
    weights = torch.exp(turn) / torch.exp(turn).sum()
    assert ttv[0, 0] == 0
    assert torch.allclose(ttv[0], weights * torch.tensor([0.0, 2.0, 3.0]))


def test_layer_ttv_sums_attention_and_mlp_and_is_zero_for_an_untouched_token():
    g = torch.Generator().manual_seed(0)
    a_in, a_out, m_in, m_out = (torch.randn(1, 4, 8, generator=g) for _ in range(4))
    a_out[0, 2] = 0
    m_out[0, 2] = 0  # neither branch changes token 2
    valid = torch.ones(1, 4, dtype=torch.bool)
    io = {"attention": (a_in, a_out), "mlp": (m_in, m_out), "block": (a_in, a_in)}
    ttv = layer_transition_variation(io, valid)
    expected = transition_variation(a_in, a_out, valid) + transition_variation(m_in, m_out, valid)
    assert torch.allclose(ttv, expected) and ttv[0, 2] == 0 and (ttv[0, [0, 1, 3]] > 0).all()


def test_ttv_softmax_is_per_sample_over_valid_tokens_only():
    g = torch.Generator().manual_seed(1)
    x_in, x_out = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])  # sample 0 left-padded
    batch = transition_variation(x_in, x_out, valid)
    alone = transition_variation(x_in[:1, 2:], x_out[:1, 2:], torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(batch[0, 2:], alone[0]) and torch.all(batch[0, :2] == 0)
    other = x_out.clone()
    other[1] *= -7  # another sample's values never move this sample's softmax
    assert torch.equal(transition_variation(x_in, other, valid)[0], batch[0])


def test_iga_is_the_mean_over_heads_and_present_instruction_rows():
    # Two instruction rows (a third one is absent: zeros), two heads, four visual tokens.
    head0 = torch.tensor([[0.1, 0.1, 0.6, 0.2], [0.0, 0.2, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0]])
    head1 = torch.tensor([[0.3, 0.1, 0.4, 0.2], [0.2, 0.0, 0.6, 0.2], [0.0, 0.0, 0.0, 0.0]])
    probs = torch.stack([head0, head1])[None]  # [R=1, H=2, Q=3, N=4]
    iga = instruction_guided_attention(probs)
    expected = (head0[0] + head0[1] + head1[0] + head1[1]) / 4  # not / 6: row 3 is absent
    assert torch.allclose(iga[0], expected)
    assert int(iga[0].argmax()) == 2  # the token the instruction attends to


def test_combined_score_weighs_l1_normalised_terms_by_alpha():
    valid = torch.tensor([[True, True, True, False]])
    ttv = torch.tensor([[900.0, 50.0, 50.0, 7.0]])  # prefers token 0 (scale does not matter)
    iga = torch.tensor([[0.1, 0.7, 0.2, 9.0]])  # prefers token 1
    assert int(combined_score(ttv, iga, valid, alpha=1.0).argmax()) == 0
    assert int(combined_score(ttv, iga, valid, alpha=0.0).argmax()) == 1
    half = combined_score(ttv, iga, valid, alpha=0.5)
    assert torch.allclose(half, 0.5 * l1_normalise(ttv, valid) + 0.5 * l1_normalise(iga, valid))
    assert torch.allclose(half, combined_score(ttv * 1e-3, iga * 5, valid, alpha=0.5), atol=1e-6)
    assert half[0, 3] == 0 and torch.allclose(l1_normalise(ttv, valid).sum(), torch.tensor(1.0), atol=1e-6)
    assert torch.equal(combined_score(ttv, None, valid), l1_normalise(ttv, valid))


def _ctx(stage_layer, observed, attention, n=4):
    valid = torch.ones(1, n, dtype=torch.bool)
    rows = TokenRows(torch.zeros(1, n, 2), valid, torch.tensor([2]), torch.zeros(1, dtype=torch.long), [None])
    return ScoreContext(StageSpec("llm", stage_layer, keep_tokens=2), rows, torch.Generator(),
                        attention=attention, observed=observed)


def test_score_accumulates_only_the_accumulation_layers_before_the_stage():
    asked = []

    def observed(layer):
        asked.append(layer)
        return torch.full((1, 4, 1), 0.0).index_fill(1, torch.tensor([layer % 4]), 1.0)

    def attention(query, layer):
        assert (query, layer) == ("instruction", "current")  # layer K's queries and keys, as the code
        return torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(1, 2, 3, 4)

    strategy = TransPruneStrategy(TransPruneConfig())
    strategy.bind({"llm": 32})
    assert strategy.accumulate_layers == (6, 7, 8, 9, 10, 11)
    score = strategy.score(_ctx(9, observed, attention))
    assert sorted(asked) == [6, 7, 8]  # accumulation layers < 9 only
    # TTV: tokens 2, 3, 0 once each (layers 6, 7, 8); IGA: token 3 only.
    assert torch.allclose(score[0], torch.tensor([1 / 6, 0.0, 1 / 6, 1 / 6 + 0.5]), atol=1e-6)


def test_ttv_only_never_asks_for_attention():
    strategy = TransPruneStrategy(TransPruneConfig(ttv_only=True))
    strategy.bind({"llm": 4})
    score = strategy.score(_ctx(1, lambda layer: torch.arange(4.0).view(1, 4, 1), attention=None))
    assert int(score.argmax()) == 3
    assert all(strategy.scoring_cost(s) == [] for s in strategy.stages())
    assert TransPruneStrategy(TransPruneConfig(alpha=1.0)).scoring_cost(StageSpec("llm", 7, keep=0.5)) == []


# --- the schedule --------------------------------------------------------------------------------
def test_paper_schedule_for_32_layers_and_its_published_tflops():
    strategy = TransPruneStrategy(TransPruneConfig())
    strategy.bind({"vision": 24, "llm": 32})
    stages = strategy.stages()
    assert [(s.layer, s.keep) for s in stages] == [(7, 0.875), (9, 0.625), (12, 0.125)]
    assert strategy.accumulate_layers == tuple(range(6, 12))  # the paper's 1-based layers 7-12
    assert [s.budget(576) for s in stages] == [504, 360, 72]
    schedule = Schedule(tuple(Stage("llm", s.budget(576), s.layer) for s in stages))
    assert round(flops(LLAVA, schedule, convention="paper").prefill / 1e12, 2) == 1.56  # TransPrune-High
    costs = [c for s in stages for c in strategy.scoring_cost(s)]
    assert [(c.kind, c.layer) for c in costs] == [("llm_attention_rows", k) for k in (7, 9, 12)]


@pytest.mark.parametrize("depth", range(2, 81))
def test_depth_relative_layers_are_valid_at_every_depth(depth):
    layers = paper_prune_layers(depth)
    assert len(layers) == min(3, depth - 1)
    assert layers[0] >= 1 and layers[-1] <= depth - 1
    assert all(b > a for a, b in zip(layers, layers[1:]))
    if depth % 32 == 0:
        assert layers == tuple(k * depth // 32 for k in (7, 9, 12))


def test_small_depths_and_the_tiny_model():
    assert paper_prune_layers(4) == (1, 2, 3)
    assert [(s.layer, s.keep) for s in TransPruneConfig().resolved_stages(3)] == [(1, 0.625), (2, 0.125)]
    assert [(s.layer, s.keep) for s in TransPruneConfig().resolved_stages(2)] == [(1, 0.125)]
    with pytest.raises(ValueError, match="at least 2 decoder layers"):
        TransPruneConfig().resolved_stages(1)


def test_budget_options_set_the_last_stage():
    assert [s.keep for s in TransPruneConfig(keep=0.4).resolved_stages(4)] == [0.875, 0.625, 0.4]
    assert [s.keep for s in TransPruneConfig(keep=0.7).resolved_stages(4)] == [0.875, 0.7]  # 0.7 twice = once
    assert [(s.layer, s.keep) for s in TransPruneConfig(keep=1.0).resolved_stages(4)] == [(1, 1.0)]
    last = TransPruneConfig(keep_tokens=64).resolved_stages()[-1]
    assert (last.layer, last.keep_tokens) == (12, 64)
    # A count above an earlier stage's default share: that stage keeps the count instead (as keep
    # takes max(ratio, keep)); below it, the default share; never more than the image has.
    early = TransPruneConfig(keep_tokens=400).resolved_stages()[:-1]
    assert [s.budget(576) for s in early] == [504, 400] and [s.budget(100) for s in early] == [100, 100]
    assert [s.budget(576) for s in TransPruneConfig(keep_tokens=64).resolved_stages()] == [504, 360, 64]
    custom = TransPruneConfig(prune_layers=[2, 5], keep_ratios=[0.5, 0.25], accumulate_layers=[0, 1, 3])
    assert [(s.layer, s.keep) for s in custom.resolved_stages()] == [(2, 0.5), (5, 0.25)]
    assert custom.accumulation(custom.resolved_stages()) == (0, 1, 3)


def test_a_count_above_an_earlier_stages_share_runs_and_keeps_it():
    """16 visual tokens, 4 layers: stages keep 14 and 10 by default; keep_tokens=11 keeps 11 at the
    middle stage instead of failing at the last one (11 of 10)."""
    model = tiny_llava()
    with vtoken.pruned(model, "transprune", keep_tokens=11), torch.no_grad():
        model(**llava_inputs(1))
        kept = {stage: len(tokens) for stage, tokens in vtoken.selection(model)[0].items()}
    assert kept == {"llm:1": 14, "llm:2": 11, "llm:3": 11}


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(site="projector"), "inside the LLM"),
        (dict(direction="cos"), "direction"),
        (dict(alpha=1.5), "alpha"),
        (dict(ttv_only=True, alpha=0.0), "ttv_only"),
        (dict(prune_layers=[5, 3]), "ascending"),
        (dict(keep_ratios=[0.5, 0.7, 0.1]), "increase"),
        (dict(prune_layers=[3, 5], keep_ratios=[0.5]), "one keep ratio per pruning layer"),
        (dict(prune_layers=[2, 3, 4, 5]), "keep_ratios="),
        (dict(prune_layers=[3], stages=[{"site": "llm", "layer": 3, "keep": 0.5}]), "either stages="),
        (dict(layer=0), "no TTV accumulation layer"),
        (dict(prune_layers=[3, 5], keep_ratios=[0.5, 0.2], accumulate_layers=[4]), "no TTV accumulation layer"),
        (dict(stages=[{"site": "projector", "keep": 0.5}]), "inside the LLM"),
    ],
)
def test_bad_options_are_refused_with_the_fix(options, match):
    with pytest.raises(ValueError, match=match):
        TransPruneConfig(**options)


def test_errors_at_wrap_leave_the_model_untouched():
    model = tiny_llava()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for options in (dict(accumulate_layers=[0, 7]), dict(prune_layers=[1, 5], keep_ratios=[0.5, 0.2])):
        with pytest.raises(ValueError, match="layer"):
            vtoken.wrap(model, "transprune", **options)
        assert not vtoken.is_wrapped(model)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert TransPruneConfig(alpha=0.0, layer=0).resolved_stages()[0].layer == 0  # IGA alone needs no TTV


# --- against the unwrapped model -----------------------------------------------------------------
def _manual_selection(x, keep, direction="signed", use_iga=True):
    """The stage at LLM layer 1 recomputed from the unwrapped eager model: TTV of layer 0's attention
    and MLP (softmax over each sample's real tokens), IGA from layer 1's eager attention weights."""
    model = tiny_llava("eager")
    layer0 = model.model.language_model.layers[0]
    captured = {}

    def grab(name):
        def hook(module, args, kwargs, output):
            inp = args[0] if args else kwargs["hidden_states"]
            captured[name] = (inp, output[0] if isinstance(output, tuple) else output)
        return hook

    handles = [layer0.self_attn.register_forward_hook(grab("attn"), with_kwargs=True),
               layer0.mlp.register_forward_hook(grab("mlp"), with_kwargs=True)]
    with torch.no_grad():
        out = model(**x, output_attentions=True)
    for h in handles:
        h.remove()
    chosen = []
    for b in range(x["input_ids"].shape[0]):
        real = x["attention_mask"][b].bool()
        visual = torch.nonzero(x["input_ids"][b] == IMAGE_TOKEN).squeeze(-1)
        ttv = torch.zeros(real.shape[0])
        for x_in, x_out in captured.values():
            t_in, t_out = x_in[b][real], x_out[b][real]
            cos = F.cosine_similarity(t_out, t_in, dim=-1)
            turn = 1 - cos if direction == "signed" else 1 - cos.abs()
            ttv[real] += torch.softmax(turn, dim=0) * t_out.norm(dim=-1) / t_in.norm(dim=-1)
        score = ttv[visual] / ttv[visual].sum()
        if use_iga:
            instruction = torch.arange(int(visual[-1]) + 1, real.shape[0])
            iga = out.attentions[1][b][:, instruction][:, :, visual].mean(dim=(0, 1))
            score = 0.5 * score + 0.5 * iga / iga.sum()
        chosen.append(torch.sort(torch.topk(score, keep).indices).values)
    return chosen


@pytest.mark.parametrize("options", [{}, {"direction": "abs"}, {"ttv_only": True}], ids=["default", "abs", "ttv_only"])
def test_selection_matches_a_recomputation_from_the_unwrapped_eager_model(options):
    x = llava_inputs(3)
    model = tiny_llava("sdpa")  # scores computed beside SDPA, compared with eager weights
    with vtoken.pruned(model, "transprune", stages=[{"site": "llm", "layer": 1, "keep": 0.5}], **options):
        with torch.no_grad():
            model(**x)
        got = [s["llm:1"] for s in vtoken.selection(model)]
    expected = _manual_selection(x, 8, options.get("direction", "signed"), use_iga=not options.get("ttv_only"))
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_ttv_only_computes_no_attention_rows(monkeypatch):
    import vtoken.adapters.hf_decoder as hf_decoder

    calls = []
    real = hf_decoder.llama_attention_rows
    monkeypatch.setattr(hf_decoder, "llama_attention_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_llava()
    x = llava_inputs(3)
    for options, expected in (({"ttv_only": True}, 0), ({}, 3)):
        calls.clear()
        with vtoken.pruned(model, "transprune", **options):
            with torch.no_grad():
                model(**x)
        assert len(calls) == expected, options


@pytest.mark.parametrize("options", [{}, {"ttv_only": True}], ids=["default", "ttv_only"])
def test_sdpa_and_eager_choose_the_same_tokens_on_next(options):
    chosen = []
    for attn in ("sdpa", "eager"):
        model = tiny_llava_next(attn)
        x = llava_next_inputs(model)
        with vtoken.pruned(model, "transprune", keep=0.25, **options):
            with torch.no_grad():
                model(**x)
            chosen.append(vtoken.selection(model))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*chosen) for k in a)


# --- generate() with a KV cache ------------------------------------------------------------------
MODELS = {name: (family.make, family.inputs) for name, family in FAMILIES.items()}
OPTIONS = {"default": {}, "ttv_only": {"ttv_only": True}, "abs": {"direction": "abs"}}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", list(MODELS))
def test_cached_generation_equals_recomputation(name, option):
    from test_all_families import _ReplayStrategy

    make, inputs = MODELS[name]
    model = make()
    x = inputs(model)
    with vtoken.pruned(model, "transprune", keep=0.25, **OPTIONS[option]):
        cached = model.generate(**x, max_new_tokens=5, do_sample=False)
        stages = vtoken.strategy_of(model).stages()
        selection = vtoken.selection(model)
    assert [s.layer for s in stages] == [1, 2, 3]  # the 4-layer tiny LLM's schedule
    counts = [int((x["input_ids"][b] == IMAGE_TOKEN).sum()) for b in range(3)]
    for b, sel in enumerate(selection):
        kept = [set(sel[s.name].tolist()) for s in stages]
        assert [len(k) for k in kept] == [s.budget(counts[b]) for s in stages]
        assert kept[2] <= kept[1] <= kept[0]  # each stage prunes what the previous one kept
    # The scores read the whole prompt, which grows when recomputing: replay the prefill's choice.
    _ReplayStrategy.plan = {s.name: {b: sel[s.name].tolist() for b, sel in enumerate(selection)} for s in stages}
    specs = [dict(site="llm", layer=s.layer, keep=s.keep, keep_tokens=s.keep_tokens, rounding=s.rounding) for s in stages]
    with vtoken.pruned(model, "_test_replay", stages=specs, positions="contiguous"):
        uncached = greedy_without_cache(model, x, 5)
    assert torch.equal(uncached, cached)


def test_saved_config_rebuilds_the_schedule_for_the_model(tmp_path):
    model = tiny_llava()
    with vtoken.pruned(model, "transprune", direction="abs"):
        vtoken.save_config(model, tmp_path)
        stages = vtoken.strategy_of(model).stages()
        assert vtoken.config_of(model).resolved_stages() == stages
    with vtoken.pruned(model, config=vtoken.load(tmp_path)):
        assert vtoken.strategy_of(model).stages() == stages
        assert vtoken.config_of(model).direction == "abs"


def test_stage_counts_are_floored_as_the_official_code():
    """``int(n * ratio)`` (official ``llava_arch.py``), not the nearest count: 52 tokens (a LLaVA-NeXT
    image) keep 45 / 32 / 6 through TransPrune-High's 0.875 / 0.625 / 0.125; ``rounding="round"``
    gives 46 for the first stage."""
    from vtoken.registry import get_strategy as strategy_class

    cls = strategy_class("transprune")
    floor = cls(cls.Config())
    floor.bind({"llm": 32, "vision": 4})
    assert [s.budget(52) for s in floor.stages()] == [45, 32, 6]
    nearest = cls(cls.Config(rounding="round"))
    nearest.bind({"llm": 32, "vision": 4})
    assert [s.budget(52) for s in nearest.stages()] == [46, 32, 6]
