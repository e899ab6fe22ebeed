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
- **Merging**: what the paper's Table 3 ran, vid-TLDR with the shift as its saliency: mlvlab/vid-TLDR
  at a25051d4a4808ce2b480bd1a80a96f68c21aa5cb (``multi_modality/utils/vid_TLDR.py``: ``vidTLDR``,
  ``get_objective_score``, ``merging``, ``merge_wavg``), itself ToMe's bipartite soft matching
  (facebookresearch/ToMe at af95e4b1befa172dadccd8c81e223b10090f9579, ``tome/merge.py``:
  ``bipartite_soft_matching`` with ``class_token=True``, ``merge_wavg``). Written below from those
  rules as per-token loops (no code shared with vtoken's batched tensors):

  - the sequence in ToMe's order, CLS first; A = places ``0, 2, ...`` (CLS is A's first and never
    merges: its row of similarities is -inf), B = places ``1, 3, ...``;
  - similarity ``(cos + 1) / 2`` of L2-normalised hidden states (vid-TLDR's metric is the hidden state;
    ToMe's the attention keys, which SDPA does not expose); each A token's best B token; the ``r`` A
    tokens with the strongest edge merge; ``r = min(r, n // 2)`` for ``n`` patch tokens;
  - vid-TLDR's weighting: with ``m = max size`` each token enters as ``x * size / m``, a merging A token
    also times its saliency, in the features and the sizes alike; a token's new size is the sum, its
    feature the sum divided by ``new size / m``; the saliency is ``get_objective_score``'s normalisation
    (min-max, below-mean tokens 0, the rest ``(s - mean) / max``) of the MLP shift over the patch
    tokens, the shift standing where vid-TLDR has the attention's negative entropy;
    ``merge_weight="size"``: ToMe's ``merge_wavg`` (saliency 1);
  - the output ``[unmerged A in place order, B]`` is the next round's and the next stage's sequence
    (ToMe's order across stages; the tower's blocks, with CLIP's position embeddings added before the
    first one, treat the tokens alike in any order), compared with vtoken after sorting by each
    token's representative patch (a merged token's B member), the order vtoken hands the LLM;
  - the merge acts on the block output, where the shift of the block's MLP exists (vtoken's placement;
    ToMe and vid-TLDR merge between attention and MLP, see the docstring of ``repshift.py``); no
    proportional attention (``log size`` bias) afterwards, which vtoken documents it does not apply.

  ``test_tome_class_token_split`` and ``test_tome_order_across_stages`` check that these two
  conventions are the ones vtoken follows, against the alternatives (split over the patches only, CLS
  set aside; tokens sorted back to spatial order before every split), which give different tokens here.
