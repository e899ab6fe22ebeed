"""Checks every registered method joins automatically (as kvpress does for its presses): keep-all is
the identity, budgets are met exactly, cached decoding equals recomputation, and SDPA and eager
attention choose the same tokens. A new strategy file is covered without touching this one."""

import pytest
import torch

import vtoken
from vtoken.registry import get_strategy
from tiny import greedy_without_cache, tiny_llava, tiny_llava_next
from families import FAMILIES, cases

METHODS = [
    m["name"] for m in vtoken.methods()
    if not m["name"].startswith("_") and not m["trained"] and not m["needs_annotations"]
]
MODELS = {name: (family.make, family.inputs) for name, family in FAMILIES.items()}


def _model(name, attn="sdpa"):
    make, inputs = MODELS[name]
    model = make(attn)
    return model, inputs(model)


def _final(selection):
    return [list(s.values())[-1] for s in selection]


@pytest.mark.parametrize("method,name", cases(METHODS))
def test_keep_all_is_the_identity(method, name):
    model, x = _model(name)
    with torch.no_grad():
        ref = model(**x).logits
    with vtoken.pruned(model, method, keep=1.0):
        with torch.no_grad():
            out = model(**x).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method", METHODS)
def test_budget_is_met_exactly(method):
    model, x = _model("llava")
    with vtoken.pruned(model, method, keep_tokens=5):
        with torch.no_grad():
            model(**x)
        kept = _final(vtoken.selection(model))
    assert [len(k) for k in kept] == [5, 5, 5]
    assert all(len(set(k.tolist())) == 5 and int(k.max()) < 16 for k in kept)


@pytest.mark.parametrize("method,name", cases(METHODS))
def test_cached_generation_equals_recomputation(method, name):
    model, x = _model(name)
    # A random tiny model may prefer the image placeholder as its next word; a real one never
    # emits it, and a prompt with one placeholder too many has no features to fill it.
    suppress = [model.config.image_token_id]
    with vtoken.pruned(model, method, keep=0.4):
        cached = model.generate(**x, max_new_tokens=5, do_sample=False, suppress_tokens=suppress)
        config = vtoken.config_of(model)
        strategy = vtoken.strategy_of(model)
        bound_stages = strategy.stages()  # depth-relative defaults resolved
        mask_stage = strategy.mask_stage().stage if strategy.mask_stage() is not None else None
        selection = vtoken.selection(model)
    llm_stages = [s for s in bound_stages if s.site == "llm"]
    if mask_stage is not None:
        # A mask stage (AIF) hides tokens from the text instead of dropping them, and decides from
        # the text after the image, which grows when recomputing: replay its choice as a mask.
        from test_aif import _ReplayMask

        _ReplayMask.plan = {b: sel[mask_stage.name].tolist() for b, sel in enumerate(selection)}
        with vtoken.pruned(model, "_test_replay_mask", keep=0.4, layer=mask_stage.layer):
            uncached = greedy_without_cache(model, x, 5, suppress)
    elif llm_stages and not _merges(method):
        # Scores inside the LLM may read the whole prompt (FastV's last token), which grows when
        # recomputing: replay the prefill's choice (see test_all_families's replay strategy).
        from test_all_families import _ReplayStrategy

        stages = [dict(site=s.site, layer=s.layer, keep=s.keep, keep_tokens=s.keep_tokens, rounding=s.rounding)
                  for s in bound_stages]
        _ReplayStrategy.plan = {s.name: {b: sel[s.name].tolist() for b, sel in enumerate(selection)} for s in bound_stages}
        with vtoken.pruned(model, "_test_replay", stages=stages, positions=config.positions):
            uncached = greedy_without_cache(model, x, 5, suppress)
    else:
        with vtoken.pruned(model, method, keep=0.4):
            uncached = greedy_without_cache(model, x, 5, suppress)
    assert torch.equal(uncached, cached)


def _merges(method) -> bool:
    # A merging method overrides reduce() and returns features; replaying indices cannot reproduce it.
    from vtoken.strategies.base import Strategy

    return get_strategy(method).reduce is not Strategy.reduce


@pytest.mark.parametrize("method", METHODS)
def test_sdpa_and_eager_choose_the_same_tokens(method):
    chosen, logits = [], []
    for attn in ("sdpa", "eager"):
        model, x = _model("llava", attn)
        with vtoken.pruned(model, method, keep=0.25):
            with torch.no_grad():
                logits.append(model(**x).logits[:, -1])  # padded rows differ between backends by design
            chosen.append([s for s in vtoken.selection(model)])
    assert all(
        torch.equal(a[k], b[k]) for a, b in zip(chosen[0], chosen[1]) for k in a
    )
    assert torch.allclose(logits[0], logits[1], atol=1e-4)


@pytest.mark.parametrize("method", [m["name"] for m in vtoken.methods() if not m["name"].startswith("_")])
def test_needs_stay_within_what_the_method_says_it_reads(method):
    """``needs()`` on a bound strategy names only signals listed in the class's ``reads`` (what
    ``vtoken.methods()`` shows per family), and every one of them exists on LLaVA."""
    from test_generation import _options

    model = tiny_llava()
    with vtoken.pruned(model, method, **_options(method)):
        strategy = vtoken.strategy_of(model)
        assert strategy.needs().names() <= set(type(strategy).reads)


def test_a_method_a_family_cannot_serve_is_refused_naming_the_signal():
    from test_tokenpacker import _packer

    model = tiny_llava_next()
    with pytest.raises(ValueError, match=r"tokenpacker needs each image .* \(signal 'one_grid_per_image'\), but this "
                                         r"LLaVA-NeXT model gives LLaVA-NeXT AnyRes"):
        vtoken.wrap(model, "tokenpacker", weights=_packer(2))
    assert not vtoken.is_wrapped(model)
    listed = {m["name"]: m for m in vtoken.methods()}
    assert listed["tokenpacker"]["families"]["LLaVA-1.5"] == "runs"
    assert "one patch grid" in listed["tokenpacker"]["families"]["LLaVA-NeXT"]
    from vtoken.adapters import VISION_ONLY

    assert all(v == "runs" for family, v in listed["fastv"]["families"].items() if family not in VISION_ONLY)
    assert all("lacks" in listed["fastv"]["families"][family] for family in VISION_ONLY)
