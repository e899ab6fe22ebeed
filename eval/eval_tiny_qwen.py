"""The tiny Qwen2-VL on the synthetic VQA benchmark: unpruned accuracy per family (with the text-only
prior), then every method that runs on Qwen2-VL at each budget through ``vtoken bench``'s harness.

Writes the Markdown file ``--out`` (with the command that produced it) and the same name with ``.json``
beside it; refuses to replace either unless ``--overwrite`` is given.

Usage::

    OMP_NUM_THREADS=1 python eval/eval_tiny_qwen.py --model vtoken/assets/tiny-qwen2-vl --n 1000 --limit 500 \
        --out /tmp/tiny_qwen.md
    # the committed result (eval/results/tiny_qwen.md and tiny_qwen.json):
    OMP_NUM_THREADS=1 python eval/eval_tiny_qwen.py --model vtoken/assets/tiny-qwen2-vl --n 1000 --limit 500 \
        --out eval/results/tiny_qwen.md --overwrite
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from vtoken import bench
from vtoken.vqa.data import FAMILIES, generate
from vtoken.vqa.evaluate import VQAModel, evaluate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))
from output import add_output_arguments, claim, command_line  # noqa: E402  (eval/output.py)

DEFAULT_MODEL = REPO / "vtoken" / "assets" / "tiny-qwen2-vl"


def unpruned(vqa, n: int, seed: int = 0) -> dict:
    """Accuracy per family on ``n`` test records, and on the same questions about blank grey images."""
    image_size, cell, _ = vqa.grid
    records = generate("test", n, seed=seed, image_size=image_size, patch_size=cell)
    result = evaluate(vqa, records)
    blank = evaluate(vqa, [dict(r, pil=Image.new("RGB", (image_size, image_size), (120, 120, 120))) for r in records])
    return {"records": n, "accuracy": result.accuracy, "families": result.family_accuracy(),
            "counts": dict(result.total), "blank_accuracy": blank.accuracy}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--n", type=int, default=1000, help="test records of the unpruned table")
    ap.add_argument("--limit", type=int, default=500, help="test records per method and budget")
    ap.add_argument("--budgets", nargs="+", default=["1/3", "2/9", "1/9"])
    ap.add_argument("--methods", nargs="+", default=None, help="default: every method that runs on the model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    add_output_arguments(ap, "Markdown file (e.g. eval/results/tiny_qwen.md); the .json goes beside it")
    args = ap.parse_args(argv)
    out = claim(args.out, args.overwrite)
    claim(out.with_suffix(".json"), args.overwrite)
    torch.set_num_threads(args.threads)

    start = time.time()
    vqa = VQAModel.load(args.model)
    base = unpruned(vqa, args.n) if args.n else None
    said: list[str] = []

    def progress(line: str) -> None:
        said.append(line)
        print(line, flush=True)

    rows = bench.run(methods=args.methods, budgets=["1", *args.budgets], model_path=args.model,
                     repeats=args.repeats, batch=args.batch, limit=args.limit, progress=progress)
    skipped = [line for line in said if ": skipped on " in line]
    params = sum(p.numel() for p in vqa.model.parameters())
    path = Path(args.model).resolve()
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    command = command_line("eval_tiny_qwen", argv or None, prefix="OMP_NUM_THREADS=1 ")
    lines = [
        "# The tiny Qwen2-VL on the offline VQA benchmark",
        "",
        f"Produced by `{command}` ({(time.time() - start) / 60:.0f} min, 1 CPU thread).",
        "",
        f"Model: `{shown}` (`Qwen2VLForConditionalGeneration`, {params / 1e6:.2f}M parameters, "
        f"{vqa.image_tokens} visual tokens per image: 96 px images, 4 px patches, 2x2 merger; trained by "
        "`eval/train_tiny_qwen.py`). Exact match of the greedy answer.",
        "",
    ]
    if base is not None:
        lines += [
            f"## Unpruned, {base['records']} records of the `test` split (seed 0)",
            "",
            "| family | records | accuracy |",
            "|---|---|---|",
            *(f"| {f} | {base['counts'][f]} | {100 * base['families'][f]:.1f} |" for f in FAMILIES
              if f in base["families"]),
            f"| **overall** | {base['records']} | **{100 * base['accuracy']:.1f}** |",
            "",
            f"The same questions about blank grey images (the text-only prior): {100 * base['blank_accuracy']:.1f}%.",
            "",
        ]
    lines += [
        f"## Every method at {', '.join(args.budgets)}, first {rows[0].samples} records of the `test` split",
        "",
        "Retained = accuracy / unpruned accuracy; the FLOPs of this model are for one 96x96 image and 32 text "
        "tokens. TokenPacker is left out (its shipped weights are trained for the tiny LLaVA's projector), and so "
        "are the methods `vtoken.methods()` says do not run on Qwen2-VL:" if skipped else
        "Retained = accuracy / unpruned accuracy; the FLOPs of this model are for one 96x96 image and 32 text "
        "tokens. TokenPacker is left out (its shipped weights are trained for the tiny LLaVA's projector).",
        "",
        *(f"- {line}" for line in skipped),
        *([""] if skipped else []),
        bench.to_markdown(rows),
    ]
    summary = bench.oracle_gap_summary(rows)
    if summary:
        lines.append(summary)
    text = "\n".join(lines)
    print(text)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "model": str(shown), "unpruned": base, "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
