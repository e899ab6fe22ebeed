"""FLOPs report for the 7B models at the literature's budgets and for standalone vision encoders;
writes the Markdown file ``--out`` (refused if it exists, unless ``--overwrite``).

    python eval/flops_report.py --out /tmp/flops.md
    python eval/flops_report.py --out eval/results/flops.md --overwrite   # the committed report

Everything comes from the shipped configs (``vtoken/configs/``), configs built from arguments, and
timm / open_clip models built on the meta device: no weights, no network, a few seconds.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from vtoken.accounting import DEFAULT_TEXT_TOKENS, flops, geometry, load_config, model_dims
from vtoken.accounting_vit import tome_schedule
from vtoken.schedule import ScoringCost, Schedule, Stage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from output import report_output  # noqa: E402  (eval/output.py)

TEXT = DEFAULT_TEXT_TOKENS
FASTV_K = 2
LLAVA = "llava-hf/llava-1.5-7b-hf"
NEXT = "llava-hf/llava-v1.6-vicuna-7b-hf"
QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"
QWEN2 = "Qwen/Qwen2-VL-7B-Instruct"
QWEN3 = "Qwen/Qwen3-VL-8B-Instruct"
ONEVISION = "llava-hf/llava-onevision-qwen2-7b-ov-hf"

# (label, hub id, budgets). LLaVA-NeXT budgets are the papers' equivalents of 192/128/64 at 2880.
MODELS = [
    ("LLaVA-1.5-7B", LLAVA, (192, 128, 64)),
    ("LLaVA-NeXT-7B", NEXT, (640, 320, 160)),
    ("Qwen2.5-VL-7B", QWEN, (192, 128, 64)),
    ("LLaVA-OneVision-7B", ONEVISION, (1024, 512, 256)),  # 3699 tokens at 672x672 (base + 2x2 crops)
    ("Qwen2-VL-7B", QWEN2, (192, 128, 64)),  # 576 tokens at 672x672, as Qwen2.5-VL
    ("Qwen3-VL-8B", QWEN3, (147, 98, 49)),  # 441 tokens at 672x672 (16-px patches): 1/3, 2/9, 1/9 of 441
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
    layer; the Qwen towers have no CLS token, so their pre-LLM scoring is left at zero (pool / random)."""
    scoring = ()
    dims = model_dims(load_config(name))
    if dims.vision.cls_tokens:
        scoring = (ScoringCost("vision_attention_rows", layer=dims.vision.layers - 2, rows=1),)
    return Schedule((Stage("projector", keep),), scoring)


def fastv(keep: int) -> Schedule:
    """FastV at K=2 scored by the last query row of layer K-1 (FastV's released code)."""
    return Schedule((Stage("llm", keep, FASTV_K),),
                    (ScoringCost("llm_attention_rows", layer=FASTV_K - 1, rows=1),))


