"""Tiny random-weight LLaVA and LLaVA-NeXT models built from configs, and inputs for them.

Real transformers classes at toy sizes: a 4-layer CLIP tower (4x4 patches + CLS), an MLP projector,
a 4-layer Llama with grouped-query attention. Nothing is downloaded.
"""

from __future__ import annotations

import torch

from vtoken import compat
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

IMAGE_TOKEN = 99
VIDEO_TOKEN = 98
PAD = 0
VOCAB = 100


def _vision(image_size: int = 32) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, projection_dim=32,
    )


def _text() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2,
    )


def tiny_llava(attn: str = "sdpa", seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_vision(), text_config=_text(), image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16,
    )
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    return model.eval()


def tiny_llava_next(attn: str = "sdpa", seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=_vision(), text_config=_text(), image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], image_seq_length=16,
    )
    model = LlavaNextForConditionalGeneration(config)
    # A random newline embedding (zeros by default would hide mistakes about where newlines go).
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.set_attn_implementation(attn)
    return model.eval()


def tiny_llava_onevision(attn: str = "sdpa", seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    """LLaVA-OneVision at toy size: a 4-layer SigLIP tower (4x4 patches, no CLS) read in full at its
    last layer, a 4-layer Qwen2 with GQA, and ``anyres_max_2`` so that the crop grids of the default
    inputs are interpolated for two of the three image sizes (a 4x8 grid is not, 8x8 and 8x6 are)."""
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=4, num_attention_heads=4)
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2",
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.set_attn_implementation(attn)
    return model.eval()


VISION_START, VISION_END = 97, 96


def tiny_qwen2_vl(attn: str = "sdpa", seed: int = 0, version: str = "2"):
    """Qwen2-VL (``version="2"``), Qwen2.5-VL (``"2.5"``) or Qwen3-VL (``"3"``, DeepStack from vision
    blocks 0 and 1 into LLM layers 0 and 1; ``"3-moe"``: Qwen3-VL-MoE) at toy size: a 3-4-block packed vision tower
    on 4-pixel patches with the 2x2 merger, a 4-layer Qwen2 with GQA and M-RoPE sections [2, 3, 3]."""
    from transformers import (
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    tokens = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                  vision_end_token_id=VISION_END)
    if version in ("3", "3-moe"):
        from transformers import (
            Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration,
        )

        text = {**text, "head_dim": 16, "rope_parameters": {**text["rope_parameters"], "mrope_interleaved": True}}
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
        if version == "3-moe":  # 4 experts of which 2 per token, in every LLM layer
            text = {**text, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1}
            model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(vision_config=vision, text_config=text, **tokens))
        else:
            model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(vision_config=vision, text_config=text, **tokens))
    elif version == "2.5":
        vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16,
                      fullatt_block_indexes=[1, 3])
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tokens))
    else:
        vision = dict(depth=3, embed_dim=32, num_heads=4, hidden_size=64, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3, mlp_ratio=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, **tokens))
    model.set_attn_implementation(attn)
    return model.eval()


def qwen_inputs(model, grids=((1, 4, 6), (1, 6, 4), (1, 4, 4)), seed: int = 0, images_per_sample=None) -> dict:
    """A left-padded batch, one image per sample by default (``images_per_sample`` [2, 0, 1] puts two
    in the first sample, none in the second), each image's placeholders between vision start/end,
    with the processor's ``mm_token_type_ids``."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor([list(t) for t in grids])
    patch_values = 3 * 2 * 4 * 4
    pixels = torch.randn(int(grids.prod(-1).sum()), patch_values, generator=g)
    per_sample = images_per_sample or [1] * len(grids)
    rows, image = [], 0
    for sample, count in enumerate(per_sample):
        row = [1, *torch.randint(3, 90, (2 + sample,), generator=g).tolist()]
        for _ in range(count):
            t, h, w = grids[image].tolist()
            row += [VISION_START, *[IMAGE_TOKEN] * (t * h * w // 4), VISION_END]
            image += 1
        row += torch.randint(3, 90, (3 + sample,), generator=g).tolist()
        rows.append(row)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grids,
            "mm_token_type_ids": (ids == IMAGE_TOKEN).int()}


def onevision_image_tokens(model, image_sizes: list[tuple[int, int]], batch_num_images=None) -> list[int]:
    """Visual tokens each image gives a LLaVA-OneVision model, from the model's own packing."""
    config = model.config
    if batch_num_images is None:
        crops = [compat.image_size_to_num_patches(s, config.image_grid_pinpoints, 32) for s in image_sizes]
    else:
        crops = [1] * len(image_sizes)
    feats = [torch.zeros(n, 16, 1) for n in crops]
    packed, _ = model.model.pack_image_features(feats, torch.tensor([list(s) for s in image_sizes]),
                                                image_newline=torch.zeros(1),
                                                vision_aspect_ratio=config.vision_aspect_ratio)
    return [p.shape[0] for p in packed]


def padded_crops(crops: list[int], generator: torch.Generator) -> torch.Tensor:
    """``[images, max crops, 3, 32, 32]``: random pixels for each image's crops, zeros past them (the
    AnyRes processors' padded layout)."""
    pixels = torch.zeros(len(crops), max(crops), 3, 32, 32)
    for i, n in enumerate(crops):
        pixels[i, :n] = torch.randn(n, 3, 32, 32, generator=generator)
    return pixels


