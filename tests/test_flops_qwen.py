"""vtoken.flops on Qwen2-VL (``qwen2_vl``) and Qwen3-VL (``qwen3_vl``), against what transformers builds
and counts.

Independent references, as in ``tests/test_flops.py``:
- ``torch.utils.flop_counter.FlopCounterMode`` on tiny random ``Qwen3VLForConditionalGeneration``
  models (the full forward with eager attention: patch embedding, the interpolated position
  embeddings, every vision block, the merger and the DeepStack mergers, the LLM with the DeepStack
  adds, the LM head), and on tiny and real-size (Qwen2-VL-7B, Qwen3-VL-8B, meta device) towers and
  LLMs driven block by block so that they do exactly what a schedule says: patches dropped after a
  vision block (the DeepStack mergers after it see fewer tokens), merged tokens dropped before the
  LLM, visual tokens dropped inside the LLM;
- ``Qwen2VLImageProcessor`` set up as Qwen3-VL's processor (16-px patches, 65536 to 16777216 pixels)
  for the patch grid of an image, written apart from the FLOPs model;
- the shipped configs' dimensions against the released models' published sizes (sources in each
  config's ``_provenance``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_flops import Tally, close, drive_llm, llm, pre_llm, rows, split_text  # shared counter drivers

from vtoken.accounting import flops, geometry, load_config, model_dims, shipped_configs
from vtoken.schedule import ScoringCost, Schedule, Stage

QWEN2 = "Qwen/Qwen2-VL-7B-Instruct"
QWEN3 = "Qwen/Qwen3-VL-8B-Instruct"
IMAGE, VIDEO, START, END = 150, 151, 152, 153  # tiny models' special token ids
TEXT = 9  # text tokens of the tiny prompts (start/end markers included)
QWEN3_IMAGE = (250, 330)  # smart_resize (32 px, >= 65536 px) -> 256 x 320 px: 16 x 20 patches, 8 x 10 tokens
QWEN3_GRID = (1, 16, 20)


def tiny_qwen3(deepstack=(0, 2)):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=160, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=list(deepstack)),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    return model.eval()


def tiny_qwen2():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=160, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=3, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    return model.eval()


@pytest.fixture(scope="module")
def qwen3_model():
    return tiny_qwen3()


@pytest.fixture(scope="module")
def qwen2_model():
    return tiny_qwen2()


def patch_inputs(vision_config) -> int:
    p = vision_config.patch_size
    return vision_config.in_channels * vision_config.temporal_patch_size * p * p


def prompt(tokens_per_image: int, images: int) -> torch.Tensor:
    """3 text tokens, then per image <start> + placeholders + <end>, then 4 text tokens: 9 text tokens
    with one image (the markers count as text, as vtoken.flops's ``text_tokens`` does)."""
    ids = [1, 2, 3]
    for _ in range(images):
        ids += [START] + [IMAGE] * tokens_per_image + [END]
    return torch.tensor([ids + [4, 5, 6, 7]])


def drive_qwen_vision(model, schedule, grids, tally, device="cpu"):
    """A Qwen2-VL / Qwen3-VL tower block by block on the packed patches of ``grids`` ((t, h, w) per
    image), one ``cu_seqlens`` segment per image. A ``vision`` stage after block l keeps the first
    ``keep`` patches of every image (whole 2x2 merge units: the processor writes each unit's four
    patches consecutively); a DeepStack merger reads the tokens leaving its block; ``projector_passes``
    rerun the merger (not the DeepStack mergers). Rotary tables are random: they move no FLOP.
    Returns the merged features, (1, tokens, d)."""
    visual = model.model.visual
    cfg = visual.config
    width = getattr(cfg, "embed_dim", None) or cfg.hidden_size
    head_dim = width // cfg.num_heads
    counts = [t * h * w for t, h, w in grids]
    make = torch.empty if device == "meta" else torch.randn
    pixels = make(sum(counts), patch_inputs(cfg), device=device)
    stages = {s.layer: s.keep_tokens for s in schedule.stages if s.site == "vision"}
    scored = {c.layer: c.rows for c in schedule.scoring if c.kind == "vision_attention_rows"}
    deepstack = list(getattr(cfg, "deepstack_visual_indexes", None) or ())
    hidden = tally("vision", lambda: visual.patch_embed(pixels))
    for i, block in enumerate(visual.blocks):
        n = hidden.shape[0]
        cu_seqlens = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32)  # CPU, as .tolist() needs
        rope = (make(n, head_dim, device=device), make(n, head_dim, device=device))
        if i in scored:  # rows x keys of every image, from the block's own q / k weights
            starts = [0, *itertools.accumulate(counts)]
            tally("scoring", lambda: [attention_rows(block, hidden[a:b], scored[i])
                                      for a, b in zip(starts, starts[1:])])
        hidden = tally("vision", lambda: block(hidden, cu_seqlens=cu_seqlens, position_embeddings=rope))
        if i in stages:
            starts = [0, *itertools.accumulate(counts)][:-1]
            hidden = torch.cat([hidden[s: s + stages[i]] for s in starts])
            counts = [stages[i]] * len(counts)
        if i in deepstack:
            merger = visual.deepstack_merger_list[deepstack.index(i)]
            tally("projector", lambda: merger(hidden))
    merged = tally("projector", lambda: visual.merger(hidden))
    for cost in schedule.scoring:
        if cost.kind == "projector_passes":
            for _ in range(cost.passes):
                tally("scoring", lambda: visual.merger(hidden))
    return merged[None]