def zoo_prune(keep: int) -> Schedule:
    """ZOO-Prune at the projector with the paper's m = 64 directions, its scoring counted as vtoken
    runs it (from the projector's structure: ``vtoken.accounting.projector_sensitivity_flops``)."""
    return Schedule((Stage("projector", keep),), (ScoringCost("projector_sensitivity", passes=64),))


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
        rows += [(f"pre-LLM → {keep}", pre_llm(name, keep)), (f"FastV K=2 → {keep}", fastv(keep)),
                 (f"ZOO-Prune → {keep}", zoo_prune(keep))]
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
    v = dims.vision
    tower = ""
    if v.window:
        tower = (f" Window attention ({v.window}×{v.window} merged units), full attention in blocks "
                 f"{'/'.join(map(str, v.full_attention_layers))}.")
    elif dims.family in ("qwen2_vl", "qwen3_vl"):
        tower = " Full attention in every block."
    if v.deepstack_layers:
        tower += (f" DeepStack mergers after blocks {'/'.join(map(str, v.deepstack_layers))} (in the projector "
                  "column with the merger).")
    head = [
        f"### 2.{index} {label} (`{name}`)",
        "",
        f"LLM: {d.layers} layers, hidden {d.hidden}, FFN {d.intermediate}, {d.heads} heads / "
        f"{d.kv_heads} KV heads, vocab {d.vocab}. Vision: {dims.vision.layers} layers, hidden "
        f"{dims.vision.hidden}, {geo_true.crops} pass(es) of {geo_true.patches} patches.{tower} "
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
        "Qwen2-VL and Qwen2.5-VL at 672×672 (48×48 = 2304 patches of 14 px, 576 LLM tokens after the 2×2 "
        "merger); Qwen3-VL at 672×672 too (42×42 = 1764 patches of 16 px, 441 LLM tokens; its budgets "
        "147/98/49 are the same 1/3, 2/9, 1/9); "
        "LLaVA-OneVision at 672×672 (base view + 2×2 crops of 384 px, 5 tower passes of 729 patches; the model "
        "packs 729 + 54·54 + 54 newlines = 3699 tokens, the paper convention counts 5 × 729 = 3645).",
        "- **`true`**: 2 FLOPs per multiply-add over every token; GQA-aware projections, gated MLP (three "
        "matrices), attention scores and values over the full n×n square (causal masking not subtracted, as "
        "FlopCounterMode counts it), the whole vision tower (patch embedding, every encoder layer including "
        "CLS and LLaVA's unused last layer), the projector, and the LM head on the last position only. Norms, "
        "activations, softmax and biases are ignored. Checked against `torch.utils.flop_counter.FlopCounterMode` "
        "(`tests/test_flops.py`, `tests/test_flops_qwen.py`): exact on tiny LLaVA / LLaVA-NeXT / Qwen2-VL / "
        "Qwen2.5-VL / Qwen3-VL models and on the LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision / Qwen2-VL-7B / "
        "Qwen3-VL-8B configs on the meta device (`tests/test_flops_onevision.py` for OneVision).",
        "- **Qwen2.5-VL vision tower**: window attention (8×8-patch windows, full attention in blocks "
        "7/15/23/31) counted window by window, exact for an unpruned tower; only vision-site pruning inside "
        "the tower (not used here) is approximate (windows assumed to shrink uniformly).",
        "- **Qwen2-VL / Qwen3-VL vision towers**: full attention over each image in every block, two-matrix MLP "
        "(Qwen2-VL 1280 → 5120, Qwen3-VL 1152 → 4304). Qwen3-VL's interpolated learned position embeddings "
        "(a gather and a weighted sum) are not matrix products and are not counted. Its three DeepStack "
        "mergers (after blocks 8, 16, 24; each the merger's shape, 4608 → 4608 → 4096) run on every patch "
        "of the tower here (pre-LLM and FastV prune after the tower) and are in the projector column; "
        "their outputs are added to the first three LLM layers' hidden states (elementwise, not counted).",
        "- **pre-LLM** keeps the budget between projector and LLM (the projector still runs on every patch). "
        "Its scoring line is one CLS attention row at vision layer 22 per tower pass (VisionZip / FasterVLM "
        "style) for LLaVA-1.5 / NeXT and zero for the Qwen models and LLaVA-OneVision (no CLS; e.g. pooling).",
        "- **FastV K=2** runs layers 0–1 on every token and layers 2+ on the budget; its scoring line is the "
        "last query row against every key of layer 1 (FastV's released code).",
        "- **decode**: one generated token attending to the cache left by the prefill (the cache of layers "
        "before K holds every token); KV cache in fp16.",
        "- **Vision encoders (section 3)**: patch-embedding convolution, every block at the tokens it runs on "
        "(attention linear maps + QKᵀ and AV over the full square; MLP), the pooling head / projection / "
        "classifier on the final tokens, and the scoring a schedule lists. Excluded (not matrix products, "
        "ignored by FlopCounterMode too): norms, softmax, GELU / SiLU, biases, residual adds, position "
        "embeddings, layer scale, average pooling, the weighted averages that merge tokens and ToMe's "
        "proportional-attention bias. fvcore, behind the papers' figures, also adds 5 operations per LayerNorm "
        "element (0.2% of DeiT-S), below their rounding. CLIP / SigLIP / open_clip CLIP: the text tower is not "
        "counted (it encodes the prompt, not the image). RepShift rows round each stage's count up, "
        "ceil(0.8·n) (on DeiT-S rounding to nearest gives the same 196 → 157 → 126 → 101, 2.987 GMACs); "
        "truncating (156/124/99) would give 2.949, printed 2.9, so the published 3.0 rules truncation out.",
        "",
    ]


# --------------------------------------------------------------------------------------------------
# Standalone vision encoders (vtoken.accounting_vit)

TOME_PAPER = ("ToMe (Bolya et al., ICLR 2023, arXiv 2210.09461v3), DeiT comparison table (models trained with "
              "ToMe), as indexed by Papers with Code")
REPSHIFT_PAPER = "Representation Shift (Choi et al., ICCV 2025, arXiv 2508.00367), DeiT-S image classification"


def timm_model(name: str, **options):
    import timm
    import torch

    with torch.device("meta"):  # shapes only: no weights, no init cost
        return timm.create_model(name, pretrained=False, **options)


def open_clip_model(name: str):
    import open_clip
    import torch

    with torch.device("meta"):
        return open_clip.model.CLIP(**open_clip.get_model_config(name))


