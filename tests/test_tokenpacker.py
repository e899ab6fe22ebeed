"""TokenPacker: the packer's formulas on tensors where the answer is known by construction, the wrapped
model against a manual computation, and the training entry point (runs, checkpoints, resumes)."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import vtoken
from vtoken.signals import Needs, Signal
from vtoken.config import PruneConfig
from vtoken.packer import PackerConfig, TokenPackerModule, default_layers, point_queries, regions
from vtoken.packer_training import Encoder, answer_loss, build_packer, train_projector
from vtoken.registry import register
from vtoken.strategies.base import Strategy
from tiny import _vision, greedy_without_cache, llava_inputs, llava_next_inputs, tiny_llava, tiny_llava_next


def _packer(scale=2, residual=False, grid=(4, 4), seed=0, layers=(2, 3), vision_layers=4):
    torch.manual_seed(seed)
    config = PackerConfig(query_dim=32, level_dim=32, llm_hidden=64, layers=list(layers), scale=scale,
                          residual=residual, grid=list(grid), vision_layers=vision_layers)
    packer = TokenPackerModule(config).eval()
    with torch.no_grad():  # a non-trivial injection (the official init leaves biases at zero)
        for p in packer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return packer


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------------------ formulas
def test_default_layers_scale_the_official_choice():
    assert default_layers(23) == [12, 16, 22, 23]  # CLIP-L read at -2: the official list
    assert default_layers(3) == [2, 3]  # a 4-layer tower read at -2
    assert default_layers(11) == [6, 8, 11]


def test_point_queries_are_region_centre_samples():
    x = torch.arange(144, dtype=torch.float).view(1, 12, 12, 1)
    s2 = point_queries(x, 2)[0, ..., 0]
    assert torch.equal(s2, F.avg_pool2d(x.permute(0, 3, 1, 2), 2)[0, 0])  # 2x2 means
    s3 = point_queries(x, 3)[0, ..., 0]
    assert torch.equal(s3, x[0, 1::3, 1::3, 0])  # the centre patch
    s4 = point_queries(x, 4)[0, ..., 0]
    assert torch.equal(s4, F.avg_pool2d(x[:, 1:, 1:].permute(0, 3, 1, 2), 2, stride=4)[0, 0])  # central 2x2
    # A 5x5 grid at s=2: regions of rows/cols [0,1], [2,3], [4]; a partial region samples its real centre.
    y = torch.randn(1, 5, 5, 3)
    q = point_queries(y, 2)
    assert q.shape == (1, 3, 3, 3)
    assert torch.allclose(q[0, 2, 2], y[0, 4, 4])
    assert torch.allclose(q[0, 0, 2], (y[0, 0, 4] + y[0, 1, 4]) / 2)
    assert torch.allclose(q[0, 1, 1], y[0, 2:4, 2:4].mean(dim=(0, 1)))


def test_regions_group_cells_and_mask_padding():
    x = torch.arange(15, dtype=torch.float).view(1, 3, 5, 1)
    cells, pad = regions(x, 2)  # 2 x 3 regions
    assert cells.shape == (6, 4, 1) and pad.shape == (6, 4)
    assert cells[0, :, 0].tolist() == [0, 1, 5, 6]
    assert cells[4, :, 0].tolist()[:2] == [12, 13] and pad[4].tolist() == [False, False, True, True]
    assert cells[5, 0, 0] == 14 and pad[5].tolist() == [False, True, True, True]
    assert not pad[:2].any() and pad[2].tolist() == [False, True, False, True]  # column 5 is padding


@pytest.mark.parametrize("scale,expected", [(2, 36), (3, 16), (4, 9)])
def test_output_has_one_token_per_region(scale, expected):
    packer = _packer(scale, grid=(12, 12))
    out = packer(torch.randn(2, 12, 12, 32), torch.randn(2, 12, 12, 64))
    assert out.shape == (2, expected, 64) and expected == 144 // scale**2
    # Not divisible: a 5x7 grid gives ceil(5/s) * ceil(7/s) tokens (3x4, 2x3, 2x2).
    expected = {2: 12, 3: 6, 4: 4}[scale]
    assert packer.config.tokens(5, 7) == expected
    assert packer(torch.randn(1, 5, 7, 32), torch.randn(1, 5, 7, 64)).shape == (1, expected, 64)


def test_scale_one_with_zeroed_injection_is_the_plain_projector():
    model = tiny_llava()
    projector = model.model.multi_modal_projector
    packer = build_packer(model, scale=1, init="projector")  # residual, MLP copied, injection zeroed
    features = torch.randn(3, 4, 4, 32)
    levels = torch.randn(3, 4, 4, 64)
    with torch.no_grad():
        out = packer(features, levels)
        assert out.shape == (3, 16, 64)
        assert torch.equal(out, projector(features.reshape(3, 16, 32)))
        # At s=2 the same packer is "2x2 mean, then the projector".
        two = build_packer(model, scale=2, init="projector")
        pooled = F.avg_pool2d(features.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).reshape(3, 4, 32)
        assert torch.allclose(two(features, levels), projector(pooled), atol=1e-6)
    # The official initialisation has no residual and a live injection: not the projector.
    assert not build_packer(model, scale=1, init="random").config.residual


def test_the_default_packer_is_the_published_architecture():
    """``build_packer``'s default (``init="random"``) is the official ``TokenPacker`` as built: no
    residual, every Linear trunc-normal(0.02) with zero biases (the attention's out-projection included),
    LayerNorms 1/0, the output MLP not copied from the model's projector, a live injection."""
    model = tiny_llava()
    packer = build_packer(model, scale=2)
    assert not packer.config.residual
    reference = build_packer(model, scale=2, init="random")
    assert all(torch.equal(a, b) for a, b in zip(packer.state_dict().values(), reference.state_dict().values()))
    linears = [m for m in packer.modules() if isinstance(m, torch.nn.Linear)]
    assert packer.attn.out_proj in linears
    for linear in linears:
        assert 0.01 < float(linear.weight.detach().std()) < 0.03
        assert linear.bias is None or not linear.bias.any()
    norms = [m for m in packer.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3 and all(bool((n.weight == 1).all()) and not n.bias.any() for n in norms)
    projector = model.model.multi_modal_projector
    assert not torch.equal(packer.mlp[0].weight, projector.linear_1.weight)
    assert packer.attn.out_proj.weight.abs().sum() > 0
    # vtoken's variant, by name only: the residual, the projector's MLP, the injection zeroed.
    variant = build_packer(model, scale=2, init="projector")
    assert variant.config.residual and torch.equal(variant.mlp[0].weight, projector.linear_1.weight)
    assert not variant.attn.out_proj.weight.any()


@pytest.mark.parametrize("scale", [2, 3])
def test_the_shipped_packers_say_which_recipe_trained_them(scale):
    """The packers shipped for the tiny LLaVA were trained from ``init="projector"`` (vtoken's residual
    variant, not the published architecture): their config, their training arguments and the README of
    their folder agree on it."""
    root = os.path.join(os.path.dirname(vtoken.__file__), "assets", "tiny-llava-trained")
    folder = os.path.join(root, f"tokenpacker-s{scale}")
    args = json.load(open(os.path.join(folder, "training_args.json")))
    packer = TokenPackerModule.from_pretrained(folder)
    assert (args["init"], args["residual"], args["stage"], args["scale"]) == ("projector", True, 1, scale)
    assert packer.config.residual and packer.config.scale == scale
    readme = open(os.path.join(root, "README.md")).read()
    assert f"tokenpacker-s{scale}" in readme and 'init="projector"' in readme
    assert "not the published TokenPacker architecture" in readme


@pytest.mark.parametrize("scale,grid", [(2, (4, 6)), (3, (4, 4))])
def test_each_query_sees_only_its_own_region(scale, grid):
    packer = _packer(scale, grid=grid)
    h, w = grid
    query, levels = torch.randn(1, h, w, 32), torch.randn(1, h, w, 64)
    with torch.no_grad():
        base = packer(query, levels)
        gw = -(-w // scale)
        for (row, col) in [(0, 0), (h - 1, w - 1), (scale, 1)]:
            region = (row // scale) * gw + col // scale
            others = [r for r in range(base.shape[1]) if r != region]
            for which in ("query", "levels"):
                q2, l2 = query.clone(), levels.clone()
                (q2 if which == "query" else l2)[0, row, col] += 3.0
                out = packer(q2, l2)
                assert torch.equal(out[:, others], base[:, others])
                if which == "levels" or scale == 2:  # at s=3 the query samples the centre patch only
                    assert not torch.allclose(out[:, region], base[:, region])


def test_partial_regions_attend_to_their_real_patches_only():
    # A 3x3 grid at s=2: region 1 holds patches (0,2), (1,2); region 3 holds (2,2) alone. Each must
    # equal the attention of its query over exactly those keys (padding never attended).
    packer = _packer(2, grid=(3, 3))
    query, levels = torch.randn(1, 3, 3, 32), torch.randn(1, 3, 3, 64)
    with torch.no_grad():
        out = packer(query, levels)
        for region, cells, point in [(1, [(0, 2), (1, 2)], (query[0, 0, 2] + query[0, 1, 2]) / 2),
                                     (3, [(2, 2)], query[0, 2, 2])]:
            kv = torch.stack([levels[0, r, c] for r, c in cells])[None]
            q = packer.ln_q(packer.q_proj(point))[None, None]
            k, v = packer.ln_k(packer.k_proj(kv)), packer.ln_v(packer.v_proj(kv))
            expected = packer.mlp(packer.attn(q, k, v, need_weights=False)[0])[0, 0]
            assert torch.allclose(out[0, region], expected, atol=1e-6)


def test_save_and_load_round_trip_is_bit_identical(tmp_path):
    packer = _packer(3)
    packer.save_pretrained(tmp_path)
    loaded = TokenPackerModule.from_pretrained(tmp_path)
    assert json.load(open(tmp_path / "packer_config.json"))["scale"] == 3
    assert loaded.config == packer.config
    ours, theirs = packer.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x, y = torch.randn(2, 4, 4, 32), torch.randn(2, 4, 4, 64)
    with torch.no_grad():
        assert torch.equal(packer(x, y), loaded(x, y))


# ------------------------------------------------------------------------------ wrapping
@dataclasses.dataclass
class _VisionProbeConfig(PruneConfig):
    method = "_test_projector_sees_vision"


@register
class _VisionProbe(Strategy):
    """Test-only: at the projector site, records the vision observations the context aligns with its rows."""

    name = "_test_projector_sees_vision"
    Config = _VisionProbeConfig
    seen: dict = {}

    def needs(self):
        return Needs.of(Signal("projector_input"), Signal("vision_observed", 0), Signal("vision_observed", 2))

    def observe(self, site, layer, io, valid):
        return io["block"][1]

    def score(self, ctx):
        if ctx.stage.site == "projector":
            type(self).seen.update(rows=ctx.tokens, input=ctx.projector_input, early=ctx.observed(0), late=ctx.observed(2))
        return -torch.arange(ctx.tokens.valid.shape[1], dtype=torch.float).expand_as(ctx.tokens.valid)


@pytest.mark.parametrize("make,inputs,stages", [
    (tiny_llava, lambda m: llava_inputs(2), [{"site": "vision", "layer": 1, "keep": 0.75}, {"site": "projector", "keep": 0.5}]),
    (tiny_llava_next, llava_next_inputs, [{"site": "projector", "keep": 0.5}]),
])
def test_projector_site_observations_come_from_the_vision_encoder(make, inputs, stages):
    # The projector input is hidden state -2, the output of vision layer 2 of 4: the observation of
    # layer 2 must equal it on every row, through the same crop/grid bookkeeping (a vision stage at
    # layer 1 before it, NeXT's crops and newlines).
    model = make()
    x = inputs(model)
    with torch.no_grad():
        pixels = x["pixel_values"]
        pixels = pixels.reshape(-1, *pixels.shape[-3:])
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    with vtoken.pruned(model, "_test_projector_sees_vision", stages=stages):
        with torch.no_grad():
            model(**x)
    seen = _VisionProbe.seen
    valid = seen["rows"].valid
    patch = valid & (seen["input"].abs().sum(-1) > 0)
    assert patch.sum() > 0
    assert torch.equal(seen["late"][patch], seen["input"][patch])
    assert not seen["late"][valid & ~patch].any()  # NeXT newlines have no encoder token
    if make is tiny_llava:  # layer 0 ran before the vision stage: the unwrapped hidden state of the kept 12
        assert torch.allclose(seen["early"][:, :12], hidden[1][:, 1:13], atol=1e-6)


def test_wrap_refuses_bad_setups_and_leaves_the_model_unchanged(tmp_path):
    model = tiny_llava()
    x = llava_inputs(2)
    with torch.no_grad():
        ref = model(**x).logits
    snap, hooks = _snapshot(model), _hooks(model)  # after a forward (transformers adds its own hooks then)
    _packer(2).save_pretrained(tmp_path / "s2")
    _packer(2, vision_layers=12).save_pretrained(tmp_path / "deep")
    cases = [
        ({}, r"trained projector and needs its weights: train them with vtoken.train_projector"),
        ({"weights": str(tmp_path / "missing")}, "no TokenPacker weights"),
        ({"weights": str(tmp_path / "s2"), "keep": 0.5}, r"gives 4 tokens per image .* drop keep/keep_tokens"),
        ({"weights": str(tmp_path / "s2"), "keep_tokens": 5}, "pass keep_tokens=4"),
        ({"weights": str(tmp_path / "s2"), "scale": 3}, "trained at scale 2"),
        ({"weights": str(tmp_path / "s2"), "site": "llm", "layer": 1}, "cannot prune at the 'llm' site"),
        ({"weights": str(tmp_path / "deep")}, "trained with a 12-layer vision tower"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            vtoken.wrap(model, "tokenpacker", **options)
        assert not vtoken.is_wrapped(model) and _hooks(model) == hooks
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**x).logits, ref)
    # The budget may be given when it matches the scale.
    with vtoken.pruned(model, "tokenpacker", weights=str(tmp_path / "s2"), keep=0.25):
        pass


def test_methods_reports_a_trained_projector_site_method():
    listed = {m["name"]: m for m in vtoken.methods()}["tokenpacker"]
    assert listed["trained"] and listed["sites"] == ["projector"]
    assert listed["options"]["weights"] is None and listed["options"]["positions"] == "contiguous"


def test_the_llm_receives_the_packed_tokens():
    model = tiny_llava()
    x = llava_inputs(3)
    packer = _packer(2)
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"], seen["positions"] = kwargs["inputs_embeds"], kwargs["position_ids"]

    with torch.no_grad():
        hidden = model.model.vision_tower(x["pixel_values"], output_hidden_states=True).hidden_states
        expected = packer(hidden[3][:, 1:].reshape(3, 4, 4, 32),
                          torch.cat([hidden[2][:, 1:], hidden[3][:, 1:]], -1).reshape(3, 4, 4, 64))
    with vtoken.pruned(model, "tokenpacker", weights=packer):
        handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        with torch.no_grad():
            model(**x)
        handle.remove()
        assert [s["projector"].tolist() for s in vtoken.selection(model)] == [[0, 2, 8, 10]] * 3
        schedule = vtoken.schedule_of(model)
    assert schedule.stages[0].keep_tokens == 4 and schedule.scoring[0].flops == packer.flops(4, 4)
    assert seen["embeds"].shape[1] == x["input_ids"].shape[1] - 12
    for b in range(3):
        first = int((x["input_ids"][b] == 99).nonzero()[0])  # text before the image keeps its slots
        assert torch.allclose(seen["embeds"][b, first:first + 4], expected[b], atol=1e-6)
        positions = seen["positions"][b, first - 1:first + 5]  # contiguous: the image is 4 tokens long
        assert torch.equal(positions - positions[0], torch.arange(6))


@pytest.mark.parametrize("scale,positions", [(2, "contiguous"), (3, "original")])
def test_generate_on_a_padded_batch_cached_equals_uncached(scale, positions):
    model = tiny_llava()
    x = llava_inputs(3)
    with torch.no_grad():
        ref = model(**x).logits
    with vtoken.pruned(model, "tokenpacker", weights=_packer(scale), positions=positions):
        cached = model.generate(**x, max_new_tokens=5, do_sample=False)
        anchors = [s["projector"].tolist() for s in vtoken.selection(model)]
        uncached = greedy_without_cache(model, x, 5)
    assert anchors == [[0, 2, 8, 10] if scale == 2 else [0, 3, 12, 15]] * 3  # s=3: 2x2 regions, padded
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, ref)  # unwrapped: exactly the original


def test_llava_next_is_refused_at_wrap_time_with_a_clear_error():
    model = tiny_llava_next()
    x = llava_next_inputs(model)
    with torch.no_grad():
        ref = model(**x).logits
    with pytest.raises(ValueError, match="tokenpacker needs each image.*LLaVA-NeXT AnyRes.*pool, fastv"):
        vtoken.wrap(model, "tokenpacker", weights=_packer(2))
    assert not vtoken.is_wrapped(model)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, ref)


def test_full_feature_strategy_is_refused_at_wrap_time():
    model = tiny_llava()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="CLS token besides the grid.*'default'"):
        vtoken.wrap(model, "tokenpacker", weights=_packer(2))
    assert not vtoken.is_wrapped(model)
    # vtoken.methods() says LLaVA-1.5 runs TokenPacker, and names such models in its limits.
    listed = {m["name"]: m for m in vtoken.methods()}["tokenpacker"]
    assert listed["families"]["LLaVA-1.5"] == "runs" and "'full'" in listed["limits"]["LLaVA-1.5"]


# ------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def vqa():
    """A tiny random LLaVA over the benchmark's tokenizer, its image processor and 4 generated records."""
    from transformers import CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vtoken.vqa.data import generate
    from vtoken.vqa.tokenizer import IMAGE, build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=_vision(), text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
    model = LlavaForConditionalGeneration(config).eval()
    processor = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False,
                                   crop_size={"height": 32, "width": 32})
    return model, tokenizer, processor, generate("train", 4, image_size=32, patch_size=8)


