"""Qwen2-VL and Qwen2.5-VL on the generic pipeline: the 2x2 merger's token map checked against the
model itself, videos, and what the family refuses. The generic suites (test_all_families,
test_all_methods, test_generation, test_still_the_model, test_threads) run on both through
``tests/families.py``: keep-all identity, pre-LLM pruning equal to the unwrapped LLM on the kept
embeddings at their original M-RoPE ids, cached generation equal to recomputation, each sample equal
to itself alone.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from vtoken.adapters import adapter_for
from tiny import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, greedy_without_cache, left_pad, qwen_inputs, tiny_qwen2_vl

VERSIONS = ["2", "2.5"]


@pytest.mark.parametrize("version", VERSIONS)
def test_each_llm_token_comes_from_its_merge_unit(version):
    """With the vision blocks removed (so no attention mixes patches), changing one patch changes
    exactly the LLM tokens whose token-map row holds it: the map is the model's own 2x2 merge (and
    Qwen2.5-VL's window permutation is undone in it)."""
    model = tiny_qwen2_vl(version=version)
    model.model.visual.blocks = torch.nn.ModuleList()
    x = qwen_inputs(model)
    adapter = adapter_for(model)(model)
    grids = x["image_grid_thw"]
    infos = adapter.image_infos({"pixel_values": x["pixel_values"], "image_grid_thw": grids})
    encode = lambda pixels: torch.cat(model.model.get_image_features(pixels, grids).pooler_output)  # noqa: E731
    with torch.no_grad():
        base = encode(x["pixel_values"])
        offsets = torch.cumsum(torch.tensor([0] + [info.num_tokens for info in infos]), 0)
        per = adapter.tokens_per_crop_for(infos)
        for image, info in enumerate(infos):
            first_patch = int(grids[:image].prod(-1).sum())
            for patch in (0, 5, int(grids[image].prod()) - 1):
                pixels = x["pixel_values"].clone()
                pixels[first_patch + patch] += 1.0
                changed = torch.nonzero((encode(pixels) - base).abs().amax(-1) > 1e-6).squeeze(-1)
                slot = image * per + patch
                expected = offsets[image] + torch.nonzero((info.token_map.index == slot).any(-1)).squeeze(-1)
                assert changed.tolist() == expected.tolist()
        assert all(bool(torch.allclose(info.token_map.weight, torch.tensor(0.25))) for info in infos)


def test_grids_follow_the_merged_image():
    model = tiny_qwen2_vl()
    adapter = adapter_for(model)(model)
    infos = adapter.image_infos({"pixel_values": torch.zeros(24 + 24 + 16, 96),
                                 "image_grid_thw": torch.tensor([[1, 4, 6], [1, 6, 4], [1, 4, 4]])})
    assert [(g.height, g.width) for info in infos for g in info.grids] == [(2, 3), (3, 2), (2, 2)]
    assert [info.num_tokens for info in infos] == [6, 6, 4]


def _video_batch(frames: int = 4):
    """Two videos of ``frames`` frames (2 temporal patches each pair), 4x4 patches per frame."""
    g = torch.Generator().manual_seed(0)
    grids = torch.tensor([[frames // 2, 4, 4], [frames // 2, 4, 4]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 4 * 4, generator=g)
    tokens = frames // 2 * 4
    rows = [[1, 5, VISION_START, *[VIDEO_TOKEN] * tokens, VISION_END, 6, 7],
            [1, 8, 9, VISION_START, *[VIDEO_TOKEN] * tokens, VISION_END, 6]]
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pixels, "video_grid_thw": grids,
            "mm_token_type_ids": (ids == VIDEO_TOKEN).int() * 2}


@pytest.mark.parametrize("version", VERSIONS)
def test_videos_keep_all_and_cached_equals_recomputation(version):
    model = tiny_qwen2_vl(version=version)
    x = _video_batch()
    suppress = [IMAGE_TOKEN, VIDEO_TOKEN]
    with torch.no_grad():
        ref = model(**x).logits
    with vtoken.pruned(model, "random", keep=1.0):
        with torch.no_grad():
            assert torch.equal(model(**x).logits, ref)
    with vtoken.pruned(model, "pool", keep=0.5):
        cached = model.generate(**x, max_new_tokens=5, do_sample=False, suppress_tokens=suppress)
        selection = vtoken.selection(model)
        assert torch.equal(greedy_without_cache(model, x, 5, suppress=suppress), cached)
    # One budget per video: half of its 8 tokens, on both frames' grids.
    assert [len(s["projector"]) for s in selection] == [4, 4]


def test_vision_site_and_encoder_signals_are_refused_naming_the_fix():
    model = tiny_qwen2_vl()
    with pytest.raises(ValueError, match="vision-site pruning inside Qwen2-VL's packed vision tower is not implemented yet"):
        vtoken.wrap(model, "random", site="vision", layer=0)
    with pytest.raises(ValueError, match=r"zoo_prune needs the projector and its inputs .* Qwen2-VL model gives no 2x2 merger"):
        vtoken.wrap(model, "zoo_prune")
    assert not vtoken.is_wrapped(model)
    families = {m["name"]: m["families"] for m in vtoken.methods()}
    assert families["fastv"]["Qwen2-VL"] == "runs" and families["pool"]["Qwen2.5-VL"] == "runs"
    assert families["vflowopt"]["Qwen2-VL"].startswith("needs a vision layer's self-attention")
