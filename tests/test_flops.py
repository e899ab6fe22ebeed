"""Tests for vtoken.accounting (vtoken.flops and vtoken.kv_cache_bytes).

Every expected value is known independently of the FLOPs model:
- the TFLOPs published in the token-pruning papers (``convention="paper"``);
- ``torch.utils.flop_counter.FlopCounterMode`` on real transformers models (tiny random-weight ones
  on CPU, the real 7B configs on the meta device), driven piece by piece so that they do exactly what
  a schedule says (the vision tower on fewer patches, the LLM split at layer K, ...);
- the KV-cache tensors those runs leave, and the token counts the models build themselves.
Attention runs eager on CPU: there SDPA dispatches to an op the counter does not register (checked
below); on the meta device SDPA decomposes into counted ``bmm`` calls.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from vtoken import compat
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.cache_utils import DynamicCache
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from vtoken.accounting import flops, geometry, kv_cache_bytes, load_config, model_dims
from vtoken.schedule import ScoringCost, Schedule, Stage

LLAVA = "llava-hf/llava-1.5-7b-hf"
NEXT = "llava-hf/llava-v1.6-vicuna-7b-hf"
QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"
TOLERANCE = 0.01  # the bound; the counts below are in fact exact


def llm(*layers_and_keeps: tuple[int, int], scoring=()) -> Schedule:
    return Schedule(tuple(Stage("llm", keep, layer) for layer, keep in layers_and_keeps), tuple(scoring))


def pre_llm(keep: int) -> Schedule:
    return Schedule((Stage("projector", keep),))


def rows(kind: str, layer: int, n: int = 1) -> ScoringCost:
    return ScoringCost(f"{kind}_attention_rows", layer=layer, rows=n)


def tflops(report) -> float:
    return round(report.prefill / 1e12, 2)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= TOLERANCE * abs(b)


# --------------------------------------------------------------------------------------------------
# Paper convention: the published tables


PUBLISHED = [
    # FastV / PyramidDrop / TransPrune papers (TransPrune Tables 1, 2 and 9 list them side by side).
    pytest.param(LLAVA, None, 3.82, id="llava-576"),
    pytest.param(LLAVA, llm((2, 288)), 2.01, id="llava-fastv-K2-288"),
    pytest.param(LLAVA, llm((2, 144)), 1.12, id="llava-fastv-K2-144"),
    pytest.param(LLAVA, llm((8, 288), (16, 144), (24, 72)), 1.78, id="llava-pdrop-8-16-24"),
    pytest.param(LLAVA, pre_llm(192), 1.25, id="llava-pre-llm-192"),
    pytest.param(NEXT, None, 20.83, id="next-2880"),
    # TransPrune-High (576 -> 504 -> 360 -> 72 after 1-based layers 7, 9, 12) and its Table 9 variants.
    pytest.param(LLAVA, llm((7, 504), (9, 360), (12, 72)), 1.56, id="llava-transprune-high"),
    pytest.param(LLAVA, llm((5, 504), (7, 360), (10, 72)), 1.35, id="llava-transprune-5-7-10"),
    pytest.param(LLAVA, llm((9, 504), (11, 360), (14, 72)), 1.77, id="llava-transprune-9-11-14"),
    # LLaVA-NeXT baselines of TransPrune Table 2.
    pytest.param(NEXT, llm((2, 1440)), 10.55, id="next-fastv-K2-1440"),
    pytest.param(NEXT, llm((2, 720)), 5.80, id="next-fastv-K2-720"),
    pytest.param(NEXT, llm((8, 1440), (16, 720), (24, 360)), 9.46, id="next-pdrop-8-16-24"),
    pytest.param(NEXT, llm((7, 2520), (9, 1800), (12, 360)), 8.33, id="next-transprune-high"),
]


@pytest.mark.parametrize("model, schedule, published", PUBLISHED)
def test_paper_convention_reproduces_published_tflops(model, schedule, published):
    assert tflops(flops(model, schedule, convention="paper")) == published


def test_paper_convention_ignores_text_vision_and_head():
    report = flops(LLAVA, convention="paper", text_tokens=500)
    assert (report.vision, report.projector, report.lm_head) == (0, 0, 0)
    assert tflops(report) == 3.82


def test_layer_mean_tokens_of_transprune_high():
    # TransPrune notes: "layer-averaged ≈ 236 tokens" for 576/504/360/72 over 7/2/3/20 layers.
    report = flops(LLAVA, llm((7, 504), (9, 360), (12, 72)))
    assert report.mean_visual_tokens == pytest.approx((7 * 576 + 2 * 504 + 3 * 360 + 20 * 72) / 32)


def test_llava_next_token_counts():
    dims = model_dims(load_config(NEXT))
    # HF processor: 576 base + 48·48 unpadded grid + 48 newlines; papers: 5 crops × 576.
    assert geometry(dims).visual_tokens == 2928
    assert geometry(dims, convention="paper").visual_tokens == 2880
    assert geometry(dims).crops == 5


def test_qwen_token_counts():
    dims = model_dims(load_config(QWEN))
    # 28-pixel rule: 672² -> 48×48 patches, 576 LLM tokens; 1008² -> 5184 / 1296.
    assert (geometry(dims).patches, geometry(dims).visual_tokens) == (2304, 576)
    big = geometry(dims, image_size=(1008, 1008))
    assert (big.patches, big.visual_tokens) == (5184, 1296)
    assert set(geometry(dims).windows) == {64}  # 8×8-patch windows tile 48×48 exactly


# --------------------------------------------------------------------------------------------------
# Config loading


@pytest.mark.parametrize(
    "name, expected",
    [
        # (layers, hidden, FFN, heads, KV heads, head_dim, vocab), vision (layers, hidden, MLP)
        (LLAVA, ((32, 4096, 11008, 32, 32, 128, 32064), (24, 1024, 4096))),
        (NEXT, ((32, 4096, 11008, 32, 32, 128, 32064), (24, 1024, 4096))),
        (QWEN, ((28, 3584, 18944, 28, 4, 128, 152064), (32, 1280, 3420))),
    ],
)
def test_shipped_configs_have_the_published_dimensions(name, expected):
    dims = model_dims(load_config(name))
    d, v = dims.decoder, dims.vision
    got = ((d.layers, d.hidden, d.intermediate, d.heads, d.kv_heads, d.head_dim, d.vocab),
           (v.layers, v.hidden, v.intermediate))
    assert got == expected
    assert load_config(name).name_or_path == name


def test_qwen_vision_details():
    v = model_dims(load_config(QWEN)).vision
    assert (v.full_attention_layers, v.window, v.mlp_matrices, v.merge) == ((7, 15, 23, 31), 4, 3, 2)
    assert model_dims(load_config(QWEN)).projector.out_dim == 3584


def test_config_sources_agree(tmp_path):
    import json

    from vtoken.accounting import CONFIG_DIR

    data = json.loads((CONFIG_DIR / "llava-1.5-7b-hf.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    expected = 3.82
    for source in (LLAVA, data, str(path), tmp_path, load_config(LLAVA), SimpleNamespace(config=load_config(LLAVA))):
        assert tflops(flops(source, convention="paper")) == expected


# --------------------------------------------------------------------------------------------------
# KV cache and scoring lines against hand-known figures


def test_kv_cache_llava_fp16_is_512_kib_per_token():
    # 2 (K, V) · 32 layers · 4096 · 2 bytes = 512 KiB per token: 576 visual tokens = 288 MiB.
    report = flops(LLAVA, text_tokens=64)
    assert report.kv_cache_visual_bytes == 288 * 2**20
    assert report.kv_cache_bytes == kv_cache_bytes(LLAVA, text_tokens=64) == (576 + 64) * 512 * 2**10
    # FastV at K=2: two layers hold all 640 tokens, thirty hold 64 + 288.
    fastv = kv_cache_bytes(LLAVA, llm((2, 288)), text_tokens=64)
    assert fastv == (2 * 640 + 30 * 352) * 2 * 4096 * 2


def test_kv_cache_qwen_gqa_bf16():
    # 2 · 28 layers · 4 KV heads · 128 · 2 bytes = 56 KiB per token.
    assert kv_cache_bytes(QWEN, text_tokens=0, dtype=torch.bfloat16) == 576 * 56 * 2**10


def test_zoo_prune_projector_passes_cost_about_3_1_tflops():
    # Notes: 2·m·N = 2·64·576 token copies through the LLaVA-1.5 projector ≈ 3.1 TFLOPs.
    report = flops(LLAVA, Schedule((Stage("projector", 192),), (ScoringCost("projector_passes", passes=128),)))
    assert round(report.scoring / 1e12, 1) == 3.1
    assert report.prefill == report.prefill_without_scoring + report.scoring


# --------------------------------------------------------------------------------------------------
# True convention against FlopCounterMode


class Tally:
    """Adds up FlopCounterMode counts per part; counters are never nested."""

    def __init__(self) -> None:
        self.parts: dict[str, int] = defaultdict(int)

    def __call__(self, part: str, fn):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = fn()
        self.parts[part] += counter.get_total_flops()
        return out

    @property
    def prefill(self) -> int:
        return sum(v for k, v in self.parts.items() if k != "decode")


def attention_rows(attn, x, n_rows, heads, kv_heads, head_dim, from_end):
    """Scores of ``n_rows`` query rows against every key, from a layer's own q/k projections."""
    q = attn.q_proj(x[:, -n_rows:] if from_end else x[:, :n_rows])
    q = q.view(1, n_rows, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, -1, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    return torch.softmax(q @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1)


def causal_mask(n: int, device) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), device=device).triu(1)[None, None]


