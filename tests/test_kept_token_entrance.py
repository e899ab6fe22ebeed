"""After a vision-site stage, a LLaVA-family or Qwen-VL prefill is fed only the tokens the stage
kept: the LLaVA families' AnyRes packing is handed the kept projected rows and places them
itself (``VisionLanguageAdapter._packing_of_kept_rows``), and the model is handed the kept tokens'
embeddings instead of the whole prompt (``_enter_kept_tokens``; on Qwen-VL with the whole prompt's
M-RoPE ids, ``QwenVLAdapter.numbers_whole_prompt``, and on Qwen3-VL with DeepStack's inputs of the
whole prompt, ``Qwen3VLAdapter.whole_prompt_llm_inputs``). Both are shortcuts of the path that builds every
crop's grid with zeros, packs it, scatters it into the whole prompt and drops the pruned rows in
front of the LLM; the reference here is that path itself, run on the same model by switching the
shortcuts off, and the results must be the same. Prompts without ``mm_token_type_ids`` (the model
cannot number them) keep that path.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from vtoken.adapters.llava import LlavaAdapter
from vtoken.adapters.llava_onevision import LlavaOnevisionAdapter
from vtoken.adapters.base import TokenMap
from vtoken.adapters.pipeline import VisionLanguageAdapter
from vtoken.adapters.qwen2_vl import QwenVLAdapter
from tiny import (
    alone, llava_inputs, llava_next_inputs, onevision_inputs, qwen_inputs, tiny_llava, tiny_llava_next,
    tiny_llava_onevision, tiny_qwen2_vl,
)


def _onevision_max9():
    model = tiny_llava_onevision()
    model.config.vision_aspect_ratio = "anyres_max_9"  # no grid of the default inputs is interpolated
    return model


FAMILIES = {
    "llava": (tiny_llava, lambda m: llava_inputs(batch=3)),
    "llava_next": (tiny_llava_next, llava_next_inputs),
    "llava_onevision": (_onevision_max9, onevision_inputs),
    # anyres_max_2 interpolates two of the three grids: tokens mixed from several patches take the
    # whole-prompt path (their re-weighting needs every crop's grid), whatever the shortcut says.
    "llava_onevision_interpolated": (tiny_llava_onevision, onevision_inputs),
    "qwen2_vl": (lambda: tiny_qwen2_vl(version="2"), qwen_inputs),
    "qwen2_5_vl": (lambda: tiny_qwen2_vl(version="2.5"), qwen_inputs),
    "qwen3_vl": (lambda: tiny_qwen2_vl(version="3"), qwen_inputs),
    "qwen3_vl_moe": (lambda: tiny_qwen2_vl(version="3-moe"), qwen_inputs),
    # Two images in the first sample, none in the second: the kept tokens of a padded batch whose
    # samples hold different numbers of images.
    "qwen3_vl_two_none_one": (lambda: tiny_qwen2_vl(version="3"), lambda m: qwen_inputs(m, images_per_sample=[2, 0, 1])),
    # The model numbers its M-RoPE ids from mm_token_type_ids: without them it cannot number a prompt
    # fed the kept tokens alone, and the whole prompt enters.
    "qwen2_5_vl_untyped": (lambda: tiny_qwen2_vl(version="2.5"),
                           lambda m: {k: v for k, v in qwen_inputs(m).items() if k != "mm_token_type_ids"}),
}
#: Families whose prefills after a vision stage keep the whole-prompt path (see the module; generate's
#: prefill without mm_token_type_ids enters, numbered by generate).
WHOLE_PROMPT_ONLY = ("llava_onevision_interpolated", "qwen2_5_vl_untyped")
#: Families whose model packs AnyRes crops (the packing handed the kept rows: 3 images per prefill).
PACKS_CROPS = ("llava_next", "llava_onevision")
ENTERING = [f for f in FAMILIES if f not in WHOLE_PROMPT_ONLY]

METHODS = [
    ("random", {"site": "vision", "layer": 1, "keep": 0.4}),
    ("pool", {"site": "vision", "layer": 0, "keep": 0.5}),
    ("random", {"stages": [{"site": "vision", "layer": 0, "keep": 0.6}, {"site": "projector", "keep": 0.5},
                           {"site": "llm", "layer": 1, "keep": 0.5}]}),
]


@pytest.fixture
def whole_prompt(monkeypatch):
    """Switch both shortcuts off: every crop's grid is built and packed, the whole prompt enters."""

    def off():
        monkeypatch.setattr(LlavaAdapter, "embeds_then_scatters", False)
        monkeypatch.setattr(QwenVLAdapter, "embeds_then_scatters", False)
        monkeypatch.setattr(LlavaAdapter, "grid_packing", lambda self: None)

    return off


