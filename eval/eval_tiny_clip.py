"""Zero-shot accuracy and retrieval of the tiny CLIP, unpruned and under each vision-only method.

On held-out subject scenes (``clip_data``, default: 500 of the ``test`` split):

* **zero-shot**: the 30 class prompts ("a large red circle", ...) through the text tower; each image
  is assigned the class whose prompt embedding has the highest cosine with its image embedding
  (chance 1/30 = 3.3%); colour-only and shape-only accuracy of the same prediction beside it;
* **retrieval recall@1**, image->text and text->image, among the images' full captions (a hit when
  the retrieved caption is the image's own caption text);
* optionally (``--benchmark-n``) retrieval on the VQA benchmark's own test images and their captions.

Then for every method that runs on the CLIP family (``vtoken.methods()``; by default ``tome``,
``repshift``, ``visionzip``, ``random`` and ``pool`` are asked for) and every budget (``keep`` =
0.75, 0.5, 0.25 of the 144 patch tokens): ``vtoken.wrap(model, method, keep=keep)`` on the
``CLIPModel``, ``model.get_image_features(pixel_values=...)`` as usual, ``vtoken.unwrap(model)``.
Text embeddings are computed once, unwrapped. A method the registry says does not run on CLIP, or
that ``wrap`` refuses (``ValueError``), is skipped with the reason printed and written in the table.
After the last method the unwrapped model must give the unpruned image embeddings again (checked).

Writes ``<out>.md`` and ``<out>.json`` (``--out`` is the stem) with the command in the header;
refuses to replace either unless ``--overwrite`` is given.

Usage::

    OMP_NUM_THREADS=1 python eval/eval_tiny_clip.py --model vtoken/assets/tiny-clip --split test --n 500 \
        --out /tmp/tiny_clip/eval
    # the committed result (eval/results/tiny_clip/eval.md and eval.json):
    OMP_NUM_THREADS=1 python eval/eval_tiny_clip.py --model vtoken/assets/tiny-clip --split test --n 500 \
        --out eval/results/tiny_clip/eval --overwrite
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F

import clip_data as C
from output import add_output_arguments, claim_stem, command_line
from train_tiny_clip import _tensor, embed_texts  # the trainer's encoders: evaluation embeds as training did

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "vtoken" / "assets" / "tiny-clip"
DEFAULT_METHODS = ("tome", "repshift", "visionzip", "random", "pool")
FAMILY = "CLIP"  # the family name vtoken.methods() reports for CLIPModel


def code_version() -> str:
    """The checkout's commit, and whether vtoken's code differs from it (uncommitted changes)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "vtoken"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}" + (" plus uncommitted changes to vtoken" if dirty else "")


def load(model_dir):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(model_dir)).eval()
    processor = CLIPProcessor.from_pretrained(str(model_dir))
    return model, processor