def drive_clip_llava(model, schedule, pixel_values, tally):
    """Vision tower (pruned per vision stages, scored per vision rows) and projector; returns the
    visual features (crops flattened) that the LLM would receive before any projector stage."""
    cfg = model.config
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    stages = {s.layer: s.keep_tokens for s in schedule.stages if s.site == "vision"}
    scoring = {c.layer: c.rows for c in schedule.scoring if c.kind == "vision_attention_rows"}
    vc = cfg.vision_config
    h = tally("vision", lambda: tower.pre_layrnorm(tower.embeddings(pixel_values)))
    states = [h]
    for i, layer in enumerate(tower.encoder.layers):
        if i in scoring:
            tally("scoring", lambda: attention_rows(
                layer.self_attn, layer.layer_norm1(h), scoring[i], vc.num_attention_heads,
                vc.num_attention_heads, vc.hidden_size // vc.num_attention_heads, from_end=False))
        h = tally("vision", lambda: layer(h, attention_mask=None))
        if i in stages:
            h = h[:, : 1 + stages[i]]  # CLS + the first kept patches
        states.append(h)
    features = states[cfg.vision_feature_layer][:, 1:]
    projector = model.model.multi_modal_projector
    visual = tally("projector", lambda: projector(features))
    for cost in schedule.scoring:
        if cost.kind == "projector_passes":
            for _ in range(cost.passes):
                tally("scoring", lambda: projector(features))
    return visual.reshape(1, -1, visual.shape[-1])


def drive_llm(model, lm, schedule, text_before, visual, text_after, tally, *, mrope=False, decode_steps=0):
    """The decoder stack layer by layer: ``llm`` stages keep the first visual tokens from layer K on,
    ``llm_attention_rows`` score the last rows at the input of their layer; a DynamicCache records
    what each layer keeps. Returns the cache."""
    cfg = lm.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    stages = {s.layer: s.keep_tokens for s in schedule.stages if s.site == "llm"}
    scoring = {c.layer: c.rows for c in schedule.scoring if c.kind == "llm_attention_rows"}
    for stage in schedule.stages:
        if stage.site == "projector":
            visual = visual[:, : stage.keep_tokens]
    before = text_before.shape[1]
    n_visual = visual.shape[1]
    h = torch.cat([text_before, visual, text_after], dim=1)
    device = h.device
    pos = torch.arange(h.shape[1], device=device)
    full_length = h.shape[1]

    def position_ids(p):
        return p.view(1, 1, -1).expand(3, 1, -1) if mrope else p[None]

    cache = DynamicCache()
    for i, layer in enumerate(lm.layers):
        if i in scoring:
            tally("scoring", lambda: attention_rows(
                layer.self_attn, layer.input_layernorm(h), scoring[i], heads, kv_heads, head_dim, from_end=True))
        if i in stages:
            keep = torch.cat([torch.arange(before + stages[i]), torch.arange(before + n_visual, h.shape[1])])
            h, pos, n_visual = h[:, keep.to(device)], pos[keep.to(device)], stages[i]
        ids = position_ids(pos)
        h = tally("llm", lambda: layer(
            h, attention_mask=causal_mask(h.shape[1], device), position_ids=ids, use_cache=True,
            position_embeddings=lm.rotary_emb(h, ids), **compat.cache_kwargs(cache)))
    tally("lm_head", lambda: model.lm_head(lm.norm(h)[:, -1:]))
    tally.kv_after_prefill = kv_bytes(cache)

    for step in range(decode_steps):
        x = text_after[:, -1:]
        ids = position_ids(torch.tensor([full_length + step], device=device))

        def one_token():
            y = x
            for layer in lm.layers:
                y = layer(y, attention_mask=None, position_ids=ids, use_cache=True, **compat.cache_kwargs(cache),
                          position_embeddings=lm.rotary_emb(y, ids))
            return model.lm_head(lm.norm(y))

        tally("decode", one_token)
    return cache


def kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def split_text(model, n_text: int, device="cpu"):
    embed = model.get_input_embeddings()
    ids = torch.arange(1, n_text + 1, device=device) % 50 + 1
    before = n_text // 3
    return embed(ids[None, :before]), embed(ids[None, before:])


def tiny_llava() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14)
    text = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=100))
    model.set_attn_implementation("eager")
    return model.eval()


