"""LLaVA over LLM backbones other than Llama (Mistral, Qwen2, Phi-3, Gemma2, Gemma3): what vtoken's
in-LLM stages recompute (attention rows from q_proj / k_proj, causal masks, one rotary embedding)
either equals the model's own or is refused in one line, the model left as it was.

- A sliding window (Mistral, Qwen2 with use_sliding_window) is exact while the sequence fits in it
  (at keep-all the wrapped logits equal the plain model's); past it an in-LLM method stops with one
  line naming the window instead of attending past it (it gave logits 0.3 off and a shape error while
  decoding a padded batch); methods that prune before the LLM run.
- Phi-3's fused qkv_proj (with partial rotary, partial_rotary_factor < 1) and Gemma2's soft-capped
  attention logits are recomputed as the model computes them: the attention rows equal the eager map,
  keep-all equals the plain model, FastV keeps what the eager map ranks first, and pruned generation
  with a cache equals greedy decoding without one.
- Under a static cache no longer than the window, sliding-window layers write from their own count as
  plain static layers do: every in-LLM method equals the dynamic cache there; a static cache longer
  than the window (sliding layers with fewer slots) is refused in one line.
- Gemma3's per-layer-type rotary embeddings are refused at wrap for the methods that would rebuild
  them.
- The attention rows FastV, TransPrune and AIF recompute equal the eager map on every layer of LLMs
  that make their attention their own way (fused projections, soft caps, post-norms, q/k norms over
  the projection or per head, interleaved rotary, layers without rotary, a scale from the config).
"""

from functools import partial

import pytest
import torch
import transformers
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.cache_utils import StaticCache

import vtoken
from vtoken import compat
from tiny import IMAGE_TOKEN, PAD, left_pad

TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)


