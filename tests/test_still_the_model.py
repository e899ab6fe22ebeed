"""The wrapped model is still the model: what code written for the plain model does with it works,
on every family of ``tests/families.py`` and every method that runs there.

- ``generate`` continued from the cache it returned equals one ``generate`` call;
- assisted decoding (a plain assistant, the wrapped model as the assistant; a static cache too) and prompt-lookup
  decoding equal greedy decoding;
- a forward with ``labels`` gives the loss computed by hand on the kept sequence, and gradients flow;
- ``copy.deepcopy`` gives a model that runs on its own state;
- ``return_dict=False``, ``inputs_embeds`` with pixels, image tokens without pixels behave as the
  plain model's.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import vtoken
from transformers import StaticCache
from vtoken import compat
from families import FAMILIES, cases
from tiny import alone

METHODS = [
    m["name"] for m in vtoken.methods()
    if not m["name"].startswith("_") and not m["trained"] and not m["needs_annotations"]
]
STEPS = 6


def _options(method: str) -> dict:
    return {"keep": 0.4}


def _generate(model, x, **extra):
    # (a random tiny model may prefer the image placeholder as its next word; a real one never does)
    suppress = [model.config.image_token_id, getattr(model.config, "video_token_id", model.config.image_token_id)]
    return model.generate(**x, max_new_tokens=STEPS, do_sample=False, suppress_tokens=suppress, **extra)


@pytest.mark.parametrize("batch", ["padded", "one sample"])
@pytest.mark.parametrize("method,family", cases(METHODS))
def test_continuing_from_the_returned_cache_equals_one_call(method, family, batch):
    """``generate`` continued from the cache it returned gives the tokens of one call. A batch with no
    padding (one sample) has an all-ones mask, which generate drops: the continued call's first
    forward then has no mask to say where the sequence ends (it re-fed the prompt's tokens past the
    pruned cache's length as new ones)."""
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    if batch == "one sample":
        x = alone(x, 0)
    with vtoken.pruned(model, method, **_options(method)):
        whole = _generate(model, x)
        suppress = [model.config.image_token_id, getattr(model.config, "video_token_id", model.config.image_token_id)]
        first = model.generate(**x, max_new_tokens=STEPS // 2, do_sample=False, return_dict_in_generate=True,
                               suppress_tokens=suppress)
        sequences = first.sequences
        cache = compat.output_cache(first)
        new = sequences.shape[1] - x["input_ids"].shape[1]
        mask = torch.cat([x["attention_mask"], torch.ones(sequences.shape[0], new, dtype=torch.long)], dim=1)
        # As with the plain model, the continuation passes the longer ids and the cache, no pixels;
        # transformers' prompt-reuse recipe continues from deep copies of the cache, here twice.
        def continue_from(cache):
            return model.generate(input_ids=sequences, attention_mask=mask, max_new_tokens=STEPS - new,
                                  do_sample=False, suppress_tokens=suppress, **compat.cache_kwargs(cache))

        copies = [copy.deepcopy(cache), copy.deepcopy(cache)]
        assert torch.equal(continue_from(copies[0]), whole)
        assert torch.equal(continue_from(copies[1]), whole)
        assert torch.equal(continue_from(cache), whole)
        # A cache whose link to its request is lost (pickled) and that pruning left shorter than its
        # prompt is refused at a decoding step, not read as the plain model's.
        orphan = copy.deepcopy(cache)
        vars(orphan).update(pickle.loads(pickle.dumps({k: v for k, v in vars(orphan).items() if k == "_vtoken_decoding"})))
        if compat.cache_length(orphan) < mask.shape[1] - 1:
            with pytest.raises(ValueError, match="no longer knows its layout"):
                model(input_ids=sequences[:, -1:], attention_mask=mask, **compat.cache_kwargs(orphan))


@pytest.mark.parametrize("method,family", cases(METHODS))
def test_assisted_and_prompt_lookup_decoding_equal_greedy(method, family):
    model = FAMILIES[family].make()
    assistant = FAMILIES[family].make(seed=1)
    x = alone(FAMILIES[family].inputs(model), 0)  # assisted decoding takes one sample
    with vtoken.pruned(model, method, **_options(method)):
        greedy = _generate(model, x)
        assert torch.equal(_generate(model, x, prompt_lookup_num_tokens=3), greedy)
        assert torch.equal(_generate(model, x, assistant_model=assistant), greedy)
    # The wrapped model as the assistant: called with the image tokens but no pixels, it runs them
    # as text as the plain model does, and the output is the main model's greedy output.
    plain_greedy = _generate(model, x)
    with vtoken.pruned(assistant, method, **_options(method)):
        assert torch.equal(_generate(model, x, assistant_model=assistant), plain_greedy)
    # With a static cache the rejected candidates are rolled back by moving each layer's count back
    # (its slots stay), wherever the installed transformers runs the plain model so (5.23 refuses
    # static caches in assisted decoding). The cache has room for the last step's candidates, which
    # generate's own static cache lacks (it holds max_length slots; the plain model's write past
    # them fails too).
    def static():
        return compat.cache_kwargs(StaticCache(config=model.config.get_text_config(),
                                               max_cache_len=x["input_ids"].shape[1] + STEPS + 4))

    for options in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=assistant)):
        try:
            _generate(model, x, **static(), **options)
        except ValueError:
            continue
        with vtoken.pruned(model, method, **_options(method)):
            assert torch.equal(_generate(model, x, **static(), **options), greedy)


