"""One wrapped model used by two threads at once: each request's state is its own (the adapter's
hooks reach the running request through a per-thread route, decoding state is keyed by the KV
cache), so each thread gets exactly what it gets alone."""

import threading

import pytest
import torch

import vtoken
from families import FAMILIES
from tiny import same_selections

STEPS = 6


def _generate(model, x):
    return model.generate(**x, max_new_tokens=STEPS, do_sample=False, suppress_tokens=[model.config.image_token_id])


@pytest.mark.parametrize("method,options", [
    ("fastv", {"keep": 0.4}),                       # inside the LLM: per-layer-group decoding state
    ("pool", {"keep": 0.25}),                       # before the LLM
    ("repshift", {"mode": "merge", "keep": 0.5}),   # merging, with sizes carried between stages
    ("random", {"keep": 0.3, "site": "vision", "layer": 1}),  # inside the vision encoder
])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_threads_get_what_each_gets_alone(method, options, family):
    refusal = FAMILIES[family].refusal(method, options)
    if refusal is not None:
        pytest.skip(refusal)
    _two_threads(method, options, family)


@pytest.mark.parametrize("method", ["aif", "transprune", "vflowopt", "zoo_prune"])
def test_two_threads_with_the_other_methods(method):
    _two_threads(method, {"keep": 0.4}, "llava")


def _two_threads(method, options, family):
    model = FAMILIES[family].make()
    inputs = [FAMILIES[family].inputs(model), FAMILIES[family].several_images(model)]
    vtoken.wrap(model, method, **options)
    alone, alone_selections = [], []
    for x in inputs:
        alone.append(_generate(model, x))
        alone_selections.append(vtoken.selection(model))
    results: dict = {}
    start = threading.Barrier(len(inputs))

    errors = []
    selections: dict = {}

    def work(i):
        start.wait()
        try:
            for round_ in range(3):
                results[i, round_] = _generate(model, inputs[i])
                selections[i, round_] = vtoken.selection(model)  # this thread's own last prefill
        except Exception as error:  # reported below, with the thread's traceback
            errors.append(error)
            raise

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    vtoken.unwrap(model)
    assert not errors, errors
    assert len(results) == 3 * len(inputs)
    for (i, round_), out in results.items():
        assert torch.equal(out, alone[i])
        assert same_selections(selections[i, round_], alone_selections[i])
