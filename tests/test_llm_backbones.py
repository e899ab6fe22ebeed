"""LLaVA over LLM backbones other than Llama (Mistral, Qwen2, Phi-3, Gemma2, Gemma3): what vtoken's
in-LLM stages recompute (attention rows from q_proj / k_proj, causal masks, one rotary embedding)
either equals the model's own or is refused in one line, the model left as it was.

- A sliding window (Mistral, Qwen2 with use_sliding_window) is exact while the sequence fits in it
  (at keep-all the wrapped logits equal the plain model's); past it an in-LLM method stops with one
  line naming the window instead of attending past it (it gave logits 0.3 off and a shape error while
  decoding a padded batch); methods that prune before the LLM run.
- Phi-3's fused qkv_proj, Gemma2's soft-capped attention logits and Gemma3's per-layer-type rotary
  embeddings are refused at wrap for the methods that would read or rebuild them.
"""

import pytest
import torch
import transformers
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

import vtoken
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


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
@pytest.mark.parametrize("method", ["fastv", "transprune", "aif"])
def test_in_llm_methods_within_the_sliding_window_equal_the_plain_model(kind, method):
    model = _llava(_sliding(kind, window=64))
    x = _batch()
    real = x["attention_mask"].bool()
    with torch.no_grad():
        plain = model(**x).logits
        with vtoken.pruned(model, method, keep=1.0):
            wrapped = model(**x).logits
    torch.testing.assert_close(wrapped[real], plain[real], rtol=0, atol=1e-5)


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


def _phi3():
    return _llava(transformers.Phi3Config(**TEXT))


def _gemma2():
    return _llava(transformers.Gemma2Config(**TEXT, head_dim=16, attn_logit_softcapping=50.0), attn="eager")


def _gemma3():
    return _llava(transformers.Gemma3TextConfig(**TEXT, head_dim=16, sliding_window=512))


@pytest.mark.parametrize("make,match", [
    (_phi3, "Phi3Attention without separate q_proj and k_proj"),
    (_gemma2, "soft-capped"),
    (_gemma3, "rotates each layer type with its own rotary embedding"),
])
@pytest.mark.parametrize("method", ["fastv", "transprune", "aif"])
def test_what_vtoken_cannot_recompute_in_the_llm_is_refused_at_wrap(make, match, method):
    model = make()
    before = _state(model)
    with pytest.raises(ValueError, match=match) as error:
        vtoken.wrap(model, method)
    assert "\n" not in str(error.value) and "fastv)" not in str(error.value)  # never suggests a method refused alike
    assert _unchanged(model, before)
    if make is not _gemma3:  # vtoken.methods() says LLaVA-1.5 runs the method, but not on such an LLM
        listed = {m["name"]: m for m in vtoken.methods()}[method]
        assert listed["families"]["LLaVA-1.5"] == "runs" and "Phi-3" in listed["limits"]["LLaVA-1.5"]
    vtoken.wrap(model, "pool", keep=0.25)  # before the LLM: runs
    with torch.no_grad():
        model(**_batch())


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
