"""Triton kernels for token compaction (references: ``reference.gather_tokens`` and
``reference.cu_seqlens``; tests: ``tests/test_kernels_triton.py``; benchmark: ``eval/bench_kernels.py``).

``gather_tokens``: ``out[b, j] = x[b, index[b, j]]``, ``fill`` where ``index[b, j] == -1``, for ragged
per-sample keep sets, in one launch per tensor. ``x`` is read through its strides as ``[B, L, R, C]``
(trailing dimensions merged where they can be), so a KV-cache tensor seen as ``[B, L, H, D]``
(``cache.transpose(1, 2)``) or M-RoPE position ids seen as ``[B, L, 3]`` (``pos.permute(1, 2, 0)``) are
gathered without a copy. Any dtype: bool is moved as bytes, the fill value is converted to ``x``'s
dtype on the host, as the reference's ``torch.where`` does. A backward (scatter-add of the gradient) is
provided, so hidden states that require grad can be gathered with the kernel.

``cu_seqlens``: per-row kept counts of a ``[B, L]`` keep mask in one launch, then their int32 prefix sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_util import check_device

BLOCK_F = 256  # features per program
BLOCK_L = 1024  # mask columns per step


@triton.jit
def _gather_kernel(
    x_ptr, index_ptr, fill_ptr, out_ptr,
    n_out, length, inner, cols,
    sx_b, sx_l, sx_r, sx_c,
    si_b, si_j,
    BLOCK_F: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # b * n_out + j; 64-bit offsets for large caches
    b = token // n_out
    j = token % n_out
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < inner * cols
    src = tl.load(index_ptr + b * si_b + j * si_j)
    valid = (src >= 0) & (src < length)
    offset = (f // cols) * sx_r + (f % cols) * sx_c
    values = tl.load(x_ptr + b * sx_b + src * sx_l + offset, mask=f_ok & valid, other=0)
    fill = tl.load(fill_ptr)
    values = tl.where(valid, values, fill)
    tl.store(out_ptr + token * (inner * cols) + f, values, mask=f_ok)


@triton.jit
def _count_kernel(keep_ptr, out_ptr, length, s_b, s_l, BLOCK_L: tl.constexpr):
    b = tl.program_id(0)
    total = tl.zeros([BLOCK_L], dtype=tl.int32)
    for start in range(0, length, BLOCK_L):
        col = start + tl.arange(0, BLOCK_L)
        kept = tl.load(keep_ptr + b * s_b + col * s_l, mask=col < length, other=0)
        total += (kept != 0).to(tl.int32)
    tl.store(out_ptr + b, tl.sum(total, axis=0))


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[B, L, R, C]``, a view whenever the trailing dimensions merge into two."""
    if x.dim() == 2:
        return x[:, :, None, None]
    if x.dim() == 3:
        return x[:, :, None, :]
    if x.dim() == 4:
        return x
    for shape in ((*x.shape[:3], -1), (*x.shape[:2], -1, x.shape[-1])):
        try:
            return x.view(shape)
        except RuntimeError:
            pass
    return x.reshape(*x.shape[:2], -1, x.shape[-1])  # trailing dimensions that do not merge: a copy


def _gather_forward(x: torch.Tensor, index: torch.Tensor, fill) -> torch.Tensor:
    if index.dim() != 2 or x.dim() < 2:
        raise ValueError(f"gather_tokens needs x [B, L, ...] and index [B, K], got {tuple(x.shape)} and {tuple(index.shape)}")
    check_device(_gather_kernel, x, index)
    batch, n_out = index.shape
    if batch > x.shape[0]:
        raise ValueError(f"index has {batch} rows, x only {x.shape[0]}")
    length = x.shape[1]
    if index.numel() and int(index.max()) >= length:  # the reference (torch.gather) refuses these too
        raise IndexError(f"gather_tokens: index {int(index.max())} out of range for {length} tokens")
    out = torch.empty((batch, n_out, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    fill_value = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1)
    source, target = _as_4d(x), out
    if x.dtype == torch.bool:  # moved as bytes
        source, target, fill_value = source.view(torch.uint8), out.view(torch.uint8), fill_value.view(torch.uint8)
    inner, cols = source.shape[2], source.shape[3]
    grid = (batch * n_out, triton.cdiv(inner * cols, BLOCK_F))
    _gather_kernel[grid](
        source, index, fill_value, target,
        n_out, length, inner, cols,
        *source.stride(), *index.stride(),
        BLOCK_F=BLOCK_F,
    )
    return out


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, fill):
        ctx.save_for_backward(index)
        ctx.x_shape = x.shape
        return _gather_forward(x, index, fill)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad_x = torch.zeros(ctx.x_shape, dtype=grad.dtype, device=grad.device)
        valid = (index >= 0).reshape(*index.shape, *([1] * (grad.dim() - 2)))
        view = index.clamp(min=0).reshape(valid.shape).expand(grad.shape)
        rows = grad.shape[0]
        grad_x[:rows].scatter_add_(1, view, torch.where(valid, grad, torch.zeros_like(grad)))
        return grad_x, None, None


def gather_tokens(x: torch.Tensor, index: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Triton ``gather_tokens``: same arguments, result and semantics as ``reference.gather_tokens``."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Gather.apply(x, index, fill)
    return _gather_forward(x, index, fill)


def cu_seqlens(keep: torch.Tensor) -> torch.Tensor:
    """Triton ``cu_seqlens``: same argument and result as ``reference.cu_seqlens``."""
    check_device(_count_kernel, keep)
    if keep.dim() != 2:
        raise ValueError(f"cu_seqlens needs a [B, L] keep mask, got {tuple(keep.shape)}")
    batch, length = keep.shape
    counts = torch.zeros(batch, dtype=torch.int32, device=keep.device)
    if batch and length:
        mask = keep if keep.dtype != torch.bool else keep.view(torch.uint8)
        _count_kernel[(batch,)](mask, counts, length, *mask.stride(), BLOCK_L=min(BLOCK_L, triton.next_power_of_2(length)))
    out = torch.zeros(batch + 1, dtype=torch.int32, device=keep.device)
    out[1:] = torch.cumsum(counts, dim=0, dtype=torch.int32)
    return out
