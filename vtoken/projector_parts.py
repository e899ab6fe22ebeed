"""A projector read as two matrices around an activation, ``M(x) = W2 σ(W1 N(x) + b1) + b2``.

LLaVA's and LLaVA-OneVision's projector is such a module (``linear_1``, ``act``, ``linear_2``; no
``N``); Qwen-VL's mergers put a norm ``N`` first, over each encoder token of the merged row
(Qwen2-VL's LayerNorm ``ln_q``, Qwen2.5-VL's RMSNorm, Qwen3-VL's ``norm``). ZOO-Prune scores such a
projector from that structure (and, with a rank, from an SVD proxy of ``W2``), and the adapters say at
``wrap`` whether a model's projector has it (signal ``two_layer_projector``). The structure is read
from the module's leaf modules in order and checked on a probe input, never from attribute names.
"""

from __future__ import annotations

import functools
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
class RowStandardisation:
    """A row norm of the form ``N(y) = γ ⊙ (y - c·mean(y)) / sqrt(mean((y - c·mean(y))²) + ε) + β`` over
    rows of ``len(γ)`` values: LayerNorm (``centred``, c = 1) or RMSNorm (c = 0), in float32. Knowing
    the form lets ZOO-Prune move ``W1`` outside the perturbation: ``N(x + h u)`` is ``γ ⊙ (x̄ + h ū)``
    divided by one scalar per row (:func:`vtoken.strategies.zoo_prune.zo_sensitivity_two_layer`)."""

    weight: torch.Tensor  # γ [width]
    bias: torch.Tensor  # β [width] (zeros when the norm has none)
    eps: float
    centred: bool

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """``N(y)`` of float32 rows ``y`` (``[..., width]``) from the fitted form."""
        if self.centred:
            y = y - y.mean(dim=-1, keepdim=True)
        scale = torch.rsqrt(y.square().mean(dim=-1, keepdim=True) + self.eps)
        return self.weight.to(y.device) * (y * scale) + self.bias.to(y.device)


