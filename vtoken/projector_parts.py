"""A projector read as two matrices around an activation, ``M(x) = W2 σ(W1 x + b1) + b2``.

LLaVA's and LLaVA-OneVision's projector is such a module (``linear_1``, ``act``, ``linear_2``);
ZOO-Prune scores it from that structure (and, with a rank, from an SVD proxy of ``W2``), and the
adapters say at ``wrap`` whether a model's projector has it (signal ``two_layer_projector``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TwoLayerProjector:
    """A projector ``M(x) = W2 σ(W1 x + b1) + b2`` read off its module (LLaVA's ``linear_1``, ``act``,
    ``linear_2``), in float32. ``out`` is what the sensitivity multiplies the activation difference
    by: ``W2`` itself, or with ``rank`` set the rank-``r`` factor ``Σ_r V_r^T`` of its SVD
    (``||U_r Σ_r V_r^T d|| = ||Σ_r V_r^T d||``, ``U_r`` having orthonormal columns): the official
    LLaVA-NeXT code's rank-128 SVD proxy of the projector."""

    w1: torch.Tensor  # [hidden, d_v]
    b1: torch.Tensor | None  # [hidden]
    act: Callable[[torch.Tensor], torch.Tensor]
    out: torch.Tensor  # [d_out or rank, hidden]


def two_layer_projector(projector, rank: int | None = None) -> TwoLayerProjector | None:
    """The :class:`TwoLayerProjector` of ``projector`` when it is an ``nn.Module`` whose children are,
    in order, a Linear, an element-wise activation and a Linear, and running those three in turn
    reproduces the module's own output on a probe input; None otherwise (the generic passes run)."""
    if not isinstance(projector, nn.Module):
        return None
    children = list(projector.children())
    if len(children) != 3 or not isinstance(children[0], nn.Linear) or not isinstance(children[2], nn.Linear):
        return None
    first, act, second = children
    if first.out_features != second.in_features:
        return None
    with torch.no_grad():
        probe = torch.randn(3, first.in_features, generator=torch.Generator().manual_seed(0)).to(
            first.weight.device, first.weight.dtype)
        if not torch.allclose(projector(probe), second(act(first(probe))), rtol=1e-4, atol=1e-5):
            return None
        w2 = second.weight.detach().float()
        if rank is not None and rank < min(w2.shape):
            _, sigma, vh = torch.linalg.svd(w2, full_matrices=False)
            w2 = sigma[:rank, None] * vh[:rank]
    bias = first.bias.detach().float() if first.bias is not None else None
    return TwoLayerProjector(first.weight.detach().float(), bias, act, w2)


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