def two_none_one(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask of three prompts: two images (``counts[0]``, ``counts[1]`` tokens),
    none, one image (``counts[2]`` tokens)."""
    return left_pad([
        [1, 7, 8, *[IMAGE_TOKEN] * counts[0], 9, *[IMAGE_TOKEN] * counts[1], 10, 11],
        [1, 12, 13, 14, 15, 16],
        [1, 17, *[IMAGE_TOKEN] * counts[2], 18, 19, 20, 21],
    ])


def onevision_inputs(model, image_sizes=((32, 64), (64, 64), (64, 40)), seed: int = 0) -> dict:
    """One image per sample of different sizes (interpolated and not), left-padded."""
    g = torch.Generator().manual_seed(seed)
    counts = onevision_image_tokens(model, list(image_sizes))
    rows = [_prompt(n, 2 + i, 3 + i, g) for i, n in enumerate(counts)]
    ids, mask = left_pad(rows)
    config = model.config
    crops = [compat.image_size_to_num_patches(s, config.image_grid_pinpoints, 32) for s in image_sizes]
    pixels = padded_crops(crops, g)
    return {
        "input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
        "image_sizes": torch.tensor([list(s) for s in image_sizes]),
    }


def _prompt(n_image_tokens: int, text_before: int, text_after: int, generator: torch.Generator) -> list[int]:
    before = torch.randint(3, 90, (text_before,), generator=generator).tolist()
    after = torch.randint(3, 90, (text_after,), generator=generator).tolist()
    return [1, *before, *([IMAGE_TOKEN] * n_image_tokens), *after]


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def llava_inputs(batch: int = 1, seed: int = 0, text_lengths=None) -> dict:
    """A left-padded batch with one image per sample and different prompt lengths."""
    g = torch.Generator().manual_seed(seed)
    text_lengths = text_lengths or [(2 + i, 3 + 2 * i) for i in range(batch)]
    rows = [_prompt(16, b, a, g) for b, a in text_lengths[:batch]]
    ids, mask = left_pad(rows)
    pixels = torch.randn(batch, 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def next_image_tokens(model, image_sizes: list[tuple[int, int]]) -> list[int]:
    """Visual tokens each image gives a LLaVA-NeXT model (base view + unpadded crops + newlines)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    counts = []
    for size in image_sizes:
        crops = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        feats = [torch.zeros(crops, 16, 1)]
        packed, _ = model.model.pack_image_features(
            feats, torch.tensor([size]), "default", image_newline=torch.zeros(1)
        )
        counts.append(packed[0].shape[0])
    return counts


def llava_next_inputs(model, image_sizes=((32, 64), (64, 64), (64, 40)), seed: int = 0) -> dict:
    """One image per sample of different sizes (so different visual-token counts), left-padded."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    counts = next_image_tokens(model, list(image_sizes))
    rows = [_prompt(n, 2 + i, 3 + i, g) for i, n in enumerate(counts)]
    ids, mask = left_pad(rows)
    config = model.config
    crops = [image_size_to_num_patches(s, config.image_grid_pinpoints, 32) for s in image_sizes]
    pixels = padded_crops(crops, g)
    return {
        "input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
        "image_sizes": torch.tensor([list(s) for s in image_sizes]),
    }


def alone(x: dict, b: int) -> dict:
    """Sample ``b`` of a left-padded batch as a batch of one, without its padding (for Qwen-VL, with
    its own images' patches and grids: the batch packs every image's patches in one tensor)."""
    keep = x["attention_mask"][b].bool()
    single = {"input_ids": x["input_ids"][b : b + 1, keep], "attention_mask": x["attention_mask"][b : b + 1, keep]}
    if "image_grid_thw" in x:
        counts = [image_runs(row) for row in x["input_ids"]]
        first, count = sum(counts[:b]), counts[b]
        grids, sizes = x["image_grid_thw"], x["image_grid_thw"].prod(-1)
        start = int(sizes[:first].sum())
        if count:
            single["pixel_values"] = x["pixel_values"][start : start + int(sizes[first : first + count].sum())]
            single["image_grid_thw"] = grids[first : first + count]
        single["mm_token_type_ids"] = x["mm_token_type_ids"][b : b + 1, keep]
        return single
    single["pixel_values"] = x["pixel_values"][b : b + 1]
    if "image_sizes" in x:
        single["image_sizes"] = x["image_sizes"][b : b + 1]
    return single


def image_runs(row: torch.Tensor, token: int = IMAGE_TOKEN) -> int:
    """How many images a row holds (runs of the image token)."""
    is_image = (row == token).long()
    return int(((is_image[1:] - is_image[:-1]) == 1).sum() + is_image[:1].sum())


def same_selections(a: list[dict], b: list[dict]) -> bool:
    """Two ``vtoken.selection`` results name the same stages per sample and keep the same indices."""
    return [list(s) for s in a] == [list(s) for s in b] and all(
        torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x
    )


def greedy_without_cache(model, x, steps, suppress=()):
    """Greedy decoding that recomputes the whole sequence every step (no KV cache), padding a
    finished sample with the pad token as generate() does; ``suppress`` lists token ids never
    generated (``generate(suppress_tokens=...)``)."""
    ids, mask = x["input_ids"], x["attention_mask"]
    extra = {k: v for k, v in x.items() if k not in ("input_ids", "attention_mask")}
    config = model.generation_config
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
        if "mm_token_type_ids" in extra:  # Qwen-VL: generated tokens are text
            extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(ids[:, :1]).int()], 1)
        assert compat.output_cache(out) is None  # nothing a wrapped model caches internally leaks out
        logits = out.logits[:, -1]
        logits[:, list(suppress)] = float("-inf")
        token = torch.where(finished, config.pad_token_id, logits.argmax(-1))
        finished |= token == config.eos_token_id
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids
