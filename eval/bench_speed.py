"""Prefill speed of every method on a random-weight LLaVA-1.5 shape scaled to run on CPU (issue
"Speed that holds up", first part): time to the first token at batch 1, unpruned against pruned at 64 /
128 / 192 of 576 visual tokens, and for methods that prune in front of the LLM against their own
oracle: the unwrapped model fed only the kept tokens (vision tower and projector as usual, then the
LLM on the text and the kept visual embeddings at their original positions), so
``pruned / oracle - 1`` is the method's overhead (scoring and machinery).

Model: CLIP tower 384 wide x 6 layers on 336 px (576 patch tokens), Llama 768 wide x 8 layers (GQA
12 / 4 heads), random weights; a 35-token system prompt and a 16-token question. Every configuration is
timed in interleaved rounds (each round runs unpruned, then every method and its oracle once), medians
with min and max. Then generate throughput (tokens/s) at batch 8 with mixed prompt lengths and left
padding for a few methods, beside their batch-1 speed-up. Not measured here yet: batch 16, peak
memory, decode latency alone, in-LLM oracles (replayed selections); the output says so.

    python eval/bench_speed.py --out eval/results/bench_speed/cpu.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vtoken

IMAGE_TOKEN, VOCAB, VISUAL = 99, 100, 576
METHODS = ("random", "pool", "visionzip", "zoo_prune", "vflowopt", "repshift", "tome", "fastv", "transprune", "aif")
#: Methods whose every stage is in front of the LLM (projector site), so the oracle is the LLM on the kept tokens.
PRE_LLM = ("random", "pool", "visionzip", "zoo_prune")


def scaled_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=384, intermediate_size=1536,
                              num_hidden_layers=6, num_attention_heads=6)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                       num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=VISUAL)
    return LlavaForConditionalGeneration(config).eval()


def prompt(seed: int = 0, batch: int = 1) -> dict:
    """``batch`` prompts (a 35-token system prompt, the image, a question of 8 to 24 tokens: mixed
    lengths, left-padded)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        question = 16 if batch == 1 else 8 + (16 * b) // max(batch - 1, 1)
        rows.append([1, *torch.randint(3, 90, (35,), generator=g).tolist(), *[IMAGE_TOKEN] * VISUAL,
                     *torch.randint(3, 90, (question,), generator=g).tolist()])
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(batch, 3, 336, 336, generator=g)}


