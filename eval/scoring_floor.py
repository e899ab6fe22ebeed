"""The least work a method's own scoring algorithm needs, timed on the bench's shapes.

The speed bench's scoring target (issue "Speed that holds up": under 2% of the unpruned prefill,
"except where the paper's own algorithm costs more; then say how much, measured") exempts a method
whose algorithm cannot be done in 2%. FLOPs (``vtoken.flops``) count matmuls only; a statistic over a
whole attention map also needs one exponential per score, and on a CPU at small head dims those cost
as much as the matmul. This module times that irreducible part on the bench's own shapes.

Only ``ScoringCost("vision_attention_map")`` (VFlowOpt's received attention, paper Eqs. 1-3: the
column mass of the layer's softmax over every query) has a measured floor; every other kind is judged
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


def attention_map_floor(shape: AttentionMapShape, device: torch.device, repeats: int = 7, seed: int = 0) -> float:
    """Median seconds (of ``repeats``, after one warm-up) of the least work of any statistic that
    reads the softmax of every score of one image's attention maps (one per view): the ``views x heads x tokens^2`` scores
    computed (a matmul over ``head_dim``) and exponentiated, nothing else. No max is subtracted and
    nothing is reduced, normalised or summed, so this is below what the column mass needs. The query
    rows run in the chunks ``kernels.reference.received_attention`` uses (no ``N x N`` map at once,
    the exponentials in cache), each chunk's scores written into one reused buffer."""
    g = torch.Generator().manual_seed(seed)
    maps = (shape.views, shape.heads, shape.tokens, shape.head_dim)
    q = torch.randn(*maps, generator=g).to(device) * shape.head_dim ** -0.5
    k_t = torch.randn(*maps, generator=g).to(device).transpose(-1, -2)
    chunk = _received_chunk_rows(shape.views * shape.heads * shape.tokens)
    buffer = torch.empty(shape.views, shape.heads, chunk, shape.tokens, device=device)

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for first in range(0, shape.tokens, chunk):
            rows = q[:, :, first : first + chunk]
            scores = buffer[:, :, : rows.shape[2]]
            torch.matmul(rows, k_t, out=scores)
            scores.exp_()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with torch.no_grad():
        once()
        return statistics.median(once() for _ in range(repeats))


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
