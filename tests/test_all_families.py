"""The generic adapter suite: every family in ``tests/families.py`` joins it (today LLaVA-1.5 and
LLaVA-NeXT). Keep-all is exact at every site; pre-LLM pruning equals the unwrapped LLM run on the
kept embeddings at their positions; cached decoding equals recomputation with pruning before and
inside the LLM; several images per sample and samples without one; samples never mix; FastV's
attention row equals the eager map. (Every method's cached = uncached and batch = alone guarantees
are in ``test_generation.py``; unwrap exactness in ``test_api.py``; threads in ``test_threads.py``;
all of them draw their models from ``families.py`` too.)"""

import dataclasses

import pytest
import torch

from vtoken import compat

import vtoken
from vtoken.adapters.hf_decoder import apply_rotary, llama_attention_rows
from vtoken.config import PruneConfig
from vtoken.registry import register
from vtoken.strategies.base import Strategy
from tiny import IMAGE_TOKEN, alone, greedy_without_cache, llava_inputs, same_selections, tiny_llava
from families import FAMILIES

MODELS = {name: (family.make, family.inputs) for name, family in FAMILIES.items()}

KEEP_ALL_SITES = [
    ("random", {"site": "projector"}),
    ("pool", {"site": "projector"}),
    ("random", {"site": "vision", "layer": 1}),
    ("pool", {"site": "vision", "layer": 0}),
    ("fastv", {"layer": 2}),
    ("random", {"site": "llm", "layer": 1, "positions": "contiguous"}),
    ("random", {"stages": [{"site": "vision", "layer": 0, "keep": 1.0}, {"site": "projector", "keep": 1.0},
                           {"site": "llm", "layer": 1, "keep": 1.0}, {"site": "llm", "layer": 3, "keep": 1.0}]}),
]


def _build(name, attn="sdpa"):
    make, inputs = MODELS[name]
    model = make(attn)
    return model, inputs(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(MODELS))
def test_keep_all_is_exact_at_every_site(name, attn):
    model, x = _build(name, attn)
    with torch.no_grad():
        ref = model(**x).logits
    ref_gen = model.generate(**x, max_new_tokens=5, do_sample=False)
    for method, options in KEEP_ALL_SITES:
        if not FAMILIES[name].supports(options):
            continue
        with vtoken.pruned(model, method, keep=1.0, **options):
            with torch.no_grad():
                out = model(**x).logits
            gen = model.generate(**x, max_new_tokens=5, do_sample=False)
            visual = [len(v) for v in vtoken.selection(model)[0].values()]
        assert torch.equal(out, ref), (method, options)
        assert torch.equal(gen, ref_gen), (method, options)
        assert len(set(visual)) == 1  # every stage kept all of the sample's visual tokens


def _embeds(model, x):
    """The LLM input embeddings the unwrapped model builds (text embeddings + image features)."""
    core = model.model
    embeds = core.get_input_embeddings()(x["input_ids"])
    extra = {k: x[k] for k in ("image_sizes", "image_grid_thw", "batch_num_images") if k in x}
    feats = core.get_image_features(pixel_values=x["pixel_values"], return_dict=True, **extra).pooler_output
    feats = torch.cat(list(feats), dim=0)
    mask = (x["input_ids"] == model.config.image_token_id)[..., None]
    return embeds.masked_scatter(mask, feats)