def _run(model, x, method, options, steps=4):
    with vtoken.pruned(model, method, **options):
        with torch.no_grad():
            out = model(**x, use_cache=True)
        selection = vtoken.selection(model)
        generated = model.generate(**x, max_new_tokens=steps, do_sample=False)
    return out, generated, selection


def _encoding(out) -> torch.Tensor | None:
    """The image features the model's output carries (transformers >= 5.24: the encoder's output
    object; before: the features scattered into the prompt on LLaVA, none on Qwen-VL)."""
    encoded = getattr(out, "image_outputs", None)
    if encoded is not None:
        return torch.cat(list(encoded.pooler_output))
    return getattr(out, "image_hidden_states", None)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method,options", METHODS)
def test_kept_tokens_entering_alone_give_the_whole_prompts_results(family, method, options, whole_prompt):
    make, inputs = FAMILIES[family]
    model = make()
    x = inputs(model)
    calls = {"entered": 0, "placed": 0}
    enter, place = VisionLanguageAdapter._enter_kept_tokens, LlavaAdapter._kept_rows_placed

    def counting_enter(self, *args, **kwargs):
        calls["entered"] += 1
        return enter(self, *args, **kwargs)

    def counting_place(self, *args, **kwargs):
        calls["placed"] += 1
        return place(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VisionLanguageAdapter, "_enter_kept_tokens", counting_enter)
        patch.setattr(LlavaAdapter, "_kept_rows_placed", counting_place)
        fast, fast_generated, fast_selection = _run(model, x, method, options)
    # The shortcuts ran where they apply (and only there): two prefills (forward, generate). Without
    # mm_token_type_ids only generate's enters the kept tokens: it hands the model its own position ids.
    assert calls["entered"] == {"qwen2_5_vl_untyped": 1}.get(family, 0 if family in WHOLE_PROMPT_ONLY else 2)
    assert calls["placed"] == (2 * 3 if family in PACKS_CROPS else 0)
    whole_prompt()
    slow, slow_generated, slow_selection = _run(model, x, method, options)
    # The logits of the kept positions (a pruned prefill returns those), pad slots included.
    assert fast.logits.shape == slow.logits.shape
    torch.testing.assert_close(fast.logits, slow.logits, rtol=0, atol=1e-5)
    assert torch.equal(fast_generated, slow_generated)
    # The same tokens were kept, and the KV cache holds the same pruned prompt.
    assert len(fast_selection) == len(slow_selection)
    for mine, theirs in zip(fast_selection, slow_selection):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    for layer in range(vtoken.compat.num_cache_layers(slow.past_key_values)):
        for mine, theirs in zip(vtoken.compat.cache_layer_kv(fast.past_key_values, layer),
                                vtoken.compat.cache_layer_kv(slow.past_key_values, layer)):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    # The output still carries the image encoding, as the unwrapped model's does (or none, as it).
    assert type(fast) is type(slow) and (_encoding(fast) is None) == (_encoding(slow) is None)
    if _encoding(slow) is not None:
        torch.testing.assert_close(_encoding(fast), _encoding(slow), rtol=0, atol=0)


def test_a_bilinear_map_that_never_interpolates_is_one_to_one():
    """LLaVA-OneVision's crop-grid map below the AnyRes-Max limit has a single source per token (its
    unused bilinear entries are dropped), so it takes the one-to-one paths; an interpolated one keeps
    several."""
    model = tiny_llava_onevision()
    adapter = LlavaOnevisionAdapter(model)
    x = onevision_inputs(model)
    infos = adapter.image_infos({"pixel_values": x["pixel_values"], "image_sizes": x["image_sizes"]})
    assert [info.token_map.is_one_to_one for info in infos] == [True, False, False]
    mixed = infos[1].token_map
    assert mixed.index.shape[1] == 4 and bool(((mixed.index >= 0).sum(1) > 1).any())


