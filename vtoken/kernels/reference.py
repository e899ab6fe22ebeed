"""PyTorch reference implementations of vtoken's kernels.

These are product code, not test helpers: they are the CPU path and the oracle every Triton kernel is
tested against. None of them materialises an N x N attention map.
"""

from __future__ import annotations

import torch

#: Metrics of :func:`token_shift`.
SHIFT_METRICS = ("l2", "l1", "cos", "abs_cos", "norm_ratio")


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities of a few query rows against every key.

    Args:
        query: ``[B, H, Q, D]`` post-RoPE queries of the rows wanted (Q is small: the last token, the
            instruction tokens).
        key: ``[B, H_kv, N, D]`` post-RoPE keys of all N tokens; ``H % H_kv == 0`` (grouped-query
            attention: query head ``h`` reads key head ``h // (H // H_kv)``, as ``repeat_kv`` does).
        scaling: the softmax scale (``head_dim ** -0.5`` for Llama).
        key_mask: optional boolean ``[B, Q, N]`` or ``[B, 1, N]``, True where the row may attend
            (causality and padding folded in by the caller).
        softcap: the cap ``c`` of a model that soft-caps its attention logits, ``c * tanh(logits /
            c)`` before the mask and the softmax (Gemma2's ``attn_logit_softcapping``); None: none.

    Returns:
        ``[B, H, Q, N]`` float32 probabilities; each row sums to 1 over its attended keys. Cost is
        O(B * H * Q * N * D) and memory O(B * H * Q * N): no N x N map.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key heads")
    group = heads // kv_heads
    # Group query heads by the key head they share instead of repeating the keys. The scale goes on
    # the queries (Q x D values) rather than the scores (Q x N), and the mask is written in place:
    # one score buffer, not three.
    q = (query.float() * scaling).reshape(batch, kv_heads, group * query.shape[2], head_dim)
    scores = torch.matmul(q, key.float().transpose(-1, -2))
    scores = scores.reshape(batch, heads, query.shape[2], key.shape[2])
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    if key_mask is not None:
        scores.masked_fill_(~key_mask[:, None].to(torch.bool), float("-inf"))
    if scores.requires_grad:  # (scoring inside a forward that trains: out= takes no part in autograd)
        return torch.softmax(scores, dim=-1)
    # In place: a fresh buffer of the scores' size costs its page faults on CPU (20 rows x 2400 keys x
    # 12 heads ran 2.3x slower into a new tensor on one thread); the same numbers, bit for bit.
    return torch.softmax(scores, dim=-1, out=scores)


#: Score buffer of :func:`received_attention`'s chunks: about ``_CHUNK_SCORES`` scores (2 MB, near a
#: core's cache) where the keys are few, but at least ``_MIN_CHUNK_ROWS`` query rows (the matmul's
#: rows: with fewer, many keys make thin matmuls) and never more than ``_MAX_CHUNK_SCORES`` (64 MB).
_CHUNK_SCORES, _MIN_CHUNK_ROWS, _MAX_CHUNK_SCORES = 1 << 19, 64, 1 << 24


def _received_chunk_rows(scores_per_row: int) -> int:
    """Query rows per chunk of :func:`received_attention` (``scores_per_row = B * H * N``). On one
    CPU thread this ran faster than the former fixed 1M-score chunk at 576 keys x 6 heads, at a
    2304-patch Qwen2-VL image (4 heads) and at 4096 keys x 16 heads (``eval/bench_kernels.py`` times
    the reference at N = 576 to 32768)."""
    per_row = max(1, scores_per_row)
    rows = max(_MIN_CHUNK_ROWS, _CHUNK_SCORES // per_row)
    return max(1, min(rows, _MAX_CHUNK_SCORES // per_row))


def received_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, chunk: int | None = None
) -> torch.Tensor:
    """Attention each key receives, summed over the query rows and averaged over heads.

    Bidirectional (unmasked) softmax attention as in a vision encoder: for ``query`` ``[B, H, Q, D]``
    and ``key`` ``[B, H_kv, N, D]`` (``H % H_kv == 0``) it returns ``[B, N]`` float32
    ``sum_q mean_h softmax(q k^T * scaling)[h, q, n]``. Each softmax runs over all N keys; the query
    rows are processed ``chunk`` at a time (default: :func:`_received_chunk_rows`), and the sums
    accumulate chunk by chunk, so memory is O(B * H * chunk * N): no Q x N map exists at once.
    """
    batch, heads, rows, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key heads")
    group = heads // kv_heads
    if chunk is None:
        chunk = _received_chunk_rows(batch * heads * keys)
    k_t = key.float().transpose(-1, -2)
    total = torch.zeros(batch, keys, dtype=torch.float32, device=query.device)
    # The only score-sized buffer, written by every chunk's matmul in turn, its softmax taken in place
    # (torch's fused row kernel: max, exponentials, sum and scaling while the row is in cache), then
    # its rows summed by a vector-matrix product per head (what ``vtoken.flops`` counts for the column
    # sums; as fast as a plain sum here). On CPU every fresh score-sized tensor costs its page faults:
    # a softmax into a new tensor per chunk, then a sum, ran about three times slower on one CPU
    # thread (576 queries x 577 keys x 6 heads). The in-place softmax also beat the max, exponentials
    # (exp_), row sums and normaliser-weighted product it replaced, by 15-25% from 577 to 4096 keys
    # on one thread (the fused kernel's exponential is the faster).
    width = group * min(chunk, rows)
    buffer = torch.empty(batch * kv_heads * width * keys, dtype=torch.float32, device=query.device)
    ones = torch.ones(batch, kv_heads, 1, width, dtype=torch.float32, device=query.device)
    for start in range(0, rows, chunk):
        q = query[:, :, start : start + chunk].float() * scaling
        q = q.reshape(batch, kv_heads, group * q.shape[2], head_dim)
        scores = buffer[: batch * kv_heads * q.shape[2] * keys].view(batch, kv_heads, q.shape[2], keys)
        torch.matmul(q, k_t, out=scores)  # [B, H_kv, group * chunk, N]
        torch.softmax(scores, dim=-1, out=scores)
        total += torch.matmul(ones[..., : q.shape[2]], scores).sum(dim=(1, 2))
    return total / heads


def compact_index(keep: torch.Tensor) -> torch.Tensor:
    """Indices that pack the kept slots of each row to the right, left-padded with -1.

    ``keep`` is a boolean ``[B, L]``; the result is ``[B, L']`` with ``L' = max kept per row``. Row b
    holds, in order, the positions where ``keep[b]`` is True, preceded by ``L' - count_b`` entries of
    -1. Left padding keeps every row's last token in the last column, as ``generate`` expects.
    """
    keep = keep.to(torch.bool)
    counts = keep.sum(dim=-1)
    width = int(counts.max()) if keep.numel() else 0
    out = torch.full((keep.shape[0], width), -1, dtype=torch.long, device=keep.device)
    if width == 0:
        return out
    # Destination column of every kept slot: its rank among the kept slots, shifted by the row's pad.
    dest = keep.long().cumsum(dim=-1) - 1 + (width - counts)[:, None]
    rows, cols = keep.nonzero(as_tuple=True)
    out[rows, dest[rows, cols]] = cols
    return out


def gather_tokens(x: torch.Tensor, index: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``x[b, index[b, j]]`` for ``x`` of shape ``[B, L, ...]``; entries where ``index == -1`` get ``fill``.

    Whole token rows are copied by row index (``index_select`` for one sample, advanced indexing for
    several), not element by element through an index expanded over the trailing dimensions
    (``torch.gather``), which reads an index per value and was the slower of the two on CPU for hidden
    states and KV rows; the values are the same copies."""
    # One reduction tells whether any entry is -1; an index without one (most of them: a stage's kept
    # rows, a query's slots) is used as it is, with no mask, clamp or fill.
    complete = index.numel() == 0 or int(index.min()) >= 0
    safe = index if complete else index.clamp(min=0)
    if index.shape[0] != x.shape[0]:  # torch.gather's semantics: index rows beyond x's are an error
        view = safe.reshape(*safe.shape, *([1] * (x.dim() - 2))).expand(*safe.shape, *x.shape[2:])
        out = torch.gather(x, 1, view)
    elif x.shape[0] == 1:
        out = x.index_select(1, safe[0])
    else:
        out = x[torch.arange(x.shape[0], device=x.device)[:, None], safe]
    if not complete:
        valid = index >= 0
        mask = valid.reshape(*valid.shape, *([1] * (x.dim() - 2)))
        out = torch.where(mask, out, torch.as_tensor(fill, dtype=x.dtype, device=x.device))
    return out


def cu_seqlens(keep: torch.Tensor) -> torch.Tensor:
    """Cumulative kept lengths ``[B + 1]`` (int32, leading 0) of a boolean keep mask ``[B, L]``.

    Row b's kept tokens occupy ``[out[b], out[b + 1])`` of the packed sequence, the ``cu_seqlens`` a
    variable-length FlashAttention call takes (``max_seqlen`` is ``int(out.diff().max())``).
    """
    counts = keep.to(torch.bool).sum(dim=-1, dtype=torch.int32)
    out = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=keep.device)
    out[1:] = torch.cumsum(counts, dim=0, dtype=torch.int32)
    return out


def check_shift_metrics(metrics: tuple[str, ...]) -> None:
    """Raise the one error every ``token_shift(s)`` backend gives for a metric it does not know."""
    unknown = [m for m in metrics if m not in SHIFT_METRICS]
    if unknown:
        raise ValueError(f"metric must be one of {SHIFT_METRICS}, got {unknown[0]!r}")


#: Tokens per chunk of :func:`token_shifts`' sums: about ``_SHIFT_CHUNK_VALUES`` values of each
#: hidden state (256 KB in float32; the two chunks and their product, 768 KB, stay in a core's L2),
#: so the products and differences the sums take stay in cache instead of making a whole-tensor
#: temporary each (a dot product was a full product written and read back). Inside the speed bench's
#: LLaVA prefill on one CPU thread (TransPrune's TTV, 768 wide; timed in alternating runs, the
#: strategy's own calls as ``eval/bench_speed.py --methods transprune`` reports them), 256 KB chunks
#: sliced in place ran faster than 512 KB chunks taken with ``split``, and than 128 KB or 64 KB
#: chunks (more ops per token).
_SHIFT_CHUNK_VALUES = 1 << 16


def _token_sum(name: str, a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The per-token sum ``name`` of :func:`_shift_sums` over the last axis of ``a`` and ``b``, written
    into ``out`` when given. The product or difference it sums goes into ``scratch`` when given (a
    chunk's buffer, reused by every chunk: no allocation), else into a new tensor (whole tensors,
    broadcast pairs, autograd)."""
    if name == "norm_after":
        return torch.linalg.vector_norm(a, dim=-1, out=out)
    if name == "norm_before":
        return torch.linalg.vector_norm(b, dim=-1, out=out)
    if name == "dot":
        return torch.sum(torch.mul(a, b, out=scratch), dim=-1, out=out)
    difference = torch.sub(a, b, out=scratch)
    if name == "l2":
        return torch.linalg.vector_norm(difference, dim=-1, out=out)
    # l1: the scratch buffer is ours to overwrite; a new difference may be part of an autograd graph
    return torch.sum(difference.abs_() if scratch is not None else difference.abs(), dim=-1, out=out)


def _shift_sums(after: torch.Tensor, before: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    """The per-token sums ``names`` asks for, reduced over D: ``"norm_after"``, ``"norm_before"``,
    ``"dot"`` (``after . before``), ``"l2"`` (``||after - before||``), ``"l1"``.

    Two tensors of one shape that need no gradient are reduced a chunk of tokens at a time, into
    the results; each token's sums are the whole-tensor ones bit for bit (a row's reduction over a
    contiguous feature axis does not depend on the rows beside it). Broadcast pairs, a strided
    feature axis and autograd take the whole tensors."""
    chunk = max(1, _SHIFT_CHUNK_VALUES // max(after.shape[-1], 1))
    tokens = after.shape[-2] if after.dim() >= 2 else 1
    needs_grad = torch.is_grad_enabled() and (after.requires_grad or before.requires_grad)
    # A strided feature axis is reduced in another order over a whole tensor than over a chunk.
    strided = after.dim() >= 1 and (after.stride(-1) != 1 or before.stride(-1) != 1)
    if after.shape != before.shape or after.dim() < 2 or needs_grad or strided or tokens <= chunk:
        return {name: _token_sum(name, after, before) for name in names}
    # The sums that read both tensors first, so the norms after them find the chunk in cache.
    order = [name for name in ("dot", "l2", "l1", "norm_after", "norm_before") if name in names]
    outs = [after.new_empty(after.shape[:-1]) for _ in order]
    paired = any(name in ("dot", "l2", "l1") for name in order)
    scratch = after.new_empty(*after.shape[:-2], chunk, after.shape[-1]) if paired else None
    for start in range(0, tokens, chunk):
        stop = min(start + chunk, tokens)
        a, b = after[..., start:stop, :], before[..., start:stop, :]
        part = scratch if scratch is None or stop - start == chunk else scratch[..., : stop - start, :]
        for name, out in zip(order, outs):
            _token_sum(name, a, b, part, out[..., start:stop])
    return dict(zip(order, outs))


def token_shifts(after: torch.Tensor, before: torch.Tensor, metrics: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """Several per-token changes between two hidden states ``[..., D]`` (broadcast), reduced over D, in
    float32, one result per name in ``metrics``; the sums they share (each norm, the dot product) are
    computed once, a chunk of tokens at a time (:func:`_shift_sums`).

    ``"l2"``: ``||after - before||``; ``"l1"``: ``sum |after - before|``; ``"cos"``:
    ``1 - cos(after, before)``; ``"abs_cos"``: ``1 - |cos(after, before)|`` with ``cos = after.before /
    (max(||after||, 1e-8) * max(||before||, 1e-8))`` (``F.cosine_similarity``'s clamping, so a zero
    vector has cosine 0; the dot product is not formed from two normalised copies, which costs ten
    times as much on CPU, nor by ``einsum``, which runs it as a batched matmul that torch's FLOP
    counter then counts, where ``vtoken.flops`` leaves element-wise work out); ``"norm_ratio"``:
    ``||after|| / max(||before||, 1e-12)``. These are, term for term, the formulas of Representation
    Shift (``repshift.token_distance(after, before, "l2" | "l1" | "cos")``) and TransPrune's token
    transition variation (``direction_change(x_in, x_out, "signed" | "abs")`` is ``token_shift(x_out,
    x_in, "cos" | "abs_cos")``; ``magnitude_change(x_in, x_out)`` is ``token_shift(x_out, x_in,
    "norm_ratio")``), tested equal bit for bit.
    """
    check_shift_metrics(metrics)
    needed = {"cos": ("dot", "norm_after", "norm_before"), "abs_cos": ("dot", "norm_after", "norm_before"),
              "norm_ratio": ("norm_after", "norm_before"), "l2": ("l2",), "l1": ("l1",)}
    sums = _shift_sums(after.float(), before.float(), {name for m in metrics for name in needed[m]})
    cosine = None
    if "dot" in sums:
        cosine = sums["dot"] / (sums["norm_after"].clamp_min(1e-8) * sums["norm_before"].clamp_min(1e-8))
    out = []
    for metric in metrics:
        if metric in ("l2", "l1"):
            out.append(sums[metric])
        elif metric == "cos":
            out.append(1.0 - cosine)
        elif metric == "abs_cos":
            out.append(1.0 - cosine.abs())
        else:  # norm_ratio
            out.append(sums["norm_after"] / sums["norm_before"].clamp_min(1e-12))
    return tuple(out)


def token_shift(after: torch.Tensor, before: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """One per-token change between two hidden states ``[..., D]``, float32; see :func:`token_shifts`
    for the metrics (``"l2"``, ``"l1"``, ``"cos"``, ``"abs_cos"``, ``"norm_ratio"``)."""
    return token_shifts(after, before, (metric,))[0]


def masked_topk(scores: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Per row, the indices of the ``budget[r]`` highest scores, sorted ascending, padded with -1.

    ``scores`` and ``valid`` are ``[R, N]``; ``budget`` is ``[R]``. Invalid entries rank below every
    valid one (they are chosen only when a row's budget exceeds its valid count, which the vision site
    uses to keep a fixed shape). Ties break toward the lower index, so the result is deterministic.
    Returns ``[R, K]`` with ``K = max(budget)``.
    """
    rows, width = scores.shape
    k = int(budget.max()) if rows else 0
    if k == 0:
        return torch.empty(rows, 0, dtype=torch.long, device=scores.device)
    if k <= width and bool(valid.all()) and bool((budget == k).all()):
        # Every entry valid and every row keeping k (an LLM stage of one image, most vision stages):
        # no entry to rank last and no row to pad, so the masks below would change nothing.
        order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :k]
        return torch.sort(order, dim=-1).values
    ranked = scores.float().masked_fill(~valid, float("-inf"))
    # A stable descending sort puts the lowest index first among ties (topk does not promise that).
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[:, :k]
    beyond_budget = torch.arange(k, device=scores.device)[None, :] >= budget[:, None]
    # Entries past a row's budget become a sentinel that sorts last, then -1.
    order = torch.sort(order.masked_fill(beyond_budget, width), dim=-1).values
    return order.masked_fill(order == width, -1)