def _hand_computed_loss(model, x, logits, labels, selection) -> torch.Tensor:
    """Cross-entropy of next-token prediction over the kept sequence of each sample: its text
    tokens and the visual tokens of the last stage's selection, right-aligned as the logits are."""
    placeholder = model.config.image_token_id
    width = logits.shape[1]
    kept_labels = torch.full((labels.shape[0], width), -100, dtype=torch.long)
    for b in range(labels.shape[0]):
        ids, valid = x["input_ids"][b], x["attention_mask"][b].bool()
        is_visual = ids == placeholder
        rank = is_visual.long().cumsum(0) - 1
        kept_visual = set(list(selection[b].values())[-1].tolist()) if selection[b] else set()
        positions = [p for p in range(ids.shape[0]) if valid[p] and (not is_visual[p] or int(rank[p]) in kept_visual)]
        kept_labels[b, width - len(positions):] = labels[b, positions]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), kept_labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def _random_labels(x: dict) -> torch.Tensor:
    """Labels of random text ids on the prompt's real tokens, -100 on its padding."""
    g = torch.Generator().manual_seed(5)
    return torch.where(x["attention_mask"].bool(), torch.randint(3, 90, x["input_ids"].shape, generator=g), -100)


@pytest.mark.parametrize("method,family", cases(METHODS))
def test_labels_give_the_loss_on_the_kept_sequence_and_gradients_flow(method, family):
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    labels = _random_labels(x)
    with vtoken.pruned(model, method, **_options(method)):
        with torch.no_grad():
            out = model(**x, labels=labels)
        selection = vtoken.selection(model)
        masks_only = vtoken.strategy_of(model).mask_stage() is not None
        if masks_only:  # a mask stage removes nothing: the logits cover the whole prompt
            logits = out.logits
            expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                       ignore_index=-100)
        else:
            expected = _hand_computed_loss(model, x, out.logits, labels, selection)
        torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
        model.train()
        try:
            loss = model(**x, labels=labels).loss
            loss.backward()
        finally:
            model.eval()
    head = model.lm_head.weight.grad
    projector = next(vtoken.adapters.adapter_for(model)(model).projector().parameters()).grad
    assert head is not None and bool(torch.isfinite(head).all()) and float(head.abs().sum()) > 0
    assert projector is not None and float(projector.abs().sum()) > 0
    model.zero_grad()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_all_loss_is_the_plain_loss(family):
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    labels = torch.where(x["attention_mask"].bool(), x["input_ids"], -100)
    with torch.no_grad():
        plain = model(**x, labels=labels).loss
        with vtoken.pruned(model, "random", keep=1.0):
            assert torch.equal(model(**x, labels=labels).loss, plain)
            out = model(**x, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], plain)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_bare_model_wrapped_refuses_the_outer_models_labels_in_one_line(family):
    """``vtoken.wrap(model.model, ...)`` (the bare model) and ``labels`` given to the model around it:
    its loss would pair the kept tokens' logits with the whole prompt's labels (a raw shape error, or
    a silently wrong loss where the padded batch keeps its width), so a prefill that drops tokens is
    refused in one line naming the fix, as is ``logits_to_keep`` given as positions. Without them the
    outer model runs as when the whole model is wrapped; where nothing moves (keep=1.0, AIF's mask)
    its loss is the whole-model wrap's."""
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    labels = _random_labels(x)
    outer = type(model).__name__
    with torch.no_grad():
        with vtoken.pruned(model, "pool", keep=0.5):
            expected = model(**x).logits
        with vtoken.pruned(model.model, "pool", keep=0.5):
            with pytest.raises(ValueError, match=rf"^labels were passed to {outer}\.forward, .* wrap the {outer} itself"):
                model(**x, labels=labels)
            with pytest.raises(ValueError, match=rf"^logits_to_keep was passed to {outer}\.forward as positions"):
                model(**x, logits_to_keep=torch.tensor([x["input_ids"].shape[1] - 1]))
            assert torch.equal(model(**x).logits, expected)

            def training_step(bare, inputs, labels):  # a caller that is not the model around it
                return bare(**inputs)

            alone = model.model(**x).last_hidden_state
            assert torch.equal(training_step(model.model, x, labels).last_hidden_state, alone)
        for method, options in (("random", {"keep": 1.0}), ("aif", {"keep": 0.5})):
            with vtoken.pruned(model, method, **options):
                whole = model(**x, labels=labels).loss
            with vtoken.pruned(model.model, method, **options):
                torch.testing.assert_close(model(**x, labels=labels).loss, whole, rtol=1e-5, atol=1e-6)