@pytest.fixture(scope="module")
def llava_model():
    return tiny_llava()


TEXT = 12  # text tokens of the tiny prompts
TINY_SCHEDULES = [
    pytest.param(Schedule(), id="unpruned"),
    pytest.param(pre_llm(6), id="pre-llm-6"),
    pytest.param(llm((2, 8), scoring=[rows("llm", 1)]), id="fastv-K2-8+last-row"),
    pytest.param(llm((1, 12), (2, 8), (3, 4), scoring=[rows("llm", 1), rows("llm", 2), rows("llm", 3)]),
                 id="progressive-1-2-3"),
    pytest.param(Schedule((Stage("vision", 9, 0),), (rows("vision", 0),)), id="vision-after-0+cls-row"),
    pytest.param(Schedule((Stage("vision", 12, 1), Stage("projector", 10), Stage("llm", 5, 2)),
                          (ScoringCost("projector_passes", passes=2), rows("llm", 2, 4))), id="combined"),
]


@pytest.mark.parametrize("schedule", TINY_SCHEDULES)
def test_true_convention_matches_flop_counter_tiny_llava(llava_model, schedule):
    tally = Tally()
    visual = drive_clip_llava(llava_model, schedule, torch.randn(1, 3, 56, 56), tally)
    before, after = split_text(llava_model, TEXT)
    drive_llm(llava_model, llava_model.model.language_model, schedule, before, visual, after, tally, decode_steps=1)
    report = flops(llava_model, schedule, text_tokens=TEXT, dtype=torch.float32)
    for part in ("vision", "projector", "llm", "lm_head", "scoring"):
        assert close(getattr(report, part), tally.parts[part]), part
    assert close(report.prefill, tally.prefill)
    assert close(report.decode_per_token, tally.parts["decode"])
    assert report.kv_cache_bytes == tally.kv_after_prefill


