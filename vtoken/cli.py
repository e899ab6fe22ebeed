"""The ``vtoken`` command line."""

from __future__ import annotations

import argparse
import shlex
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtoken", description="Visual-token pruning for VLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="every method at several budgets: kept tokens, latency, FLOPs")
    bench.add_argument("--methods", nargs="+", help="methods to run (default: every registered one)")
    bench.add_argument("--budgets", nargs="+", default=None, help="fractions (1/9, 0.25) or counts (64); 1 = unpruned")
    bench.add_argument("--model", help="a LLaVA / LLaVA-NeXT checkpoint path or hub id (default: built-in tiny model)")
    bench.add_argument("--repeats", type=int, default=5, help="timed prefills per point (median reported)")
    bench.add_argument("--batch", type=int, default=8, help="batch size of the throughput column")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    bench.add_argument("--data", help="a VQA JSONL file (default: generated test records)")
    bench.add_argument("--limit", type=int, default=500, help="records to evaluate")
    bench.add_argument("--out", help="directory for bench.md and bench.json")
    commands.add_parser("methods", help="list the registered methods and their options")
    args = parser.parse_args(argv)

    if args.command == "methods":
        import vtoken

        for method in vtoken.methods():
            print(f"{method['name']}: {method['summary']}")
            print(f"    sites: {', '.join(method['sites'])}; default keep: {method['default_keep']}")
            print(f"    options: {method['options']}")
        return 0

    import torch

    from vtoken import bench as bench_module

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench_module.run(
        methods=args.methods,
        budgets=args.budgets or bench_module.DEFAULT_BUDGETS,
        model_path=args.model,
        repeats=args.repeats,
        batch=args.batch,
        data=args.data,
        limit=args.limit,
        progress=lambda line: print(line, file=sys.stderr),
    )
    print(bench_module.to_markdown(rows))
    if args.out:
        command = "vtoken " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        bench_module.write(rows, args.out, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
