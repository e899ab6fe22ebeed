"""Where a method's machinery goes: a batch-1 prefill cut into phases at the model's own module
boundaries, its replay (``eval/replay_strategy.py``: the method's recorded reductions handed back
through vtoken, no scoring) against the hand-written oracle (``eval/speed_oracle.py``: the unwrapped
model hand-run on the same schedule), in interleaved rounds in one process, medians per phase.

The phases run from the call to the first vision block, through the vision blocks, from the last
vision block to the projector, through the projector, from the projector to the first LLM layer,
through the LLM layers, and from the last LLM layer to the logits. A phase whose
time differs between the two runs is where vtoken's own work sits (hooks in the tower show in the
vision phase, the placement of the kept tokens between the projector and the LLM).

    OMP_NUM_THREADS=1 python eval/prefill_phases.py --family llava_onevision --method repshift --budget 83 \\
        --out eval/results/prefill_phases/cpu_repshift_llava_onevision.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replay_strategy as replay  # noqa: E402  (eval/replay_strategy.py)
from output import add_output_arguments, claim, command_line  # noqa: E402  (eval/output.py)
from speed_oracle import oracle_call, oracle_plan, oracle_supported  # noqa: E402  (eval/speed_oracle.py)
from speed_report import machine_text  # noqa: E402  (eval/speed_report.py)
from speed_shapes import FAMILIES  # noqa: E402  (eval/speed_shapes.py)

from vtoken.adapters import adapter_for  # noqa: E402

#: The boundaries, in the order a prefill crosses them: (name, module, before or after it).
PHASES = ("call to the vision tower", "vision blocks", "vision tower to projector", "projector",
          "projector to LLM", "LLM layers", "LLM to logits")


class Marks:
    """Timestamps at the first vision block's start, the last one's end, the projector's start and
    end, the first LLM layer's start and the last one's end (the first time each is crossed in a call)."""

    def __init__(self, model):
        description = adapter_for(model)(model).description
        vision, projector, layers = description.vision.layers, description.projector.module, description.decoder.layers
        self.times: dict[str, float] = {}
        self.handles = [
            vision[0].register_forward_pre_hook(self._mark("vision_start")),
            vision[-1].register_forward_hook(self._mark("vision_end")),
            projector.register_forward_pre_hook(self._mark("projector_start")),
            projector.register_forward_hook(self._mark("projector_end")),
            layers[0].register_forward_pre_hook(self._mark("llm_start")),
            layers[-1].register_forward_hook(self._mark("llm_end")),
        ]

    def _mark(self, name: str):
        def hook(*_):
            self.times.setdefault(name, time.perf_counter())
        return hook

    def phases(self, context, call) -> list[float]:
        """Milliseconds of each of :data:`PHASES` in one call, made inside ``context()`` (entered and
        left outside the time: the replay's wrap and unwrap, as the speed bench times it)."""
        self.times = {}
        with context(), torch.no_grad():
            start = time.perf_counter()
            call()
            end = time.perf_counter()
        t = self.times
        points = [start, t["vision_start"], t["vision_end"], t["projector_start"], t["projector_end"],
                  t["llm_start"], t["llm_end"], end]
        return [(b - a) * 1e3 for a, b in zip(points, points[1:])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="llava", choices=sorted(FAMILIES))
    parser.add_argument("--method", default="repshift")
    parser.add_argument("--budget", type=int, default=None, help="visual tokens kept (default: the family's first budget)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    add_output_arguments(parser, "the Markdown file to write")
    args = parser.parse_args(argv)
    claim(Path(args.out), args.overwrite)
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    family = FAMILIES[args.family]
    budget = args.budget if args.budget is not None else family.budgets[0]
    model = family.build()
    x = family.inputs()
    recording = replay.record(model, args.method, x, keep_tokens=budget)
    if not oracle_supported(recording, family.hand_oracle, packed_tower=family.qwen is not None):
        raise SystemExit(f"{args.method} at {budget} on {args.family}: no hand-written oracle runs this schedule")
    plan = oracle_plan(recording, x, model)
    marks = Marks(model)

    runs = {"replay": (lambda: replay.replaying(model, recording), lambda: model(**x, use_cache=True, logits_to_keep=1)),
            "oracle": (nullcontext, lambda: oracle_call(model, x, plan))}
    for run in runs.values():  # warm-up
        marks.phases(*run)
    samples = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name in (list(runs) if round_ % 2 == 0 else list(runs)[::-1]):
            samples[name].append(marks.phases(*runs[name]))

    def median(name: str, phase: int) -> float:
        return statistics.median(s[phase] for s in samples[name])

    machine = machine_text(SimpleNamespace(threads=args.threads, dtype="float32"), torch.device("cpu"), load_at_start)
    total = {name: statistics.median(sum(s) for s in samples[name]) for name in runs}
    lines = [f"# Where {args.method}'s machinery goes on {family.title} at {budget} tokens", "",
             f"Produced by `{command_line('prefill_phases', argv, 'OMP_NUM_THREADS=' + os.environ.get('OMP_NUM_THREADS', 'unset') + ' ')}`: {args.rounds} interleaved rounds after "
             "a warm-up, one process; medians per phase of a batch-1 prefill (with the KV cache, the last "
             f"position's logits). Machine: {machine}. *replay*: the method's recorded reductions through vtoken, no scoring (wrapped and unwrapped outside the timed call); *oracle*: "
             "the unwrapped model hand-run on the same schedule (`eval/speed_oracle.py`).", "",
             "| phase | replay ms | oracle ms | replay - oracle |", "|---|---|---|---|"]
    for i, phase in enumerate(PHASES):
        mine, theirs = median("replay", i), median("oracle", i)
        lines.append(f"| {phase} | {mine:.2f} | {theirs:.2f} | {mine - theirs:+.2f} |")
    lines.append(f"| whole prefill | {total['replay']:.1f} | {total['oracle']:.1f} | "
                 f"{total['replay'] - total['oracle']:+.1f} ({total['replay'] / total['oracle'] - 1:+.1%}) |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
