"""FastV parity: vtoken's ``fastv`` against an independent reference of the official code, on a
random model with LLaVA-1.5-7B's shape (576 visual tokens, 32-layer Llama; ``llava15_shape``).

Official code followed: github.com/pkunlp-icler/FastV at commit
d1659729b5bf1be225e99ee15783deeea80f63b1, file
``src/transformers/src/transformers/models/llama/modeling_llama.py``, ``LlamaModel.forward``, the
"FastV Token Rerank, Token Drop Implementation" branch (``USE_FAST_V and FASTV_INPLACE``). What it
does, re-written below from reading it (nothing copied):

- layers ``0 .. K-1`` run on the whole sequence with ``output_attentions`` (eager attention);
- at ``idx == K`` it takes ``layer_outputs[1]``, the attention map of layer ``K-1``, averages it over
  heads, takes the row of the **last** token (``[-1]``), slices the image columns
  ``SYS_LENGTH : SYS_LENGTH + IMAGE_TOKEN_LENGTH`` and keeps the ``ATTENTION_RANK`` highest
  (``topk``); system and text tokens are always kept;
- the kept hidden states are gathered in their original order and ``position_ids = keep_indexs``:
  kept tokens keep their **original** rotary positions; the new mask is causal over the kept tokens;
- layers ``K ..`` run on the kept tokens. The code runs batch 1 only (``[0]``).

The reference here drives the decoder layers of an eager copy of the model by hand, one sample at a
time (batch 1 over the sample's unpadded tokens, as the official code), taking the attention map
from the layer's own eager attention. Positions are the slots the unwrapped model gives a left-padded
row (``arange`` over the padded width), so a sample's positions in the batch are its positions alone
shifted by its padding, which rotary attention does not see.

Decoding: the token-drop branch above has no KV cache (its evaluation scripts call ``generate`` with
``use_cache=False``, so every step re-ranks with the newest token). The repository's KV-cache
variant (``src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py``,
``LlamaModel.fastv_forward``, README "Support KV Cache", used by ``demo-hf.py``) prunes once at the
prefill, by the same rule, and the decoded tokens attend to that fixed set at the positions
``generate`` gives them (original numbering). vtoken does the latter; the decoding test checks it
by replaying the prefill's selection over the prompt extended by the generated tokens.

Checked: the same kept visual indices (``vtoken.selection``) and the same last-token logits, at the
paper's default (K=2, R=50%: 288 of 576) and at other schedules (K=3 keeping 64, K=8 keeping 144),
on MHA and GQA; each sample's selection in a batch of 2 equal to its selection alone; cached greedy
decoding equal to the reference. Selections are compared as exact index sets of all 576 tokens.

Mutations of the product code this file catches (each tried in a throwaway monkeypatch plugin,
never in the product files): scoring with layer K's attention instead of layer K-1's; scoring with
the mean of the instruction rows instead of the last token's row; scoring with the second-to-last
token's row; ``positions="contiguous"`` as FastV's default; decoding positions off by one.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from llava15_shape import (
    IMAGE_TOKEN, VISUAL_TOKENS, alone, llava15_inputs, models_with_llm_inputs, one_thread, wrapped_last_logits,
)

OFFICIAL_COMMIT = "d1659729b5bf1be225e99ee15783deeea80f63b1"
LOGIT_TOL = dict(rtol=1e-5, atol=1e-5)  # differences seen: ~3e-7 on logits of ~0.5


# --- the reference ---------------------------------------------------------------------------------
def _decoder_layer(layer, lm, hidden, positions):
    """One Llama decoder layer over ``hidden`` ``[1, n, d]`` with a causal mask and rotary positions
    ``positions`` ``[1, n]``, written out as the official layer runs it; returns the new hidden
    states and the layer's eager attention map ``[1, H, n, n]``."""
    n = hidden.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    cos_sin = lm.rotary_emb(hidden, positions)
    attn_out, probs = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden), position_embeddings=cos_sin, attention_mask=mask
    )
    assert probs is not None, "the reference model must run eager attention"
    hidden = hidden + attn_out
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, probs


def official_fastv(ref_model, embeds, input_ids, attention_mask, layer_k: int, rank: int,
                   forced=None, first_position=None, tail: int = 1):
    """FastV's token-drop rule on each sample alone. Returns per sample the kept visual indices
    (sorted, within the sample's visual tokens) and the logits of the last ``tail`` tokens
    (``[B, V]`` for ``tail=1``, else ``[B, tail, V]``).

    ``forced``: per sample, visual indices to keep instead of choosing them (to replay a prefill's
    selection over a prompt extended by generated tokens: what decoding with the pruned KV cache
    computes). ``first_position``: None gives the positions of a plain forward (the slot in the
    padded row); a number numbers each sample's valid tokens from it (``generate``)."""
    lm = ref_model.model.language_model
    selections, logits = [], []
    for b in range(embeds.shape[0]):
        valid = attention_mask[b].bool()
        slots = torch.nonzero(valid).squeeze(-1)
        hidden = embeds[b, valid][None]
        if first_position is None:
            positions = slots[None]  # what the unwrapped model gives a left-padded row
        else:
            positions = torch.arange(slots.numel())[None] + first_position
        is_image = input_ids[b, valid] == IMAGE_TOKEN
        sys_length = int(torch.nonzero(is_image)[0])  # SYS_LENGTH
        image_length = int(is_image.sum())  # IMAGE_TOKEN_LENGTH
        assert bool(is_image[sys_length : sys_length + image_length].all())
        kept = None
        previous = None
        for idx, layer in enumerate(lm.layers):
            if idx == layer_k:
                per_head_mean = previous.mean(dim=1)[0]  # layer K-1's map, averaged over heads
                last_row = per_head_mean[-1]  # the last token's row
                image_part = last_row[sys_length : sys_length + image_length]
                top = image_part.topk(rank).indices if forced is None else forced[b]
                top = top + sys_length
                length = hidden.shape[1]
                keep = torch.cat((torch.arange(sys_length), top, torch.arange(sys_length + image_length, length)))
                keep = keep.sort().values
                hidden = hidden[:, keep]
                positions = positions[:, keep]  # original positions (position_ids = keep_indexs)
                kept = torch.sort(top - sys_length).values
            hidden, previous = _decoder_layer(layer, lm, hidden, positions)
        selections.append(kept)
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
    return wrapped_last_logits(model, inputs, "fastv", **options)


