"""Where a method's scoring time goes, function by function, inside its own prefills.

The speed bench (``eval/bench_speed.py``) measures a method's scoring as a whole (its prefill against
its replay, and the time inside the strategy's own calls) and profiles one prefill with
``torch.profiler``, whose per-op overhead inflates small calls. This script times the vtoken
functions that make up the scoring (``PARTS``: TransPrune, FastV, AIF, VFlowOpt) with ``time.perf_counter``
around each call (no profiler), during batch-1 prefills of the bench's model, interleaved with
unpruned prefills of a second copy of it: medians per prefill with min and max over the rounds, each
as a share of the unpruned prefill's median. A call made inside another timed call is shown under it
(found as the calls run), with the outer call's time outside its timed calls as its *rest*.

    OMP_NUM_THREADS=1 python eval/scoring_breakdown.py --method transprune --budget 64 --rounds 30 \\
        --out eval/results/bench_speed/cpu_transprune_breakdown.md

The times are gross: a stage that hands the keys it projected to its layer (``KeyReuse.keys_for``,
``vtoken/adapters/key_reuse.py``) spares that layer the same work on the kept rows, which the bench
takes off (its "net of ... handed to the layers"); a row here does not. Timed in place, a call pays
for reading tensors and weights the model's layers left out of cache, which a loop over one call
alone (hot caches) does not show.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from output import add_output_arguments, claim, command_line, environment_prefix  # noqa: E402  (eval/output.py)
from scoring_floor import scoring_floor  # noqa: E402  (eval/scoring_floor.py)
from speed_report import machine_text  # noqa: E402  (eval/speed_report.py)
from speed_shapes import FAMILIES, family_at  # noqa: E402  (eval/speed_shapes.py)
from speed_timing import STRATEGY_CALLS  # noqa: E402  (eval/speed_timing.py)

import vtoken  # noqa: E402


@dataclass(frozen=True)
class Part:
    """One timed function: ``target`` is ``"module:name"`` or ``"module:Class.method"``, looked up
    where its callers find it (a function imported into another module is timed there)."""

    label: str
    target: str


def strategy_calls(module: str, cls: str, calls: tuple[str, ...] = STRATEGY_CALLS) -> tuple[Part, ...]:
    """The strategy's own calls (by default every one the bench times, ``speed_timing.STRATEGY_CALLS``)."""
    return tuple(Part(f"strategy.{call}", f"{module}:{cls}.{call}") for call in calls)


#: Helpers an in-LLM method's scoring calls (looked up where their callers find them).
ATTENTION_ROWS = (
    Part("instruction or last rows' attention (llama_attention_rows)", "vtoken.adapters.hf_decoder:llama_attention_rows"),
    Part("rotary (apply_rotary)", "vtoken.adapters.hf_decoder:apply_rotary"),
    Part("scores and softmax (attention_rows)", "vtoken.adapters.hf_decoder:attention_rows"),
    Part("query slots (instruction_slots)", "vtoken.adapters.hf_decoder:instruction_slots"),
    Part("top-k selection (masked_topk)", "vtoken.strategies.base:masked_topk"),
)

#: TransPrune's scoring (``vtoken/strategies/transprune.py``): TTV summarised at each accumulation
#: layer (``observe``), IGA and the selection at each stage (``reduce``), the kept rows' norms and
#: keys gathered for layer K after it.
TRANSPRUNE = strategy_calls("vtoken.strategies.transprune", "TransPruneStrategy", ("reduce", "observe")) + (
    Part("norms and dot products of TTV (token_shifts)", "vtoken.strategies.transprune:token_shifts"),
    Part("layer K's input norm and keys of every token (KeyReuse.keys_for)", "vtoken.adapters.key_reuse:KeyReuse.keys_for"),
    Part("earlier layers' TTV of the candidates (observed)", "vtoken.pruner:LLMObservations.observed"),
    Part("IGA mean over heads and rows (Eq. 5)", "vtoken.strategies.transprune:instruction_guided_attention"),
    Part("score (Eq. 6)", "vtoken.strategies.transprune:combined_score"),
    Part("kept rows' norms and keys gathered for layer K (KeyReuse.after_stage)",
         "vtoken.adapters.key_reuse:KeyReuse.after_stage"),
) + ATTENTION_ROWS

