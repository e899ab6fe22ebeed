"""Triton kernel for fused per-token shift scores (reference: ``reference.token_shift``; tests:
``tests/test_kernels_triton.py``; benchmark: ``eval/bench_kernels.py``).

One pass over two hidden-state tensors ``[..., D]``: each program reads a block of tokens once, in
feature blocks, and accumulates in float32 only the sums its metric needs (``sum (a-b)^2``,
``sum |a-b|``, ``a.b``, ``|a|^2``, ``|b|^2``); the eager route materialises ``a - b`` (or both
normalised tensors for the cosine) in float32 first. ``token_shifts`` asks for several metrics at
once: the cosine and the norm ratio come from one pass that accumulates ``a.b``, ``|a|^2`` and
``|b|^2`` together (TransPrune's token transition variation needs both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import SHIFT_METRICS
from .triton_util import check_device, pow2

BLOCK_R = 16  # tokens per program
BLOCK_D = 128  # features per step


@triton.jit
def _token_shift_kernel(
    a_ptr, b_ptr, out_ptr, n_rows, dim,
    sa_r, sa_d, sb_r, sb_d,
    METRIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    first = tl.zeros([BLOCK_R], dtype=tl.float32)  # l2: sum (a-b)^2 | l1: sum |a-b| | cos: a.b | ratio: |a|^2
    second = tl.zeros([BLOCK_R], dtype=tl.float32)  # cos: |a|^2 | ratio: |b|^2
    third = tl.zeros([BLOCK_R], dtype=tl.float32)  # cos: |b|^2
    for start in range(0, dim, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (d < dim)[None, :]
        a = tl.load(a_ptr + rows[:, None] * sa_r + d[None, :] * sa_d, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows[:, None] * sb_r + d[None, :] * sb_d, mask=ok, other=0.0).to(tl.float32)
        if METRIC == 0:
            diff = a - b
            first += tl.sum(diff * diff, axis=1)
        elif METRIC == 1:
            first += tl.sum(tl.abs(a - b), axis=1)
        elif METRIC == 4:
            first += tl.sum(a * a, axis=1)
            second += tl.sum(b * b, axis=1)
        else:
            first += tl.sum(a * b, axis=1)
            second += tl.sum(a * a, axis=1)
            third += tl.sum(b * b, axis=1)
    if METRIC == 0:
        out = tl.sqrt(first)
    elif METRIC == 1:
        out = first
    elif METRIC == 4:
        out = tl.sqrt(first) / tl.maximum(tl.sqrt(second), 1e-12)
    else:
        # F.cosine_similarity(eps=1e-8): each norm clamped to eps before dividing.
        cosine = first / (tl.maximum(tl.sqrt(second), 1e-8) * tl.maximum(tl.sqrt(third), 1e-8))
        if METRIC == 2:
            out = 1.0 - cosine
        else:
            out = 1.0 - tl.abs(cosine)
    tl.store(out_ptr + rows, out, mask=row_ok)


@triton.jit
def _dot_and_squares_kernel(
    a_ptr, b_ptr, out_ptr, n_rows, dim,
    sa_r, sa_d, sb_r, sb_d,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[r] = (a.b, |a|^2, |b|^2)`` of each row, in float32 (``out`` is ``[n_rows, 3]``)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    aa = tl.zeros([BLOCK_R], dtype=tl.float32)
    bb = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (d < dim)[None, :]
        a = tl.load(a_ptr + rows[:, None] * sa_r + d[None, :] * sa_d, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows[:, None] * sb_r + d[None, :] * sb_d, mask=ok, other=0.0).to(tl.float32)
        dot += tl.sum(a * b, axis=1)
        aa += tl.sum(a * a, axis=1)
        bb += tl.sum(b * b, axis=1)
    tl.store(out_ptr + rows * 3, dot, mask=row_ok)
    tl.store(out_ptr + rows * 3 + 1, aa, mask=row_ok)
    tl.store(out_ptr + rows * 3 + 2, bb, mask=row_ok)


#: Metrics that ``token_shifts`` derives from one pass of ``_dot_and_squares_kernel``.
_FROM_DOT_AND_SQUARES = ("cos", "abs_cos", "norm_ratio")


def _flat_pair(after: torch.Tensor, before: torch.Tensor):
    after, before = torch.broadcast_tensors(after, before)
    if after.dtype != before.dtype or not after.is_floating_point() or after.dtype == torch.float64:
        after, before = after.float(), before.float()
    shape, dim = after.shape[:-1], after.shape[-1]
    return after.reshape(-1, dim), before.reshape(-1, dim), shape, dim  # views when the leading dims merge


def token_shifts(after: torch.Tensor, before: torch.Tensor, metrics: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """Triton ``token_shifts``: same arguments, results and semantics as ``reference.token_shifts``.
    Two or more of ``"cos"``, ``"abs_cos"``, ``"norm_ratio"`` share one pass; any other metric runs
    its own :func:`token_shift` pass."""
    unknown = [m for m in metrics if m not in SHIFT_METRICS]
    if unknown:
        raise ValueError(f"metric must be one of {SHIFT_METRICS}, got {unknown[0]!r}")
    shared = [m for m in metrics if m in _FROM_DOT_AND_SQUARES]
    if len(shared) < 2:
        return tuple(token_shift(after, before, m) for m in metrics)
    check_device(_dot_and_squares_kernel, after, before)
    a, b, shape, dim = _flat_pair(after, before)
    sums = torch.empty(a.shape[0], 3, dtype=torch.float32, device=a.device)
    if sums.numel():
        grid = (triton.cdiv(a.shape[0], BLOCK_R),)
        _dot_and_squares_kernel[grid](a, b, sums, a.shape[0], dim, *a.stride(), *b.stride(),
                                      BLOCK_R=BLOCK_R, BLOCK_D=min(BLOCK_D, pow2(dim)))
    dot, norm_a, norm_b = sums[:, 0], sums[:, 1].sqrt(), sums[:, 2].sqrt()
    # F.cosine_similarity(eps=1e-8): each norm clamped to eps before dividing.
    cosine = dot / (norm_a.clamp_min(1e-8) * norm_b.clamp_min(1e-8))
    derived = {"cos": 1.0 - cosine, "abs_cos": 1.0 - cosine.abs(), "norm_ratio": norm_a / norm_b.clamp_min(1e-12)}
    return tuple(derived[m].view(shape) if m in derived else token_shift(after, before, m) for m in metrics)


def token_shift(after: torch.Tensor, before: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Triton ``token_shift``: same arguments, result and semantics as ``reference.token_shift``."""
    if metric not in SHIFT_METRICS:
        raise ValueError(f"metric must be one of {SHIFT_METRICS}, got {metric!r}")
    check_device(_token_shift_kernel, after, before)
    a, b, shape, dim = _flat_pair(after, before)
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    if out.numel():
        grid = (triton.cdiv(a.shape[0], BLOCK_R),)
        _token_shift_kernel[grid](
            a, b, out, a.shape[0], dim, *a.stride(), *b.stride(),
            METRIC=SHIFT_METRICS.index(metric), BLOCK_R=BLOCK_R, BLOCK_D=min(BLOCK_D, pow2(dim)),
        )
    return out.view(shape)
