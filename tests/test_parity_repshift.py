"""Parity of ``repshift`` (Representation Shift, ICCV 2025) with an independent reference, on a random
model with LLaVA-1.5's shape (24-layer CLIP tower, 576 patches + CLS).

Sources followed:

- **Score and pruning**: the paper (arXiv 2508.00367, Eqs. 4-6, Fig. 5, Table 5). The official code,
  ``mlvlab/Representation-Shift`` (found with the search tool; its README gives ``main.py --use_flash True
  --drop_r [0.2,0,0,0.2,0,0,0.2,0,0,0,0,0]``), could not be fetched or read here ("No snapshot of that
  repository can be had here"), so the score is the paper's literal form: ``s_i = ||MLP(LN(x'_i)) - x'_i||_2``
  with ``x' = x + SA(LN(x))`` (the MLP *branch* output against the MLP sub-layer's input), computed here by
  running every CLIP encoder layer by hand from its sub-modules. Schedule: the paper's DeiT setting (drop
  20% of the current tokens after 1-based blocks 1, 4, 7 of 12) scaled to 24 layers, i.e. after 0-based
  layers 1, 7, 13 keeping round(0.8 x current): 461, 369, 295 of 576. CLS is never pruned.
- **Merging**: ToMe's ``bipartite_soft_matching`` and ``merge_wavg`` (facebookresearch/ToMe,
  ``tome/merge.py`` at af95e4b1befa172dadccd8c81e223b10090f9579) and vid-TLDR's ``merging`` /
  ``merge_wavg`` (mlvlab/vid-TLDR, ``multi_modality/utils/vid_TLDR.py`` at
  a25051d4a4808ce2b480bd1a80a96f68c21aa5cb), which the paper plugs the shift into (Table 3): L2-normalised
  metric, sets A = ``[::2]`` and B = ``[1::2]``, each A token's most similar B token, the ``r`` A tokens with
  the highest similarity merged into their partner by a ``scatter_reduce`` sum of weighted features
  divided by the summed weights, the result ``cat([unmerged A (sorted), B])``; at most half the tokens per
  round (``r = min(r, T // 2)``). The metric is the hidden state itself (vid-TLDR; ToMe uses the
  attention keys, which SDPA does not expose), taken at the block output (the shift needs the MLP).

Which conventions the passing tests use, and the two strict xfails:

- Weighting: ``merge_weight="shift"`` weights each member by ``size x shift`` in a normalised weighted mean
  (vtoken's documented rule; vid-TLDR scales only the merged-in A tokens by its saliency and divides by the
  plain size sum, and how Representation Shift's code normalises the shift for it cannot be checked);
  ``merge_weight="size"`` is ToMe's ``merge_wavg``. No proportional attention (``log size`` bias) after a
  merge: vtoken documents it does not apply it (FlashAttention has no additive bias, the paper's point).
- Split: over the patch tokens only, as vid-TLDR's (which has no CLS): A starts with the first patch.
  ToMe with ``class_token=True`` splits the whole sequence with CLS at index 0 of A, so its A is the
  *odd* patches: ``test_tome_class_token_split_xfail`` shows vtoken differs from that.
- Order: the passing tests sort the tokens back into their original order after every merge (vtoken's
  documented choice, needed to keep the LLM's image tokens in spatial order). ToMe and vid-TLDR return
  ``cat([unmerged A, B])``, and the next merging layer splits that reordered sequence alternately:
  ``test_tome_reordering_across_stages_xfail`` shows vtoken's second and third stages match differently.
"""

import pytest
import torch

import vtoken
from llava15_shape import IMAGE_TOKEN, VISUAL_TOKENS, llava15_inputs, llava15_shaped
from tiny import alone

# ------------------------------------------------------------------------------------------------
# Independent reference


def run_clip_layer(layer, h):
    """One CLIP pre-LN block from its sub-modules on one image's sequence ``h`` ``[T, d]``: returns
    (x̂, x', MLP branch output), each ``[T, d]``."""
    h = h[None]
    x_mid = h + layer.self_attn(layer.layer_norm1(h), attention_mask=None)[0]  # Eq. 5
    branch = layer.mlp(layer.layer_norm2(x_mid))
    return (x_mid + branch)[0], x_mid[0], branch[0]  # Eq. 6