def test_decode_mean_over_several_steps_matches_counter(llava_model):
    schedule, steps = llm((2, 8)), 3
    tally = Tally()
    visual = drive_clip_llava(llava_model, schedule, torch.randn(1, 3, 56, 56), tally)
    before, after = split_text(llava_model, TEXT)
    drive_llm(llava_model, llava_model.model.language_model, schedule, before, visual, after, tally,
              decode_steps=steps)
    report = flops(llava_model, schedule, text_tokens=TEXT, decode_tokens=steps)
    assert close(report.decode_total, tally.parts["decode"])


def test_full_model_forward_matches_and_cpu_sdpa_attention_is_invisible_to_the_counter(llava_model):
    ids = torch.tensor([[1, 5, 6, 7, 8] + [100] * 16 + [9, 10, 11, 12, 13, 14, 15]])
    pixels = torch.randn(1, 3, 56, 56)
    counts = {}
    for impl in ("eager", "sdpa"):
        llava_model.set_attn_implementation(impl)
        tally = Tally()
        tally("all", lambda: llava_model(input_ids=ids, pixel_values=pixels, logits_to_keep=1))
        counts[impl] = tally.parts["all"]
    llava_model.set_attn_implementation("eager")
    report = flops(llava_model, text_tokens=TEXT)
    assert close(report.prefill, counts["eager"])
    # On CPU, SDPA runs aten._scaled_dot_product_flash_attention_for_cpu, which FlopCounterMode does not
    # register: exactly the QKᵀ and AV products (4·n²·width per layer) go missing.
    cfg = llava_model.config
    vision_attention = 3 * 4 * 17**2 * cfg.vision_config.hidden_size
    llm_attention = 4 * 4 * 28**2 * cfg.text_config.hidden_size
    assert counts["eager"] - counts["sdpa"] == vision_attention + llm_attention


