"""The speed bench's oracles (``eval/replay_strategy.py``, ``eval/bench_speed.py``): the replay of a
method's recorded reductions gives the method's logits and selection while reading no signal (no
attention rows, no vision attention, no observers, none of the method's own code), and the
hand-written oracle of a schedule of vision, projector and LLM stages gives the method's first-token
logits."""

import sys
import time
from pathlib import Path

import pytest
import torch

import vtoken
from tiny import llava_inputs, tiny_llava

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import replay_strategy as replay  # noqa: E402

CASES = {
    "fastv": ("fastv", {"keep": 0.5}),
    "transprune": ("transprune", {"keep": 0.5}),
    "vflowopt": ("vflowopt", {"keep": 0.5}),  # projector recycling (replayed verbatim) + two LLM stages
    "tome": ("tome", {"keep": 0.5}),  # vision site, inside the blocks, merges recomputed
    "repshift": ("repshift", {"keep": 0.5}),
    "repshift-merge": ("repshift", {"keep": 0.5, "mode": "merge"}),
}


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


class Spy:
    """Counts the calls that compute a signal: LLM attention rows, a vision layer's attention, the
    pixel patches."""

    def __init__(self, monkeypatch):
        from vtoken.adapters import hf_decoder, vision_site

        self.calls: dict[str, int] = {}
        targets = [(hf_decoder, "attention_rows"), (vision_site, "attention_rows"),
                   (vision_site, "received_attention"), (vision_site.VisionSource, "attention"),
                   (vision_site.VisionSource, "pixel_patches")]
        for owner, name in targets:
            label = f"{getattr(owner, '__name__', owner)}.{name}"
            original = getattr(owner, name)

            def counted(*args, _original=original, _label=label, **kwargs):
                self.calls[_label] = self.calls.get(_label, 0) + 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(owner, name, counted)

    def total(self) -> int:
        return sum(self.calls.values())


@pytest.mark.parametrize("case", list(CASES))
def test_replay_reproduces_the_method_and_reads_no_signal(model, case, monkeypatch):
    method, options = CASES[case]
    x = llava_inputs(2)  # left padding, prompts of different lengths
    spy = Spy(monkeypatch)
    recording = replay.record(model, method, x, **options)
    if method in ("fastv", "transprune", "vflowopt"):
        assert spy.total() > 0  # the spy sees the method's signals
    spy.calls.clear()

    def never(*args, **kwargs):
        raise AssertionError(f"the replay called {method}'s own code")

    for name in ("reduce", "score", "observe", "observe_attention"):
        setattr(recording.source, name, never)  # this instance only
    with replay.replaying(model, recording):
        strategy = vtoken.strategy_of(model)
        assert strategy.name.startswith("_") and strategy.needs().names() == frozenset()
        assert vtoken.config_of(model).positions == recording.source.config.positions
        with torch.no_grad():
            logits = model(**x).logits
        selection = vtoken.selection(model)
    assert spy.calls == {}
    assert replay.max_abs_diff(logits, recording.logits) <= 1e-5
    assert [list(s) for s in selection] == [list(s) for s in recording.selection]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(selection, recording.selection) for k in a)
    if case == "tome":  # the merges are recomputed from the live features, not handed back
        assert recording.recompute == set(recording.reductions) and not recording.verbatim
    if case in ("repshift-merge", "vflowopt"):  # merged vectors with no merged_into: replayed as recorded
        assert recording.verbatim


ORACLE_CASES = {
    "random": ("random", {"keep": 0.5}),
    "zoo_prune": ("zoo_prune", {"keep": 0.5}),
    "fastv": ("fastv", {"keep": 0.5}),
    "transprune": ("transprune", {"keep": 0.5}),
    "vflowopt": ("vflowopt", {"keep": 0.5}),
    # Drops after vision blocks (two stages on this 4-block tower) ...
    "repshift": ("repshift", {"keep": 0.5}),
    # ... renumbered in front of the LLM, and a vision drop followed by an LLM stage.
    "repshift-pre_llm": ("repshift", {"keep": 0.5, "positions": "pre_llm"}),
    "vision-then-llm": ("random", {"stages": [{"site": "vision", "layer": 0, "keep": 0.75},
                                              {"site": "llm", "layer": 2, "keep": 0.5}]}),
    # Merges: ToMe's inside its blocks with proportional attention (recomputed from the members),
    # Representation Shift's after a block (saliency-weighted: its vectors as recorded).
    "tome": ("tome", {"keep": 0.5}),
    "repshift-merge": ("repshift", {"keep": 0.5, "mode": "merge"}),
    # A mask stage: from its layer on no text query attends to the hidden visual tokens.
    "aif": ("aif", {"keep": 0.5}),
    "aif-layer-2": ("aif", {"keep": 0.3, "layer": 2}),
}


