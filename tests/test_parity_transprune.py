"""TransPrune parity: vtoken's ``transprune`` against an independent reference of the official code,
on a random model with LLaVA-1.5-7B's shape (576 visual tokens, 32-layer Llama; ``llava15_shape``).

Official code followed: github.com/liaolea/TransPrune at commit
c9e8284f5808f7692c40590ffc99537e9220a01d:

- ``llava/model/modeling_llama_transprune.py``: ``LlamaDecoderLayer_TransPrune.forward`` and
  ``compute_transf_weight`` (TTV), ``LlamaModel.transprune_forward`` (layer loop, accumulation,
  pruning points) and ``LlamaModel.transprune_rank_drop`` (IGA, score, drop, position ids);
- ``llava/model/llava_arch.py::prepare_inputs_labels_for_multimodal_transprune`` (image start and
  prompt length: the IGA rows are every token after the image to the end of the prompt);
- ``llava/eval/model_vqa_loader.py`` (``1.0`` prepended to the ratio list) and
  ``scripts/transprune/v1_5_test/*.sh`` (the released setting: accumulating layers ``[7..12]``,
  pruning layers ``[7, 9, 12]``, ratios ``[0.875, 0.625, 0.125]``, all 1-based).

What the official code does, re-written below from reading it (nothing copied), for one sample
(it runs batch 1 only):

- a layer whose 1-based index is in the accumulating list reports, per token of the current
  sequence, ``TTV = t(attn_in, attn_out) + t(mlp_in, mlp_out)`` where ``*_in`` is the RMS-normed input
  the branch sees and ``*_out`` the branch output before the residual add, and
  ``t(a, b) = ||b|| / ||a|| * softmax_over_the_sequence(1 - cos(a, b))`` (the paper's ``1 - |cos|`` is
  the commented-out alternative: ``direction="abs"``);
- after the layer with 1-based index ``p`` in the pruning list (so before 0-based layer ``p``), with
  ``n`` image tokens now and ``k`` to keep (``int(576 * ratio)``):
  IGA = softmax over all keys (causal) of the queries of every token after the image against every
  key, with layer ``p``'s (0-based) ``input_layernorm``, ``q_proj``, ``k_proj`` and rotary at the current
  position ids, averaged over heads, image columns sliced, averaged over the query rows;
  TTV = the sum over the stored per-layer TTV vectors (every accumulating layer run so far) of
  their image entries; ``score = TTV / (sum TTV + 1e-8) + IGA / (sum IGA + 1e-8)``; the ``k`` highest
  image tokens are kept in order (``topk``), the stored TTV vectors are re-indexed to the kept
  tokens, and the position ids are renumbered ``0 .. len - 1``.

The reference drives the decoder layers of an eager copy of the model by hand, one sample at a time
over its unpadded tokens. Positions start at the slot the unwrapped model gives the sample's first
token (its left padding in a batch, 0 alone) and are renumbered from there: rotary attention only
sees differences, so this is the official ``0 ..`` numbering shifted.

``ttv_only=True`` scores by the normalised TTV alone (paper Table 7; not in the released code) and
``alpha=0`` by IGA alone (the code's commented-out ``score = attention_avg_text``).

Checked: the kept visual indices of every stage (``vtoken.selection``, stage names ``llm:K``), the
last-token logits, at the released TransPrune-High schedule (576 -> 504 -> 360 -> 72 before layers
7/9/12) and at another (Table 9's layers 5/7/10, final budget 64), with ``direction="abs"``,
``ttv_only=True`` and ``alpha=0``, on MHA and GQA; each sample's selection in a batch of 2 equal to
its selection alone; cached greedy decoding equal to the reference with the prefill's selection
replayed. Selections are compared as exact index sets of all 576 tokens: on this random model the
scores are flat (boundary gaps of ~1e-8..1e-6 against ~1e-9 of numerical noise), so a change of the
normalisation moves only a few tokens, and only an exact comparison sees it.

Mutations of the product code this file catches (each tried in a throwaway monkeypatch plugin,
never in the product files): the TTV softmax over the whole batch instead of per sample; the L1
normalisation over the whole batch instead of per image; ``positions="original"`` as the default;
IGA from the previous layer, or from the last token's row only; TTV summed only since the previous
stage; TTV from the residual block instead of the branches; ``direction`` ignored; decoding
positions not lowered by the dropped tokens, or off by one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtoken
from llava15_shape import (
    IMAGE_TOKEN, VISUAL_TOKENS, alone, llava15_inputs, models_with_llm_inputs, one_thread, wrapped_last_logits,
)

OFFICIAL_COMMIT = "c9e8284f5808f7692c40590ffc99537e9220a01d"
LOGIT_TOL = dict(rtol=1e-5, atol=1e-5)  # differences seen: ~3e-7 on logits of ~0.5


# --- the reference ---------------------------------------------------------------------------------
def _causal(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + turned * sin[:, None]


def _transition(before: torch.Tensor, after: torch.Tensor, direction: str) -> torch.Tensor:
    """The official per-module transition weight of one sample ``[1, n, d] -> [1, n]``."""
    ratio = after.norm(dim=-1) / before.norm(dim=-1)
    cosine = F.cosine_similarity(before, after, dim=-1)
    turn = 1 - cosine if direction == "signed" else 1 - cosine.abs()
    e = torch.exp(turn)
    return ratio * (e / e.sum())


def _decoder_layer(layer, lm, hidden, positions, direction: str | None):
    """One Llama decoder layer, written out as ``LlamaDecoderLayer_TransPrune.forward`` runs it;
    with ``direction`` also the layer's TTV ``[n]``."""
    cos_sin = lm.rotary_emb(hidden, positions)
    attn_in = layer.input_layernorm(hidden)
    attn_out, _ = layer.self_attn(hidden_states=attn_in, position_embeddings=cos_sin,
                                  attention_mask=_causal(hidden.shape[1]))
    hidden = hidden + attn_out
    mlp_in = layer.post_attention_layernorm(hidden)
    mlp_out = layer.mlp(mlp_in)
    hidden = hidden + mlp_out
    ttv = None
    if direction is not None:
        ttv = (_transition(attn_in, attn_out, direction) + _transition(mlp_in, mlp_out, direction))[0]
    return hidden, ttv


