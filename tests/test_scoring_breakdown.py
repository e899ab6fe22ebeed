"""``eval/scoring_breakdown.py`` times vtoken's own functions by replacing them for a while: every
function it names must still exist (a rename would otherwise time nothing), each timed part must see
the calls a pruned forward makes, and the functions must be the originals again afterwards (an
inherited method is not left behind on the subclass)."""

import sys
from pathlib import Path

import torch

import vtoken
from tiny import llava_inputs, tiny_llava

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import scoring_breakdown as breakdown  # noqa: E402


def test_every_timed_function_exists():
    for parts in breakdown.PARTS.values():
        assert len({part.label for part in parts}) == len(parts)
        for part in parts:
            owner, attribute = breakdown._resolve(part.target)
            assert callable(getattr(owner, attribute)), part.target


def test_timers_count_a_pruned_forward_and_put_every_function_back():
    from vtoken.strategies.transprune import TransPruneStrategy

    parts = breakdown.PARTS["transprune"]
    before = {part.target: breakdown._resolve(part.target) for part in parts}
    before = {target: getattr(owner, name) for target, (owner, name) in before.items()}
    model = tiny_llava()
    x = llava_inputs()
    timers = breakdown.Timers(parts)
    with timers.installed(), vtoken.pruned(model, "transprune", keep=0.5), torch.no_grad():
        config = vtoken.config_of(model)
        stages = config.resolved_stages()
        accumulation = config.accumulation(stages)
        model(**x)
    seconds, calls = timers.take()
    # One reduce, one key projection and one instruction-row attention per stage, one TTV (attention
    # and MLP) per accumulation layer: each part was seen that often, under the call that made it.
    reduce, observe = ("strategy.reduce",), ("strategy.observe",)
    keys = (*reduce, "layer K's input norm and keys of every token (KeyReuse.keys_for)")
    rows = (*reduce, "instruction or last rows' attention (llama_attention_rows)")
    assert len(stages) >= 2 and len(accumulation) >= 2
    for key, expected in ((reduce, len(stages)), (observe, len(accumulation)), (keys, len(stages)),
                          (rows, len(stages)), ((*rows, "scores and softmax (attention_rows)"), len(stages))):
        assert calls.get(key, 0) == expected and seconds[key] > 0, (key, calls.get(key), expected)
    assert calls[(*observe, "norms and dot products of TTV (token_shifts)")] == 2 * calls[observe]
    # A child's time lies inside its parent's: the parent's rest is not negative.
    rest = breakdown.with_rest(seconds)
    assert rest[(*reduce, breakdown.REST)] >= 0 and rest[(*rows, breakdown.REST)] >= 0
    after = {part.target: getattr(*breakdown._resolve(part.target)) for part in parts}
    assert after == before
    assert "reduce" not in vars(TransPruneStrategy)  # inherited from Strategy, as before


def test_rows_list_children_under_their_parent_with_its_rest_last():
    seconds = {("a",): 3.0, ("a", "b"): 1.0, ("c",): 2.0, ("c", "b"): 0.5}
    timed = breakdown.with_rest(seconds)
    assert timed[("a", breakdown.REST)] == 2.0 and timed[("c", breakdown.REST)] == 1.5
    assert breakdown.rows_in_order(timed) == [("a",), ("a", "b"), ("a", breakdown.REST), ("c",), ("c", "b"),
                                              ("c", breakdown.REST)]


def test_vflowopt_parts_see_one_map_per_request_and_a_reduce_per_stage():
    """VFlowOpt's parts: the map (the tower's queries and keys, the column mass of every patch, the
    context rows) is made once per request, at the first stage, under ``crop_importance``; every stage
    reduces; the first recycles. The report's floor is the speed bench's (``scoring_floor``), on the
    family's map shape, and is not 0 for VFlowOpt's schedule."""
    from scoring_floor import scoring_floor
    from speed_shapes import FAMILIES

    parts = breakdown.PARTS["vflowopt"]
    model = tiny_llava()
    x = llava_inputs()
    timers = breakdown.Timers(parts)
    with timers.installed(), vtoken.pruned(model, "vflowopt", keep=0.5), torch.no_grad():
        stages = vtoken.strategy_of(model).stages()  # the schedule bound to this model's depth
        costs = vtoken.schedule_of(model).scoring
        model(**x)
    seconds, calls = timers.take()
    reduce = ("strategy.reduce",)
    importance = (*reduce, "importance map, once per request (crop_importance)")
    relevance = (*importance, "context relevance (Eqs. 1-3)")
    assert len(stages) == 3 and calls[reduce] == len(stages)
    assert calls[(*importance, "tower's queries and keys (VisionSource.attention)")] == 1
    assert calls[relevance] == 1 and calls[(*relevance, "column mass of every patch (received_attention)")] == 1
    assert calls[(*relevance, "context rows' attention (attention_rows)")] == 1
    assert calls[(*reduce, "recycling (recycle_rows, Eqs. 6-7)")] == 1
    assert calls[(*reduce, "top-k selection (masked_topk)")] == len(stages) - 1
    assert all(seconds[key] > 0 for key in calls)
    assert scoring_floor([], FAMILIES["llava"].vision_map, torch.device("cpu")) == 0.0
    assert scoring_floor(costs, FAMILIES["llava"].vision_map, torch.device("cpu")) > 0.0