@torch.no_grad()
def image_embeddings(model, pixel_values, batch_size=100) -> torch.Tensor:
    out = [_tensor(model.get_image_features(pixel_values=pixel_values[i: i + batch_size]))
           for i in range(0, len(pixel_values), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def text_embeddings(model, tokenizer, texts, batch_size=250) -> torch.Tensor:
    """The texts embedded as the trainer embeds them (``train_tiny_clip.embed_texts``), in float32."""
    return embed_texts(model, tokenizer, texts, batch_size).float()


def zero_shot(image_emb, class_emb, labels) -> dict:
    pred = (image_emb @ class_emb.T).argmax(-1).tolist()
    n = len(labels)
    return {
        "zero_shot": sum(p == t for p, t in zip(pred, labels)) / n,
        "zero_shot_colour": sum(C.CLASSES[p][0] == C.CLASSES[t][0] for p, t in zip(pred, labels)) / n,
        "zero_shot_shape": sum(C.CLASSES[p][1] == C.CLASSES[t][1] for p, t in zip(pred, labels)) / n,
    }


def retrieval(image_emb, text_emb, captions, prefix="") -> dict:
    sim = image_emb @ text_emb.T
    i2t, t2i = sim.argmax(1).tolist(), sim.argmax(0).tolist()
    n = len(captions)
    return {f"{prefix}i2t_r1": sum(captions[j] == captions[i] for i, j in enumerate(i2t)) / n,
            f"{prefix}t2i_r1": sum(captions[i] == captions[j] for j, i in enumerate(t2i)) / n}


def family_status(method: str) -> str | None:
    """``None`` when the registry says ``method`` runs on CLIP, else why not (registry text)."""
    import vtoken

    entry = next((m for m in vtoken.methods() if m["name"] == method), None)
    if entry is None:
        return f"not a registered method (registered: {', '.join(m['name'] for m in vtoken.methods())})"
    families = entry.get("families", {})
    clip = next((v for k, v in families.items() if k.lower() == FAMILY.lower()), None)
    if clip is None:
        return None  # the registry does not list the family yet: let wrap decide
    return None if clip == "runs" else clip


def runnable_methods(requested) -> list[str]:
    """``requested`` in order, then every other registered method that runs on CLIP without
    annotations or trained weights (so a method added later is picked up)."""
    import vtoken

    extra = [m["name"] for m in vtoken.methods()
             if m["name"] not in requested and not m.get("needs_annotations") and not m.get("trained")
             and any(k.lower() == FAMILY.lower() and v == "runs" for k, v in m.get("families", {}).items())]
    return [*requested, *extra]


def kept_tokens(model) -> dict | None:
    """Per stage, the visual tokens the first image of the last forward kept (``vtoken.selection``)."""
    import vtoken

    try:
        sel = vtoken.selection(model)
        return {stage: int(len(idx)) for stage, idx in sel[0].items()} if sel else None
    except Exception:  # noqa: BLE001 - informational only
        return None


def evaluate(args, argv) -> dict:
    import vtoken

    torch.set_num_threads(args.threads)
    model, processor = load(args.model)
    tok = processor.tokenizer
    n_patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    recs = C.records(args.split, args.n, seed=args.seed)
    pixel_values = processor(images=[r["pil"] for r in recs], return_tensors="pt")["pixel_values"]
    labels = [r["label"] for r in recs]
    captions = [r["caption"] for r in recs]
    text_emb = text_embeddings(model, tok, captions)
    class_emb = text_embeddings(model, tok, C.class_prompts())
    bench = None
    if args.benchmark_n:
        brecs = C.benchmark_records(args.split, args.benchmark_n, seed=args.seed)
        bench = (processor(images=[r["pil"] for r in brecs], return_tensors="pt")["pixel_values"],
                 [r["caption"] for r in brecs])
        bench = (*bench, text_embeddings(model, tok, bench[1]))

    def measure() -> dict:
        start = time.perf_counter()
        emb = image_embeddings(model, pixel_values, args.batch)
        row = {**zero_shot(emb, class_emb, labels), **retrieval(emb, text_emb, captions)}
        row["seconds"] = time.perf_counter() - start
        if bench is not None:
            row.update(retrieval(image_embeddings(model, bench[0], args.batch), bench[2], bench[1], "bench_"))
        return row, emb

    rows = []
    base, base_emb = measure()
    rows.append({"method": "none", "keep": 1.0, "tokens": n_patches, "status": "ok", **base})
    print(_fmt(rows[-1]), flush=True)
    methods = runnable_methods(args.methods) if args.all_methods else list(args.methods)
    for method in methods:
        reason = family_status(method)
        for keep in args.budgets:
            row = {"method": method, "keep": keep, "tokens": round(keep * n_patches)}
            if reason is not None:
                rows.append({**row, "status": "skipped", "reason": reason})
                print(f"skip {method} keep={keep:g}: {reason}", flush=True)
                continue
            try:
                vtoken.wrap(model, method, keep=keep)
            except ValueError as err:  # refused: the method or the family cannot do it
                rows.append({**row, "status": "skipped", "reason": f"wrap refused: {err}"})
                print(f"skip {method} keep={keep:g}: wrap refused: {err}", flush=True)
                continue
            try:
                result, _ = measure()
                row["kept"] = kept_tokens(model)
            finally:
                vtoken.unwrap(model)
            rows.append({**row, "status": "ok", **result})
            print(_fmt(rows[-1]), flush=True)
    again = image_embeddings(model, pixel_values, args.batch)
    restored = bool(torch.equal(again, base_emb))
    if not restored:
        print(f"WARNING: after unwrap the image embeddings differ from the unpruned ones "
              f"(max |diff| {(again - base_emb).abs().max().item():.3g})", flush=True)
    return {
        "command": command_line("eval_tiny_clip", argv),
        "model": _shown(args.model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "split": args.split, "seed": args.seed, "n": len(recs),
        "benchmark_n": args.benchmark_n,
        "patch_tokens": n_patches, "classes": len(C.CLASSES), "chance": C.CHANCE,
        "threads": args.threads, "unwrap_restores_embeddings": restored, "code": code_version(),
        "rows": rows,
    }


def _shown(path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def _fmt(row) -> str:
    keys = ("zero_shot", "zero_shot_colour", "zero_shot_shape", "i2t_r1", "t2i_r1", "bench_i2t_r1", "bench_t2i_r1")
    return (f"{row['method']:>10} keep={row['keep']:<5g} "
            + " ".join(f"{k} {100 * row[k]:.1f}" for k in keys if k in row))


def _stages(kept) -> str:
    """``{"vision:0": 135, "vision:1": 126}`` -> ``"vision:0 135, vision:1 126"`` (first image)."""
    return ", ".join(f"{stage} {n}" for stage, n in kept.items()) if kept else "-"


def markdown(result: dict) -> str:
    bench = bool(result["benchmark_n"])
    head = ["method", "keep", "patch tokens", "kept per stage", "zero-shot", "colour", "shape", "i2t R@1", "t2i R@1"]
    head += ["bench i2t R@1", "bench t2i R@1"] if bench else []
    lines = [
        "# Tiny CLIP: zero-shot accuracy and retrieval, unpruned and pruned",
        "",
        f"Produced by `{result['command']}` ({result['threads']} CPU thread(s)); vtoken code: "
        f"{result['code']}.",
        "",
        f"Model: `{result['model']}` ({result['parameters'] / 1e6:.2f}M parameters, "
        f"{result['patch_tokens']} patch tokens + CLS). Records: {result['n']} subject scenes of the "
        f"`{result['split']}` split (seed {result['seed']}, `eval/clip_data.py`).",
        "",
        f"Zero-shot task: the colour and shape of the one large shape ({result['classes']} classes, "
        f"prompt \"a large red circle\"; chance {100 * result['chance']:.1f}%); colour and shape: the same "
        "prediction scored on colour (6 classes) or shape (5 classes) alone. Retrieval: recall@1 among "
        "the full captions of the same images, image->text and text->image; kept per stage: the patch "
        "tokens of an image after each pruning stage, stage = site:layer (`vtoken.selection` of the last "
        "forward; the counts are a function of the budget, the same for every image)"
        + (f"; bench: the same on the first {result['benchmark_n']} VQA benchmark images of the split."
           if bench else ".") + " All numbers in %.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    skipped = []
    for r in result["rows"]:
        if r["status"] != "ok":
            skipped.append(r)
            continue
        cells = [r["method"], f"{r['keep']:g}", str(r["tokens"]), _stages(r.get("kept"))]
        cells += [f"{100 * r[k]:.1f}" for k in ("zero_shot", "zero_shot_colour", "zero_shot_shape", "i2t_r1", "t2i_r1")]
        cells += [f"{100 * r[k]:.1f}" for k in ("bench_i2t_r1", "bench_t2i_r1")] if bench else []
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Not run (the method or the family cannot do it yet):", ""]
        seen = {}
        for r in skipped:
            seen.setdefault((r["method"], r["reason"]), []).append(f"{r['keep']:g}")
        lines += [f"- `{m}` at keep {', '.join(k)}: {reason}" for (m, reason), k in seen.items()]
    lines += ["", "After the last method, `vtoken.unwrap` gave back the unpruned image embeddings exactly: "
              + ("yes." if result["unwrap_restores_embeddings"] else "**no**.")]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--split", default="test", choices=("train", "validation", "test"))
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0, help="generator seed of the split")
    ap.add_argument("--benchmark-n", type=int, default=500,
                    help="also retrieval on this many VQA benchmark images of the split (0: skip)")
    ap.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    ap.add_argument("--all-methods", action="store_true",
                    help="also every other registered method that runs on CLIP")
    ap.add_argument("--budgets", nargs="*", type=float, default=[0.75, 0.5, 0.25])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    add_output_arguments(ap, "output stem: <out>.md and <out>.json (e.g. eval/results/tiny_clip/eval)")
    args = ap.parse_args(argv)
    args.methods = [m for part in args.methods for m in re.split(r"[,\s]+", part) if m]
    return args


def write_result(out: str | None, text: str, result: dict) -> None:
    """Print ``text``; with ``out``, write it as ``out.md`` and ``result`` as ``out.json``."""
    print(text)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    claim_stem(args.out, args.overwrite)
    result = evaluate(args, argv)
    write_result(args.out, markdown(result), result)
    return result


if __name__ == "__main__":
    main()