def test_the_bare_model_wrapped_with_a_count_of_every_token_takes_the_outer_models_labels():
    """A count budget equal to every image's visual tokens drops nothing, so the outer model's labels
    still line up: its loss is the plain model's, not a refusal (the LLaVA-1.5 batch, whose images
    all have 16 tokens); one token fewer is refused."""
    model = FAMILIES["llava"].make()
    x = FAMILIES["llava"].inputs(model)
    labels = _random_labels(x)
    counts = [run for row in x["input_ids"] for run in _runs(row == model.config.image_token_id)]
    assert set(counts) == {16}
    with torch.no_grad():
        plain = model(**x, labels=labels).loss
        with vtoken.pruned(model.model, "random", keep_tokens=16):
            torch.testing.assert_close(model(**x, labels=labels).loss, plain, rtol=1e-5, atol=1e-6)
        with vtoken.pruned(model.model, "random", keep_tokens=15):
            with pytest.raises(ValueError, match=r"^labels were passed to LlavaForConditionalGeneration\.forward"):
                model(**x, labels=labels)


def _runs(flags: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D boolean tensor."""
    runs, length = [], 0
    for flag in [*flags.tolist(), False]:
        if flag:
            length += 1
        elif length:
            runs, length = runs + [length], 0
    return runs


@pytest.mark.parametrize("method", ["pool", "fastv", "aif"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_outer_model_generates_with_its_bare_model_wrapped_as_when_wrapped_whole(family, method):
    """With only ``model.model`` wrapped, ``model.generate`` (which calls the outer forward, which
    calls the bare model) prunes the same and gives the same tokens and selection as the whole model
    wrapped, on the padded batch."""
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    with vtoken.pruned(model, method, keep=0.4):
        whole = _generate(model, x)
        selected = vtoken.selection(model)
    with vtoken.pruned(model.model, method, keep=0.4):
        assert torch.equal(_generate(model, x), whole)
        bare = vtoken.selection(model.model)
    assert len(bare) == len(selected) and all(a.keys() == b.keys() for a, b in zip(bare, selected))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(bare, selected) for k in a)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_deep_copy_runs_on_its_own_state(family):
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    vtoken.wrap(model, "fastv", keep=0.4)
    with torch.no_grad():
        ref = model(**x).logits
    ref_selection = vtoken.selection(model)
    hooks = _hook_objects(model)
    clone = copy.deepcopy(model)
    assert vtoken.is_wrapped(clone) and vtoken.is_wrapped(model)
    # The model was not unwrapped and wrapped again to be copied: the same hooks, its last run kept.
    assert _hook_objects(model) == hooks and str(vtoken.selection(model)) == str(ref_selection)
    with torch.no_grad():
        assert torch.equal(clone(**x).logits, ref)
        assert torch.equal(_generate(clone, x), _generate(model, x))
        for parameter in clone.parameters():  # independent weights
            parameter.add_(0.5)
        assert torch.equal(model(**x).logits, ref)
        clone(**x)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(vtoken.selection(model), ref_selection) for k in a)
    vtoken.unwrap(clone)
    vtoken.unwrap(model)
    assert not hasattr(clone, "_vtoken_state") and "__deepcopy__" not in vars(clone)
    plain = FAMILIES[family].make()
    with torch.no_grad():
        plain(**x)  # (transformers installs its output-capturing hooks on the first forward)
    assert _shape(_hook_objects(clone)) == _shape(_hook_objects(plain))


def _hook_objects(model) -> list:
    """Every forward (pre-)hook and every instance attribute holding a callable (a method replaced
    per instance: ``forward``, ``generate``, vtoken's own) on the model's modules, by name and object."""
    found = []
    for name, module in model.named_modules():
        found += [(name, key, id(fn)) for hooks in (module._forward_pre_hooks, module._forward_hooks)
                  for key, fn in hooks.items()]
        found += [(name, key, id(value)) for key, value in vars(module).items()
                  if callable(value) and not isinstance(value, torch.nn.Module)]
    return found


def _shape(found: list) -> list:
    """Hooks counted per module, instance attributes by name (hook keys are global counters)."""
    return sorted((name, key if isinstance(key, str) else "hook") for name, key, _ in found)


#: PEFT's get_peft_model reads transformers' ``is_gradient_checkpointing``, deprecated (a FutureWarning)
#: in every release vtoken admits: PEFT's, not vtoken's.
_PEFT_READS_A_DEPRECATED_NAME = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@_PEFT_READS_A_DEPRECATED_NAME
@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_a_wrapper_around_a_wrapped_model_copies_as_itself(family):
    """A PEFT model or torch.compile's module forwards unknown attributes (``__deepcopy__``) to the
    wrapped model it holds: deepcopy still gives a copy of the wrapper, holding a wrapped copy."""
    peft = pytest.importorskip("peft")
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    vtoken.wrap(model, "fastv", keep=0.4)
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights=True))
    with torch.no_grad():
        ref = lora(**x).logits
    clone = copy.deepcopy(lora)
    assert type(clone) is type(lora) and clone.base_model.model is not model
    assert vtoken.is_wrapped(clone.base_model.model)
    with torch.no_grad():
        assert torch.equal(clone(**x).logits, ref)
    compiled = torch.compile(model, backend="eager")
    assert type(copy.deepcopy(compiled)) is type(compiled)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_wrapped_model_pickles_wrapped(family):
    """``torch.save(model)`` / pickle: the loaded model is wrapped the same way and prunes the same
    (pickled before a forward: transformers' output-capturing hooks, installed by the first forward,
    do not pickle on the plain model either)."""
    import io

    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    vtoken.wrap(model, "random", keep=0.4)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert vtoken.is_wrapped(loaded) and vtoken.config_of(loaded) == vtoken.config_of(model)
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)
    assert str(vtoken.selection(loaded)) == str(vtoken.selection(model))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_image_features_as_a_tuple(family):
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    extra = {k: x[k] for k in ("image_sizes", "image_grid_thw", "batch_num_images") if k in x}
    plain = model.model.get_image_features(pixel_values=x["pixel_values"], return_dict=False, **extra)
    with vtoken.pruned(model, "pool", keep=1.0):
        wrapped = model.model.get_image_features(pixel_values=x["pixel_values"], return_dict=False, **extra)
    assert isinstance(wrapped, tuple) and _same(wrapped, plain)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inputs_embeds_with_pixels_prune_as_input_ids_do(family):
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    embeds = model.get_input_embeddings()(x["input_ids"])
    direct = FAMILIES[family].positions
    if direct is not None:  # Qwen derives M-RoPE ids from input_ids: give both calls the same ids
        x = {**x, "position_ids": direct(model, x)}
    by_embeds = {**{k: v for k, v in x.items() if k != "input_ids"}, "inputs_embeds": embeds}
    with vtoken.pruned(model, "random", keep=0.4):
        with torch.no_grad():
            ref = model(**x).logits
            selection = vtoken.selection(model)
            out = model(**by_embeds).logits
        assert torch.equal(out, ref)
        assert all(torch.equal(a[k], b[k]) for a, b in zip(vtoken.selection(model), selection) for k in a)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_image_tokens_without_pixels_run_as_text_as_in_the_plain_model(family):
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    text = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}
    with torch.no_grad():
        plain = model(**text).logits
        with vtoken.pruned(model, "pool", keep=0.4):
            assert torch.equal(model(**text).logits, plain)


def _static_equals_dynamic(model, x) -> None:
    """Under the pruning in force, generate's static cache gives what the dynamic cache gives, in the
    first call and continued from the static cache it returned."""
    dynamic = _generate(model, x)
    assert torch.equal(_generate(model, x, cache_implementation="static"), dynamic)
    suppress = [model.config.image_token_id, getattr(model.config, "video_token_id", model.config.image_token_id)]
    # Room for the whole generation (generate's own static cache holds only its call's tokens).
    static = StaticCache(config=model.config.get_text_config(), max_cache_len=x["input_ids"].shape[1] + STEPS)
    first = model.generate(**x, max_new_tokens=STEPS // 2, do_sample=False, return_dict_in_generate=True,
                           suppress_tokens=suppress, **compat.cache_kwargs(static))
    new = first.sequences.shape[1] - x["input_ids"].shape[1]
    mask = torch.cat([x["attention_mask"], torch.ones(first.sequences.shape[0], new, dtype=torch.long)], dim=1)
    continued = model.generate(input_ids=first.sequences, attention_mask=mask, max_new_tokens=STEPS - new,
                               do_sample=False, suppress_tokens=suppress, **compat.cache_kwargs(compat.output_cache(first)))
    assert torch.equal(continued, dynamic)


@pytest.mark.parametrize("method,family", cases(METHODS))
def test_a_static_cache_equals_the_dynamic_cache(method, family):
    """A static cache's layers each write from their own count, so layers that hold fewer tokens after
    an in-LLM stage need only masks over all the cache's slots (and a mask stage's rerun over a
    cropped prefix, AIF's, only those masks too): generate's static cache (and its compiled path)
    equals the dynamic cache for every method, before or inside the LLM, in the first call and
    continued from the cache it returned."""
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    with vtoken.pruned(model, method, **_options(method)):
        _static_equals_dynamic(model, x)


def _prompt_cache_lengths(model, x, **extra) -> list[int]:
    """How many tokens each layer of the cache holds after a one-token generate."""
    out = model.generate(**x, max_new_tokens=1, do_sample=False, return_dict_in_generate=True, **extra)
    cache = compat.output_cache(out)
    return [compat.cache_layer_kv(cache, layer)[0].shape[2] for layer in range(compat.num_cache_layers(cache))]


@pytest.mark.parametrize("options", [{"keep": 0.3, "query": "next"}, {"keep": 0.4, "mode": "evict"},
                                     {"keep": 0.3, "mode": "evict", "query": "next", "layer": 1}])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_aif_over_a_static_cache_equals_the_dynamic_cache(family, options):
    """AIF's next-token probe (one decoding step on the prefill's cache, then cut back) attends over
    the slots a static cache has written, not its whole buffer (the unwritten slots' scores of 0 in
    the softmax chose other tokens on Qwen2-VL); evicting the hidden tokens rewrites the kept ones to
    each layer's first slots. The same selection, the same tokens, first call and continued, as over
    a dynamic cache, and the evicted layers hold as few tokens."""
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    with vtoken.pruned(model, "aif", **options):
        _generate(model, x)
        dynamic = vtoken.selection(model)
        _generate(model, x, cache_implementation="static")
        static = vtoken.selection(model)
        assert [sorted(s) for s in static] == [sorted(d) for d in dynamic]
        assert all(torch.equal(s[k], d[k]) for s, d in zip(static, dynamic) for k in s)
        _static_equals_dynamic(model, x)
        held = _prompt_cache_lengths(model, x, cache_implementation="static")
        assert held == _prompt_cache_lengths(model, x)
    if options.get("mode") == "evict":
        assert held[-1] < x["input_ids"].shape[1] + 1


@pytest.mark.parametrize("options", [{"keep": 0.3, "query": "next"}, {"keep": 0.3, "mode": "evict", "query": "next", "layer": 1}])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_aif_probes_the_next_token_over_a_static_cache_with_no_slot_left(family, options):
    """A static cache sized to the prompt has no slot for AIF's next-token probe: a fresh model's
    ``generate(max_new_tokens=1, cache_implementation="static")`` (generate sizes its cache to
    ``max_length - 1``) and a ``StaticCache`` of exactly the prompt's length in a forward. The probe
    steps over a copy of what the cache holds (the index_copy_ past the last slot raised an
    IndexError): the dynamic cache's tokens and logits, the same selection, and the static cache holds
    the dynamic one's keys and values."""
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    length = x["input_ids"].shape[1]
    with torch.no_grad(), vtoken.pruned(model, "aif", **options):
        one = dict(max_new_tokens=1, do_sample=False, suppress_tokens=[model.config.image_token_id])
        assert torch.equal(model.generate(**x, cache_implementation="static", **one), model.generate(**x, **one))
        dynamic = model(**x, use_cache=True)
        selection = vtoken.selection(model)
        static_cache = StaticCache(config=model.config.get_text_config(), max_cache_len=length)
        static = model(**x, use_cache=True, **compat.cache_kwargs(static_cache))
        assert [sorted(s) for s in vtoken.selection(model)] == [sorted(s) for s in selection]
        assert all(torch.equal(a[k], b[k]) for a, b in zip(vtoken.selection(model), selection) for k in a)
    torch.testing.assert_close(static.logits, dynamic.logits, rtol=0, atol=1e-5)
    grown = compat.output_cache(dynamic)
    for layer in range(compat.num_cache_layers(grown)):
        for ours, theirs in zip(compat.cache_layer_kv(static_cache, layer), compat.cache_layer_kv(grown, layer)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,options", [("random", {"keep": 1.0}), ("random", {"keep": 1.0, "site": "vision", "layer": 1}),
                                            ("tome", {"keep": 1.0})])  # ToMe at keep 1: a wrap with no stage
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_static_cache_at_keep_all_equals_the_plain_model(family, method, options):
    if not FAMILIES[family].supports(options):
        pytest.skip(f"{family} does not prune inside its vision encoder yet")
    refusal = FAMILIES[family].refusal(method, options)
    if refusal:
        pytest.skip(refusal)
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    plain = _generate(model, x, cache_implementation="static")
    with vtoken.pruned(model, method, **options):
        assert torch.equal(_generate(model, x, cache_implementation="static"), plain)