# --------------------------------------------------------------------------------------------------
# LLaVA-NeXT and Qwen2.5-VL tiny models


def tiny_llava_next() -> LlavaNextForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=7)
    text = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=100,
                             image_grid_pinpoints=[[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]])
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    return model.eval()


@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next()


def next_inputs(model, image_size):
    crops = image_size_to_num_patches(image_size, model.config.image_grid_pinpoints, 28)
    pixels = torch.randn(1, crops, 3, 28, 28)
    sizes = torch.tensor([image_size])
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes, vision_feature_layer=-2,
                                                vision_feature_select_strategy="default").pooler_output
    return pixels, sizes, sum(f.shape[0] for f in packed)


@pytest.mark.parametrize("image_size", [(56, 56), (30, 56), (56, 20), (100, 30)])
def test_llava_next_full_forward_matches_counter(next_model, image_size):
    pixels, sizes, packed = next_inputs(next_model, image_size)
    assert geometry(model_dims(next_model.config), image_size=image_size).visual_tokens == packed
    ids = torch.tensor([[1, 2, 3] + [100] * packed + [4, 5, 6, 7]])
    tally = Tally()
    tally("all", lambda: next_model(input_ids=ids, pixel_values=pixels, image_sizes=sizes, logits_to_keep=1))
    assert close(flops(next_model, text_tokens=7, image_size=image_size).prefill, tally.parts["all"])


def test_llava_next_fastv_matches_counter(next_model):
    image_size, schedule = (30, 56), llm((2, 20), scoring=[rows("llm", 1)])
    pixels, _, packed = next_inputs(next_model, image_size)
    tally = Tally()
    visual = drive_clip_llava(next_model, schedule, pixels[0], tally)
    visual = torch.cat([visual, visual], dim=1)[:, :packed]  # stand-in for unpadding + newlines
    before, after = split_text(next_model, TEXT)
    drive_llm(next_model, next_model.model.language_model, schedule, before, visual, after, tally, decode_steps=1)
    report = flops(next_model, schedule, text_tokens=TEXT, image_size=image_size, dtype=torch.float32)
    assert close(report.prefill, tally.prefill)
    assert close(report.decode_per_token, tally.parts["decode"])
    assert report.kv_cache_bytes == tally.kv_after_prefill


def tiny_qwen() -> Qwen2_5_VLForConditionalGeneration:
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=160, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1, 3], out_hidden_size=64),
        image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    return model.eval()


@pytest.fixture(scope="module")
def qwen_model():
    return tiny_qwen()


QWEN_IMAGE = (140, 84)  # 10 × 6 patches, 5 × 3 merged tokens: edge windows are cut short


def test_qwen_full_forward_matches_counter(qwen_model):
    ids = torch.tensor([[1, 2, 3, 152] + [150] * 15 + [153, 4, 5, 6, 7]])
    grid = torch.tensor([[1, 10, 6]])
    pixels = torch.randn(60, 3 * 2 * 14 * 14)
    tally = Tally()
    tally("vision+merger", lambda: qwen_model.model.visual(pixels, grid_thw=grid))
    tally("all", lambda: qwen_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, logits_to_keep=1))
    report = flops(qwen_model, text_tokens=9, image_size=QWEN_IMAGE)
    assert close(report.vision + report.projector, tally.parts["vision+merger"])
    assert close(report.prefill, tally.parts["all"])


def test_qwen_fastv_llm_matches_counter(qwen_model):
    schedule = llm((1, 6), (2, 3), scoring=[rows("llm", 1, 2)])
    tally = Tally()
    visual = torch.randn(1, 15, 64)
    before, after = split_text(qwen_model, 9)
    drive_llm(qwen_model, qwen_model.model.language_model, schedule, before, visual, after, tally, mrope=True,
              decode_steps=1)
    report = flops(qwen_model, schedule, text_tokens=9, image_size=QWEN_IMAGE, dtype=torch.float32)
    for part in ("llm", "lm_head", "scoring"):
        assert close(getattr(report, part), tally.parts[part]), part
    assert close(report.decode_per_token, tally.parts["decode"])
    assert report.kv_cache_bytes == tally.kv_after_prefill


# --------------------------------------------------------------------------------------------------
# The real 7B configs on the meta device (no weights, no compute)