def _oracle_logits(model, x, plan):
    import speed_oracle

    with torch.no_grad():
        return speed_oracle.oracle_call(model, x, plan)[:, -1]


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_hand_written_oracle_runs_the_same_schedule(model, case):
    import speed_oracle

    method, options = ORACLE_CASES[case]
    x = llava_inputs(1)
    recording = replay.record(model, method, x, **options)
    assert speed_oracle.oracle_supported(recording)
    plan = speed_oracle.oracle_plan(recording, x)
    if any(s.site == "vision" for s in recording.source.stages()):
        assert plan.vision and len(plan.feature_slots) < (x["input_ids"] == 99).sum()  # the tower really drops
    assert replay.max_abs_diff(_oracle_logits(model, x, plan), recording.logits[:, -1]) <= 1e-5


def test_each_part_of_the_tome_oracle_matters(model):
    """Run after the block instead of inside it, without the size bias, or dropping the merged-away
    tokens instead of averaging them in: each moves the first token's logits far past the 1e-5 the
    oracle is held to, so the test above can fail on each."""
    import dataclasses

    import speed_oracle

    x = llava_inputs(1)
    recording = replay.record(model, "tome", x, keep=0.5)
    plan = speed_oracle.oracle_plan(recording, x)
    assert plan.inside_block and plan.proportional and all(s.merged_into is not None for s in plan.vision.values())
    for wrong in (dataclasses.replace(plan, inside_block=False), dataclasses.replace(plan, proportional=False),
                  dataclasses.replace(plan, vision={k: speed_oracle.VisionStep(s.keep) for k, s in plan.vision.items()})):
        assert replay.max_abs_diff(_oracle_logits(model, x, wrong), recording.logits[:, -1]) > 1e-3


def test_the_aif_oracle_hides_the_masked_tokens_from_the_text(model):
    """Without its mask (or with it from the wrong layer) the oracle's logits move far past 1e-5."""
    import dataclasses

    import speed_oracle

    x = llava_inputs(1)
    recording = replay.record(model, "aif", x, keep=0.3, layer=2)
    plan = speed_oracle.oracle_plan(recording, x)
    assert plan.mask_layer == 2 and 0 < len(plan.hidden_slots) < (x["input_ids"] == 99).sum()
    for wrong in (dataclasses.replace(plan, mask_layer=None), dataclasses.replace(plan, mask_layer=3)):
        assert replay.max_abs_diff(_oracle_logits(model, x, wrong), recording.logits[:, -1]) > 1e-3


def test_kv_cache_bytes_reads_every_layer(model):
    import speed_timing

    x = llava_inputs(1)
    with torch.no_grad():
        out = model(**x, use_cache=True)
    cache = vtoken.compat.output_cache(out)
    expected = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert speed_timing.kv_cache_bytes(cache) == expected > 0


def test_the_qwen2_vl_family_builds_576_visual_tokens_and_replays_its_methods():
    """``--family qwen2_vl``: the scaled Qwen2-VL takes the prompts the bench builds (576 visual tokens
    after the 2 x 2 merger, left-padded mixed lengths at batch > 1), and a method's replay gives its
    logits there too."""
    import speed_shapes

    family = speed_shapes.FAMILIES["qwen2_vl"]
    model = family.build()
    x = family.inputs()
    assert int((x["input_ids"] == speed_shapes.IMAGE_TOKEN).sum()) == speed_shapes.VISUAL
    assert x["input_ids"].shape[1] == family.text_tokens + speed_shapes.VISUAL
    batch = family.inputs(seed=1, batch=3)
    assert batch["attention_mask"].sum(-1).tolist() == [family.text_tokens - 16 + speed_shapes.VISUAL + n for n in (8, 16, 24)]
    assert family.hand_oracle == ("vision", "projector", "llm")
    recording = replay.record(model, "fastv", x, keep_tokens=64)
    assert len(recording.selection[0]["llm:2"]) == 64
    assert replay.max_abs_diff(replay.replay_logits(model, recording, x), recording.logits) == 0.0


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_the_other_qwen_families_build_576_visual_tokens_and_replay_their_methods(name):
    """``--family qwen2_5_vl`` / ``qwen3_vl``: the real classes (windowed blocks; DeepStack and 16 px
    patches) on the bench's prompts give 576 visual tokens, and a vision-site and an LLM method's
    replays give their logits."""
    import speed_shapes

    family = speed_shapes.FAMILIES[name]
    model = family.build()
    assert type(model).__name__ == {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                    "qwen3_vl": "Qwen3VLForConditionalGeneration"}[name]
    x = family.inputs()
    assert int((x["input_ids"] == speed_shapes.IMAGE_TOKEN).sum()) == speed_shapes.VISUAL
    assert family.hand_oracle == ("vision", "projector", "llm") and family.real_model.startswith("Qwen")
    vision = model.config.vision_config
    assert family.vision_map.heads == vision.num_heads and family.vision_map.head_dim == vision.hidden_size // vision.num_heads
    for method in ("repshift", "fastv"):
        recording = replay.record(model, method, x, keep_tokens=64)
        assert replay.max_abs_diff(replay.replay_logits(model, recording, x), recording.logits) == 0.0