def test_training_loss_is_the_answer_loss_of_the_packed_sequence(vqa):
    model, tokenizer, processor, records = vqa
    image = model.config.image_token_id
    batch = Encoder(tokenizer, processor, 16, image)(records[:3])
    packer = _packer(2)
    with vtoken.pruned(model, "tokenpacker", weights=packer):
        with torch.no_grad():
            loss = answer_loss(model, batch, image)
    # The same by hand: 4 image tokens per sample carrying the packed features, consecutive positions.
    with torch.no_grad():
        hidden = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        packed = packer(hidden[3][:, 1:].reshape(3, 4, 4, 32),
                        torch.cat([hidden[2][:, 1:], hidden[3][:, 1:]], -1).reshape(3, 4, 4, 64))
        keep = torch.ones_like(batch["input_ids"], dtype=torch.bool)
        for b in range(3):
            first = int((batch["input_ids"][b] == image).nonzero()[0])
            keep[b, first + 4:first + 16] = False
        ids, labels = batch["input_ids"][keep].view(3, -1), batch["labels"][keep].view(3, -1)
        mask = batch["attention_mask"][keep].view(3, -1)
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == image] = packed.reshape(-1, 64)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        manual = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels).loss
    assert torch.allclose(loss, manual, atol=1e-5)
    # Unwrapped, it is the model's own labelled loss.
    with torch.no_grad():
        plain = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values", "labels")}).loss
        assert torch.allclose(answer_loss(model, batch, image), plain, atol=1e-6)


