"""vtoken.flops on the LLMs LLaVA's classes can hold besides Llama: mixture-of-experts ones
(``model_dims.ExpertsDims``) and dense ones whose FFN is two matrices or whose attention is its own
(``model_dims.TWO_MATRIX_MLP_MODEL_TYPES``), against what transformers builds and counts, exactly (the router and a shared expert's gate are under 1% of these models' FLOPs,
inside ``test_flops``'s tolerance).

Independent reference: ``torch.utils.flop_counter.FlopCounterMode`` on tiny random-weight models with
eager attention and transformers' eager experts (``_experts_implementation = "eager"``: one
``F.linear`` per expert over the tokens routed to it, which the counter sees; the default
``grouped_mm`` is invisible to it on CPU). Every token runs through exactly ``top_k`` experts, so the
count does not depend on the random routing. The LLMs: Mixtral's layout (every layer sparse, experts of
``intermediate_size``: Mixtral, OLMoE, PhiMoE, GraniteMoE) and Qwen's (experts of
``moe_intermediate_size`` in the layers that ``decoder_sparse_step`` and ``mlp_only_layers`` pick, a
gated shared expert in Qwen2-MoE) inside LLaVA, and Qwen3-VL-MoE. The shapes make every term show: the
dense layers' FFN, the experts and the router differ in width.
"""

from __future__ import annotations

import pytest
import torch
from test_flops import Tally, drive_clip_llava, drive_llm, llm, rows, split_text  # shared counter drivers
from test_flops_qwen import IMAGE as QWEN_IMAGE
from test_flops_qwen import QWEN3_GRID, QWEN3_IMAGE, patch_inputs, prompt, tiny_qwen3
from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from vtoken.accounting import flops, load_config, model_dims

IMAGE = 100
TEXT = 12
#: (model_type, the MoE fields of its text config): the layers differ where the layout lets them.
MOE_LLMS = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    "phimoe": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    # layer 1 sparse (step 2), layer 3 dense (mlp_only_layers), layers 0 and 2 dense (step)
    "qwen2_moe": dict(intermediate_size=80, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                      num_experts=6, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3]),
    "qwen3_moe": dict(intermediate_size=80, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3,
                      head_dim=16, mlp_only_layers=[0]),
}


def tiny_moe_llava(model_type: str) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14)
    text = AutoConfig.for_model(model_type, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                                bos_token_id=None, eos_token_id=None, pad_token_id=None, **MOE_LLMS[model_type])
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE))
    model.set_attn_implementation("eager")
    model.config.text_config._experts_implementation = "eager"  # one F.linear per expert: counted
    return model.eval()


@pytest.fixture(scope="module", params=sorted(MOE_LLMS))
def moe_llava(request):
    return tiny_moe_llava(request.param)


def test_full_forward_matches_counter(moe_llava):
    ids = torch.tensor([[1, 5, 6, 7, 8] + [IMAGE] * 16 + [9, 10, 11, 12, 13, 14, 15]])
    tally = Tally()
    tally("all", lambda: moe_llava(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56), logits_to_keep=1))
    report = flops(moe_llava, text_tokens=TEXT)
    assert report.prefill == tally.parts["all"]


@pytest.mark.parametrize("schedule", [
    pytest.param(llm((1, 9), scoring=[rows("llm", 1)]), id="K1-9"),
    pytest.param(llm((1, 12), (2, 8), (3, 4), scoring=[rows("llm", 1), rows("llm", 2), rows("llm", 3)]),
                 id="progressive"),
])
def test_in_llm_schedule_and_decode_match_counter(moe_llava, schedule):
    """Layers that keep different token counts run different MLPs: each layer's own is counted."""
    tally = Tally()
    visual = drive_clip_llava(moe_llava, schedule, torch.randn(1, 3, 56, 56), tally)
    before, after = split_text(moe_llava, TEXT)
    drive_llm(moe_llava, moe_llava.model.language_model, schedule, before, visual, after, tally, decode_steps=2)
    report = flops(moe_llava, schedule, text_tokens=TEXT, decode_tokens=2)
    for part in ("llm", "scoring"):
        assert getattr(report, part) == tally.parts[part], part
    assert report.decode_total == tally.parts["decode"]


