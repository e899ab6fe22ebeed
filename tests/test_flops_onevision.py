"""vtoken.flops on LLaVA-OneVision (``llava_onevision``), against what transformers builds and counts.

Independent references, as in ``tests/test_flops.py``:
- the visual tokens a tiny random ``LlavaOnevisionForConditionalGeneration`` packs itself
  (``get_image_features`` / ``get_video_features``), for images whose unpadded crop grid is and is
  not shrunk by the model's bilinear interpolation, several images per sample, and a video;
- ``torch.utils.flop_counter.FlopCounterMode`` on that model's full forward (eager attention) and on
  the real 7B config on the meta device;
- for the 7B config's many image sizes, ``LlavaOnevisionProcessor``'s own token count (the number of
  ``<image>`` placeholders it writes), written apart from the modelling code.
"""

from __future__ import annotations

import types
from types import SimpleNamespace

import pytest
import torch
from test_flops import Tally, close, drive_llm, llm, pre_llm, rows, split_text  # shared counter drivers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from vtoken.accounting import flops, geometry, load_config, model_dims, shipped_configs
from vtoken.schedule import Schedule, Stage

OV = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
IMAGE, VIDEO = 100, 101  # tiny model's placeholder ids
SIDE = 28  # tiny tower: 28 px crops in 7 px patches, 4 × 4 = 16 patches per crop
TEXT = 7  # text tokens of the tiny prompts: 3 before the visual tokens, 4 after


def tiny_onevision(use_head: bool = False) -> LlavaOnevisionForConditionalGeneration:
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=SIDE, patch_size=7, vision_use_head=use_head)
    text = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
    # the real model's pinpoint pattern at this scale: every [28 i, 28 j], i, j in 1..6; anyres_max_9
    pinpoints = [[SIDE * i, SIDE * j] for i in range(1, 7) for j in range(1, 7)]
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                                  video_token_index=VIDEO, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                  image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    return model.eval()


@pytest.fixture(scope="module")
def ov_model():
    return tiny_onevision()


def image_inputs(model, image_sizes, batch_num_images=None):
    """Random crops for one sample's images and the visual tokens the model packs from them."""
    if batch_num_images is None:
        crops = [image_size_to_num_patches(size, model.config.image_grid_pinpoints, SIDE) for size in image_sizes]
    else:
        crops = [1] * len(image_sizes)  # several images in a sample: base view only
    pixels = torch.randn(len(image_sizes), max(crops), 3, SIDE, SIDE)
    sizes = torch.tensor(image_sizes)
    kwargs = {} if batch_num_images is None else {"batch_num_images": torch.tensor(batch_num_images)}
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes, **kwargs).pooler_output
    return dict(pixel_values=pixels, image_sizes=sizes, **kwargs), sum(f.shape[0] for f in packed), sum(crops)


# (56, 56): 2×2 crops, an 8×8 grid kept as is (ratio 0.67). (30, 84): 1×3 crops, unpadded to 10×12.
# (112, 112): 4×4 crops, 16×16 grid, ratio 1.33 > 1.1 -> resized to 12×12. (100, 170): 4×6 crops,
# unpadded to 14×24, ratio 1.53 -> 9×15. (168, 28): 6×1 crops, 24×4 -> no resize (ratio 0.82).
SIZES = [(56, 56), (30, 84), (112, 112), (100, 170), (168, 28)]
RESIZED = {(112, 112): (12, 12), (100, 170): (9, 15)}


@pytest.mark.parametrize("image_size", SIZES)
def test_tiny_token_count_is_what_the_model_packs(ov_model, image_size):
    inputs, packed, crops = image_inputs(ov_model, [image_size])
    geo = geometry(model_dims(ov_model.config), image_size=image_size)
    assert geo.visual_tokens == packed
    assert (geo.crops, geo.patches, geo.projector_tokens) == (crops, 16, crops * 16)
    if image_size in RESIZED:  # the interpolation branch is what these sizes exercise
        r, c = RESIZED[image_size]
        assert packed == 16 + r * c + r
    paper = geometry(model_dims(ov_model.config), image_size=image_size, convention="paper")
    assert paper.visual_tokens == crops * 16


@pytest.mark.parametrize("image_size", SIZES)
def test_tiny_full_forward_matches_counter(ov_model, image_size):
    inputs, packed, _ = image_inputs(ov_model, [image_size])
    ids = torch.tensor([[1, 2, 3] + [IMAGE] * packed + [4, 5, 6, 7]])
    tally = Tally()
    tally("vision+projector", lambda: ov_model.model.get_image_features(**inputs))
    tally("all", lambda: ov_model(input_ids=ids, logits_to_keep=1, **inputs))
    report = flops(ov_model, text_tokens=TEXT, image_size=image_size)
    assert report.visual_tokens == packed
    assert close(report.vision + report.projector, tally.parts["vision+projector"])
    assert close(report.prefill, tally.parts["all"])


