"""``generate`` options that make the model run forwards of its own beside the prompt's, or cut the
prompt into pieces, on every family:

- classifier-free guidance (``guidance_scale``): its logits processor calls the same model on the
  last prompt token (or a negative prompt), text only. Wrapped, that forward is the plain model's:
  the step's scores are ``g * (log_softmax(pruned) - log_softmax(plain text)) + log_softmax(plain
  text)`` exactly, and the request ``selection`` reports is the prompt's;
- chunked prefill (``prefill_chunk_size``): a prompt with images is prefilled in one forward, with a
  warning, so the tokens are those of an unchunked generate (under the same pruning); a text-only
  prompt passed through keeps its chunks;
- a quantized KV cache (``cache_implementation="quantized"``, its FP8 backend: plain torch) under an
  in-LLM stage, whose layers then hold different numbers of tokens.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import GenerationConfig

import vtoken
from families import FAMILIES
from tiny import same_selections

STEPS = 4
GUIDANCE = 1.5
METHODS = ["fastv", "random"]  # one in the LLM, one before it


def _generate(model, x, **options):
    return model.generate(**x, max_new_tokens=STEPS, do_sample=False, suppress_tokens=[model.config.image_token_id],
                          **options)


def _plain_supports_guidance(model, x) -> bool:
    # transformers' own Qwen-VL models cannot run the unconditional pass (their text-only forward
    # without rope deltas fails inside the model); nothing of vtoken's to test there.
    try:
        _generate(model, x, guidance_scale=GUIDANCE)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_guidance_scores_combine_the_pruned_prompt_and_the_plain_unconditional_pass(method, family):
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    if not _plain_supports_guidance(model, x):
        pytest.skip(f"the plain {family} model cannot run classifier-free guidance")
    plain = _generate(model, x, guidance_scale=GUIDANCE)
    with vtoken.pruned(model, method, keep=1.0):
        assert torch.equal(_generate(model, x, guidance_scale=GUIDANCE), plain)
    with torch.no_grad():
        unconditional = model(input_ids=x["input_ids"][:, -1:]).logits[:, -1].float()
    with vtoken.pruned(model, method, keep=0.4):
        with torch.no_grad():
            conditional = model(**x).logits[:, -1].float()
        prompt_selection = vtoken.selection(model)
        out = _generate(model, x, guidance_scale=GUIDANCE, output_scores=True, return_dict_in_generate=True)
        assert same_selections(vtoken.selection(model), prompt_selection)  # not the unconditional pass's
    cond, uncond = conditional.log_softmax(-1), unconditional.log_softmax(-1)
    expected = GUIDANCE * (cond - uncond) + uncond
    expected[:, model.config.image_token_id] = float("-inf")  # suppressed after guidance, as generate orders them
    first = out.scores[0].float()
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(first))
    torch.testing.assert_close(first[finite], expected[finite], rtol=1e-4, atol=1e-4)


def test_guidance_on_a_text_only_prompt_is_still_refused():
    """The unconditional pass runs as the plain model only after the call's prompt was pruned: a
    text-only prompt itself is refused as before (``text_only='error'``)."""
    model = FAMILIES["llava"].make()
    x = FAMILIES["llava"].inputs(model)
    real = x["attention_mask"][0].bool()
    ids = x["input_ids"][0:1, real]
    text = ids[ids != model.config.image_token_id][None]
    with vtoken.pruned(model, "fastv", keep=0.4):
        with pytest.raises(ValueError, match="no image tokens"):
            model.generate(input_ids=text, max_new_tokens=2, guidance_scale=GUIDANCE)


def _prefill_forwards(model, run) -> int:
    """How many forwards with an empty cache ``run()`` makes on the LLM (generate's chunks)."""
    from vtoken import compat

    count = 0

    def hook(module, args, kwargs):
        nonlocal count
        cache = compat.cache_from(kwargs)
        count += cache is None or compat.cache_length(cache) == 0 or kwargs["inputs_embeds"].shape[1] > 1
    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return count


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_a_chunked_prefill_with_images_runs_in_one_forward(method, family):
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    plain = _generate(model, x)
    with vtoken.pruned(model, method, keep=1.0):
        with pytest.warns(UserWarning, match="prefill_chunk_size=8 is not used"):
            assert torch.equal(_generate(model, x, prefill_chunk_size=8), plain)
    with vtoken.pruned(model, method, keep=0.4):
        pruned = _generate(model, x)
        with pytest.warns(UserWarning, match="prefill_chunk_size=8"):
            forwards = _prefill_forwards(model, lambda: _generate(model, x, prefill_chunk_size=8))
            chunked = _generate(model, x, prefill_chunk_size=8)
    assert forwards == 1
    assert torch.equal(chunked, pruned)


def test_chunked_prefill_from_either_generation_config():
    """The option set on a generation config passed in, or on the model's own, is honoured the same
    way, and neither config object is changed."""
    model = FAMILIES["llava"].make()
    x = FAMILIES["llava"].inputs(model)
    with vtoken.pruned(model, "fastv", keep=0.4):
        pruned = _generate(model, x)
        passed = GenerationConfig(prefill_chunk_size=8, max_new_tokens=STEPS, do_sample=False,
                                  suppress_tokens=[model.config.image_token_id])
        with pytest.warns(UserWarning, match="prefill_chunk_size=8"):
            assert torch.equal(model.generate(**x, generation_config=passed), pruned)
        assert passed.prefill_chunk_size == 8
        model.generation_config.prefill_chunk_size = 8
        with pytest.warns(UserWarning, match="prefill_chunk_size=8"):
            assert torch.equal(_generate(model, x), pruned)
        assert model.generation_config.prefill_chunk_size == 8
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # None asks for one forward: nothing to warn about
            assert torch.equal(_generate(model, x, prefill_chunk_size=None), pruned)


def test_a_text_only_prompt_keeps_its_chunks():
    model = FAMILIES["llava"].make()
    x = FAMILIES["llava"].inputs(model)
    real = x["attention_mask"][0].bool()
    ids = x["input_ids"][0:1, real]
    text = ids[ids != model.config.image_token_id][None].repeat(1, 4)  # no image, several chunks of 8
    assert text.shape[1] > 16
    plain = model.generate(input_ids=text, max_new_tokens=STEPS, do_sample=False, prefill_chunk_size=8)
    with vtoken.pruned(model, "fastv", keep=0.4, text_only="passthrough"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            forwards = _prefill_forwards(model, lambda: model.generate(
                input_ids=text, max_new_tokens=STEPS, do_sample=False, prefill_chunk_size=8))
            out = model.generate(input_ids=text, max_new_tokens=STEPS, do_sample=False, prefill_chunk_size=8)
    assert forwards == -(-text.shape[1] // 8)
    assert torch.equal(out, plain)


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_continuous_batching_is_refused_before_its_loop_starts(family):
    """generate_batch and generate(cache_implementation="paged") ran the wrapped model in
    transformers' continuous-batching thread, which logged vtoken's error and returned no tokens (the
    prompt alone from generate), even at keep=1.0: refused in one line before the loop starts, and
    the plain model's continuous batching is back after unwrap."""
    model = FAMILIES[family].make()
    ids = [1, 75, 31, 41, 78, 30, 35, 75, 23, 5]
    config = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1, pad_token_id=0)
    vtoken.wrap(model, "fastv", keep=1.0)
    for call in (lambda: model.generate_batch(inputs=[ids], generation_config=config),
                 lambda: model.generate(input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False,
                                        cache_implementation="paged")):
        with pytest.raises(ValueError, match=r"vtoken does not serve continuous batching .* call generate with a "
                                             r"batch instead, or vtoken.unwrap\(model\) first") as error:
            call()
        assert "\n" not in str(error.value)
    vtoken.unwrap(model)
    assert "init_continuous_batching" not in vars(model)


QUANTIZED = dict(cache_implementation="quantized", cache_config={"backend": "fp8"})


@pytest.mark.parametrize("family", ["llava", "qwen2", "next"])
def test_a_quantized_cache_under_in_llm_stages_holds_what_a_dynamic_one_holds(family, monkeypatch):
    """In-LLM stages were refused a quantized cache (as caches vtoken does not model). Its layers grow
    from their own counts as dynamic ones do, so they now serve: at keep=1.0 the wrapped model's
    tokens are the plain model's over the same lossy FP8 cache, and with the quantization made
    lossless (the test's patch: stored as given) every method's greedy, beam and sampled tokens at a
    real budget are those it gives over the default dynamic cache. A mask stage (AIF), which rewrites
    and crops what layers hold, is still refused in one line."""
    from transformers.cache_utils import Fp8QuantizedLayer

    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    base = dict(max_new_tokens=STEPS, suppress_tokens=[model.config.image_token_id])
    plain = model.generate(**x, **base, do_sample=False, **QUANTIZED)
    for method in ("fastv", "transprune"):
        with vtoken.pruned(model, method, keep=1.0):
            assert torch.equal(model.generate(**x, **base, do_sample=False, **QUANTIZED), plain), method
    with vtoken.pruned(model, "aif", keep=0.5), pytest.raises(ValueError, match="except for a mask stage") as error:
        model.generate(**x, **base, do_sample=False, **QUANTIZED)
    assert "\n" not in str(error.value)

    monkeypatch.setattr(Fp8QuantizedLayer, "_quantize", lambda self, tensor, scale=None: (tensor, scale))
    monkeypatch.setattr(Fp8QuantizedLayer, "_dequantize", lambda self, stored: stored[0])
    methods = ["fastv", "transprune", "vflowopt", "pool"] + (["zoo_prune"] if family == "llava" else [])
    for method in methods:
        for mode in (dict(do_sample=False), dict(num_beams=2, do_sample=False), dict(do_sample=True, top_k=5)):
            with vtoken.pruned(model, method, keep=0.4):
                torch.manual_seed(0)
                dynamic = model.generate(**x, **base, **mode)
                torch.manual_seed(0)
                assert torch.equal(model.generate(**x, **base, **mode, **QUANTIZED), dynamic), (method, mode)
