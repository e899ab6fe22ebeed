"""Representation Shift (``repshift``): the shift formulas on hand-made tensors, the tensors a real
CLIP layer hands ``observe``, CLS handling, the progressive default schedule, merging (vid-TLDR's saliency weighting in ToMe's
bipartite matching, split and order), and
generate() on left-padded batches (cached equals uncached) for the options the generic suite does
not reach."""

import math

import pytest
import torch

import vtoken
from vtoken.accounting import bipartite_matching_flops
from vtoken.config import StageSpec
from vtoken.context import ScoreContext, TokenRows
from vtoken.schedule import Schedule, ScoringCost, Stage
from vtoken.strategies.repshift import (
    RepShiftConfig,
    RepShiftStrategy,
    bipartite_merge,
    default_layers,
    representation_shift,
    token_distance,
    vid_tldr_saliency,
)
from families import FAMILIES
from tiny import (
    IMAGE_TOKEN,
    greedy_without_cache,
    left_pad,
    llava_inputs,
    tiny_llava,
)


# --- the score ------------------------------------------------------------------------------------
def test_distances_on_hand_made_vectors():
    after = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    before = torch.tensor([[0.0, 0.0], [0.0, 2.0], [2.0, 2.0], [-1.0, 0.0]])
    assert torch.allclose(token_distance(after, before, "l2"), torch.tensor([5.0, math.sqrt(5), math.sqrt(2), 2.0]))
    assert torch.allclose(token_distance(after, before, "l1"), torch.tensor([7.0, 3.0, 2.0, 2.0]))
    # 1 - cos: a zero vector counts as orthogonal; parallel 0; opposite 2.
    assert torch.allclose(token_distance(after, before, "cos"), torch.tensor([1.0, 1.0, 0.0, 2.0]), atol=1e-6)


def _hand_io():
    """One block on three tokens: x, the attention branch a (so x' = x + a), the MLP branch m.

    Token 0: the MLP branch returns exactly x' (the residual stream entering the MLP sub-layer);
    token 1: the MLP branch returns zero (the sub-layer's output x^ equals its input x');
    token 2: neither. The MLP's own input LN(x') is NaN: the paper's formula never compares it."""
    x = torch.tensor([[[1.0, 2.0], [0.0, 3.0], [2.0, -1.0]]])
    a = torch.tensor([[[0.5, 0.5], [1.0, 1.0], [-1.0, 0.0]]])
    x_mid = x + a
    m = torch.stack([x_mid[0, 0], torch.zeros(2), torch.tensor([4.0, 1.0])])[None]
    nan = torch.full_like(x, float("nan"))
    io = {"block": (x, x_mid + m), "attention": (nan, a), "mlp": (nan, m)}
    return io, x, a, x_mid, m


def test_mlp_shift_is_zero_exactly_when_the_branch_returns_the_sublayer_input():
    io, x, a, x_mid, m = _hand_io()
    branch = representation_shift(io, "mlp", "l2", "branch")  # ||MLP(LN(x')) - x'||, Eq. 4-6 literally
    assert branch[0, 0] == 0
    assert torch.allclose(branch[0, 1:], (m - x_mid)[0, 1:].norm(dim=-1))
    residual = representation_shift(io, "mlp", "l2", "residual")  # ||x^ - x'|| = ||MLP(LN(x'))||
    assert residual[0, 1] == 0
    assert torch.allclose(residual, m.norm(dim=-1))


def test_attention_and_block_shifts_and_other_distances():
    io, x, a, x_mid, m = _hand_io()
    assert torch.allclose(representation_shift(io, "attention", "l2", "branch"), (a - x).norm(dim=-1))
    assert torch.allclose(representation_shift(io, "attention", "l1", "residual"), a.abs().sum(-1))
    block = (x_mid + m - x).norm(dim=-1)
    assert torch.allclose(representation_shift(io, "block", "l2", "branch"), block)
    assert torch.allclose(representation_shift(io, "block", "l2", "residual"), block)
    cos = 1 - torch.nn.functional.cosine_similarity(m, x_mid, dim=-1)
    assert torch.allclose(representation_shift(io, "mlp", "cos", "branch"), cos)
    assert representation_shift(io, "mlp", "cos", "branch")[0, 0].abs() < 1e-6


