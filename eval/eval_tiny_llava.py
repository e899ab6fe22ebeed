"""Unpruned exact-match accuracy of the tiny LLaVA on the synthetic VQA benchmark, per family.

Greedy ``generate`` on left-padded batches through the same harness as ``vtoken bench``
(``vtoken.vqa.evaluate``); writes the Markdown file ``--out`` with the command that produced it,
and refuses to replace an existing one unless ``--overwrite`` is given.

Usage::

    OMP_NUM_THREADS=1 python eval/eval_tiny_llava.py --model vtoken/assets/tiny-llava --split test --n 1000 \
        --out /tmp/tiny_llava.md
    # the committed result:
    OMP_NUM_THREADS=1 python eval/eval_tiny_llava.py --n 1000 --out eval/results/tiny_llava.md --overwrite
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from vtoken.bench import default_model_path
from vtoken.vqa.data import FAMILIES, SPLITS, generate, load_jsonl
from vtoken.vqa.evaluate import VQAModel, evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from output import add_output_arguments, claim, command_line  # noqa: E402  (eval/output.py)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--split", default="test", choices=tuple(SPLITS))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="generator seed of the split")
    ap.add_argument("--data", default=None, help="a JSONL file in the benchmark format instead of generating")
    ap.add_argument("--threads", type=int, default=1)
    add_output_arguments(ap, "Markdown file to write (e.g. eval/results/tiny_llava.md)")
    args = ap.parse_args(argv)
    out = claim(args.out, args.overwrite)
    torch.set_num_threads(args.threads)

    vqa = VQAModel.load(args.model)
    image_size, patch_size, _ = vqa.grid
    if args.data:
        records = load_jsonl(args.data)[: args.n]
    else:
        records = generate(args.split, args.n, seed=args.seed, image_size=image_size, patch_size=patch_size)
    start = time.time()
    result = evaluate(vqa, records)
    # The same questions about blank grey images: what the model answers from the text alone.
    blank = evaluate(vqa, [dict(r, pil=Image.new("RGB", (image_size, image_size), (120, 120, 120))) for r in records])
    families = result.family_accuracy()
    counts = dict(result.total)
    params = sum(p.numel() for p in vqa.model.parameters())
    model_path, repo = Path(args.model).resolve(), Path(__file__).resolve().parents[1]
    shipped = model_path == Path(default_model_path()).resolve()
    shown = model_path.relative_to(repo) if model_path.is_relative_to(repo) else model_path
    source = f"`{args.data}`" if args.data else f"the `{args.split}` split (seed {args.seed})"
    lines = [
        f"# {'The shipped tiny LLaVA' if shipped else 'A tiny LLaVA'}, unpruned",
        "",
        f"Produced by `{command_line('eval_tiny_llava', argv or None)}`"
        f" ({time.time() - start:.0f} s).",
        "",
        f"Model: `{shown}`, {params / 1e6:.2f}M parameters. Records: {len(records)} of {source};"
        " exact match of the greedy answer.",
        "",
        "| family | records | accuracy |",
        "|---|---|---|",
        *(f"| {f} | {counts[f]} | {100 * families[f]:.1f} |" for f in FAMILIES if f in families),
        f"| **overall** | {len(records)} | **{100 * result.accuracy:.1f}** |",
        "",
        f"The same questions about blank grey images (the text-only prior): {100 * blank.accuracy:.1f}%.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out.write_text(text)


if __name__ == "__main__":
    main()
