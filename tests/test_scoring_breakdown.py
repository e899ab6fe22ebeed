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
        labels = {part.label for part in parts}
        for part in parts:
            owner, attribute = breakdown._resolve(part.target)
            assert callable(getattr(owner, attribute)), part.target
            assert part.parent is None or part.parent in labels, part


def test_timers_count_a_pruned_forward_and_put_every_function_back():
    from vtoken.strategies.transprune import TransPruneStrategy

    parts = breakdown.PARTS["transprune"]
    before = {part.target: breakdown._resolve(part.target) for part in parts}
    before = {target: getattr(owner, name) for target, (owner, name) in before.items()}
    model = tiny_llava()
    x = llava_inputs()
    timers = breakdown.Timers(parts)
    with vtoken.pruned(model, "transprune", keep=0.5), timers.installed(), torch.no_grad():
        model(**x)
    seconds, calls = timers.take()
    # One reduce and one key projection per stage, one TTV per accumulation layer: each part was seen.
    for label in ("reduce: score and select one stage", "observe: TTV of one layer (Eqs. 1-3)",
                  "layer K's input norm and keys of every token (KeyReuse.keys_for)",
                  "instruction rows' attention (llama_attention_rows)"):
        assert calls.get(label, 0) >= 1 and seconds[label] > 0, label
    assert calls["norms and dot products (token_shifts)"] == 2 * calls["observe: TTV of one layer (Eqs. 1-3)"]
    # A child's time lies inside its parent's: the parent's rest is not negative.
    rest = breakdown.with_rest(parts, seconds)
    assert rest[breakdown.other_label("reduce: score and select one stage")] >= 0
    after = {part.target: getattr(*breakdown._resolve(part.target)) for part in parts}
    assert after == before
    assert "reduce" not in vars(TransPruneStrategy)  # inherited from Strategy, as before


def test_rows_list_children_under_their_parent_with_its_rest_last():
    parts = (breakdown.Part("a", "m:f"), breakdown.Part("b", "m:g", "a"), breakdown.Part("c", "m:h"))
    assert breakdown.rows_in_order(parts) == [("a", 0), ("b", 1), ("rest of a", 1), ("c", 0)]
    assert breakdown.with_rest(parts, {"a": 3.0, "b": 1.0, "c": 2.0})["rest of a"] == 2.0