def _llava(text_config, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text_config, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    return model.eval()


def _batch() -> dict:
    """Two left-padded prompts of 22 and 25 tokens, 16 image tokens each."""
    ids, mask = left_pad([[1, 5, 6, *[IMAGE_TOKEN] * 16, 7, 8, 9], [1, 5, 6, 11, 12, 13, *[IMAGE_TOKEN] * 16, 7, 8, 9]])
    g = torch.Generator().manual_seed(0)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


def _sliding(kind: str, window: int):
    if kind == "mistral":
        return transformers.MistralConfig(**TEXT, sliding_window=window)
    return transformers.Qwen2Config(**TEXT, use_sliding_window=True, sliding_window=window, max_window_layers=0)


def _state(model) -> tuple:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return hooks, {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    hooks, tensors = _state(model)
    return (not vtoken.is_wrapped(model) and hooks == before[0]
            and all(torch.equal(tensors[k], before[1][k]) for k in tensors))


def _keep_all_is_the_plain_model(model, method: str) -> None:
    """At keep-all the wrapped model's logits on the padded batch are the plain model's."""
    x = _batch()
    real = x["attention_mask"].bool()
    with torch.no_grad():
        plain = model(**x).logits
        with vtoken.pruned(model, method, keep=1.0):
            wrapped = model(**x).logits
    torch.testing.assert_close(wrapped[real], plain[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
@pytest.mark.parametrize("method", ["fastv", "transprune", "aif"])
def test_in_llm_methods_within_the_sliding_window_equal_the_plain_model(kind, method):
    _keep_all_is_the_plain_model(_llava(_sliding(kind, window=64)), method)


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
@pytest.mark.parametrize("method", ["fastv", "transprune", "aif"])
def test_in_llm_methods_past_the_sliding_window_stop_in_one_line(kind, method):
    model = _llava(_sliding(kind, window=8))
    x = _batch()
    with torch.no_grad():
        plain = model(**x).logits
    vtoken.wrap(model, method, keep=0.25)
    with pytest.raises(ValueError, match=r"sliding window of 8 tokens, and this sequence has 25") as error:
        model.generate(**x, max_new_tokens=3, do_sample=False)
    assert "\n" not in str(error.value)
    vtoken.unwrap(model)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, plain)


@pytest.mark.parametrize("method", ["pool", "random", "zoo_prune"])
def test_methods_before_the_llm_run_past_the_sliding_window(method):
    """Pruned at the projector, the model builds its own (sliding) masks: generate with a cache
    equals recomputation without one."""
    model = _llava(_sliding("mistral", window=8))
    x = _batch()
    vtoken.wrap(model, method, keep=0.25)
    assert {stage.site for stage in vtoken.schedule_of(model).stages} == {"projector"}
    cached = model.generate(**x, max_new_tokens=4, do_sample=False)
    uncached = model.generate(**x, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("method", ["pool", "random", "zoo_prune"])
@pytest.mark.parametrize("text", ["mistral-8", "mistral-16", "gemma2-8"])
def test_methods_before_the_llm_under_a_static_cache_past_the_sliding_window_equal_the_dynamic_cache(text, method):
    """A prompt longer than the window under a static cache: generate hands the LLM a 4-D sliding mask
    whose last row no longer sees the prompt's first tokens, which were read as padding (other tokens
    than the dynamic cache's), and the pruned prompt's mask was cut to a sliding layer's slots when it
    was longer (the newest columns dropped). The pruned prompt shorter than the window (16) or longer
    (8), every layer sliding (Mistral) or every other one (Gemma2): static equals dynamic equals no
    cache, and at keep-all static equals the plain model's."""
    kind, window = text.split("-")
    config = (transformers.MistralConfig(**TEXT, sliding_window=int(window)) if kind == "mistral" else
              transformers.Gemma2Config(**TEXT, head_dim=16, query_pre_attn_scalar=4, sliding_window=int(window)))
    model = _llava(config, attn="sdpa" if kind == "mistral" else "eager")
    x = _batch()
    kwargs = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    plain = model.generate(**x, cache_implementation="static", **kwargs)
    with vtoken.pruned(model, method, keep=1.0):
        assert torch.equal(model.generate(**x, cache_implementation="static", **kwargs), plain)
    with vtoken.pruned(model, method, keep=0.25):
        dynamic = model.generate(**x, **kwargs)
        assert torch.equal(model.generate(**x, cache_implementation="static", **kwargs), dynamic)
        assert torch.equal(model.generate(**x, use_cache=False, **kwargs), dynamic)


def _phi3(attn: str = "sdpa"):
    # Half of each head rotated (partial_rotary_factor): the rest passes unrotated.
    return _llava(transformers.Phi3Config(**TEXT, partial_rotary_factor=0.5), attn=attn)


def _gemma2(attn: str = "eager"):
    # A cap of 2 on logits that reach several units: tanh bends them (at 50 the cap would change nothing here).
    return _llava(transformers.Gemma2Config(**TEXT, head_dim=16, attn_logit_softcapping=2.0,
                                            query_pre_attn_scalar=4), attn=attn)


def _gemma3():
    return _llava(transformers.Gemma3TextConfig(**TEXT, head_dim=16, sliding_window=512))


def _olmo2(attn: str = "sdpa"):
    # Post-norm layers (no input norm) and q/k RMSNorms over the whole projection, before the heads.
    return _llava(transformers.Olmo2Config(**TEXT), attn=attn)


def _cohere(attn: str = "sdpa"):
    # Rotary on interleaved pairs (x[0::2], x[1::2]); a LayerNorm of shape (heads, head_dim) on q and k.
    return _llava(transformers.CohereConfig(**TEXT, use_qk_norm=True), attn=attn)


def _glm(attn: str = "sdpa"):
    # Interleaved rotary on half of each head.
    return _llava(transformers.GlmConfig(**TEXT, head_dim=16, partial_rotary_factor=0.5), attn=attn)


def _stablelm(attn: str = "sdpa"):
    # A LayerNorm per head on q and k, applied with the heads first; a quarter of each head rotated.
    return _llava(transformers.StableLmConfig(**TEXT, qk_layernorm=True, partial_rotary_factor=0.25), attn=attn)


def _granite(attn: str = "sdpa"):
    # The softmax scale is the config's attention_multiplier, not head_dim ** -0.5.
    return _llava(transformers.GraniteConfig(**TEXT, attention_multiplier=0.3, embedding_multiplier=4.0,
                                             residual_multiplier=0.5, logits_scaling=2.0), attn=attn)


def _qwen3(attn: str = "sdpa"):
    # q/k RMSNorms per head.
    return _llava(transformers.Qwen3Config(**TEXT, head_dim=16), attn=attn)


def _smollm3(attn: str = "sdpa"):
    # Every fourth layer without rotary (NoPE): layer 3 of 4.
    return _llava(transformers.SmolLM3Config(**TEXT), attn=attn)


def _exaone4(attn: str = "sdpa"):
    # Post-norm layers with per-head q/k norms; the global layer (3 of 4) has no rotary.
    return _llava(transformers.Exaone4Config(**TEXT, sliding_window=4096), attn=attn)


def _cohere2(attn: str = "sdpa"):
    # Interleaved rotary on the sliding-window layers only; the global layer (3 of 4) has none.
    return _llava(transformers.Cohere2Config(**TEXT, sliding_window=4096), attn=attn)


RECOMPUTED = {"phi3": _phi3, "gemma2": _gemma2, "olmo2": _olmo2, "cohere": _cohere, "glm": _glm,
              "stablelm": _stablelm, "granite": _granite, "qwen3": _qwen3, "smollm3": _smollm3,
              "exaone4": _exaone4, "cohere2": _cohere2}


def _what_it_recomputes(name: str, layers) -> bool:
    """Each backbone's own way of making its attention, which the test of its rows is about."""
    from vtoken.adapters.hf_decoder import apply_rotary, rotary_of

    layer = layers[1]
    attention = compat.layer_attention(layer)
    parts = compat.attention_parts(attention)
    return {
        "phi3": lambda: not compat.has_separate_query_key(attention),
        "gemma2": lambda: parts.softcap == 2.0,  # the logits must reach the cap
        "olmo2": lambda: compat.is_post_norm_layer(layer) and compat.norm_before_head_split(parts.q_norm, parts.head_dim),
        "cohere": lambda: rotary_of(attention) is not apply_rotary and parts.q_norm is not None,
        "glm": lambda: rotary_of(attention) is not apply_rotary,
        "stablelm": lambda: isinstance(parts.q_norm, compat.HeadsFirst),
        "granite": lambda: parts.scaling == 0.3,
        "qwen3": lambda: parts.q_norm is not None and not compat.norm_before_head_split(parts.q_norm, parts.head_dim),
        "smollm3": lambda: not compat.attention_rotates(compat.layer_attention(layers[3])),
        "exaone4": lambda: compat.is_post_norm_layer(layer) and not compat.attention_rotates(compat.layer_attention(layers[3])),
        "cohere2": lambda: not compat.attention_rotates(compat.layer_attention(layers[3])) and rotary_of(attention) is not apply_rotary,
    }[name]()


@pytest.mark.parametrize("name", list(RECOMPUTED))
def test_attention_rows_of_fused_and_soft_capped_attention_equal_the_eager_map(name):
    """The rows FastV, TransPrune and AIF recompute beside the layer, against the model's own eager
    attention probabilities, on a left-padded batch: a fused qkv_proj's query and key columns with
    partial rotary (Phi-3), logits soft-capped before the mask (Gemma2), a post-norm layer with q/k
    norms over the whole projection (OLMo2), interleaved rotary pairs (Cohere, GLM), per-head
    LayerNorms taken with the heads first (StableLM), a scale from the config (Granite), per-head q/k
    norms (Qwen3)."""
    from vtoken.adapters.hf_decoder import llama_attention_rows

    model = RECOMPUTED[name](attn="eager")
    lm = model.model.language_model
    assert _what_it_recomputes(name, lm.layers)
    x = _batch()
    inputs = {}

    def keep_input(index, module, args, kwargs):
        inputs.setdefault(index, (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"]))

    handles = [layer.register_forward_pre_hook(partial(keep_input, i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    with torch.no_grad():
        out = model(**x, output_attentions=True)
        for handle in handles:
            handle.remove()
        for i, layer in enumerate(lm.layers):  # every layer: NoPE ones (SmolLM3, EXAONE 4) are not the first
            hidden, cos_sin = inputs[i]
            length = hidden.shape[1]
            query = torch.arange(length - 4, length).expand(hidden.shape[0], -1)
            rows = llama_attention_rows(layer, hidden, cos_sin, query, x["attention_mask"].bool())
            torch.testing.assert_close(rows, out.attentions[i][:, :, -4:, :], rtol=0, atol=2e-6, msg=lambda m: f"layer {i}: {m}")


@pytest.mark.parametrize("name", list(RECOMPUTED))
def test_llms_that_rotate_half_take_the_fast_rotary_and_the_others_their_own(name):
    """The rows rotate with vtoken's fast rotate-half path where the model's own function gives the
    same numbers (Llama's convention: most LLMs), and with the model's own function where it does
    not (interleaved pairs: Cohere, GLM, Cohere2's sliding layers). A wrong fast path would fall to
    the slow one without a change in any score; this is what sees it."""
    from vtoken.adapters.hf_decoder import apply_rotary, rotary_of

    attention = compat.layer_attention(RECOMPUTED[name]().model.language_model.layers[0])
    fast = rotary_of(attention) is apply_rotary
    assert fast == (name not in ("cohere", "glm", "cohere2"))


@pytest.mark.parametrize("name", list(RECOMPUTED))
@pytest.mark.parametrize("method", ["fastv", "transprune", "aif"])
def test_in_llm_methods_on_fused_and_soft_capped_attention(name, method):
    """Keep-all equals the plain model; pruned, generation with a cache equals greedy decoding
    without one (the recomputed rows decide the same tokens at every step's prefill)."""
    model = RECOMPUTED[name]()
    _keep_all_is_the_plain_model(model, method)
    x = _batch()
    with vtoken.pruned(model, method, keep=0.25):
        cached = model.generate(**x, max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
        uncached = model.generate(**x, max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN],
                                  use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_fused_projection_that_is_not_a_plain_linear_is_called_as_it_is():
    """The query and key columns of a plain qkv_proj come from its weight's rows; a hooked one (as
    a quantised, LoRA or offloaded projection, whose forward must run) is called whole and sliced:
    the same rows."""
    from vtoken import compat

    model = _phi3()
    attention = compat.layer_attention(model.model.language_model.layers[1])
    parts = compat.attention_parts(attention)
    x = torch.randn(2, 5, TEXT["hidden_size"])
    with torch.no_grad():
        plain_q, plain_k = parts.q_proj(x), parts.k_proj(x)
        calls = []
        handle = attention.qkv_proj.register_forward_hook(lambda m, a, o: calls.append(1))
        hooked_q, hooked_k = parts.q_proj(x), parts.k_proj(x)
        handle.remove()
        whole = attention.qkv_proj(x)
    assert len(calls) == 2
    queries = TEXT["num_attention_heads"] * attention.head_dim
    keys = TEXT["num_key_value_heads"] * attention.head_dim
    torch.testing.assert_close(hooked_q, whole[..., :queries], rtol=0, atol=0)
    torch.testing.assert_close(hooked_k, whole[..., queries : queries + keys], rtol=0, atol=0)
    torch.testing.assert_close(plain_q, hooked_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain_k, hooked_k, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(RECOMPUTED))
def test_fastv_on_fused_and_soft_capped_attention_keeps_what_the_eager_map_ranks_first(name):
    model = RECOMPUTED[name](attn="eager")
    x = _batch()
    with torch.no_grad():
        attention = model(**x, output_attentions=True).attentions[1][:, :, -1].mean(1)  # layer K-1 = 1, last row
    with vtoken.pruned(model, "fastv", layer=2, keep=0.25):
        with torch.no_grad():
            model(**x)
        selection = vtoken.selection(model)
    for b in range(x["input_ids"].shape[0]):
        visual = torch.nonzero(x["input_ids"][b] == IMAGE_TOKEN).squeeze(-1)
        kept = selection[b]["llm:2"]
        expected = torch.sort(torch.topk(attention[b, visual], len(kept)).indices).values
        assert kept.tolist() == expected.tolist()


@pytest.mark.parametrize("make", [lambda: _llava(_sliding("mistral", window=64)), _gemma2], ids=["mistral", "gemma2"])
def test_aif_evicting_from_sliding_window_cache_layers_decodes_as_without_a_cache(make):
    """AIF's ``mode="evict"`` takes the hidden tokens out of the cache's layers; a sliding-window layer
    (every layer of Mistral's, every other of Gemma2's) sized its next masks by the tokens it had
    taken before, one mask column per evicted token too many (a shape error at the first decoding
    step). Within the window, cached decoding equals decoding without a cache."""
    model = make()
    x = _batch()
    with vtoken.pruned(model, "aif", mode="evict", ratio="adaptive"):
        cached = model.generate(**x, max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
        uncached = model.generate(**x, max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN],
                                  use_cache=False)
    assert torch.equal(cached, uncached)


def _layer_lengths(cache) -> list[int]:
    return [compat.cache_layer_kv(cache, layer)[0].shape[2] for layer in range(compat.num_cache_layers(cache))]


STATIC_STEPS = 6


@pytest.mark.parametrize("method,options", [("fastv", {"keep": 0.25}), ("transprune", {"keep": 0.25}),
                                            ("aif", {"keep": 0.4, "mode": "evict"}), ("aif", {"keep": 0.4, "query": "next"}),
                                            ("random", {"keep": 0.5, "site": "llm", "layer": 1})])
@pytest.mark.parametrize("make", [lambda: _llava(_sliding("mistral", window=4096)), _gemma2], ids=["mistral", "gemma2"])
def test_a_static_cache_with_sliding_window_layers_equals_the_dynamic_cache(make, method, options):
    """Under a static cache no longer than the window, a sliding-window layer (every layer of
    Mistral's, every other of Gemma2's) writes its tokens one after the other from its own count, as a
    plain static layer does: an in-LLM stage runs over it (it was refused). generate's static cache
    gives the dynamic cache's tokens, so does a StaticCache continued from, and each layer holds as many
    tokens as the dynamic cache's (AIF's eviction rewrote the kept ones to its first slots)."""
    model = make()
    x = _batch()
    length = x["input_ids"].shape[1]
    kwargs = dict(do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    with vtoken.pruned(model, method, **options):
        dynamic = model.generate(**x, max_new_tokens=STATIC_STEPS, return_dict_in_generate=True, **kwargs)
        static = model.generate(**x, max_new_tokens=STATIC_STEPS, cache_implementation="static",
                                return_dict_in_generate=True, **kwargs)
        assert torch.equal(static.sequences, dynamic.sequences)
        assert _layer_lengths(compat.output_cache(static)) == _layer_lengths(compat.output_cache(dynamic))
        cache = StaticCache(config=model.config.get_text_config(), max_cache_len=length + STATIC_STEPS)
        kinds = {type(layer).__name__ for layer in cache.layers}
        assert "StaticSlidingWindowLayer" in kinds
        first = model.generate(**x, max_new_tokens=STATIC_STEPS // 2, return_dict_in_generate=True,
                               **compat.cache_kwargs(cache), **kwargs)
        new = first.sequences.shape[1] - length
        mask = torch.cat([x["attention_mask"], torch.ones(first.sequences.shape[0], new, dtype=torch.long)], dim=1)
        continued = model.generate(input_ids=first.sequences, attention_mask=mask, max_new_tokens=STATIC_STEPS - new,
                                   **compat.cache_kwargs(compat.output_cache(first)), **kwargs)
        assert torch.equal(continued, dynamic.sequences)


def test_a_static_cache_longer_than_the_sliding_window_is_refused_naming_its_slots():
    """Gemma2 under a StaticCache longer than its window: its sliding-window layers hold fewer slots
    than its full-attention ones and size their masks by them, which an in-LLM stage does not model;
    the one line names the layers and their slots, and the model is left as it was."""
    model = _llava(transformers.Gemma2Config(**TEXT, head_dim=16, query_pre_attn_scalar=4, sliding_window=30),
                   attn="eager")
    x = _batch()
    with torch.no_grad():
        plain = model(**x).logits  # (transformers adds its own hooks on a first forward)
    before = _state(model)
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=40)
    vtoken.wrap(model, "fastv", keep=0.25)
    with pytest.raises(ValueError, match=r"got StaticCache of .*StaticSlidingWindowLayer.* layers holding 30 and 40 "
                                         r"slots\. Use the default cache, a static cache no longer than the sliding "
                                         r"window") as error:
        model.generate(**x, max_new_tokens=2, do_sample=False, **compat.cache_kwargs(cache))
    assert "\n" not in str(error.value)
    vtoken.unwrap(model)
    assert _unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, plain)


@pytest.mark.parametrize("method", ["fastv", "transprune", "aif"])
def test_what_vtoken_cannot_recompute_in_the_llm_is_refused_at_wrap(method):
    model = _gemma3()
    before = _state(model)
    with pytest.raises(ValueError, match="rotates each layer type with its own rotary embedding") as error:
        vtoken.wrap(model, method)
    assert "\n" not in str(error.value) and "fastv)" not in str(error.value)  # never suggests a method refused alike
    assert _unchanged(model, before)
    # vtoken.methods() says LLaVA-1.5 runs the method, but not on such an LLM
    listed = {m["name"]: m for m in vtoken.methods()}[method]
    assert listed["families"]["LLaVA-1.5"] == "runs" and "Gemma3" in listed["limits"]["LLaVA-1.5"]
    vtoken.wrap(model, "pool", keep=0.25)  # before the LLM: runs, each image keeping a quarter of its 16 tokens
    with torch.no_grad():
        model(**_batch())
    assert [[len(kept) for kept in sample.values()] for sample in vtoken.selection(model)] == [[4], [4]]


@pytest.mark.parametrize("method", ["fastv", "transprune", "aif"])
def test_a_decoder_layer_whose_attention_input_vtoken_cannot_tell_is_refused_at_wrap(method):
    """A layer with no ``input_layernorm`` that is not OLMo2's post-norm kind: what its attention
    reads is unknown, so the methods that recompute it are refused in one line, the model unchanged
    (OLMo2's layers run: ``test_attention_rows_of_fused_and_soft_capped_attention_equal_the_eager_map``)."""
    model = _llava(transformers.LlamaConfig(**TEXT))
    for layer in model.model.language_model.layers:
        layer.norm_before_attention = layer.input_layernorm
        del layer.input_layernorm
    before = _state(model)
    with pytest.raises(ValueError, match="no input_layernorm") as error:
        vtoken.wrap(model, method)
    assert "\n" not in str(error.value)
    assert _unchanged(model, before)



#: LLMs whose attention vtoken's recomputed rows cannot reproduce, each for its own reason, and what
#: the refusal names: q/k norms under other names applied after the rotary (HunYuan: rows 0.36 off
#: the eager map before the refusal), attention sinks joining the softmax (GPT-OSS: 7e-3 off), a
#: complex rotary embedding (Llama 4: a raw unpacking error), an attention of another kind and name
#: (JetMoE's mixture of attention heads, ``self_attention``: a raw AttributeError).
UNREPRODUCIBLE_ATTENTION = {
    "hunyuan_v1_dense": ("sdpa", {}, "normalises its queries or keys with query_layernorm, key_layernorm"),
    "gpt_oss": ("eager", dict(num_local_experts=4, num_experts_per_tok=2), r"parameters of its own \(sinks"),
    "llama4_text": ("sdpa", dict(num_local_experts=2, use_qk_norm=False), "has no apply_rotary_pos_emb"),
    "jetmoe": ("sdpa", {}, "runs self_attention and no self_attn"),
}


@pytest.mark.parametrize("kind", list(UNREPRODUCIBLE_ATTENTION))
@pytest.mark.parametrize("method", ["fastv", "transprune", "aif"])
def test_attention_vtoken_cannot_reproduce_is_refused_at_wrap_naming_why(kind, method):
    attn, extra, why = UNREPRODUCIBLE_ATTENTION[kind]
    model = _llava(transformers.AutoConfig.for_model(kind, **TEXT, head_dim=16, **extra), attn=attn)
    before = _state(model)
    if kind == "llama4_text" and method == "transprune":  # its layers' branches are refused first
        why = "not one self_attn and one mlp module each"
    with pytest.raises(ValueError, match=why) as error:
        vtoken.wrap(model, method)
    assert "\n" not in str(error.value) and "fastv)" not in str(error.value)  # never suggests a method refused alike
    assert _unchanged(model, before)



@pytest.mark.parametrize("method", ["fastv", "transprune", "aif", "random"])
def test_an_llm_mixing_tokens_beside_its_attention_is_refused_in_llm_stages(method):
    """FalconH1's layers run a Mamba mixer beside the attention: dropping tokens inside the LLM broke
    its state's shapes (a raw RuntimeError from FastV, a cache error from AIF). Every in-LLM stage is
    refused in one line, the model unchanged; pruning before the LLM runs and decodes as without a
    cache."""
    model = _llava(transformers.FalconH1Config(**TEXT, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4,
                                                mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                                                mamba_chunk_size=8))
    before = _state(model)
    options = {"site": "llm", "layer": 1} if method == "random" else {}
    with pytest.raises(ValueError, match="runs mamba beside a self_attn and an MLP") as error:
        vtoken.wrap(model, method, keep=0.25, **options)
    assert "\n" not in str(error.value)
    assert _unchanged(model, before)
    x = _batch()
    with vtoken.pruned(model, "pool", keep=0.25):
        cached = model.generate(**x, max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
        uncached = model.generate(**x, max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN], use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("keep", [0.25, 1.0])
def test_a_static_cache_holding_recurrent_state_is_refused_a_pruned_prompt(keep):
    """FalconH1 reads its Mamba layers' padding mask off the last columns of the 2-D mask, which
    vtoken pads to a static cache's slots with zeros: pruned before the LLM (even keeping every
    token), the static cache's scores were up to 2e-3 off the dynamic cache's. Refused in one line
    instead; the same call with the default cache runs, the model unchanged."""
    model = _llava(transformers.FalconH1Config(**TEXT, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4,
                                                mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                                                mamba_chunk_size=8))
    x = _batch()
    options = dict(max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    if not hasattr(transformers.cache_utils, "LinearAttentionCacheLayerMixin"):  # read apart from vtoken's check
        pytest.skip("this transformers has no static cache layers with a recurrent state")
    with vtoken.pruned(model, "pool", keep=keep):
        dynamic = model.generate(**x, **options)
        with pytest.raises(ValueError, match="hold a recurrent \\(Mamba\\) state") as error:
            model.generate(**x, cache_implementation="static", **options)
        assert "\n" not in str(error.value)
        assert torch.equal(model.generate(**x, **options), dynamic)

def test_transprune_observes_an_mlp_branch_under_another_name_and_refuses_two_modules_in_one():
    """GraniteMoE keeps its MLP branch in ``block_sparse_moe``: TransPrune's TTV reads that module's
    input and output (its selection equals TTV computed from the two branches hooked apart here,
    Eqs. 1-3 written out). GraniteMoE-Shared adds a ``shared_mlp`` into the same branch, no one
    module's output: refused in one line."""
    import torch.nn.functional as F

    model = _llava(transformers.GraniteMoeConfig(**TEXT, num_local_experts=4, num_experts_per_tok=2))
    _keep_all_is_the_plain_model(model, "transprune")
    x = _batch()
    layer = model.model.language_model.layers[0]
    io = {}
    def attention_branch(module, args, kwargs, output):
        io.setdefault("attention", (args[0] if args else kwargs["hidden_states"], output[0]))

    def mlp_branch(module, args, output):
        io.setdefault("mlp", (args[0], output))

    handles = [layer.self_attn.register_forward_hook(attention_branch, with_kwargs=True),
               layer.block_sparse_moe.register_forward_hook(mlp_branch)]
    with torch.no_grad():
        model(**x)
    for handle in handles:
        handle.remove()
    with vtoken.pruned(model, "transprune", stages=[{"site": "llm", "layer": 1, "keep": 0.5}], ttv_only=True):
        with torch.no_grad():
            model(**x)
        got = [sample["llm:1"] for sample in vtoken.selection(model)]
    for b in range(2):
        real = x["attention_mask"][b].bool()
        visual = torch.nonzero(x["input_ids"][b][real] == IMAGE_TOKEN).squeeze(-1)
        ttv = 0
        for x_in, x_out in io.values():
            t_in, t_out = x_in[b][real], x_out[b][real]
            turn = 1 - F.cosine_similarity(t_out, t_in, dim=-1)
            ttv = ttv + torch.softmax(turn, dim=0) * t_out.norm(dim=-1) / t_in.norm(dim=-1)
        assert torch.equal(got[b], torch.sort(torch.topk(ttv[visual], 8).indices).values)

    shared = _llava(transformers.GraniteMoeSharedConfig(**TEXT, num_local_experts=4, num_experts_per_tok=2,
                                                        shared_intermediate_size=32))
    before = _state(shared)
    with pytest.raises(ValueError, match="not one self_attn and one mlp module each") as error:
        vtoken.wrap(shared, "transprune")
    assert "\n" not in str(error.value)
    assert _unchanged(shared, before)
    _keep_all_is_the_plain_model(shared, "fastv")  # its attention is Granite's: FastV's rows run there

def test_pool_is_refused_a_grid_missing_its_first_patch():
    """A SigLIP tower under vision_feature_select_strategy='default': LLaVA drops the first of 16
    patches, so pool has no whole grid to pool (every forward failed inside pool before)."""
    from transformers import SiglipVisionConfig

    torch.manual_seed(0)
    vision = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=transformers.LlamaConfig(**TEXT), image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default")).eval()
    before = _state(model)
    with pytest.raises(ValueError, match=r"grid missing its first patch.*a method that does not need it \(random, fastv\)"):
        vtoken.wrap(model, "pool", keep=0.25)
    assert _unchanged(model, before)
    assert "misses a patch" in {m["name"]: m for m in vtoken.methods()}["pool"]["limits"]["LLaVA-1.5"]