def attention_rows(block, x, n_rows):
    """Scores of the first ``n_rows`` tokens against all of ``x`` through the q and k slices of the
    block's fused qkv projection (one head of full width, as vtoken counts vision attention rows)."""
    width = x.shape[-1]
    weight = block.attn.qkv.weight
    h = block.norm1(x)
    q = torch.nn.functional.linear(h[:n_rows], weight[:width])
    k = torch.nn.functional.linear(h, weight[width: 2 * width])
    return q @ k.T


PARTS = ("vision", "projector", "llm", "lm_head", "scoring")


def check_driven(model, schedule, grids, image_size, device="cpu", text=TEXT, decode=True):
    tally = Tally()
    visual = drive_qwen_vision(model, schedule, grids, tally, device=device)
    before, after = split_text(model, text, device=device)
    drive_llm(model, model.model.language_model, schedule, before, visual, after, tally, mrope=True,
              decode_steps=1 if decode else 0)
    report = flops(model, schedule, text_tokens=text, image_size=image_size, images=len(grids),
                   dtype=torch.float32)
    for part in PARTS:
        assert close(getattr(report, part), tally.parts[part]), (part, getattr(report, part), tally.parts[part])
    assert close(report.prefill, tally.prefill)
    if decode:
        assert close(report.decode_per_token, tally.parts["decode"])
        assert report.kv_cache_bytes == tally.kv_after_prefill
    return report, tally


# --------------------------------------------------------------------------------------------------
# Shipped configs


@pytest.mark.parametrize(
    "name, llm_dims, vision_dims, out_dim",
    [
        # (layers, hidden, FFN, heads, KV heads, head_dim, vocab); vision (layers, hidden, MLP, patch, heads)
        (QWEN2, (28, 3584, 18944, 28, 4, 128, 152064), (32, 1280, 5120, 14, 16), 3584),
        (QWEN3, (36, 4096, 12288, 32, 8, 128, 151936), (27, 1152, 4304, 16, 16), 4096),
    ],
)
def test_shipped_qwen_configs_have_the_released_dimensions(name, llm_dims, vision_dims, out_dim):
    assert name in shipped_configs().values()
    config = load_config(name)
    assert config.name_or_path == name
    dims = model_dims(config)
    d, v = dims.decoder, dims.vision
    assert (d.layers, d.hidden, d.intermediate, d.heads, d.kv_heads, d.head_dim, d.vocab) == llm_dims
    assert (v.layers, v.hidden, v.intermediate, v.patch, v.heads) == vision_dims
    assert (v.merge, v.temporal_patch, v.mlp_matrices, v.window) == (2, 2, 2, 0)
    assert (dims.projector.in_dim, dims.projector.hidden, dims.projector.out_dim) == (4 * v.hidden, 4 * v.hidden,
                                                                                     out_dim)


