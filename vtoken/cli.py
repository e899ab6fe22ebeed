"""The ``vtoken`` command line.

``vtoken --help`` runs without importing torch or transformers; every argument is checked before
any model loads (``vtoken.bench_args``), and a mistake is one line naming the fix, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from vtoken.bench_args import (  # noqa: F401  (torch-free)
    ATTENTION_NAMES, DEFAULT_BUDGETS, DEFAULT_LIMIT, DTYPE_NAMES, check_bench_arguments,
    check_train_projector_arguments,
)

#: Where ``vtoken bench`` writes when ``--out`` is not given (relative to the working directory).
DEFAULT_OUT = "vtoken-bench"


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show each option's default and keep the description's line breaks."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse's own mistakes (a value of the wrong type, an unknown option, a missing value) in one
    line naming where the options are listed, as vtoken's checks report theirs, not a usage block.
    The subcommands' parsers are of this class too (``add_subparsers`` takes the parent's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="vtoken", description="Visual-token pruning for VLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_bench(commands)
    methods = commands.add_parser("methods", help="the registered methods: what each does, where it runs",
                                  formatter_class=_Help)
    methods.add_argument("name", nargs="?", help="one method: print its whole description and options")
    _add_train_projector(commands)
    negative = _negative_budget(list(sys.argv[1:] if argv is None else argv))
    if negative is not None:
        print(f"vtoken bench: error: budget {negative!r} must be positive: a fraction of the visual tokens "
              "(1/9, 0.25) or a count (64)", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return _run(args, argv)
    except BrokenPipeError:  # the reader went away (``vtoken methods | head``): nothing left to say
        sys.stdout = open(os.devnull, "w")
        return 0
    except (ValueError, OSError, ImportError) as error:
        # A user's mistake (or a model that cannot be loaded): one line naming the problem, no traceback.
        if os.environ.get("VTOKEN_DEBUG"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"vtoken {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as error:  # anything else (a corrupt weights file, a malformed record): still one line
        if os.environ.get("VTOKEN_DEBUG"):
            raise
        message = " ".join(str(error).split())
        if len(message) > 300:
            message = message[:300].rsplit(" ", 1)[0] + " ..."
        print(f"vtoken {args.command}: error: {type(error).__name__}: {message} (VTOKEN_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2


def _negative_budget(argv: list[str]) -> str | None:
    """The first negative value given to ``--budgets`` (``-1/9``, ``-.5``), if any: argparse takes such
    a value for an option (it reads only plain negative numbers as values) and would say that
    ``--budgets`` got no value at all."""
    if not argv or argv[0] != "bench" or "--budgets" not in argv:
        return None
    for token in argv[argv.index("--budgets") + 1:]:
        if token.startswith("--"):
            return None
        if len(token) > 1 and token[0] == "-" and (token[1].isdigit() or token[1] == "."):
            return token
    return None


def _add_bench(commands) -> None:
    bench = commands.add_parser(
        "bench", formatter_class=_Help,
        help="every method at several budgets: accuracy, kept tokens, FLOPs, latency, plots",
        description="Every method at several budgets on one model: accuracy on the offline benchmark, kept "
                    "tokens, FLOPs (this model and LLaVA-1.5-7B), prefill latency; writes bench.md, bench.json and "
                    "accuracy/recall-vs-FLOPs plots into --out, and ranks methods at equal cost.",
    )
    bench.add_argument("--methods", nargs="+", help="methods, space or comma separated (default: every method that "
                       "runs on the model without weights or annotations, plus the oracle and the shipped trained "
                       "and tuned rows on the default model)")
    bench.add_argument("--budgets", nargs="+", default=list(DEFAULT_BUDGETS),
                       help="fractions of the visual tokens (1/9, 0.25) or counts (64), space or comma separated; "
                       "1 = unpruned")
    bench.add_argument("--model", help="a local directory or hub id of any supported family saved with its tokenizer "
                       "and processor (accuracy too; relevant-patch recall and the oracle on LLaVA-1.5 and Qwen2-VL / "
                       "2.5-VL, e.g. vtoken/assets/tiny-qwen2-vl), or a bare LLaVA-1.5 checkpoint for speed and FLOPs "
                       "(default: the shipped tiny LLaVA)")
    bench.add_argument("--data", help="a VQA JSONL file: image, question, answer per line (default: generated "
                       "test records)")
    bench.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="records to evaluate")
    bench.add_argument("--repeats", type=int, default=5, help="timed prefills per point (median reported)")
    bench.add_argument("--batch-size", "--batch", dest="batch", type=int, default=8,
                       help="batch size of the throughput column")
    bench.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: where the model loads, "
                       "the CPU)")
    bench.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                       help="weights' dtype (default: the checkpoint's)")
    bench.add_argument("--attn", default=None, choices=ATTENTION_NAMES,
                       help="attention implementation (default: the model's)")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads, at least 1 (default: torch's)")
    bench.add_argument("--out", default=DEFAULT_OUT, help="directory for bench.md, bench.json and the plots "
                       "(rewritten after every row)")
    bench.add_argument("--trained", nargs="+", metavar="METHOD=DIR", default=None,
                       help="trained methods with their weights (tokenpacker=DIR); default: those shipped")
    bench.add_argument("--configs", nargs="+", metavar="LABEL=DIR", default=None,
                       help="saved configs (vtoken.save_config) to run as extra rows, e.g. 'vflowopt (tuned)'=DIR; "
                       "default: the tuned configs shipped for the default model")


def _run(args, argv) -> int:
    if args.command == "methods":
        from vtoken.method_text import describe, summary_lines

        if args.name is not None and not args.name.strip():
            raise ValueError("an empty method name; name a method, or leave it out for the list")
        if args.name:
            print(describe(args.name))
        else:
            print("\n".join(summary_lines()))
        return 0

    if args.command == "train-projector":
        return _train_projector(args)

    methods, budgets, trained, configs = check_bench_arguments(args)

    import torch

    from vtoken import bench as bench_module
    from vtoken.bench_plot import plot
    from vtoken.bench_report import matched_cost_summary, short_table, write
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one progress bar: the sweep's
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "vtoken " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    written, skipped = {}, []

    def save(rows):  # (the points skipped so far go into bench.md too, as notes)
        written.update(write(rows, args.out, command, notes=[f"Not measured: {line}" for line in skipped]))

    rows = bench_module.run(
        methods=methods, budgets=budgets, model_path=args.model, repeats=args.repeats, batch=args.batch,
        data=args.data, limit=args.limit, trained=trained, configs=configs, device=args.device,
        dtype=args.dtype, attn=args.attn, on_row=save, bar=sys.stderr.isatty(),
        progress=lambda line: print(line, file=sys.stderr), skipped=skipped,
    )
    save(rows)  # the skips after the last row too
    written.update(plot(rows, args.out))
    print(short_table(rows))
    summary = matched_cost_summary(rows)
    if summary:
        print(summary)
    print("Written: " + ", ".join(written.values()))
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
    train.add_argument("--init", default="random", help="'random' (the published TokenPacker: official init, no "
                       "residual), 'projector' (vtoken's variant: residual, output MLP copied from the model's "
                       "projector, the shipped packers' recipe) or a packer directory (stage 2)")
    train.add_argument("--layers", type=int, nargs="+", default=None, help="vision hidden-state indices (default: scaled 12 16 22 23)")
    train.add_argument("--n", type=int, default=2000, help="records to generate with --data generated")
    train.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    train.add_argument("--no-resume", action="store_true", help="start afresh even if OUT holds checkpoints")
    train.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    train.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads, at least 1 (default: torch's)")


def _train_projector(args) -> int:
    check_train_projector_arguments(args)

    import torch

    from vtoken.packer_training import train_projector

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    made_out = not os.path.exists(args.out)
    try:
        train_projector(
            args.model, args.data, out=args.out, scale=args.scale, stage=args.stage, steps=args.steps,
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
            init=args.init, layers=args.layers, generated=args.n, save_every=args.save_every,
            resume=not args.no_resume, mixed_precision=args.mixed_precision, device="cpu" if args.cpu else None,
        )
    except BaseException:
        # A refusal once the model has loaded (--layers past its depth, an --init it cannot take) leaves
        # no empty --out behind that this call made; anything written there stays.
        if made_out and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)
        raise
    print(f"TokenPacker weights in {args.out}: vtoken.wrap(model, 'tokenpacker', weights={args.out!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
