"""VFlowOpt's flow-guided hyper-parameter search on the shipped tiny LLaVA, with accuracy before and after.

    OMP_NUM_THREADS=1 python eval/tune_vflowopt.py --keep 1/9 --trials 30 --out /tmp/vflowopt
    # the committed result (eval/results/vflowopt_tune.md, eval/results/vflowopt-tuned-1of9/):
    OMP_NUM_THREADS=1 python eval/tune_vflowopt.py --keep 1/9 --trials 40 --out eval/results --overwrite

The calibration set is ``--calibration`` records of the *validation* split (never test); the search
(``vtoken.tune``, optuna TPE, seeded) minimises the discrepancy of the last token's final
representation with and without pruning. Into the folder ``--out`` go the tuned config,
``vflowopt-tuned-<keep>/vtoken_config.json`` (``vtoken.wrap(model, config=DIR)`` loads it), and
``vflowopt_tune.md``: test accuracy of the default and the tuned config at the same budget. Either
file already there is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

import vtoken
from vtoken.bench import default_model_path
from vtoken.vqa.data import generate
from vtoken.vqa.evaluate import VQAModel, evaluate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))
from output import add_output_arguments, claim, command_line  # noqa: E402  (eval/output.py)


def accuracy(vqa: VQAModel, records, **wrap) -> tuple[float, dict]:
    with vtoken.pruned(vqa.model, "vflowopt", **wrap):
        result = evaluate(vqa, records)
    return result.accuracy, result.family_accuracy()


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it, else as an absolute path."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--keep", default="1/9", help="budget as a fraction of the visual tokens")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--calibration", type=int, default=64, help="validation records to tune on")
    ap.add_argument("--test", type=int, default=1000, help="test records to measure accuracy on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    add_output_arguments(ap, "output folder (vflowopt_tune.md, vflowopt-tuned-<keep>/vtoken_config.json)")
    args = ap.parse_args(argv)
    tag = f"vflowopt-tuned-{args.keep.replace('/', 'of')}"
    results = claim(args.out, args.overwrite, "vflowopt_tune.md", f"{tag}/vtoken_config.json")
    torch.set_num_threads(args.threads)

    keep = float(Fraction(args.keep))
    vqa = VQAModel.load(args.model)
    image_size, patch_size, _ = vqa.grid
    calibration_records = generate("validation", args.calibration, seed=0, image_size=image_size, patch_size=patch_size)
    calibration = [vqa.encode(calibration_records[i : i + 16]) for i in range(0, len(calibration_records), 16)]
    out = results / tag
    start = time.time()
    tuned = vtoken.tune(vqa.model, "vflowopt", calibration=calibration, trials=args.trials, seed=args.seed,
                        keep=keep, save=out)
    minutes = (time.time() - start) / 60

    test = generate("test", args.test, seed=0, image_size=image_size, patch_size=patch_size)
    base_acc, base_fam = accuracy(vqa, test, keep=keep)
    tuned_acc, tuned_fam = accuracy(vqa, test, config=tuned)
    searched = {k: getattr(tuned, k) for k in ("stage1", "r2", "t", "a", "alpha") if hasattr(tuned, k)}
    families = sorted(base_fam)
    command = command_line("tune_vflowopt", argv or None)
    lines = [
        "# VFlowOpt: default against flow-tuned hyper-parameters on the shipped tiny LLaVA",
        "",
        f"Produced by `{command}` ({minutes:.1f} min of search, {args.trials} trials on {args.calibration}"
        f" validation records; test accuracy on {args.test} test records). Budget: keep {args.keep}"
        " of the visual tokens (layer-averaged, paper Eq. 5).",
        "",
        f"Tuned config: `{shown(out)}/vtoken_config.json`: "
        + ", ".join(f"{k}={v:.4g}" for k, v in searched.items()),
        "",
        "| config | accuracy | " + " | ".join(families) + " |",
        "|---|---|" + "---|" * len(families),
        f"| default | {100 * base_acc:.1f} | " + " | ".join(f"{100 * base_fam[f]:.1f}" for f in families) + " |",
        f"| tuned | {100 * tuned_acc:.1f} | " + " | ".join(f"{100 * tuned_fam[f]:.1f}" for f in families) + " |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (results / "vflowopt_tune.md").write_text(text)


if __name__ == "__main__":
    main()