def tiny_qwen3_vl_moe():
    """``test_flops_qwen.tiny_qwen3``'s shape (16-px patches, DeepStack from blocks 0 and 2) with 6
    experts of which 2 per token in its LLM, layer 1 dense (``mlp_only_layers``)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    dense = tiny_qwen3().config
    text = {**{k: v for k, v in dense.text_config.to_dict().items() if k != "model_type"}, "moe_intermediate_size": 40, "num_experts": 6, "num_experts_per_tok": 2,
            "mlp_only_layers": [1]}
    config = Qwen3VLMoeConfig(text_config=text, vision_config=dense.vision_config.to_dict(),
                              image_token_id=QWEN_IMAGE, video_token_id=dense.video_token_id,
                              vision_start_token_id=dense.vision_start_token_id,
                              vision_end_token_id=dense.vision_end_token_id)
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    model.config.text_config._experts_implementation = "eager"
    return model.eval()


def test_qwen3_vl_moe_full_forward_matches_counter():
    model = tiny_qwen3_vl_moe()
    tokens = 80
    ids = prompt(tokens, 1)
    pixels = torch.randn(320, patch_inputs(model.config.vision_config))
    tally = Tally()
    tally("all", lambda: model(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([QWEN3_GRID]),
                               logits_to_keep=1, mm_token_type_ids=(ids == QWEN_IMAGE).int()))
    report = flops(model, text_tokens=ids.shape[1] - tokens, image_size=QWEN3_IMAGE)
    assert report.visual_tokens == tokens
    assert model_dims(model.config).decoder.expert_layers == frozenset({0, 2})
    assert report.prefill == tally.parts["all"]


def test_paper_convention_counts_the_active_experts_and_the_router():
    """By construction: a Mixtral of E experts, k per token, each of width m is, in FastV's 4nd² +
    2n²d + 3ndm, a dense LLM of FFN width k·m plus the router's n·d·E MACs per layer."""
    base = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=56, patch_size=14)
    moe = load_config(dict(model_type="llava", vision_config=vision,
                           text_config=dict(model_type="mixtral", intermediate_size=48, num_local_experts=8,
                                            num_experts_per_tok=2, **base)))
    dense = load_config(dict(model_type="llava", vision_config=vision,
                             text_config=dict(model_type="mistral", intermediate_size=96, **base)))
    schedule = llm((2, 5))
    sparse, plain = flops(moe, schedule, convention="paper"), flops(dense, schedule, convention="paper")
    router_macs = 64 * 8 * sum(plain.layer_visual_tokens)
    assert sparse.llm - plain.llm == router_macs
    assert sparse.decode_per_token - plain.decode_per_token == 4 * 64 * 8


def test_qwen_layout_picks_its_sparse_layers():
    config = AutoConfig.for_model("qwen2_moe", num_hidden_layers=8, decoder_sparse_step=2, mlp_only_layers=[3, 5])
    decoder = model_dims(load_config(dict(model_type="llava", text_config=config.to_dict(),
                                          vision_config=dict(model_type="clip_vision_model")))).decoder
    assert decoder.expert_layers == frozenset({1, 7})  # (i + 1) % 2 == 0, less 3 and 5
    assert decoder.experts.shared_intermediate == config.shared_expert_intermediate_size


@pytest.mark.parametrize("model_type", ["deepseek_v3", "gpt_oss", "dbrx"])
def test_other_moe_layouts_are_refused_not_counted_as_dense(model_type):
    config = load_config(dict(model_type="llava", text_config=AutoConfig.for_model(model_type).to_dict(),
                              vision_config=dict(model_type="clip_vision_model")))
    with pytest.raises(NotImplementedError, match=f"mixture-of-experts LLM of model_type '{model_type}'"):
        flops(config)


@pytest.mark.parametrize("model_type", ["falcon_h1", "jamba", "bamba", "zamba2", "nemotron_h", "granitemoehybrid"])
def test_llms_with_state_space_layers_are_refused_not_counted_as_dense(model_type):
    """Mamba mixers are neither attention nor an MLP: FalconH1 counted as a dense LLM came out 20%
    under FlopCounterMode on a random LLaVA (``eval/fuzz_flops.py``, transformers 5.23)."""
    config = load_config(dict(model_type="llava", text_config=AutoConfig.for_model(model_type).to_dict(),
                              vision_config=dict(model_type="clip_vision_model")))
    with pytest.raises(NotImplementedError, match=f"state-space \\(Mamba\\) layers, model_type '{model_type}'"):
        flops(config)