def test_train_projector_runs_checkpoints_and_resumes(vqa, tmp_path):
    model, tokenizer, processor, records = vqa
    snap = _snapshot(model)
    options = dict(processor=(tokenizer, processor), steps=3, batch_size=2, save_every=1, scale=2, progress=False)
    packer = train_projector(model, records, out=tmp_path / "a", **options)
    assert not vtoken.is_wrapped(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())  # stage 1 leaves the model alone
    assert sorted(os.listdir(tmp_path / "a")) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3", "log.jsonl", "packer.safetensors", "packer_config.json",
        "training_args.json",
    ]
    args = json.load(open(tmp_path / "a" / "training_args.json"))
    assert (args["init"], args["residual"]) == ("random", False)  # the published architecture by default
    assert not packer.config.residual
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    assert any(not torch.equal(a, b) for a, b in zip(packer.parameters(), build_packer(model, 2).parameters()))
    # Resume from step 2 in a fresh directory: the final weights equal the uninterrupted run's.
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = train_projector(model, records, out=tmp_path / "b", **options)
    assert json.load(open(tmp_path / "b" / "training_args.json"))["started_at_step"] == 2
    assert [json.loads(line)["step"] for line in open(tmp_path / "b" / "log.jsonl")] == [3]
    assert all(torch.equal(a, b) for a, b in zip(packer.state_dict().values(), resumed.state_dict().values()))
    # A checkpoint made on other base weights is refused, not silently resumed; the model is untouched.
    original = model.lm_head.weight[0, 0].item()
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    changed = _snapshot(model)
    with pytest.raises(ValueError, match="other weights"):
        train_projector(model, records, out=tmp_path / "b", **dict(options, steps=4))
    assert all(torch.equal(v, changed[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.lm_head.weight[0, 0] = original
    # The trained weights wrap and generate.
    from vtoken.vqa.tokenizer import IMAGE, prompt

    tokenizer.padding_side = "left"
    texts = [prompt(r["question"]).replace(IMAGE, IMAGE * 16) for r in records[:3]]
    inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
    inputs["pixel_values"] = processor(images=[r["pil"] for r in records[:3]], return_tensors="pt")["pixel_values"]
    with vtoken.pruned(model, "tokenpacker", weights=str(tmp_path / "a")):
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        uncached = greedy_without_cache(model, inputs, 3)
    width = cached.shape[1]  # generate() stops once every sample has ended
    assert torch.equal(cached, uncached[:, :width]) and bool((uncached[:, width:] == tokenizer.pad_token_id).all())


def test_stage_two_also_trains_the_llm(vqa, tmp_path):
    model, tokenizer, processor, records = vqa
    model = type(model)(model.config).eval()  # a copy to change
    model.load_state_dict(vqa[0].state_dict())
    before = _snapshot(model)
    options = dict(processor=(tokenizer, processor), batch_size=2, progress=False)
    train_projector(model, records, out=tmp_path / "s1", steps=1, **options)
    train_projector(model, records, out=tmp_path / "s2", steps=1, stage=2, lr=1e-3, init=str(tmp_path / "s1"), **options)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(("model.language_model.", "lm_head.")) for k in changed)
    assert os.path.isfile(tmp_path / "s2" / "model" / "config.json")
    assert os.path.isfile(tmp_path / "s2" / "checkpoint-1" / "llm.safetensors")


def test_cli_trains_from_a_model_directory(vqa, tmp_path):
    from transformers import LlavaProcessor

    from vtoken.cli import main
    from vtoken.vqa.tokenizer import IMAGE

    model, tokenizer, processor, _ = vqa
    model.save_pretrained(tmp_path / "model")
    LlavaProcessor(image_processor=processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, image_token=IMAGE).save_pretrained(tmp_path / "model")
    argv = ["train-projector", "--model", str(tmp_path / "model"), "--data", "generated", "--n", "4", "--scale", "3",
            "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "out"), "--cpu"]
    assert main(argv) == 0
    packer = TokenPackerModule.from_pretrained(tmp_path / "out")
    assert packer.config.scale == 3 and packer.config.grid == [4, 4] and packer.config.layers == [2, 3]
    assert os.path.isdir(tmp_path / "out" / "checkpoint-2")
    # `--init` defaults to the published architecture (no residual); `--init projector` is the variant.
    assert not packer.config.residual
    assert json.load(open(tmp_path / "out" / "training_args.json"))["init"] == "random"
    variant = ["train-projector", "--model", str(tmp_path / "model"), "--data", "generated", "--n", "4", "--scale", "3",
               "--steps", "1", "--batch-size", "2", "--init", "projector", "--out", str(tmp_path / "variant"), "--cpu"]
    assert main(variant) == 0
    assert TokenPackerModule.from_pretrained(tmp_path / "variant").config.residual


def test_train_projector_refuses_bad_numbers_before_touching_the_model_and_restores_it_after_a_failure(
        vqa, tmp_path, monkeypatch):
    """A negative lr (AdamW's error) came after every parameter was frozen, and left them frozen; a
    float batch size or log_every=0 failed inside the loop after files were written. Now each is one
    line before anything, and a failure once training is set up gives the caller's model back as it
    was (its requires_grad flags, its mode)."""
    model, tokenizer, processor, records = vqa
    options = dict(processor=(tokenizer, processor), steps=1, batch_size=2, progress=False)
    for bad, message in (({"lr": -1.0}, "lr must be a positive number, got -1.0"),
                         ({"weight_decay": -0.1}, r"weight_decay must be a number in \[0, inf\), got -0.1"),
                         ({"batch_size": 2.5}, "batch_size must be a whole number >= 1, got 2.5"),
                         ({"log_every": 0}, "log_every must be a whole number >= 1, got 0"),
                         ({"steps": 1.5}, "steps must be a whole number >= 1, got 1.5"),
                         ({"layers": []}, "layers=\\[\\] names no vision layer")):
        with pytest.raises(ValueError, match=message):
            train_projector(model, records, out=tmp_path / "bad", **{**options, **bad})
        assert not (tmp_path / "bad").exists()
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)  # the caller's own flags, restored as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(torch.optim, "AdamW", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_projector(model, records, out=tmp_path / "oom", **options)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    assert not vtoken.is_wrapped(model)
    model.get_input_embeddings().weight.requires_grad_(True)
    model.eval()
