"""What a wrapped model's ``generate`` does before transformers' own: it records the call, so the
forwards it makes can tell its prompt and its own follow-up forwards apart, and it prefills a prompt
with images in one forward.

- **The prompt's length** (``Pruner.prompt_length``): an assisted or prompt-lookup first forward holds
  candidate tokens after the prompt, which scoring must not read as the prompt's.
- **The call** (``Pruner.generate_call``, a :class:`GenerateCall`): which ``generate`` filled a cache,
  and whether its prompt's images were pruned yet. A text-only forward with an empty cache after that
  is not a prompt of the user's: it is a forward a logits processor makes with the same model
  (classifier-free guidance's unconditional pass, on the last prompt token or a negative prompt), and
  it runs as the plain model's, as it does unwrapped.
- **One-forward prefill.** ``generate(prefill_chunk_size=n)`` feeds the prompt in chunks of ``n``
  tokens. Pruning needs the whole prompt at once (pre-LLM methods shorten the sequence the chunks are
  cut from; in-LLM methods score every token at a layer), so a prompt with images is prefilled in one
  forward, with a warning; the tokens generated are those of an unchunked ``generate``. A text-only
  prompt keeps its chunks.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .base import UndoStack
from vtoken import compat
from vtoken.pruner import Pruner


@dataclass(eq=False)  # compared by identity: one object per call
class GenerateCall:
    """One ``generate`` call on the wrapped model, in the thread that made it."""

    #: Whether a forward of this call has pruned its prompt's images (the prefill ran).
    images_prefilled: bool = False


def check_mask_shape(mask, tokens) -> None:
    """Refuse a 2-D ``attention_mask`` that is not one entry per prompt token, in one line (the
    forward would fail deep inside; the plain model's generate fails on it too, with a shape error)."""
    if torch.is_tensor(mask) and torch.is_tensor(tokens) and mask.dim() == 2 and tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but the prompt is {tuple(tokens.shape[:2])} "
            "(batch, length); pass one mask entry per prompt token, as the processor returns them"
        )


def install_generate_wrapper(model: nn.Module, pruner: Pruner, undo: UndoStack,
                             has_visual_input: Callable[[dict], bool]) -> None:
    """Wrap ``model.generate`` (undone by ``undo``). ``has_visual_input(generate_kwargs)`` says
    whether a call carries images or videos (pixels, or an encoding of them)."""
    generate = model.generate
    lengths, calls = pruner.prompt_length, pruner.generate_call

    @functools.wraps(generate)
    def generate_on_wrapped_model(*args, **kwargs):
        if compat.asks_continuous_batching(kwargs):
            refuse_continuous_batching()
        size = compat.prefill_chunk_size(model, kwargs)
        if size is not None and has_visual_input(kwargs):
            warnings.warn(
                f"vtoken prefills a prompt with images in one forward (pruning needs all of it at once), so "
                f"generate's {compat.PREFILL_CHUNK_OPTION}={size} is not used for this call; the tokens are those "
                f"of an unchunked generate. Pass {compat.PREFILL_CHUNK_OPTION}=None to silence this.",
                UserWarning, stacklevel=2,
            )
            kwargs = compat.without_chunked_prefill(model, kwargs)
        tokens = kwargs.get("input_ids", args[0] if args else None)
        tokens = tokens if tokens is not None else kwargs.get("inputs_embeds")
        check_mask_shape(kwargs.get("attention_mask"), tokens)
        token = lengths.set(tokens.shape[1] if tokens is not None else None)
        call = calls.set(GenerateCall())
        try:
            return generate(*args, **kwargs)
        finally:
            calls.reset(call)
            lengths.reset(token)

    undo.set_attribute(model, "generate", generate_on_wrapped_model)
    entry = getattr(model, compat.CONTINUOUS_BATCHING_ENTRY, None)
    if entry is not None:
        @functools.wraps(entry)
        def continuous_batching_on_wrapped_model(*args, **kwargs):
            refuse_continuous_batching()

        undo.set_attribute(model, compat.CONTINUOUS_BATCHING_ENTRY, continuous_batching_on_wrapped_model)


def refuse_continuous_batching() -> None:
    """Continuous batching (``generate_batch``, ``cache_implementation="paged"``) packs many requests'
    tokens into one sequence over a paged cache, and hands the model token ids alone: nothing a
    wrapped model prunes per prompt. Its loop runs the model in a thread that logs a failing forward
    and returns no tokens, so the refusal comes before it starts."""
    raise ValueError(
        "vtoken does not serve continuous batching (generate_batch, init_continuous_batching, "
        "cache_implementation='paged'): it packs many requests into one sequence and passes no images; "
        "call generate with a batch instead, or vtoken.unwrap(model) first")