@pytest.mark.parametrize("method,options", [("pool", {"keep": 0.4}), ("fastv", {"keep": 0.4}),
                                            ("random", {"keep": 0.5, "site": "vision", "layer": 1})])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(method, options):
    model = FAMILIES["llava"].make()
    x = FAMILIES["llava"].inputs(model)
    labels = torch.where(x["attention_mask"].bool(), x["input_ids"], -100)
    grads = []
    with vtoken.pruned(model, method, **options):
        model.train()
        try:
            for checkpointing in (False, True):
                if checkpointing:
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                model(**x, labels=labels).loss.backward()
                grads.append(model.lm_head.weight.grad.clone())
                model.zero_grad()
        finally:
            model.activation_checkpointing_disable()
            model.eval()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_a_mask_stage_refuses_gradient_checkpointing():
    """AIF reruns the text over the prefix's KV cache after its mask stage; gradient checkpointing runs
    the LLM without one: refused in one line (it failed with a shape error), the model unchanged: once
    checkpointing is off, its loss is the one it gave before."""
    model = FAMILIES["llava"].make()
    x = FAMILIES["llava"].inputs(model)
    labels = torch.where(x["attention_mask"].bool(), x["input_ids"], -100)
    with vtoken.pruned(model, "aif"):
        model.train()
        before = model(**x, labels=labels).loss.detach()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        try:
            with pytest.raises(ValueError, match=r"activation_checkpointing_disable\(\)"):
                model(**x, labels=labels)
            model.activation_checkpointing_disable()
            assert torch.equal(model(**x, labels=labels).loss.detach(), before)
        finally:
            model.activation_checkpointing_disable()
            model.eval()