#: FastV's scoring (``vtoken/strategies/fastv.py``): the last token's attention at layer K-1, its
#: keys read back from the KV cache.
FASTV = strategy_calls("vtoken.strategies.fastv", "FastVStrategy", ("reduce",)) + (
    Part("layer K-1's keys read from its KV cache (compat.prompt_keys)", "vtoken.compat:prompt_keys"),
) + ATTENTION_ROWS

#: AIF's scoring (``vtoken/strategies/aif.py``): the instruction rows' attention at every layer of the
#: probe (a hook beside the layer's own attention), the decision, and the text rerun over the cache.
AIF = strategy_calls("vtoken.strategies.aif", "AIFStrategy", ("reduce", "observe_attention")) + (
    Part("observed attention hook (DecoderPruning._attention_observed)",
         "vtoken.adapters.hf_decoder:DecoderPruning._attention_observed"),
    Part("layer K's keys read from its KV cache (compat.prompt_keys)", "vtoken.compat:prompt_keys"),
    Part("the text after the image rerun masked (MaskStagePass._recompute)",
         "vtoken.adapters.mask_stage:MaskStagePass._recompute"),
) + ATTENTION_ROWS

#: VFlowOpt's scoring (``vtoken/strategies/vflowopt.py``): the importance map made once per request
#: at its first stage (a vision layer's attention recomputed beside SDPA: every patch's column mass
#: and the context rows, Eqs. 1-3; the patches' gray-level entropy, Eq. 4), the recycling of dropped
#: tokens into their cells (Eqs. 6-7) and the later stages' selections.
VFLOWOPT = strategy_calls("vtoken.strategies.vflowopt", "VFlowOptStrategy", ("reduce",)) + (
    Part("importance map, once per request (crop_importance)", "vtoken.strategies.vflowopt:VFlowOptStrategy.crop_importance"),
    Part("context relevance (Eqs. 1-3)", "vtoken.strategies.vflowopt:context_relevance"),
    Part("packed tower's queries, keys and tables (PackedVisionSource.attention)",
         "vtoken.adapters.qwen_vision:PackedVisionSource.attention"),
    Part("column mass of every patch, per frame (received_attention)", "vtoken.adapters.qwen_vision:received_attention"),
    Part("context rows' attention, per frame (attention_rows)", "vtoken.adapters.qwen_vision:attention_rows"),
    Part("tower's queries and keys (VisionSource.attention)", "vtoken.adapters.vision_site:VisionSource.attention"),
    Part("column mass of every patch (received_attention)", "vtoken.adapters.vision_site:received_attention"),
    Part("context rows' attention (attention_rows)", "vtoken.adapters.vision_site:attention_rows"),
    Part("gray-level entropy (patch_entropy, Eq. 4)", "vtoken.strategies.vflowopt:patch_entropy"),
    Part("importance (importance_map, Eq. 4)", "vtoken.strategies.vflowopt:importance_map"),
    Part("recycling (recycle_rows, Eqs. 6-7)", "vtoken.strategies.vflowopt:recycle_rows"),
    Part("top-k selection (masked_topk)", "vtoken.strategies.vflowopt:masked_topk"),
)

PARTS = {"transprune": TRANSPRUNE, "fastv": FASTV, "aif": AIF, "vflowopt": VFLOWOPT}

_INHERITED = object()

#: A row's key: the labels of the timed calls it was made inside, outermost first, then its own.
Key = tuple


