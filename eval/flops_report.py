"""FLOPs report for the 7B models at the literature's budgets; writes ``eval/results/flops.md``.

    python eval/flops_report.py

Everything comes from the shipped configs (``vtoken/configs/``): no weights, no network, a second.
"""

from __future__ import annotations

from pathlib import Path

from vtoken.accounting import DEFAULT_TEXT_TOKENS, flops, geometry, load_config, model_dims
from vtoken.schedule import ScoringCost, Schedule, Stage

OUT = Path(__file__).resolve().parent / "results" / "flops.md"
TEXT = DEFAULT_TEXT_TOKENS
FASTV_K = 2
LLAVA = "llava-hf/llava-1.5-7b-hf"
NEXT = "llava-hf/llava-v1.6-vicuna-7b-hf"
QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"
ONEVISION = "llava-hf/llava-onevision-qwen2-7b-ov-hf"

# (label, hub id, budgets). LLaVA-NeXT budgets are the papers' equivalents of 192/128/64 at 2880.
MODELS = [
    ("LLaVA-1.5-7B", LLAVA, (192, 128, 64)),
    ("LLaVA-NeXT-7B", NEXT, (640, 320, 160)),
    ("Qwen2.5-VL-7B", QWEN, (192, 128, 64)),
    ("LLaVA-OneVision-7B", ONEVISION, (1024, 512, 256)),  # 3699 tokens at 672x672 (base + 2x2 crops)
]

# Published TFLOPs (paper convention) and where they are printed.
PUBLISHED = [
    ("LLaVA-1.5-7B", LLAVA, "unpruned, 576 tokens", None, 3.82, "FastV / PDrop / TransPrune T1"),
    ("LLaVA-1.5-7B", LLAVA, "FastV K=2, keep 288", [("llm", 288, 2)], 2.01, "TransPrune T1"),
    ("LLaVA-1.5-7B", LLAVA, "FastV K=2, keep 144", [("llm", 144, 2)], 1.12, "TransPrune T1"),
    ("LLaVA-1.5-7B", LLAVA, "PDrop layers 8/16/24, ratio 0.5",
     [("llm", 288, 8), ("llm", 144, 16), ("llm", 72, 24)], 1.78, "TransPrune T1"),
    ("LLaVA-1.5-7B", LLAVA, "pre-LLM, keep 192", [("projector", 192, None)], 1.25, "issue 4 list"),
    ("LLaVA-1.5-7B", LLAVA, "TransPrune-High 504/360/72 after 7/9/12",
     [("llm", 504, 7), ("llm", 360, 9), ("llm", 72, 12)], 1.56, "TransPrune T1"),
    ("LLaVA-NeXT-7B", NEXT, "unpruned, 2880 tokens", None, 20.83, "TransPrune T2"),
    ("LLaVA-NeXT-7B", NEXT, "FastV K=2, keep 1440", [("llm", 1440, 2)], 10.55, "TransPrune T2"),
    ("LLaVA-NeXT-7B", NEXT, "FastV K=2, keep 720", [("llm", 720, 2)], 5.80, "TransPrune T2"),
    ("LLaVA-NeXT-7B", NEXT, "PDrop layers 8/16/24, ratio 0.5",
     [("llm", 1440, 8), ("llm", 720, 16), ("llm", 360, 24)], 9.46, "TransPrune T2"),
    ("LLaVA-NeXT-7B", NEXT, "TransPrune-High 2520/1800/360 after 7/9/12",
     [("llm", 2520, 7), ("llm", 1800, 9), ("llm", 360, 12)], 8.33, "TransPrune T2"),
]


def schedule_from(stages) -> Schedule:
    return Schedule(tuple(Stage(site, keep, layer) for site, keep, layer in stages or ()))


def pre_llm(name: str, keep: int) -> Schedule:
    """Pre-LLM pruning scored by one query row (CLS, as VisionZip / FasterVLM do) at LLaVA's feature
    layer; Qwen2.5-VL has no CLS token, so its pre-LLM scoring is left at zero (pool / random)."""
    scoring = ()
    dims = model_dims(load_config(name))
    if dims.vision.cls_tokens:
        scoring = (ScoringCost("vision_attention_rows", layer=dims.vision.layers - 2, rows=1),)
    return Schedule((Stage("projector", keep),), scoring)


def fastv(keep: int) -> Schedule:
    """FastV at K=2 scored by the last query row of layer K-1 (FastV's released code)."""
    return Schedule((Stage("llm", keep, FASTV_K),),
                    (ScoringCost("llm_attention_rows", layer=FASTV_K - 1, rows=1),))


def tf(value: float) -> str:
    return f"{value / 1e12:.2f}"


def tf3(value: float) -> str:
    return f"{value / 1e12:.3f}"


def published_section() -> list[str]:
    lines = [
        "## 1. Paper convention: the published TFLOPs reproduced",
        "",
        "Multiply-adds of the LLM layers over the visual tokens only, 4nd² + 2n²d + 3ndm per layer "
        "(FastV §4.2 with TransPrune Eq. 7's three-matrix FFN). LLaVA-NeXT counts 5 crops × 576 = 2880.",
        "",
        "| Model | Schedule | Published | vtoken `paper` | Printed in |",
        "|---|---|---:|---:|---|",
    ]
    for label, name, what, stages, published, source in PUBLISHED:
        got = flops(name, schedule_from(stages), convention="paper").prefill / 1e12
        mark = "" if round(got, 2) == published else " **(differs)**"
        lines.append(f"| {label} | {what} | {published:.2f} | {got:.2f}{mark} | {source} |")
    return lines + [""]