def mlp_shift(x_mid, branch):
    """Eq. 4 with F = the MLP branch and D = L2 (the paper's default, Fig. 5): D(MLP(LN(x')), x')."""
    return (branch.float() - x_mid.float()).norm(dim=-1)


def bipartite_round(x, weight, size, index, r, with_cls):
    """One bipartite soft-matching merge of ``r`` tokens (ToMe / vid-TLDR) over one image's sequence
    ``x`` ``[T, d]`` (CLS at 0). ``with_cls``: ToMe's ``class_token=True`` split of the whole sequence
    (CLS in A, never merged); else the split is over the patches (vid-TLDR), CLS set aside. Members are
    averaged with ``weight``. Returns the new sequence in ToMe's order ``cat([CLS?, unmerged A, B])`` with
    its weights, sizes and representative (B member's) original patch index, CLS having index -1."""
    if not with_cls:
        cls = (x[:1], weight[:1], size[:1], index[:1])
        x, weight, size, index = x[1:], weight[1:], size[1:], index[1:]
    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = metric[::2], metric[1::2]
    scores = a @ b.T
    if with_cls:
        scores[0, :] = -float("inf")
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(descending=True)
    src, unm = edge[:r], edge[r:].sort().values
    dst = node_idx[src]

    def merge(t):
        t = t if t.dim() == 2 else t[:, None]
        ta, tb = t[::2], t[1::2]
        tb = tb.scatter_reduce(0, dst[:, None].expand(-1, t.shape[1]), ta[src], reduce="sum")
        return torch.cat([ta[unm], tb])

    total = merge(weight)[:, 0]
    x = merge(x * weight[:, None]) / total[:, None]
    size = merge(size)[:, 0]
    index = torch.cat([index[::2][unm], index[1::2]])
    if not with_cls:
        x, total, size, index = (torch.cat([c, v]) for c, v in zip(cls, (x, total, size, index)))
    return x, total, size, index