SCHEDULES = [
    # (options, K, kept tokens): the paper's default K=2, R=50%, and other layers and budgets.
    pytest.param({}, 2, 288, id="paper-K2-R50"),
    pytest.param({"layer": 3, "keep_tokens": 64}, 3, 64, id="K3-64"),
    pytest.param({"layer": 8, "keep": 0.25}, 8, 144, id="K8-144"),
]


# --- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,layer_k,rank", SCHEDULES)
def test_kept_tokens_and_logits_match_the_official_rule(mha, batch, options, layer_k, rank):
    model, ref, embeds = mha
    with torch.no_grad():
        want_sel, want_logits = official_fastv(ref, embeds, batch["input_ids"], batch["attention_mask"], layer_k, rank)
        logits, selection = _wrapped(model, batch, **options)
    for b in range(2):
        assert list(selection[b]) == [f"llm:{layer_k}"]
        got = selection[b][f"llm:{layer_k}"]
        assert got.numel() == rank
        diff = sorted(set(got.tolist()) ^ set(want_sel[b].tolist()))
        assert torch.equal(got, want_sel[b]), f"sample {b}: {len(diff)} indices differ, e.g. {diff[:8]}"
    torch.testing.assert_close(logits, want_logits, **LOGIT_TOL)
    # The comparison is not vacuous: the reference without pruning (K past the last layer) gives
    # logits far from the pruned ones.
    with torch.no_grad():
        _, unpruned = official_fastv(ref, embeds, batch["input_ids"], batch["attention_mask"], 99, rank)
    assert (logits - unpruned).abs().max() > 100 * LOGIT_TOL["atol"]


def test_gqa_model_matches_the_official_rule(gqa, batch):
    model, ref, embeds = gqa
    with torch.no_grad():
        want_sel, want_logits = official_fastv(ref, embeds, batch["input_ids"], batch["attention_mask"], 2, 288)
        logits, selection = _wrapped(model, batch)
    for b in range(2):
        assert torch.equal(selection[b]["llm:2"], want_sel[b])
    torch.testing.assert_close(logits, want_logits, **LOGIT_TOL)


@pytest.mark.parametrize("options", [{}, {"layer": 3, "keep_tokens": 64}], ids=["paper-K2-R50", "K3-64"])
def test_each_sample_selects_in_a_batch_what_it_selects_alone(mha, batch, options):
    model, _, _ = mha
    with torch.no_grad():
        logits, together = _wrapped(model, batch, **options)
        for b in range(2):
            alone_logits, single = _wrapped(model, alone(batch, b), **options)
            assert together[b].keys() == single[0].keys()
            for stage in together[b]:
                assert torch.equal(together[b][stage], single[0][stage]), (b, stage)
            # Alone the positions start at 0 instead of at the padding: rotary attention is the same.
            torch.testing.assert_close(logits[b], alone_logits[0], **LOGIT_TOL)


@pytest.mark.parametrize("options,layer_k,rank", SCHEDULES[:2])
def test_cached_greedy_decoding_matches_the_reference_with_the_prefill_selection(mha, batch, options, layer_k, rank):
    """``generate`` with the KV cache: every step's logits equal the reference run over the prompt
    extended by the generated tokens, the prefill's selection replayed, positions original
    (the new tokens keep the positions the unpruned model gives them)."""
    model, ref, embeds = mha
    steps = 3
    with torch.no_grad(), vtoken.pruned(model, "fastv", **options):
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        selection = vtoken.selection(model)
        new = out.sequences[:, batch["input_ids"].shape[1] :]
        fed = new[:, : steps - 1]  # the tokens fed back in the later steps
        ids = torch.cat([batch["input_ids"], fed], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(fed)], dim=1)
        extended = torch.cat([embeds, ref.get_input_embeddings()(fed)], dim=1)
        forced = [selection[b][f"llm:{layer_k}"] for b in range(2)]
        _, want = official_fastv(ref, extended, ids, mask, layer_k, rank, forced=forced, first_position=0, tail=steps)
    got = torch.stack(out.logits, dim=1)  # [B, steps, V]
    torch.testing.assert_close(got, want, **LOGIT_TOL)


def test_the_batch_is_left_padded_and_the_image_spans_576_tokens(batch):
    """The geometry the parity tests rely on: sample 0 is padded, both carry 576 image tokens."""
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[1].all()
    assert ((batch["input_ids"] == IMAGE_TOKEN).sum(-1) == VISUAL_TOKENS).all()