def _manual_clip_shift(model, pixels, layer_index):
    """The MLP shift of every token of vision layer ``layer_index``, recomputed by hand from the
    unwrapped tower: x' = x + SA(LN1(x)), m = MLP(LN2(x'))."""
    tower = model.model.vision_tower
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states
        layer = getattr(tower, "vision_model", tower).encoder.layers[layer_index]
        x = hidden[layer_index]
        x_mid = x + layer.self_attn(hidden_states=layer.layer_norm1(x), attention_mask=None)[0]
        m = layer.mlp(layer.layer_norm2(x_mid))
    return (m - x_mid).norm(dim=-1), m.norm(dim=-1), hidden


@pytest.mark.parametrize("shift", ["branch", "residual"])
def test_observe_sees_the_clip_layer_and_the_top_shifts_are_kept(shift):
    model = tiny_llava()
    x = llava_inputs(1)
    branch, residual, _ = _manual_clip_shift(model, x["pixel_values"], 1)
    expected = branch if shift == "branch" else residual
    seen = []
    with vtoken.pruned(model, "repshift", layer=1, keep_tokens=5, shift=shift):
        strategy = vtoken.strategy_of(model)
        original = strategy.observe
        strategy.observe = lambda *args: seen.append(original(*args)) or seen[-1]
        with torch.no_grad():
            model(**x)
        kept = vtoken.selection(model)[0]["vision:1"]
    assert len(seen) == 1 and torch.allclose(seen[0], expected, atol=1e-5)
    # CLS (row 0) is not a candidate; the patches with the 5 largest shifts survive.
    assert kept.tolist() == sorted(torch.topk(expected[0, 1:], 5).indices.tolist())


# --- CLS ------------------------------------------------------------------------------------------
def test_cls_is_always_kept_in_the_vision_tower():
    model = tiny_llava()
    x = llava_inputs(3)
    _, _, hidden = _manual_clip_shift(model, x["pixel_values"], 1)
    seen = []
    tower = model.model.vision_tower
    hook = getattr(tower, "vision_model", tower).encoder.layers[2].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].clone())
    )
    try:
        with vtoken.pruned(model, "repshift", layer=1, keep_tokens=4):
            with torch.no_grad():
                model(**x)
    finally:
        hook.remove()
    assert seen[0].shape[1] == 1 + 4  # CLS + the budget
    # Row 0 is still the CLS token: layer 1's CLS output, unchanged.
    assert torch.allclose(seen[0][:, 0], hidden[2][:, 0], atol=1e-6)


