"""Every registered method as a user calls ``generate``, on LLaVA and LLaVA-NeXT with left-padded
batches: without a KV cache each step re-runs the whole sequence and must prune exactly as the first
step did (so uncached equals cached), and a sample's result never depends on the batch it is in.

A new strategy file joins these tests automatically (trained methods get random weights, the
oracle gets annotations)."""

import sys
from pathlib import Path

import pytest
import torch

import vtoken
from tiny import alone, llava_inputs, same_selections, tiny_llava
from families import FAMILIES, cases

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

from random_models import right_padded  # noqa: E402  (eval/random_models.py)

METHODS = [m["name"] for m in vtoken.methods() if not m["name"].startswith("_")]
MODELS = {name: (family.make, family.inputs) for name, family in FAMILIES.items()}
CASES = cases(METHODS)
STEPS = 5


def _options(method) -> dict:
    if method == "tokenpacker":
        from test_tokenpacker import _packer

        return {"weights": _packer(2)}  # its budget is fixed by the weights (4 of 16)
    return {"keep": 0.4}


def _relevant(x, model) -> list[list[int]]:
    """Oracle annotations: a few image-local token indices per image, different per image."""
    counts = (x["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    return [[(3 * i + 1) % n, (5 * i + 2) % n] for i, n in enumerate(counts)]


def _wrap(model, method, x):
    vtoken.wrap(model, method, **_options(method))


def _generate(model, x, relevant=None, **extra):
    """Greedy generate with scores; the oracle's annotations (``relevant``, default: ``_relevant``)
    handed in through ``vtoken.annotate``."""
    with vtoken.annotate(model, relevant=relevant or _relevant(x, model)):
        # A random tiny model may prefer the image placeholder as its next word; a real one never does.
        return model.generate(
            **x, max_new_tokens=STEPS, do_sample=False, suppress_tokens=[model.config.image_token_id],
            output_scores=True, return_dict_in_generate=True, **extra,
        )


@pytest.mark.parametrize("method,family", CASES)
def test_uncached_generate_equals_cached(method, family):
    make, inputs = MODELS[family]
    model = make()
    x = inputs(model)
    _wrap(model, method, x)
    cached = _generate(model, x)
    chosen = vtoken.selection(model)
    uncached = _generate(model, x, use_cache=False)
    assert torch.equal(uncached.sequences, cached.sequences)
    for a, b in zip(uncached.scores, cached.scores):
        assert torch.allclose(a, b, atol=1e-4)
    # Every uncached step (a full prefill) pruned exactly the tokens the cached prefill pruned.
    assert same_selections(vtoken.selection(model), chosen)
    vtoken.unwrap(model)


@pytest.mark.parametrize("method,family", CASES)
def test_each_sample_alone_equals_it_in_the_batch(method, family):
    make, inputs = MODELS[family]
    model = make()
    x = inputs(model)
    _wrap(model, method, x)
    batched = _generate(model, x)
    chosen = vtoken.selection(model)
    relevant = _relevant(x, model)
    width = x["input_ids"].shape[1]
    for b in range(x["input_ids"].shape[0]):
        single = alone(x, b)
        out = _generate(model, single, relevant=[relevant[b]])
        mine = out.sequences[0, single["input_ids"].shape[1]:]  # shorter when it ends at EOS
        theirs = batched.sequences[b, width:]
        assert torch.equal(mine, theirs[: len(mine)]), f"sample {b}"
        # and the scores, not only their argmax (a 0.07 difference once left every token the same)
        for step, (a, c) in enumerate(zip(out.scores, batched.scores)):
            finite = torch.isfinite(a[0])  # suppressed tokens are -inf in both
            assert torch.equal(finite, torch.isfinite(c[b])), f"sample {b}, step {step}"
            torch.testing.assert_close(a[0][finite], c[b][finite], atol=1e-4, rtol=1e-4, msg=f"sample {b}, step {step}")
        assert bool((theirs[len(mine):] == model.generation_config.pad_token_id).all())
        assert same_selections(vtoken.selection(model)[:1], [chosen[b]]), f"sample {b}"
    vtoken.unwrap(model)


def test_random_subsets_are_per_image():
    """Two identical images in one batch get the same random subset; two different images get
    different ones; the same image gets the same subset at another place in another batch."""
    model = tiny_llava()
    x = llava_inputs(3)
    x["pixel_values"][2] = x["pixel_values"][0]
    x["input_ids"][2] = x["input_ids"][0]
    x["attention_mask"][2] = x["attention_mask"][0]
    with vtoken.pruned(model, "random", keep=0.25):
        with torch.no_grad():
            model(**x)
        first = [s["projector"] for s in vtoken.selection(model)]
        swapped = {k: v[[1, 0]] for k, v in x.items()}
        with torch.no_grad():
            model(**swapped)
        second = [s["projector"] for s in vtoken.selection(model)]
    assert torch.equal(first[0], first[2])
    assert not torch.equal(first[0], first[1])
    assert torch.equal(second[1], first[0]) and torch.equal(second[0], first[1])


@pytest.mark.parametrize("method", METHODS)
def test_text_only_passthrough_generates_as_the_plain_model(method):
    """With ``text_only='passthrough'`` a prompt without an image runs the plain model, decoding
    steps included, on a left-padded batch."""
    from tiny import left_pad

    model = tiny_llava()
    ids, mask = left_pad([[1, 5, 6, 7, 8, 9], [1, 10, 11]])
    x = {"input_ids": ids, "attention_mask": mask}
    plain = model.generate(**x, max_new_tokens=STEPS, do_sample=False)
    options = {**_options(method), "text_only": "passthrough"}
    with vtoken.pruned(model, method, **options):
        wrapped = model.generate(**x, max_new_tokens=STEPS, do_sample=False)
    assert torch.equal(wrapped, plain)



@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_text_only_prefill_is_the_last_one_reported(family):
    """After a prompt with images, a text-only prompt (passed through) is the last prefill:
    ``selection`` gives it what a sample without images gets in a batch with some (every stage,
    nothing kept), ``diagnostics`` nothing, and ``show`` says the sample has no image, instead of
    reporting the earlier request's kept tokens."""
    from PIL import Image

    model = FAMILIES[family].make()
    x = FAMILIES[family].several_images(model)  # 2 images, none, 1 image
    vtoken.wrap(model, "random", keep=0.4, text_only="passthrough")
    with torch.no_grad():
        model(**x)
        in_batch = vtoken.selection(model)
        assert in_batch[0] and all(len(kept) == 0 for kept in in_batch[1].values())
        real = x["attention_mask"][1].bool()
        model(input_ids=x["input_ids"][1:2, real], attention_mask=x["attention_mask"][1:2, real])
    assert same_selections(vtoken.selection(model), in_batch[1:2])
    assert vtoken.diagnostics(model) == {}
    with pytest.raises(ValueError, match="sample 0 of the last forward has no image"):
        vtoken.show(model, Image.new("RGB", (32, 32)), "unused.png")

@pytest.mark.parametrize("method", ["fastv", "transprune"])
def test_right_padding_scores_each_samples_last_real_token(method):
    """In a right-padded batch the attention-scored methods read each sample's last valid token (not
    a pad): every sample keeps what it keeps alone."""
    model = tiny_llava()
    x = right_padded(llava_inputs(3))
    with vtoken.pruned(model, method, keep=0.4):
        with torch.no_grad():
            model(**x)
        batched = vtoken.selection(model)
        for b in range(3):
            with torch.no_grad():
                model(**alone(x, b))
            single = vtoken.selection(model)[0]
            assert all(torch.equal(single[k], batched[b][k]) for k in single), f"sample {b}"


@pytest.mark.parametrize("family", list(MODELS))
def test_aif_next_token_probe_follows_each_samples_last_real_token(family):
    """AIF's next-token probe (``query="next"``: one greedy decoding step on the prefill's cache)
    decodes from each sample's last prompt token, at that token's position plus one: in a
    right-padded batch, where a pad holds the last slot, as in a left-padded one, every sample keeps
    what it keeps alone (the probe read the last slot's hidden state: a pad's, under right padding)."""
    make, inputs = MODELS[family]
    model = make()
    left = inputs(model)
    with vtoken.pruned(model, "aif", keep=0.4, query="next"):
        for side, x in (("left", left), ("right", right_padded(left))):
            with torch.no_grad():
                model(**x)
            batched = vtoken.selection(model)
            for b in range(x["input_ids"].shape[0]):
                with torch.no_grad():
                    model(**alone(x, b))
                assert same_selections(vtoken.selection(model), batched[b : b + 1]), f"{side} padding, sample {b}"


@pytest.mark.parametrize("method", ["fastv", "pool", "aif"])
@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("mode", [dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)])
def test_beam_search_and_sampling_without_a_cache_equal_with_one(method, family, mode):
    make, inputs = MODELS[family]
    model = make()
    x = inputs(model)
    with vtoken.pruned(model, method, keep=0.4):
        outs = []
        for use_cache in (True, False):
            torch.manual_seed(1)
            outs.append(model.generate(**x, max_new_tokens=4, suppress_tokens=[model.config.image_token_id],
                                       use_cache=use_cache, **mode))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("method", METHODS)
def test_a_call_leaves_no_state_on_the_strategy(method):
    """Per-request state lives in the request (``ctx.state``, ``ctx.report``), never on the strategy
    instance: a call leaves its attributes exactly as they were."""
    model = tiny_llava()
    x = llava_inputs(2)
    _wrap(model, method, x)
    strategy = vtoken.strategy_of(model)
    before = {k: (id(v), repr(v)) for k, v in vars(strategy).items()}
    _generate(model, x)
    after = {k: (id(v), repr(v)) for k, v in vars(strategy).items()}
    vtoken.unwrap(model)
    assert after == before


def test_annotations_and_diagnostics_belong_to_the_call():
    model = tiny_llava()
    x = llava_inputs(2)
    with vtoken.pruned(model, "oracle", keep_tokens=3):
        with pytest.raises(ValueError, match=r"with vtoken.annotate\(model, relevant="):
            model(**x)
        with vtoken.annotate(model, relevant=[[1, 2, 3], [4, 5, 6]]), torch.no_grad():
            model(**x)
        assert [s["projector"].tolist() for s in vtoken.selection(model)] == [[1, 2, 3], [4, 5, 6]]
    with vtoken.pruned(model, "zoo_prune", keep=0.25):
        with torch.no_grad():
            model(**x)
        sensitivity = vtoken.diagnostics(model)["projector"]["sensitivity"]
    assert sensitivity.shape == (2, 16) and bool((sensitivity > 0).all())


@pytest.mark.parametrize("method", ["fastv", "pool"])
@pytest.mark.parametrize("family", list(MODELS))
def test_a_generated_image_token_is_text_as_for_the_plain_model(method, family):
    """A random tiny model may generate the image token's id; the plain model then goes on treating it
    as text, and so does the wrapped one (keep=1.0: the same tokens as the plain model)."""
    make, inputs = MODELS[family]
    model = make()
    x = inputs(model)
    image = model.config.image_token_id
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[image] = 50.0  # make the image token the first generated token
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(bias)
    plain = model.generate(**x, max_new_tokens=3, do_sample=False)
    assert bool((plain[:, x["input_ids"].shape[1]] == image).all())
    with vtoken.pruned(model, method, keep=1.0):
        wrapped = model.generate(**x, max_new_tokens=3, do_sample=False)
    assert torch.equal(wrapped, plain)


@pytest.mark.parametrize("method,hook", [("transprune", "observe"), ("aif", "observe_attention")])
def test_steps_that_replay_the_first_prefill_observe_nothing(method, hook):
    """Without a KV cache every step after the first re-runs the prompt and applies the first
    prefill's decisions again: nothing its layers would observe is read, so none is computed (the
    first prefill observes each observed layer once); the tokens are the cached generation's."""
    model = tiny_llava()
    x = llava_inputs(3)
    with vtoken.pruned(model, method, keep=0.4):
        strategy = vtoken.strategy_of(model)
        calls, original = [], getattr(strategy, hook)
        setattr(strategy, hook, lambda *a: calls.append(1) or original(*a))
        try:
            uncached = model.generate(**x, max_new_tokens=STEPS, do_sample=False, use_cache=False,
                                      suppress_tokens=[model.config.image_token_id])
        finally:
            delattr(strategy, hook)
        cached = model.generate(**x, max_new_tokens=STEPS, do_sample=False, suppress_tokens=[model.config.image_token_id])
    assert torch.equal(uncached, cached)
    observed = [s for s in strategy.needs().signals if s.name in ("llm_observed", "llm_attention_observed")]
    assert len(calls) == len(observed) > 0
