"""What a strategy's ``reduce`` hands back, checked before the pipeline uses it: a strategy written
outside vtoken (README: a method is a ``score`` or a ``reduce`` on tensors) that returns the wrong
thing gets one line naming the strategy, the field and what it should be, instead of a raw
indexing error deep inside the pipeline, or a silently wrong sequence (padding kept, a token kept
twice, NaN scores ranked first)."""

from __future__ import annotations

import torch

from vtoken.context import Reduction, TokenRows


def check_scores(name: str, scores: torch.Tensor, rows: TokenRows) -> None:
    """``score``'s result: a tensor of the candidates' shape, a number for every valid candidate."""
    if not isinstance(scores, torch.Tensor):
        raise RuntimeError(f"{name}.score returned {type(scores).__name__}, expected a tensor of shape "
                           f"{tuple(rows.valid.shape)} (one score per candidate)")
    if scores.shape != rows.valid.shape:
        raise RuntimeError(f"{name}.score returned shape {tuple(scores.shape)}, expected {tuple(rows.valid.shape)}")
    if scores.is_floating_point() or scores.is_complex():
        nan = torch.isnan(scores) & rows.valid.to(scores.device)
        if bool(nan.any()):
            raise RuntimeError(f"{name}.score returned NaN for {int(nan.sum())} valid candidate(s); give every valid "
                               "candidate a number (NaN would rank first)")


def check_reduction(name: str, reduction, rows: TokenRows) -> None:
    """``reduce``'s result: a :class:`Reduction` whose ``keep`` is ``[R, K]`` integer indices of
    candidates, each at most once, valid ones (padding only once every valid one is kept, as the
    vision site keeps a fixed shape), and whose ``features`` / ``merged_into`` fit it."""
    if not isinstance(reduction, Reduction):
        raise RuntimeError(f"{name}.reduce returned {type(reduction).__name__}, expected a vtoken.context.Reduction "
                           "(Reduction(keep=...))")
    keep, valid = reduction.keep, rows.valid
    count, width = valid.shape
    if not isinstance(keep, torch.Tensor) or keep.dim() != 2 or keep.shape[0] != count:
        shape = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise RuntimeError(f"{name}.reduce: keep is {shape}, expected a [{count}, K] tensor of kept indices per row")
    if keep.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise RuntimeError(f"{name}.reduce: keep holds {keep.dtype}, expected integer indices (torch.long)")
    if reduction.features is not None and tuple(reduction.features.shape[:2]) != tuple(keep.shape):
        raise RuntimeError(f"{name}.reduce: features are {tuple(reduction.features.shape)}, expected [{count}, "
                           f"{keep.shape[1]}, d] (one feature row per kept index)")
    merged = reduction.merged_into
    if merged is not None and tuple(merged.shape) != (count, width):
        raise RuntimeError(f"{name}.reduce: merged_into is {tuple(merged.shape)}, expected [{count}, {width}] "
                           "(per candidate, the column of keep that holds it)")
    # Every check that reads the tensors' values is made on the device and read back at once: one
    # host synchronisation per stage (each read a sync of its own would stall a GPU's queue four
    # times per stage, for methods whose results are always right as much as for a new one's).
    valid = valid.to(keep.device)
    outside = (keep < -1) | (keep >= width)
    kept = keep >= 0
    ordered = keep.sort(dim=-1).values
    twice = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(-1)
    if reduction.features is None:
        kept_valid = valid.gather(1, keep.clamp(0, max(width - 1, 0)).long()) & kept & ~outside
        pads_first = (kept & ~kept_valid).any(-1) & (kept_valid.sum(-1) < valid.sum(-1))
    else:  # A merging reduction, with features of its own, places each merged token at a slot of its
        # choosing, which may be one that never reaches the LLM (pool's window anchors on a cut crop).
        pads_first = torch.zeros(count, dtype=torch.bool, device=keep.device)
    no_column = ((merged < -1) | (merged >= keep.shape[1])).any() if merged is not None else outside.new_zeros(())
    found = torch.stack([outside.any(), twice.any(), pads_first.any(), no_column.to(outside.device)]).tolist()
    if found[0]:
        raise RuntimeError(f"{name}.reduce: keep holds indices outside 0..{width - 1} (or -1 for padding): "
                           f"{int(keep.min())}..{int(keep.max())}")
    if found[1]:
        row = int(twice.nonzero()[0])
        raise RuntimeError(f"{name}.reduce: row {row} keeps a candidate more than once; keep each index once")
    if found[2]:
        row = int(pads_first.nonzero()[0])
        raise RuntimeError(f"{name}.reduce: row {row} keeps padding (ctx.tokens.valid is False there) while leaving "
                           "valid candidates out; rank the valid ones first (vtoken.kernels.masked_topk does)")
    if found[3]:
        raise RuntimeError(f"{name}.reduce: merged_into holds columns outside 0..{keep.shape[1] - 1} (or -1 for "
                           "a dropped candidate)")
