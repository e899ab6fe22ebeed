"""Throughput (images/s) of a ViT-B/16-shaped vision encoder, unpruned and under each vision-only
method: ToMe at r=16, and every method at budgets matching ToMe r=16's token count.

Models (random weights, nothing downloaded): timm ``vit_base_patch16_224`` (``pretrained=False``)
and/or a Hugging Face ``CLIPVisionModel`` with the ViT-B/16 configuration (width 768, 12 layers,
12 heads, MLP 3072, 224 px in 16 px patches: 196 patch tokens + CLS).

Configurations per model:

* ``none``: unpruned;
* ``tome r=16``: ``vtoken.wrap(model, "tome", r=16)``, ToMe's own schedule (16 merges per block,
  the last block clamped: 10 of 196 patch tokens leave the encoder);
* every method (default ``tome``, ``random``, ``pool``, ``repshift``, ``visionzip``), each at its
  default site and layers (``--options`` changes them), at two budgets matching ToMe r=16:
  (a) *final*: ``keep_tokens`` = the patch tokens ToMe r=16 lets out of the encoder (10 of 196),
  vtoken's budget meaning; (b) *matched*: the ``keep_tokens`` whose schedule (read back with
  ``vtoken.schedule_of``) gives the same per-block mean token count as ToMe r=16, the mean over the
  12 blocks of the patch tokens their attention and their MLP run on (100 of 196): equal encoder
  compute, up to the scoring and merging overheads. The table gives each configuration's stages
  and its per-block mean.

A method the registry says does not run on the family, or that ``wrap`` refuses (``ValueError``), is
skipped with the reason printed and written.

Timing: the configurations run interleaved in one process, ``--repeats`` rounds of one timed forward
each (the order rotated every round; a warm-up round first), under ``torch.inference_mode``, on a
fixed random batch; each configuration is wrapped before its forward and unwrapped after, outside
the timed region. Reported: median images/s over the rounds with min and max, and the speed-up over
the unpruned median; ToMe's published speed-up printed beside ours (see ``TOME_PUBLISHED``).

Where it runs is named in the output (the CPU model, its cores and the threads used; a GPU by name).
ToMe measured batch 64 on a V100; on this CPU a batch of 64 ViT-B images takes tens of seconds per
forward on one thread (the committed CPU run's command is in its header).

Writes ``<out>.md`` and ``<out>.json`` (``--out`` is the stem); refuses to replace either unless
``--overwrite`` is given.

Usage::

    OMP_NUM_THREADS=1 python eval/bench_vit_speed.py --batch 8 --repeats 5 --out /tmp/vit_speed/bench_vit_speed
    python eval/bench_vit_speed.py --device cuda --batch 64 --repeats 20 --out /tmp/vit_speed/gpu   # on a GPU
    # the committed CPU result (minutes per round):
    python eval/bench_vit_speed.py --batch 64 --repeats 5 --threads 1 \
        --out eval/results/tiny_clip/bench_vit_speed --overwrite
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))
from eval_tiny_clip import code_version, write_result  # noqa: E402  (shared with the CLIP evaluation)
from output import add_output_arguments, claim_stem, command_line  # noqa: E402  (eval/output.py)

DEFAULT_METHODS = ("tome", "random", "pool", "repshift", "visionzip")
FAMILIES = {"timm": "timm ViT", "hf": "CLIP"}  # family names vtoken.methods() reports

# ToMe's published throughput for ViT-B/16 (V100, images/s; fp32 by default in tome.utils.benchmark,
# batch 64 there). facebookresearch/ToMe README.md at commit af95e4b1befa172dadccd8c81e223b10090f9579:
# table "Training with MAE" (r = 16) and table "Using timm models" (off-the-shelf AugReg, r = 13).
TOME_PUBLISHED = {
    16: (309, 603, "ToMe README.md @ af95e4b, table 'Training with MAE': ViT-B/16, r=16, 309 -> 603 im/s on a V100"),
    13: (309, 511, "ToMe README.md @ af95e4b, table 'Using timm models': ViT-B/16 (AugReg), r=13, 309 -> 511 im/s on a V100"),
}




# ----------------------------------------------------------------------------- models

def build(kind: str):
    torch.manual_seed(0)
    if kind == "timm":
        import timm

        return timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    if kind == "hf":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=16,
                                  projection_dim=512, hidden_act="quick_gelu")
        return CLIPVisionModel(config).eval()
    raise ValueError(f"unknown model kind {kind!r} (timm, hf)")


def forward(kind: str, model, x):
    return model(x) if kind == "timm" else model(pixel_values=x)


# ----------------------------------------------------------------------- ToMe counts

def tome_counts(patches: int = 196, layers: int = 12, r: int = 16) -> list[tuple[int, int]]:
    """(attention tokens, MLP tokens) of the patch tokens in each block under ToMe with constant r
    (merging between attention and MLP, at most half of the tokens per block; the class token is
    never merged and not counted)."""
    out, t = [], patches
    for _ in range(layers):
        merged = min(r, t // 2)
        out.append((t, t - merged))
        t -= merged
    return out


def tome_budgets(patches: int = 196, layers: int = 12, r: int = 16) -> dict[str, int]:
    counts = tome_counts(patches, layers, r)
    mean = sum(a + m for a, m in counts) / (2 * len(counts))
    return {"final": counts[-1][1], "mean": mean}


def block_mean(stages, patches: int = 196, layers: int = 12) -> float:
    """Per-block mean of the patch tokens a block's attention and its MLP run on, under a schedule's
    vision ``stages`` (``Stage.layer``, ``keep_tokens``, ``inside``: merged between the block's
    attention and its MLP, else after the block)."""
    by_layer = {st.layer: st for st in stages if st.site == "vision"}
    total, t = 0.0, patches
    for layer in range(layers):
        st = by_layer.get(layer)
        attn = t
        mlp = st.keep_tokens if st is not None and st.inside else t
        total += attn + mlp
        if st is not None:
            t = st.keep_tokens
    return total / (2 * layers)


def schedule_stages(model, method: str, options: dict):
    """The vision stages ``wrap(model, method, **options)`` would run (wrap, read, unwrap)."""
    import vtoken

    vtoken.wrap(model, method, **options)
    try:
        return tuple(vtoken.schedule_of(model).stages)
    finally:
        vtoken.unwrap(model)


def matched_budget(model, method: str, options: dict, target: float, patches: int, layers: int):
    """The ``keep_tokens`` whose schedule's :func:`block_mean` is closest to ``target`` (bisection;
    the mean grows with the budget); ``ValueError`` if ``wrap`` refuses every budget."""
    def mean(k):
        return block_mean(schedule_stages(model, method, {**options, "keep_tokens": k}), patches, layers)

    lo, hi = 1, patches - 1
    mean(hi)  # raises when the method cannot run at all
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            below = mean(mid) <= target
        except ValueError:  # budget out of this schedule's reach: search above it
            below = True
        lo, hi = (mid, hi) if below else (lo, mid)
    candidates = []
    for k in (lo, hi):
        try:
            candidates.append((abs(mean(k) - target), k))
        except ValueError:
            continue
    if not candidates:
        raise ValueError(f"no budget of {method!r} reaches a per-block mean of {target:g}")
    return min(candidates)[1]


def describe(stages) -> str:
    """``vision:3 -> 10`` or, for many stages, ``vision:0..11 -> 180, 164, ..., 10 (inside blocks)``."""
    if not stages:
        return "-"
    inside = " (between attention and MLP)" if all(st.inside for st in stages) else ""
    if len(stages) > 4:
        return (f"{stages[0].site}:{stages[0].layer}..{stages[-1].layer} -> "
                + ", ".join(str(st.keep_tokens) for st in stages) + inside)
    return ", ".join(f"{st.site}:{st.layer} -> {st.keep_tokens}" for st in stages) + inside


# ---------------------------------------------------------------------------- machine

def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"GPU: {torch.cuda.get_device_name(torch.device(device))}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({name}), {os.cpu_count()} cores, {torch.get_num_threads()} thread(s) used"


# ----------------------------------------------------------------------------- bench

def family_status(method: str, family: str, model) -> str | None:
    """Why ``method`` does not run here (None if it does): ``vtoken.methods()``'s verdict for the
    family, and where that depends on the model (VisionZip needs a class token), a wrap of this one."""
    import vtoken

    entry = next((m for m in vtoken.methods() if m["name"] == method), None)
    if entry is None:
        return "not a registered method"
    status = next((v for k, v in entry.get("families", {}).items() if k.lower() == family.lower()), None)
    if status in (None, "runs"):
        return None
    try:
        vtoken.wrap(model, method)
    except ValueError:
        return status
    vtoken.unwrap(model)
    return None


def parse_options(items) -> dict[str, dict]:
    """``METHOD:key=value,key=value`` -> {method: {key: value}} (ints and floats parsed)."""
    out: dict[str, dict] = {}
    for item in items or []:
        method, _, rest = item.partition(":")
        for pair in filter(None, rest.split(",")):
            key, _, value = pair.partition("=")
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    continue
            out.setdefault(method, {})[key] = value
    return out


def configs(args, model, family: str, budgets: dict) -> tuple[list[dict], list[dict]]:
    """(runnable configurations, skipped ones with their reason); ``wrap`` is tried for each
    (then undone), so a refusal (``ValueError``) is found before anything is timed."""
    extra = parse_options(args.options)
    run = [{"label": "none", "method": None, "options": {}, "stages": ()}]
    skipped = []

    def add(label, method, options):
        try:
            stages = schedule_stages(model, method, options)
        except ValueError as err:
            skipped.append({"label": label, "method": method, "options": options,
                            "reason": f"wrap refused: {err}"})
            return
        run.append({"label": label, "method": method, "options": options, "stages": stages})

    if args.r:
        add(f"tome r={args.r}", "tome", {"r": args.r})
    for name in ("final", "matched"):
        for method in args.methods:
            reason = family_status(method, family, model)
            options = dict(extra.get(method, {}))
            if reason:
                skipped.append({"label": f"{method} ({name})", "method": method, "options": options,
                                "reason": reason})
                continue
            if name == "final":
                k = budgets["final"]
            else:
                try:
                    k = matched_budget(model, method, options, budgets["mean"], 196, 12)
                except ValueError as err:
                    skipped.append({"label": f"{method} ({name})", "method": method, "options": options,
                                    "reason": f"wrap refused: {err}"})
                    continue
            add(f"{method} {k} tokens ({name})", method, {"keep_tokens": k, **options})
    return run, skipped


def bench_model(kind: str, args) -> dict:
    import vtoken

    model = build(kind).to(args.device)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(args.device)
    family = FAMILIES[kind]
    budgets = tome_budgets(r=args.r or 16)
    checked, skipped = configs(args, model, family, budgets)
    for cfg in skipped:
        print(f"[{kind}] skip {cfg['label']}: {cfg['reason']}", flush=True)
    for cfg in checked:
        print(f"[{kind}] {cfg['label']}: {describe(cfg['stages'])}, per-block mean "
              f"{block_mean(cfg['stages']):.1f}", flush=True)

    def timed(cfg) -> float:
        if cfg["method"] is not None:
            vtoken.wrap(model, cfg["method"], **cfg["options"])
        try:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                forward(kind, model, x)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - start
        finally:
            if cfg["method"] is not None:
                vtoken.unwrap(model)

    times: dict[str, list[float]] = {c["label"]: [] for c in checked}
    for _ in range(args.warmup):
        for cfg in checked:
            timed(cfg)
    for rep in range(args.repeats):
        shift = rep % len(checked)
        for cfg in checked[shift:] + checked[:shift]:
            times[cfg["label"]].append(timed(cfg))
        print(f"[{kind}] round {rep + 1}/{args.repeats}: "
              + ", ".join(f"{label} {args.batch / t[-1]:.1f}" for label, t in times.items()), flush=True)
    rows = []
    base = statistics.median(args.batch / t for t in times["none"])
    for cfg in checked:
        ips = [args.batch / t for t in times[cfg["label"]]]
        med = statistics.median(ips)
        rows.append({"label": cfg["label"], "method": cfg["method"], "options": cfg["options"],
                     "stages": describe(cfg["stages"]), "block_mean": block_mean(cfg["stages"]),
                     "images_per_s": med, "min": min(ips), "max": max(ips), "speedup": med / base,
                     "runs": ips})
    return {"model": kind, "family": family, "budgets": budgets, "rows": rows,
            "skipped": [{"label": c["label"], "reason": c["reason"]} for c in skipped]}


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        "# ViT-B/16 throughput: unpruned, ToMe r=16, and each method at ToMe's token count",
        "",
        f"Produced by `{result['command']}`; vtoken code: {result['code']}.",
        "",
        f"Machine: **{result['machine']}**. torch {result['torch']}, transformers {result['transformers']}, "
        f"timm {result['timm']}. Batch {a['batch']}, {a['repeats']} interleaved rounds after "
        f"{a['warmup']} warm-up round(s), float32, random weights and inputs.",
        "",
        f"Budgets matching ToMe r={a['r'] or 16} on 196 patches and 12 blocks: *final* = the same patch "
        f"tokens leaving the encoder ({result['budgets']['final']}); *matched* = the budget whose schedule "
        f"gives the same per-block mean of the patch tokens attention and MLP run on as ToMe "
        f"({result['budgets']['mean']:g}). Each method at its default site and layers (stages: "
        "site:layer -> patch tokens after it); per-block mean: that mean for the configuration.",
        "",
    ]
    for m in result["models"]:
        title = {"timm": "timm `vit_base_patch16_224`", "hf": "transformers `CLIPVisionModel` (ViT-B/16 config)"}
        lines += [f"## {title[m['model']]}", "",
                  "| configuration | stages | per-block mean | images/s (median) | min | max | speed-up |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['stages']} | {r['block_mean']:.1f} | {r['images_per_s']:.2f} | "
                  f"{r['min']:.2f} | {r['max']:.2f} | {r['speedup']:.2f}x |" for r in m["rows"]]
        if m["skipped"]:
            lines += ["", "Not run:", ""] + [f"- {s['label']}: {s['reason']}" for s in m["skipped"]]
        lines.append("")
    r = a["r"] or 16
    if r in TOME_PUBLISHED:
        before, after, where = TOME_PUBLISHED[r]
        ours = [f"{m['model']}: {row['speedup']:.2f}x" for m in result["models"]
                for row in m["rows"] if row["label"] == f"tome r={r}"]
        lines += [f"ToMe r={r}, measured here: {', '.join(ours) if ours else 'not run'}; published: "
                  f"{after / before:.2f}x ({where}). The published number is a V100 GPU at batch 64-256; "
                  "a CPU run is not comparable in absolute terms.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=["timm", "hf"], choices=("timm", "hf"))
    ap.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    ap.add_argument("--r", type=int, default=16, help="ToMe's r (0: no 'tome r=' row)")
    ap.add_argument("--options", nargs="*", help="per-method options, e.g. random:site=vision,layer=0")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    add_output_arguments(ap, "output stem: <out>.md and <out>.json (e.g. eval/results/tiny_clip/bench_vit_speed)")
    args = ap.parse_args(argv)
    claim_stem(args.out, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm
    import transformers

    result = {
        "command": command_line("bench_vit_speed", argv),
        "machine": machine(args.device), "code": code_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "timm": timm.__version__,
        "args": vars(args), "budgets": tome_budgets(r=args.r or 16),
        "tome_published": {str(k): v for k, v in TOME_PUBLISHED.items()},
        "models": [],
    }
    print(f"machine: {result['machine']}", flush=True)
    for kind in args.models:
        result["models"].append(bench_model(kind, args))
    write_result(args.out, markdown(result), result)
    return result


if __name__ == "__main__":
    main()