@pytest.mark.parametrize("make", ["make_timm", "make_open_clip"])
def test_a_vit_with_its_own_gradient_checkpointing_is_refused(make):
    """timm's and open_clip's set_grad_checkpointing rerun the blocks in backward, after vtoken's
    encoding closed (unpruned: torch.utils.checkpoint failed with a CheckpointError); refused at the
    forward. Under no_grad (nothing reruns) it gives what it gives once switched off, and then the
    gradients reach the patch embedding."""
    import vision_families

    model = getattr(vision_families, make)()
    x = vision_families.images(2)
    forward = model if make == "make_timm" else model.encode_image
    with vtoken.pruned(model, "pool", keep=0.25):
        model.set_grad_checkpointing(True)
        model.train()
        with pytest.raises(ValueError, match=r"set_grad_checkpointing\(False\)"):
            forward(x)
        with torch.no_grad():
            checkpointed = forward(x)
        model.set_grad_checkpointing(False)
        out = forward(x)
        assert torch.equal(out.detach(), checkpointed)
        out.pow(2).mean().backward()
        grads = [p.grad for name, p in model.named_parameters() if "patch_embed" in name or "conv1" in name]
        assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@_PEFT_READS_A_DEPRECATED_NAME
def test_a_model_is_wrapped_once_as_a_whole():
    """A part of a wrapped model, or a model holding a wrapped part, is refused naming the fix."""
    model = FAMILIES["llava"].make()
    vtoken.wrap(model, "pool", keep=0.4)
    try:
        with pytest.raises(ValueError, match="is part of a LlavaForConditionalGeneration wrapped by vtoken"):
            vtoken.wrap(model.model.vision_tower, "pool", keep=0.4)
    finally:
        vtoken.unwrap(model)
    vtoken.wrap(model.model.vision_tower, "pool", keep=0.4)  # allowed once the outer model is unwrapped
    try:
        with pytest.raises(ValueError, match="holds a CLIPVisionModel already wrapped"):
            vtoken.wrap(model, "pool", keep=0.4)
    finally:
        vtoken.unwrap(model.model.vision_tower)
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(ValueError, match=r"wrap the model it holds \(vtoken.wrap\(peft_model.base_model.model"):
        vtoken.wrap(lora, "pool", keep=0.4)