@pytest.mark.parametrize(
    "name, model_class, schedule, visual",
    [
        pytest.param(LLAVA, LlavaForConditionalGeneration, Schedule(), 576, id="llava-unpruned"),
        pytest.param(LLAVA, LlavaForConditionalGeneration, llm((2, 288), scoring=[rows("llm", 1)]), 576,
                     id="llava-fastv"),
        pytest.param(LLAVA, LlavaForConditionalGeneration, pre_llm(192), 576, id="llava-pre-llm"),
        pytest.param(NEXT, LlavaNextForConditionalGeneration, llm((2, 640)), 2928, id="next-fastv"),
    ],
)
def test_real_configs_on_meta_device_match_counter(name, model_class, schedule, visual):
    config = load_config(name)
    with torch.device("meta"):
        model = model_class(config)
    crops = geometry(model_dims(config)).crops
    tally = Tally()
    features = drive_clip_llava(model, schedule, torch.empty(crops, 3, 336, 336, device="meta"), tally)
    if features.shape[1] < visual:  # LLaVA-NeXT's newline tokens (no unpadding at 672×672)
        features = torch.cat([features, features[:, : visual - features.shape[1]]], dim=1)
    before, after = split_text(model, 64, device="meta")
    drive_llm(model, model.model.language_model, schedule, before, features, after, tally)
    report = flops(name, schedule, text_tokens=64)
    for part in ("vision", "projector", "llm", "lm_head", "scoring"):
        assert close(getattr(report, part), tally.parts[part]), part
    assert report.kv_cache_bytes == tally.kv_after_prefill * 2 // 4  # meta model is fp32, report fp16


# --------------------------------------------------------------------------------------------------
# Wrapped models


def test_wrapped_model_reports_its_own_schedule(monkeypatch):
    asked = {}

    def schedule_of(model, visual_tokens, instruction_tokens, patchless_tokens):
        asked["visual_tokens"], asked["patchless"] = visual_tokens, patchless_tokens
        return llm((2, 288))

    monkeypatch.setitem(sys.modules, "vtoken.api", SimpleNamespace(schedule_of=schedule_of))
    wrapped = SimpleNamespace(config=load_config(LLAVA), _vtoken_state=object())
    assert tflops(flops(wrapped, convention="paper")) == 2.01  # FastV K=2, 288 tokens
    assert asked["visual_tokens"] == 576 and asked["patchless"] == 0
    assert tflops(flops(LLAVA, wrapped, convention="paper")) == 2.01


def test_wrapped_model_without_api_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "vtoken.api", None)
    wrapped = SimpleNamespace(config=load_config(LLAVA), _vtoken_state=object())
    with pytest.raises(RuntimeError, match="schedule_of"):
        flops(wrapped)


def test_schedule_keeping_more_than_available_is_refused():
    with pytest.raises(ValueError, match="576"):
        flops(LLAVA, pre_llm(600))
    with pytest.raises(ValueError, match="layer"):
        flops(LLAVA, llm((32, 100)))


@pytest.mark.parametrize(
    "method, options",
    [
        ("random", dict(keep_tokens=6)),
        ("fastv", dict(keep_tokens=8, layer=2)),
        ("fastv", dict(keep_tokens=8, layer=2, score_layer="current")),  # layer 2 takes the kept rows' keys
        ("random", dict(keep_tokens=8, site="vision", layer=0)),
    ],
)
def test_wrapped_model_forward_matches_counter(method, options):
    """The schedule a wrapped model reports is what its forward does, FLOP for FLOP."""
    api = pytest.importorskip("vtoken.api")
    model = tiny_llava()
    ids = torch.tensor([[1, 5, 6, 7, 8] + [100] * 16 + [9, 10, 11, 12, 13, 14, 15]])
    pixels = torch.randn(1, 3, 56, 56)
    api.wrap(model, method, **options)
    try:
        tally = Tally()
        tally("all", lambda: model(input_ids=ids, pixel_values=pixels, logits_to_keep=1))
        assert flops(model, text_tokens=TEXT).prefill == tally.parts["all"]  # exact, not only within 1%
    finally:
        api.unwrap(model)


