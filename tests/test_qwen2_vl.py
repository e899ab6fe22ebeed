"""Qwen2-VL and Qwen2.5-VL on the generic pipeline: the 2x2 merger's token map checked against the
model itself, videos, and what the family refuses. The generic suites (test_all_families,
test_all_methods, test_generation, test_still_the_model, test_threads) run on both through
``tests/families.py``: keep-all identity, pre-LLM pruning equal to the unwrapped LLM on the kept
embeddings at their original M-RoPE ids, cached generation equal to recomputation, each sample equal
to itself alone.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch

import vtoken
from vtoken import signals
from vtoken.adapters import adapter_for
from vtoken.config import PruneConfig
from vtoken.registry import register
from vtoken.signals import Needs, Signal
from vtoken.strategies.base import Strategy
from tiny import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, greedy_without_cache, left_pad, qwen_inputs, tiny_qwen2_vl

VERSIONS = ["2", "2.5", "3"]


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


# Qwen3-VL's processor writes a video as frames of their own, each after a timestamp, with a grid of
# t = 1 per frame: this batch (one grid of t = 2 per video) is not a Qwen3-VL prompt.
@pytest.mark.parametrize("version", ["2", "2.5"])
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


@pytest.mark.parametrize("options", [dict(method="random", positions="contiguous"), dict(method="transprune"),
                                     dict(method="pool", positions="pre_llm"), dict(method="random"),
                                     dict(method="fastv")])
@pytest.mark.parametrize("version", ["2", "2.5"])
def test_a_video_of_more_frames_than_rows_keeps_the_models_positions_at_keep_all(version, options):
    """8 frames (4 temporal patches) of 2 x 2 merged tokens: the video's temporal ids run past its
    spatial ones (Qwen2.5-VL also scales them by time), and get_rope_index goes on after it from the
    spatial ids alone. Renumbering (contiguous, pre_llm) with nothing dropped must give the model's
    own ids: the same logits, and generate's logits at every decoding step equal the plain model's
    (generate continues from the last prompt token's ids, not from the largest: 3e-3 apart on
    Qwen2.5-VL when vtoken took the largest)."""
    model = tiny_qwen2_vl(version=version)
    x = _video_batch(frames=8)
    suppress = [IMAGE_TOKEN, VIDEO_TOKEN]
    kw = dict(max_new_tokens=4, do_sample=False, suppress_tokens=suppress, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        ref = model(**x).logits
    plain = model.generate(**x, **kw)
    options = dict(options)
    with vtoken.pruned(model, options.pop("method"), keep=1.0, **options):
        with torch.no_grad():
            assert torch.equal(model(**x).logits, ref)
        wrapped = model.generate(**x, **kw)
    assert torch.equal(wrapped.sequences, plain.sequences)
    for step, (got, want) in enumerate(zip(wrapped.logits, plain.logits)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"decoding step {step}: {m}")



@pytest.mark.parametrize("method", ["random", "fastv", "vflowopt"])
def test_a_pruned_video_decodes_with_a_cache_as_without_one(method):
    """Qwen2.5-VL, videos whose time-scaled temporal ids run past the rest: pruned, generate's logits
    with the KV cache equal its logits without one at every step (the cached steps took the prompt's
    largest id + 1, the uncached ones generate's own ids: tokens differed under beam search)."""
    model = tiny_qwen2_vl(version="2.5")
    x = _video_batch(frames=8)
    kw = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN, VIDEO_TOKEN], output_logits=True,
              return_dict_in_generate=True)
    vtoken.wrap(model, method, keep=0.5)
    cached = model.generate(**x, **kw)
    uncached = model.generate(**x, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (got, want) in enumerate(zip(cached.logits, uncached.logits)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"decoding step {step}: {m}")

def test_what_the_qwen_families_refuse_names_the_signal_and_the_fix():
    model = tiny_qwen2_vl()
    with pytest.raises(ValueError, match=r"visionzip needs a CLS token in the vision tower .* Qwen2-VL model gives"):
        vtoken.wrap(model, "visionzip")
    with pytest.raises(ValueError, match=r"tome needs vision blocks run in two halves"):
        vtoken.wrap(model, "tome")
    assert not vtoken.is_wrapped(model)
    families = {m["name"]: m["families"] for m in vtoken.methods()}
    for family in ("Qwen2-VL", "Qwen2.5-VL", "Qwen3-VL"):
        for method in ("fastv", "pool", "random", "repshift", "vflowopt", "zoo_prune", "transprune", "aif"):
            assert families[method][family] == "runs", (method, family)
    assert families["zoo_prune"]["Qwen2.5-VL"] == "runs" and families["zoo_prune"]["Qwen3-VL"] == "runs"
    assert "TokenPacker is trained for a LLaVA projector" in families["tokenpacker"]["Qwen2-VL"]


def test_a_window_order_kept_for_one_set_of_grids_serves_only_that_set():
    """Qwen2.5-VL's window order is read off the model once per combination of image grids
    (``QwenVLAdapter.window_order``): a call whose images have the same sizes in another order, or
    another tower's window size, gets its own order, the same features as read afresh."""
    from vtoken.adapters.base import IMAGE_SHAPES

    model = tiny_qwen2_vl(version="2.5")
    first, swapped = ((1, 8, 12), (1, 12, 8)), ((1, 12, 8), (1, 8, 12))

    def features(grids, window_size=None):
        x = qwen_inputs(model, grids=grids)
        if window_size is not None:
            model.model.visual.window_size = window_size
        with vtoken.pruned(model, "random", site="vision", layer=1, keep=0.4), torch.no_grad():
            return torch.cat(model.model.get_image_features(x["pixel_values"], x["image_grid_thw"]).pooler_output)

    cached = [features(first), features(swapped), features(swapped, window_size=8)]
    fresh = []
    for grids, size in ((first, 16), (swapped, 16), (swapped, 8)):
        IMAGE_SHAPES._entries.clear()
        fresh.append(features(grids, size))
    for mine, theirs in zip(cached, fresh):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert not torch.equal(cached[1], cached[2])  # the window size changes the features: the key must hold it


@pytest.mark.parametrize("version", VERSIONS)
def test_vision_site_equals_the_unwrapped_tower_on_the_kept_merge_units(version):
    """Pruning after vision block l keeps whole 2x2 merge units: the wrapped model's image features for
    the kept LLM tokens equal the unwrapped tower whose packed sequence is cut by this test's own hooks
    after block l to those units' patches (Qwen2.5-VL: in its window order), every later block handed
    the kept patches' segments (whole frames, or windows for Qwen2.5-VL's windowed blocks) and their
    own rotary positions; the dropped tokens' features are zeros."""
    from transformers.vision_utils import get_vision_window_index

    model = tiny_qwen2_vl(version=version)
    grids = ((1, 8, 12), (1, 12, 8), (1, 8, 8))
    x = qwen_inputs(model, grids=grids)
    grid = x["image_grid_thw"]
    layer = 1
    vtoken.wrap(model, "random", site="vision", layer=layer, keep=0.4)
    with torch.no_grad():
        wrapped_output = model.model.get_image_features(x["pixel_values"], grid)
    wrapped = wrapped_output.pooler_output
    # The kept LLM tokens per image (the image features' rows), from what the encoder left non-zero.
    kept = [torch.nonzero(f.abs().sum(-1) > 0).squeeze(-1) for f in wrapped]
    assert [len(k) for k in kept] == [round(0.4 * g.prod().item() / 4) for g in grid]
    vtoken.unwrap(model)

    visual = model.model.visual
    first_unit = torch.cumsum(torch.tensor([0] + [int(g.prod()) // 4 for g in grid]), 0)
    units = torch.cat([first_unit[i] + k for i, k in enumerate(kept)])  # row-major global units
    total = int(first_unit[-1])
    place = torch.arange(total)  # each unit's place in the sequence the blocks run on
    windowed = version == "2.5"
    if windowed:
        window_index, cu_window = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                          visual.patch_size)
        place = torch.argsort(window_index)
        bounds = torch.unique_consecutive(cu_window.long()) // 4
    places = torch.sort(place[units]).values
    patches = (places[:, None] * 4 + torch.arange(4)).reshape(-1)
    full = torch.tensor([len(k) * 4 for k in kept])
    if windowed:
        counts = torch.bincount(torch.searchsorted(bounds, places, right=True) - 1)
        windows = counts[counts > 0] * 4
    blocks = visual.blocks
    full_blocks = set(getattr(model.config.vision_config, "fullatt_block_indexes", None) or range(len(blocks)))

    def cut(module, args, output):
        return output[patches]

    def kept_inputs(index, module, args, kwargs):
        lengths = full if index in full_blocks or not windowed else windows
        cos, sin = kwargs["position_embeddings"]
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(kwargs["cu_seqlens"].dtype)
        out = {**kwargs, "cu_seqlens": cu, "position_embeddings": (cos[patches], sin[patches])}
        if kwargs.get("max_seqlen") is not None:
            out["max_seqlen"] = int(lengths.max())
        return args, out

    def back_in_place(module, args, output):  # the merger's output for the kept units, zeros elsewhere
        out = output.new_zeros(total, output.shape[-1])
        out[places] = output
        return out

    mergers = [visual.merger, *getattr(visual, "deepstack_merger_list", [])]  # Qwen3-VL: DeepStack's too
    handles = [blocks[layer].register_forward_hook(cut)]
    handles += [m.register_forward_hook(back_in_place) for i, m in enumerate(mergers)
                if i == 0 or visual.deepstack_visual_indexes[i - 1] >= layer]
    handles += [b.register_forward_pre_hook(partial(kept_inputs, i), with_kwargs=True)
                for i, b in enumerate(blocks) if i > layer]
    with torch.no_grad():
        reference_output = model.model.get_image_features(x["pixel_values"], grid)
    reference = reference_output.pooler_output
    for h in handles:
        h.remove()
    deepstack = list(zip(getattr(wrapped_output, "deepstack_features", None) or [],
                         getattr(reference_output, "deepstack_features", None) or []))
    assert len(deepstack) == (2 if version == "3" else 0)
    for image, k in enumerate(kept):
        torch.testing.assert_close(wrapped[image][k], reference[image][k], rtol=0, atol=0)
        for mine, theirs in deepstack:  # DeepStack features of the kept tokens: the tower's own
            torch.testing.assert_close(mine[image][k], theirs[image][k], rtol=0, atol=0)
        dropped = torch.ones(len(wrapped[image]), dtype=torch.bool)
        dropped[k] = False
        assert bool((wrapped[image][dropped] == 0).all())


def test_qwen3_deepstack_follows_pruning_inside_the_llm():
    """Qwen3-VL adds each visual token's DeepStack features after LLM layers 0 and 1. With FastV at
    layer 1, the wrapped model's last logits equal this test's own run of the unwrapped layers:
    layer 0 on every token, DeepStack row 0 added to every visual token, the sequence cut to the kept
    tokens (their M-RoPE ids kept), layer 1, DeepStack row 1 added to the kept visual tokens only,
    then the remaining layers."""
    from tiny import alone

    model = tiny_qwen2_vl(version="3")
    x = alone(qwen_inputs(model, grids=((1, 8, 8), (1, 4, 4), (1, 4, 4))), 0)
    with torch.no_grad():
        vtoken.wrap(model, "fastv", layer=1, keep=0.3)
        wrapped = model(**x).logits[0, -1]
        kept = vtoken.selection(model)[0]["llm:1"]
        vtoken.unwrap(model)

        core, lm = model.model, model.model.language_model
        encoded = core.get_image_features(x["pixel_values"], x["image_grid_thw"])
        ids = x["input_ids"]
        visual = ids[0] == model.config.image_token_id
        hidden = core.get_input_embeddings()(ids)
        hidden[0, visual] = torch.cat(encoded.pooler_output)
        deepstack = [torch.cat(f) for f in encoded.deepstack_features]
        positions, _ = core.get_rope_index(ids, mm_token_type_ids=x["mm_token_type_ids"],
                                           image_grid_thw=x["image_grid_thw"], attention_mask=x["attention_mask"])
        slots = torch.arange(ids.shape[1])
        for layer_index, layer in enumerate(lm.layers):
            if layer_index == 1:  # FastV's cut before layer 1: text tokens and the kept visual tokens
                keep = ~visual
                keep[torch.nonzero(visual).squeeze(-1)[kept]] = True
                hidden, slots = hidden[:, keep], slots[keep]
            cos_sin = lm.rotary_emb(hidden, positions[:, :, slots])
            hidden = layer(hidden, attention_mask=None, position_ids=positions[:, :, slots], position_embeddings=cos_sin)
            if layer_index < len(deepstack):  # the DeepStack add after this layer, on its visual tokens
                rank = torch.cumsum(visual.long(), 0) - 1
                here = visual[slots]
                hidden = hidden.clone()
                hidden[0, here] = hidden[0, here] + deepstack[layer_index][rank[slots[here]]]
        reference = model.lm_head(lm.norm(hidden))[0, -1]
    torch.testing.assert_close(wrapped, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", VERSIONS)
def test_show_draws_the_kept_tokens_over_a_dynamic_grid(version, tmp_path):
    """``vtoken.show`` on a Qwen image of its own grid (8 x 12 patches: 4 x 6 LLM tokens): each kept
    token lights its 2x2 patch block, the others are dimmed."""
    from PIL import Image

    model = tiny_qwen2_vl(version=version)
    x = qwen_inputs(model, grids=((1, 8, 12), (1, 12, 8), (1, 8, 8)))
    vtoken.wrap(model, "random", keep=0.25)
    with torch.no_grad():
        model(**x)
    picture = Image.new("RGB", (48, 32), (200, 100, 50))  # 6 x 4 tokens, drawn 12x larger (96 px each)
    drawn = Image.open(vtoken.show(model, picture, tmp_path / "qwen.png", sample=0)).convert("RGB")
    kept = set(vtoken.selection(model)[0]["projector"].tolist())
    for token in range(24):
        row, col = divmod(token, 6)
        bright = drawn.getpixel((col * 96 + 48, row * 96 + 48)) == (200, 100, 50)
        assert bright == (token in kept), token


@dataclasses.dataclass
class _ProjectorProbeConfig(PruneConfig):
    method = "_test_projector_probe"


@register
class _ProjectorProbe(Strategy):
    """Test-only: reports how far the projector applied to each candidate's projector input is from
    the candidate's own LLM embedding (it must be the same token)."""

    name = "_test_projector_probe"
    Config = _ProjectorProbeConfig
    sites = ("vision", "projector")

    def needs(self) -> Needs:
        return Needs.of(Signal(signals.PROJECTOR_INPUT))

    def score(self, ctx):
        rows = ctx.tokens
        if ctx.stage.site == "vision":  # (a plain first stage, to drop units before the merger)
            return ctx.uniform()
        projected = ctx.projector(ctx.projector_input)
        gap = (projected - rows.features).abs().amax(-1).masked_fill(~rows.valid, 0)
        ctx.report(gap=gap.max(), width=torch.tensor(ctx.projector_input.shape[-1]))
        return torch.zeros(rows.valid.shape)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("vision_stage", [False, True])
def test_the_merger_input_of_each_token_projects_to_its_embedding(version, vision_stage):
    """ZOO-Prune's signal on Qwen: each LLM token's projector input is its 2x2 unit's four patches as
    the merger read them (Qwen2.5-VL: undoing its window order), so the merger applied to it gives the
    token's own embedding, also after a vision stage dropped units."""
    model = tiny_qwen2_vl(version=version)
    x = qwen_inputs(model, grids=((1, 8, 12), (1, 12, 8), (1, 8, 8)))
    stages = [{"site": "vision", "layer": 1, "keep": 0.5}] if vision_stage else []
    vtoken.wrap(model, "_test_projector_probe", stages=[*stages, {"site": "projector", "keep": 0.25}])
    with torch.no_grad():
        model(**x)
    report = vtoken.diagnostics(model)["projector"]
    width = model.config.vision_config.hidden_size if version != "2" else model.config.vision_config.embed_dim
    assert int(report["width"]) == 4 * width
    assert float(report["gap"]) < 1e-5


@dataclasses.dataclass
class _AttentionProbeConfig(PruneConfig):
    method = "_test_vision_attention_probe"


@register
class _AttentionProbe(Strategy):
    """Test-only: reports what ``ctx.vision_attention(1)`` and ``ctx.pixel_patches()`` give."""

    name = "_test_vision_attention_probe"
    Config = _AttentionProbeConfig
    sites = ("projector",)

    def needs(self) -> Needs:
        return Needs.of(Signal(signals.VISION_ATTENTION, 1), Signal(signals.PIXEL_PATCHES))

    def score(self, ctx):
        attention = ctx.vision_attention(1)
        ctx.report(received=attention.received, rows=attention.rows(torch.tensor([[0, 7], [3, -1], [5, 9]])),
                   keys=attention.keys, valid=attention.valid, pixels=ctx.pixel_patches())
        return torch.zeros(ctx.tokens.valid.shape)


@pytest.mark.parametrize("version", VERSIONS)
def test_vision_attention_of_a_packed_tower_is_the_layers_own(version):
    """VFlowOpt's signals on Qwen: the attention of vision block 1, recomputed beside SDPA, equals this
    test's own softmax over each segment of the packed sequence (frames; Qwen2.5-VL's windows in its
    windowed blocks), mapped to each image's patches; the pixel patches are each image's own rows."""
    from transformers.vision_utils import get_vision_window_index

    model = tiny_qwen2_vl(version=version)
    x = qwen_inputs(model, grids=((1, 8, 12), (1, 12, 8), (1, 8, 8)))
    grid = x["image_grid_thw"]
    visual = model.model.visual
    block = visual.blocks[1]
    seen = []
    handle = block.attn.register_forward_pre_hook(lambda m, a, k: seen.append((a[0], k)), with_kwargs=True)
    vtoken.wrap(model, "_test_vision_attention_probe", keep=0.5)
    with torch.no_grad():
        model(**x)
    handle.remove()
    report = vtoken.diagnostics(model)["projector"]
    hidden, kwargs = seen[0]
    attn = block.attn
    q, k, _ = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = vtoken.compat.qwen_vision_rotary(attn)(q, k, *kwargs["position_embeddings"])
    cu = kwargs["cu_seqlens"].tolist()
    full = torch.zeros(hidden.shape[0], hidden.shape[0])
    for start, end in zip(cu[:-1], cu[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * q.shape[-1] ** -0.5
        full[start:end, start:end] = scores.softmax(-1).mean(0)
    # Sequence place of each image's patches (its own order); Qwen2.5-VL runs its units in window order.
    units = int(grid.prod(-1).sum()) // 4
    place_of_unit = torch.arange(units)
    if version == "2.5":
        window_index, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        place_of_unit = torch.argsort(window_index)
    starts = torch.cumsum(torch.tensor([0] + [int(g.prod()) for g in grid]), 0)
    for image, g in enumerate(grid):
        patches = torch.arange(int(g.prod()))
        places = place_of_unit[(starts[image] + patches) // 4] * 4 + patches % 4
        received = full[:, places].sum(0) / len(patches)
        torch.testing.assert_close(report["received"][image, : len(patches)], received, rtol=1e-5, atol=1e-6)
        assert bool(report["valid"][image, : len(patches)].all()) and not bool(report["valid"][image, len(patches) :].any())
        for r, slot in enumerate([[0, 7], [3, -1], [5, 9]][image]):
            want = full[places[slot], places] if slot >= 0 else torch.zeros(len(patches))
            torch.testing.assert_close(report["rows"][image, r, : len(patches)], want, rtol=1e-5, atol=1e-6)
        pixels = x["pixel_values"][starts[image] : starts[image + 1]].view(len(patches), 3, 2, 4, 4)[:, :, 0]
        assert torch.equal(report["pixels"][image, : len(patches)], pixels)


def test_qwen3_videos_prune_at_every_site_and_cached_equals_recomputation():
    """A Qwen3-VL video (its frames each between vision start and end, text between them): keep-all is
    exact; the vision, projector and LLM sites keep the video's budget (get_video_features runs
    get_image_features: one encoding, the outer call's); cached generation equals recomputation."""
    model = tiny_qwen2_vl(version="3")
    g = torch.Generator().manual_seed(0)
    frame = [VISION_START, *[VIDEO_TOKEN] * 16, VISION_END]
    row = [1, 5, 6, *frame, 7, *frame, 8, 9]
    ids = torch.tensor([row])
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "video_grid_thw": torch.tensor([[2, 8, 8]]),
         "pixel_values_videos": torch.randn(128, 96, generator=g), "mm_token_type_ids": (ids == VIDEO_TOKEN).int() * 2}
    suppress = [IMAGE_TOKEN, VIDEO_TOKEN]
    with torch.no_grad():
        ref = model(**x).logits
    with vtoken.pruned(model, "random", keep=1.0):
        with torch.no_grad():
            assert torch.equal(model(**x).logits, ref)
    for options in ({"site": "vision", "layer": 1, "keep": 0.5}, {"keep": 0.5}, {"site": "llm", "layer": 1, "keep": 0.5}):
        with vtoken.pruned(model, "random", **options):
            with torch.no_grad():
                logits = model(**x).logits
            kept = list(vtoken.selection(model)[0].values())[-1]
            assert len(kept) == 16, options
            if options.get("site") != "llm":
                assert logits.shape[1] == ids.shape[1] - 16
            cached = model.generate(**x, max_new_tokens=3, do_sample=False, suppress_tokens=suppress)
            assert torch.equal(greedy_without_cache(model, x, 3, suppress=suppress), cached)


def test_pool_refuses_a_budget_below_a_videos_frame_count_in_one_line():
    """Pool makes at least one token of each frame: 3 frames and 2 tokens is refused, naming the fix;
    the wrapped model then runs a budget that covers the frames."""
    model = tiny_qwen2_vl()
    x = _video_batch(frames=6)  # 3 temporal patches of 2 x 2 merged tokens per video
    with vtoken.pruned(model, "pool", keep_tokens=2):
        with pytest.raises(ValueError, match=r"^pool makes at least one token of each grid .* 3 grids and a budget of 2 "
                                             r"tokens; raise keep or keep_tokens to give it at least 3$"):
            model(**x)
    with vtoken.pruned(model, "pool", keep_tokens=3), torch.no_grad():
        model(**x)
        assert [len(s["projector"]) for s in vtoken.selection(model)] == [3, 3]


@pytest.mark.parametrize("keep", [0.3, 0.45])
def test_schedule_counts_the_whole_merge_units_a_vision_stage_keeps(keep):
    """The packed tower keeps whole 2x2 merge units: schedule_of's vision stage counts those units'
    patches (a multiple of 4), the patches behind what the forward kept, not keep x patches."""
    model = tiny_qwen2_vl()
    x = qwen_inputs(model, grids=((1, 8, 12),))  # one image: 24 LLM tokens, 96 patches
    with vtoken.pruned(model, "random", site="vision", layer=1, keep=keep), torch.no_grad():
        model(**x)
        kept_units = len(vtoken.selection(model)[0]["vision:1"])
        (stage,) = vtoken.schedule_of(model, visual_tokens=24).stages
    assert stage.keep_tokens == 4 * kept_units


SUPPRESS = [IMAGE_TOKEN, VIDEO_TOKEN]


@pytest.mark.parametrize("version", ["2", "2.5", "3"])
@pytest.mark.parametrize("keep", [1.0, 0.25])
def test_a_continued_generate_decodes_at_the_plain_models_positions(version, keep):
    """A second generate on the returned cache and the longer ids: transformers' Qwen-VL takes the
    past length from the cache, which pruning made shorter than the prompt (16 of 16 x 3 visual
    tokens dropped to 4 each, more than the text after them), sees image tokens in the "new" part and
    resets rope_deltas to zero; vtoken gives decoded tokens the plain model's M-RoPE ids (the prompt's
    largest plus one onwards), so the continuation equals one call (it changed tokens on Qwen3-VL)."""
    model = tiny_qwen2_vl(version=version)
    x = qwen_inputs(model, grids=((1, 8, 8), (1, 8, 8), (1, 8, 8)))
    vtoken.wrap(model, "pool", keep=keep)
    kw = dict(do_sample=False, suppress_tokens=SUPPRESS, return_dict_in_generate=True, output_scores=True)
    one = model.generate(**x, max_new_tokens=6, **kw)
    first = model.generate(**x, max_new_tokens=3, **kw)
    y = {"input_ids": first.sequences,
         "attention_mask": torch.cat([x["attention_mask"], torch.ones(3, 3, dtype=torch.long)], 1),
         "mm_token_type_ids": torch.cat([x["mm_token_type_ids"], torch.zeros(3, 3, dtype=x["mm_token_type_ids"].dtype)], 1)}
    rest = model.generate(**y, **vtoken.compat.cache_kwargs(vtoken.compat.output_cache(first)), max_new_tokens=3, **kw)
    assert torch.equal(rest.sequences, one.sequences)
    torch.testing.assert_close(rest.scores[0], one.scores[3], rtol=0, atol=1e-5)


def test_a_video_whose_last_frame_is_dropped_decodes_as_the_full_forward():
    """Qwen2.5-VL videos, random at the projector with contiguous positions, keeping 2 of 8 tokens:
    sample 1 loses its whole second frame, whose temporal ids were the prompt's largest. Decoding
    from the cache equals the wrapped model's full forward on prompt + generated token without a
    cache (the decoded token took the last prompt token's id before)."""
    g = torch.Generator().manual_seed(0)
    grids = torch.tensor([[2, 4, 4], [2, 4, 4]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 96, generator=g)
    rows = [[1, 5, VISION_START, *[VIDEO_TOKEN] * 8, VISION_END, 6, 7],
            [1, 8, 9, VISION_START, *[VIDEO_TOKEN] * 8, VISION_END, 6]]
    ids, mask = left_pad(rows)
    x = {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pixels, "video_grid_thw": grids,
         "mm_token_type_ids": (ids == VIDEO_TOKEN).int() * 2}
    model = tiny_qwen2_vl(version="2.5")
    vtoken.wrap(model, "random", keep_tokens=2, positions="contiguous", seed=11)  # a seed that drops frame 2
    cached = model.generate(**x, max_new_tokens=2, do_sample=False, suppress_tokens=SUPPRESS,
                            return_dict_in_generate=True, output_scores=True)
    assert max(vtoken.selection(model)[1]["projector"].tolist()) < 4  # the premise: frame 2 of sample 1 gone
    y = dict(x, input_ids=cached.sequences[:, : ids.shape[1] + 1],
             attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
             mm_token_type_ids=torch.cat([x["mm_token_type_ids"], torch.zeros(2, 1, dtype=torch.int)], 1))
    with torch.no_grad():
        full = model(**y, use_cache=False).logits[:, -1]
    full[:, SUPPRESS] = float("-inf")
    torch.testing.assert_close(cached.scores[1], full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,options", [("random", {}), ("pool", {}), ("fastv", {}), ("transprune", {}),
                                            ("vflowopt", {}), ("random", {"site": "vision", "layer": 0})])
def test_qwen3_vl_moe_runs_as_qwen3_vl(method, options):
    """Qwen3-VL-MoE (mixture-of-experts MLPs in the LLM, the rest Qwen3-VL's): at keep-all the wrapped
    logits equal the plain model's at every real position; pruned, generate with a cache equals it
    without one, step by step; the selection keeps the budget."""
    model = tiny_qwen2_vl(version="3-moe")
    x = qwen_inputs(model)
    real = x["attention_mask"].bool()
    with torch.no_grad():
        plain = model(**x).logits
        with vtoken.pruned(model, method, keep=1.0, **options):
            torch.testing.assert_close(model(**x).logits[real], plain[real], rtol=0, atol=1e-5)
    kw = dict(max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS, output_logits=True,
              return_dict_in_generate=True)
    with vtoken.pruned(model, method, keep=0.5, **options):
        cached = model.generate(**x, **kw)
        counts = [len(list(stages.values())[-1]) for stages in vtoken.selection(model)]
        uncached = model.generate(**x, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    for got, want in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    visual = (x["input_ids"] == IMAGE_TOKEN).sum(-1).tolist()
    assert counts == [round(n * 0.5) for n in visual]
