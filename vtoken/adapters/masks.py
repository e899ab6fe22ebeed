"""The attention masks vtoken builds for a decoder stack, through the installed transformers' own
mask builders (``vtoken.compat``): causal over a layer group's slots, optionally with an extra
condition (a mask stage keeping text off hidden keys)."""

from __future__ import annotations

import torch

from vtoken import compat

#: Attention implementations that take an arbitrary mask (what a mask stage needs at prefill).
ARBITRARY_MASK_ATTENTION = ("sdpa", "eager")


def causal_mask_for(config, hidden: torch.Tensor, padding_mask: torch.Tensor, query_length: int, extra=None,
                    capacity: int | None = None):
    """The mask the attention implementation of ``config`` expects, for the last ``query_length``
    tokens attending causally over ``padding_mask.shape[1]`` keys (True = may be attended).

    ``extra``: an optional transformers mask function ``(batch, head, query, key) -> bool`` (absolute
    slot indices, broadcast) that must also hold; only for :data:`ARBITRARY_MASK_ATTENTION`.
    ``capacity``: a static KV cache's slots per layer: the keys the attention sees are all of them,
    the ones after ``padding_mask``'s not written yet (masked)."""
    make_mask = compat.mask_builder(config)  # None: an implementation that builds no mask
    implementation = compat.attention_implementation(config)
    if extra is not None and implementation not in ARBITRARY_MASK_ATTENTION:
        raise ValueError(
            f"attn_implementation={implementation!r} cannot take an arbitrary attention mask; "
            f"use one of {', '.join(ARBITRARY_MASK_ATTENTION)}"
        )
    if make_mask is None:
        return None
    written = padding_mask.shape[1]
    padding_mask = padding_mask.to(torch.bool)
    if capacity is not None:
        padding_mask = torch.nn.functional.pad(padding_mask, (0, capacity - written))
    return compat.build_mask(
        config, make_mask, batch_size=hidden.shape[0], q_length=query_length, kv_length=padding_mask.shape[1],
        padding_mask=padding_mask, extra=extra, dtype=hidden.dtype, device=hidden.device,
        q_offset=written - query_length,
    )