def test_qwen3_deepstack_layers_and_geometry():
    dims = model_dims(load_config(QWEN3))
    assert dims.vision.deepstack_layers == (8, 16, 24)
    assert model_dims(load_config(QWEN2)).vision.deepstack_layers == ()
    # 32-px grid: 672² -> 42 × 42 patches, 441 LLM tokens; Qwen2-VL's 28-px grid: 48 × 48, 576.
    assert (geometry(dims).patches, geometry(dims).visual_tokens) == (1764, 441)
    qwen2 = geometry(model_dims(load_config(QWEN2)))
    assert (qwen2.patches, qwen2.visual_tokens, qwen2.windows) == (2304, 576, ())


@pytest.mark.parametrize("image_size", [(672, 672), (200, 200), (500, 300), (1080, 1920), (4000, 6000)])
def test_qwen3_patch_grid_equals_its_image_processor(image_size):
    """Qwen3-VL's processor: Qwen2VLImageProcessor with 16-px patches and 65536..16777216 pixels
    (its preprocessor_config.json); below 65536 pixels an image is enlarged, above 16777216 shrunk."""
    import numpy as np
    from transformers import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16,
                                      temporal_patch_size=2, merge_size=2)
    grid = processor(images=[np.zeros((*image_size, 3), dtype=np.uint8)], return_tensors="pt")["image_grid_thw"]
    geo = geometry(model_dims(load_config(QWEN3)), image_size=image_size)
    assert geo.patches == int(grid.prod()) and geo.visual_tokens == int(grid.prod()) // 4


# --------------------------------------------------------------------------------------------------
# Tiny Qwen3-VL: the model's own forward under the counter


@pytest.mark.parametrize("images", [1, 2])
def test_qwen3_full_forward_matches_counter(qwen3_model, images):
    tokens = 80
    ids = prompt(tokens, images)
    grid = torch.tensor([QWEN3_GRID] * images)
    pixels = torch.randn(images * 320, patch_inputs(qwen3_model.config.vision_config))
    tally = Tally()
    tally("vision+mergers", lambda: qwen3_model.model.visual(pixels, grid_thw=grid))
    tally("all", lambda: qwen3_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, logits_to_keep=1,
                                     mm_token_type_ids=(ids == IMAGE).int()))
    text = ids.shape[1] - images * tokens
    report = flops(qwen3_model, text_tokens=text, image_size=QWEN3_IMAGE, images=images)
    assert report.visual_tokens == images * tokens
    assert close(report.vision + report.projector, tally.parts["vision+mergers"])
    assert close(report.prefill, tally.parts["all"])


def test_qwen3_deepstack_mergers_are_counted(qwen3_model):
    """The DeepStack mergers are 2/3 of this tiny model's merger FLOPs: dropping them from the
    model's count (no deepstack_visual_indexes) moves the counter by exactly what vtoken adds."""
    plain = tiny_qwen3(deepstack=())
    grid = torch.tensor([QWEN3_GRID])
    pixels = torch.randn(320, patch_inputs(plain.config.vision_config))
    counts = {}
    for label, model in (("deepstack", qwen3_model), ("plain", plain)):
        tally = Tally()
        tally("tower", lambda: model.model.visual(pixels, grid_thw=grid))
        counts[label] = tally.parts["tower"]
    with_ds, without = flops(qwen3_model, image_size=QWEN3_IMAGE), flops(plain, image_size=QWEN3_IMAGE)
    assert counts["deepstack"] - counts["plain"] == with_ds.projector - without.projector > 0
    assert with_ds.projector == 3 * without.projector  # merger + two DeepStack mergers of the same shape


# --------------------------------------------------------------------------------------------------
# Tiny models driven block by block under a schedule