def test_compiled_equals_eager_in_either_order():
    """Wrap then compile: the compiled model prunes (vtoken's hooks run eagerly between graphs) and
    equals the eager wrapped model. Compile, run, then wrap: the compiled caller is retraced, so the
    pruning is never silently skipped."""
    torch._dynamo.reset()
    model = FAMILIES["llava"].make()
    x = FAMILIES["llava"].inputs(model)
    with vtoken.pruned(model, "pool", keep=0.4):
        with torch.no_grad():
            eager = model(**x).logits
        compiled = torch.compile(model)
        with torch.no_grad():
            torch.testing.assert_close(compiled(**x).logits, eager, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(**x)  # compiled before the wrap
        with vtoken.pruned(model, "pool", keep=0.4):
            out = compiled(**x).logits
    assert out.shape == eager.shape
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    # Wrapping the compiled module wraps the model it compiled.
    with torch.no_grad():
        with vtoken.pruned(compiled, "pool", keep=0.4):
            assert vtoken.is_wrapped(model)
            torch.testing.assert_close(compiled(**x).logits, eager, rtol=1e-5, atol=1e-5)
        assert not vtoken.is_wrapped(model)
    torch._dynamo.reset()


@pytest.mark.parametrize("family,memory", [("llava", "150KB"), ("next", "1KB")])
def test_an_offloaded_model_generates_as_the_in_memory_one(family, memory, tmp_path):
    """accelerate's hooks (device_map with CPU and disk offload) rebuild the encoder output object
    around the same features; the wrapped model finds its encoding by them. With everything on disk
    (1KB), LLaVA-NeXT's own image_newline is loaded by the core's hook only when its forward starts,
    after the pre-hook where vtoken encodes the images: a meta-tensor error before vtoken loaded it."""
    from transformers import AutoModelForImageTextToText

    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    model.save_pretrained(tmp_path / "model")
    offloaded = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": memory}, offload_folder=str(tmp_path / "offload"),
    ).eval()
    assert any(hasattr(module, "_hf_hook") for module in offloaded.modules())
    for method, options in [("pool", {"keep": 0.4}), ("fastv", {"keep": 0.4}), ("random", {"keep": 0.5, "site": "vision", "layer": 1})]:
        with vtoken.pruned(model, method, **options):
            in_memory = _generate(model, x)
        with vtoken.pruned(offloaded, method, **options):
            assert torch.equal(_generate(offloaded, x), in_memory)