def budget_rows(label: str, name: str, budgets) -> list[str]:
    base_true = flops(name)
    rows = [("unpruned", Schedule())]
    for keep in budgets:
        rows += [(f"pre-LLM → {keep}", pre_llm(name, keep)), (f"FastV K=2 → {keep}", fastv(keep))]
    lines = [
        "| Schedule | LLM visual tokens (layer mean) | `paper` TFLOPs | vision | projector | LLM | LM head "
        "| scoring | `true` prefill TFLOPs | vs unpruned | decode GFLOPs/token | KV cache MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for what, schedule in rows:
        paper = flops(name, schedule, convention="paper")
        true = flops(name, schedule)
        lines.append(
            f"| {what} | {true.mean_visual_tokens:.0f} | {tf(paper.prefill)} | {tf3(true.vision)} "
            f"| {tf3(true.projector)} | {tf3(true.llm)} | {tf3(true.lm_head)} | {tf3(true.scoring)} "
            f"| {tf(true.prefill)} | {true.prefill / base_true.prefill:.1%} "
            f"| {true.decode_per_token / 1e9:.2f} | {true.kv_cache_bytes / 2**20:.0f} |"
        )
    return lines


def model_section(index: int, label: str, name: str, budgets) -> list[str]:
    dims = model_dims(load_config(name))
    geo_true, geo_paper = geometry(dims), geometry(dims, convention="paper")
    d = dims.decoder
    head = [
        f"### 2.{index} {label} (`{name}`)",
        "",
        f"LLM: {d.layers} layers, hidden {d.hidden}, FFN {d.intermediate}, {d.heads} heads / "
        f"{d.kv_heads} KV heads, vocab {d.vocab}. Vision: {dims.vision.layers} layers, hidden "
        f"{dims.vision.hidden}, {geo_true.crops} pass(es) of {geo_true.patches} patches. "
        f"Visual tokens reaching the LLM: {geo_true.visual_tokens} (`true`), {geo_paper.visual_tokens} "
        f"(`paper`).",
        "",
    ]
    return head + budget_rows(label, name, budgets) + [""]


def assumptions() -> list[str]:
    return [
        "## Assumptions",
        "",
        f"- **Text length**: {TEXT} non-visual tokens per prompt (system prompt, question, template) in the "
        "`true` convention; the `paper` convention counts visual tokens only. One image per sample.",
        "- **Images**: LLaVA-1.5 at 336×336 (576 patches + CLS); LLaVA-NeXT at 672×672 (base view + 4 crops, "
        "5 tower passes; the model packs 576 + 48·48 + 48 newlines = 2928 tokens, the papers count 2880); "
        "Qwen2.5-VL at 672×672 (48×48 = 2304 patches, 576 LLM tokens after the 2×2 merger); "
        "LLaVA-OneVision at 672×672 (base view + 2×2 crops of 384 px, 5 tower passes of 729 patches; the model "
        "packs 729 + 54·54 + 54 newlines = 3699 tokens, the paper convention counts 5 × 729 = 3645).",
        "- **`true`**: 2 FLOPs per multiply-add over every token; GQA-aware projections, gated MLP (three "
        "matrices), attention scores and values over the full n×n square (causal masking not subtracted, as "
        "FlopCounterMode counts it), the whole vision tower (patch embedding, every encoder layer including "
        "CLS and LLaVA's unused last layer), the projector, and the LM head on the last position only. Norms, "
        "activations, softmax and biases are ignored. Checked against `torch.utils.flop_counter.FlopCounterMode` "
        "(`tests/test_flops.py`): exact on tiny LLaVA / LLaVA-NeXT / Qwen2.5-VL models and on these 7B configs "
        "on the meta device.",
        "- **Qwen2.5-VL vision tower**: window attention (8×8-patch windows, full attention in blocks "
        "7/15/23/31) counted window by window, exact for an unpruned tower; only vision-site pruning inside "
        "the tower (not used here) is approximate (windows assumed to shrink uniformly).",
        "- **pre-LLM** keeps the budget between projector and LLM (the projector still runs on every patch). "
        "Its scoring line is one CLS attention row at vision layer 22 per tower pass (VisionZip / FasterVLM "
        "style) for LLaVA-1.5 / NeXT and zero for Qwen2.5-VL and LLaVA-OneVision (no CLS; e.g. pooling).",
        "- **FastV K=2** runs layers 0–1 on every token and layers 2+ on the budget; its scoring line is the "
        "last query row against every key of layer 1 (FastV's released code).",
        "- **decode**: one generated token attending to the cache left by the prefill (the cache of layers "
        "before K holds every token); KV cache in fp16.",
        "",
    ]


def build() -> str:
    lines = [
        "# FLOPs of visual-token pruning on 7B VLMs",
        "",
        "Generated by `python eval/flops_report.py` from the configs shipped in `vtoken/configs/` "
        "(`vtoken.flops`). TFLOPs per sample.",
        "",
    ]
    lines += published_section()
    lines += ["## 2. Both conventions at the literature's budgets", ""]
    for i, (label, name, budgets) in enumerate(MODELS, start=1):
        lines += model_section(i, label, name, budgets)
    lines += assumptions()
    return "\n".join(lines)


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = build()
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

