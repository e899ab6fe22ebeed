"""The compatibility module is the only place that names what transformers moves between releases,
and it reads both spellings of the KV-cache keyword."""

import re
from pathlib import Path

import pytest
import torch

from vtoken import compat

ROOT = Path(__file__).resolve().parent.parent
#: Names that moved (or are internals that may move); product code reaches them through compat only.
MOVING = [
    r"past_key_values", r"\bcache=", r"[\"']cache[\"']", r"(?<!set)_attn_implementation", r"\.rotary_emb\b",
    r"mm_encoder_outputs", r"pooler_output", r"\.pack_image_features\b", r"image_size_to_num_patches",
    r"get_anyres_image_grid_shape", r"select_best_resolution", r"smart_resize", r"ACT2FN",
    r"masking_utils", r"cache_utils", r"\.input_layernorm\b", r"\.self_attn\b", r"[\"']self_attn[\"']",
    r"transformers\.models\.",
]


def _product_files():
    for path in (ROOT / "vtoken").rglob("*.py"):  # adapters and kernels included
        if path.name != "compat.py":
            yield path


def test_moving_transformers_names_live_in_compat_only():
    offenders = []
    for path in _product_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = re.sub(r"\bcompat\.\w+", "", line.split("#", 1)[0])  # reached through compat: fine
            if code.strip().startswith(('"', "'", "from vtoken.compat import")) or "``" in code:
                continue  # docstrings, prose and imports from compat
            for pattern in MOVING:
                if re.search(pattern, code):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "use vtoken.compat for:\n" + "\n".join(offenders)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_cache_is_found_under_either_keyword(name):
    cache = object()
    assert compat.cache_from({name: cache}) is cache
    kwargs = {name: cache}
    compat.set_cache(kwargs, cache)
    assert kwargs == {compat.CACHE_KWARG: cache}


def test_dropping_the_output_cache_removes_it_from_the_output():
    from transformers.modeling_outputs import BaseModelOutputWithPast

    cache = compat.new_dynamic_cache(None)
    output = BaseModelOutputWithPast(last_hidden_state=torch.zeros(1), **{compat.CACHE_KWARG: cache})
    assert compat.output_cache(output) is cache
    compat.drop_output_cache(output)
    assert compat.output_cache(output) is None
    assert len(output.to_tuple()) == 1 and compat.CACHE_KWARG not in dict(**output)


@pytest.mark.parametrize("sliding_window", [None, 8], ids=["static", "sliding-static"])
def test_cropping_a_static_layer_is_as_if_the_rejected_tokens_never_came(sliding_window):
    """``crop_cache_layer`` on a static cache (assisted decoding's rejected candidates): the layer holds
    what a cache filled without them holds, and its next token is written where that cache writes it.
    A sliding-window static layer counts its writes twice (a tensor and a Python int): both go back,
    on 5.23 (no ``crop`` of its own) as on 5.25 (the layer's own)."""
    from transformers import MistralConfig, StaticCache

    config = MistralConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
                           head_dim=8, sliding_window=sliding_window)
    g = torch.Generator().manual_seed(0)
    kept, rejected, new = (torch.randn(1, 2, n, 8, generator=g) for n in (4, 3, 1))

    def filled(*chunks):
        cache = StaticCache(config=config, max_cache_len=16)
        for chunk in chunks:
            for layer in range(2):
                cache.update(chunk, chunk, layer)
        return cache

    cropped = filled(kept, rejected)
    for layer in range(2):
        compat.crop_cache_layer(cropped, layer, 4)
        assert int(cropped.layers[layer].get_seq_length()) == 4
        cropped.update(new, new, layer)
    fresh = filled(kept, new)
    for layer in range(2):
        assert int(cropped.layers[layer].get_seq_length()) == int(fresh.layers[layer].get_seq_length()) == 5
        assert torch.equal(cropped.layers[layer].keys[..., :5, :], fresh.layers[layer].keys[..., :5, :])
