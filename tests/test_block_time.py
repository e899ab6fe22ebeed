"""``eval/block_time.py``: a run's wall time split into the model's own blocks and the rest, the
blocks of two runs matched out of their difference. Known by construction: sleeps put where the
split must see them (a strategy's call, a vtoken hook inside a block, an extra block call) and where
it must not (inside a block both runs call)."""

import sys
import time
from pathlib import Path

import pytest
import torch

import vtoken
from tiny import llava_inputs, tiny_llava, tiny_qwen2_vl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import speed_stats  # noqa: E402
import speed_timing  # noqa: E402
import replay_strategy as replay  # noqa: E402
from block_time import (  # noqa: E402
    BlockFrame, BlockTime, RunSplit, model_blocks, residual, residual_difference, signature, vtoken_hooks_outside,
)

NAP = 0.5  # seconds: far above a tiny model's block (about a millisecond; 126 ms seen once on a machine loaded 4x over) and the timer's noise


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _run(block_time: BlockTime, call) -> RunSplit:
    start = time.perf_counter()
    with block_time.timing(), torch.no_grad():
        call()
    return RunSplit(time.perf_counter() - start, block_time.take())


def frame(block, shape, seconds):
    return BlockFrame(block, ((shape, (), "float32"), ("none",)), seconds)


def test_residual_matches_the_same_block_on_the_same_input_in_call_order():
    first = RunSplit(10.0, [frame(0, (1, 5), 3.0), frame(1, (1, 5), 2.0), frame(1, (1, 5), 1.5), frame(1, (1, 3), 0.5)])
    second = RunSplit(9.0, [frame(0, (1, 5), 2.5), frame(1, (1, 5), 2.5), frame(2, (1, 5), 1.0)])
    # first: block 0 matched (3.0); block 1 (1, 5) once only (2.0, the first call); block 1 on
    # (1, 3) and the second (1, 5) call have no counterpart.
    assert residual(first, second) == pytest.approx((10.0 - 5.0, 0.5))
    # second: block 0 and block 1 matched; block 2 is never called by first.
    assert residual(second, first) == pytest.approx((9.0 - 5.0, 5.0 / 9.0))
    assert residual_difference(first, second) == pytest.approx(1.0)


def test_signature_is_the_hidden_states_and_the_mask_whatever_the_argument_names():
    hidden = torch.zeros(1, 5, 8)
    mask = torch.zeros(1, 1, 5, 5)
    assert signature((hidden,), {"attention_mask": mask}) == signature((), {"hidden_states": hidden, "attention_mask": mask,
                                                                           "cache_position": torch.arange(5)})
    assert signature((hidden,), {}) != signature((hidden,), {"attention_mask": mask})
    assert signature((hidden,), {}) != signature((hidden[:, :4],), {})
    assert signature((hidden,), {}) != signature((hidden.transpose(1, 2).contiguous().transpose(1, 2),), {})  # strides


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen2_vl])
def test_every_vision_and_llm_block_is_timed(build):
    model = build()
    config = model.config
    blocks = model_blocks(model)
    assert len(blocks) == config.vision_config.num_hidden_layers + config.text_config.num_hidden_layers
    assert all(b in blocks for b in model.model.language_model.layers)


def test_two_unwrapped_runs_match_every_block_call(model):
    x = llava_inputs()
    block_time = BlockTime(model)
    first = _run(block_time, lambda: model(**x))
    second = _run(block_time, lambda: model(**x))
    assert [f.block for f in first.frames] == list(range(len(block_time.blocks)))  # every block once, in order
    assert 0 < residual(first, second)[0] < first.wall and residual(first, second)[1] > 0
    assert [(f.block, f.signature) for f in first.frames] == [(f.block, f.signature) for f in second.frames]


def _sleepy_reduce(strategy):
    reduce = strategy.reduce

    def slow(ctx):
        time.sleep(NAP)
        return reduce(ctx)

    strategy.reduce = slow


def test_a_strategys_call_inside_a_block_is_not_the_blocks_time(model):
    """ToMe merges inside the vision blocks: a nap in its reduce (one per stage) must stay out of
    every block's time (StrategyCallTime marks the calls outside), so the method's residual less the
    replay's holds every nap."""
    x = llava_inputs()
    recording = replay.record(model, "tome", x, keep=0.5)
    block_time = BlockTime(model)
    calls = speed_timing.StrategyCallTime(block_time)
    with vtoken.pruned(model, "tome", keep=0.5):
        strategy = vtoken.strategy_of(model)
        _sleepy_reduce(strategy)
        undo = speed_timing._around_calls(strategy, calls.around)
        method = _run(block_time, lambda: model(**x))
        undo()
    with replay.replaying(model, recording):
        replayed = _run(block_time, lambda: model(**x))
    naps = len(recording.reductions)
    assert naps >= 2
    assert max(f.seconds for f in method.frames) < NAP / 2  # no block holds a nap
    assert residual_difference(method, replayed) == pytest.approx(naps * NAP, abs=NAP / 2)