def _contiguous_mrope(ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """``positions="contiguous"`` on M-RoPE, from its definition: the kept tokens' ids ``[3, n]``
    renumbered so that text runs on from the largest id so far and each image keeps its tokens'
    (t, h, w) offsets from the text just before it."""
    out = ids.clone()
    shift, largest = 0, None
    for j in range(ids.shape[1]):
        if visual[j]:
            out[:, j] = ids[:, j] - shift
        else:
            out[:, j] = ids[0, j] if largest is None else largest + 1
            shift = int(ids[0, j] - out[0, j])
        largest = int(out[:, j].max()) if largest is None else max(largest, int(out[:, j].max()))
    return out


@pytest.mark.parametrize("site", [{"site": "projector"}, {"site": "llm", "layer": 0}], ids=["projector", "llm:0"])
@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("name", list(MODELS))
def test_projector_site_equals_llm_on_kept_embeddings(name, positions, site):
    """A stage at the projector, or inside the LLM before its first layer (every layer then runs on
    the kept tokens alone, its mask, positions and rotary rebuilt for them), equals the unwrapped LLM
    fed only the kept tokens."""
    model, x = _build(name)
    stage = "projector" if site["site"] == "projector" else "llm:0"
    with torch.no_grad():
        embeds = _embeds(model, x)
        with vtoken.pruned(model, "random", keep=0.4, positions=positions, **site):
            pruned_logits = model(**x).logits
            kept = vtoken.selection(model)
        # Oracle: the unwrapped LLM on only the kept tokens of each sample, one sample at a time, at
        # the positions a direct forward of the unwrapped model gives them (M-RoPE ids for Qwen).
        family_positions = FAMILIES[name].positions
        direct = family_positions(model, x) if family_positions is not None else None
        for b in range(x["input_ids"].shape[0]):
            valid = x["attention_mask"][b].bool()
            is_visual = x["input_ids"][b] == model.config.image_token_id
            visual_pos = torch.nonzero(is_visual).squeeze(-1)
            keep = valid & ~is_visual
            keep[visual_pos[kept[b][stage]]] = True
            slots = torch.nonzero(keep).squeeze(-1)
            # Unwrapped, a direct forward numbers every slot (pads included) 0..L-1; "contiguous"
            # renumbers the kept tokens from the first real token's position.
            if direct is None:
                pad = int((~valid).sum())
                pos = (slots if positions == "original" else pad + torch.arange(len(slots)))[None]
            elif positions == "original":
                pos = direct[:, b : b + 1, slots]
            else:
                pos = _contiguous_mrope(direct[:, b, slots], is_visual[slots])[:, None]
            extra = _kept_deepstack(model, x, b, kept[b][stage], is_visual[slots])
            out = model.model.language_model(inputs_embeds=embeds[b : b + 1, slots], position_ids=pos,
                                             attention_mask=torch.ones(1, len(slots), dtype=torch.long), **extra)
            oracle = model.lm_head(out.last_hidden_state)
            n = len(slots)
            assert torch.allclose(pruned_logits[b, -n:], oracle[0], atol=1e-5), b


def _kept_deepstack(model, x, sample: int, kept_visual: torch.Tensor, visual_slots: torch.Tensor) -> dict:
    """Qwen3-VL: the DeepStack features of sample ``sample``'s kept visual tokens (its one image's rows
    at the kept indices) and where they go among the kept slots, for the LLM's own DeepStack adds;
    nothing for families without DeepStack."""
    visual = getattr(model.model, "visual", None)
    if visual is None or not hasattr(visual, "deepstack_merger_list"):
        return {}
    features = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"]).deepstack_features
    return {"visual_pos_masks": visual_slots[None],
            "deepstack_visual_embeds": [layer[sample][kept_visual] for layer in features]}


@dataclasses.dataclass
class _ReplayConfig(PruneConfig):
    method = "_test_replay"


@register
class _ReplayStrategy(Strategy):
    """Test-only: keeps, per stage and row, the image-local indices in ``plan`` (replays a selection)."""

    name = "_test_replay"
    Config = _ReplayConfig
    plan: dict[str, dict[int, list[int]]] = {}

    def score(self, ctx):
        wanted = self.plan[ctx.stage.name]
        local = ctx.tokens.local_index
        return torch.stack([torch.isin(local[r], torch.tensor(wanted[r])).float() for r in range(local.shape[0])])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_in_llm_pruning_cached_equals_uncached(name, batch, positions, attn):
    model, x = _build(name, attn)
    if batch == 1:
        x = alone(x, 0)  # the first sample without the left padding the batch added
    stages = [{"site": "llm", "layer": 1, "keep": 0.6}, {"site": "llm", "layer": 3, "keep": 0.3}]
    with vtoken.pruned(model, "fastv", stages=stages, positions=positions):
        cached = model.generate(**x, max_new_tokens=6, do_sample=False)
        selection = vtoken.selection(model)
    # FastV's scores change as the sequence grows, so the uncached run replays the prefill's choice
    # (one image per sample here, so image-local and sample-level indices agree).
    _ReplayStrategy.plan = {s: {b: sel[s].tolist() for b, sel in enumerate(selection)} for s in ("llm:1", "llm:3")}
    with vtoken.pruned(model, "_test_replay", stages=stages, positions=positions):
        uncached = greedy_without_cache(model, x, 6)
        replayed = model.generate(**x, max_new_tokens=6, do_sample=False)
    assert torch.equal(replayed, cached)
    assert torch.equal(uncached, cached)


@pytest.mark.parametrize("name", list(MODELS))
def test_random_inside_llm_cached_equals_uncached(name):
    model, x = _build(name)
    with vtoken.pruned(model, "random", site="llm", layer=2, keep=0.3):
        cached = model.generate(**x, max_new_tokens=6, do_sample=False)
        uncached = greedy_without_cache(model, x, 6)
    assert torch.equal(uncached, cached)


@pytest.mark.parametrize("site", [{"site": "projector"}, {"site": "vision", "layer": 1}])
@pytest.mark.parametrize("name", list(MODELS))
def test_pre_llm_pruning_cached_equals_uncached(name, site):
    if not FAMILIES[name].supports(site):
        pytest.skip(f"{name} does not prune inside its vision encoder yet")
    model, x = _build(name)
    with vtoken.pruned(model, "random", keep=0.3, **site):
        cached = model.generate(**x, max_new_tokens=6, do_sample=False)
        uncached = greedy_without_cache(model, x, 6)
    assert torch.equal(uncached, cached)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scoring_rotary_is_the_llama_formula_bit_for_bit(dtype):
    """``apply_rotary`` (scoring rotates every key of layer K with it) is ``x * cos + rotate_half(x) *
    sin``, ``rotate_half(x) = cat(-x2, x1)`` (transformers' ``apply_rotary_pos_emb``), written out
    here: equal bit for bit on keys laid out as the attention's transpose leaves them, with shared
    and per-sample cos/sin (M-RoPE gives each sample its own)."""
    g = torch.Generator().manual_seed(0)

    def written_out(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)

    for batch, length, heads, dim in ((1, 628, 4, 64), (3, 37, 6, 16), (2, 1, 1, 2)):
        x = torch.randn(batch, length, heads, dim, generator=g).to(dtype).transpose(1, 2)  # [B, H, L, D]
        for shared in (True, False):
            rows = 1 if shared else batch
            cos = torch.randn(rows, length, dim, generator=g).to(dtype).expand(batch, -1, -1)
            sin = torch.randn(rows, length, dim, generator=g).to(dtype).expand(batch, -1, -1)
            assert torch.equal(apply_rotary(x, cos, sin), written_out(x, cos, sin)), (batch, length, heads, dim, shared)


@pytest.mark.parametrize("name", list(MODELS))
def test_fastv_attention_row_equals_eager_map(name):
    model, x = _build(name, "eager")
    layer = 2
    lm = model.model.language_model
    inputs = []  # layer K-1's own input (Qwen3-VL adds DeepStack features between layers)
    handle = lm.layers[layer - 1].register_forward_pre_hook(
        lambda m, a, k: inputs.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        out = model(**x, output_attentions=True)
        handle.remove()
        hidden_in = inputs[0]
        length = hidden_in.shape[1]
        direct = FAMILIES[name].positions  # M-RoPE ids for Qwen, 0..L-1 otherwise
        positions = direct(model, x) if direct is not None else torch.arange(length)[None]
        cos_sin = lm.rotary_emb(hidden_in, positions)
        query = torch.full((hidden_in.shape[0], 1), length - 1)
        rows = llama_attention_rows(lm.layers[layer - 1], hidden_in, cos_sin, query, x["attention_mask"].bool())
    eager_row = out.attentions[layer - 1][:, :, -1:, :]
    assert torch.allclose(rows, eager_row, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_query_rows_taken_from_the_layers_normed_input_are_the_rows_normed_alone(name):
    """At a stage that scores with layer K's own attention, the instruction rows' queries come from the
    input norm scoring already computed over every token (``normed=``) instead of a second call of the
    norm on those rows: the norm works per token (RMSNorm, and Qwen3's per-head q norm after the
    projection), so the probabilities are the same bit for bit, on every family and with padding."""
    model, x = _build(name)
    lm = model.model.language_model
    inputs = []
    handle = lm.layers[2].register_forward_pre_hook(
        lambda m, a, k: inputs.append((a[0] if a else k["hidden_states"], k["position_embeddings"])), with_kwargs=True)
    with torch.no_grad():
        model(**x)
        handle.remove()
        hidden, cos_sin = inputs[0]
        layer = lm.layers[2]
        normed = compat.decoder_input_norm(layer)(hidden)
        keys = compat.attention_parts(compat.layer_attention(layer)).k_proj(normed)
        length = hidden.shape[1]
        query = torch.arange(length - 5, length).expand(hidden.shape[0], -1)
        valid = x["attention_mask"].bool()
        alone = llama_attention_rows(layer, hidden, cos_sin, query, valid, keys=keys)
        taken = llama_attention_rows(layer, hidden, cos_sin, query, valid, keys=keys, normed=normed)
    assert torch.equal(alone, taken)


@pytest.mark.parametrize("name", list(MODELS))
def test_fastv_under_sdpa_selects_what_the_eager_map_says(name):
    model, x = _build(name, "eager")
    with torch.no_grad():
        attn = model(**x, output_attentions=True).attentions[1][:, :, -1].mean(1)  # layer K-1 = 1, last row
    model.set_attn_implementation("sdpa")
    with vtoken.pruned(model, "fastv", layer=2, keep=0.25):
        with torch.no_grad():
            model(**x)
        selection = vtoken.selection(model)
    for b in range(x["input_ids"].shape[0]):
        visual = torch.nonzero(x["input_ids"][b] == model.config.image_token_id).squeeze(-1)
        scores = attn[b, visual]
        k = len(selection[b]["llm:2"])
        expected = torch.sort(torch.topk(scores, k).indices).values
        assert selection[b]["llm:2"].tolist() == expected.tolist()


@pytest.mark.parametrize("method,options", [("random", {"site": "projector"}), ("fastv", {"layer": 2}),
                                            ("random", {"site": "vision", "layer": 1})])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_several_images_per_sample_and_samples_without_image(name, method, options):
    family = FAMILIES[name]
    if not family.supports(options):
        pytest.skip(f"{name} does not prune inside its vision encoder yet")
    model = family.make()
    x = family.several_images(model)
    with torch.no_grad():
        ref = model(**x).logits
    with vtoken.pruned(model, method, keep=1.0, **options):
        with torch.no_grad():
            assert torch.equal(model(**x).logits, ref)
    with vtoken.pruned(model, "random", keep=0.25, **{k: v for k, v in options.items()}) if method == "random" \
            else vtoken.pruned(model, "random", keep=0.25, site="llm", layer=2):
        # (a random tiny model may prefer the image placeholder as its next word; a real one never does)
        cached = model.generate(**x, max_new_tokens=5, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
        uncached = greedy_without_cache(model, x, 5, suppress=[IMAGE_TOKEN])
        selection = vtoken.selection(model)
    assert torch.equal(cached, uncached)
    (kept0,), (kept1,), (kept2,) = (list(s.values()) for s in selection)
    # Budgets are per image: a quarter of each of sample 0's two images, none from sample 1.
    sizes = _image_token_counts(x)  # sample 0's two images, then sample 2's
    assert len(kept1) == 0
    if name in ("next", "onevision") and options.get("site") == "vision":
        # The documented rule on AnyRes models (README, Budgets): the encoder batches crops, so every crop
        # keeps round(keep x its patches) (VisionZip's official LLaVA-NeXT code budgets per crop too), a
        # crop's patches that unpadding cuts go first, and the newline tokens closing each row stay.
        from vtoken.adapters import adapter_for

        adapter = adapter_for(model)(model)
        infos = adapter.image_infos(x)
        reach = adapter.candidate_local(infos) >= 0  # [crops, patches]: the patch reaches the LLM
        per_crop = round(0.25 * reach.shape[1])
        expected = []
        for info in infos:
            kept_patches = sum(min(per_crop, int(reach[c].sum())) for c in info.crops)
            newlines = info.num_tokens - sum(int(reach[c].sum()) for c in info.crops)
            expected.append(kept_patches + newlines)
        if name == "next":  # one patch, one LLM token: the count is exact
            assert [len(kept0), len(kept2)] == [expected[0] + expected[1], expected[2]]
            assert len(kept2) > round(0.25 * sizes[2])  # more than keep x n: why the README warns
        else:  # OneVision pools a crop grid that is too large: at least the image's share survives
            assert len(kept2) >= round(0.25 * sizes[2]) and len(kept0) >= round(0.25 * (sizes[0] + sizes[1]))
        return
    assert len(kept2) == round(0.25 * sizes[2])
    assert (kept0 < sizes[0]).sum() == round(0.25 * sizes[0]) and (kept0 >= sizes[0]).sum() == round(0.25 * sizes[1])


def _image_token_counts(x) -> list[int]:
    """Visual tokens of each image of the batch, in order (runs of image tokens)."""
    counts = []
    for row in (x["input_ids"] == IMAGE_TOKEN).tolist():
        run = 0
        for is_image in row + [False]:
            if is_image:
                run += 1
            elif run:
                counts.append(run)
                run = 0
    return counts


def test_beam_search_runs_with_pruning_inside_the_llm():
    model = tiny_llava()
    x = llava_inputs(2)
    with vtoken.pruned(model, "fastv", keep=0.5):
        out = model.generate(**x, max_new_tokens=4, num_beams=3, do_sample=False)
    assert out.shape == (2, x["input_ids"].shape[1] + 4)


def test_layers_before_k_cache_every_token_and_later_layers_only_the_kept():
    model = tiny_llava()
    x = llava_inputs(1)
    length = x["input_ids"].shape[1]
    stages = [{"site": "llm", "layer": 1, "keep_tokens": 10}, {"site": "llm", "layer": 3, "keep_tokens": 4}]
    with vtoken.pruned(model, "fastv", stages=stages):
        with torch.no_grad():
            cache = compat.output_cache(model(**x, use_cache=True))
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [length, length - 6, length - 6, length - 12]


@pytest.mark.parametrize("method,options", [("fastv", {"layer": 2}), ("pool", {}), ("fastv", {"layer": 1, "positions": "contiguous"})])
@pytest.mark.parametrize("name", list(MODELS))
def test_samples_never_mix(name, method, options):
    """Each sample of a left-padded batch gets what it gets alone (deterministic methods)."""
    model, x = _build(name)
    mask = x["attention_mask"]
    # generate()-style positions, so that a sample's real tokens are numbered as when it is alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with vtoken.pruned(model, method, keep=0.3, **options):
        with torch.no_grad():
            batched = model(**x, position_ids=positions).logits[:, -1]
            kept_batched = vtoken.selection(model)
        for b in range(x["input_ids"].shape[0]):
            pad = int((mask[b] == 0).sum())
            single_x = alone(x, b)
            with torch.no_grad():
                single = model(**single_x, position_ids=positions[b : b + 1, pad:]).logits[:, -1]
            assert all(torch.equal(v, kept_batched[b][k]) for k, v in vtoken.selection(model)[0].items())
            assert torch.allclose(single, batched[b : b + 1], atol=1e-5)


@pytest.mark.parametrize("first", [{"site": "projector"}, {"site": "llm", "layer": 0}], ids=["projector", "llm:0"])
@pytest.mark.parametrize("positions", ["original", "contiguous", "pre_llm"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_position_policy_decodes_as_recomputation(name, positions, first):
    """Tokens dropped before (or inside the LLM before its first layer) and inside the LLM under each
    position policy: cached decoding (positions of new tokens shifted by what the policy renumbered)
    equals recomputing the sequence each step."""
    model, x = _build(name)
    stages = [{**first, "keep": 0.6}, {"site": "llm", "layer": 2, "keep": 0.3}]
    generate = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[IMAGE_TOKEN], output_scores=True,
                    return_dict_in_generate=True)
    with vtoken.pruned(model, "random", stages=stages, positions=positions):
        cached = model.generate(**x, **generate)
        recomputed = greedy_without_cache(model, x, 6, suppress=[IMAGE_TOKEN])
        # Without a cache every step is a prefill, whose positions come from the layout itself: the
        # scores show a decoding position off by the tokens dropped inside the LLM.
        uncached = model.generate(**x, use_cache=False, **generate)
    assert torch.equal(recomputed, cached.sequences) and torch.equal(uncached.sequences, cached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["next", "onevision"])
def test_anyres_vision_site_budgets_are_checked_at_wrap(name):
    """At the vision site of an AnyRes model every crop of a call keeps one count: a fraction ToMe
    cannot reach in the tower's layers is refused at wrap (it was refused at the first forward), and
    keep_tokens (per image) on a call whose images differ in size at the call, naming keep=. The model
    is left unchanged by the refusal at wrap."""
    model = FAMILIES[name].make()
    hook_count = lambda m: sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in m.modules())  # noqa: E731
    before = hook_count(model)
    with pytest.raises(ValueError, match=r"tome cannot merge 16 patch tokens down to 1 .* use keep >= 0.\d+ \(keep_tokens"):
        vtoken.wrap(model, "tome", keep=0.01)
    assert not vtoken.is_wrapped(model) and hook_count(model) == before
    if name != "next":  # (OneVision's three images happen to get one per-crop count)
        return
    x = FAMILIES[name].inputs(model)  # images of three sizes, of three per-crop counts
    with vtoken.pruned(model, "repshift", keep_tokens=6, site="vision", layer=0):
        with pytest.raises(ValueError, match=r"use keep=<fraction> instead"):
            model(**x)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_consecutive_llm_stages_score_on_the_tokens_the_previous_layer_ran_on(name):
    """FastV at layers 1 and 2: the stage at 2 scores with layer 1's attention, over the tokens layer
    1 ran on (after the stage at 1 pruned them; it read layer 1's input before that stage, so padding
    moved its scores: a sample in a batch differed from the sample alone). Each sample of the
    several-images batch alone gets its batch logits and selection (the third: one image, after a
    sample of two and one of none)."""
    family = FAMILIES[name]
    model = family.make()
    x = family.several_images(model)
    stages = [{"site": "llm", "layer": 1, "keep": 0.5}, {"site": "llm", "layer": 2, "keep": 0.25}]
    with vtoken.pruned(model, "fastv", stages=stages), torch.no_grad():
        batched, selection = model(**x).logits[:, -1], vtoken.selection(model)
        single = alone(x, 2)
        torch.testing.assert_close(model(**single).logits[0, -1], batched[2], rtol=0, atol=1e-5)
        assert same_selections(vtoken.selection(model), [selection[2]])


def test_a_stage_after_a_stage_scores_with_the_previous_layers_own_attention():
    """By construction on LLaVA-1.5 (one unpadded sample, eager attention): the stage at layer 2 keeps
    the visual tokens the last token attends to most at layer 1 (head mean), as the wrapped model's
    own output_attentions of layer 1 shows them (over the tokens the stage at 1 kept)."""
    family = FAMILIES["llava"]
    model = family.make(attn="eager")
    x = alone(family.inputs(model), 0)
    image = (x["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(-1)
    first = int(image[0])
    stages = [{"site": "llm", "layer": 1, "keep_tokens": 8}, {"site": "llm", "layer": 2, "keep_tokens": 3}]
    with vtoken.pruned(model, "fastv", stages=stages), torch.no_grad():
        out = model(**x, output_attentions=True)
        kept1, kept2 = (vtoken.selection(model)[0][f"llm:{k}"] for k in (1, 2))
    scores = out.attentions[1][0, :, -1].mean(0)[first : first + len(kept1)]  # layer 1: the 8 kept tokens
    expected = kept1[torch.topk(scores, 3).indices].sort().values
    assert torch.equal(kept2, expected)
