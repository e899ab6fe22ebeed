"""The generic suite of the vision-only families (CLIP, SigLIP, timm and open_clip ViTs): every family
of ``vision_families.py`` with every method that runs on it, against the unwrapped model.

Guarantees: unwrap exact; keep-all identity; an image's embedding independent of its batch; SDPA
equals eager; the prefix tokens (CLS, registers) never pruned; a budget counts the patch tokens leaving
the encoder; pruning after block l equals the unwrapped blocks run on only the kept tokens; ToMe-style
block halves equal each family's block; refusals are one line and leave the model unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vtoken
from vision_families import DEPTH, PATCHES, VISION_FAMILIES, blocks_of, images

#: Methods that run on a vision-only family, with the options the suite uses (a budget of 1/4).
METHODS = {
    "random": dict(keep=0.25),
    "pool": dict(keep=0.25),
    "repshift": dict(keep=0.25),
    "repshift_merge": dict(keep=0.25, mode="merge"),
    "tome": dict(r=12),
    "visionzip": dict(keep=0.25),
}


def _method(name: str) -> str:
    return name.split("_")[0]


def _cases(require_cls: bool = True):
    for family, spec in VISION_FAMILIES.items():
        for method in METHODS:
            if method == "visionzip" and not spec.has_cls:
                continue
            yield pytest.param(family, method, id=f"{family}-{method}")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _embed(family: str, model, x) -> torch.Tensor:
    with torch.no_grad():
        return VISION_FAMILIES[family].embed(model, x)


@pytest.mark.parametrize("family,method", list(_cases()))
def test_unwrap_is_exact(family, method):
    spec = VISION_FAMILIES[family]
    model = spec.make()
    pristine = copy.deepcopy(model)
    x = images()
    before = _embed(family, model, x)
    types = [type(m) for m in model.modules()]
    vtoken.wrap(model, _method(method), **METHODS[method])
    _embed(family, model, x)
    vtoken.unwrap(model)
    assert [type(m) for m in model.modules()] == types
    assert all("forward" not in m.__dict__ for m in model.modules())
    state, original = model.state_dict(), pristine.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    assert torch.equal(_embed(family, model, x), before)


@pytest.mark.parametrize("family,method", list(_cases()))
def test_keep_all_is_identity(family, method):
    spec = VISION_FAMILIES[family]
    model = spec.make()
    x = images()
    before = _embed(family, model, x)
    options = dict(METHODS[method])
    if method == "tome":
        options = {"keep": 1.0}
    else:
        options["keep"] = 1.0
    vtoken.wrap(model, _method(method), **options)
    torch.testing.assert_close(_embed(family, model, x), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,method", list(_cases()))
def test_each_image_as_alone(family, method):
    spec = VISION_FAMILIES[family]
    model = vtoken.wrap(spec.make(), _method(method), **METHODS[method])
    x = images()
    together = _embed(family, model, x)
    for b in range(x.shape[0]):
        torch.testing.assert_close(together[b : b + 1], _embed(family, model, x[b : b + 1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,method", list(_cases()))
def test_budget_counts_patch_tokens_leaving_the_encoder(family, method):
    """``keep_tokens=K`` (or ToMe's r) leaves exactly K patch tokens after the last block, the prefix
    tokens (CLS, registers) untouched besides them."""
    spec = VISION_FAMILIES[family]
    model = spec.make()
    options = dict(METHODS[method])
    if method != "tome":
        options = {k: v for k, v in options.items() if k != "keep"} | {"keep_tokens": 40}
        expected = 40
    else:
        expected = PATCHES - DEPTH * options["r"]
    vtoken.wrap(model, _method(method), **options)
    seen = []
    handle = blocks_of(model)[DEPTH - 1].register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).shape[1]))
    _embed(family, model, images())
    handle.remove()
    assert seen == [spec.prefix + expected]
    kept = vtoken.selection(model)[0]
    assert len(list(kept.values())[-1]) == expected


@pytest.mark.parametrize("family", list(VISION_FAMILIES))
def test_prefix_tokens_are_never_pruned(family):
    """After a pruning stage the prefix tokens are the block's own first outputs, unchanged."""
    spec = VISION_FAMILIES[family]
    model = spec.make()
    layer = 1
    outputs = []
    vtoken.wrap(model, "random", keep=0.25, site="vision", layer=layer)
    # The next block's input: the pruned tokens (a hook on the block itself sees its own output,
    # before the stage after it, whenever it was registered).
    handle_in = blocks_of(model)[layer + 1].register_forward_pre_hook(lambda m, a: outputs.append(a[0] if a else None))
    x = images()
    reference = spec.make()
    captured = []
    reference_handle = blocks_of(reference)[layer].register_forward_hook(lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o))
    _embed(family, model, x)
    _embed(family, reference, x)
    handle_in.remove(), reference_handle.remove()
    pruned, full = outputs[0], captured[0]
    assert pruned.shape[1] == spec.prefix + round(0.25 * PATCHES)
    torch.testing.assert_close(pruned[:, : spec.prefix], full[:, : spec.prefix], rtol=0, atol=0)
    kept = torch.stack([s[f"vision:{layer}"] for s in vtoken.selection(model)])
    index = (spec.prefix + kept)[..., None].expand(-1, -1, full.shape[-1])
    torch.testing.assert_close(pruned[:, spec.prefix :], torch.gather(full, 1, index), rtol=0, atol=0)


