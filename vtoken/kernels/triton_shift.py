"""Triton kernel for fused per-token shift scores (reference: ``reference.token_shift``; tests:
``tests/test_kernels_triton.py``; benchmark: ``eval/bench_kernels.py``).

One pass over two hidden-state tensors ``[..., D]``: each program reads a block of tokens once, in
feature blocks, and accumulates in float32 only the sums its metric needs (``sum (a-b)^2``,
``sum |a-b|``, or ``a.b``, ``|a|^2``, ``|b|^2``); the metric follows from those per-token sums in
torch, with the reference's clamps. The eager route materialises ``a - b`` in float32 first.
``token_shifts`` asks for several metrics at once: the cosines and the norm ratio share one pass
(TransPrune's token transition variation needs both)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_shift_metrics
from .triton_util import check_device, pow2

BLOCK_R = 16  # tokens per program
BLOCK_D = 128  # features per step
#: Which sums a pass accumulates: ``sum (a-b)^2`` (l2), ``sum |a-b|`` (l1), or ``a.b, |a|^2, |b|^2``
#: (the cosines and the norm ratio; any of them, or several at once, from one pass).
SQUARED_DIFFERENCE, ABSOLUTE_DIFFERENCE, DOT_AND_SQUARES = 0, 1, 2
_SUMS_OF = {"l2": SQUARED_DIFFERENCE, "l1": ABSOLUTE_DIFFERENCE, "cos": DOT_AND_SQUARES,
            "abs_cos": DOT_AND_SQUARES, "norm_ratio": DOT_AND_SQUARES}


# Per row, in float32, into ``out`` [n_rows, 3]: SUMS == 0: sum (a-b)^2 in column 0; 1: sum |a-b| in
# column 0; 2: (a.b, |a|^2, |b|^2). (A comment, not a docstring: the interpreter re-parses the body.)
@triton.jit
def _shift_sums_kernel(
    a_ptr, b_ptr, out_ptr, n_rows, dim,
    sa_r, sa_d, sb_r, sb_d,
    SUMS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    first = tl.zeros([BLOCK_R], dtype=tl.float32)
    second = tl.zeros([BLOCK_R], dtype=tl.float32)
    third = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (d < dim)[None, :]
        a = tl.load(a_ptr + rows[:, None] * sa_r + d[None, :] * sa_d, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows[:, None] * sb_r + d[None, :] * sb_d, mask=ok, other=0.0).to(tl.float32)
        if SUMS == 0:
            diff = a - b
            first += tl.sum(diff * diff, axis=1)
        elif SUMS == 1:
            first += tl.sum(tl.abs(a - b), axis=1)
        else:
            first += tl.sum(a * b, axis=1)
            second += tl.sum(a * a, axis=1)
            third += tl.sum(b * b, axis=1)
    tl.store(out_ptr + rows * 3, first, mask=row_ok)
    if SUMS == 2:
        tl.store(out_ptr + rows * 3 + 1, second, mask=row_ok)
        tl.store(out_ptr + rows * 3 + 2, third, mask=row_ok)


def _flat_pair(after: torch.Tensor, before: torch.Tensor):
    after, before = torch.broadcast_tensors(after, before)
    if after.dtype != before.dtype or not after.is_floating_point() or after.dtype == torch.float64:
        after, before = after.float(), before.float()
    shape, dim = after.shape[:-1], after.shape[-1]
    return after.reshape(-1, dim), before.reshape(-1, dim), shape, dim  # views when the leading dims merge


def _sums(a: torch.Tensor, b: torch.Tensor, dim: int, kind: int) -> torch.Tensor:
    """One pass of :func:`_shift_sums_kernel` over the flat pair: ``[rows, 3]`` float32."""
    out = torch.empty(a.shape[0], 3, dtype=torch.float32, device=a.device)
    if out.numel():
        grid = (triton.cdiv(a.shape[0], BLOCK_R),)
        _shift_sums_kernel[grid](a, b, out, a.shape[0], dim, *a.stride(), *b.stride(),
                                 SUMS=kind, BLOCK_R=BLOCK_R, BLOCK_D=min(BLOCK_D, pow2(dim)))
    return out


def _metric(metric: str, sums: torch.Tensor) -> torch.Tensor:
    """A metric from its pass's sums, with the reference's clamps (``reference.token_shifts``)."""
    if metric == "l2":
        return sums[:, 0].sqrt()
    if metric == "l1":
        return sums[:, 0]
    norm_a, norm_b = sums[:, 1].sqrt(), sums[:, 2].sqrt()
    if metric == "norm_ratio":
        return norm_a / norm_b.clamp_min(1e-12)
    # F.cosine_similarity(eps=1e-8): each norm clamped to eps before dividing.
    cosine = sums[:, 0] / (norm_a.clamp_min(1e-8) * norm_b.clamp_min(1e-8))
    return 1.0 - cosine if metric == "cos" else 1.0 - cosine.abs()


def token_shifts(after: torch.Tensor, before: torch.Tensor, metrics: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """Triton ``token_shifts``: same arguments, results and semantics as ``reference.token_shifts``.
    Metrics that need the same sums (``"cos"``, ``"abs_cos"``, ``"norm_ratio"``) share one pass."""
    check_shift_metrics(metrics)
    check_device(_shift_sums_kernel, after, before)
    a, b, shape, dim = _flat_pair(after, before)
    passes: dict[int, torch.Tensor] = {}
    out = []
    for metric in metrics:
        kind = _SUMS_OF[metric]
        if kind not in passes:
            passes[kind] = _sums(a, b, dim, kind)
        out.append(_metric(metric, passes[kind]).view(shape))
    return tuple(out)


def token_shift(after: torch.Tensor, before: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Triton ``token_shift``: same arguments, result and semantics as ``reference.token_shift``."""
    return token_shifts(after, before, (metric,))[0]
