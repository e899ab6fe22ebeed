"""Exact-match accuracy of the tiny LLaVA on the synthetic VQA benchmark, per family and overall.

Answers come from greedy ``model.generate(max_new_tokens=2, do_sample=False)`` on left-padded
batches built by the saved ``LlavaProcessor`` (which expands the prompt's single ``<image>`` into
144 placeholders); the first generated word is compared with the record's answer -- the same
protocol as ``vtoken.vqa.evaluate``.

Usage::

    OMP_NUM_THREADS=1 python eval/eval_tiny_llava.py --model eval/models/tiny-llava --split test --n 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import vqa_data as D
from vqa_tokenizer import prompt


def load(path):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = LlavaProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor


def answers(model, processor, records, max_new_tokens=2):
    """Greedy first generated word (lowercased) for each record."""
    images = [r["pil"] if r.get("pil") is not None else D.load_image(r) for r in records]
    inputs = processor(images=images, text=[prompt(r["question"]) for r in records],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [(t.split() or [""])[0].lower() for t in texts]


def evaluate(model, processor, records, batch_size=50, progress=None):
    """-> (overall accuracy, {family: accuracy}, {family: count})."""
    correct, total = Counter(), Counter()
    for s in range(0, len(records), batch_size):
        chunk = records[s: s + batch_size]
        for r, a in zip(chunk, answers(model, processor, chunk)):
            total[r["family"]] += 1
            correct[r["family"]] += int(a == r["answer"].lower())
        if progress:
            progress(f"{s + len(chunk)}/{len(records)} acc {sum(correct.values()) / sum(total.values()):.4f}")
    fam = {f: correct[f] / total[f] for f in D.FAMILIES if total[f]}
    return sum(correct.values()) / max(1, sum(total.values())), fam, dict(total)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent / "models" / "tiny-llava"))
    ap.add_argument("--split", default="test", choices=tuple(D.SPLITS))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="vqa_data seed")
    ap.add_argument("--data", default=None, help="a JSONL file in the vqa_data format instead of generating")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)

    model, processor = load(args.model)
    size = model.config.vision_config.image_size
    patch = model.config.vision_config.patch_size
    if args.data:
        records = D.load_jsonl(args.data)[: args.n]
    else:
        records = D.generate(args.split, args.n, seed=args.seed, image_size=size, patch_size=patch)
    t0 = time.time()
    acc, fam, counts = evaluate(model, processor, records, args.batch_size,
                                progress=lambda m: print(m, flush=True))
    print(f"{args.split} n={len(records)} (seed {args.seed}) greedy generate exact match: "
          f"overall {acc:.4f}  " + "  ".join(f"{f} {a:.4f} (n={counts[f]})" for f, a in fam.items())
          + f"  [{time.time() - t0:.0f}s]")


if __name__ == "__main__":
    main()