def test_wrapped_transprune_forward_matches_counter():
    """TransPrune's three stages with their instruction-guided attention: what the wrapped forward
    does (the IGA's projections and scores at each stage, the layer then taking the kept tokens' keys
    from it) is what ``flops`` reports, FLOP for FLOP, given this prompt's 7 instruction tokens (the
    text after the image); the assumed 32 rows count more."""
    api = pytest.importorskip("vtoken.api")
    model = tiny_llava()
    ids = torch.tensor([[1, 5, 6, 7, 8] + [100] * 16 + [9, 10, 11, 12, 13, 14, 15]])
    pixels = torch.randn(1, 3, 56, 56)
    api.wrap(model, "transprune", keep_tokens=8)
    try:
        assert [s.layer for s in api.strategy_of(model).stages()] == [1, 2, 3]
        tally = Tally()
        tally("all", lambda: model(input_ids=ids, pixel_values=pixels, logits_to_keep=1))
        assert flops(model, text_tokens=TEXT, instruction_tokens=7).prefill == tally.parts["all"]  # exact
        assert flops(model, text_tokens=TEXT).prefill > tally.parts["all"]  # 32 rows assumed
        assert api.schedule_of(model, instruction_tokens=7).scoring[0].rows == 7
        with pytest.raises(ValueError, match="instruction_tokens must be"):
            api.schedule_of(model, instruction_tokens=-1)
        for wrong in (-1, 2.5, True):
            with pytest.raises(ValueError, match="patchless_tokens must be a count"):
                api.schedule_of(model, patchless_tokens=wrong)
        with pytest.raises(ValueError, match="instruction_tokens= applies to a model wrapped"):
            flops(model.config, api.schedule_of(model), instruction_tokens=7)
    finally:
        api.unwrap(model)


@pytest.mark.parametrize("method, options", [("transprune", dict(keep_tokens=8)),
                                             ("fastv", dict(keep_tokens=8, layer=2, score_layer="current"))])
def test_wrapped_forward_over_a_fused_qkv_llm_matches_counter(method, options, monkeypatch):
    """A LLaVA over Phi-3 (one qkv_proj for queries, keys and values, partial rotary): the scoring
    projects its query rows and every candidate's keys from their columns of the fused weight alone,
    and layer K projects the kept tokens' keys again with its queries and values (it has no key
    projection to take them); ``flops`` reports that, FLOP for FLOP (with the Llama model the same
    schedule counts fewer: there the kept keys are handed over)."""
    from transformers import Phi3Config

    api = pytest.importorskip("vtoken.api")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14)
    text = Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, partial_rotary_factor=0.5,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=100))
    model.set_attn_implementation("eager")
    model.eval()
    ids = torch.tensor([[1, 5, 6, 7, 8] + [100] * 16 + [9, 10, 11, 12, 13, 14, 15]])
    pixels = torch.randn(1, 3, 56, 56)
    assert model_dims(model.config).decoder.fused_qkv
    api.wrap(model, method, **options)
    try:
        tally = Tally()
        tally("all", lambda: model(input_ids=ids, pixel_values=pixels, logits_to_keep=1))
        counted = flops(model, text_tokens=TEXT, instruction_tokens=7).prefill
        assert counted == tally.parts["all"]  # exact
        monkeypatch.setattr(compat, "FUSED_QKV_MODEL_TYPES", ())  # counted as if layer K took the kept keys
        assert flops(model, text_tokens=TEXT, instruction_tokens=7).prefill < counted
    finally:
        api.unwrap(model)


