"""A projector read as two matrices around an activation, ``M(x) = W2 σ(W1 N(x) + b1) + b2``.

LLaVA's and LLaVA-OneVision's projector is such a module (``linear_1``, ``act``, ``linear_2``; no
``N``); Qwen-VL's mergers put a norm ``N`` first, over each encoder token of the merged row
(Qwen2-VL's LayerNorm ``ln_q``, Qwen2.5-VL's RMSNorm, Qwen3-VL's ``norm``). ZOO-Prune scores such a
projector from that structure (and, with a rank, from an SVD proxy of ``W2``), and the adapters say at
``wrap`` whether a model's projector has it (signal ``two_layer_projector``). The structure is read
from the module's leaf modules in order and checked on a probe input, never from attribute names.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def projector_in(
    projector: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype = torch.float32
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``projector`` as a function computing in ``dtype`` and returning float32: a module whose floating
    parameters or buffers are not ``dtype`` runs on ``dtype`` copies of them
    (``torch.func.functional_call``; the module keeps its own tensors); autocast is disabled. A plain
    callable gets its input in ``dtype`` and its output cast to float32."""
    if isinstance(projector, nn.Module):
        tensors = dict(itertools.chain(projector.named_parameters(), projector.named_buffers()))
        if any(t.is_floating_point() and t.dtype != dtype for t in tensors.values()):
            copies = {n: t.detach().to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}

            def call(x: torch.Tensor) -> torch.Tensor:
                return torch.func.functional_call(projector, copies, (x,))
        else:
            call = projector
    else:
        call = projector

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            return call(x.to(dtype)).float()

    return run


@dataclass(frozen=True)
class TwoLayerProjector:
    """A projector ``M(x) = W2 σ(W1 N(x) + b1) + b2`` read off its module, in float32. ``out`` is what
    the sensitivity multiplies the activation difference by: ``W2`` itself, or with ``rank`` set the
    rank-``r`` factor ``Σ_r V_r^T`` of its SVD (``||U_r Σ_r V_r^T d|| = ||Σ_r V_r^T d||``, ``U_r``
    having orthonormal columns): the official LLaVA-NeXT code's rank-128 SVD proxy of the projector.
    ``norm`` (Qwen-VL's mergers; None for LLaVA's) is ``N`` as a float32 function of rows of
    ``norm_width`` (one encoder token each); a merged input row holds ``d_v / norm_width`` of them."""

    w1: torch.Tensor  # [hidden, d_v]
    b1: torch.Tensor | None  # [hidden]
    act: Callable[[torch.Tensor], torch.Tensor]
    out: torch.Tensor  # [d_out or rank, hidden]
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    norm_width: int = 0

    def first_layer(self, x: torch.Tensor) -> torch.Tensor:
        """``W1 N(x) + b1`` of float32 rows ``x`` (``[n, d_v]``), in float32."""
        if self.norm is not None:
            x = self.norm(x.reshape(-1, self.norm_width)).reshape(x.shape)
        a = x @ self.w1.to(x.device).T
        return a + self.b1.to(x.device) if self.b1 is not None else a


def _leaves(module: nn.Module) -> list[nn.Module]:
    """The modules without children under ``module``, in registration order."""
    return [m for m in module.modules() if next(m.children(), None) is None]


def _row_norm(module: nn.Module) -> int | None:
    """The width a norm module (LayerNorm, RMSNorm: one 1-D weight and no other matrix) normalises
    over, or None when ``module`` is not one."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    return weight.numel()


def two_layer_projector(projector, rank: int | None = None) -> TwoLayerProjector | None:
    """The :class:`TwoLayerProjector` of ``projector`` when it is an ``nn.Module`` whose leaf modules
    are, in order, an optional row norm, a Linear, an element-wise activation and a Linear, and running
    them in turn (the norm over rows of its width) reproduces the module's own output on a probe input;
    None otherwise (the generic passes run)."""
    if not isinstance(projector, nn.Module):
        return None
    leaves = _leaves(projector)
    norm, width = (leaves[0], _row_norm(leaves[0])) if len(leaves) == 4 else (None, None)
    if norm is not None:
        if width is None:
            return None
        leaves = leaves[1:]
    if len(leaves) != 3 or not isinstance(leaves[0], nn.Linear) or not isinstance(leaves[2], nn.Linear):
        return None
    first, act, second = leaves
    if first.out_features != second.in_features or (width is not None and first.in_features % width):
        return None
    with torch.no_grad():
        probe = torch.randn(3, first.in_features, generator=torch.Generator().manual_seed(0)).to(
            first.weight.device, first.weight.dtype)
        normed = norm(probe.reshape(-1, width)).reshape(probe.shape) if norm is not None else probe
        if not torch.allclose(projector(probe), second(act(first(normed))), rtol=1e-4, atol=1e-5):
            return None
        w2 = second.weight.detach().float()
        if rank is not None and rank < min(w2.shape):
            _, sigma, vh = torch.linalg.svd(w2, full_matrices=False)
            w2 = sigma[:rank, None] * vh[:rank]
    bias = first.bias.detach().float() if first.bias is not None else None
    return TwoLayerProjector(first.weight.detach().float(), bias, act, w2,
                             projector_in(norm) if norm is not None else None, width or 0)


#: Each projector's structure (and SVD proxy) by module, read once per weight version and rank: derived
#: from the model, kept beside it (weakly), never on a strategy or per request.
_STRUCTURES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def cached_two_layer_projector(projector, rank: int | None = None) -> TwoLayerProjector | None:
    """:func:`two_layer_projector`, computed once per projector module, weight version and rank."""
    if not isinstance(projector, nn.Module):
        return None
    versions = tuple(p._version for p in projector.parameters())
    entries = _STRUCTURES.setdefault(projector, {})
    key = (versions, rank)
    if key not in entries:
        entries.clear()
        entries[key] = two_layer_projector(projector, rank)
    return entries[key]