def ref_encode(model, pixels, stages, mode="prune", merge_weight="shift", with_cls=False, reorder=False):
    """One image ``[1, 3, H, W]`` through the CLIP tower by hand with Representation Shift at ``stages``
    (``{layer: tokens kept}``). Returns the selection per stage (original patch indices, ascending), the
    sequence right after each stage (CLS first, then the tokens in original order) and the projector
    input (hidden state -2 without CLS) with its patch indices, in original order."""
    vm = model.model.vision_tower
    h = vm.pre_layrnorm(vm.embeddings(pixels))[0]  # [T, d]
    index = torch.arange(-1, h.shape[0] - 1)  # CLS = -1, patch p = p
    size = torch.ones(h.shape[0])
    selection, after, hidden = {}, {}, [h]
    for i, layer in enumerate(vm.encoder.layers):
        h, x_mid, branch = run_clip_layer(layer, h)
        if i in stages:
            count = stages[i]
            shift = mlp_shift(x_mid, branch)
            if mode == "prune":
                keep = torch.cat([torch.zeros(1, dtype=torch.long), 1 + shift[1:].topk(count).indices.sort().values])
                h, index, size = h[keep], index[keep], size[keep]
            else:
                weight = size * shift if merge_weight == "shift" else size.clone()
                weight[0] = 1.0  # CLS: never merged, its weight only divides itself
                while h.shape[0] - 1 > count:
                    n = h.shape[0] - 1
                    h, weight, size, index = bipartite_round(h, weight, size, index, min(n - count, n // 2), with_cls)
                    if not reorder:
                        order = index.argsort()
                        h, weight, size, index = h[order], weight[order], size[order], index[order]
            selection[f"vision:{i}"] = index[1:].sort().values
            order = index.argsort()
            after[i] = h[order]
        hidden.append(h)
    feature = hidden[model.config.vision_feature_layer]
    order = index.argsort()
    return selection, after, feature[order][1:], index[order][1:]


def ref_last_logits(model, ids, mask, features, kept):
    """One sample alone, unpadded: the image span replaced by the projected ``features`` of the patches
    ``kept`` (ascending), each at its original position (vtoken's default ``positions="original"`` for
    repshift); logits at the last token."""
    ids = ids[mask.bool()]
    first = int((ids == IMAGE_TOKEN).nonzero()[0])
    embed = model.get_input_embeddings()
    image = model.model.multi_modal_projector(features)
    seq = torch.cat([embed(ids[:first]), image, embed(ids[first + VISUAL_TOKENS:])])[None]
    pos = torch.arange(ids.shape[0])
    pos = torch.cat([pos[:first], first + kept, pos[first + VISUAL_TOKENS:]])
    hidden = model.model.language_model(inputs_embeds=seq, position_ids=pos[None]).last_hidden_state
    return model.lm_head(hidden[:, -1])[0], image


# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return llava15_shaped()


@pytest.fixture(scope="module")
def inputs():
    return llava15_inputs(2)


def run_vtoken(model, x, capture_after=(), **options):
    """vtoken's run: selections, the encoder sequence entering layer ``l + 1`` for each ``l`` in
    ``capture_after``, the image tokens handed to the LLM and the last-token logits."""
    seen, handles = {}, []
    layers = model.model.vision_tower.encoder.layers
    for l in capture_after:
        handles.append(layers[l + 1].register_forward_pre_hook(
            lambda m, args, kwargs, l=l: seen.__setitem__(l, (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True))

    def grab(module, args, kwargs):  # what the first decoder layer receives: the sequence the LLM runs on
        seen["embeds"] = (args[0] if args else kwargs["hidden_states"]).clone()

    handles.append(model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with vtoken.pruned(model, "repshift", **options):
            with torch.no_grad():
                logits = model(**x).logits[:, -1]
            selection = vtoken.selection(model)
    finally:
        for h in handles:
            h.remove()
    return selection, seen, logits


PAPER = {1: 461, 7: 369, 13: 295}  # 0.8 of the current tokens after layers 1, 7, 13 (blocks 1, 4, 7 of 12)
SETTINGS = {
    # name: (vtoken options, reference stages, reference mode / weight)
    "prune-paper": ({}, PAPER, dict(mode="prune")),
    "prune-two-stages": ({"stages": [{"site": "vision", "layer": 3, "keep": 0.7},
                                     {"site": "vision", "layer": 10, "keep": 0.3}]}, {3: 403, 10: 173}, dict(mode="prune")),
    "merge-paper": ({"mode": "merge"}, PAPER, dict(mode="merge", merge_weight="shift")),
    "merge-layer5": ({"mode": "merge", "layer": 5, "keep": 0.6}, {5: 346}, dict(mode="merge", merge_weight="shift")),
    "merge-layer5-size": ({"mode": "merge", "layer": 5, "keep": 0.6, "merge_weight": "size"}, {5: 346},
                          dict(mode="merge", merge_weight="size")),
}


@pytest.fixture(scope="module")
def runs(model, inputs):
    cache = {}

    def get(name):
        if name not in cache:
            options, stages, ref = SETTINGS[name]
            with torch.no_grad():
                expected = [ref_encode(model, inputs["pixel_values"][b:b + 1], stages, **ref) for b in range(2)]
            cache[name] = (run_vtoken(model, inputs, capture_after=tuple(stages), **options), expected)
        return cache[name]

    return get


def test_default_schedule_is_the_papers_scaled_to_24_layers(model):
    with vtoken.pruned(model, "repshift"):
        stages = vtoken.schedule_of(model).stages
    assert [(s.site, s.layer, s.keep_tokens) for s in stages] == [("vision", l, k) for l, k in PAPER.items()]
    counts = [VISUAL_TOKENS]
    for _ in range(3):
        counts.append(round(0.8 * counts[-1]))
    assert counts[1:] == list(PAPER.values())


@pytest.mark.parametrize("name", list(SETTINGS))
def test_selection_features_and_logits_match_the_reference(model, inputs, runs, name):
    (selection, seen, logits), expected = runs(name)
    for b, (sel, after, feature, kept) in enumerate(expected):
        assert set(selection[b]) == set(sel)
        for stage, indices in sel.items():
            assert torch.equal(selection[b][stage], indices), f"sample {b}, {stage}"
        # The encoder sequence right after each stage: CLS, then the kept / merged tokens in order.
        for layer, want in after.items():
            got = seen[layer][b]
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            want_logits, image = ref_last_logits(model, inputs["input_ids"][b], inputs["attention_mask"][b], feature, kept)
        # The LLM runs on the text and the kept tokens' projected features, in order.
        first = int((inputs["input_ids"][b] == IMAGE_TOKEN).nonzero()[0])
        assert seen["embeds"].shape[1] == inputs["input_ids"].shape[1] - VISUAL_TOKENS + kept.numel()
        torch.testing.assert_close(seen["embeds"][b, first:first + kept.numel()], image, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits[b], want_logits, rtol=1e-4, atol=1e-4)


def test_the_reference_distinguishes_the_variants(model, inputs, runs):
    # Guards against a vacuous reference: on this model the branch and residual forms, and shift and
    # size weighting, give different answers.
    with torch.no_grad():
        vm = model.model.vision_tower
        h = vm.pre_layrnorm(vm.embeddings(inputs["pixel_values"][:1]))[0]
        h, x_mid, branch = run_clip_layer(vm.encoder.layers[0], h)
        h, x_mid, branch = run_clip_layer(vm.encoder.layers[1], h)
    branch_form = mlp_shift(x_mid, branch)[1:]
    residual_form = branch.float().norm(dim=-1)[1:]  # ||x̂ - x'|| = ||MLP(LN(x'))||
    assert set(branch_form.topk(461).indices.tolist()) != set(residual_form.topk(461).indices.tolist())
    shift_weighted = runs("merge-layer5")[1][0][1][5]
    size_weighted = runs("merge-layer5-size")[1][0][1][5]
    assert not torch.allclose(shift_weighted, size_weighted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["prune-paper", "merge-paper"])
def test_each_sample_selects_the_same_in_a_batch_as_alone(model, inputs, runs, name):
    options, stages, _ = SETTINGS[name]
    (batch, seen, logits), _ = runs(name)
    for b in range(2):
        single, single_seen, single_logits = run_vtoken(model, alone(inputs, b), capture_after=tuple(stages), **options)
        assert set(single[0]) == set(batch[b])
        assert all(torch.equal(single[0][k], batch[b][k]) for k in batch[b])
        for layer in stages:
            torch.testing.assert_close(single_seen[layer][0], seen[layer][b], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(single_logits[0], logits[b], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Where vtoken departs from the literal ToMe / vid-TLDR code (documented in vtoken's docstring as its
# choices; strict xfails so a change of behaviour is noticed either way).


@pytest.mark.xfail(strict=True, reason=(
    "ToMe's bipartite_soft_matching(class_token=True) splits the whole sequence with CLS at index 0 of set A, "
    "so A = CLS + odd patches and B = even patches (p0, p2, ...); vtoken splits the patch tokens only "
    "(A = even patches, B = odd), as vid-TLDR does for a model without CLS, so on CLIP (with CLS) the matching "
    "and the merged tokens differ from ToMe's"))
def test_tome_class_token_split_xfail(model, inputs, runs):
    (selection, seen, _), _ = runs("merge-layer5")
    with torch.no_grad():
        sel, after, _, _ = ref_encode(model, inputs["pixel_values"][:1], {5: 346}, mode="merge", with_cls=True)
    assert torch.equal(selection[0]["vision:5"], sel["vision:5"])
    torch.testing.assert_close(seen[5][0], after[5], rtol=1e-4, atol=1e-5)


@pytest.mark.xfail(strict=True, reason=(
    "ToMe and vid-TLDR return merged sequences as cat([unmerged A, B]) and the next merging layer splits that "
    "reordered sequence alternately into A/B; vtoken sorts the survivors back into original patch order before "
    "every split, so from the second merging stage of the default schedule (vision:7, vision:13) on, the "
    "bipartite partition, the matching and the merged tokens differ from the official code's"))
def test_tome_reordering_across_stages_xfail(model, inputs, runs):
    (selection, seen, _), _ = runs("merge-paper")
    with torch.no_grad():
        sel, after, _, _ = ref_encode(model, inputs["pixel_values"][:1], PAPER, mode="merge", reorder=True)
    for stage in sel:
        assert torch.equal(selection[0][stage], sel[stage]), stage