def _resolve(target: str) -> tuple[object, str]:
    """``(owner, attribute)`` of ``target``: the module or class holding the function."""
    module_name, path = target.split(":")
    owner: object = importlib.import_module(module_name)
    *classes, attribute = path.split(".")
    for name in classes:
        owner = getattr(owner, name)
    if not hasattr(owner, attribute):
        raise SystemExit(f"scoring_breakdown: {target} does not exist (renamed?); update PARTS in eval/scoring_breakdown.py")
    return owner, attribute


class Timers:
    """Seconds and calls per part since the last :meth:`take`, keyed by the timed calls each was made
    inside (found as the calls run, so a helper called from two places shows under each). A call made
    inside another call of the same part is in that call's time and not counted again."""

    def __init__(self, parts: tuple[Part, ...]):
        self.parts = parts
        self.seconds: dict[Key, float] = defaultdict(float)
        self.calls: dict[Key, int] = defaultdict(int)
        self._stack: list[str] = []

    def _wrap(self, label: str, function):
        def timed(*args, **kwargs):
            if label in self._stack:
                return function(*args, **kwargs)
            key = (*self._stack, label)
            self._stack.append(label)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self.calls[key] += 1
                self._stack.pop()

        return timed

    @contextmanager
    def installed(self):
        undo = []
        try:
            for part in self.parts:
                owner, attribute = _resolve(part.target)
                # A class may inherit the method (TransPrune's reduce is Strategy's): put back what its
                # own namespace held, nothing where it held nothing.
                undo.append((owner, attribute, vars(owner).get(attribute, _INHERITED)))
                setattr(owner, attribute, self._wrap(part.label, getattr(owner, attribute)))
            yield self
        finally:
            for owner, attribute, original in reversed(undo):
                if original is _INHERITED:
                    delattr(owner, attribute)
                else:
                    setattr(owner, attribute, original)

    def take(self) -> tuple[dict[Key, float], dict[Key, int]]:
        out = (dict(self.seconds), dict(self.calls))
        self.seconds.clear()
        self.calls.clear()
        return out


REST = "rest"


def with_rest(seconds: dict[Key, float]) -> dict[Key, float]:
    """``seconds`` plus, under every timed call that made others, ``(*its key, REST)``: its time
    outside them."""
    out = dict(seconds)
    for key in {key[:-1] for key in seconds if len(key) > 1}:
        inside = sum(value for child, value in seconds.items() if child[:-1] == key)
        out[(*key, REST)] = seconds.get(key, 0.0) - inside
    return out