def test_unused_entries_go_and_used_ones_stay():
    index = torch.tensor([[3, -1, -1, -1], [-1, -1, -1, -1], [5, -1, 7, -1]])
    weight = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [0.5, 0, 0.5, 0]])
    trimmed = TokenMap(index, weight).without_unused_entries()
    assert trimmed.index.tolist() == [[3, -1], [-1, -1], [5, 7]]
    assert trimmed.weight.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.5, 0.5]]
    nothing = TokenMap(torch.full((2, 4), -1), torch.zeros(2, 4)).without_unused_entries()
    assert nothing.index.tolist() == [[-1], [-1]]


def test_an_image_map_read_once_per_shape_is_numbered_from_the_images_first_crop():
    """The map of an image shape is read off the model's packing once; an image later in the call
    gets it with every slot moved by its first crop, the same map as read for that place directly."""
    model = _onevision_max9()
    adapter = LlavaOnevisionAdapter(model)
    sizes = torch.tensor([[64, 64], [64, 64]])
    first, second = adapter.image_infos({"pixel_values": torch.zeros(2, 5, 3, 32, 32), "image_sizes": sizes})
    per = adapter.tokens_per_crop
    crops = len(first.crops)
    assert second.crops == list(range(crops, 2 * crops))
    expected = torch.where(first.token_map.index >= 0, first.token_map.index + crops * per, -1)
    assert torch.equal(second.token_map.index, expected)
    # ... and the first crop's map itself: its base view is the first crop's patches, then a newline.
    assert torch.equal(second.token_map.index[:per, 0], torch.arange(crops * per, (crops + 1) * per))


def _flatten(value) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    return []  # a KV cache (compared in the first test), None


@pytest.mark.parametrize("family", ENTERING)
def test_a_tuple_output_holds_what_the_whole_prompts_does(family, whole_prompt):
    """``return_dict=False``, on the model and on its inner model: the same entries, the image
    encoding among them, in the same order."""
    make, inputs = FAMILIES[family]
    model = make()
    x = inputs(model)
    outputs = []
    for switch in (lambda: None, whole_prompt):
        switch()
        with vtoken.pruned(model, "random", site="vision", layer=1, keep=0.4), torch.no_grad():
            outer = model(**x, return_dict=False)
            inner = model.model(**x, return_dict=False)
        outputs.append((outer, inner))
    assert all(isinstance(output, tuple) for pair in outputs for output in pair)
    outputs = [(_flatten(outer), _flatten(inner)) for outer, inner in outputs]
    (fast_outer, fast_inner), (slow_outer, slow_inner) = outputs
    for fast, slow in ((fast_outer, slow_outer), (fast_inner, slow_inner)):
        assert [t.shape for t in fast] == [t.shape for t in slow]
        for mine, theirs in zip(fast, slow):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "qwen2_5_vl", "qwen3_vl"])
def test_training_through_the_kept_tokens_gives_the_same_loss_and_gradients(family, whole_prompt):
    """Labels, a backward pass and ``enable_input_require_grads`` (the embeddings' output a leaf that
    requires grad, as for adapters on a frozen model): the same loss and gradients either way."""
    make, inputs = FAMILIES[family]
    model = make()
    model.enable_input_require_grads()
    x = inputs(model)
    labels = torch.where(x["attention_mask"].bool(), x["input_ids"], -100)
    results = []
    for switch in (lambda: None, whole_prompt):
        switch()
        model.zero_grad()
        with vtoken.pruned(model, "random", site="vision", layer=1, keep=0.4):
            loss = model(**x, labels=labels).loss
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (fast_loss, fast_grads), (slow_loss, slow_grads) = results
    torch.testing.assert_close(fast_loss, slow_loss, rtol=0, atol=1e-6)
    assert fast_grads.keys() == slow_grads.keys() and fast_grads
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-6, msg=name)