"""

import pytest
import torch

import vtoken
from vtoken.config import StageSpec
from vtoken.context import ScoreContext, TokenRows
from vtoken.strategies.repshift import RepShiftConfig, RepShiftStrategy
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


def objective_score(score):
    """vid-TLDR's saliency from a ``[n]`` score (``get_objective_score`` after the entropy), one token at
    a time: min-max to [0, 1]; below the mean -> 0; else (s - mean) / the largest (s - mean)."""
    values = [float(v) for v in score]
    low, high = min(values), max(values)
    unit = [(v - low) / (high - low) for v in values]
    mean = sum(unit) / len(unit)
    top = max(u - mean for u in unit)
    return torch.tensor([0.0 if u < mean else (u - mean) / top for u in unit])


def bipartite_round(x, size, saliency, index, r, with_cls):
    """One merge of ``r`` tokens over one image's sequence ``x`` ``[T, d]`` (CLS at 0, the rest in ToMe's
    order) with sizes ``size`` ``[T]``, representative patch ``index`` ``[T]`` (CLS -1) and the saliency
    of each token (``[T]``; None: ToMe's size weighting). ``with_cls``: ToMe's ``class_token=True`` split
    of the whole sequence; else CLS is set aside and the patches are split (vid-TLDR on a model without
    CLS). Returns the new sequence ``[CLS, unmerged A, B]`` with its sizes and indices."""
    head = 0 if with_cls else 1
    body = list(range(head, x.shape[0]))
    a, b = body[0::2], body[1::2]
    unit = x / x.norm(dim=-1, keepdim=True)
    similarity = (unit[a] @ unit[b].T + 1) / 2
    if with_cls:
        similarity[0, :] = -float("inf")
    best, partner = similarity.max(dim=-1)
    edges = best.argsort(descending=True).tolist()
    merging, staying = edges[:r], sorted(edges[r:])
    m = float(size.max())
    groups = {j: [(b[j], 1.0)] for j in range(len(b))}
    for i in merging:
        groups[int(partner[i])].append((a[i], 1.0 if saliency is None else float(saliency[a[i]])))
    new_x, new_size, new_index = [], [], []
    if not with_cls:
        new_x.append(x[0]), new_size.append(size[0]), new_index.append(index[0])
    for i in staying:
        new_x.append(x[a[i]]), new_size.append(size[a[i]]), new_index.append(index[a[i]])
    for j in range(len(b)):
        total = sum(size[t] * f for t, f in groups[j])
        mass = sum(x[t] * (size[t] / m) * f for t, f in groups[j])
        new_x.append(mass / (total / m)), new_size.append(total), new_index.append(index[b[j]])
    return torch.stack(new_x), torch.stack(new_size), torch.stack(new_index)


def ref_encode(model, pixels, stages, mode="prune", merge_weight="shift", with_cls=True, reorder=True):
    """One image ``[1, 3, H, W]`` through the CLIP tower by hand with Representation Shift at ``stages``
    (``{layer: tokens kept}``). Returns the selection per stage (original patch indices, ascending), the
    sequence right after each stage (CLS first, then the tokens in original order) and the projector
    input (hidden state -2 without CLS) with its patch indices, in original order. ``reorder=False``
    sorts the tokens back to spatial order before every split (not what ToMe or vid-TLDR do)."""
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
                salient = None
                if merge_weight == "shift":  # each patch's saliency at this stage, by its representative index
                    salient = dict(zip(index[1:].tolist(), objective_score(shift[1:]).tolist()))
                while h.shape[0] - 1 > count:
                    n = h.shape[0] - 1
                    saliency = None if salient is None else torch.tensor([0.0] + [salient[p] for p in index[1:].tolist()])
                    h, size, index = bipartite_round(h, size, saliency, index, min(n - count, n // 2), with_cls)
                    if not reorder:
                        order = index.argsort()
                        h, size, index = h[order], size[order], index[order]
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
    # 576 -> 461, then 461 (odd) -> 200 in two rounds: the cap n // 2 binds (231 left, not 230), and the
    # second round splits the first round's ToMe order with each token's saliency of this stage.
    "merge-two-rounds": ({"mode": "merge", "stages": [{"site": "vision", "layer": 3, "keep_tokens": 461},
                                                      {"site": "vision", "layer": 5, "keep_tokens": 200}]},
                         {3: 461, 5: 200}, dict(mode="merge", merge_weight="shift")),
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
    # Guards against a vacuous reference: on this model the branch and residual forms, and vid-TLDR's
    # saliency weighting and ToMe's size weighting, give different answers.
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
    # The saliency is not trivial: some merging tokens weigh 0 (below the mean), none more than 1.
    saliency = objective_score(branch_form)
    assert (saliency == 0).any() and (saliency > 0).any() and saliency.max() == 1


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
# The two conventions of the published code that a plainer merge would miss.


def test_tome_class_token_split(model, inputs, runs):
    """ToMe's ``bipartite_soft_matching(class_token=True)`` splits the whole sequence with CLS as A's first
    token, so A holds CLS and the odd patches and B the even ones (p0, p2, ...). vtoken follows it; the
    split over the patch tokens alone (CLS set aside, A = even patches) picks different tokens here."""
    (selection, seen, _), expected = runs("merge-layer5")
    with torch.no_grad():
        patches_only = ref_encode(model, inputs["pixel_values"][:1], {5: 346}, mode="merge", with_cls=False)
    assert torch.equal(selection[0]["vision:5"], expected[0][0]["vision:5"])
    torch.testing.assert_close(seen[5][0], expected[0][1][5], rtol=1e-4, atol=1e-5)
    assert not torch.equal(selection[0]["vision:5"], patches_only[0]["vision:5"])


def test_tome_order_across_stages(model, inputs, runs):
    """ToMe and vid-TLDR return a merged sequence as ``[unmerged A, B]`` and the next merging layer splits
    that reordered sequence alternately; vtoken keeps that order from stage to stage (and hands the
    tokens on in spatial order). Sorting back to spatial order before every split, as vtoken used to,
    matches differently from the second stage of the paper's schedule on."""
    (selection, seen, _), expected = runs("merge-paper")
    with torch.no_grad():
        spatial = ref_encode(model, inputs["pixel_values"][:1], PAPER, mode="merge", reorder=False)
    for stage, indices in expected[0][0].items():
        assert torch.equal(selection[0][stage], indices), stage
    assert torch.equal(spatial[0]["vision:1"], expected[0][0]["vision:1"])  # one stage: the same split
    assert not torch.equal(spatial[0]["vision:7"], expected[0][0]["vision:7"])
    assert not torch.equal(spatial[0]["vision:13"], expected[0][0]["vision:13"])


def test_without_a_class_token_follows_vid_tldr():
    """vid-TLDR's own case (UMT has no class token): the split starts with the first token and the
    unmerged A tokens are sorted (ToMe's ``class_token=False`` path would leave them in edge order, and
    the next stage would split differently). The strategy is driven as the pipeline drives it: each
    stage's candidates in ascending order, the shift observed on them, two stages of one request."""
    g = torch.Generator().manual_seed(3)
    rows, tokens, dim = 2, 40, 8
    features = torch.randn(rows, tokens, dim, generator=g)
    shifts = {0: torch.rand(rows, tokens, generator=g), 4: torch.rand(rows, tokens, generator=g)}  # by patch
    stages = [dict(site="vision", layer=0, keep_tokens=29), dict(site="vision", layer=4, keep_tokens=12)]
    strategy = RepShiftStrategy(RepShiftConfig(stages=stages, mode="merge"))
    state, current, index = {}, features, torch.arange(tokens).expand(rows, -1)
    for i, stage in enumerate(stages):
        n = current.shape[1]
        observed = lambda layer, index=index: torch.gather(shifts[layer], 1, index)[..., None]
        candidates = TokenRows(current, torch.ones(rows, n, dtype=torch.bool), torch.full((rows,), stage["keep_tokens"]),
                               torch.arange(rows), [None] * rows, sizes=None, offset=0)
        ctx = ScoreContext(stage=StageSpec(**stage), tokens=candidates, generator=torch.Generator(), stage_index=i,
                           observed=observed, state=state)
        reduction = strategy.reduce(ctx)
        current, index = reduction.features, torch.gather(index, 1, reduction.keep)
    for r in range(rows):
        # The reference, with a dummy first token set aside (with_cls=False) standing for "no class token".
        x = torch.cat([torch.zeros(1, dim), features[r]])
        ids, size = torch.arange(-1, tokens), torch.ones(tokens + 1)
        for stage in stages:
            salient = dict(zip(ids[1:].tolist(), objective_score(shifts[stage["layer"]][r, ids[1:]]).tolist()))
            while x.shape[0] - 1 > stage["keep_tokens"]:
                n = x.shape[0] - 1
                saliency = torch.tensor([0.0] + [salient[p] for p in ids[1:].tolist()])
                x, size, ids = bipartite_round(x, size, saliency, ids, min(n - stage["keep_tokens"], n // 2), False)
        order = ids[1:].argsort()
        assert torch.equal(index[r], ids[1:][order])
        torch.testing.assert_close(current[r], x[1:][order], rtol=1e-5, atol=1e-6)