@pytest.mark.parametrize("method", ["fastv", "pool", "zoo_prune"])
def test_wrap_then_change_the_dtype_and_load_with_device_map_auto(method, tmp_path):
    """``wrap`` then ``.to(torch.bfloat16)`` runs in the new dtype and equals wrapping the converted
    model; ``from_pretrained(..., device_map="auto")`` (accelerate) then ``wrap`` equals the in-memory
    model wrapped."""
    from transformers import LlavaForConditionalGeneration

    make = FAMILIES["llava"].make
    x = FAMILIES["llava"].inputs(make())
    converted_after = vtoken.wrap(make(), method).to(torch.bfloat16)
    converted_before = vtoken.wrap(make().to(torch.bfloat16), method)
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in x.items()}
    with torch.no_grad():
        after, before = converted_after(**bf16).logits, converted_before(**bf16).logits
    assert after.dtype == torch.bfloat16 and torch.equal(after, before)
    model = make()
    model.save_pretrained(tmp_path / "model")
    loaded = vtoken.wrap(LlavaForConditionalGeneration.from_pretrained(tmp_path / "model", device_map="auto").eval(), method)
    vtoken.wrap(model, method)
    assert torch.equal(_generate(loaded, x), _generate(model, x))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_attention_mask_of_another_shape_is_refused_in_one_line(family):
    """A 2-D mask that does not cover the prompt (another batch, a token short) is named with both
    shapes before anything runs; the next correct call is the wrapped model's as before."""
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    with vtoken.pruned(model, "pool", keep=0.5), torch.no_grad():
        expected = model(**x).logits
        for mask in (x["attention_mask"][:1], x["attention_mask"][:, :-1]):
            with pytest.raises(ValueError, match=r"^attention_mask has shape .* but the prompt is .*\(batch, length\)"):
                model(**{**x, "attention_mask": mask})
            # generate too (it failed inside vtoken with a shape error of torch's)
            with pytest.raises(ValueError, match=r"^attention_mask has shape .* but the prompt is .*\(batch, length\)"):
                model.generate(**{**x, "attention_mask": mask}, max_new_tokens=2)
        assert torch.equal(model(**x).logits, expected)