def oracle_call(model, x: dict, kept: torch.Tensor):
    """The unwrapped model's work for the kept tokens only: encode, project, then the LLM on the text
    and kept visual embeddings at their original positions, to the first token's logits."""
    core = model.model
    features = core.get_image_features(pixel_values=x["pixel_values"], vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    visual = torch.cat(list(features) if isinstance(features, (tuple, list)) else [features]).reshape(-1, features[0].shape[-1])
    ids = x["input_ids"][0]
    slots = torch.nonzero(ids == IMAGE_TOKEN).squeeze(-1)
    keep = ids != IMAGE_TOKEN
    keep[slots[kept]] = True
    embeds = core.get_input_embeddings()(ids[None])
    embeds[0, slots] = visual.to(embeds.dtype)
    positions = torch.nonzero(keep).squeeze(-1)[None]
    out = core.language_model(inputs_embeds=embeds[:, keep], position_ids=positions)
    return model.lm_head(out.last_hidden_state[:, -1:])


def generate_throughput(model, args) -> dict[str, list[float]]:
    """Generated tokens per second at ``args.generate_batch`` (``args.new_tokens`` each, greedy),
    unpruned and per method, interleaved rounds after a warm-up round."""
    x = prompt(seed=1, batch=args.generate_batch)
    methods = [m for m in args.generate_methods.split(",") if m]
    out: dict[str, list[float]] = {"none": [], **{m: [] for m in methods}}

    def rate() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**x, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        return args.generate_batch * args.new_tokens / (time.perf_counter() - start)

    for round_ in range(args.rounds + 1):
        sample = {"none": rate()}
        for method in methods:
            with vtoken.pruned(model, method, keep_tokens=args.generate_budget):
                sample[method] = rate()
        if round_:
            for key, value in sample.items():
                out[key].append(value)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="64,128,192")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="", help="what else ran on the machine, for the record")
    parser.add_argument("--generate-batch", type=int, default=8, help="batch of the generate-throughput run (0: skip)")
    parser.add_argument("--generate-methods", default="random,pool,visionzip,tome,fastv")
    parser.add_argument("--generate-budget", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    model, x = scaled_llava(), prompt()
    configs = [(m, b) for m in methods for b in budgets]
    times: dict[tuple, list[float]] = {("none", 0): []}
    kept_tokens: dict[tuple, float] = {}
    for config in configs:
        times[config] = []
        if config[0] in PRE_LLM:
            times[("oracle",) + config] = []

    def timed(fn) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        return time.perf_counter() - start

    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        warm = not times[("none", 0)] and _ == 0
        sample = {("none", 0): timed(lambda: model(**x).logits[:, -1])}
        for method, budget in configs:
            with vtoken.pruned(model, method, keep_tokens=budget):
                sample[(method, budget)] = timed(lambda: model(**x).logits[:, -1])
                selection = vtoken.selection(model)[0]
            final = list(selection.values())[-1] if selection else torch.arange(VISUAL)
            kept_tokens[(method, budget)] = float(len(final))
            if method in PRE_LLM:
                sample[("oracle", method, budget)] = timed(lambda: oracle_call(model, x, final))
        if not warm:
            for key, value in sample.items():
                times[key].append(value)
    base = statistics.median(times[("none", 0)])
    throughput = generate_throughput(model, args) if args.generate_batch else {}
    machine = f"CPU ({platform.processor() or platform.machine()}), {args.threads} thread(s) of 2 cores; no GPU"
    lines = [
        "# Prefill speed on a LLaVA-1.5 shape scaled to CPU (batch 1, time to the first token)",
        "",
        f"Produced by `python eval/bench_speed.py --out eval/results/bench_speed/cpu.md` ({args.rounds} interleaved rounds "
        f"after a warm-up round). Machine: {machine}. {args.note}",
        "",
        f"Model: CLIP 384 x 6 layers on 336 px (576 tokens), Llama 768 x 8 layers, random weights; unpruned prefill "
        f"{1000 * base:.0f} ms (median of {len(times[('none', 0)])}).",
        "",
        "| method | budget | kept tokens | prefill ms (median) | min | max | speed-up | oracle ms | vs oracle |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for method, budget in configs:
        t = times[(method, budget)]
        median = statistics.median(t)
        oracle = times.get(("oracle", method, budget))
        oracle_median = statistics.median(oracle) if oracle else None
        rows.append({"method": method, "budget": budget, "kept": kept_tokens[(method, budget)], "ms": 1000 * median,
                     "min": 1000 * min(t), "max": 1000 * max(t), "speedup": base / median,
                     "oracle_ms": None if oracle_median is None else 1000 * oracle_median,
                     "vs_oracle": None if oracle_median is None else median / oracle_median})
        r = rows[-1]
        oracle_text = ("n/a (prunes in the tower or the LLM)", "") if r["oracle_ms"] is None else (
            f"{r['oracle_ms']:.0f}", f"{r['vs_oracle']:.2f}x")
        lines.append(f"| {method} | {budget} | {r['kept']:.0f} | {r['ms']:.0f} | {r['min']:.0f} | {r['max']:.0f} | "
                     f"{r['speedup']:.2f}x | {oracle_text[0]} | {oracle_text[1]} |")
    if throughput:
        plain = statistics.median(throughput["none"])
        lines += ["", f"## generate throughput at batch {args.generate_batch} ({args.new_tokens} new tokens, prompts of "
                  f"mixed lengths, left padding; keep {args.generate_budget} of 576)", "",
                  "| method | tokens/s (median) | min | max | speed-up | batch-1 prefill speed-up | generate / prefill speed-up |",
                  "|---|---|---|---|---|---|---|",
                  f"| none | {plain:.1f} | {min(throughput['none']):.1f} | {max(throughput['none']):.1f} | 1.00x | | |"]
        for method, values in throughput.items():
            if method == "none":
                continue
            single = next((r["speedup"] for r in rows if r["method"] == method and r["budget"] == args.generate_budget), None)
            speedup = statistics.median(values) / plain
            ratio = f"{speedup / single:.2f}" if single else ""
            lines.append(f"| {method} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} | "
                         f"{speedup:.2f}x | {'' if single is None else f'{single:.2f}x'} | {ratio} |")
    lines += ["", "Kept tokens: the visual tokens the last stage leaves (in-LLM methods keep more in their earlier "
              "layers). The last column compares two different measures (generate at batch 8, decode steps included, against the prefill at batch 1), so it is not the issue's batch-8-against-batch-1 target. Not "
              "measured yet: batch 16, peak memory and KV-cache bytes, decode latency alone, the in-LLM methods' "
              "replayed-selection oracles."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"machine": machine, "unpruned_ms": 1000 * base, "rows": rows,
                                                        "generate_tokens_per_s": throughput, "args": vars(args)},
                                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
