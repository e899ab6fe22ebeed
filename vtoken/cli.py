"""The ``vtoken`` command line."""

from __future__ import annotations

import argparse
import shlex
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtoken", description="Visual-token pruning for VLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="every method at several budgets: kept tokens, latency, FLOPs")
    bench.add_argument("--methods", nargs="+", help="methods to run, space or comma separated (default: every registered one)")
    bench.add_argument("--budgets", nargs="+", default=None,
                       help="fractions (1/9, 0.25) or counts (64), space or comma separated; 1 = unpruned")
    bench.add_argument("--model", help="a LLaVA / LLaVA-NeXT checkpoint path or hub id, or a Qwen2-VL directory saved "
                       "with its processor, e.g. vtoken/assets/tiny-qwen2-vl (default: built-in tiny model)")
    bench.add_argument("--repeats", type=int, default=5, help="timed prefills per point (median reported)")
    bench.add_argument("--batch", type=int, default=8, help="batch size of the throughput column")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    bench.add_argument("--data", help="a VQA JSONL file (default: generated test records)")
    bench.add_argument("--limit", type=int, default=500, help="records to evaluate")
    bench.add_argument("--out", help="directory for bench.md and bench.json")
    bench.add_argument("--trained", nargs="+", metavar="METHOD=DIR", default=None,
                       help="trained methods with their weights (tokenpacker=DIR); default: those shipped")
    commands.add_parser("methods", help="list the registered methods and their options")
    _add_train_projector(commands)
    args = parser.parse_args(argv)
    try:
        return _run(args, argv)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        # A user's mistake: one line naming the problem and the fix, no traceback.
        print(f"vtoken {args.command}: error: {error}", file=sys.stderr)
        return 2


def split_list(values: list[str] | None) -> list[str] | None:
    """``["1,1/9", "2/9"]`` -> ``["1", "1/9", "2/9"]``: lists may be given space or comma separated."""
    if values is None:
        return None
    items = [item.strip() for value in values for item in value.split(",")]
    return [item for item in items if item]


def _bench_arguments(args):
    """Check every bench argument before any model runs."""
    from vtoken.bench import DEFAULT_BUDGETS, parse_budget
    from vtoken.registry import strategy_names

    methods = split_list(args.methods)
    if methods is not None:
        known = [name for name in strategy_names() if not name.startswith("_")]
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; known methods: {', '.join(known)}")
    budgets = split_list(args.budgets) or list(DEFAULT_BUDGETS)
    for budget in budgets:
        parse_budget(budget)
    trained = None
    if args.trained:
        trained = []
        for item in args.trained:
            if "=" not in item:
                raise ValueError(f"--trained {item!r}: write METHOD=DIR, e.g. tokenpacker=path/to/weights")
            trained.append(tuple(item.split("=", 1)))
    return methods, budgets, trained


def _run(args, argv) -> int:
    if args.command == "methods":
        import vtoken

        for method in vtoken.methods():
            print(f"{method['name']}: {method['summary']}")
            print(f"    sites: {', '.join(method['sites'])}; default keep: {method['default_keep']}")
            print(f"    options: {method['options']}")
            for family, verdict in method["families"].items():
                print(f"    {family}: {verdict}")
        return 0

    if args.command == "train-projector":
        return _train_projector(args)

    methods, budgets, trained = _bench_arguments(args)

    import torch

    from vtoken import bench as bench_module

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench_module.run(
        methods=methods,
        budgets=budgets,
        model_path=args.model,
        repeats=args.repeats,
        batch=args.batch,
        data=args.data,
        limit=args.limit,
        trained=trained,
        progress=lambda line: print(line, file=sys.stderr),
    )
    print(bench_module.to_markdown(rows))
    if args.out:
        command = "vtoken " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        bench_module.write(rows, args.out, command)
    return 0


def _add_train_projector(commands) -> None:
    train = commands.add_parser(
        "train-projector", help="train a TokenPacker projector for a LLaVA model (then wrap with weights=OUT)"
    )
    train.add_argument("--model", required=True, help="LLaVA directory holding the model, tokenizer and image processor")
    train.add_argument("--data", required=True, help="a VQA JSONL file (image, question, answer) or 'generated'")
    train.add_argument("--out", required=True, help="output directory (checkpoints, packer, logs); rerun to resume")
    train.add_argument("--scale", type=int, default=2, help="region side s: s*s patches become one token (2, 3, 4)")
    train.add_argument("--stage", type=int, default=1, choices=(1, 2), help="1: packer only; 2: packer and LLM")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--lr", type=float, default=None, help="default 1e-3 (stage 1) / 2e-5 (stage 2)")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--init", default="projector", help="'projector', 'random' or a packer directory (stage 2)")
    train.add_argument("--layers", type=int, nargs="+", default=None, help="vision hidden-state indices (default: scaled 12 16 22 23)")
    train.add_argument("--n", type=int, default=2000, help="records to generate with --data generated")
    train.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    train.add_argument("--no-resume", action="store_true", help="start afresh even if OUT holds checkpoints")
    train.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    train.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _train_projector(args) -> int:
    import torch

    from vtoken.packer_training import train_projector

    if args.threads:
        torch.set_num_threads(args.threads)
    train_projector(
        args.model, args.data, out=args.out, scale=args.scale, stage=args.stage, steps=args.steps,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
        init=args.init, layers=args.layers, generated=args.n, save_every=args.save_every,
        resume=not args.no_resume, mixed_precision=args.mixed_precision, device="cpu" if args.cpu else None,
    )
    print(f"TokenPacker weights in {args.out}: vtoken.wrap(model, 'tokenpacker', weights={args.out!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