def test_tiny_several_images_are_base_views_with_one_newline_each(ov_model):
    inputs, packed, _ = image_inputs(ov_model, [(112, 112), (56, 30), (30, 56)], batch_num_images=[3])
    assert packed == 3 * (16 + 1)
    assert geometry(model_dims(ov_model.config), images=3).visual_tokens == packed
    ids = torch.tensor([[1, 2, 3] + [IMAGE] * packed + [4, 5, 6, 7]])
    tally = Tally()
    tally("all", lambda: ov_model(input_ids=ids, logits_to_keep=1, **inputs))
    assert close(flops(ov_model, text_tokens=TEXT, images=3).prefill, tally.parts["all"])


def test_tiny_video_frames_are_pooled_to_a_quarter_plus_one_newline(ov_model):
    frames = 3
    video = torch.randn(1, frames, 3, SIDE, SIDE)
    with torch.no_grad():
        packed = ov_model.model.get_video_features(pixel_values_videos=video).pooler_output.shape[1]
    assert packed == frames * 2 * 2 + 1  # ceil(4 / 2)² per frame + one newline
    dims = model_dims(ov_model.config)
    assert geometry(dims, frames=frames).visual_tokens == packed
    assert geometry(dims, frames=frames, convention="paper").visual_tokens == frames * 4
    ids = torch.tensor([[1, 2, 3] + [VIDEO] * packed + [4, 5, 6, 7]])
    tally = Tally()
    tally("all", lambda: ov_model(input_ids=ids, pixel_values_videos=video, logits_to_keep=1))
    assert close(flops(ov_model, text_tokens=TEXT, frames=frames).prefill, tally.parts["all"])
    with pytest.raises(ValueError, match="video"):
        flops(ov_model, Schedule((Stage("vision", 8, 0),)), frames=frames)