def test_cls_reaches_the_llm_when_llava_feeds_it():
    """vision_feature_select_strategy='full': LLaVA passes CLS to the LLM as visual token 0; a
    vision-site stage keeps it on top of the patch budget."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    base = tiny_llava()
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=base.config.vision_config, text_config=base.config.text_config, image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="full", image_seq_length=17,
    )
    model = LlavaForConditionalGeneration(config).eval()
    ids, mask = left_pad([[1, 5, 6, *([IMAGE_TOKEN] * 17), 7, 8], [1, 9, *([IMAGE_TOKEN] * 17), 7]])
    x = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 32, 32)}
    with vtoken.pruned(model, "repshift", layer=0, keep_tokens=5):
        with torch.no_grad():
            model(**x)
        kept = [s["vision:0"] for s in vtoken.selection(model)]
    assert all(k[0] == 0 and len(k) == 6 for k in kept)


# --- where and how much ---------------------------------------------------------------------------
def test_default_schedule_is_the_papers_scaled_to_depth():
    assert default_layers(12) == [0, 3, 6]  # after 1-based DeiT blocks 1, 4, 7
    assert default_layers(24) == [1, 7, 13]  # CLIP-L/14 of LLaVA-1.5
    assert default_layers(4) == [0, 1]  # clamped before LLaVA's penultimate-layer read, merged
    assert RepShiftConfig.default_keep == pytest.approx(0.8**3)
    model = tiny_llava()
    with vtoken.pruned(model, "repshift", keep=0.25):
        stages = vtoken.strategy_of(model).stages()
        assert [s.name for s in stages] == ["vision:0", "vision:1"]
        # Each stage keeps the same share of the tokens it receives: 16 -> 8 -> 4.
        assert [s.fraction(16) for s in stages] == [0.5, 0.25]
        with torch.no_grad():
            model(**llava_inputs(2))
        assert [len(s) for s in vtoken.selection(model)[0].values()] == [8, 4]
    with vtoken.pruned(model, "repshift", keep_tokens=5):
        with torch.no_grad():
            model(**llava_inputs(2))
        assert [len(s) for s in vtoken.selection(model)[0].values()] == [9, 5]  # 16 (5/16)^(1/2) = 8.9


def test_llm_site_scores_the_layer_before_the_pruning_layer():
    strategy = RepShiftStrategy(RepShiftConfig(site="llm", layer=2))
    needs = strategy.needs()
    assert needs.layers("llm_observed") == [1] and needs.layers("vision_observed") == []
    vision = RepShiftStrategy(RepShiftConfig(layer=3))
    assert vision.needs().layers("vision_observed") == [3]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(site="llm", layer=0), "layer >= 1"),
        (dict(site="llm"), "needs `layer`"),
        (dict(operation="ffn"), "operation must be one of"),
        (dict(distance="l3"), "distance must be one of"),
        (dict(shift="after"), "shift must be one of"),
        (dict(mode="pool"), "mode must be one of"),
        (dict(merge_weight="attention"), "merge_weight must be one of"),
        (dict(stages=[{"site": "projector", "keep": 0.5}]), "cannot prune at the 'projector' site"),
    ],
)
def test_bad_options_are_refused_before_the_model_is_touched(options, message):
    model = tiny_llava()
    with pytest.raises(ValueError, match=message):
        vtoken.wrap(model, "repshift", **options)
    assert not vtoken.is_wrapped(model)


# --- merging --------------------------------------------------------------------------------------
def test_vid_tldr_saliency_on_hand_made_scores():
    # get_objective_score's normalisation: min-max, below the mean -> 0, the rest (s - mean) / max.
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0], [1.0, 2.0, 3.0, 4.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    take_part = torch.tensor([[True] * 5, [True, True, True, True, False], [True] * 5])
    saliency = vid_tldr_saliency(scores, take_part)
    assert torch.allclose(saliency[0], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    assert torch.allclose(saliency[1], torch.tensor([0.0, 0.0, 1 / 3, 1.0, 0.0]))  # the last token takes no part
    assert torch.equal(saliency[2], torch.ones(5))  # all equal (0 / 0 in the official code): plain sizes


def test_bipartite_merge_merges_the_most_similar_pairs():
    # No prefix: A = tokens 0, 2; B = tokens 1, 3. 0 is nearly 1; 2 is less close to 3.
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.02], [0.0, 1.0], [0.5, 1.0]]])
    take_part = torch.ones(1, 4, dtype=torch.bool)
    keep, merged, into, position, sizes = bipartite_merge(features, take_part, torch.tensor([3]))
    assert keep.tolist() == [[1, 2, 3]] and sizes.tolist() == [[2.0, 1.0, 1.0]]
    assert torch.allclose(merged[0], torch.tensor([[1.0, 0.01], [0.0, 1.0], [0.5, 1.0]]))
    assert into.tolist() == [[0, 0, 1, 2]]
    assert position.tolist() == [[1, 0, 2]]  # ToMe's order: [unmerged A (2), B (1, 3)]
    keep, merged, into, position, sizes = bipartite_merge(features, take_part, torch.tensor([2]))
    assert keep.tolist() == [[1, 3]] and sizes.tolist() == [[2.0, 2.0]]
    assert torch.allclose(merged[0, 1], torch.tensor([0.25, 1.0]))


def test_a_class_token_leads_set_a():
    # With a class token before the candidates (ToMe's class_token=True): the sequence is
    # [CLS, 0, 1, 2, 3], A = CLS, 1, 3 and B = 0, 2, so 1 merges into 0 (not 0 into 1).
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.02], [0.0, 1.0], [0.5, 1.0]]])
    keep, merged, into, position, _ = bipartite_merge(features, torch.ones(1, 4, dtype=torch.bool), torch.tensor([3]),
                                                      offset=1)
    assert keep.tolist() == [[0, 2, 3]] and into.tolist() == [[0, 0, 1, 2]]
    assert torch.allclose(merged[0, 0], torch.tensor([1.0, 0.01]))
    assert position.tolist() == [[1, 2, 0]]  # [CLS, unmerged A (3), B (0, 2)]


def test_merge_weights_follow_vid_tldr():
    # Token 0 (A) merges into token 1 (B): it weighs size x saliency (0.5), its target its size (1),
    # whatever the target's own saliency; the merged size is the weighted sum.
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    saliency = torch.tensor([[0.5, 0.0]])
    keep, merged, _, _, sizes = bipartite_merge(features, torch.ones(1, 2, dtype=torch.bool), torch.tensor([1]),
                                                saliency=saliency)
    assert keep.tolist() == [[1]] and torch.allclose(sizes, torch.tensor([[1.5]]))  # the B token's place
    assert torch.allclose(merged[0, 0], torch.tensor([1 / 3, 2 / 3]))
    # A background token (saliency 0) vanishes from the average it joins.
    _, merged, _, _, sizes = bipartite_merge(features, torch.ones(1, 2, dtype=torch.bool), torch.tensor([1]),
                                             saliency=torch.zeros(1, 2))
    assert torch.equal(merged[0, 0], features[0, 1]) and sizes.tolist() == [[1.0]]


def test_merge_preserves_size_weighted_sums_over_several_rounds():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 12, 4, generator=g)
    sizes = torch.randint(1, 4, (2, 12), generator=g).float()
    take_part = torch.ones(2, 12, dtype=torch.bool)
    keep, merged, into, _, new_sizes = bipartite_merge(features, take_part, torch.tensor([3, 5]), sizes)  # 12 -> 6 -> 3
    for r, k in enumerate([3, 5]):
        assert (keep[r, :k] >= 0).all() and (keep[r, k:] == -1).all() and len(set(keep[r, :k].tolist())) == k
        assert torch.all(keep[r, : k - 1] < keep[r, 1:k])
        assert torch.isclose(new_sizes[r].sum(), sizes[r].sum())
        total = (sizes[r, :, None] * features[r]).sum(0)
        assert torch.allclose((new_sizes[r, :, None] * merged[r]).sum(0), total, atol=1e-5)
        # merged_into partitions the tokens: each kept token holds itself, sizes are what it holds.
        assert torch.equal(into[r, keep[r, :k]], torch.arange(k))
        held = torch.zeros(k).index_add(0, into[r], sizes[r])
        assert torch.allclose(held, new_sizes[r, :k])


def test_merge_leaves_tokens_that_take_no_part_out():
    features = torch.tensor([[[1.0, 0.0], [100.0, 100.0], [1.0, 0.1], [0.0, 1.0]]])
    take_part = torch.tensor([[True, False, True, True]])
    keep, merged, into, _, _ = bipartite_merge(features, take_part, torch.tensor([2]))
    assert 1 not in keep[0].tolist() and merged.abs().max() < 2 and into[0, 1] == -1  # never kept, never merged into
    keep, merged, _, _, _ = bipartite_merge(features, take_part, torch.tensor([3]))
    assert keep.tolist() == [[0, 2, 3]] and torch.equal(merged[0], features[0, [0, 2, 3]])  # nothing to merge
    with pytest.raises(RuntimeError, match="exceeds the 3 tokens"):
        bipartite_merge(features, take_part, torch.tensor([4]))


def _ctx(stage, features, budget, stage_index, generator, state=None):
    rows, width = features.shape[:2]
    tokens = TokenRows(features, torch.ones(rows, width, dtype=torch.bool), torch.tensor(budget),
                       torch.arange(rows), [None] * rows)
    return ScoreContext(stage=stage, tokens=tokens, generator=generator, stage_index=stage_index,
                        state=state if state is not None else {})


def test_order_and_sizes_carry_from_one_stage_to_the_next():
    stages = [dict(site="vision", layer=0, keep_tokens=5), dict(site="vision", layer=1, keep_tokens=2)]
    strategy = RepShiftStrategy(RepShiftConfig(stages=stages, mode="merge", merge_weight="size"))
    generator = torch.Generator()
    request = {}  # the request's scratch: the same dict at every stage of one prefill
    features = torch.randn(1, 8, 3, generator=torch.Generator().manual_seed(1))
    first = strategy.reduce(_ctx(StageSpec(**stages[0]), features, [5], 0, generator, request))
    second = strategy.reduce(_ctx(StageSpec(**stages[1]), first.features, [2], 1, generator, request))
    # The second stage continues from the first's ToMe order and sizes.
    ones = torch.ones(1, 8, dtype=torch.bool)
    _, _, _, position, first_sizes = bipartite_merge(features, ones, torch.tensor([5]))
    keep, merged, _, _, final = bipartite_merge(first.features, ones[:, :5], torch.tensor([2]), first_sizes,
                                                position=position)
    assert torch.equal(second.keep, keep) and torch.allclose(second.features, merged)
    assert final.sum() == 8
    assert torch.allclose((final[0, :, None] * merged[0]).sum(0), features[0].sum(0), atol=1e-5)
    # Starting again from spatial order gives another split here.
    assert not torch.equal(bipartite_merge(first.features, ones[:, :5], torch.tensor([2]), first_sizes)[0], keep)
    # A stage whose candidates are not what the previous one kept is refused, naming why.
    request = {}
    strategy.reduce(_ctx(StageSpec(**stages[0]), features, [5], 0, generator, request))
    with pytest.raises(RuntimeError, match="ToMe's token order cannot be followed"):
        strategy.reduce(_ctx(StageSpec(**stages[1]), features[:, :6], [2], 1, generator, request))


def test_merge_cost_is_reported():
    assert bipartite_matching_flops(576, 461, 1024) == 2 * 288 * 288 * 1024
    assert bipartite_matching_flops(16, 3, 1) == 2 * (8 * 8 + 4 * 4 + 2 * 2)  # 16 -> 8 -> 4 -> 3
    # At most half the candidates merge per round, a protected CLS aside: 1 + 16 -> 1 + 8 -> 1 + 4 -> 1 + 3
    assert bipartite_matching_flops(17, 4, 1, prefix=1) == 2 * (9 * 8 + 5 * 4 + 3 * 2)
    assert bipartite_matching_flops(9, 3, 1) == 2 * (5 * 4 + 3 * 2)  # 9 -> 5 -> 3 (odd: 4 merge, not 5)
    with pytest.raises(ValueError, match="cannot merge"):
        bipartite_matching_flops(2, 0, 1, prefix=1)
    assert RepShiftStrategy(RepShiftConfig(layer=1)).scoring_cost(StageSpec("vision", 1, 0.8)) == []
    merge = RepShiftStrategy(RepShiftConfig(layer=1, mode="merge"))
    assert merge.scoring_cost(StageSpec("vision", 1, 0.8)) == [ScoringCost("vision_token_matching", layer=1)]
    schedule = Schedule((Stage("vision", 461, 1),), (ScoringCost("vision_token_matching", layer=1),))
    report = vtoken.flops("llava-hf/llava-1.5-7b-hf", schedule)
    # ToMe's split of the whole block output: CLS first in A, so 289 A tokens (CLS never merges) x 288 B
    assert report.scoring == 2 * 289 * 288 * 1024


# --- end to end -----------------------------------------------------------------------------------
MODELS = {name: (family.make, family.inputs) for name, family in FAMILIES.items()}
CASES = [
    ("llava", dict(mode="merge", keep=0.4)),  # progressive vision merging, shift-weighted
    ("next", dict(mode="merge", merge_weight="size", keep=0.4)),
    ("llava", dict(site="llm", layer=2, operation="attention", distance="l1", keep=0.4)),
    ("next", dict(site="llm", layer=2, shift="residual", keep=0.4)),
    ("llava", dict(mode="merge", stages=[dict(site="llm", layer=1, keep=0.6), dict(site="llm", layer=3, keep=0.3)])),
    ("next", dict(mode="merge", operation="block", distance="cos",
                  stages=[dict(site="vision", layer=0, keep=0.6), dict(site="llm", layer=2, keep=0.3)])),
]


@pytest.mark.parametrize("name, options", CASES)
def test_generate_on_a_padded_batch_equals_recomputation(name, options):
    make, inputs = MODELS[name]
    model = make()
    x = inputs(model)
    with vtoken.pruned(model, "repshift", **options):
        cached = model.generate(**x, max_new_tokens=4, do_sample=False)
        selection = vtoken.selection(model)
        stages = vtoken.strategy_of(model).stages()
        uncached = greedy_without_cache(model, x, 4)
    assert torch.equal(cached, uncached)
    counts = [int(n) for n in (x["input_ids"] == IMAGE_TOKEN).sum(-1)]
    last = stages[-1]
    for sample, n in zip(selection, counts):
        if last.site == "llm":
            assert len(sample[last.name]) == last.budget(n)


@pytest.mark.parametrize(
    "options", [dict(site="llm", layer=2), dict(mode="merge"), dict(mode="merge", site="llm", layer=1)]
)
def test_sdpa_and_eager_choose_the_same_tokens(options):
    chosen, logits = [], []
    for attn in ("sdpa", "eager"):
        model = tiny_llava(attn)
        with vtoken.pruned(model, "repshift", keep=0.25, **options):
            with torch.no_grad():
                logits.append(model(**llava_inputs(3)).logits[:, -1])
            chosen.append(vtoken.selection(model))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*chosen) for k in a)
    assert torch.allclose(logits[0], logits[1], atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("options", [dict(mode="merge"), dict(mode="merge", site="llm", layer=2)])
def test_keep_all_merging_is_the_identity(name, options):
    if not FAMILIES[name].supports({"site": options.get("site", "vision")}):
        pytest.skip(f"{name} does not prune inside its vision encoder yet")
    make, inputs = MODELS[name]
    model = make()
    x = inputs(model)
    with torch.no_grad():
        ref = model(**x).logits
    with vtoken.pruned(model, "repshift", keep=1.0, **options):
        with torch.no_grad():
            out = model(**x).logits
    assert torch.equal(out, ref)