def _zero_mean_unit_pattern(width: int) -> torch.Tensor:
    """A ``[width]`` float32 row with mean 0, mean square 1 and every entry far from 0 (±1 alternating;
    an odd width starts 2, -1, -1), so dividing by it is exact enough to read ``γ`` off a norm."""
    pattern = torch.tensor([1.0, -1.0]).repeat(width // 2 + 1)[:width].double()
    if width % 2:
        pattern[:3] = torch.tensor([2.0, -1.0, -1.0])
    return (pattern / pattern.square().mean().sqrt()).float()


def row_standardisation(norm: Callable[[torch.Tensor], torch.Tensor], width: int,
                        device: torch.device | str = "cpu") -> RowStandardisation | None:
    """The :class:`RowStandardisation` that ``norm`` (a float32 function of ``[n, width]`` rows)
    computes, or None when it computes something else. Read from probes, not attributes: ``β = N(0)``;
    with ``s`` a zero-mean unit pattern, ``N(t s) - β = γ ⊙ s · t / sqrt(t² + ε)``, so a large ``t``
    gives ``γ`` and ``t = 1e-3`` gives ``ε``; centred when adding a constant to a row changes nothing.
    The fitted form is then checked on random rows of several scales and offsets."""
    if width < 2:
        return None
    with torch.no_grad():
        s = _zero_mean_unit_pattern(width).to(device)
        def at(rows: torch.Tensor) -> torch.Tensor:
            return norm(rows.reshape(-1, width)).float().reshape(rows.shape)
        bias = at(torch.zeros(width, device=device))
        weight = (at(1e2 * s) - bias) / s
        small = 1e-3
        strong = weight.abs() >= 0.5 * weight.abs().max()
        if not bool(strong.any()) or not bool(torch.isfinite(weight).all()):
            return None
        ratio = ((at(small * s) - bias) / (weight * s))[strong].median().double()
        eps = max(0.0, float(small**2 * (1 / ratio**2 - 1))) if ratio > 0 else -1.0
        if eps < 0 or eps > 1:
            return None
        centred = bool(torch.allclose(at(s + 3.0), at(s), rtol=1e-4, atol=1e-5))
        form = RowStandardisation(weight, bias, eps, centred)
        probe = torch.randn(6, width, generator=torch.Generator().manual_seed(1)).to(device)
        probe = probe * torch.tensor([1.0, 1e-2, 30.0, 1.0, 0.1, 3.0], device=device)[:, None]
        probe = probe + torch.tensor([0.0, 0.0, 0.0, 5.0, -1.0, 0.5], device=device)[:, None]
        if not torch.allclose(form(probe), at(probe), rtol=1e-4, atol=1e-5):
            return None
    return form


@dataclass(frozen=True)
class TwoLayerProjector:
    """A projector ``M(x) = W2 σ(W1 N(x) + b1) + b2`` read off its module, in float32. ``out`` is what
    the sensitivity multiplies the activation difference by: ``W2`` itself, or with ``rank`` set the
    rank-``r`` factor ``Σ_r V_r^T`` of its SVD (``||U_r Σ_r V_r^T d|| = ||Σ_r V_r^T d||``, ``U_r``
    having orthonormal columns): the official LLaVA-NeXT code's rank-128 SVD proxy of the projector.
    ``norm`` (Qwen-VL's mergers; None for LLaVA's) is ``N`` as a float32 function of rows of
    ``norm_width`` (one encoder token each); a merged input row holds ``d_v / norm_width`` of them.
    ``norm_form`` is that norm's :class:`RowStandardisation` when it is one (None otherwise: ZOO-Prune
    then runs ``W1`` on each perturbed copy)."""

    w1: torch.Tensor  # [hidden, d_v]
    b1: torch.Tensor | None  # [hidden]
    act: Callable[[torch.Tensor], torch.Tensor]
    out: torch.Tensor  # [d_out or rank, hidden]
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    norm_width: int = 0
    norm_form: RowStandardisation | None = None
    #: The dtype the module's second Linear holds its weight in (bfloat16 in a bfloat16 model): what
    #: ZOO-Prune's ``precision="mixed"`` multiplies ``out`` in.
    weight_dtype: torch.dtype = torch.float32

    @functools.cached_property
    def folded_first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """With ``norm_form``: ``W1`` split by the norm's groups with ``γ`` folded in, ``[G, D, hidden]``
        (``W1_g diag(γ)``), and the constant ``W1 β + b1`` (``[hidden]``); computed once per projector
        structure, not per image."""
        form, width, hidden = self.norm_form, self.norm_width, self.w1.shape[0]
        groups = self.w1.shape[1] // width
        folded = self.w1.T.reshape(groups, width, hidden) * form.weight.to(self.w1.device)[None, :, None]
        shift = self.w1 @ form.bias.to(self.w1.device).repeat(groups)
        return folded, shift + self.b1 if self.b1 is not None else shift

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
    norm_fn = projector_in(norm) if norm is not None else None
    form = row_standardisation(norm_fn, width, first.weight.device) if norm_fn is not None else None
    return TwoLayerProjector(first.weight.detach().float(), bias, act, w2, norm_fn, width or 0, form,
                             second.weight.dtype)


#: Each projector's structure (and SVD proxy) by module, read once per weight version and rank: derived
#: from the model, kept beside it (weakly), never on a strategy or per request.
_STRUCTURES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def cached_two_layer_projector(projector, rank: int | None = None) -> TwoLayerProjector | None:
    """:func:`two_layer_projector`, computed once per projector module, weight version and rank. A
    weight's version counts in-place updates; ``module.to(dtype or device)`` swaps its storage without
    one, so the storage, dtype and device count too (a model cast to bfloat16 after a first call must
    not be scored with its float32 weights)."""
    if not isinstance(projector, nn.Module):
        return None
    versions = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in projector.parameters())
    entries = _STRUCTURES.setdefault(projector, {})
    key = (versions, rank)
    if key not in entries:
        entries.clear()
        entries[key] = two_layer_projector(projector, rank)
    return entries[key]
