"""Where a method's scoring time goes, function by function, inside its own prefills.

The speed bench (``eval/bench_speed.py``) measures a method's scoring as a whole (its prefill against
its replay, and the time inside the strategy's own calls) and profiles one prefill with
``torch.profiler``, whose per-op overhead inflates small calls. This script times the vtoken
functions that make up the scoring with ``time.perf_counter`` around each call (no profiler), during
batch-1 prefills of the bench's model, interleaved with unpruned prefills of the same model: medians
per prefill with min and max over the rounds, each as a share of the unpruned prefill's median.

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
from speed_report import machine_text  # noqa: E402  (eval/speed_report.py)
from speed_shapes import FAMILIES  # noqa: E402  (eval/speed_shapes.py)

import vtoken  # noqa: E402


@dataclass(frozen=True)
class Part:
    """One timed function: ``target`` is ``"module:name"`` or ``"module:Class.method"`` (looked up
    where its callers find it: a function imported into another module is timed there); ``parent``
    the label of the part whose calls contain it (None: a top-level part)."""

    label: str
    target: str
    parent: str | None = None


#: TransPrune's scoring (``vtoken/strategies/transprune.py``): TTV summarised at each accumulation
#: layer (``observe``), IGA and the selection at each stage (``reduce``).
TRANSPRUNE = (
    Part("observe: TTV of one layer (Eqs. 1-3)", "vtoken.strategies.transprune:TransPruneStrategy.observe"),
    Part("norms and dot products (token_shifts)", "vtoken.strategies.transprune:token_shifts",
         "observe: TTV of one layer (Eqs. 1-3)"),
    Part("reduce: score and select one stage", "vtoken.strategies.transprune:TransPruneStrategy.reduce"),
    Part("layer K's input norm and keys of every token (KeyReuse.keys_for)", "vtoken.adapters.key_reuse:KeyReuse.keys_for",
         "reduce: score and select one stage"),
    Part("instruction rows' attention (llama_attention_rows)", "vtoken.adapters.hf_decoder:llama_attention_rows",
         "reduce: score and select one stage"),
    Part("rotary of the rows' queries and of every key (apply_rotary)", "vtoken.adapters.hf_decoder:apply_rotary",
         "instruction rows' attention (llama_attention_rows)"),
    Part("scores and softmax (attention_rows)", "vtoken.adapters.hf_decoder:attention_rows",
         "instruction rows' attention (llama_attention_rows)"),
    Part("instruction slots (instruction_slots)", "vtoken.adapters.hf_decoder:instruction_slots",
         "reduce: score and select one stage"),
    Part("earlier layers' TTV of the candidates (observed)", "vtoken.pruner:LLMObservations.observed",
         "reduce: score and select one stage"),
    Part("IGA mean over heads and rows (Eq. 5)", "vtoken.strategies.transprune:instruction_guided_attention",
         "reduce: score and select one stage"),
    Part("score (Eq. 6)", "vtoken.strategies.transprune:combined_score", "reduce: score and select one stage"),
    Part("top-k selection (masked_topk)", "vtoken.strategies.base:masked_topk", "reduce: score and select one stage"),
    Part("after the stage: kept rows' norms and keys gathered for layer K (KeyReuse.after_stage)",
         "vtoken.adapters.key_reuse:KeyReuse.after_stage"),
)

PARTS = {"transprune": TRANSPRUNE}


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


_INHERITED = object()


class Timers:
    """Seconds and calls per part since the last :meth:`take`; only a part's outermost calls count
    (a recursive or re-entrant call is inside the outer one's time)."""

    def __init__(self, parts: tuple[Part, ...]):
        self.parts = parts
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._depth: dict[str, int] = defaultdict(int)

    def _wrap(self, label: str, function):
        def timed(*args, **kwargs):
            self._depth[label] += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth[label] -= 1
                if self._depth[label] == 0:
                    self.seconds[label] += time.perf_counter() - start
                    self.calls[label] += 1

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

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        out = (dict(self.seconds), dict(self.calls))
        self.seconds.clear()
        self.calls.clear()
        return out


def other_label(parent: str) -> str:
    return f"rest of {parent.split(':')[0]}"


def with_rest(parts: tuple[Part, ...], seconds: dict[str, float]) -> dict[str, float]:
    """``seconds`` plus, for every part with children, the time of its calls outside them."""
    out = dict(seconds)
    for part in parts:
        children = [p.label for p in parts if p.parent == part.label]
        if children:
            out[other_label(part.label)] = seconds.get(part.label, 0.0) - sum(seconds.get(c, 0.0) for c in children)
    return out


def rows_in_order(parts: tuple[Part, ...]) -> list[tuple[str, int]]:
    """``(label, depth)`` of every part, children under their parent, each parent's rest last."""
    out: list[tuple[str, int]] = []

    def visit(parent: str | None, depth: int) -> None:
        children = [p for p in parts if p.parent == parent]
        for part in children:
            out.append((part.label, depth))
            visit(part.label, depth + 1)
        if parent is not None and children:
            out.append((other_label(parent), depth))

    visit(None, 0)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(f for f in FAMILIES if not FAMILIES[f].full_size), default="llava")
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
    out = claim(args.out, args.overwrite)
    load_at_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    family = FAMILIES[args.family]
    # Two copies of the same random weights: the method wraps one, the other stays plain.
    model, plain = family.build().eval(), family.build().eval()
    inputs = family.inputs()
    parts = PARTS[args.method]

    def prefill(which) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            which(**inputs, use_cache=True)
        return time.perf_counter() - start

    unpruned, pruned, per_part, calls = [], [], defaultdict(list), {}
    timers = Timers(parts)
    with vtoken.pruned(model, args.method, keep_tokens=args.budget):
        with timers.installed():
            prefill(model)  # warm-ups
            prefill(plain)
            timers.take()
            for round_ in range(args.rounds):
                # Alternate the order so that neither run always follows the other.
                for run in (("plain", "method") if round_ % 2 else ("method", "plain")):
                    if run == "method":
                        pruned.append(prefill(model))
                        seconds, calls = timers.take()
                        timed = with_rest(parts, seconds)
                        for label, _ in rows_in_order(parts):  # a part not called this round took 0
                            per_part[label].append(timed.get(label, 0.0))
                    else:
                        unpruned.append(prefill(plain))
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
        "prefill's median, and its calls per prefill. Indented rows are calls made inside the row above; "
        "*rest of*: the row above's time outside them. Gross: the keys scoring projects and hands to layer K "
        "are in it (the bench, `eval/bench_speed.py`, nets them out).",
        "",
        "| function | ms per prefill (median) | min | max | share of unpruned prefill | calls |",
        "|---|---|---|---|---|---|",
    ]
    for label, depth in rows_in_order(parts):
        values = per_part[label]
        median = statistics.median(values)
        indent = "&nbsp;&nbsp;" * 2 * depth
        lines.append(f"| {indent}{label} | {1e3 * median:.2f} | {1e3 * min(values):.2f} | {1e3 * max(values):.2f} | "
                     f"{100 * median / base:.2f}% | {calls.get(label, '')} |")
    top = [p.label for p in parts if p.parent is None]
    total = [sum(per_part[label][i] for label in top) for i in range(args.rounds)]
    lines += ["", f"All top-level rows together: {1e3 * statistics.median(total):.2f} ms per prefill (median), "
              f"{100 * statistics.median(total) / base:.2f}% of the unpruned prefill.", ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