def _instruction_attention(layer, lm, hidden, positions, image_start: int, image_count: int) -> torch.Tensor:
    """IGA as ``transprune_rank_drop`` computes it with the next layer's weights: ``[image_count]``."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    n = x.shape[1]
    head_dim = attn.head_dim
    q = attn.q_proj(x).view(1, n, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, head_dim).transpose(1, 2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    cos, sin = lm.rotary_emb(x, positions)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    first_text = image_start + image_count
    scores = q[:, :, first_text:] @ k.transpose(-1, -2) / head_dim**0.5 + _causal(n)[:, :, first_text:]
    probs = torch.softmax(scores.float(), dim=-1)[0]  # [H, rows, n]
    per_row = probs.mean(dim=0)[:, image_start:first_text]
    return per_row.mean(dim=0)


def official_transprune(ref_model, embeds, input_ids, attention_mask, prune_after, counts, accumulate,
                        direction="signed", use_ttv=True, use_iga=True, forced=None, first_position=None,
                        tail: int = 1):
    """TransPrune on each sample alone. ``prune_after``: the 1-based pruning layers; ``counts``: image
    tokens kept at each; ``accumulate``: the 1-based accumulating layers. Returns per sample
    ``{"llm:p": kept original visual indices}`` and the logits of the last ``tail`` tokens (``[B, V]``
    for ``tail=1``, else ``[B, tail, V]``).

    ``forced``: per sample, ``{"llm:p": visual indices}`` to keep instead of choosing them (to replay
    a prefill's selection over a prompt extended by generated tokens: what decoding with the pruned
    KV cache computes, the new tokens' positions shifted down by the dropped count as the official
    decoding branch does). ``first_position``: where each sample's numbering starts; None: the slot
    of its first valid token in the padded row (a plain forward), 0 under ``generate``."""
    lm = ref_model.model.language_model
    selections, logits = [], []
    for b in range(embeds.shape[0]):
        valid = attention_mask[b].bool()
        hidden = embeds[b, valid][None]
        start = int(torch.nonzero(valid)[0]) if first_position is None else first_position
        positions = torch.arange(hidden.shape[1])[None] + start
        is_image = input_ids[b, valid] == IMAGE_TOKEN
        image_start = int(torch.nonzero(is_image)[0])
        visual = torch.arange(int(is_image.sum()))  # original visual index of each current image token
        stored = []  # TTV of every accumulating layer run so far, over the current sequence
        chosen = {}
        for idx, layer in enumerate(lm.layers):
            accumulating = (idx + 1) in accumulate
            hidden, ttv = _decoder_layer(layer, lm, hidden, positions, direction if accumulating else None)
            if accumulating:
                stored.append(ttv)
            if (idx + 1) not in prune_after:
                continue
            stage = prune_after.index(idx + 1)
            now, keep_count = visual.numel(), counts[stage]
            image = slice(image_start, image_start + now)
            if forced is not None:
                top = torch.nonzero(torch.isin(visual, forced[b][f"llm:{idx + 1}"])).squeeze(-1)
            else:
                score = torch.zeros(now)
                if use_ttv:
                    total = sum(w[image] for w in stored)
                    score = score + total / (total.sum() + 1e-8)
                if use_iga:
                    iga = _instruction_attention(lm.layers[idx + 1], lm, hidden, positions, image_start, now)
                    score = score + iga / (iga.sum() + 1e-8)
                top = score.topk(keep_count).indices.sort().values
            keep = torch.cat((torch.arange(image_start), top + image_start, torch.arange(image.stop, hidden.shape[1])))
            hidden = hidden[:, keep]
            stored = [w[keep] for w in stored]
            positions = torch.arange(keep.numel())[None] + start  # renumbered
            visual = visual[top]
            chosen[f"llm:{idx + 1}"] = visual.clone()
        selections.append(chosen)
        last = ref_model.lm_head(lm.norm(hidden))[0, -tail:]
        logits.append(last[0] if tail == 1 else last)
    return selections, torch.stack(logits)


# --- fixtures and helpers --------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def batch():
    return llava15_inputs(2)


@pytest.fixture(scope="module")
def mha(batch):
    return models_with_llm_inputs(4, batch)


@pytest.fixture(scope="module")
def gqa(batch):
    return models_with_llm_inputs(2, batch)


def _wrapped(model, inputs, **options):
    return wrapped_last_logits(model, inputs, "transprune", **options)


PAPER = dict(prune_after=(7, 9, 12), counts=(504, 360, 72), accumulate=tuple(range(7, 13)))
TABLE9 = dict(prune_after=(5, 7, 10), counts=(504, 360, 64), accumulate=tuple(range(5, 11)))

CASES = [
    # (vtoken options, official setting, reference flags)
    pytest.param({}, PAPER, {}, id="paper-high"),
    pytest.param({"prune_layers": [5, 7, 10], "keep": 1 / 9}, TABLE9, {}, id="layers-5-7-10-keep64"),
    pytest.param({"direction": "abs"}, PAPER, {"direction": "abs"}, id="paper-high-abs"),
    pytest.param({"ttv_only": True}, PAPER, {"use_iga": False}, id="paper-high-ttv-only"),
    pytest.param({"alpha": 0.0}, PAPER, {"use_ttv": False}, id="paper-high-iga-only"),
]


def _assert_same_selection(got: dict, want: dict, b: int) -> None:
    assert list(got) == list(want), f"sample {b}: stages {list(got)} != {list(want)}"
    for stage in want:
        diff = sorted(set(got[stage].tolist()) ^ set(want[stage].tolist()))
        assert torch.equal(got[stage], want[stage]), f"sample {b} {stage}: {len(diff)} indices differ, e.g. {diff[:8]}"


# --- tests -----------------------------------------------------------------------------------------
def test_default_schedule_is_the_released_transprune_high(mha):
    model, _, _ = mha
    with vtoken.pruned(model, "transprune"):
        stages = vtoken.schedule_of(model).stages
        strategy = vtoken.strategy_of(model)
        assert [(s.layer, s.keep_tokens) for s in stages] == list(zip(PAPER["prune_after"], PAPER["counts"]))
        # 0-based accumulating layers = the official 1-based [7..12] minus one.
        assert tuple(layer + 1 for layer in strategy.accumulate_layers) == PAPER["accumulate"]
        assert vtoken.config_of(model).positions == "contiguous"


@pytest.mark.parametrize("options,official,flags", CASES)
def test_kept_tokens_and_logits_match_the_official_code(mha, batch, options, official, flags):
    model, ref, embeds = mha
    with torch.no_grad():
        want_sel, want_logits = official_transprune(
            ref, embeds, batch["input_ids"], batch["attention_mask"], **official, **flags
        )
        logits, selection = _wrapped(model, batch, **options)
    for b in range(2):
        _assert_same_selection(selection[b], want_sel[b], b)
        assert [t.numel() for t in selection[b].values()] == list(official["counts"])
    torch.testing.assert_close(logits, want_logits, **LOGIT_TOL)


def test_pruning_changes_the_logits_beyond_the_tolerance(mha, batch):
    """The logits comparison is not vacuous: the reference with and without pruning differ."""
    _, ref, embeds = mha
    with torch.no_grad():
        _, pruned = official_transprune(ref, embeds, batch["input_ids"], batch["attention_mask"], **PAPER)
        _, unpruned = official_transprune(
            ref, embeds, batch["input_ids"], batch["attention_mask"], prune_after=(), counts=(), accumulate=()
        )
    assert (pruned - unpruned).abs().max() > 100 * LOGIT_TOL["atol"]


def test_gqa_model_matches_the_official_code(gqa, batch):
    model, ref, embeds = gqa
    with torch.no_grad():
        want_sel, want_logits = official_transprune(ref, embeds, batch["input_ids"], batch["attention_mask"], **PAPER)
        logits, selection = _wrapped(model, batch)
    for b in range(2):
        _assert_same_selection(selection[b], want_sel[b], b)
    torch.testing.assert_close(logits, want_logits, **LOGIT_TOL)


@pytest.mark.parametrize(
    "options", [{}, {"prune_layers": [5, 7, 10], "keep": 1 / 9}, {"ttv_only": True}],
    ids=["paper-high", "layers-5-7-10-keep64", "ttv-only"],
)
def test_each_sample_selects_in_a_batch_what_it_selects_alone(mha, batch, options):
    model, _, _ = mha
    with torch.no_grad():
        logits, together = _wrapped(model, batch, **options)
        for b in range(2):
            alone_logits, single = _wrapped(model, alone(batch, b), **options)
            _assert_same_selection(together[b], single[0], b)
            torch.testing.assert_close(logits[b], alone_logits[0], **LOGIT_TOL)


@pytest.mark.parametrize(
    "options,official", [({}, PAPER), ({"prune_layers": [5, 7, 10], "keep": 1 / 9}, TABLE9)],
    ids=["paper-high", "layers-5-7-10-keep64"],
)
def test_cached_greedy_decoding_matches_the_reference_with_the_prefill_selection(mha, batch, options, official):
    """``generate`` with the KV cache: every step's logits equal the reference run over the prompt
    extended by the generated tokens, the prefill's selection replayed and positions renumbered
    (the official decoding branch lowers a new token's position by the tokens dropped before each
    pruning layer, which is the renumbered position of the extended sequence)."""
    model, ref, embeds = mha
    steps = 3
    with torch.no_grad(), vtoken.pruned(model, "transprune", **options):
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        selection = vtoken.selection(model)
        fed = out.sequences[:, batch["input_ids"].shape[1] :][:, : steps - 1]  # fed back in later steps
        ids = torch.cat([batch["input_ids"], fed], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(fed)], dim=1)
        extended = torch.cat([embeds, ref.get_input_embeddings()(fed)], dim=1)
        _, want = official_transprune(ref, extended, ids, mask, **official, forced=selection, first_position=0,
                                      tail=steps)
    got = torch.stack(out.logits, dim=1)  # [B, steps, V]
    torch.testing.assert_close(got, want, **LOGIT_TOL)


def test_the_batch_is_left_padded_and_the_image_spans_576_tokens(batch):
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[1].all()
    assert ((batch["input_ids"] == IMAGE_TOKEN).sum(-1) == VISUAL_TOKENS).all()