@pytest.mark.parametrize("family", list(VISION_FAMILIES))
def test_pruning_equals_the_unwrapped_blocks_on_the_kept_tokens(family):
    """The wrapped model's embedding equals the unwrapped model whose sequence is cut to the prefix
    and the kept patches (``vtoken.selection``) after block l by a plain hook of this test."""
    spec = VISION_FAMILIES[family]
    model = spec.make()
    x = images()
    layer = 2
    vtoken.wrap(model, "random", keep=0.3, site="vision", layer=layer)
    wrapped = _embed(family, model, x)
    kept = torch.stack([s[f"vision:{layer}"] for s in vtoken.selection(model)])
    vtoken.unwrap(model)

    def cut(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        index = torch.cat([torch.arange(spec.prefix).expand(hidden.shape[0], -1), spec.prefix + kept], dim=1)
        hidden = torch.gather(hidden, 1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = blocks_of(model)[layer].register_forward_hook(cut)
    reference = _embed(family, model, x)
    handle.remove()
    torch.testing.assert_close(wrapped, reference, rtol=0, atol=0)


@pytest.mark.parametrize("family,method", [c for c in _cases() if VISION_FAMILIES[c.values[0]].switchable])
def test_sdpa_equals_eager(family, method):
    spec = VISION_FAMILIES[family]
    x = images()
    out = {}
    for attn in ("sdpa", "eager"):
        model = vtoken.wrap(spec.make(attn=attn), _method(method), **METHODS[method])
        out[attn] = _embed(family, model, x)
    torch.testing.assert_close(out["sdpa"], out["eager"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(VISION_FAMILIES))
def test_block_halves_equal_the_block(family):
    """The two halves a ToMe-style stage runs (attention, then MLP) compose to the family's own block,
    and a zero bias changes nothing."""
    from vtoken.adapters import adapter_for
    from vtoken.adapters.base import UndoStack

    spec = VISION_FAMILIES[family]
    model = spec.make()
    adapter = adapter_for(model)(model)
    block = blocks_of(model)[1]
    undo = UndoStack()
    halves = adapter.description.vision.halves(block, undo)
    x = torch.randn(2, spec.prefix + PATCHES, 64)
    with torch.no_grad():
        expected = block(x, None)  # (the second argument: HF's attention_mask, timm's attn_mask, open_clip's k_x)
        expected = expected[0] if isinstance(expected, tuple) else expected
        hidden, rest = halves.split_call((x, None), {})
        middle, keys = halves.attention(hidden, None, rest)
        got = halves.mlp(middle)
        middle_zero, _ = halves.attention(hidden, torch.zeros(2, 1, 1, x.shape[1]), dict(rest))
    undo.run()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(middle_zero, middle, rtol=1e-5, atol=1e-6)
    assert keys().shape == (2, x.shape[1], 16)


@pytest.mark.parametrize("family", list(VISION_FAMILIES))
def test_proportional_attention_bias_reaches_the_logits(family):
    """A bias that forbids every patch key leaves each token attending to the prefix only (or, with
    no prefix, is refused nowhere: a -inf on all but one key makes every row that key's value)."""
    from vtoken.adapters import adapter_for
    from vtoken.adapters.base import UndoStack

    spec = VISION_FAMILIES[family]
    model = spec.make()
    adapter = adapter_for(model)(model)
    block = blocks_of(model)[0]
    halves = adapter.description.vision.halves(block, UndoStack())
    tokens = spec.prefix + PATCHES
    x = torch.randn(1, tokens, 64)
    one_key = torch.full((1, 1, 1, tokens), -1e9)
    one_key[..., 3] = 0.0
    with torch.no_grad():
        hidden, rest = halves.split_call((x, None), {})
        out, _ = halves.attention(hidden, one_key, rest)
    branch = out - x  # every query attends to key 3 alone: the same branch output for every row
    torch.testing.assert_close(branch, branch[:, 3:4].expand_as(branch), rtol=1e-4, atol=1e-5)


def test_tome_sources_partition_the_patches():
    model = vtoken.wrap(VISION_FAMILIES["timm"].make(), "tome", r=12)
    _embed("timm", model, images())
    from vtoken.adapters.vision_encoder import encoder_sources

    run = vtoken.api._state(model).pruner.last_run
    sources = encoder_sources(run)
    left = PATCHES - DEPTH * 12
    assert sources.shape == (3, PATCHES)
    assert bool((sources >= 0).all()) and bool((sources < left).all())
    assert all(len(torch.unique(row)) == left for row in sources)  # every token left holds some patch


@pytest.mark.parametrize("method,expected", [
    ("fastv", "fastv prunes at the llm site, which a vision-only"),
    ("zoo_prune", "zoo_prune prunes at the projector site"),
])
def test_methods_without_a_vision_site_are_refused(method, expected):
    model = VISION_FAMILIES["clip"].make()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=expected) as error:
        vtoken.wrap(model, method)
    assert "\n" not in str(error.value) and not vtoken.is_wrapped(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_visionzip_needs_a_cls_token():
    model = VISION_FAMILIES["siglip"].make()
    with pytest.raises(ValueError, match=r"CLS token.*a method that does not need it \(random, pool\)$"):
        vtoken.wrap(model, "visionzip", keep=0.25)  # no LLM here: fastv is not offered
    assert not vtoken.is_wrapped(model)


def test_an_open_clip_block_of_its_own_attention_is_refused_at_wrap_by_methods_that_read_it():
    """block_type="custom" (qk_norm) gives open_clip blocks whose attention is not nn.MultiheadAttention:
    VisionZip (it reads a block's attention) and ToMe (it splits the block) are refused at wrap, naming
    the block, and ``vtoken.methods()`` names such towers in ToMe's limits; random runs."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=112, patch_size=8, width=64, layers=2, head_width=16,
                                                         qk_norm=True, block_type="custom"),
                           text_cfg=dict(context_length=16, vocab_size=64, width=64, heads=4, layers=2)).eval()
    with pytest.raises(ValueError, match=r"^visionzip needs .* CustomResidualAttentionBlock blocks, whose attention is "
                                         r"Attention, not nn.MultiheadAttention"):
        vtoken.wrap(model, "visionzip", keep=0.25)
    assert not vtoken.is_wrapped(model)
    # ToMe (it splits each block into attention and MLP) likewise; methods() says so in its limits.
    # At every budget: keep=1.0 and r=0 (no merging stage) were accepted on blocks ToMe cannot split.
    for options in ({"keep": 0.25}, {"keep": 1.0}, {"r": 0}):
        with pytest.raises(ValueError, match=r"CustomResidualAttentionBlock blocks, not the ResidualAttentionBlock"):
            vtoken.wrap(model, "tome", **options)
        assert not vtoken.is_wrapped(model)
    listing = {m["name"]: m for m in vtoken.methods()}
    assert listing["tome"]["families"]["open_clip ViT"] == "runs"
    assert "block_type='custom'" in listing["tome"]["limits"]["open_clip ViT"]
    assert "open_clip ViT" not in listing["random"]["limits"] and "open_clip ViT" not in listing["repshift"]["limits"]
    with vtoken.pruned(model, "random", keep=0.25), torch.no_grad():
        model.encode_image(torch.randn(1, 3, 112, 112))
        assert len(list(vtoken.selection(model)[0].values())[-1]) == round(0.25 * 196)  # 14 x 14 patches


def test_budget_larger_than_the_patches_is_refused():
    model = VISION_FAMILIES["timm"].make()
    with pytest.raises(ValueError, match=f"larger than the {PATCHES} patch tokens"):
        vtoken.wrap(model, "random", keep_tokens=PATCHES + 1)
    assert not vtoken.is_wrapped(model)


def test_methods_say_which_run_on_each_vision_family():
    listing = {m["name"]: m["families"] for m in vtoken.methods()}
    for family in ("CLIP", "SigLIP", "timm ViT", "open_clip ViT"):
        for method in ("tome", "repshift", "random", "pool"):
            assert listing[method][family] == "runs", (method, family)
        assert "vision-only" in listing["fastv"][family]
        assert "vision-only" in listing["zoo_prune"][family]
    # VisionZip reads the CLS token's attention: SigLIP has none, timm / open_clip only some models.
    assert listing["visionzip"]["CLIP"] == "runs"
    assert "no CLS token" in listing["visionzip"]["SigLIP"]
    assert "class token" in listing["visionzip"]["timm ViT"] and "class_token=False" in listing["visionzip"]["timm ViT"]
    assert "class token" in listing["visionzip"]["open_clip ViT"]


@pytest.mark.parametrize("family", list(VISION_FAMILIES))
def test_methods_verdict_agrees_with_wrap_for_visionzip(family):
    """Where ``vtoken.methods()`` says VisionZip runs, it wraps; a model it refuses (no CLS token)
    belongs to a family whose verdict says why."""
    spec = VISION_FAMILIES[family]
    verdict = {m["name"]: m["families"] for m in vtoken.methods()}["visionzip"][spec.label]
    model = spec.make()
    try:
        vtoken.wrap(model, "visionzip", keep=0.25)
    except ValueError as error:
        assert not spec.has_cls and "CLS token" in str(error)
        assert verdict != "runs" and "CLS token" in verdict, verdict
    else:
        assert spec.has_cls


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _timm_with_blocks(block_fn, **options):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5,
                             block_fn=block_fn, **options).eval()


@pytest.mark.parametrize("block,method", [
    ("ParallelScalingBlock", "tome"), ("ParallelScalingBlock", "repshift"), ("ParallelScalingBlock", "visionzip"),
    ("ParallelThingsBlock", "tome"), ("ParallelThingsBlock", "repshift"),
])
def test_timm_blocks_vtoken_cannot_read_are_refused_in_one_line(block, method):
    """A timm ViT whose blocks have no ``attn`` / layer-scale branches to read or split is refused
    naming the block class and the methods that still run, the model unchanged."""
    import timm.models.vision_transformer as V

    model = _timm_with_blocks(getattr(V, block))
    state, hooks = copy.deepcopy(model.state_dict()), _hooks(model)
    with pytest.raises(ValueError, match=f"{block} blocks, which lack .*only random and pool run") as error:
        vtoken.wrap(model, method, **({"r": 2} if method == "tome" else {"keep": 0.5}))
    assert "\n" not in str(error.value) and not vtoken.is_wrapped(model) and _hooks(model) == hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("block", ["ParallelScalingBlock", "ParallelThingsBlock"])
@pytest.mark.parametrize("method", ["random", "pool"])
def test_methods_after_a_block_run_on_any_timm_block(block, method):
    import timm.models.vision_transformer as V

    model = _timm_with_blocks(getattr(V, block))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        vtoken.wrap(model, method, keep=1.0)
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
        vtoken.unwrap(model)
        vtoken.wrap(model, method, keep=0.5, site="vision", layer=1)
        model(x)
        assert len(vtoken.selection(model)[0]["vision:1"]) == 8
        vtoken.unwrap(model)
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("method", ["tome", "repshift", "repshift_merge", "visionzip", "random"])
def test_timm_res_post_blocks_run_every_method(method):
    """``ResPostBlock`` (each branch normalised after attention / MLP) has the parts every method reads:
    keep-all is the model itself, pruning runs, unwrap is exact."""
    from timm.models.vision_transformer import ResPostBlock

    model = _timm_with_blocks(ResPostBlock, init_values=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        options = dict(METHODS[method])
        vtoken.wrap(model, _method(method), **({"keep": 1.0} if method == "tome" else {**options, "keep": 1.0}))
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
        vtoken.unwrap(model)
        vtoken.wrap(model, _method(method), **({"r": 2} if method == "tome" else {**options, "keep": 0.5}))
        assert model(x).shape == before.shape
        assert len(list(vtoken.selection(model)[0].values())[-1]) == (16 - 3 * 2 if method == "tome" else 8)
        vtoken.unwrap(model)
        assert torch.equal(model(x), before)


def test_timm_res_post_block_halves_and_branches_equal_the_block():
    """ToMe's two halves compose to a ``ResPostBlock``, and the branches observed for Representation
    Shift (the norms closing each branch) add up to its output."""
    from timm.models.vision_transformer import ResPostBlock
    from vtoken.adapters import adapter_for
    from vtoken.adapters.base import UndoStack
    from vtoken.adapters.observe import observe_layer

    model = _timm_with_blocks(ResPostBlock, init_values=0.5)
    vision = adapter_for(model)(model).description.vision
    block = model.blocks[1]
    x = torch.randn(2, 17, 32)
    undo = UndoStack()
    halves = vision.halves(block, undo)
    seen = []
    observe_layer(block, vision.parts, active=lambda: True, done=seen.append, undo=undo)
    with torch.no_grad():
        expected = block(x)
        hidden, rest = halves.split_call((x,), {})
        middle, keys = halves.attention(hidden, None, rest)
        got = halves.mlp(middle)
    undo.run()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    io = seen[0]
    torch.testing.assert_close(io["block"][0] + io["attention"][1] + io["mlp"][1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(io["block"][0] + io["attention"][1], middle, rtol=1e-5, atol=1e-6)
    assert keys().shape == (2, 17, 16) and _hooks(model) == 0


@pytest.mark.parametrize("family", ["timm", "timm_registers", "open_clip_tower", "open_clip"])
def test_feature_maps_of_forward_intermediates_are_refused_while_wrapped(family):
    """Pruned or merged tokens no longer fill the patch grid: ``forward_intermediates`` refuses NCHW
    maps in one line (it folded the tokens left into fewer channels), gives the tokens left as NLC,
    and is the model's own again after unwrap."""
    spec = VISION_FAMILIES[family]
    model = vtoken.wrap(spec.make(), "random", keep=0.5)
    x = images(2)
    call = model.forward_intermediates
    fmt = "image_output_fmt" if family == "open_clip" else "output_fmt"
    with torch.no_grad():
        with pytest.raises(ValueError, match="no feature-map layout.*unwrap") as error:
            call(x)
        assert "\n" not in str(error.value)
        out = call(x, **{fmt: "NLC"})
        intermediates = out[1] if isinstance(out, tuple) else out["image_intermediates"]
        assert intermediates[-1].shape[1] == PATCHES // 2  # the patch tokens left (prefix split off)
        assert intermediates[0].shape[1] == PATCHES
        if family.startswith("timm"):
            torch.testing.assert_close(out[0], model.forward_features(x), rtol=0, atol=0)
        vtoken.unwrap(model)
        assert "forward_intermediates" not in (model.visual if family == "open_clip" else model).__dict__
        maps = model.forward_intermediates(x)
        maps = maps[1] if isinstance(maps, tuple) else maps["image_intermediates"]
        assert maps[-1].shape == (2, 64, 14, 14)


def test_clip_text_tower_is_untouched():
    model = VISION_FAMILIES["clip"].make()
    text = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.get_text_features(input_ids=text)
        vtoken.wrap(model, "tome", r=12)
        after = model.get_text_features(input_ids=text)
    before = before if isinstance(before, torch.Tensor) else before.pooler_output
    after = after if isinstance(after, torch.Tensor) else after.pooler_output
    assert torch.equal(before, after)


def test_show_draws_what_each_merged_token_holds(tmp_path):
    """After ToMe, ``vtoken.show`` tints the patches of each merged token alike: two patches merged
    into one token get the same colour, patches of different tokens different ones."""
    from PIL import Image

    from vtoken.adapters.vision_encoder import encoder_sources

    model = vtoken.wrap(VISION_FAMILIES["timm"].make(), "tome", r=12)
    x = images(1)
    _embed("timm", model, x)
    picture = Image.new("RGB", (112, 112), (128, 128, 128))
    path = vtoken.show(model, picture, tmp_path / "sources.png")
    drawn = Image.open(path).convert("RGB")
    holders = encoder_sources(vtoken.api._state(model).pruner.last_run)[0]
    cell = drawn.width // 14  # (drawn enlarged to a legible size)
    colour = lambda p: drawn.getpixel(((p % 14) * cell + cell // 2, (p // 14) * cell + cell // 2))  # noqa: E731
    same = [(a, b) for a in range(40) for b in range(a + 1, 196) if holders[a] == holders[b]][:5]
    different = [(a, b) for a in range(40) for b in range(a + 1, 196) if holders[a] != holders[b]][:5]
    assert same and all(colour(a) == colour(b) for a, b in same)
    assert all(colour(a) != colour(b) for a, b in different)


@pytest.mark.parametrize("method", ["tome", "random", "visionzip"])
def test_two_threads_get_what_each_gets_alone(method):
    """Two threads encoding different images on one wrapped model: each gets its result alone (the
    encoder call's state is per thread; ToMe's sizes and order never mix)."""
    import threading

    model = vtoken.wrap(VISION_FAMILIES["clip"].make(), _method(method), **METHODS[method])
    inputs = [images(2, seed=1), images(3, seed=2)]
    alone = [_embed("clip", model, x) for x in inputs]
    results: dict[int, list] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(i):
        start.wait()
        for _ in range(4):
            results[i].append(_embed("clip", model, inputs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i in range(2):
        assert all(torch.equal(out, alone[i]) for out in results[i])


@pytest.mark.parametrize("family", ["timm", "clip"])
def test_a_deep_copy_and_a_saved_config_give_the_same_wrap(family, tmp_path):
    """``copy.deepcopy`` of a wrapped ViT is an independent wrapped copy, and ``save_config`` /
    ``load`` give ToMe's ``(r, inflection)`` schedule back."""
    spec = VISION_FAMILIES[family]
    model = vtoken.wrap(spec.make(), "tome", r=(12, -0.5))
    x = images()
    reference = _embed(family, model, x)
    clone = copy.deepcopy(model)
    assert torch.equal(_embed(family, clone, x), reference)
    vtoken.unwrap(clone)
    assert torch.equal(_embed(family, model, x), reference)  # the original stays wrapped
    vtoken.save_config(model, tmp_path)
    rewrapped = vtoken.wrap(spec.make(), config=vtoken.load(tmp_path))
    assert vtoken.config_of(rewrapped).r == (12, -0.5)
    assert torch.equal(_embed(family, rewrapped, x), reference)


@pytest.mark.parametrize("method,options", [("random", {"keep": 1.0}), ("random", {"keep": 0.25}), ("tome", {"r": 3}),
                                            ("repshift", {"keep": 0.25}), ("visionzip", {"keep": 0.25})])
def test_a_timm_embedding_that_pads_gives_the_grid_it_makes(method, options):
    """timm's dynamic_img_pad pads a 60 x 60 image to 64 x 64 (an 8 x 8 grid of 8 px patches, not 7 x 7):
    keep-all equals the plain model, a budget counts the 64 patches, and FLOPs count them too."""
    from vision_families import _timm

    model = _timm("sdpa", 0, dynamic_img_size=True, dynamic_img_pad=True)
    x = torch.randn(2, 3, 60, 60, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x)
        with vtoken.pruned(model, method, **options):
            out = model(x)
            kept = len(list(vtoken.selection(model)[0].values())[-1])
    if options.get("keep") == 1.0:
        assert torch.equal(out, plain) and kept == 64
    elif method == "tome":
        assert kept == 64 - 3 * DEPTH
    else:
        assert kept == 16
    assert vtoken.flops(model, image_size=(60, 60)).patches == 64


@pytest.mark.parametrize("family", ["open_clip", "timm"])
def test_patch_dropout_in_training_mode_is_refused_in_one_line(family):
    """Patch dropout (open_clip's patch_dropout, timm's patch_drop_rate) keeps a random subset of the
    patches in training mode, before the first block: refused at the call, naming model.eval(); the
    same model in eval mode (patch dropout off) prunes as usual."""
    import open_clip

    from vision_families import _timm

    if family == "timm":
        model = _timm("sdpa", 0, patch_drop_rate=0.5)
        call = lambda m, x: m(x)  # noqa: E731
    else:
        torch.manual_seed(0)
        model = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=112, patch_size=8, width=64, layers=2,
                                                             head_width=16, patch_dropout=0.5),
                               text_cfg=dict(context_length=16, vocab_size=64, width=64, heads=4, layers=2))
        call = lambda m, x: m.encode_image(x)  # noqa: E731
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with vtoken.pruned(model, "random", keep=0.25):
        model.train()
        with pytest.raises(ValueError, match=r"^the model's patch dropout \(prob=0.5\) is active in training mode: .*"
                                             r"call model.eval\(\), or set its prob to 0"):
            call(model, x)
        model.eval()
        with torch.no_grad():
            call(model, x)
        assert len(list(vtoken.selection(model)[0].values())[-1]) == round(0.25 * 196)


@pytest.mark.parametrize("options", [{"site": "llm"}, {"site": "projector", "keep": 0.5},
                                     {"stages": [{"site": "llm", "keep": 0.5}]}])
def test_a_site_a_vision_only_model_lacks_is_named_first(options):
    """site='llm' without a layer was answered 'needs `layer`'; with one, 'no llm site': the site comes first."""
    model = VISION_FAMILIES["timm"].make()
    site = options.get("site") or options["stages"][0]["site"]
    with pytest.raises(ValueError, match=rf"^timm ViT is a vision-only model: it has no '{site}' site; use site='vision'"):
        vtoken.wrap(model, "random", **options)
    assert not vtoken.is_wrapped(model)


def _non_square_patches(kind: str):
    """A ViT whose patches are 8 pixels tall and 4 wide: a 32 x 32 image makes a 4 x 8 grid."""
    torch.manual_seed(0)
    if kind == "timm":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=32, patch_size=(8, 4), embed_dim=32, depth=3, num_heads=2, num_classes=5).eval()
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=(8, 4), width=32, layers=3, heads=2, mlp_ratio=2.0, output_dim=8).eval()


@pytest.mark.parametrize("kind", ["timm", "open_clip"])
@pytest.mark.parametrize("method", list(METHODS))
def test_patches_taller_than_wide_are_counted_side_by_side(kind, method):
    """Each side of the image is cut by its own patch side: 32 patches, not 16 (vtoken read the
    patch's height for both sides, so keep=1.0 dropped half the patches and ToMe and Representation
    Shift stopped with shape errors)."""
    model = _non_square_patches(kind)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    embed = (lambda m: m.forward_features(x)) if kind == "timm" else (lambda m: m(x))
    with torch.no_grad():
        plain = embed(model)
    options = {k: v for k, v in METHODS[method].items() if k not in ("keep", "r")}
    with vtoken.pruned(model, _method(method), **({"r": 0} if method == "tome" else {"keep": 1.0}), **options), torch.no_grad():
        torch.testing.assert_close(embed(model), plain, rtol=0, atol=1e-5)
    budget = {"r": 4} if method == "tome" else {"keep": 0.5}
    with vtoken.pruned(model, _method(method), **budget, **options), torch.no_grad():
        embed(model)
        kept = [len(v) for v in vtoken.selection(model)[0].values()]
    assert kept[-1] == (32 - 4 * len(kept) if method == "tome" else 16)


@pytest.mark.parametrize("family", ["clip_vision", "siglip"])
@pytest.mark.parametrize("asked_before_wrap", [False, True])
def test_hidden_states_hold_each_block_output_before_the_stage_after_it(family, asked_before_wrap):
    """``output_hidden_states`` gives block l's output before the stage after block l prunes it (as an
    LLM layer's hidden state is before a stage at the next layer), then the kept tokens, whether or
    not the model ran a forward asking for hidden states before it was wrapped: transformers
    installs its capturing hooks on the first such forward, and vtoken's stage hook ran before them
    when the model was wrapped first (block l's hidden state was then already pruned)."""
    model = VISION_FAMILIES[family].make()
    x = images()
    prefix = VISION_FAMILIES[family].prefix
    if asked_before_wrap:
        with torch.no_grad():
            model(pixel_values=x, output_hidden_states=True)
    with vtoken.pruned(model, "random", keep_tokens=PATCHES // 4, site="vision", layer=1), torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    lengths = [h.shape[1] for h in out.hidden_states]
    # the embeddings, blocks 0 and 1 in full; blocks 2.. on the kept tokens
    assert lengths == [prefix + PATCHES] * 3 + [prefix + PATCHES // 4] * (DEPTH - 2)


def test_a_hook_on_a_pruned_block_sees_its_output_whenever_it_was_registered():
    """A forward hook of the user's on block l sees what block l computed, registered before or
    after wrap; the stage after block l acts behind every such hook, and block l + 1 gets the kept
    tokens."""
    model = VISION_FAMILIES["timm"].make()
    seen = {}
    blocks_of(model)[1].register_forward_hook(lambda m, a, o: seen.__setitem__("before wrap", o.shape[1]))
    with vtoken.pruned(model, "random", keep_tokens=PATCHES // 4, site="vision", layer=1), torch.no_grad():
        blocks_of(model)[1].register_forward_hook(lambda m, a, o: seen.__setitem__("after wrap", o.shape[1]))
        blocks_of(model)[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("next block", a[0].shape[1]))
        model(images())
    assert seen == {"before wrap": 1 + PATCHES, "after wrap": 1 + PATCHES, "next block": 1 + PATCHES // 4}


def test_pool_after_a_stage_keeping_every_patch_by_count_runs_as_after_keep_all():
    """An earlier stage's keep_tokens equal to the image's patches keeps the grid whole, as keep=1.0
    does, so pool may follow it (it was refused at wrap as if that stage had pruned); one that cuts is
    refused in one line at the forward."""
    model, x = VISION_FAMILIES["timm"].make(), images()
    later = {"site": "vision", "layer": 2, "keep_tokens": PATCHES // 4}
    results = []
    for first in ({"keep": 1.0}, {"keep_tokens": PATCHES}):
        with vtoken.pruned(model, "pool", stages=[{"site": "vision", "layer": 0, **first}, later]), torch.no_grad():
            results.append(model(x))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    with vtoken.pruned(model, "pool", stages=[{"site": "vision", "layer": 0, "keep_tokens": PATCHES - 1}, later]):
        with pytest.raises(ValueError, match=r"pool needs the image's full patch grid, which an earlier stage already pruned"):
            model(x)


@pytest.mark.parametrize("method", ["random", "pool", "repshift"])
@pytest.mark.parametrize("rounding,kept", [("round", 59), ("floor", 58)])
def test_a_vision_stage_rounds_its_budget_as_asked(method, rounding, kept):
    """keep=0.3 of 196 patches is 58.8: 59 rounded, 58 floored (a vision stage rounded to the nearest
    whatever its ``rounding``), the same count ``StageSpec.budget`` gives."""
    from vtoken.config import StageSpec

    stage = {"site": "vision", "layer": 1, "keep": 0.3, "rounding": rounding}
    assert StageSpec(**stage).budget(PATCHES) == kept
    model = VISION_FAMILIES["timm"].make()
    with vtoken.pruned(model, method, stages=[stage]), torch.no_grad():
        model(images())
        assert {len(s["vision:1"]) for s in vtoken.selection(model)} == {kept}


@pytest.mark.parametrize("method", list(METHODS))
def test_an_empty_batch_runs_as_the_model(method):
    """A batch of no image gets the plain model's empty output (a stage raised a ValueError about
    keep_tokens and images of different sizes: the set of its crops' counts was empty)."""
    model = VISION_FAMILIES["timm"].make()
    empty = torch.zeros(0, 3, 112, 112)
    with torch.no_grad():
        plain = model(empty)
    with vtoken.pruned(model, _method(method), **METHODS[method]), torch.no_grad():
        model(images())
        assert model(empty).shape == plain.shape == (0, plain.shape[1])
        assert vtoken.selection(model) == []  # this call's: no image (not the previous call's three)
        model(images())  # and the next batch is pruned as ever
        assert len(vtoken.selection(model)) == 3


@pytest.mark.parametrize("method", ["visionzip", "tome", "repshift", "random", "pool"])
def test_a_timm_attention_of_another_layout_is_not_read_as_timm_attention(method):
    """timm's DiffAttention (``attn_layer="diff"``) has a fused qkv too, but two maps per head and a
    head_dim of half a head's width: vtoken read the second half of its query projection as the keys
    (VisionZip ran silently on that). The methods that read its attention (VisionZip, ToMe's keys) are
    refused in one line, the model unchanged; those that read only the blocks' outputs run."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                              attn_layer="diff").eval()
    options = {"r": 2} if method == "tome" else {"keep": 0.5}
    if method in ("visionzip", "tome"):
        hooks = _hooks(model)
        with pytest.raises(ValueError, match="Block blocks, which lack .*timm's Attention") as error:
            vtoken.wrap(model, method, **options)
        assert "\n" not in str(error.value) and not vtoken.is_wrapped(model) and _hooks(model) == hooks
        return
    with vtoken.pruned(model, method, **options), torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        assert {len(s["vision:0"]) for s in vtoken.selection(model)} == {8}


@pytest.mark.parametrize("family", ["clip_vision", "timm"])
def test_visionzip_vision_layer_alone_places_its_stage(family):
    """On a vision-only model VisionZip's vision_layer alone prunes after that layer (it was refused,
    naming the family's default layer as if the user had given it); a layer the tower lacks is named."""
    model = VISION_FAMILIES[family].make()
    with vtoken.pruned(model, "visionzip", keep=0.25, vision_layer=3), torch.no_grad():
        VISION_FAMILIES[family].embed(model, images())
        assert list(vtoken.selection(model)[0]) == ["vision:3"]
    with pytest.raises(ValueError, match=f"vision_layer={DEPTH} does not exist: the vision encoder has {DEPTH} layers"):
        vtoken.wrap(model, "visionzip", keep=0.25, vision_layer=DEPTH)
    assert not vtoken.is_wrapped(model)


def test_a_call_that_stops_before_the_last_block_records_its_selection():
    """timm's forward_intermediates(stop_early=True) never runs the last block, whose hook closes the
    encoding: vtoken.selection said no forward had run (or gave the previous call's), and the
    encoding stayed open. It is closed on the stages that ran."""
    model = VISION_FAMILIES["timm"].make()
    with vtoken.pruned(model, "random", keep_tokens=PATCHES // 4, site="vision", layer=0), torch.no_grad():
        model(images(batch=1))
        model.forward_intermediates(images(batch=3), indices=[1], stop_early=True, output_fmt="NLC", intermediates_only=True)
        selection = vtoken.selection(model)
        assert len(selection) == 3 and all(len(s["vision:0"]) == PATCHES // 4 for s in selection)
        assert vtoken.api._state(model).pruner.encoding is None


def test_site_none_names_the_vision_site_of_a_vision_only_model():
    """(it offered the projector and llm sites the model lacks)"""
    model = VISION_FAMILIES["timm"].make()
    with pytest.raises(ValueError, match=rf"site=None: timm ViT is a vision-only model; use site='vision' with layer=0..{DEPTH - 1}"):
        vtoken.wrap(model, "random", site=None, keep=0.5)
    assert not vtoken.is_wrapped(model)


def test_a_timm_attention_mask_for_the_embedded_tokens_is_refused_once_they_are_fewer():
    """timm's forward(x, attn_mask=..., is_causal=...) hands every block the caller's mask: once a
    stage has pruned or merged, it no longer fits (a raw shape error from timm's attention, or from
    ToMe's halves), and ToMe's size bias cannot run beside is_causal (SDPA's error). Keep-all runs
    with both, as the plain model."""
    pytest.importorskip("timm")
    model, x = VISION_FAMILIES["timm"].make(), images(2)
    tokens = model.patch_embed(x).shape[1] + model.num_prefix_tokens
    mask = torch.zeros(2, 1, tokens, tokens)
    mask[..., tokens // 2:] = float("-inf")
    with torch.no_grad():
        plain = model(x, attn_mask=mask)
        with vtoken.pruned(model, "random", keep=1.0):
            assert torch.equal(model(x, attn_mask=mask), plain)
        for method, call, message in (
                ("random", lambda: model(x, attn_mask=mask), rf"attn_mask covers the {tokens} tokens the model "
                                                             rf"embedded, but random has left \d+ by this block"),
                ("tome", lambda: model(x, attn_mask=mask), "attn_mask covers the"),
                ("tome", lambda: model(x, is_causal=True), "is_causal=True cannot run beside tome's size bias")):
            with vtoken.pruned(model, method), pytest.raises(ValueError, match=message) as error:
                call()
            assert "\n" not in str(error.value)
        assert torch.equal(model(x, attn_mask=mask), plain)
