"""VisionZip: its budget split and merge on hand-made tensors, and parity with an independent
reference of the official code on a LLaVA-1.5-shaped random model (576 visual tokens).

Official code followed: github.com/dvlab-research/VisionZip at commit
3151f6df4fca36a4cd1c985e5956e725b1f9ad02, ``visionzip/clip_encoder.py``
(``CLIPVisionTower_VisionZip.forward``) and ``visionzip/utils.py`` (``CLIPAttention_forward``: the
metric is the layer's raw keys averaged over heads). Re-written below from reading it, batched as
the official code is: the CLS row of ``attentions[-2]`` summed over heads ranks the patches
(``topk``), the rest are filtered in order, ``contextual`` targets are every ``len // contextual``-th
of them, every other token joins its most cosine-similar target (``argmax``), and a contextual token
is ``target + mean(joined)``; features are ``hidden_states[-2]``, projected after merging.

The reference takes the patch-only variant vtoken implements (transformers' LLaVA drops CLS, so the
dominant tokens are all patches; the official LLaVA code keeps CLS as one of them), and puts the
kept tokens in patch order (vtoken's layout; the official code appends the contextual ones).
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from llava15_shape import IMAGE_TOKEN, alone, llava15_inputs, llava15_shaped, llm_inputs, one_thread
from vtoken.strategies.visionzip import contextual_merge, split_budget

OFFICIAL_COMMIT = "3151f6df4fca36a4cd1c985e5956e725b1f9ad02"


def test_budget_splits_as_the_papers_settings():
    assert [split_budget(b, 54 / 64) for b in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert split_budget(5, 1.0) == (5, 0) and split_budget(5, 0.0) == (0, 5)


def test_contextual_tokens_are_the_target_plus_the_mean_of_what_joins_it():
    # 6 tokens, 2 targets (every 3rd: tokens 0 and 3); keys make 1, 2 join target 0 and 4, 5 join 3.
    keys = torch.tensor([[1.0, 0], [1, 0.1], [0.9, 0], [0, 1], [0.1, 1], [0, 0.8]])
    features = torch.arange(6, dtype=torch.float32)[:, None] * torch.ones(1, 2)
    targets, merged = contextual_merge(features, keys, 2)
    assert targets.tolist() == [0, 3]
    assert merged.tolist() == [[0 + 1.5] * 2, [3 + 4.5] * 2]


# --- parity with the official code --------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def model():
    return llava15_shaped("eager")  # the reference reads output_attentions


@pytest.fixture(scope="module")
def batch():
    return llava15_inputs(2)


def official_visionzip(model, pixel_values, dominant_num: int, contextual_num: int, joins: list | None = None):
    """Per image: kept patch indices (ascending) and their projected features in that order. With
    ``joins``, appends per image ``{patch: target patch}`` for every non-dominant patch (a target
    joins itself)."""
    tower = model.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
    seen = {}
    handle = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out))
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        handle.remove()
    heads = layer.self_attn.num_heads
    batch, tokens, _ = seen["k"].shape
    metric = seen["k"].view(batch, tokens, heads, -1).mean(2)[:, 1:]  # raw keys, mean over heads
    attn_weights = out.attentions[-2]
    hidden_states = out.hidden_states[-2][:, 1:]  # LLaVA's "default": the patches
    cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
    topk = cls_attention_sum.topk(dominant_num, dim=1).indices
    mask = torch.ones(batch, tokens - 1, dtype=torch.bool).scatter_(1, topk, False)
    results = []
    for b in range(batch):
        dominant = torch.nonzero(~mask[b]).squeeze(-1)
        filtered = torch.nonzero(mask[b]).squeeze(-1)
        metric_normalized = metric[b, filtered] / metric[b, filtered].norm(dim=-1, keepdim=True)
        step = max(1, len(filtered) // contextual_num)
        target_indices = torch.arange(0, len(filtered), step)[:contextual_num]
        others = ~torch.isin(torch.arange(len(filtered)), target_indices)
        similarity = metric_normalized[others] @ metric_normalized[target_indices].T
        assign = torch.zeros(int(others.sum()), contextual_num).scatter_(1, similarity.argmax(1)[:, None], 1)
        counts = assign.sum(0).clamp(min=1)[:, None]
        hidden = hidden_states[b, filtered]
        contextual = hidden[target_indices] + (assign.T @ hidden[others]) / counts
        if joins is not None:
            joined = dict(zip(filtered[target_indices].tolist(), filtered[target_indices].tolist()))
            joined.update(zip(filtered[others].tolist(), filtered[target_indices][similarity.argmax(1)].tolist()))
            joins.append(joined)
        kept = torch.cat([dominant, filtered[target_indices]])
        vectors = torch.cat([hidden_states[b, dominant], contextual])
        order = kept.argsort()
        with torch.no_grad():
            projected = model.model.multi_modal_projector(vectors[order])
        results.append((kept[order], projected))
    return results


def _reference_logits(model, single, projected):
    """Last-token logits of the unwrapped LLM fed the prompt with its image block replaced by the
    kept tokens (positions renumbered contiguously). Call it on the unwrapped model."""
    embeds = llm_inputs(model, single)[0]
    image = torch.nonzero(single["input_ids"][0] == IMAGE_TOKEN).squeeze(-1)
    sequence = torch.cat([embeds[: image[0]], projected, embeds[image[-1] + 1 :]])[None]
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=sequence).last_hidden_state
        return model.lm_head(hidden[:, -1])[0]


@pytest.mark.parametrize("budget,dominant,contextual", [(64, 54, 10), (192, 162, 30)])
def test_matches_the_official_code(model, batch, budget, dominant, contextual):
    reference = official_visionzip(model, batch["pixel_values"], dominant, contextual)
    expected_logits = [_reference_logits(model, alone(batch, b), projected) for b, (_, projected) in enumerate(reference)]
    with vtoken.pruned(model, "visionzip", keep_tokens=budget):
        seen = {}

        def grab(module, args, kwargs):
            seen["embeds"] = args[0] if args else kwargs["hidden_states"]

        handle = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            handle.remove()
        chosen = [s["projector"] for s in vtoken.selection(model)]
        for b, (kept, projected) in enumerate(reference):
            assert torch.equal(chosen[b], kept), b
            image_slots = batch["attention_mask"][b].nonzero()[0, 0] + 36  # BOS + 35 system tokens
            got = seen["embeds"][b, image_slots : image_slots + budget]
            torch.testing.assert_close(got, projected, rtol=1e-5, atol=1e-5)
            with torch.no_grad():
                logits = model(**alone(batch, b)).logits[0, -1]
            torch.testing.assert_close(logits, expected_logits[b], rtol=1e-4, atol=1e-4)


def test_merged_into_sends_every_joined_patch_to_its_targets_column(model, batch):
    """``Reduction.merged_into`` (what drawings and the speed replay read): a kept token is its own
    column, a patch that joined a contextual target goes to that target's column, as the official
    assignment (cosine argmax over the targets' keys) says; nothing else is merged."""
    joins: list = []
    official_visionzip(model, batch["pixel_values"], 54, 10, joins)
    with vtoken.pruned(model, "visionzip", keep_tokens=64):
        strategy = vtoken.strategy_of(model)
        decide, seen = strategy.reduce, []
        strategy.reduce = lambda ctx: seen.append(decide(ctx)) or seen[-1]
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            del strategy.reduce
    (reduction,) = seen
    for b, joined in enumerate(joins):
        keep, into = reduction.keep[b], reduction.merged_into[b]
        column = {int(index): slot for slot, index in enumerate(keep.tolist())}
        want = torch.full_like(into, -1)
        for patch, target in joined.items():
            want[patch] = column[target]
        for index, slot in column.items():
            want[index] = slot
        assert torch.equal(into, want), b
        assert len(joined) == 576 - 54 and int((into == -1).sum()) == 0


def test_each_image_is_reduced_alone_as_in_the_batch(batch):
    model = llava15_shaped()  # SDPA: the CLS row and keys are recomputed beside it
    with vtoken.pruned(model, "visionzip", keep_tokens=64):
        with torch.no_grad():
            model(**batch)
        together = [s["projector"] for s in vtoken.selection(model)]
        for b in range(2):
            with torch.no_grad():
                model(**alone(batch, b))
            assert torch.equal(vtoken.selection(model)[0]["projector"], together[b])


def test_llava_next_keeps_the_budget_of_each_image():
    from tiny import llava_next_inputs, tiny_llava_next

    model = tiny_llava_next()
    x = llava_next_inputs(model)
    with vtoken.pruned(model, "visionzip", keep=0.25):
        with torch.no_grad():
            model(**x)
        counts = (x["input_ids"] == model.config.image_token_id).sum(-1).tolist()
        kept = [len(s["projector"]) for s in vtoken.selection(model)]
    assert kept == [max(1, round(0.25 * n)) for n in counts]


@pytest.mark.parametrize("size", [(64, 40), (32, 32)])
def test_llava_next_vision_site_fills_a_crop_that_unpadding_cut(size):
    """At the vision site every crop keeps the same count; where LLaVA-NeXT's unpadding cuts a crop's
    patches below it, the cut patches fill the count (they never reach the LLM): keep 1.0 is the
    plain model, and a high keep runs."""
    from tiny import llava_next_inputs, tiny_llava_next

    model = tiny_llava_next()
    x = llava_next_inputs(model, image_sizes=(size,))
    with torch.no_grad():
        plain = model(**x).logits
        with vtoken.pruned(model, "visionzip", site="vision", layer=1, keep=1.0):
            torch.testing.assert_close(model(**x).logits, plain)
        kept = {}
        for method in ("visionzip", "random"):  # random ranks the cut patches last too: the same counts
            with vtoken.pruned(model, method, site="vision", layer=1, keep=0.9):
                model(**x)
                kept[method] = {stage: len(tokens) for stage, tokens in vtoken.selection(model)[0].items()}
        assert kept["visionzip"] == kept["random"]


def test_scoring_cost_counts_the_cls_row_and_the_merge_from_the_stage_shapes():
    """The CLS row against every key of the read layer, plus the contextual merge's similarities:
    (576 - 54 - 10) remaining tokens x 10 targets x head_dim 8 (width 32, 4 heads), 2 FLOPs each."""
    from vtoken.schedule import ScoringCost

    model = llava15_shaped(vision_layers=4, llm_layers=2)
    with vtoken.pruned(model, "visionzip", keep_tokens=64):
        scoring = vtoken.schedule_of(model).scoring
    assert scoring == (ScoringCost("vision_attention_rows", layer=2, rows=1),
                       ScoringCost("flops", flops=2.0 * (576 - 54 - 10) * 10 * 8),
                       ScoringCost("projector_rows", rows=10))  # the 10 merged tokens projected again


def test_a_tower_without_cls_is_refused_at_wrap_naming_the_signal():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from tiny import _text

    vision = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=4, num_attention_heads=4)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=_text(), image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="full", image_seq_length=16)).eval()
    with pytest.raises(ValueError, match=r"visionzip needs a CLS token in the vision tower \(signal 'vision_cls'\), "
                                         r"but this LLaVA-1.5 model gives a siglip_vision_model tower without a CLS"):
        vtoken.wrap(model, "visionzip")
    assert not vtoken.is_wrapped(model)