def clip_l336():
    """LLaVA-1.5's CLIP ViT-L/14 at 336 px as a CLIPModel config (vision tower + 768-d projection)."""
    from transformers import CLIPConfig

    return CLIPConfig(vision_config=load_config(LLAVA).vision_config.to_dict(), projection_dim=768)


def siglip_so400m():
    """SigLIP so400m/14 at 384 px (``google/siglip-so400m-patch14-384``'s vision dimensions)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                              patch_size=14, image_size=384)


def repshift(patches: int, depth: int, fraction: float = 0.8) -> Schedule:
    """Representation Shift's DeiT schedule: 20% of the current patches pruned after (1-based) blocks
    1, 4 and 7 of 12, the blocks scaled to ``depth`` (round(b·depth/12), 0-based minus one); counts
    rounded up (196 -> 157 -> 126 -> 101 on DeiT-S)."""
    stages, kept = [], patches
    for block in (1, 4, 7):
        kept = math.ceil(fraction * kept)
        stages.append(Stage("vision", kept, max(0, round(block * depth / 12) - 1)))
    return Schedule(tuple(stages))


# (label, model, schedule, published GMACs, source)
VIT_PUBLISHED = [
    ("DeiT-S", "deit_small_patch16_224", "unpruned (197 tokens)", None, 4.6, REPSHIFT_PAPER),
    ("DeiT-S", "deit_small_patch16_224", "RepShift: -20% after blocks 1, 4, 7 (157/126/101)", "repshift", 3.0,
     REPSHIFT_PAPER),
    ("DeiT-S", "deit_small_patch16_224", "ToMe r=8", 8, 3.4, TOME_PAPER),
    ("DeiT-S", "deit_small_patch16_224", "ToMe r=13", 13, 2.7, TOME_PAPER),
    ("DeiT-S", "deit_small_patch16_224", "ToMe r=16", 16, 2.3, TOME_PAPER),
    ("DeiT-T", "deit_tiny_patch16_224", "unpruned (197 tokens)", None, 1.3,
     "DeiT-Ti's usual baseline figure (reference row of the ToMe DeiT table; that row not read here)"),
    ("DeiT-T", "deit_tiny_patch16_224", "ToMe r=8", 8, 0.9, TOME_PAPER),
    ("DeiT-T", "deit_tiny_patch16_224", "ToMe r=12", 12, 0.8, TOME_PAPER),
    ("DeiT-T", "deit_tiny_patch16_224", "ToMe r=16", 16, 0.6, TOME_PAPER),
]


def vit_schedule(kind, patches: int, depth: int) -> Schedule:
    if kind is None:
        return Schedule()
    if kind == "repshift":
        return repshift(patches, depth)
    return tome_schedule(patches, depth, kind)


def vit_published_section() -> list[str]:
    lines = [
        "### 3.1 Published GFLOPs reproduced (`paper`: multiply-accumulates)",
        "",
        "DeiT, ToMe and Representation Shift print fvcore's multiply-accumulate count as \"GFLOPs\". ToMe's "
        "schedule merges r tokens between the attention and the MLP of every block (`inside=True` stages, "
        "capped at half the candidates); its bipartite matching (keys averaged over heads) is listed as "
        "scoring and moves no figure at this rounding. The README of facebookresearch/ToMe (commit af95e4b) "
        "lists accuracy and im/s per r, not GFLOPs, so the ToMe figures come from the paper; no published GFLOPs "
        "for its ViT-B/16 AugReg (r=16) or MAE ViT-L/16 (r=8) rows could be sourced, so sections 3.3 and 3.4 give "
        "vtoken's counts for them without a published counterpart.",
        "",
        "| Model | Schedule | Published | vtoken `paper` | without scoring | Source |",
        "|---|---|---:|---:|---:|---|",
    ]
    for label, name, what, kind, published, source in VIT_PUBLISHED:
        model = timm_model(name)
        report = flops(model, vit_schedule(kind, 196, 12), convention="paper")
        got = report.prefill / 1e9
        mark = "" if round(got, 1) == published else " **(differs)**"
        lines.append(f"| {label} | {what} | {published:.1f} | {got:.3f}{mark} | "
                     f"{report.prefill_without_scoring / 1e9:.3f} | {source} |")
    return lines + [""]


# (label, how to build, ToMe r)
ENCODERS = [
    ("DeiT-S/16 224 (timm `deit_small_patch16_224`)", lambda: timm_model("deit_small_patch16_224"), 13),
    ("ViT-B/16 224 AugReg (timm `vit_base_patch16_224`)", lambda: timm_model("vit_base_patch16_224"), 16),
    ("ViT-L/16 224, MAE-style average pooling (timm `vit_large_patch16_224`, `global_pool='avg'`)",
     lambda: timm_model("vit_large_patch16_224", global_pool="avg"), 8),
    ("CLIP ViT-L/14 336 (transformers `CLIPConfig`: LLaVA-1.5's tower + 768-d projection)", clip_l336, 16),
    ("SigLIP so400m/14 384 (transformers `SiglipVisionConfig`, attention-pooling head)", siglip_so400m, 16),
    ("open_clip ViT-B-16 (`CLIP` on the meta device: `model.visual`)", lambda: open_clip_model("ViT-B-16"), 16),
]


def encoder_rows(index: int, label: str, build, r: int) -> list[str]:
    model = build()
    base = flops(model)
    depth, patches = len(base.block_tokens), base.patches
    rows = [("unpruned", Schedule()), (f"ToMe r={r} (+ matching)", tome_schedule(patches, depth, r)),
            ("RepShift 0.8³ after blocks 1/4/7 of 12, scaled", repshift(patches, depth))]
    lines = [
        f"### 3.{index} {label}",
        "",
        f"{depth} blocks, {patches} patches + {base.prefix_tokens} prefix token(s) per image."
        + "".join(f" Note: {n}." for n in base.notes),
        "",
        "| Schedule | stages | block mean tokens | `paper` GMACs | patch embed | blocks | head | scoring "
        "| `true` GFLOPs | vs unpruned |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for what, schedule in rows:
        true, paper = flops(model, schedule), flops(model, schedule, convention="paper")
        stages = ", ".join(f"{s.layer}{'i' if s.inside else ''}→{s.keep_tokens}" for s in schedule.stages) or "–"
        if len(schedule.stages) > 4:
            first, last = schedule.stages[0], schedule.stages[-1]
            stages = (f"{len(schedule.stages)} inside stages: {first.layer}i→{first.keep_tokens} … "
                      f"{last.layer}i→{last.keep_tokens}")
        lines.append(
            f"| {what} | {stages} | {true.mean_tokens:.1f} | {paper.prefill / 1e9:.3f} "
            f"| {true.patch_embedding / 1e9:.3f} | {true.blocks / 1e9:.3f} | {true.head / 1e9:.4f} "
            f"| {true.scoring / 1e9:.4f} | {true.prefill / 1e9:.3f} | {true.prefill / base.prefill:.1%} |"
        )
    return lines + [""]


def vit_section() -> list[str]:
    lines = [
        "## 3. Standalone vision encoders (no LLM)",
        "",
        "`vtoken.flops(model_or_config, schedule)` on CLIP / SigLIP configs and models, timm and open_clip ViTs "
        "(`vtoken/accounting_vit.py`). Per image. `Stage(\"vision\", K, layer=l)`: the blocks after block l "
        "run on K patches + the prefix (CLS, registers); `inside=True` (marked `i`): block l's MLP already does "
        "(ToMe). `true` = 2 FLOPs per multiply-accumulate, equal to `FlopCounterMode` "
        "(`tests/test_flops_vit.py`); `paper` = multiply-accumulates, half of it.",
        "",
    ]
    lines += vit_published_section()
    for i, (label, build, r) in enumerate(ENCODERS, start=2):
        lines += encoder_rows(i, label, build, r)
    return lines


def config_sources() -> list[str]:
    """Where each shipped config's values were read (its ``_source`` and ``_provenance``)."""
    import json

    from vtoken.accounting import CONFIG_DIR

    lines = ["## Config sources", "",
             "No network reaches the Hugging Face Hub here: each shipped config was transcribed from what "
             "could be read and cited, as its `_provenance` says.", ""]
    for path in sorted(CONFIG_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        lines.append(f"- **`vtoken/configs/{path.name}`** ({data.get('_source', '?')}): "
                     f"{data.get('_provenance', 'no provenance recorded')}")
    return lines + [""]


def build(command: str = "python eval/flops_report.py") -> str:
    lines = [
        "# FLOPs of visual-token pruning on 7B VLMs and vision encoders",
        "",
        f"Generated by `{command}` from the configs shipped in `vtoken/configs/` "
        "(`vtoken.flops`). TFLOPs per sample (sections 1-2), GFLOPs per image (section 3).",
        "",
    ]
    lines += published_section()
    lines += ["## 2. Both conventions at the literature's budgets", ""]
    for i, (label, name, budgets) in enumerate(MODELS, start=1):
        lines += model_section(i, label, name, budgets)
    lines += vit_section()
    lines += assumptions()
    lines += config_sources()
    return "\n".join(lines)


def main(argv=None) -> None:
    out, command = report_output("flops_report", __doc__.split("\n\n")[0],
                                 "Markdown file to write (e.g. eval/results/flops.md)", argv)
    text = build(command)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

