"""LLaVA-OneVision on the generic pipeline: the token map of AnyRes-Max (interpolated crop grids,
newlines, multi-image base views) checked against the model's own packing, the vision site's
re-weighting of interpolated tokens against a masked packing, and what the family refuses.

The generic suites (test_all_families, test_all_methods, test_generation, test_threads) run on it
through ``tests/families.py``.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from vtoken.adapters import adapter_for
from tiny import IMAGE_TOKEN, VIDEO_TOKEN, left_pad, onevision_inputs, tiny_llava_onevision
from vtoken import compat


@pytest.fixture(scope="module")
def model():
    return tiny_llava_onevision()


def _adapter(model):
    return adapter_for(model)(model)


def _crops(model, size) -> int:
    return compat.image_size_to_num_patches(size, model.config.image_grid_pinpoints, 32)


@pytest.mark.parametrize("aspect", ["anyres_max_1", "anyres_max_2", "anyres_max_9"])
@pytest.mark.parametrize("size", [(32, 64), (64, 64), (64, 40), (50, 90), (90, 33)])
def test_token_map_reproduces_the_models_packing(model, size, aspect):
    """Random per-crop features packed by the model equal each token's weighted mean of its sources
    under the adapter's map; rows with no source are the newline."""
    adapter = _adapter(model)
    crops = _crops(model, size)
    per, width = adapter.tokens_per_crop, 6
    g = torch.Generator().manual_seed(0)
    features = torch.randn(crops, per, width, generator=g, dtype=torch.float64)
    newline = torch.randn(width, generator=g, dtype=torch.float64)
    packed, _ = model.model.pack_image_features([features], torch.tensor([size]), image_newline=newline,
                                                vision_aspect_ratio=aspect)
    packed = packed[0]
    (info,) = adapter.image_infos({"pixel_values": torch.zeros(1, crops, 3, 32, 32),
                                   "image_sizes": torch.tensor([size]), "vision_aspect_ratio": aspect})
    assert info.num_tokens == packed.shape[0]
    token_map = info.token_map
    has = token_map.has_origin
    mapped = token_map.gather(features.reshape(-1, width))
    torch.testing.assert_close(mapped[has], packed[has], rtol=0, atol=1e-6)
    assert torch.equal(packed[~has], newline.expand(int((~has).sum()), -1))
    # Every weight row sums to one; the base view is one-to-one.
    sums = token_map.weight[has].sum(1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert torch.equal(token_map.dominant[:per], torch.arange(per))


def test_interpolated_grids_mix_several_patches(model):
    """The default inputs hold an interpolated grid (8x8 -> 5x5 under anyres_max_2) and one that is
    not (4x8): the map is many-to-one exactly where the model interpolates."""
    adapter = _adapter(model)
    x = onevision_inputs(model)
    infos = adapter.image_infos({"pixel_values": x["pixel_values"], "image_sizes": x["image_sizes"]})
    mixing = [bool(((info.token_map.index >= 0).sum(1) > 1).any()) for info in infos]
    assert mixing == [False, True, True]
    assert [info.num_tokens for info in infos] == [16 + 4 * 8 + 4, 16 + 5 * 5 + 5, 16 + 6 * 4 + 6]


def test_multi_image_samples_encode_base_views_with_one_newline(model):
    adapter = _adapter(model)
    infos = adapter.image_infos({
        "pixel_values": torch.zeros(3, 5, 3, 32, 32), "image_sizes": torch.tensor([[32, 64], [64, 64], [64, 40]]),
        "batch_num_images": torch.tensor([2, 1]),
    })
    assert [info.num_tokens for info in infos[:2]] == [17, 17]
    assert [info.crops for info in infos] == [[0], [1], list(range(2, 7))]
    assert infos[0].token_map.dominant.tolist() == [*range(16), -1]


def _captured_run(model, x, **options):
    """The grid-placed projector output (zeros at dropped tokens: what vtoken's hook on the projector
    hands the model's packing, read where that hook returns it, since a hook of the user's always sees
    the projector's own output) and the LLM's input embeddings of one wrapped forward."""
    from vtoken.adapters.pipeline import VisionLanguageAdapter

    seen = {}
    placing = VisionLanguageAdapter._after_projector

    def recording(self, module, args, output):
        placed = placing(self, module, args, output)
        seen.update(projected=output if placed is None else placed)
        return placed

    VisionLanguageAdapter._after_projector = recording
    try:
        with vtoken.pruned(model, "random", **options):
            handle = model.model.language_model.register_forward_pre_hook(
                lambda m, a, k: seen.update(embeds=k["inputs_embeds"]), with_kwargs=True)
            try:
                with torch.no_grad():
                    model(**x)
                seen["selection"] = vtoken.selection(model)
            finally:
                handle.remove()
    finally:
        VisionLanguageAdapter._after_projector = placing
    return seen


@pytest.mark.parametrize("image", [1, 2])  # 8x8 -> 5x5 and 8x6 -> 6x4 interpolated grids
def test_vision_site_rebuilds_interpolated_tokens_from_their_kept_sources(model, image):
    """Under vision-site pruning, an interpolated token that lost some of its sources is the
    interpolation of the kept ones only: the model's packing of the masked features divided by its
    packing of the mask (bilinear weights renormalised), computed here with the model's own code."""
    x = onevision_inputs(model)
    single = {"input_ids": x["input_ids"][image : image + 1], "attention_mask": x["attention_mask"][image : image + 1],
              "pixel_values": x["pixel_values"][image : image + 1], "image_sizes": x["image_sizes"][image : image + 1]}
    keep = single["attention_mask"][0].bool()
    single = {**single, "input_ids": single["input_ids"][:, keep], "attention_mask": single["attention_mask"][:, keep]}
    seen = _captured_run(model, single, keep=0.5, site="vision", layer=1)
    projected = seen["projected"].double()  # [crops, 16, d], zeros where the vision stage dropped a token
    mask = (projected.abs().sum(-1, keepdim=True) > 0).double()
    size = single["image_sizes"]
    newline = model.model.image_newline.double()
    aspect = model.config.vision_aspect_ratio
    num, _ = model.model.pack_image_features([projected], size, image_newline=newline, vision_aspect_ratio=aspect)
    den, _ = model.model.pack_image_features([mask.expand(-1, -1, 1)], size, image_newline=torch.zeros(1, dtype=torch.float64),
                                             vision_aspect_ratio=aspect)
    num, den = num[0], den[0][:, 0]
    reached = den > 1e-12
    expected = num / den.clamp(min=1e-12)[:, None]
    # Newline rows: kept when any token of their row is (vtoken's rule for separators).
    is_newline = torch.zeros_like(reached)
    per = 16
    rest = torch.isclose(num[per:], newline.expand_as(num[per:])).all(-1) & ~reached[per:]
    is_newline[per:] = rest
    kept_tokens = reached.clone()
    start = 0
    for sep in torch.nonzero(is_newline).squeeze(-1).tolist():
        kept_tokens[sep] = bool(reached[start:sep].any())
        expected[sep] = newline
        start = sep + 1
    (kept,) = seen["selection"][0].values()
    assert kept.tolist() == torch.nonzero(kept_tokens).squeeze(-1).tolist()
    first = int((single["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    got = seen["embeds"][0, first : first + len(kept)].double()
    torch.testing.assert_close(got, expected[kept_tokens], rtol=1e-5, atol=1e-5)
    # Some token did lose part of its sources, so the re-weighting was exercised.
    partial = (den > 1e-12) & (den < 1 - 1e-6)
    assert bool(partial.any())


def _video_batch(frames: int = 3):
    """Two videos of ``frames`` frames, left-padded prompts of different lengths (4x4 patches
    pooled to 2x2 per frame, one newline per video)."""
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, frames, 3, 32, 32, generator=g)
    tokens = frames * 4 + 1
    ids, mask = left_pad([[1, 5, *[VIDEO_TOKEN] * tokens, 6, 7], [1, 8, 9, 10, *[VIDEO_TOKEN] * tokens, 6]])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": video}


def test_video_token_map_reproduces_the_models_pooling(model):
    adapter = _adapter(model)
    g = torch.Generator().manual_seed(1)
    frames, width = 3, 5
    infos = adapter.video_infos({"pixel_values_videos": torch.zeros(2, frames, 3, 32, 32)})
    features = torch.randn(2 * frames, 16, width, generator=g, dtype=torch.float64)
    pooled = model.model.apply_pooling(features)  # [frames, 4, d]
    for video, info in enumerate(infos):
        assert info.num_tokens == frames * pooled.shape[1] + 1
        assert info.crops == list(range(video * frames, (video + 1) * frames))
        mapped = info.token_map.gather(features.reshape(-1, width))
        expected = pooled[video * frames : (video + 1) * frames].reshape(-1, width)
        torch.testing.assert_close(mapped[:-1], expected, rtol=0, atol=1e-6)
        assert not bool(info.token_map.has_origin[-1])


@pytest.mark.parametrize("method,options", [("random", {"keep": 1.0}), ("random", {"keep": 1.0, "site": "vision", "layer": 1}),
                                            ("fastv", {"keep": 1.0})])
def test_video_keep_all_is_the_identity(model, method, options):
    x = _video_batch()
    with torch.no_grad():
        ref = model(**x).logits
    ref_gen = model.generate(**x, max_new_tokens=4, do_sample=False)
    with vtoken.pruned(model, method, **options):
        with torch.no_grad():
            assert torch.equal(model(**x).logits, ref)
        assert torch.equal(model.generate(**x, max_new_tokens=4, do_sample=False), ref_gen)


@pytest.mark.parametrize("method,options", [("random", {"keep": 0.5}), ("pool", {"keep": 0.25}), ("fastv", {"keep": 0.4}),
                                            ("random", {"keep": 0.5, "site": "vision", "layer": 1})])
def test_video_budget_per_video_cached_uncached_and_alone(model, method, options):
    """A video is one unit of the budget; cached generate equals uncached; each sample's result
    equals its result alone (the random subset depends on the video, not the batch)."""
    x = _video_batch()
    with vtoken.pruned(model, method, **options):
        cached = model.generate(**x, max_new_tokens=4, do_sample=False)
        selection = vtoken.selection(model)
        uncached = model.generate(**x, max_new_tokens=4, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        for b in range(2):
            keep = x["attention_mask"][b].bool()
            single = {"input_ids": x["input_ids"][b : b + 1, keep], "attention_mask": x["attention_mask"][b : b + 1, keep],
                      "pixel_values_videos": x["pixel_values_videos"][b : b + 1]}
            alone = model.generate(**single, max_new_tokens=4, do_sample=False)
            assert torch.equal(alone[0], cached[b, -alone.shape[1]:])
            assert {k: v.tolist() for k, v in vtoken.selection(model)[0].items()} == \
                {k: v.tolist() for k, v in selection[b].items()}
    if options.get("site") != "vision":
        assert all(len(list(s.values())[-1]) == round(options["keep"] * 13) for s in selection)


def test_images_and_videos_in_one_prompt_are_refused_and_the_model_unchanged(model):
    x = onevision_inputs(model)
    with torch.no_grad():
        ref = model(**x).logits
    video = _video_batch(2)
    ids = torch.cat([x["input_ids"][:1, -20:], video["input_ids"][:1]], dim=1)[:, :]
    ids = torch.cat([x["input_ids"][:1], video["input_ids"][:1]], dim=1)
    mixed = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": x["pixel_values"][:1],
             "image_sizes": x["image_sizes"][:1], "pixel_values_videos": video["pixel_values_videos"][:1]}
    with vtoken.pruned(model, "pool", keep=0.5):
        with pytest.raises(ValueError, match=r"holds images and videos at once \(in one prompt or across the batch\); vtoken prunes one kind of visual input per call"):
            model(**mixed)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, ref)


def test_methods_say_what_runs_on_onevision():
    families = {m["name"]: m["families"] for m in vtoken.methods()}
    assert families["visionzip"]["LLaVA-OneVision"].startswith("needs a CLS token")
    assert families["fastv"]["LLaVA-OneVision"] == "runs"
    assert families["tokenpacker"]["LLaVA-OneVision"] != "runs"