QWEN3_SCHEDULES = [
    pytest.param(Schedule(), id="unpruned"),
    pytest.param(Schedule((Stage("projector", 24),), (ScoringCost("projector_passes", passes=2),)),
                 id="pre-llm-24+merger-passes"),
    # after block 1: DeepStack 0 reads 320 patches, DeepStack 2 the 96 kept
    pytest.param(Schedule((Stage("vision", 96, 1), Stage("llm", 10, 2)), (rows("llm", 1, 2),)),
                 id="vision@1-96+fastv"),
    # a stage at a DeepStack block: its merger reads the kept tokens
    pytest.param(Schedule((Stage("vision", 160, 0), Stage("vision", 64, 2), Stage("projector", 12)),
                          (rows("vision", 2),)), id="vision@0,2+pre-llm"),
    pytest.param(llm((1, 40), (2, 20), scoring=[rows("llm", 1), rows("llm", 2)]), id="progressive-llm"),
]


@pytest.mark.parametrize("schedule", QWEN3_SCHEDULES)
def test_qwen3_schedule_matches_counter(qwen3_model, schedule):
    check_driven(qwen3_model, schedule, [QWEN3_GRID], QWEN3_IMAGE)


def test_qwen3_two_images_vision_stage_matches_counter(qwen3_model):
    schedule = Schedule((Stage("vision", 128, 1),))
    report, _ = check_driven(qwen3_model, schedule, [QWEN3_GRID, QWEN3_GRID], QWEN3_IMAGE)
    assert report.layer_visual_tokens[0] == 2 * 128 // 4


QWEN2_IMAGE, QWEN2_GRID = (140, 84), (1, 10, 6)  # 10 x 6 patches, 15 tokens


@pytest.mark.parametrize("schedule", [
    pytest.param(Schedule(), id="unpruned"),
    pytest.param(Schedule((Stage("vision", 24, 1), Stage("llm", 3, 1)), (rows("llm", 0),)), id="vision@1+llm@1"),
    pytest.param(pre_llm(6), id="pre-llm-6"),
])
def test_qwen2_schedule_matches_counter(qwen2_model, schedule):
    check_driven(qwen2_model, schedule, [QWEN2_GRID], QWEN2_IMAGE)


# --------------------------------------------------------------------------------------------------
# The real configs on the meta device (no weights, no compute; SDPA decomposes into counted bmm)


@pytest.mark.parametrize(
    "name, schedule",
    [
        pytest.param(QWEN2, Schedule(), id="qwen2-vl-7b-unpruned"),
        pytest.param(QWEN2, Schedule((Stage("llm", 192, 2),), (rows("llm", 1),)), id="qwen2-vl-7b-fastv"),
        pytest.param(QWEN3, Schedule(), id="qwen3-vl-8b-unpruned"),
        pytest.param(QWEN3, Schedule((Stage("vision", 1024, 12), Stage("projector", 128))),
                     id="qwen3-vl-8b-vision@12+pre-llm"),
    ],
)
def test_real_qwen_configs_on_meta_device_match_counter(name, schedule):
    from transformers import Qwen2VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    config = load_config(name)
    qwen3 = config.model_type == "qwen3_vl"
    model_class = Qwen3VLForConditionalGeneration if qwen3 else Qwen2VLForConditionalGeneration
    with torch.device("meta"):
        model = model_class(config)
    geo = geometry(model_dims(config))
    side = int(geo.patches**0.5)
    check_driven(model, schedule, [(1, side, side)], None, device="meta", text=64, decode=False)


def test_qwen3_representation_shift_merge_matches_counter(qwen3_model):
    """Representation Shift's merge on the packed tower matches merge units (each the mean of its 2 x 2
    patches), not patches: the wrapped model's forward under the counter equals flops, scoring included
    (the report counted the matching over patches: +1.6% of the prefill)."""
    import vtoken

    tokens = 80
    ids = prompt(tokens, 1)
    grid = torch.tensor([QWEN3_GRID])
    pixels = torch.randn(320, patch_inputs(qwen3_model.config.vision_config))
    with vtoken.pruned(qwen3_model, "repshift", keep=0.5, mode="merge"):
        tally = Tally()
        tally("all", lambda: qwen3_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, logits_to_keep=1,
                                         mm_token_type_ids=(ids == IMAGE).int()))
        report = flops(qwen3_model, text_tokens=ids.shape[1] - tokens, image_size=QWEN3_IMAGE)
    assert report.scoring > 0 and close(report.prefill, tally.parts["all"])