def test_overheads_are_medians_of_per_round_pairs():
    """A fixed cost hidden under round-to-round drift: each round's method run costs 10 ms more than
    the replay timed right after it, while the rounds themselves drift by up to 400 ms. The paired
    median finds the 10 ms; the difference of the two medians (which come from different rounds here)
    does not."""
    import statistics

    import speed_stats

    replay_s = [1.0, 1.4, 1.2]
    method_s = [r + 0.010 for r in replay_s]
    method_s[1] = 1.0  # one round where the method ran in a quiet moment and the replay did not
    assert statistics.median(speed_stats.paired_differences(method_s, replay_s)) == pytest.approx(0.010)
    assert statistics.median(method_s) - statistics.median(replay_s) == pytest.approx(-0.19)  # drift hides it
    pair = {"keep_all": [1.02, 2.04, 1.53], "unpruned": [1.0, 2.0, 1.5]}
    assert speed_stats.keep_all_overhead(pair) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="one time each per round"):
        speed_stats.paired_ratios([1.0], [1.0, 2.0])


def test_median_interval_is_the_sign_test_interval():
    """Values known by construction: 12 rounds give the 3rd and 10th smallest (coverage 1 - 2 x
    79 / 4096 = 96.1%); 5 rounds are too few for 95% and give the min-max at 93.75%. A failing
    median whose interval holds passing values is "within noise"; one whose interval does not, is not."""
    import speed_stats

    values = [float(v) for v in (7, 3, 12, 1, 9, 5, 11, 2, 8, 4, 10, 6)]
    low, high, coverage = speed_stats.median_interval(values)
    assert (low, high) == (3.0, 10.0)
    assert coverage == pytest.approx(1 - 2 * 79 / 4096)
    assert speed_stats.median_interval([5.0, 1.0, 4.0, 2.0, 3.0]) == (1.0, 5.0, pytest.approx(1 - 2 / 32))
    assert speed_stats.median_interval([2.0]) == (2.0, 2.0, 0.0)
    # Larger n: the interval narrows around the median and keeps at least the coverage asked.
    low, high, coverage = speed_stats.median_interval([float(v) for v in range(100)])
    assert (low, high) == (39.0, 60.0) and coverage >= 0.95
    assert speed_stats.within_noise(0.01, 0.03, 0.02) and not speed_stats.within_noise(0.025, 0.03, 0.02)
    with pytest.raises(ValueError, match="at least one value"):
        speed_stats.median_interval([])


def test_an_interval_of_few_rounds_is_named_by_its_coverage():
    """3 rounds' min-max holds the median with probability 1 - 2 / 8 = 75%, 5 rounds' 93.75%: the
    tables must not call either a 95% interval; from 6 rounds (96.9%) they may."""
    import speed_stats

    assert speed_stats.interval_name(3) == "75% interval (min-max of 3 rounds)"
    assert speed_stats.interval_name(5) == "94% interval (min-max of 5 rounds)"
    assert speed_stats.interval_name(6) == speed_stats.interval_name(40) == "95% interval"


def test_strategy_call_time_counts_the_outermost_calls_only(model):
    """The time inside a strategy's own calls: a reduce that sleeps 30 ms and calls observe (which
    sleeps 20 ms) inside it counts 50 ms once, not 70; take() starts again from 0; the wrap is
    undone. Inside ``StrategyCallTime.pruned`` the wrapped model's strategy has its calls wrapped."""
    import time

    import speed_timing

    class Sleeper:
        def observe(self, *args):
            time.sleep(0.02)

        def observe_attention(self, *args):
            pass

        def reduce(self, ctx):
            time.sleep(0.03)
            self.observe()

    timer, strategy = speed_timing.StrategyCallTime(), Sleeper()
    undo = speed_timing._around_calls(strategy, timer.around)
    strategy.reduce(None)
    assert 0.05 <= timer.take() < 0.065
    assert timer.take() == 0.0
    undo()
    assert not strategy.__dict__
    strategy.reduce(None)
    assert timer.take() == 0.0
    with timer.pruned(model, "fastv", keep_tokens=8):
        assert set(speed_timing.STRATEGY_CALLS) <= set(vtoken.strategy_of(model).__dict__)
    assert not vtoken.is_wrapped(model)


