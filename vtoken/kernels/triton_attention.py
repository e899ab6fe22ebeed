"""Triton kernels for attention statistics without an N x N map (references: ``reference.attention_rows``
and ``reference.received_attention``; tests: ``tests/test_kernels_triton.py``; benchmark:
``eval/bench_kernels.py``).

``attention_rows``: the softmax probabilities of a few query rows against every key, in two passes
over the keys. Pass 1 keeps an online maximum and a rescaled exponential sum per row (the
FlashAttention recurrence); pass 2 recomputes each score and writes ``exp(s - m) / l``. Nothing but the
``[B, H, Q, N]`` result is written: O(rows x N) memory.

``received_attention``: the column mass ``sum_q mean_h softmax(q k^T * scale)[h, q, n]``. Pass 1
computes each query row's log-sum-exp over all keys (``[B, H, Q]``); pass 2 walks key blocks, recomputes
the scores of every query row against them and adds ``exp(s - lse)`` down the columns. Extra memory is
the row statistics and one ``[B, H_kv, N]`` partial sum (summed over key heads in PyTorch), O(N) per head;
no softmax row or map is stored.

Both read ``[B, H, Q, D]`` queries and ``[B, H_kv, N, D]`` keys through their strides (no copies of
transposed views). Grouped-query attention: the ``H // H_kv`` query heads that share a key head are
processed by the same program, as rows of one block, so each key block is loaded once per group.
fp16 / bf16 inputs are multiplied in their own type (exact products, float32 accumulation), float32
ones with IEEE float32 dots (no TF32), so results match the float32 reference to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_util import check_device, interpreting, pow2

BLOCK_M = 16  # query rows per program (tl.dot needs >= 16)
BLOCK_N = 64  # keys per step


@triton.jit
def _soft_capped(s, cap):
    """``cap * tanh(s / cap)`` (Gemma2's logit soft-cap). tanh from one exponential, ``(1 - e) / (1 +
    e)`` with ``e = exp(-2|x|)``, which cancels near 0: there its series ``x - x^3/3 + 2x^5/15`` is
    exact to float32 (below |x| = 1/16 the next term is under 1e-9 of x)."""
    x = s / cap
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    x2 = a * a
    near = a * (1.0 - x2 * (1.0 / 3.0) + x2 * x2 * (2.0 / 15.0))
    t = tl.where(a < 0.0625, near, far)
    return cap * tl.where(x < 0, -t, t)


@triton.jit
def _attention_rows_kernel(
    q_ptr, k_ptr, mask_ptr, out_ptr,
    rows_per_kv, n_queries, n_keys, head_dim, group, kv_heads, scale, cap,
    sq_b, sq_h, sq_q, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sm_b, sm_h, sm_q, sm_n,
    so_b, so_h, so_q, so_n,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    kv = pid_bh % kv_heads
    # Row r of this key head's block is query row r % Q of query head kv * group + r // Q (GQA).
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < rows_per_kv
    head = kv * group + rows // n_queries
    qi = rows % n_queries
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(
        q_ptr + b * sq_b + head[:, None] * sq_h + qi[:, None] * sq_q + d[None, :] * sq_d,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    k_base = k_ptr + b * sk_b + kv * sk_h
    m_base = mask_ptr + b * sm_b + head[:, None] * sm_h + qi[:, None] * sm_q

    # Pass 1: running maximum m and sum l of exp(s - m) per row.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < n_keys
        k = tl.load(k_base + n[:, None] * sk_n + d[None, :] * sk_d, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        if SOFTCAP:
            s = _soft_capped(s, cap)
        ok = row_ok[:, None] & n_ok[None, :]
        if HAS_MASK:
            allowed = tl.load(m_base + n[None, :] * sm_n, mask=ok, other=0)
            ok = ok & (allowed != 0)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep exp() finite
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m_i = m_new

    # Pass 2: p = exp(s - m) / l. A row with no attended key (l = 0) gets NaN everywhere, as
    # torch.softmax gives for a row of -inf (the reference's semantics).
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = 1.0 / tl.where(l_i > 0, l_i, float("nan"))
    o_base = out_ptr + b * so_b + head[:, None] * so_h + qi[:, None] * so_q
    for start in range(0, n_keys, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < n_keys
        k = tl.load(k_base + n[:, None] * sk_n + d[None, :] * sk_d, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        if SOFTCAP:
            s = _soft_capped(s, cap)
        ok = row_ok[:, None] & n_ok[None, :]
        if HAS_MASK:
            allowed = tl.load(m_base + n[None, :] * sm_n, mask=ok, other=0)
            s = tl.where(allowed != 0, s, float("-inf"))
        p = tl.exp(s - m_safe[:, None]) * inv_l[:, None]
        tl.store(o_base + n[None, :] * so_n, p, mask=ok)


@triton.jit
def _row_lse_kernel(
    q_ptr, k_ptr, lse_ptr,
    rows_per_kv, n_queries, n_keys, head_dim, group, kv_heads, scale,
    sq_b, sq_h, sq_q, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sl_b, sl_h, sl_q,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    kv = pid_bh % kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < rows_per_kv
    head = kv * group + rows // n_queries
    qi = rows % n_queries
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(
        q_ptr + b * sq_b + head[:, None] * sq_h + qi[:, None] * sq_q + d[None, :] * sq_d,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    k_base = k_ptr + b * sk_b + kv * sk_h
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < n_keys
        k = tl.load(k_base + n[:, None] * sk_n + d[None, :] * sk_d, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + b * sl_b + head * sl_h + qi * sl_q, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _column_mass_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr,
    rows_per_kv, n_queries, n_keys, head_dim, group, kv_heads, scale,
    sq_b, sq_h, sq_q, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sl_b, sl_h, sl_q,
    so_b, so_h, so_n,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    kv = pid_bh % kv_heads
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_keys
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    k = tl.load(
        k_ptr + b * sk_b + kv * sk_h + n[:, None] * sk_n + d[None, :] * sk_d,
        mask=n_ok[:, None] & d_ok[None, :], other=0.0,
    )
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, rows_per_kv, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < rows_per_kv
        head = kv * group + rows // n_queries
        qi = rows % n_queries
        q = tl.load(
            q_ptr + b * sq_b + head[:, None] * sq_h + qi[:, None] * sq_q + d[None, :] * sq_d,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )
        lse = tl.load(lse_ptr + b * sl_b + head * sl_h + qi * sl_q, mask=row_ok, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        p = tl.exp(s - lse[:, None])
        acc += tl.sum(tl.where(row_ok[:, None] & n_ok[None, :], p, 0.0), axis=0)
    tl.store(out_ptr + b * so_b + kv * so_h + n * so_n, acc, mask=n_ok)


def _prepare(query: torch.Tensor, key: torch.Tensor):
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be [B, H, Q, D] and [B, H_kv, N, D], got {tuple(query.shape)} and {tuple(key.shape)}")
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key heads")
    if key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree on batch or head_dim")
    check_device(_attention_rows_kernel, query, key)
    # The reference computes in float32; other floating types are taken to float32 first, as it does.
    if query.dtype != key.dtype or query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        query, key = query.float(), key.float()
    elif query.dtype == torch.bfloat16 and interpreting():
        # Triton's interpreter (3.8) multiplies bf16 operands of tl.dot as raw 16-bit integers; widen
        # them first there. Exact: bf16 products are exact in float32, as on the GPU's bf16 dot.
        query, key = query.float(), key.float()
    return query, key, heads // kv_heads, query.dtype == torch.float32


def attention_rows(
    query: torch.Tensor, key: torch.Tensor, scaling: float, key_mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Triton ``attention_rows``: same arguments, result and semantics as ``reference.attention_rows``."""
    query, key, group, ieee = _prepare(query, key)
    batch, heads, n_queries, head_dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    out = torch.empty(batch, heads, n_queries, n_keys, dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out
    if key_mask is not None:
        check_device(_attention_rows_kernel, query, key_mask)
        # The reference broadcasts key_mask[:, None] against [B, H, Q, N]; the strides of that broadcast
        # (0 where a dimension is shared) are what the kernel reads.
        mask = key_mask.to(torch.bool)
        mask = torch.broadcast_to(mask[:, None], (batch, heads, n_queries, n_keys)).view(torch.uint8)
        mask_strides = mask.stride()
    else:
        mask, mask_strides = out, (0, 0, 0, 0)  # never read
    rows_per_kv = group * n_queries
    grid = (triton.cdiv(rows_per_kv, BLOCK_M), batch * kv_heads)
    _attention_rows_kernel[grid](
        query, key, mask, out,
        rows_per_kv, n_queries, n_keys, head_dim, group, kv_heads, float(scaling),
        float(softcap) if softcap is not None else 1.0,
        *query.stride(), *key.stride(), *mask_strides, *out.stride(),
        HAS_MASK=key_mask is not None, IEEE=ieee, SOFTCAP=softcap is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=pow2(head_dim),
    )
    return out


def row_logsumexp(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[B, H, Q]`` float32 ``logsumexp_n(q k_n^T * scaling)`` over all keys (pass 1 of received attention)."""
    query, key, group, ieee = _prepare(query, key)
    batch, heads, n_queries, head_dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    lse = torch.empty(batch, heads, n_queries, dtype=torch.float32, device=query.device)
    if lse.numel() == 0:
        return lse
    if n_keys == 0:
        return lse.fill_(float("-inf"))
    rows_per_kv = group * n_queries
    grid = (triton.cdiv(rows_per_kv, BLOCK_M), batch * kv_heads)
    _row_lse_kernel[grid](
        query, key, lse,
        rows_per_kv, n_queries, n_keys, head_dim, group, kv_heads, float(scaling),
        *query.stride(), *key.stride(), *lse.stride(),
        IEEE=ieee, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=pow2(head_dim),
    )
    return lse


def received_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, chunk: int | None = None
) -> torch.Tensor:
    """Triton ``received_attention``: same arguments, result and semantics as
    ``reference.received_attention`` (``chunk`` only sizes the reference's row chunks and is ignored)."""
    query, key, group, ieee = _prepare(query, key)
    batch, heads, n_queries, head_dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    if batch == 0 or n_keys == 0 or n_queries == 0:
        return torch.zeros(batch, n_keys, dtype=torch.float32, device=query.device)
    lse = row_logsumexp(query, key, scaling)
    partial = torch.empty(batch, kv_heads, n_keys, dtype=torch.float32, device=query.device)
    grid = (triton.cdiv(n_keys, BLOCK_N), batch * kv_heads)
    _column_mass_kernel[grid](
        query, key, lse, partial,
        group * n_queries, n_queries, n_keys, head_dim, group, kv_heads, float(scaling),
        *query.stride(), *key.stride(), *lse.stride(), *partial.stride(),
        IEEE=ieee, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=pow2(head_dim),
    )
    return partial.sum(dim=1) / heads