def test_qwen2_vl_full_forward_matches_counter():
    """Qwen2-VL: full attention in every vision block (no windows), a two-matrix MLP, the 2x2 merger."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=160, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=3, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    model.eval()
    ids = torch.tensor([[1, 2, 3, 152] + [150] * 15 + [153, 4, 5, 6, 7]])
    grid = torch.tensor([[1, 10, 6]])
    pixels = torch.randn(60, 3 * 2 * 14 * 14)
    tally = Tally()
    tally("vision+merger", lambda: model.model.visual(pixels, grid_thw=grid))
    tally("all", lambda: model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, logits_to_keep=1,
                               mm_token_type_ids=(ids == 150).int()))
    report = flops(model, text_tokens=9, image_size=QWEN_IMAGE)
    assert report.visual_tokens == 15
    assert close(report.vision + report.projector, tally.parts["vision+merger"])
    assert close(report.prefill, tally.parts["all"])


@pytest.mark.parametrize("method", ["fastv", "aif"])
def test_a_mistral_llm_with_a_sliding_window_reads_the_cached_keys_as_counted(method):
    """LLaVA on a Mistral LLM whose sliding window (4096, its default) holds the whole prompt: the
    scoring reads the keys layers left in the cache, as flops says (keys_cached), instead of projecting
    them again. The FLOP counter sees the same work as without a window (it saw 1-2.5% more before the
    cache's sliding layers were trusted), and for both exactly what flops reports
    given the prompt's 7 instruction tokens."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    import vtoken.api as api
    from tiny import IMAGE_TOKEN, PAD, VOCAB, _vision

    ids = torch.tensor([[1, 5, 6, 7, 8] + [IMAGE_TOKEN] * 16 + [9, 10, 11, 12, 13, 14, 15]])
    pixels = torch.randn(1, 3, 32, 32)
    counted = {}
    for window in (4096, None):
        text = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             pad_token_id=PAD, sliding_window=window)
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=_vision(), text_config=text,
                                                          image_token_id=IMAGE_TOKEN, image_seq_length=16)).eval()
        model.set_attn_implementation("eager")
        with api.pruned(model, method, keep_tokens=8, layer=2):
            tally = Tally()
            tally("all", lambda: model(input_ids=ids, pixel_values=pixels, logits_to_keep=1))
            counted[window] = tally.parts["all"]
            assert flops(model, text_tokens=12, instruction_tokens=7).prefill == counted[window]
    assert counted[4096] == counted[None]


@pytest.mark.parametrize("family", ["llava", "qwen2_5"])
@pytest.mark.parametrize("method,options", [
    ("random", {"keep_tokens": 4}), ("random", {"keep_tokens": 3, "site": "llm", "layer": 2}),
    ("random", {"keep": 0.25}), ("pool", {"keep": 0.5, "site": "vision", "layer": 0}), ("fastv", {"keep_tokens": 2}),
])
def test_a_sample_of_several_images_is_counted_per_image(family, method, options):
    """flops(wrapped, images=2) of one sample holding two images: every budget counts per image (README
    Budgets), as the wrapped forward keeps them, so its KV-cache bytes are those of the cache the
    forward leaves. The schedule was built as if the sample were ONE image of both images' tokens: a
    keep_tokens budget counted once, a vision-site stage on Qwen-VL twice."""
    import vtoken
    from tiny import qwen_inputs, tiny_llava, tiny_qwen2_vl

    if family == "llava":
        model = tiny_llava()
        ids = torch.tensor([[1, 5, *[99] * 16, 6, *[99] * 16, 7, 8]])
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(2, 3, 32, 32)}
    else:
        model = tiny_qwen2_vl(version="2.5")
        x = qwen_inputs(model, grids=((1, 4, 4), (1, 4, 4)), images_per_sample=[2])
    visual = int((x["input_ids"] == 99).sum())
    text = x["input_ids"].shape[1] - visual
    with vtoken.pruned(model, method, **options), torch.no_grad():
        cache = compat.output_cache(model(**x, use_cache=True))
        report = flops(model, text_tokens=text, images=2, visual_tokens=visual, dtype=torch.float32)
    assert report.kv_cache_bytes == kv_bytes(cache)


def test_the_mean_decode_step_is_the_sum_over_every_step_in_closed_form():
    """Decode FLOPs average every step's (step i attends to cached + i keys) in closed form: equal to
    the sum written out, and a million decoded tokens cost no time to count."""
    import time

    from vtoken.accounting import _mean_decode_layer, decoder_layer_flops

    d = model_dims(load_config(LLAVA)).decoder
    for cached, steps in ((600, 1), (600, 7), (13, 250)):
        assert _mean_decode_layer(d, cached, steps, 0) == sum(
            decoder_layer_flops(d, 1, cached + i, 0) for i in range(1, steps + 1)) / steps
    start = time.perf_counter()
    _mean_decode_layer(d, 600, 10**6, 0)
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize("argument,value,message", [
    ("text_tokens", -100, r"text_tokens must be a count of tokens >= 0, got -100"),
    ("text_tokens", 1.5, r"text_tokens must be a count of tokens >= 0, got 1.5"),
    ("decode_tokens", "a", r"decode_tokens must be a count of tokens >= 1, got 'a'"),
    ("image_size", (0, 0), r"image_size must be \(height, width\) in pixels, got \(0, 0\)"),
])
def test_counts_that_are_not_counts_are_refused(argument, value, message):
    """(a negative text_tokens gave negative FLOPs and KV bytes; a string, torch's TypeError)"""
    with pytest.raises(ValueError, match=message):
        flops(LLAVA, **{argument: value})