GENERATE_MODES = {
    "beam search": dict(num_beams=3, num_return_sequences=2, do_sample=False),
    "sampling": dict(do_sample=True, num_return_sequences=2, top_k=5, temperature=0.7),
    "no cache": dict(do_sample=False, use_cache=False),
    "static cache": dict(do_sample=False, cache_implementation="static"),
    "prompt lookup": dict(do_sample=False, prompt_lookup_num_tokens=2),
    "scores": dict(do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True),
    # generate runs a prefill with images in one forward (vtoken warns that the chunk size is not used).
    "chunked prefill": dict(do_sample=False, prefill_chunk_size=8),
    # The unconditional pass is the plain model's (text alone), the conditional one enters the kept tokens.
    "guidance": dict(do_sample=False, guidance_scale=1.5, return_dict_in_generate=True, output_scores=True),
}


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("mode", list(GENERATE_MODES))
def test_every_generate_mode_gives_the_whole_prompts_tokens(family, mode, whole_prompt):
    make, inputs = FAMILIES[family]
    model = make()
    x = inputs(model)
    if mode == "guidance" and family.startswith("qwen"):
        pytest.skip("transformers' Qwen-VL cannot run the unconditional pass of guidance (no rope deltas for a text-only forward)")
    if mode == "prompt lookup":  # assisted decoding runs one sample at a time
        x = alone(x, 0) if "image_grid_thw" in x else {k: v[:1] for k, v in x.items()}  # Qwen-VL packs its images
    results = []
    for switch in (lambda: None, whole_prompt):
        switch()
        torch.manual_seed(3)
        with vtoken.pruned(model, "random", site="vision", layer=1, keep=0.4):
            out = model.generate(**x, max_new_tokens=4, suppress_tokens=[model.config.image_token_id],
                                 **GENERATE_MODES[mode])
        results.append(out)
    fast, slow = results
    if isinstance(fast, torch.Tensor):
        assert torch.equal(fast, slow)
        return
    assert torch.equal(fast.sequences, slow.sequences)
    for mine, theirs in zip(fast.scores, slow.scores):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def _packed_sources(model, image_sizes) -> list[torch.Tensor]:
    """Each image's source slot per token, read directly off the model's packing of the whole call
    (crop-token ids, -1 for newlines), as the adapter read it before its maps were cached."""
    from vtoken import compat

    adapter = LlavaAdapter(model)
    crops = adapter.crops_per_image(image_sizes)
    ids, first = [], 0
    for n in crops:
        ids.append(torch.arange(first * 16, (first + n) * 16, dtype=torch.float64).view(n, 16, 1))
        first += n
    packed = compat.pack_anyres_features(model.model, ids, image_sizes, "default", torch.tensor([-1.0], dtype=torch.float64))
    return [p.view(-1).round().long() for p in packed]


def test_llava_next_maps_read_once_per_shape_are_the_models_packing():
    """LLaVA-NeXT's token maps come from a cache of image shapes: a repeated shape later in the call,
    and a model whose config packs differently, each get the map the model's own packing gives."""
    model = tiny_llava_next()
    sizes = torch.tensor([[32, 64], [64, 64], [32, 64]])
    crops = LlavaAdapter(model).crops_per_image(sizes)
    infos = LlavaAdapter(model).image_infos({"pixel_values": torch.zeros(3, max(crops), 3, 32, 32), "image_sizes": sizes})
    for info, expected in zip(infos, _packed_sources(model, sizes)):
        assert torch.equal(info.token_map.index[:, 0], expected)
    # Two configs that cut a 64 x 64 image into two crops each, one above the other or side by side:
    # the same number of crops, different packings.
    maps = []
    for pinpoints in ([[64, 32], [32, 64]], [[32, 64], [64, 32]]):
        other = tiny_llava_next()
        other.config.image_grid_pinpoints = other.model.config.image_grid_pinpoints = pinpoints
        size = torch.tensor([[64, 64]])
        (info,) = LlavaAdapter(other).image_infos({"pixel_values": torch.zeros(1, 3, 3, 32, 32), "image_sizes": size})
        (expected,) = _packed_sources(other, size)
        assert len(info.crops) == 3 and torch.equal(info.token_map.index[:, 0], expected)
        maps.append(expected)
    assert not torch.equal(maps[0], maps[1])