def test_a_vtoken_hook_inside_a_block_is_not_the_blocks_time(model):
    """A hook registered through vtoken's UndoStack on a block's sub-module runs outside the block's
    time while vtoken_hooks_outside is active, and inside it otherwise (the mutation this guards)."""
    from vtoken.adapters.base import UndoStack

    x = llava_inputs()
    block_time = BlockTime(model)
    mlp = model.model.language_model.layers[1].mlp
    index = block_time.blocks.index(model.model.language_model.layers[1])

    def nap(module, args, output):
        time.sleep(NAP)

    for outside, expected in ((True, 0.0), (False, NAP)):
        undo = UndoStack()
        with (vtoken_hooks_outside(block_time) if outside else torch.no_grad()):
            undo.post_hook(mlp, nap)
        try:
            run = _run(block_time, lambda: model(**x))
        finally:
            undo.run()
        seconds = next(f.seconds for f in run.frames if f.block == index)
        assert seconds == pytest.approx(expected, abs=NAP / 3)


def test_a_block_call_only_one_run_makes_stays_in_its_residual(model):
    """Extra calls of a block (a probe step, a perturbed projector) are not matched away: a forward
    followed by one more call of layer 0 on other rows keeps that call in the difference, while the
    same work inside the call both runs make (a nap in layer 0's MLP, in every call) cancels."""
    x = llava_inputs()
    block_time = BlockTime(model)
    layer = model.model.language_model.layers[0]
    width = model.config.text_config.hidden_size
    position = torch.arange(3)[None]
    rotary = model.model.language_model.rotary_emb(torch.zeros(1, 3, width), position)

    def extra():
        model(**x)
        layer(torch.zeros(1, 3, width), position_embeddings=rotary, position_ids=position)

    handle = layer.mlp.register_forward_hook(lambda module, args, output: time.sleep(NAP))  # inside the block
    try:
        plain = _run(block_time, lambda: model(**x))
        more = _run(block_time, extra)
    finally:
        handle.remove()
    assert residual(more, plain)[0] > NAP > residual(plain, more)[0]  # the shared call's nap is matched out
    assert residual_difference(more, plain) == pytest.approx(NAP, abs=NAP / 2)


def test_verdict_uses_the_split_only_where_the_prefills_cannot_tell():
    target = 0.02
    decided = speed_stats.verdict(0.03, (0.01, 0.05), target, (0.012, (0.010, 0.015)), strict=True)
    assert decided == speed_stats.Verdict(True, False, "split")
    decided = speed_stats.verdict(0.03, (0.025, 0.05), target, (0.012, (0.010, 0.015)), strict=True)
    assert decided == speed_stats.Verdict(False, False, "prefill")  # the prefills tell: a real cost in the blocks
    decided = speed_stats.verdict(0.01, (-0.01, 0.03), target, (0.019, (0.015, 0.025)), strict=True)
    assert decided == speed_stats.Verdict(True, True, "prefill")  # neither can tell
    assert speed_stats.verdict(0.05, (0.04, 0.06), 0.05, None) == speed_stats.Verdict(True, True, "prefill")
    assert speed_stats.verdict(0.02, (0.01, 0.015), 0.02, None, strict=True).ok is False


def test_batch_ratio_and_its_interval_by_construction():
    def runs(alone, alone_none, batched, batched_none):
        return {1: {"m": {"tokens_per_s": alone}, "none": {"tokens_per_s": alone_none}},
                8: {"m": {"tokens_per_s": batched}, "none": {"tokens_per_s": batched_none}}}

    ratio, low, high = speed_stats.batch_ratio(runs([20.0] * 3, [10.0] * 3, [36.0] * 3, [20.0] * 3), 8, "m")
    assert ratio == pytest.approx(0.9) and low == pytest.approx(0.9) and high == pytest.approx(0.9)
    # three rounds: each speed-up's interval is its min-max (1.9 to 2.1 alone, 1.7 to 1.9 batched)
    ratio, low, high = speed_stats.batch_ratio(runs([19.0, 20.0, 21.0], [10.0] * 3, [34.0, 36.0, 38.0], [20.0] * 3), 8, "m")
    assert (ratio, low, high) == pytest.approx((1.8 / 2.0, 1.7 / 2.1, 1.9 / 1.9))
    assert speed_stats._batch_verdict(ratio, low, high) == "pass (within noise)"
    assert speed_stats._batch_verdict(0.85, 0.8, 0.89) == "**FAIL**"