def drive_siglip(model, schedule, pixel_values, tally):
    """The SigLIP tower layer by layer (vision stages keep the first patches of every crop), then the
    projector on the last layer's output (``vision_feature_layer=-1``, ``"full"``)."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    stages = {s.layer: s.keep_tokens for s in schedule.stages if s.site == "vision"}
    h = tally("vision", lambda: tower.embeddings(pixel_values))
    for i, layer in enumerate(tower.encoder.layers):
        h = tally("vision", lambda: layer(h, attention_mask=None))
        if i in stages:
            h = h[:, : stages[i]]
    visual = tally("projector", lambda: model.model.multi_modal_projector(h))
    return visual.reshape(1, -1, visual.shape[-1])


@pytest.mark.parametrize(
    "schedule",
    [
        pytest.param(llm((1, 30), scoring=[rows("llm", 1)]), id="fastv-K1-30"),
        pytest.param(pre_llm(40), id="pre-llm-40"),
        pytest.param(Schedule((Stage("vision", 9, 0), Stage("llm", 20, 2))), id="vision-after-0+llm"),
    ],
)
def test_tiny_schedules_match_counter(ov_model, schedule):
    image_size = (112, 112)
    inputs, packed, _ = image_inputs(ov_model, [image_size])
    tally = Tally()
    visual = drive_siglip(ov_model, schedule, inputs["pixel_values"][0], tally)
    if schedule.stages[0].site != "vision":  # the packed count (resized grid + newlines) reaches the LLM
        visual = torch.cat([visual, visual], dim=1)[:, :packed]
    else:  # what reaches the LLM after a vision stage: test_wrapped_vision_stage_reaches_the_llm_as_counted
        reaching = flops(ov_model, schedule, text_tokens=TEXT, image_size=image_size).layer_visual_tokens[0]
        visual = torch.cat([visual] * 4, dim=1)[:, :reaching]
    before, after = split_text(ov_model, TEXT)
    drive_llm(ov_model, ov_model.model.language_model, schedule, before, visual, after, tally, decode_steps=1)
    report = flops(ov_model, schedule, text_tokens=TEXT, image_size=image_size, dtype=torch.float32)
    for part in ("vision", "projector", "llm", "lm_head", "scoring"):
        assert close(getattr(report, part), tally.parts[part]), part
    assert close(report.decode_per_token, tally.parts["decode"])
    assert report.kv_cache_bytes == tally.kv_after_prefill


def test_tiny_siglip_pooling_head_is_counted_where_enabled():
    model = tiny_onevision(use_head=True)
    inputs, _, _ = image_inputs(model, [(56, 56)])
    tally = Tally()
    tally("vision", lambda: model.model.vision_tower(inputs["pixel_values"][0]))
    report = flops(model, image_size=(56, 56))
    assert model_dims(model.config).vision.pooling_head
    assert close(report.vision, tally.parts["vision"])


# --------------------------------------------------------------------------------------------------
# The shipped 7B config


def test_shipped_7b_config_dimensions():
    assert shipped_configs()["llava-onevision-qwen2-7b-ov-hf"] == OV
    config = load_config(OV)
    assert config.name_or_path == OV
    dims = model_dims(config)
    d, v = dims.decoder, dims.vision
    assert (d.layers, d.hidden, d.intermediate, d.heads, d.kv_heads, d.head_dim, d.vocab) == (
        28, 3584, 18944, 28, 4, 128, 152128)
    # SigLIP so400m without its last layer (26 of 27) and without its pooling head, no CLS token
    assert (v.layers, v.hidden, v.intermediate, v.patch, v.image_size, v.cls_tokens, v.pooling_head) == (
        26, 1152, 4304, 14, 384, 0, False)
    assert dims.projector.in_dim == 1152 and dims.anyres_max == 9
    assert dims.grid_pinpoints == tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
    assert (config.image_token_index, config.video_token_index) == (151646, 151647)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")


def test_shipped_7b_default_image():
    dims = model_dims(load_config(OV))
    # 672×672 -> best pinpoint 768×768: base view + 2×2 crops; 54×54 grid (ratio 0.67, kept) + 54 newlines
    assert geometry(dims).visual_tokens == 729 + 54 * 54 + 54 == 3699
    assert geometry(dims).crops == 5
    assert geometry(dims, convention="paper").visual_tokens == 5 * 729
    assert geometry(dims, images=2).visual_tokens == 2 * 730
    assert geometry(dims, frames=8).visual_tokens == 8 * 196 + 1


def processor_token_count(h: int, w: int) -> int:
    """``LlavaOnevisionProcessor``'s own count of ``<image>`` placeholders for one image of h × w."""
    config = load_config(OV)
    image_processor = SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints)
    processor = SimpleNamespace(image_processor=image_processor, num_image_tokens=729,
                                vision_aspect_ratio=config.vision_aspect_ratio)
    unpadded = LlavaOnevisionProcessor._get_unpadded_features
    processor._get_unpadded_features = types.MethodType(unpadded, processor)
    return LlavaOnevisionProcessor._get_number_of_features(processor, h, w, 384, 384)


@pytest.mark.parametrize("image_size", [(384, 384), (672, 672), (480, 640), (899, 1024), (1080, 1920),
                                        (2000, 500), (2304, 2304), (300, 4000)])
def test_shipped_7b_token_counts_match_the_processor(image_size):
    dims = model_dims(load_config(OV))
    assert geometry(dims, image_size=image_size).visual_tokens == processor_token_count(*image_size)


@pytest.fixture(scope="module")
def meta_7b():
    with torch.device("meta"):
        return LlavaOnevisionForConditionalGeneration(load_config(OV))


@pytest.mark.parametrize(
    "image_size, schedule",
    [
        pytest.param(None, Schedule(), id="672-unpruned"),
        pytest.param((1080, 1920), llm((2, 1000), scoring=[rows("llm", 1)]), id="1080p-fastv"),
    ],
)
def test_shipped_7b_on_meta_device_matches_counter(meta_7b, image_size, schedule):
    size = image_size or (672, 672)
    crops = image_size_to_num_patches(size, meta_7b.config.image_grid_pinpoints, 384)
    pixels = torch.empty(1, crops, 3, 384, 384, device="meta")
    tally = Tally()
    packed = tally("vision+projector", lambda: meta_7b.model.get_image_features(
        pixel_values=pixels, image_sizes=torch.tensor([size])).pooler_output)
    visual = torch.cat(packed, dim=0)[None]
    before, after = split_text(meta_7b, 64, device="meta")
    drive_llm(meta_7b, meta_7b.model.language_model, schedule, before, visual, after, tally)
    report = flops(OV, schedule, text_tokens=64, image_size=image_size)
    assert report.visual_tokens == visual.shape[1]
    assert close(report.vision + report.projector, tally.parts["vision+projector"])
    for part in ("llm", "lm_head", "scoring"):
        assert close(getattr(report, part), tally.parts[part]), part
    assert report.kv_cache_bytes == tally.kv_after_prefill * 2 // 4  # meta model is fp32, report fp16
