"""A random-weight LLaVA with LLaVA-1.5-7B's *shape* at tiny width, for parity tests.

What matters for pruning is the token geometry and the depth, not the width: a 336 px CLIP tower in
14 px patches (a 24 x 24 grid: 576 visual tokens plus CLS) with 24 encoder layers, features read from
the penultimate layer (``vision_feature_layer=-2``, ``"default"`` select: CLS dropped), an MLP
projector, and a 32-layer Llama (multi-head attention as Vicuna-7B; ``kv_heads`` < heads gives a GQA
variant). Widths are tiny (vision 32, LLM 64) so a prefill of ~600 tokens runs in well under a second
on a CPU. Built from configs; nothing is downloaded.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tiny import alone  # noqa: F401 (the parity tests take it from here, with the LLaVA-1.5 shape)

IMAGE_TOKEN = 99
PAD = 0
VOCAB = 100
GRID = 24
VISUAL_TOKENS = GRID * GRID  # 576


def llava15_shaped(attn: str = "sdpa", seed: int = 0, llm_layers: int = 32, vision_layers: int = 24,
                   kv_heads: int = 4) -> LlavaForConditionalGeneration:
    """LLaVA-1.5-7B's token geometry and depth (576 visual tokens, 24-layer tower, 32-layer LLM)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
        num_hidden_layers=vision_layers, num_attention_heads=4, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=llm_layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=VISUAL_TOKENS,
    )
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    return model.eval()


def llava15_inputs(batch: int = 2, seed: int = 0, system: int = 35, question=(12, 20)) -> dict:
    """A left-padded batch shaped like LLaVA-1.5's chat prompt: BOS, ``system`` text tokens, the 576
    image tokens, then a question of ``question[i]`` tokens for sample i (so rows have different
    lengths and the shorter ones are left-padded). Pixels are seeded normal noise."""
    g = torch.Generator().manual_seed(seed)
    lengths = [question[i % len(question)] for i in range(batch)]
    rows = []
    for n in lengths:
        before = torch.randint(3, 90, (system,), generator=g).tolist()
        after = torch.randint(3, 90, (n,), generator=g).tolist()
        rows.append([1, *before, *([IMAGE_TOKEN] * VISUAL_TOKENS), *after])
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), PAD, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    pixels = torch.randn(batch, 3, 336, 336, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def sdpa_and_eager(kv_heads: int = 4, seed: int = 0):
    """The model under test (SDPA) and an eager copy with the same weights, for a reference that
    reads attention maps."""
    model = llava15_shaped("sdpa", seed=seed, kv_heads=kv_heads)
    reference = llava15_shaped("eager", seed=seed, kv_heads=kv_heads)
    reference.load_state_dict(model.state_dict())
    return model, reference


class _Captured(Exception):
    pass


def llm_inputs(model, inputs: dict) -> torch.Tensor:
    """The ``inputs_embeds`` the unwrapped model hands its LLM (image features scattered in); the
    LLM itself is not run."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()
        raise _Captured

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen["embeds"]


def one_thread():
    """A fixture body: tensors here are tiny (width 32/64), so one thread is faster than two, and much
    faster on a shared machine where two threads wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def models_with_llm_inputs(kv_heads: int, inputs: dict):
    """The model under test (SDPA), its eager copy for a reference, and the LLM inputs of ``inputs``."""
    model, reference = sdpa_and_eager(kv_heads)
    return model, reference, llm_inputs(model, inputs)


def wrapped_last_logits(model, inputs: dict, method: str, **options):
    """``(last-token logits, vtoken.selection)`` of ``model`` wrapped with ``method`` for one forward."""
    import vtoken

    with vtoken.pruned(model, method, **options):
        out = model(**inputs)
        selection = vtoken.selection(model)
    return out.logits[:, -1], selection
