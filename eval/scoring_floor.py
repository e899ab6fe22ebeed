"""The least work a method's own scoring algorithm needs, timed on the bench's shapes.

The speed bench's scoring target (issue "Speed that holds up": under 2% of the unpruned prefill,
"except where the paper's own algorithm costs more; then say how much, measured") exempts a method
whose algorithm cannot be done in 2%. FLOPs (``vtoken.flops``) count matmuls only; a statistic over a
whole attention map also needs one exponential per score and the sums that make the softmax, and on a
CPU at small head dims those cost as much as the matmul. This module times that irreducible part on
the bench's own shapes.

Only ``ScoringCost("vision_attention_map")`` (VFlowOpt's received attention, paper Eqs. 1-3: the
column mass of the layer's softmax over every query) has a measured floor, the quicker of two exact
forms of it on the machine at hand; every other kind is judged
by its FLOPs alone (its floor here is 0).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from vtoken.kernels.reference import _received_chunk_rows


@dataclass(frozen=True)
class AttentionMapShape:
    """One image's self-attention in a vision layer: ``heads`` heads of ``head_dim`` over ``tokens``
    tokens (the softmax's width: every patch, and the CLS token where the tower has one)."""

    heads: int
    tokens: int
    head_dim: int
    #: Maps per image: the views a tower encodes apart (AnyRes: the base view and each crop).
    views: int = 1


def column_mass_without_max(q: torch.Tensor, k_t: torch.Tensor, chunk: int, scores: torch.Tensor,
                            total: torch.Tensor) -> torch.Tensor:
    """The arithmetic every exact column mass of a softmax map does, and nothing else: each query
    row's scores against every key (``q @ k_t``, a matmul over ``head_dim``), their exponentials, the
    row's normaliser (the sum of its exponentials) and each key's column sum weighted by the rows'
    reciprocal normalisers (``sum_q exp(s_qn) / Z_q``: the statistic itself). Left out: the row max a
    safe softmax subtracts first (it changes no probability, only what overflows), the mean over
    heads and anything a method does with the result. ``q`` ``[M, T, d]`` (M maps) and ``k_t``
    ``[M, d, T]``; the query rows run ``chunk`` at a time through ``scores`` (``[M, chunk, T]``,
    reused: no ``T x T`` map at once); the column sums, over every map, are added into ``total``
    (``[M, T]``) and returned."""
    for first in range(0, q.shape[1], chunk):
        rows = q[:, first : first + chunk]
        block = scores[:, : rows.shape[1]]
        torch.matmul(rows, k_t, out=block)
        block.exp_()
        inverse = block.sum(dim=-1).reciprocal_()  # [M, rows]: 1 / Z_q
        total += torch.matmul(inverse[:, None, :], block)[:, 0]
    return total


def column_mass_fused_softmax(q: torch.Tensor, k_t: torch.Tensor, chunk: int, scores: torch.Tensor,
                              total: torch.Tensor) -> torch.Tensor:
    """The same column mass (same arguments) through torch's fused softmax taken in place, then the
    column sums (a vector-matrix product of ones): more arithmetic than
    :func:`column_mass_without_max` (the row max), but one kernel per chunk whose exponential is the
    faster on the CPUs tried, so it can take less time (``kernels.reference.received_attention``
    computes it this way)."""
    ones = torch.ones(q.shape[0], 1, scores.shape[1], dtype=scores.dtype, device=scores.device)
    for first in range(0, q.shape[1], chunk):
        rows = q[:, first : first + chunk]
        block = scores[:, : rows.shape[1]]
        torch.matmul(rows, k_t, out=block)
        torch.softmax(block, dim=-1, out=block)
        total += torch.matmul(ones[..., : rows.shape[1]], block)[:, 0]
    return total


#: The exact column-mass forms the floor times; it takes the quicker on the machine at hand.
COLUMN_MASS_FORMS = (column_mass_without_max, column_mass_fused_softmax)


def attention_map_floor(shape: AttentionMapShape, device: torch.device, repeats: int = 7, seed: int = 0) -> float:
    """Median seconds (of ``repeats``, after one warm-up) of the quicker of :data:`COLUMN_MASS_FORMS`
    over one image's attention maps (``views x heads`` maps of ``tokens x tokens`` scores): the least
    time an exact column mass of a softmax over every score is known to take here. The query rows run
    in the chunks ``kernels.reference.received_attention`` uses (no ``N x N`` map at once, the
    exponentials in cache).

    Which form is quicker depends on the CPU: the fewest operations (no row max, ``exp_``) or torch's
    fused softmax, whose faster exponential outweighs the max (15-25% quicker on an AMD EPYC, which
    put the first form's "floor" above the kernel it was the floor of). An earlier floor timed the
    scores and exponentials alone. That left out the row normalisers and the weighted column sums,
    two reads of every score that no exact column mass can skip, and on the Qwen-VL shapes it put
    VFlowOpt at 2.0% to 2.6% of the unpruned prefill from run to run, on both sides of the exemption."""
    g = torch.Generator().manual_seed(seed)
    maps = (shape.views * shape.heads, shape.tokens, shape.head_dim)
    q = torch.randn(*maps, generator=g).to(device) * shape.head_dim ** -0.5
    k_t = torch.randn(*maps, generator=g).to(device).transpose(-1, -2)
    chunk = _received_chunk_rows(shape.views * shape.heads * shape.tokens)
    scores = torch.empty(maps[0], min(chunk, shape.tokens), shape.tokens, device=device)
    total = torch.zeros(maps[0], shape.tokens, device=device)

    def once(form) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        form(q, k_t, chunk, scores, total.zero_())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with torch.no_grad():
        medians = []
        for form in COLUMN_MASS_FORMS:
            once(form)
            medians.append(statistics.median(once(form) for _ in range(repeats)))
        return min(medians)


def scoring_floor(costs, shape: AttentionMapShape | None, device: torch.device, cache: dict | None = None) -> float:
    """Seconds of the measured floor of a schedule's scoring ``costs`` (``vtoken.schedule_of(model)
    .scoring``): one :func:`attention_map_floor` per ``vision_attention_map`` cost, 0 for every other
    kind. ``cache`` (optional) keeps one measurement per shape across calls."""
    maps = sum(cost.kind == "vision_attention_map" for cost in costs)
    if not maps:
        return 0.0
    if shape is None:
        raise ValueError("a vision_attention_map cost needs the tower's attention shape (AttentionMapShape)")
    cache = {} if cache is None else cache
    if shape not in cache:
        cache[shape] = attention_map_floor(shape, device)
    return maps * cache[shape]