def rows_in_order(keys) -> list[Key]:
    """Every row's key: top-level calls first (in the order first seen), each followed by the calls
    made inside it, its rest last."""
    keys = list(dict.fromkeys(keys))
    out: list[Key] = []

    def visit(path: Key) -> None:
        for key in keys:
            if key[:-1] == path and key[-1] != REST:
                out.append(key)
                visit(key)
        if (*path, REST) in keys:
            out.append((*path, REST))

    visit(())
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(f for f in FAMILIES if not FAMILIES[f].full_size), default="llava")
    parser.add_argument("--llm-layers", default=None,
                        help="the scaled LLM's decoder layers (default: the family's), or 'real': the real model's")
    parser.add_argument("--method", choices=sorted(PARTS), default="transprune")
    parser.add_argument("--budget", type=int, default=64, help="visual tokens kept (keep_tokens)")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds, each one unpruned and one pruned prefill")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="", help="a line for the report (the commit, what else ran)")
    add_output_arguments(parser, "the Markdown report")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (medians of fewer say little)")
    if args.budget < 1:
        parser.error(f"--budget is the visual tokens kept, at least 1 (got {args.budget})")
    try:
        family = family_at(args.family, args.llm_layers)
    except ValueError as error:
        parser.error(str(error))
    out = claim(args.out, args.overwrite)
    load_at_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    # Two copies of the same random weights: the method wraps one, the other stays plain.
    model, plain = family.build().eval(), family.build().eval()
    inputs = family.inputs()
    parts = PARTS[args.method]

    def prefill(which) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            which(**inputs, use_cache=True)
        return time.perf_counter() - start

    unpruned, pruned, rounds = [], [], []
    timers = Timers(parts)
    # Timed before the wrap: a hook the wrap registers holds the function it found then.
    with timers.installed():
        with vtoken.pruned(model, args.method, keep_tokens=args.budget):
            costs = vtoken.schedule_of(model, visual_tokens=family.visual).scoring
            prefill(model)  # warm-ups
            prefill(plain)
            timers.take()
            for round_ in range(args.rounds):
                # Alternate the order so that neither run always follows the other.
                for run in (("plain", "method") if round_ % 2 else ("method", "plain")):
                    if run == "method":
                        pruned.append(prefill(model))
                        seconds, calls = timers.take()
                        rounds.append((with_rest(seconds), calls))
                    else:
                        unpruned.append(prefill(plain))
    # A row not reached in some round took 0 there.
    rows = rows_in_order(key for seconds, _ in rounds for key in seconds)
    per_row = {key: [seconds.get(key, 0.0) for seconds, _ in rounds] for key in rows}
    calls_per_row = {key: statistics.median(calls.get(key, 0) for _, calls in rounds) for key in rows}
    base = statistics.median(unpruned)
    machine = machine_text(SimpleNamespace(threads=args.threads, dtype="float32"), torch.device("cpu"), load_at_start)
    lines = [
        f"# Where {args.method}'s scoring time goes: {family.title} at {args.budget} tokens",
        "",
        f"Produced by `{command_line('scoring_breakdown', argv, environment_prefix(('OMP_NUM_THREADS', 'GLIBC_TUNABLES')))}` ({args.rounds} rounds, "
        f"each an unpruned and a pruned batch-1 prefill in alternating order, after a warm-up). Machine: {machine}."
        + (f" {args.note}" if args.note else ""),
        "",
        f"Model: {family.description}, float32, on cpu. Unpruned prefill {1e3 * base:.0f} ms (median of {args.rounds}, "
        f"min {1e3 * min(unpruned):.0f}, max {1e3 * max(unpruned):.0f}); pruned prefill {1e3 * statistics.median(pruned):.0f} ms.",
        "",
        "Each row: the time inside that function's calls during one pruned prefill (perf_counter around each "
        "outermost call, no profiler), median over the rounds with min and max, as a share of the unpruned "
        "prefill's median, and its calls per prefill (median). Indented rows are timed calls made inside the "
        "row above them (found as the calls run); *rest of*: that row's time outside them. Gross: keys the "
        "scoring projects and hands to layer K are in it (the bench, `eval/bench_speed.py`, nets them out).",
        "",
        "| function | ms per prefill (median) | min | max | share of unpruned prefill | calls |",
        "|---|---|---|---|---|---|",
    ]
    for key in rows:
        values = per_row[key]
        median = statistics.median(values)
        label = f"rest of {key[-2]}" if key[-1] == REST else key[-1]
        calls = "" if key[-1] == REST else f"{calls_per_row[key]:g}"
        lines.append(f"| {'&nbsp;' * 4 * (len(key) - 1)}{label} | {1e3 * median:.2f} | {1e3 * min(values):.2f} | "
                     f"{1e3 * max(values):.2f} | {100 * median / base:.2f}% | {calls} |")
    total = [sum(seconds.get(key, 0.0) for key in rows if len(key) == 1) for seconds, _ in rounds]
    lines += ["", f"All top-level rows together: {1e3 * statistics.median(total):.2f} ms per prefill (median), "
              f"{100 * statistics.median(total) / base:.2f}% of the unpruned prefill."]
    floor = scoring_floor(costs, family.vision_map, torch.device("cpu"))
    if floor:  # a whole attention map: its least work timed apart, hot in cache, as the bench does
        lines += ["", f"Its floor (`eval/scoring_floor.py`, as in the speed bench: the quicker exact form of the whole map's "
                  f"column mass, timed alone on one image's map shape, {family.vision_map}): {1e3 * floor:.2f} ms, "
                  f"{100 * floor / base:.2f}% of the unpruned prefill."]
    lines.append("")
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
