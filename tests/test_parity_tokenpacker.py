"""Parity of ``tokenpacker`` (``vtoken.packer.TokenPackerModule`` and the projector-site strategy) with the
official TokenPacker, on a random model with LLaVA-1.5's shape (24-layer CLIP tower, 24 x 24 patch grid).

Official code followed (CircleRadon/TokenPacker, ``main`` at 771a16e7462c3afb908a0c429513ba43f709f2c1; the
``llava-tokenpacker`` branch, c96a59add7af34a529b6d6ec2d37a8159e87728e, differs only by hard-coding
``scale_factor = 2`` and the 4096 widths):

- ``llava/model/multimodal_projector/builder.py``, class ``TokenPacker``: ``q_proj_1`` (Linear without
  bias) on the bilinearly downsampled (``F.interpolate(..., mode='bilinear')``, align_corners False, in
  fp32) single-level features, then ``ln_q_1``; ``k_proj_1`` / ``v_proj_1`` = Linear-GELU-Linear on the
  concatenated multi-level features, then ``ln_k_1`` / ``ln_v_1`` (LayerNorm eps 1e-6);
  ``clip_attn = nn.MultiheadAttention(embed_dim, num_heads)`` (sequence-first) of each point query over
  the ``s*s`` keys of its own region, regions folded into the batch (``divide_feature``); no residual, no
  FFN; ``mlp`` = Linear-GELU-Linear to the LLM width. The reference below re-implements that module
  with the hard-coded widths (1024, 4096 = 4 x 1024, 8 heads) as parameters, and loads vtoken's weights
  by renaming (``q_proj`` -> ``q_proj_1``, ``attn`` -> ``clip_attn``, ...).
- ``llava/model/multimodal_encoder/clip_encoder.py``, ``feature_select``: the multi-level input is
  ``cat(hidden_states[l] for l in [12, 16, 22, 23])`` and the query source ``hidden_states[-2]``
  (``mm_vision_select_layer``), both without CLS (``'patch'``).
- The LLM then receives the ``(24/s)^2`` packed tokens in place of the image (the image is that many
  tokens long, so positions are consecutive).

vtoken records, as the stage's kept indices, the top-left patch of each ``s x s`` region (row-major).
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vtoken
from llava15_shape import GRID, IMAGE_TOKEN, VISUAL_TOKENS, llava15_inputs, llava15_shaped
from vtoken.packer import PackerConfig, TokenPackerModule

OFFICIAL_LAYERS = [12, 16, 22, 23]

# ------------------------------------------------------------------------------------------------
# Independent reference


class RefTokenPacker(nn.Module):
    """The official ``TokenPacker`` with its hard-coded widths as parameters."""

    def __init__(self, raw_grid, query_dim, kv_dim, embed_dim, num_heads, hidden_size, scale_factor):
        super().__init__()
        assert raw_grid % scale_factor == 0
        self.raw_grid, self.scale_factor = raw_grid, scale_factor
        self.grid_size = raw_grid // scale_factor
        self.num_queries = self.grid_size**2
        norm = lambda: nn.LayerNorm(embed_dim, eps=1e-6)  # noqa: E731
        self.q_proj_1 = nn.Linear(query_dim, embed_dim, bias=False)
        self.k_proj_1 = nn.Sequential(nn.Linear(kv_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.v_proj_1 = nn.Sequential(nn.Linear(kv_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.ln_q_1, self.ln_k_1, self.ln_v_1 = norm(), norm(), norm()
        self.clip_attn = nn.MultiheadAttention(embed_dim, num_heads)  # sequence-first, as the official
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def fold_regions(self, x, k):
        """``[h*w, N, c]`` (row-major grid) -> ``[k*k, (h/k)*(w/k)*N, c]``: each ``k x k`` region becomes
        one batch entry (regions row-major, then the image), its cells the sequence."""
        side = int(x.shape[0] ** 0.5)
        n, c = x.shape[1:]
        x = x.reshape(side // k, k, side // k, k, n, c).permute(1, 3, 0, 2, 4, 5)
        return x.reshape(k * k, -1, c)

    def forward(self, x, x_multi):
        key = self.ln_k_1(self.k_proj_1(x_multi)).permute(1, 0, 2)  # [T, N, E]
        value = self.ln_v_1(self.v_proj_1(x_multi)).permute(1, 0, 2)
        n = x.shape[0]
        grid = x.reshape(n, self.raw_grid, self.raw_grid, -1).float().permute(0, 3, 1, 2)
        q = F.interpolate(grid, size=(self.grid_size, self.grid_size), mode="bilinear").permute(0, 2, 3, 1)
        q = q.reshape(n, -1, q.shape[-1]).to(x.dtype)
        query = self.ln_q_1(self.q_proj_1(q)).permute(1, 0, 2)  # [M, N, E]
        out = self.clip_attn(
            query.reshape(1, -1, query.shape[-1]),  # one query per (region, image)
            self.fold_regions(key, self.scale_factor),
            self.fold_regions(value, self.scale_factor),
        )[0]
        out = out.reshape(self.num_queries, n, -1).permute(1, 0, 2)
        return self.mlp(out)


RENAME = {"q_proj.": "q_proj_1.", "k_proj.": "k_proj_1.", "v_proj.": "v_proj_1.", "ln_q.": "ln_q_1.",
          "ln_k.": "ln_k_1.", "ln_v.": "ln_v_1.", "attn.": "clip_attn.", "mlp.": "mlp."}


def reference_from(packer: TokenPackerModule) -> RefTokenPacker:
    cfg = packer.config
    ref = RefTokenPacker(GRID, cfg.query_dim, cfg.kv_dim, cfg.embed_dim, cfg.num_heads, cfg.llm_hidden, cfg.scale)
    state = {}
    for name, tensor in packer.state_dict().items():
        prefix = next(p for p in RENAME if name.startswith(p))
        state[RENAME[prefix] + name[len(prefix):]] = tensor
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def official_inputs(model, pixels):
    """``feature_select``: (hidden state -2, cat of hidden states [12, 16, 22, 23]), CLS dropped."""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    x = hidden[model.config.vision_feature_layer][:, 1:]
    x_multi = torch.cat([hidden[l] for l in OFFICIAL_LAYERS], dim=-1)[:, 1:]
    return x, x_multi


def ref_last_logits(model, ids, mask, packed):
    """One sample alone, unpadded: the image replaced by the packed tokens at consecutive positions."""
    ids = ids[mask.bool()]
    first = int((ids == IMAGE_TOKEN).nonzero()[0])
    embed = model.get_input_embeddings()
    seq = torch.cat([embed(ids[:first]), packed, embed(ids[first + VISUAL_TOKENS:])])[None]
    hidden = model.model.language_model(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1])[None]).last_hidden_state
    return model.lm_head(hidden[:, -1])[0]


def anchors(scale):
    return [r * GRID + c for r in range(0, GRID, scale) for c in range(0, GRID, scale)]


# ------------------------------------------------------------------------------------------------


def make_packer(scale, seed=0):
    """A randomly initialised packer for the LLaVA-1.5-shaped model (vision width 32, LLM 64): attention
    as wide as the query source (the official 1024 = CLIP-L's width) in 4 heads of 8 (the official 8 of
    128), with noise on every parameter so biases and LayerNorms are not trivial."""
    torch.manual_seed(seed)
    config = PackerConfig(query_dim=32, level_dim=32, llm_hidden=64, layers=list(OFFICIAL_LAYERS), scale=scale,
                          embed_dim=32, num_heads=4, grid=[GRID, GRID], vision_layers=24)
    packer = TokenPackerModule(config).eval()
    with torch.no_grad():
        for p in packer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return packer


@pytest.fixture(scope="module")
def model():
    return llava15_shaped()


@pytest.fixture(scope="module")
def inputs():
    return llava15_inputs(2)


@pytest.fixture(scope="module")
def packers():
    return {s: make_packer(s) for s in (2, 3)}


def run_vtoken(model, x, packer):
    seen = {}

    def grab(module, args, kwargs):  # what the first decoder layer receives: the sequence the LLM runs on
        seen["embeds"] = (args[0] if args else kwargs["hidden_states"]).clone()

    handle = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vtoken.pruned(model, "tokenpacker", weights=packer):
            with torch.no_grad():
                logits = model(**x).logits[:, -1]
            selection = [s["projector"] for s in vtoken.selection(model)]
    finally:
        handle.remove()
    return selection, seen["embeds"], logits


@pytest.mark.parametrize("scale", [2, 3])
def test_packer_module_equals_the_official_module(packers, scale):
    packer = packers[scale]
    ref = reference_from(packer)
    torch.manual_seed(1)
    query, levels = torch.randn(2, GRID, GRID, 32), torch.randn(2, GRID, GRID, 128)
    with torch.no_grad():
        got = packer(query, levels)
        want = ref(query.reshape(2, VISUAL_TOKENS, 32), levels.reshape(2, VISUAL_TOKENS, 128))
    assert got.shape == want.shape == (2, (GRID // scale) ** 2, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [2, 3])
def test_wrapped_model_packs_as_the_official_projector(model, inputs, packers, scale):
    packer = packers[scale]
    selection, embeds, logits = run_vtoken(model, inputs, packer)
    with torch.no_grad():
        x, x_multi = official_inputs(model, inputs["pixel_values"])
        packed = reference_from(packer)(x, x_multi)  # [2, M, 64]
    m = (GRID // scale) ** 2
    for b in range(2):
        assert selection[b].tolist() == anchors(scale)
        first = int((inputs["input_ids"][b] == IMAGE_TOKEN).nonzero()[0])
        assert embeds.shape[1] == inputs["input_ids"].shape[1] - VISUAL_TOKENS + m
        torch.testing.assert_close(embeds[b, first:first + m], packed[b], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            want = ref_last_logits(model, inputs["input_ids"][b], inputs["attention_mask"][b], packed[b])
        torch.testing.assert_close(logits[b], want, rtol=1e-4, atol=1e-4)


def test_every_level_matters_to_the_reference(model, inputs, packers):
    # Guards against a vacuous comparison: dropping any one level (its channels replaced by the next
    # level's) changes the reference's output.
    ref = reference_from(packers[2])
    with torch.no_grad():
        x, x_multi = official_inputs(model, inputs["pixel_values"][:1])
        full = ref(x, x_multi)
        for i in range(len(OFFICIAL_LAYERS)):
            j = (i + 1) % len(OFFICIAL_LAYERS)
            changed = x_multi.clone()
            changed[..., 32 * i:32 * (i + 1)] = x_multi[..., 32 * j:32 * (j + 1)]
            assert not torch.allclose(ref(x, changed), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [2, 3])
def test_each_sample_packs_the_same_in_a_batch_as_alone(model, inputs, packers, scale):
    selection, embeds, logits = run_vtoken(model, inputs, packers[scale])
    m = (GRID // scale) ** 2
    for b in range(2):
        real = inputs["attention_mask"][b].bool()
        alone = {"input_ids": inputs["input_ids"][b:b + 1, real], "attention_mask": inputs["attention_mask"][b:b + 1, real],
                 "pixel_values": inputs["pixel_values"][b:b + 1]}
        single, single_embeds, single_logits = run_vtoken(model, alone, packers[scale])
        assert torch.equal(single[0], selection[b])
        first = int((inputs["input_ids"][b] == IMAGE_TOKEN).nonzero()[0])
        first_alone = int((alone["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
        torch.testing.assert_close(single_embeds[0, first_alone:first_alone + m], embeds[b, first:first + m],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(single_logits[0], logits[b], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale,fmt", [(2, "bin"), (3, "safetensors")])
def test_a_released_checkpoint_loads_by_its_official_names(tmp_path, scale, fmt):
    """``TokenPackerModule.from_official`` reads the official class's parameter names (as a released
    ``mm_projector.bin`` holds them, under ``model.mm_projector.``) and packs exactly as it does."""
    torch.manual_seed(3)
    ref = RefTokenPacker(GRID, 32, 128, 32, 4, 64, scale).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {f"model.mm_projector.{k}": v.clone() for k, v in ref.state_dict().items()}
    path = tmp_path / f"mm_projector.{fmt}"
    if fmt == "bin":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    packer = TokenPackerModule.from_official(path, scale=scale, layers=OFFICIAL_LAYERS, num_heads=4)
    assert (packer.config.query_dim, packer.config.level_dim, packer.config.llm_hidden) == (32, 32, 64)
    query, levels = torch.randn(2, GRID, GRID, 32), torch.randn(2, GRID, GRID, 128)
    with torch.no_grad():
        got = packer(query, levels)
        want = ref(query.reshape(2, VISUAL_TOKENS, 32), levels.reshape(2, VISUAL_TOKENS, 128))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not a parameter of the official TokenPacker projector"):
        TokenPackerModule.from_official({"model.mm_projector.proj.weight": torch.zeros(1)})


def test_official_names_round_trip_from_a_whole_model_state_dict(tmp_path, packers):
    """A released TokenPacker model is a whole LLaVA checkpoint: its shards hold the projector as
    ``model.mm_projector.<official name>`` beside the LLM's and the vision tower's weights.
    ``from_official`` reads the projector out of such a state dict (or file) and gives back, renamed one to
    one, exactly the weights it was made from."""
    packer = packers[3]
    state = {"model.embed_tokens.weight": torch.randn(10, 64), "model.layers.0.mlp.up_proj.weight": torch.randn(8, 64),
             "model.vision_tower.vision_tower.vision_model.post_layernorm.weight": torch.ones(32)}
    for name, tensor in packer.state_dict().items():
        prefix = next(p for p in RENAME if name.startswith(p))
        state["model.mm_projector." + RENAME[prefix] + name[len(prefix):]] = tensor.clone()
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "model-00002-of-00002.safetensors"))
    for source in (state, tmp_path / "model-00002-of-00002.safetensors"):
        loaded = TokenPackerModule.from_official(source, scale=3, layers=OFFICIAL_LAYERS, num_heads=4, grid=(GRID, GRID))
        assert loaded.state_dict().keys() == packer.state_dict().keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in packer.state_dict().items())
        assert dataclasses.asdict(loaded.config) == dataclasses.asdict(packer.config)
    with pytest.raises(ValueError, match="no TokenPacker projector in these weights"):
        TokenPackerModule.from_official({"model.mm_projector.mlp.2.weight": torch.zeros(2, 2)})