@pytest.mark.parametrize("method", ["pool", "fastv"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_to_keep_as_positions_names_positions_of_the_prompt(family, method):
    """``logits_to_keep`` as a tensor names positions of the prompt the caller passed, which pruning
    renumbers. Known by construction: a prompt's last tokens are its last kept slots, and a sample's
    first real token (text before any image) has the plain model's logits (it sees nothing pruned).
    Positions of the 1-D, 2-D integer and boolean forms; a dropped visual token is refused."""
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    batch, length = x["input_ids"].shape
    first = x["attention_mask"].long().argmax(-1)  # left padding: each sample's first real token
    assert not bool((x["input_ids"][torch.arange(batch), first] == model.config.image_token_id).any())
    with torch.no_grad():
        plain_first = model(**x).logits[torch.arange(batch), first]
        with vtoken.pruned(model, method, keep=0.4):
            every = model(**x).logits  # every kept slot
            last_two = model(**x, logits_to_keep=torch.tensor([length - 2, length - 1])).logits
            torch.testing.assert_close(last_two, every[:, -2:], rtol=0, atol=0)
            at_first = model(**x, logits_to_keep=first[:, None]).logits  # [B, 1] positions per sample
            torch.testing.assert_close(at_first[:, 0], plain_first, rtol=1e-5, atol=1e-5)
            mask = torch.zeros(batch, length, dtype=torch.bool)
            mask[:, -1] = True
            mask[torch.arange(batch), first] = True
            flat = model(**x, logits_to_keep=mask).logits  # [2B, V], sample by sample, in order
            torch.testing.assert_close(flat[0::2], plain_first, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(flat[1::2], every[:, -1], rtol=0, atol=0)
            kept = vtoken.selection(model)
            site = "projector" if method == "pool" else next(iter(kept[0]))
            visual = torch.nonzero(x["input_ids"][0] == model.config.image_token_id).squeeze(-1)
            dropped = [int(p) for i, p in enumerate(visual) if i not in set(kept[0][site].tolist())]
            with pytest.raises(ValueError, match="logits_to_keep asks for the logits of a visual token that pruning dropped"):
                model(**x, logits_to_keep=torch.tensor([dropped[0]]))
            if FAMILIES[family].positions is not None:
                return  # a hand-made decoding step needs M-RoPE ids the plain Qwen-VL model does not make either
            # A decoding step's positions are the step's own tokens: untouched.
            out = model(**x, use_cache=True, logits_to_keep=1)
            step = {"input_ids": torch.full((batch, 1), 5), "attention_mask": torch.cat(
                [x["attention_mask"], torch.ones(batch, 1, dtype=x["attention_mask"].dtype)], dim=1)}
            one = model(**step, **compat.cache_kwargs(compat.output_cache(out)), logits_to_keep=torch.tensor([0])).logits
            assert one.shape[:2] == (batch, 1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_to_keep_as_positions_on_a_text_only_prompt_passed_through(family):
    """text_only="passthrough": a prompt without images under a tensor logits_to_keep (the README's
    way to read a right-padded sample's last token) raised an AttributeError of vtoken's own record
    of the text-only prefill; it gives the plain model's logits."""
    model = FAMILIES[family].make()
    ids = torch.tensor([[1, 12, 13, 14, 15, 16], [0, 0, 1, 17, 18, 19]])
    mask = (ids != 0).long()
    keep = torch.zeros_like(mask, dtype=torch.bool)
    keep[:, -1] = True
    with torch.no_grad():
        plain = [model(input_ids=ids, attention_mask=mask, logits_to_keep=k).logits for k in (torch.tensor([5]), keep)]
        with vtoken.pruned(model, "random", keep=0.5, text_only="passthrough"):
            for k, expected in zip((torch.tensor([5]), keep), plain):
                torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, logits_to_keep=k).logits,
                                           expected, rtol=1e-5, atol=1e-5)  # (all slots' head, then picked)


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_a_hook_on_the_projector_sees_its_own_output_whenever_it_was_registered(family):
    """After a vision stage vtoken rebuilds the projector's output into the grid the model places; a
    hook registered after wrap ran behind that and saw the rebuilt grid (zero rows for the dropped
    tokens), one registered before saw the projector's own output: the same centring hook gave logits
    0.08 apart. vtoken's hook now runs last, whenever the user's was registered."""
    make, inputs = FAMILIES[family].make, FAMILIES[family].inputs
    x = inputs(make())
    logits, shapes = {}, {}
    for when in ("before", "after"):
        model = make()
        projector = model.model.visual.merger if family.startswith("qwen") else model.model.multi_modal_projector
        seen = []

        def centre(module, args, output):
            seen.append(tuple(output.shape))
            return output - output.mean(-2, keepdim=True)

        if when == "before":
            projector.register_forward_hook(centre)
        vtoken.wrap(model, "random", keep=0.5, site="vision", layer=1)
        if when == "after":
            projector.register_forward_hook(centre)
        with torch.no_grad():
            logits[when] = model(**x).logits
        shapes[when] = seen
    assert shapes["before"] == shapes["after"]
    torch.testing.assert_close(logits["before"], logits["after"], rtol=0, atol=0)


def test_images_after_a_cached_prefix_are_refused_naming_the_cache():
    """transformers' prompt-reuse recipe (a text prefix cached, then the image prompt over it) and PEFT
    prefix tuning hand the prefill a cache that already holds tokens: refused in one line that says so
    (it spoke of adding an image to a filled cache, which the caller never did)."""
    model = FAMILIES["llava"].make()
    x = FAMILIES["llava"].inputs(model)
    prefix = {"input_ids": x["input_ids"][:, :1], "attention_mask": x["attention_mask"][:, :1]}
    with vtoken.pruned(model, "pool", keep=0.5, text_only="passthrough"), torch.no_grad():
        cache = compat.output_cache(model(**prefix, use_cache=True))
        with pytest.raises(ValueError, match=r"vtoken prunes images at prefill, from an empty KV cache; this call adds "
                                             r"images to a cache that already holds 1 tokens \(a cached prefix") as error:
            model(**x, **compat.cache_kwargs(cache))
        assert "\n" not in str(error.value)


def test_a_peft_tuner_is_refused_with_the_peft_hint():
    """peft_model.base_model (a LoraModel) got the list of supported classes without the hint the
    PeftModel itself gets: wrap the model it holds."""
    peft = pytest.importorskip("peft")
    model = FAMILIES["llava"].make()
    tuned = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=2))
    for part in (tuned, tuned.base_model):
        with pytest.raises(ValueError, match=r"for a PEFT model, wrap the model it holds \(vtoken.wrap\(peft_model"):
            vtoken.wrap(part, "pool", keep=0.5)
    assert not vtoken.is_wrapped(tuned.base_model.model)
