"""What glibc's malloc settings do to a CPU prefill: the speed bench's unpruned LLaVA-1.5 shape
(``eval/speed_shapes.py``) timed in child processes with glibc's defaults and with
``GLIBC_TUNABLES`` keeping freed memory in the heap, alternately, with the page faults each prefill
makes.

By default glibc hands a freed block above its mmap threshold back to the system, and trims the
heap's top once the free space there passes its trim threshold; a prefill's large activations then
fault their pages in again (and have them zeroed) on every call. Raising both thresholds keeps
them: fewer faults, a faster prefill and a narrower spread, which is what a benchmark of a few
percent needs. The settings are process-wide and read at start-up, so each measurement is its own
process. Linux with glibc only.

    OMP_NUM_THREADS=1 python eval/malloc_effect.py --out eval/results/malloc_effect.md --overwrite
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from output import add_output_arguments, claim, command_line, environment_prefix  # noqa: E402  (eval/output.py)

#: Both thresholds at their largest useful values: blocks up to 32 MB come from the heap, and the heap
#: is not trimmed below 1 GB.
TUNED = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"


def child(prefills: int) -> None:
    """Runs in the child: a warm-up prefill, then ``prefills`` timed ones; prints JSON."""
    import torch

    from speed_shapes import prompt, scaled_llava

    torch.set_num_threads(1)
    model, x = scaled_llava().eval(), prompt()
    times, faults = [], []
    with torch.no_grad():
        model(**x, use_cache=True, logits_to_keep=1)
        for _ in range(prefills):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            model(**x, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"ms": [t * 1e3 for t in times], "faults": faults}))


def measure(tuned: bool, prefills: int) -> dict:
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if tuned:
        env["GLIBC_TUNABLES"] = TUNED
    out = subprocess.run([sys.executable, __file__, "--child", str(prefills)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # this script run again as a measuring process
        child(int(argv[1]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="processes per setting, alternating (default 4)")
    parser.add_argument("--prefills", type=int, default=8, help="timed prefills per process (default 8)")
    add_output_arguments(parser, "Markdown file (e.g. eval/results/malloc_effect.md)")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("malloc_effect: GLIBC_TUNABLES exists on Linux with glibc only")
    out = claim(args.out, args.overwrite)
    runs = {False: [], True: []}
    for r in range(args.rounds):
        for tuned in ((False, True) if r % 2 == 0 else (True, False)):
            runs[tuned].append(measure(tuned, args.prefills))
            print(f"round {r + 1}/{args.rounds} {'tuned' if tuned else 'default'} done", flush=True)
    rows = []
    for tuned, name in ((False, "glibc defaults"), (True, f"`GLIBC_TUNABLES={TUNED}`")):
        ms = [t for run in runs[tuned] for t in run["ms"]]
        faults = [f for run in runs[tuned] for f in run["faults"]]
        rows.append(f"| {name} | {statistics.median(ms):.0f} | {min(ms):.0f} | {max(ms):.0f} | "
                    f"{statistics.pstdev(ms) / statistics.mean(ms) * 100:.1f}% | {statistics.median(faults):.0f} |")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    text = "\n".join([
        "# A CPU prefill with glibc's malloc defaults and with freed memory kept in the heap",
        "",
        f"Produced by `{command_line('malloc_effect', argv, environment_prefix(('OMP_NUM_THREADS',)))}`: the speed bench's unpruned LLaVA-1.5 shape "
        f"(`eval/speed_shapes.py`, float32, batch 1, one torch thread, OMP_NUM_THREADS={threads}), "
        f"{args.rounds} processes per setting run alternately, {args.prefills} timed prefills each after a "
        f"warm-up; minor page faults per prefill from `getrusage`. Load average at the end: "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}.",
        "",
        "| malloc | prefill ms (median) | min | max | spread (std / mean) | page faults per prefill (median) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