def test_the_attention_map_floor_is_the_quicker_exact_column_mass_and_counts_only_map_costs(monkeypatch):
    """``eval/scoring_floor.py``: each form the floor times computes the map's column mass (the
    reference's numbers: one with no row max subtracted, one through the fused softmax), the floor is
    the quicker of them, it times every score of the map (twice the tokens: about four times the
    time), is 0 for a schedule with no whole-map cost, counts one floor per map cost, and each
    family's map shape is its tower's (heads, patches + CLS, head dim)."""
    import scoring_floor as floor_module
    import speed_shapes
    from scoring_floor import AttentionMapShape, attention_map_floor, scoring_floor
    from vtoken.schedule import ScoringCost

    cpu = torch.device("cpu")
    small, large = AttentionMapShape(2, 512, 32), AttentionMapShape(2, 1024, 32)
    # What it times is the column mass itself (the reference kernel's, summed over heads), in chunks.
    from scoring_floor import COLUMN_MASS_FORMS
    from vtoken.kernels.reference import received_attention

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 200, 16, generator=g), torch.randn(2, 3, 200, 16, generator=g)
    k_t = k.reshape(6, 200, 16).transpose(-1, -2)
    assert len(COLUMN_MASS_FORMS) == 2
    for form in COLUMN_MASS_FORMS:
        scores, total = torch.empty(6, 64, 200), torch.zeros(6, 200)
        mass = form(q.reshape(6, 200, 16) * 0.25, k_t, 64, scores, total)
        torch.testing.assert_close(mass.view(2, 3, 200).sum(dim=1), 3 * received_attention(q, k, 0.25),
                                   rtol=1e-5, atol=1e-5)
    # The floor is the quicker form's time: a form made slow by hand (50 ms a call, the small map
    # takes about 1 ms) is not the one it reports, whichever of the two it is.
    def slow(*args):
        time.sleep(0.05)
        return COLUMN_MASS_FORMS[1](*args)

    for slowed in ((COLUMN_MASS_FORMS[0], slow), (slow, COLUMN_MASS_FORMS[1])):
        monkeypatch.setattr(floor_module, "COLUMN_MASS_FORMS", slowed)
        assert attention_map_floor(small, cpu, repeats=3) < 0.05
    monkeypatch.undo()
    assert attention_map_floor(large, cpu, repeats=5) > 2.0 * attention_map_floor(small, cpu, repeats=5)
    assert scoring_floor([ScoringCost("llm_attention_rows", layer=2, rows=16)], None, cpu) == 0.0
    cache = {small: 0.25}
    costs = [ScoringCost("vision_attention_map", layer=1), ScoringCost("vision_attention_map", layer=2)]
    assert scoring_floor(costs, small, cpu, cache) == 0.5
    with pytest.raises(ValueError, match="attention shape"):
        scoring_floor(costs, None, cpu)
    llava = speed_shapes.scaled_llava().config.vision_config
    patches = (llava.image_size // llava.patch_size) ** 2
    assert speed_shapes.FAMILIES["llava"].vision_map == AttentionMapShape(
        llava.num_attention_heads, patches + 1, llava.hidden_size // llava.num_attention_heads)
    qwen = speed_shapes.scaled_qwen2_vl().config.vision_config
    assert speed_shapes.FAMILIES["qwen2_vl"].vision_map == AttentionMapShape(
        qwen.num_heads, speed_shapes.VISUAL * qwen.spatial_merge_size ** 2, qwen.embed_dim // qwen.num_heads)


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_the_anyres_families_build_744_visual_tokens_and_replay_their_methods(name):
    """``--family llava_next`` / ``llava_onevision``: the real classes on a 336 x 336 image in 168 px
    views (the base view and 2 x 2 crops). The model's own packing makes 144 base tokens and a 24 x 24
    crop grid with a newline per row, 744 tokens, which the prompts hold; the budgets are 1/9, 2/9, 1/3
    of them; the map floor counts five views of 12 x 12 patches (CLIP's CLS on NeXT); a vision-site
    and an LLM method's replays give their logits."""
    import speed_shapes
    from scoring_floor import AttentionMapShape

    family = speed_shapes.FAMILIES[name]
    model = family.build()
    assert type(model).__name__ == {"llava_next": "LlavaNextForConditionalGeneration",
                                    "llava_onevision": "LlavaOnevisionForConditionalGeneration"}[name]
    assert speed_shapes.anyres_visual_tokens(model) == family.visual == 144 + 24 * (24 + 1)
    assert family.budgets == (83, 165, 248)
    x = family.inputs()
    assert int((x["input_ids"] == speed_shapes.IMAGE_TOKEN).sum()) == family.visual
    assert tuple(x["pixel_values"].shape) == (1, 5, 3, 168, 168)
    batch = family.inputs(seed=1, batch=3)
    assert batch["attention_mask"].sum(-1).tolist() == [family.text_tokens - 16 + family.visual + n for n in (8, 16, 24)]
    vision = model.config.vision_config
    cls = 1 if name == "llava_next" else 0
    assert family.vision_map == AttentionMapShape(vision.num_attention_heads, (168 // 14) ** 2 + cls,
                                                  vision.hidden_size // vision.num_attention_heads, views=5)
    assert family.hand_oracle == ("vision", "projector", "llm")
    for method in ("repshift", "transprune"):
        recording = replay.record(model, method, x, keep_tokens=83)
        assert replay.max_abs_diff(replay.replay_logits(model, recording, x), recording.logits) == 0.0


#: The methods whose schedules the other families' hand-written oracle runs: projector drops (random,
#: original positions; ZOO-Prune, renumbered), merges at the projector (pool), projector recycling
#: then two LLM stages (VFlowOpt), progressive LLM stages (TransPrune, renumbered), a mask stage (AIF).
OTHER_FAMILY_ORACLE_METHODS = ("random", "pool", "zoo_prune", "vflowopt", "transprune", "aif")


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_other_families_hand_written_oracle_runs_the_same_schedule(name, monkeypatch):
    """On LLaVA-NeXT / OneVision the oracle has the model pack its views (744 tokens: unpadded crops,
    a newline per row, the base view), on Qwen-VL merge its patches and number them (M-RoPE), and
    runs the LLM by hand on the kept tokens (Qwen3-VL: DeepStack features on the visual rows still
    there): its first-token logits are the method's. Each of these moves them by more than 1e-3, so
    the comparison can fail: keeping the wrong tokens (each kept visual slot one further); on Qwen-VL,
    renumbered rows left at the model's ids; on Qwen3-VL, no DeepStack features.

    On the AnyRes shapes the tower is hand-run on each view's kept patches too (Representation
    Shift's drops after blocks, ToMe's size-weighted merges inside them), its patches placed where the
    model's packing puts them and the kept newlines given the newline embedding: the logits are the
    method's, and without the newlines, or with the views' features swapped, they move by more than
    1e-3. On Qwen-VL the packed tower is hand-run on the kept patches (Representation Shift's drops
    after blocks): the logits are the method's, and with the dropped patches' rotary positions in
    place of the kept ones', with every block attending over the whole frame (Qwen2.5-VL's windowed
    blocks), or with the DeepStack features of the wrong units (Qwen3-VL), they move by more than
    1e-3."""
    import dataclasses

    import speed_oracle
    import speed_shapes

    family = speed_shapes.FAMILIES[name]
    model = family.build()
    x = family.inputs()
    budget = family.budgets[0]

    def diff(plan, recording):
        return replay.max_abs_diff(_oracle_logits(model, x, plan), recording.logits[:, -1])

    for method in OTHER_FAMILY_ORACLE_METHODS:
        recording = replay.record(model, method, x, keep_tokens=budget)
        assert speed_oracle.oracle_supported(recording, family.hand_oracle), method
        plan = speed_oracle.oracle_plan(recording, x, model)
        assert diff(plan, recording) <= 1e-5, method
        if method == "random":  # projector drop: the rows entering the LLM are the text and the kept tokens
            visual = x["input_ids"][0] == speed_shapes.IMAGE_TOKEN
            assert int(visual[plan.enter].sum()) == budget
            moved = plan.enter.clone()
            moved[visual[plan.enter]] += 1
            assert diff(dataclasses.replace(plan, enter=moved), recording) > 1e-3
        if method == "random" and family.qwen == "3":
            with monkeypatch.context() as patch:
                features = speed_oracle._image_features
                patch.setattr(speed_oracle, "_image_features", lambda *a: (features(*a)[0], None))
                assert diff(plan, recording) > 1e-3
    if family.qwen is not None:
        # M-RoPE renumbered: pool's four kept tokens (grid cells, no draw) fall short of the image's
        # largest ids and pull the text after it down (a spread selection reaches the last row or
        # column, and then renumbering moves nothing).
        recording = replay.record(model, "pool", x, keep_tokens=4, positions="contiguous")
        plan = speed_oracle.oracle_plan(recording, x, model)
        assert bool((plan.mrope_shift != 0).any()) and diff(plan, recording) <= 1e-5
        with monkeypatch.context() as patch:
            patch.setattr(speed_oracle, "renumbers", lambda mode, site: False)
            assert diff(speed_oracle.oracle_plan(recording, x, model), recording) > 1e-3
    vision_site = replay.record(model, "repshift", x, keep_tokens=budget)
    if family.qwen is not None:
        _check_the_packed_tower_oracle(model, x, family, vision_site, diff, monkeypatch)
        return
    for recording in (vision_site, replay.record(model, "tome", x, keep_tokens=budget)):
        assert speed_oracle.oracle_supported(recording, family.hand_oracle)
        plan = speed_oracle.oracle_plan(recording, x, model)
        views = next(iter(plan.vision.values())).keep.shape[0]
        assert views == 5 and plan.newline_slots is not None and len(plan.feature_slots) < family.visual
        assert diff(plan, recording) <= 1e-5, recording.method
    # The kept newlines left as the placeholder's embedding. (Set and put back by hand: pytest >= 9.2's
    # monkeypatch restores an instance's __dict__ entry, and a module's parameter is not one, so its
    # undo deleted the parameter.)
    newline = model.model.image_newline
    try:
        model.model.image_newline = torch.nn.Parameter(newline * 0)
        assert diff(plan, recording) > 1e-3
    finally:
        model.model.image_newline = newline
    per_view = len(plan.feature_slots) // views  # the base view's and the first crop's features swapped
    swapped = plan.feature_slots.view(views, per_view)[[1, 0, 2, 3, 4]].reshape(-1)
    assert diff(dataclasses.replace(plan, feature_slots=swapped), recording) > 1e-3


def _check_the_packed_tower_oracle(model, x, family, recording, diff, monkeypatch) -> None:
    """Qwen-VL's packed tower by hand on Representation Shift's drops (see the test above): the
    logits are the method's, and the tower's merged features are the ones vtoken hands the LLM for
    the kept tokens; with the kept patches' rotary positions reversed, or every block attending over
    the whole frame (Qwen2.5-VL's windowed blocks), those features move by more than 2e-5 (they
    match to within 1e-6, bit for bit here; a random tower's attention is nearly uniform, so its
    positions move its features by about 2e-4 of their 0.09, and the logits less); with the DeepStack features of other units
    (Qwen3-VL) the logits move by more than 1e-3."""
    import dataclasses

    import speed_oracle

    assert family.hand_oracle == ("vision", "projector", "llm")
    assert speed_oracle.oracle_supported(recording, family.hand_oracle, packed_tower=True)
    plan = speed_oracle.oracle_plan(recording, x, model)
    stages = recording.source.stages()
    assert plan.packed is not None and sorted(plan.packed.steps) == [s.layer for s in stages]
    assert diff(plan, recording) <= 1e-5
    tower, grid = model.model.visual, x["image_grid_thw"][:1]
    with replay.replaying(model, recording), torch.no_grad():
        encoded = model.model.get_image_features(pixel_values=x["pixel_values"], image_grid_thw=x["image_grid_thw"])
    kept = torch.sort(recording.selection[0][stages[-1].name]).values
    handed = torch.cat(list(encoded.pooler_output))[kept]  # vtoken's features of the kept tokens

    def features(packed):
        with torch.no_grad():
            return speed_oracle._packed_tower_features(tower, x["pixel_values"], grid, packed)[0]

    assert len(kept) == family.budgets[0] and replay.max_abs_diff(features(plan.packed), handed) <= 1e-6
    full = int(grid[0].prod())
    real_call = type(tower.blocks[0]).__call__

    def reversed_positions(block, hidden, **kwargs):
        if hidden.shape[0] < full:  # a block after the first stage
            kwargs["position_embeddings"] = tuple(t.flip(0) for t in kwargs["position_embeddings"])
        return real_call(block, hidden, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(type(tower.blocks[0]), "__call__", reversed_positions)
        assert replay.max_abs_diff(features(plan.packed), handed) > 2e-5
    if family.qwen == "2.5":  # every block over the whole frame: the windowed blocks see too much
        steps = {k: dataclasses.replace(v, cu_window_seqlens=v.cu_seqlens) for k, v in plan.packed.steps.items()}
        with monkeypatch.context() as patch:
            patch.setattr(tower, "fullatt_block_indexes", list(range(len(tower.blocks))))
            assert replay.max_abs_diff(features(dataclasses.replace(plan.packed, steps=steps)), handed) > 2e-5
    if family.qwen == "3":  # the DeepStack features of other units
        keep = {k: v.roll(1) for k, v in plan.packed.deepstack_keep.items()}
        assert diff(dataclasses.replace(plan, packed=dataclasses.replace(plan.packed, deepstack_keep=keep)), recording) > 1e-3
        # A stage after block 2: block 1's DeepStack merger sees every unit, of which the kept ones are taken.
        late = replay.record(model, "repshift", x, keep_tokens=family.budgets[0], layer=2)
        late_plan = speed_oracle.oracle_plan(late, x, model)
        assert len(late_plan.packed.deepstack_keep[1]) == family.budgets[0] and diff(late_plan, late) <= 1e-5
        first_ones = {**late_plan.packed.deepstack_keep, 1: torch.arange(family.budgets[0])}
        assert diff(dataclasses.replace(late_plan, packed=dataclasses.replace(late_plan.packed, deepstack_keep=first_ones)),
                    late) > 1e-3
    # A merge in the packed tower is not hand-run: its replay stays its oracle.
    merged = dataclasses.replace(recording, reductions={
        name: dataclasses.replace(r, features=torch.zeros(1)) for name, r in recording.reductions.items()})
    assert not speed_oracle.oracle_supported(merged, family.hand_oracle, packed_tower=True)


def test_the_oracles_m_rope_renumbering_follows_the_contiguous_rule():
    """Values known by construction: 1-D ids become 0 .. n-1; under M-RoPE an image's kept rows keep
    their (t, h, w) ids less the shift of the text before them, and a text row takes the largest id
    so far plus one. Two images with text between, each keeping its first token of a 2 x 2 grid."""
    import speed_oracle

    assert speed_oracle._renumbered(torch.tensor([0, 3, 7]), torch.tensor([False, True, False])).tolist() == [0, 1, 2]
    grid = lambda t: [(t, t, t), (t, t, t + 1), (t, t + 1, t), (t, t + 1, t + 1)]  # noqa: E731
    rows = [(0, 0, 0), (1, 1, 1), *grid(2), (4, 4, 4), (5, 5, 5), *grid(6), (8, 8, 8)]
    kept = [0, 1, 2, 6, 7, 8, 12]  # text, image A's first token, text, image B's first token, text
    positions = torch.tensor(rows).T[:, kept]
    visual = torch.tensor([False, False, True, False, False, True, False])
    expected = [(0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 4, 4), (5, 5, 5), (6, 6, 6)]
    assert speed_oracle._renumbered(positions, visual).T.tolist() == [list(e) for e in expected]
    # One image keeping tokens that do not hold its largest ids: the text after it moves down.
    positions = torch.tensor([(0, 0, 0), (1, 1, 2), (1, 2, 1), (3, 3, 3)]).T
    visual = torch.tensor([False, True, True, False])
    assert speed_oracle._renumbered(positions, visual).T.tolist() == [[0, 0, 0], [1, 1, 2], [1, 2, 1], [3, 3, 3]]
    positions = torch.tensor([(0, 0, 0), (1, 1, 1), (4, 4, 4), (5, 5, 5)]).T
    visual = torch.tensor([False, True, False, False])
    assert speed_oracle._renumbered(positions, visual).T.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]]


def test_a_map_floor_counts_every_view():
    """Five views' maps take about five times one view's (the floor of an AnyRes image). Timed: up to
    three tries, since a busy machine can slow one measurement by more than the factor tested."""
    from scoring_floor import AttentionMapShape, attention_map_floor

    cpu = torch.device("cpu")
    one, five = AttentionMapShape(2, 384, 32), AttentionMapShape(2, 384, 32, views=5)
    times = []
    for _ in range(3):
        times.append((attention_map_floor(one, cpu, repeats=5), attention_map_floor(five, cpu, repeats=5)))
        if 3.5 * times[-1][0] < times[-1][1]:
            break
    else:
        raise AssertionError(f"five views took no longer than 3.5 x one view in three tries (s): {times}")


def test_the_layer_key_time_sees_the_keys_handed_over_and_only_the_layers_own_projections():
    """``LayerKeyTime``: TransPrune's layers were handed their keys at each stage (their projection
    ran on no row), FastV's were not; the key projections the strategy's own calls make are not
    counted, so the method's key time is below its replay's (whose layers project the kept keys)."""
    import bench_speed
    import speed_shapes
    import speed_timing

    model = speed_shapes.scaled_llava()
    x = speed_shapes.prompt()
    calls = speed_timing.StrategyCallTime()
    keys = speed_timing.LayerKeyTime(model, calls)
    seen = {}

    def least(run, context, repeats: int = 3) -> tuple[float, bool]:
        """The least key time of a few runs (one run on a loaded machine can be slow), and whether
        keys were handed over in each."""
        times = []
        for _ in range(repeats):
            with context(), keys.timing(), torch.no_grad():
                run()
            times.append(keys.take())
        assert len({handed for _, handed in times}) == 1
        return min(t for t, _ in times), times[0][1]

    for method in ("transprune", "fastv"):
        recording = replay.record(model, method, x, keep_tokens=64)
        seen[method] = least(lambda: bench_speed.ttft_call(model, x), lambda: calls.pruned(model, method, keep_tokens=64))
        seen[(method, "replay")] = least(lambda: bench_speed.ttft_call(model, x),
                                         lambda: replay.replaying(model, recording))
    assert seen["transprune"][1] and not seen["fastv"][1]
    assert not seen[("transprune", "replay")][1]
    assert seen["transprune"][0] < seen[("transprune", "replay")][0]
    assert keys.take() == (0.0, False)
    assert all(not p._forward_hooks and not p._forward_pre_hooks for p in keys.modules)


def test_the_llava_7b_family_is_llava_1_5_7b_full_shape_built_where_it_is_asked():
    """``--family llava_7b`` (the GPU bench): the parameters of llava-hf/llava-1.5-7b-hf (7,063,427,072:
    CLIP ViT-L/14-336 without its last projection, the two-layer projector, Vicuna-7B with a 32064-word
    vocabulary), built on the device asked for (meta here: nothing is allocated) in the dtype asked for.
    By hand: Vicuna-7B 6,738,939,904 (32 x 202,383,360 per layer, two 32064 x 4096 tables, the final norm),
    the tower 303,507,456 (24 x 12,596,224 per layer, embeddings and two LayerNorms), the projector
    20,979,712."""
    from bench_speed import FAMILIES

    family = FAMILIES["llava_7b"]
    model = family.build(torch.device("meta"), torch.bfloat16)
    assert family.full_size and family.hand_oracle
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size // vision.patch_size) == (1024, 24, 24)
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.intermediate_size) == (4096, 32, 32, 11008)


def test_tokenpacker_on_a_tower_without_a_square_grid_is_refused_in_one_line():
    """A Qwen-VL tower has no CLIP image size to give TokenPacker's counts: the bench's budgets for it
    stop with one line, which the bench records as not run (``--family qwen2_vl`` crashed on it
    before any round); other methods keep their budgets."""
    import speed_methods
    from tiny import tiny_qwen2_vl

    options = speed_methods.MethodOptions(tiny_qwen2_vl())
    assert options.budgets("fastv", [4, 8]) == [4, 8]
    with pytest.raises(ValueError, match=r"tokenpacker packs a LLaVA tower's square patch grid; this "
                                         r"Qwen2VLVisionConfig has none"):
        options.budgets("tokenpacker", [4])


def test_the_bench_times_tokenpacker_with_a_packer_whose_count_is_the_budget(model):
    """TokenPacker, a trained method, runs in the speed bench with a packer built for the model: the
    scale whose region count is the budget (4 x 4 patches: 4 regions at s=2, 16 at s=1 for keep-all),
    the counts nearest the budgets asked for, a one-line refusal of a count no scale gives; its replay
    and hand-written oracle give its logits. A training-free method gets its budget alone."""
    import speed_methods
    import speed_oracle

    options = speed_methods.MethodOptions(model)
    assert options("random", 5) == {"keep_tokens": 5} and options("random", None) == {"keep": 1.0}
    assert options.budgets("random", [3, 9]) == [3, 9]
    assert options.budgets("tokenpacker", [1, 3, 9]) == [1, 4]  # s=4, then s=2 (s=3 gives 4 too)
    assert options.packer_scale(4) == 2 and options.packer_scale(None) == 1
    assert options("tokenpacker", None)["keep_tokens"] == 16
    assert options("tokenpacker", 4)["weights"] is options("tokenpacker", 4)["weights"]  # built once
    with pytest.raises(ValueError, match=r"not 5; give --budgets one of them"):
        options("tokenpacker", 5)
    assert speed_methods.is_trained("tokenpacker") and not speed_methods.is_trained("fastv")

    x = llava_inputs(1)
    recording = replay.record(model, "tokenpacker", x, **options("tokenpacker", 4))
    assert [len(v) for v in recording.selection[0].values()] == [4]
    assert replay.max_abs_diff(replay.replay_logits(model, recording, x), recording.logits) <= 1e-5
    assert speed_oracle.oracle_supported(recording)
    plan = speed_oracle.oracle_plan(recording, x)
    assert replay.max_abs_diff(_oracle_logits(model, x, plan), recording.logits[:, -1]) <= 1e-5
    assert not vtoken.is_wrapped(model)


def test_a_scaled_family_at_another_depth_changes_its_llm_alone():
    """``--llm-layers N`` / ``real`` (``speed_shapes.family_at``): every scaled family builds its LLM at
    that depth, the tower, width and prompt unchanged, and says so in its description; ``llava_deep``
    (the committed runs' name) is LLaVA at Vicuna-7B's 32; a full-size shape, a depth under 2 and a
    word other than ``real`` are refused in one line."""
    import speed_shapes

    for name, real in (("llava", 32), ("qwen2_vl", 28), ("qwen2_5_vl", 28), ("qwen3_vl", 36), ("llava_next", 32),
                       ("llava_onevision", 28)):
        family = speed_shapes.family_at(name, "real")
        assert family.llm_layers == real and f"768 x {real} layers" in family.description, name
        assert "768 x 8 layers" in speed_shapes.FAMILIES[name].description  # the 8-layer family is unchanged
    deep = speed_shapes.FAMILIES["llava_deep"]
    assert deep.llm_layers == 32 and deep.description == speed_shapes.family_at("llava", "real").description
    for name in ("llava", "qwen3_vl", "llava_onevision"):
        shallow, base = speed_shapes.family_at(name, "2").build(), speed_shapes.FAMILIES[name].build()
        assert shallow.config.text_config.num_hidden_layers == 2
        assert shallow.config.vision_config.to_dict() == base.config.vision_config.to_dict()
        assert shallow.config.text_config.hidden_size == base.config.text_config.hidden_size == 768
    for name, layers, message in (("llava_7b", "4", "full-size"), ("llava", "1", "at least 2"),
                                  ("llava", "deep", "number of decoder layers or 'real'")):
        with pytest.raises(ValueError, match=message):
            speed_shapes.family_at(name, layers)