#: Dense LLMs under LLaVA: gated FFNs of three matrices (fused gate_up in Phi-3 and GLM, post-norms,
#: soft caps, q/k norms: none moves a FLOP) and ungated ones of two (Phi, StarCoder2, Nemotron, Arcee,
#: Apertus, GPT-NeoX and Persimmon, the last two multi-head only, their q, k and v fused).
DENSE_LLMS = ("llama", "gemma2", "phi3", "cohere", "glm", "olmo2", "granite", "qwen3", "exaone4", "phi", "starcoder2",
              "nemotron", "arcee", "apertus", "gpt_neox", "persimmon")


@pytest.mark.parametrize("model_type", DENSE_LLMS)
def test_dense_llm_full_forward_matches_counter(model_type):
    heads = {} if model_type in ("gpt_neox", "persimmon") else dict(num_key_value_heads=2)
    text = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                num_attention_heads=4, head_dim=16, vocab_size=128, max_position_embeddings=256,
                                bos_token_id=None, eos_token_id=None, pad_token_id=None, **heads)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE))
    model.set_attn_implementation("eager")
    ids = torch.tensor([[1, 5, 6, 7, 8] + [IMAGE] * 16 + [9, 10, 11, 12, 13, 14, 15]])
    tally = Tally()
    tally("all", lambda: model.eval()(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56), logits_to_keep=1))
    assert flops(model, text_tokens=TEXT).prefill == tally.parts["all"]


#: LLMs whose dynamic cache slides in some layers: Mistral's every layer, Gemma2's every other one,
#: Qwen2's layers from ``max_window_layers`` on. A window of 12 is shorter than the 28-token prompt.
SLIDING_LLMS = {
    "mistral": dict(sliding_window=12),
    "gemma2": dict(sliding_window=12, head_dim=16, query_pre_attn_scalar=16),
    "qwen2": dict(use_sliding_window=True, sliding_window=12, max_window_layers=1),
}


@pytest.mark.parametrize("model_type", list(SLIDING_LLMS))
def test_sliding_window_layers_cache_and_decode_over_their_window_only(model_type):
    """A sliding-window layer's cache keeps the prompt's last ``window - 1`` tokens and each decoding
    step attends to at most ``window`` keys: ``kv_cache_bytes`` is the cache ``generate`` leaves and
    ``decode_per_token`` the FLOPs of its steps (3 steps here; each step is affine in its keys up to
    the window). The count had every layer hold and read the whole prompt (seed 7900121 of
    ``eval/fuzz_flops.py``, a random Mistral LLaVA-NeXT: 83840 bytes counted, 19840 held)."""
    from vtoken import compat

    text = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                **SLIDING_LLMS[model_type])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE))
    model.set_attn_implementation("eager")
    model.eval()
    windows = model_dims(model.config).decoder.cache_windows
    assert 12 in windows and (None in windows) == (model_type != "mistral")
    x = {"input_ids": torch.tensor([[1, 5, 6, 7, 8] + [IMAGE] * 16 + [9, 10, 11, 12, 13, 14, 15]]),
         "pixel_values": torch.randn(1, 3, 56, 56)}

    def generate(new_tokens: int, **kwargs):
        return model.generate(**x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              suppress_tokens=[IMAGE], **kwargs)

    tally = Tally()
    with torch.no_grad():
        for steps in (1, 4):
            tally(steps, lambda: generate(steps))
        cache = compat.output_cache(generate(1, return_dict_in_generate=True))
    held = sum(t.numel() * t.element_size() for i in range(compat.num_cache_layers(cache))
               for t in compat.cache_layer_kv(cache, i))
    report = flops(model, text_tokens=TEXT, decode_tokens=3, dtype=torch.float32)
    assert report.kv_cache_bytes == held
    assert report.decode_per_token * 3 == tally.parts[4] - tally.parts[1]
    per_token = 2 * 2 * 16 * 4  # K and V of one token in one layer: 2 KV heads x head_dim 16, float32
    assert held == per_token * sum(28 if w is None else 11 for w in windows)  # by construction
    assert any("upper bound" in note for note in report.notes)
