"""Keys a stage's scoring projected at LLM layer K are handed to layer K (vtoken/adapters/key_reuse.py).

TransPrune scores its stage at K with layer K's own attention (IGA, Eq. 5), which projects the keys
of every token; the layer then needs the kept tokens' keys. The layer must project no row itself, and
everything it computes (logits, the KV cache, pad slots included) must be what it would have computed
projecting them: the tests compare against the same run with the hand-over switched off, on every
family's padded batch (images of different sizes: samples keep different counts, so the stage makes
pad slots, and Qwen's key projection has a bias, so a pad's key is not 0), and on post-norm LLMs
(OLMo2, Exaone4), whose key projection reads the layer's input itself.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from vtoken import compat
from vtoken.adapters import key_reuse

from families import FAMILIES, cases


def _decoder_layers(model):
    return model.model.language_model.layers


def _key_projection(layer):
    return compat.attention_parts(compat.layer_attention(layer)).k_proj


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _prefill(model, x, handed: bool, monkeypatch, norm_rows: list[list[int]] | None = None):
    """Logits, the KV cache's keys and values per layer, and the rows each LLM layer's own key
    projection saw (calls outside the scoring), for a TransPrune prefill at keep 0.25; ``norm_rows``
    gathers the same for each layer's input norm."""
    if not handed:
        monkeypatch.setattr(key_reuse.KeyReuse, "after_stage", lambda self, *args: None)
    rows: list[list[int]] = [[] for _ in _decoder_layers(model)]
    # Registered before the wrap, so before vtoken's hooks: they see the modules' own outputs.
    handles = [_key_projection(layer).register_forward_hook(lambda m, a, out, i=i: rows[i].append(out.shape[-2]))
               for i, layer in enumerate(_decoder_layers(model))]
    if norm_rows is not None:
        norm_rows.extend([] for _ in _decoder_layers(model))
        handles += [compat.decoder_input_norm(layer).register_forward_hook(
            lambda m, a, out, i=i: norm_rows[i].append(out.shape[-2])) for i, layer in enumerate(_decoder_layers(model))]
    try:
        with vtoken.pruned(model, "transprune", keep=0.25), torch.no_grad():
            stages = [s.layer for s in vtoken.strategy_of(model).stages()]
            out = model(**x, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
        monkeypatch.undo()
    cache = compat.output_cache(out)
    kv = [compat.cache_layer_kv(cache, i) for i in range(len(rows))]
    return out.logits, kv, rows, stages


@pytest.mark.parametrize("method,family", cases(["transprune"]))
def test_the_layer_projects_no_key_and_computes_what_it_would_have(method, family, monkeypatch):
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in _decoder_layers(model):
            bias = _key_projection(layer).bias
            if bias is not None:  # initialised to 0: a pad's key would be 0 whoever projected it
                bias.copy_(torch.randn(bias.shape, generator=generator))
        model(**x)  # transformers adds hooks of its own at a model's first forward
    hooks = _hook_count(model)
    norm_rows, plain_norm_rows = [], []
    logits, kv, rows, stages = _prefill(model, x, True, monkeypatch, norm_rows)
    plain_logits, plain_kv, plain_rows, _ = _prefill(model, x, False, monkeypatch, plain_norm_rows)
    for layer in stages:
        # the scoring's norm and projection (every row before the stage), then the layer's own: no row
        assert rows[layer][-1] == 0, (layer, rows[layer])
        assert norm_rows[layer][-1] == 0, (layer, norm_rows[layer])
        assert plain_rows[layer][-1] > 0 and plain_norm_rows[layer][-1] > 0
    assert rows[0] == plain_rows[0] and norm_rows[0] == plain_norm_rows[0]  # layers without a stage as before
    assert torch.equal(logits, plain_logits)
    for (k, v), (pk, pv) in zip(kv, plain_kv):
        assert torch.equal(k, pk) and torch.equal(v, pv)  # pad slots' keys included
    assert _hook_count(model) == hooks  # the hooks added during the forward go with the wrap


@pytest.mark.parametrize("name", ["olmo2", "exaone4"])
def test_a_post_norm_layer_takes_the_keys_transprune_scored_on(name, monkeypatch):
    """A post-norm layer (OLMo2, Exaone4: no input norm, its attention reads the layer's input) is
    handed the kept tokens' keys as a pre-norm one is: its key projection runs on no row at a stage's
    layer, and the logits and KV cache of a padded batch equal those of the layer projecting them.
    The count assumed the hand-over, and was 3.9% under FlopCounterMode on a random OLMo2 LLaVA-NeXT
    (``eval/fuzz_flops.py``): now equal FLOP for FLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    from test_llm_backbones import RECOMPUTED, _batch
    from tiny import IMAGE_TOKEN

    model, x = RECOMPUTED[name](attn="eager"), _batch()
    logits, kv, rows, stages = _prefill(model, x, True, monkeypatch)
    plain_logits, plain_kv, plain_rows, _ = _prefill(model, x, False, monkeypatch)
    assert stages and all(rows[layer][-1] == 0 < plain_rows[layer][-1] for layer in stages), (rows, plain_rows)
    assert torch.equal(logits, plain_logits)
    assert all(torch.equal(k, pk) and torch.equal(v, pv) for (k, v), (pk, pv) in zip(kv, plain_kv))
    ids = torch.tensor([[1, 5, 6, *[IMAGE_TOKEN] * 16, 7, 8, 9, 10, 11]])
    inputs = {"input_ids": ids, "pixel_values": x["pixel_values"][:1]}
    with vtoken.pruned(model, "transprune", keep=0.25), torch.no_grad():
        model(**inputs, logits_to_keep=1)
        with FlopCounterMode(display=False) as counter:
            model(**inputs, logits_to_keep=1)
        assert vtoken.flops(model, text_tokens=8, instruction_tokens=5).prefill == counter.get_total_flops()


def test_a_merging_stage_keeps_the_layer_projecting(monkeypatch):
    """Keys are handed over only when the stage selected rows unchanged: a stage that merged features
    into its kept rows leaves the layer to project their keys itself."""
    from vtoken.pruner import Pruner

    model = FAMILIES["llava"].make()
    x = FAMILIES["llava"].inputs(model)
    run_stage = Pruner.run_sequence_stage

    def merged(self, *args, **kwargs):
        result = run_stage(self, *args, **kwargs)
        return result._replace(selected_from=None)  # as if the rows held merged features

    monkeypatch.setattr(Pruner, "run_sequence_stage", merged)
    rows = [[] for _ in _decoder_layers(model)]
    handles = [_key_projection(layer).register_forward_hook(lambda m, a, out, i=i: rows[i].append(out.shape[-2]))
               for i, layer in enumerate(_decoder_layers(model))]
    with vtoken.pruned(model, "transprune", keep=0.25), torch.no_grad():
        stages = [s.layer for s in vtoken.strategy_of(model).stages()]
        model(**x)
    for handle in handles:
        handle.remove()
    assert all(rows[layer][-1] > 0 for layer in stages)


def test_a_method_that_never_reads_the_current_layer_adds_no_key_hooks():
    model = FAMILIES["llava"].make()
    x = FAMILIES["llava"].inputs(model)
    layers = _decoder_layers(model)
    with vtoken.pruned(model, "fastv", keep=0.25), torch.no_grad():
        before = [len(_key_projection(layer)._forward_hooks) for layer in layers]
        model(**x)
        assert [len(_key_projection(layer)._forward_hooks) for layer in layers] == before


def test_compiled_equals_eager_with_keys_handed_over():
    """Under torch.compile the hooks added during the first forward run eagerly too: the compiled
    wrapped model gives the eager one's logits, its stage layers still projecting no row."""
    torch._dynamo.reset()
    model = FAMILIES["llava"].make()
    x = FAMILIES["llava"].inputs(model)
    layers = _decoder_layers(model)
    rows = [[] for _ in layers]
    handles = [_key_projection(layer).register_forward_hook(lambda m, a, out, i=i: rows[i].append(out.shape[-2]))
               for i, layer in enumerate(layers)]
    try:
        with vtoken.pruned(model, "transprune", keep=0.25), torch.no_grad():
            stages = [s.layer for s in vtoken.strategy_of(model).stages()]
            eager = model(**x).logits
            compiled = torch.compile(model)
            for row in rows:
                row.clear()
            torch.testing.assert_close(compiled(**x).logits, eager, rtol=1e-5, atol=1e-5)
    finally:
        for handle in handles:
            handle.remove()
        torch._dynamo.reset()
    assert all(rows[layer] and rows[layer][-1] == 0 for layer in stages), rows


# --- keys a layer already left in the KV cache --------------------------------------------------------
# A layer that has run leaves its keys (after its key norm and rotary embedding) in the cache: FastV's
# score at K from layer K-1's attention and AIF's probe of every layer read them there instead of
# projecting every token's key a second time. Where the cache cannot be trusted to hold exactly them
# (none, a sliding-window layer that has cut tokens, a stage that changed the layer's input) the keys are
# projected as before.


def _scored_attention(model, x, method: str, options: dict, from_cache: bool, monkeypatch, **call):
    """Every attention-row block scoring computed ``[B, H, Q, L]``, whether each took the cache's
    keys, and the key-projection rows per LLM layer, for one prefill."""
    from vtoken.adapters import hf_decoder

    if not from_cache:
        monkeypatch.setattr(compat, "prompt_keys", lambda *args, **kwargs: None)
    seen, rows = [], [[] for _ in _decoder_layers(model)]
    original = hf_decoder.query_attention_rows

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append((result[0], kwargs.get("rotated_keys", args[7] if len(args) > 7 else None) is not None))
        return result

    monkeypatch.setattr(hf_decoder, "query_attention_rows", spy)
    handles = [_key_projection(layer).register_forward_hook(lambda m, a, out, i=i: rows[i].append(out.shape[-2]))
               for i, layer in enumerate(_decoder_layers(model))]
    try:
        with vtoken.pruned(model, method, **options), torch.no_grad():
            logits = model(**x, **call).logits
    finally:
        for handle in handles:
            handle.remove()
        monkeypatch.undo()
    return logits, seen, rows


@pytest.mark.parametrize("method,family", cases(["fastv", "aif"]))
def test_attention_scored_on_the_cached_keys_is_the_projected_keys(method, family, monkeypatch):
    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    options = {"keep": 0.3}
    logits, cached, rows = _scored_attention(model, x, method, options, True, monkeypatch)
    plain_logits, projected, plain_rows = _scored_attention(model, x, method, options, False, monkeypatch)
    assert cached and all(used for _, used in cached)  # every block read the cache's keys
    assert not any(used for _, used in projected)
    assert len(cached) == len(projected)
    for (a, _), (b, _) in zip(cached, projected):
        # the same keys; the query rows' norm runs on the gathered rows alone (per token, rounded alike
        # up to the reduction's blocking)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert torch.equal(logits, plain_logits)  # the same tokens kept
    # Each scored layer's key projection ran once (the layer's own), not twice.
    assert sum(map(len, rows)) + len(cached) == sum(map(len, plain_rows))


@pytest.mark.parametrize("method,family", [("fastv", "llava"), ("aif", "qwen2"), ("fastv", "onevision"), ("aif", "qwen3")])
def test_attention_scored_under_a_static_cache_reads_its_written_keys(method, family, monkeypatch):
    """A plain static cache holds the prompt's keys in its first slots: scoring reads them there (no
    second projection) and gets the projected keys' rows and the same kept tokens; a read of the
    whole buffer (its empty tail as keys) would give other rows."""
    from transformers.cache_utils import StaticCache

    model = FAMILIES[family].make()
    x = FAMILIES[family].inputs(model)
    config = model.config.get_text_config()

    def static():
        return compat.cache_kwargs(StaticCache(config=config, max_cache_len=x["input_ids"].shape[1] + 24))

    logits, cached, rows = _scored_attention(model, x, method, {"keep": 0.3}, True, monkeypatch, **static())
    plain_logits, projected, plain_rows = _scored_attention(model, x, method, {"keep": 0.3}, False, monkeypatch,
                                                            **static())
    assert cached and all(used for _, used in cached)
    assert not any(used for _, used in projected)
    for (a, _), (b, _) in zip(cached, projected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert torch.equal(logits, plain_logits)
    assert sum(map(len, rows)) + len(cached) == sum(map(len, plain_rows))


def test_fastv_without_a_cache_projects_the_keys(monkeypatch):
    model = FAMILIES["llava"].make()
    x = FAMILIES["llava"].inputs(model)
    logits, seen, _ = _scored_attention(model, x, "fastv", {"keep": 0.3}, True, monkeypatch, use_cache=False)
    plain_logits, _, _ = _scored_attention(model, x, "fastv", {"keep": 0.3}, False, monkeypatch, use_cache=False)
    assert seen and not any(used for _, used in seen)
    assert torch.equal(logits, plain_logits)


def test_prompt_keys_trusts_only_a_layer_holding_every_prompt_key():
    from transformers.cache_utils import DynamicCache, StaticCache

    config = FAMILIES["llava"].make().config.get_text_config()
    keys = torch.randn(2, config.num_key_value_heads, 7, config.hidden_size // config.num_attention_heads)
    dynamic = DynamicCache(config=config)
    dynamic.update(keys, keys.clone(), 0)
    assert torch.equal(compat.prompt_keys(dynamic, 0, 7, keys.device), keys)
    assert torch.equal(compat.prompt_keys(dynamic, 0, 3, keys.device), keys[:, :, 4:])  # the newest tokens
    assert compat.prompt_keys(dynamic, 0, 8, keys.device) is None  # fewer held than asked
    assert compat.prompt_keys(dynamic, 0, 7, torch.device("meta")) is None  # elsewhere (offloaded)
    assert compat.prompt_keys(None, 0, 7, keys.device) is None
    static = StaticCache(config=config, max_cache_len=16)
    static.update(keys, keys.clone(), 0, {"cache_position": torch.arange(7)})
    # 16 slots, the first 7 written: those are its keys, never the empty tail
    assert torch.equal(compat.prompt_keys(static, 0, 7, keys.device), keys)
    assert torch.equal(compat.prompt_keys(static, 0, 3, keys.device), keys[:, :, 4:])
    assert compat.prompt_keys(static, 0, 8, keys.device) is None
    # A sliding-window layer (Mistral's): trusted while the prompt is within its window, not once it cut.
    from transformers.cache_utils import DynamicSlidingWindowLayer

    for window, trusted in ((16, True), (5, False)):
        sliding = DynamicSlidingWindowLayer(sliding_window=window)
        sliding.update(keys, keys.clone())
        held = type("Cache", (), {"layers": [sliding]})()
        got = compat.prompt_keys(held, 0, 7, keys.device)
        assert torch.equal(got, keys) if trusted else got is None, window
