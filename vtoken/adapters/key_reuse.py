"""Keys scored on are keys the layer need not project again.

A strategy that scores a pruning stage at LLM layer K with layer K's own attention
(``ctx.attention(layer="current")``: TransPrune's instruction-guided attention, Eq. 5) normalises
and projects the keys of every token at layer K's input, before the stage prunes them; layer K then
runs on the kept tokens and normalises them and projects their keys again. When the stage only
selected rows (no merged features), the kept tokens' normalised inputs and keys are rows of what
scoring already computed: :class:`KeyReuse` hands them to the layer's input norm and key projection
instead of recomputing them (each module runs on zero rows and returns the gathered rows), which
takes the layer's own share out of the scoring's cost.

Only plain hooks are used, and each checks by identity that it sees the tensors it expects: the
layer's input is the stage's output, the key projection's input is the layer's input norm of it (a
post-norm layer's, OLMo2's or Exaone4's, has no input norm: its key projection reads the stage's
output itself, and only the projection is hooked). A layer whose forward does anything else (another
norm order, a fused projection) is simply not helped, never changed. The norm works per token, so
its kept rows are the same numbers; the kept keys differ from a fresh projection of the kept rows
only by the matmul's rounding (the rows are the same; a different row count can block the sum
differently).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from vtoken import compat
from vtoken.kernels import gather_tokens
from vtoken.request import PruneRun

from .base import UndoStack


@dataclass
class PendingKeys:
    """Layer K's input norm of ``source``'s tokens (``normed``, ``[B, L, d]``) and key projection of
    that (``keys``, ``[B, L, kv_heads * head_dim]``), and how far they got towards the layer: armed
    once the stage's output is known, then taken by the input norm and the key projection."""

    source: torch.Tensor
    normed: torch.Tensor
    keys: torch.Tensor
    armed: bool = False
    norm_taken: bool = False
    taken: bool = False


class KeyReuse:
    """Hands the keys a stage's scoring projected at LLM layer K to layer K's own attention."""

    def __init__(self, layers: nn.ModuleList, active: Callable[[], PruneRun | None], undo: UndoStack):
        self.layers = layers
        self._active = active
        self._undo = undo
        self.hooked: set[int] = set()

    def _hook(self, index: int) -> None:
        """Hooks on layer ``index``'s input norm (a pre-norm layer's) and key projection, added the
        first time scoring projects its keys (a strategy that never reads a layer's current attention
        adds none), and removed with the rest of the wrap."""
        projection = self._projection(index)
        if self._has_input_norm(index):
            norm = self._norm(index)
            self._undo.pre_hook(norm, partial(self._before_norm, index))
            self._undo.post_hook(norm, partial(self._normed, index))
        self._undo.pre_hook(projection, partial(self._before_projection, index))
        self._undo.post_hook(projection, partial(self._after_projection, index))
        self.hooked.add(index)

    # --- scoring and the stage ------------------------------------------------------------------
    def keys_for(self, run: PruneRun, index: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s input norm of ``hidden`` (its input before the stage) and the key
        projection of that (``k_proj``), kept for the layer's own attention after the stage."""
        pending = run.reused_keys.get(index)
        if pending is None or pending.source is not hidden:
            normed = self._norm(index)(hidden)
            keys = self._projection(index)(normed)
            if not self.reusable(index):  # a fused qkv projection (Phi-3): the layer projects its own
                return normed, keys
            if index not in self.hooked:
                self._hook(index)  # (the hooks act only once the keys are armed, after the stage)
            pending = PendingKeys(hidden, normed, keys)
            run.reused_keys[index] = pending
        return pending.normed, pending.keys

    def reusable(self, index: int) -> bool:
        """Whether layer ``index`` has a key projection of its own to hand the keys to (not one fused
        with the queries and values, which the layer must run for those anyway)."""
        layer = self.layers[index]
        # A post-norm layer (OLMo2's, Exaone4's) projects its keys from its input itself: the key
        # projection alone takes the rows (decoder_input_norm refuses any other layer at wrap).
        return (compat.has_input_norm(layer) or compat.is_post_norm_layer(layer)) and compat.has_separate_query_key(
            compat.layer_attention(layer))

    def _has_input_norm(self, index: int) -> bool:
        return compat.has_input_norm(self.layers[index])

    def after_stage(self, run: PruneRun, index: int, before: torch.Tensor, after: torch.Tensor,
                    selected_from: torch.Tensor | None) -> None:
        """The stage at ``index`` turned ``before`` into ``after`` (gathered with ``selected_from``, or
        None when it merged features): arm the keys scoring projected from ``before``, or drop them."""
        pending = run.reused_keys.pop(index, None)
        if pending is None or selected_from is None or pending.source is not before:
            return
        # A post-norm layer's key projection reads the layer's input itself: no norm takes rows, and the
        # projection's input to recognise is the stage's output (its pad slots already 0).
        post_norm = not self._has_input_norm(index)
        normed = after if post_norm else gather_tokens(pending.normed, selected_from)
        keys = gather_tokens(pending.keys, selected_from)
        pads = selected_from < 0
        if bool(pads.any()):  # a new pad slot's hidden state is 0: it gets what the layer makes of 0
            zero_normed = self._norm(index)(torch.zeros_like(after[:1, :1]))
            if not post_norm:
                normed = torch.where(pads[..., None], zero_normed, normed)
            keys = torch.where(pads[..., None], self._projection(index)(zero_normed), keys)
        run.reused_keys[index] = PendingKeys(after, normed, keys, armed=True, norm_taken=post_norm)

    def _norm(self, index: int) -> nn.Module:
        return compat.decoder_input_norm(self.layers[index])

    def _projection(self, index: int) -> nn.Module | compat.FusedSlice:
        return compat.attention_parts(compat.layer_attention(self.layers[index])).k_proj

    # --- hooks on layer K -----------------------------------------------------------------------
    def _pending(self, index: int) -> PendingKeys | None:
        run = self._active()
        if run is None or not run.prefill or run.side_pass is not None:
            return None
        pending = run.reused_keys.get(index)
        return pending if pending is not None and pending.armed else None

    def _before_norm(self, index: int, module, args):
        pending = self._pending(index)
        if pending is None or pending.norm_taken or not args or args[0] is not pending.source:
            return None
        pending.norm_taken = True
        return (args[0][..., :0, :], *args[1:])  # the norm runs on no row

    def _normed(self, index: int, module, args, output):
        pending = self._pending(index)
        if pending is None or not pending.norm_taken or output.shape[-2] != 0:
            return None  # not the call whose rows were taken out above
        return pending.normed  # the kept rows of the norm scoring computed: what the key projection sees

    def _before_projection(self, index: int, module, args):
        pending = self._pending(index)
        if pending is None or not pending.norm_taken or not args or args[0] is not pending.normed:
            return None
        pending.taken = True
        return (args[0][..., :0, :], *args[1:])  # the projection runs on no row

    def _after_projection(self, index: int, module, args, output):
        pending = self._pending(index)
        if pending is None or not pending.taken:
            return None
        self._active().reused_keys.pop(index, None)
        return pending.keys
