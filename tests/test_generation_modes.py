"""Every decoding mode of ``generate`` on every family, for every method that runs there: at keep=1.0
the wrapped model returns what the plain model returns, token for token (the same beams, the same
samples from the same seed, the same scores); at a real budget each mode returns one row per sequence
asked for, each starting with its unpruned prompt, and the scored greedy mode equals a plain greedy call
under the same pruning, each token the argmax of its step's scores.

Greedy decoding with and without a cache, assisted and prompt-lookup decoding, and static caches (every
method) are tested in ``test_generation.py`` and ``test_still_the_model.py``; classifier-free guidance and chunked
prefill in ``test_generate_options.py``. The oracle (it needs
annotations per call) and TokenPacker (its budget is fixed by its weights: no keep=1.0) are left out
here; ``test_generation.py`` runs both through ``generate``.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

import vtoken
from families import FAMILIES, cases

METHODS = [m["name"] for m in vtoken.methods() if not m["name"].startswith("_") and m["name"] not in ("oracle", "tokenpacker")]
MODES = {
    "beam search, 2 sequences each": dict(num_beams=3, num_return_sequences=2, do_sample=False),
    "sampling, 2 sequences each": dict(do_sample=True, num_return_sequences=2, top_k=5, temperature=0.7),
    "beam sampling": dict(do_sample=True, num_beams=2),
    "penalties": dict(do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=4),
    "dict with scores and logits": dict(do_sample=False, return_dict_in_generate=True, output_scores=True,
                                        output_logits=True),
}
STEPS = 5


def _generate(model, x, mode: str):
    torch.manual_seed(3)  # the sampling modes draw the same numbers for the plain and the wrapped model
    return model.generate(**x, max_new_tokens=STEPS, suppress_tokens=[model.config.image_token_id], **MODES[mode])


@lru_cache(maxsize=None)
def _plain(family: str) -> dict:
    """The plain model's output of every mode (the same seed-0 model and batch each test builds)."""
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    return {mode: _generate(model, x, mode) for mode in MODES}


def _sequences(out) -> torch.Tensor:
    return out.sequences if hasattr(out, "sequences") else out


@pytest.mark.parametrize("method,family", cases(METHODS))
def test_every_mode_at_keep_all_is_the_plain_model_and_runs_pruned(method, family):
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    plain = _plain(family)
    with vtoken.pruned(model, method, keep=1.0):
        for mode in MODES:
            out = _generate(model, x, mode)
            assert torch.equal(_sequences(out), _sequences(plain[mode])), mode
            if hasattr(out, "scores"):
                for ours, theirs in zip(out.scores + out.logits, plain[mode].scores + plain[mode].logits, strict=True):
                    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=lambda m: f"{mode}: {m}")
    ids = x["input_ids"]
    prompt = ids.shape[1]
    with vtoken.pruned(model, method, keep=0.4):
        outputs = {mode: _generate(model, x, mode) for mode in MODES}
        greedy = _sequences(model.generate(**x, max_new_tokens=STEPS, do_sample=False,
                                           suppress_tokens=[model.config.image_token_id]))
    for mode, options in MODES.items():
        rows = _sequences(outputs[mode])
        each = options.get("num_return_sequences", 1)
        assert rows.shape[0] == ids.shape[0] * each, mode
        assert rows.shape[1] <= prompt + STEPS, mode
        # Pruning shortens what the LLM holds, never the sequence generate hands back: every row
        # starts with its own prompt, unpruned.
        assert torch.equal(rows[:, :prompt], ids.repeat_interleave(each, dim=0)), mode
    # The dict mode is greedy decoding with its scores returned: the same tokens as a plain greedy
    # call under the same pruning, each the argmax of the processed scores of its step (up to a
    # row's end of sequence, after which generate pads).
    out = outputs["dict with scores and logits"]
    assert torch.equal(out.sequences, greedy)
    eos = model.generation_config.eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
    running = torch.ones(ids.shape[0], dtype=torch.bool)
    for step, scores in enumerate(out.scores):
        token = out.sequences[:, prompt + step]
        assert torch.equal(scores.argmax(-1)[running], token[running]), step
        running &= ~torch.isin(token, eos)
