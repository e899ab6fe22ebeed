"""Split a run's wall time into the model's own transformer blocks and everything else, so that an
overhead of a few milliseconds can be measured on a machine whose identical runs differ by 10%.

Why. ``eval/bench_speed.py`` measures a method's scoring as the difference of two prefills (the
method, then its replay with no scoring) and its machinery as the replay against the unwrapped model
on the same schedule. On a shared CPU two identical 800 ms prefills timed back to back differ by
about 9% (one standard deviation; measured on the 2-core machine these files come from), so the
difference of two whole prefills cannot tell 1% from 3% in a dozen rounds. But most of a prefill is
the model's blocks (vision encoder layers, LLM decoder layers) running on tensors of the same shapes
in both runs: the same schedule means the same work there. Their noise is the noise to remove.

How. :class:`BlockTime` hooks every block of the model (children of an ``nn.ModuleList`` named
``layers`` or ``blocks``): a pre-hook that runs last (after vtoken's, which prune before a layer)
and a forward hook that runs first (before vtoken's, which read a layer's output). Between them the
block is the innermost *frame*; code that is not the model's own nested inside it (a strategy's
calls, vtoken's hooks on a block's sub-modules: :meth:`BlockTime.outside`) pauses the block's
clock. Each block call becomes a :class:`BlockFrame`: which block, the *signature* of its input
(shape, strides and dtype of the hidden states; the attention mask's, or none), its own seconds.

:func:`residual` matches the frames of two runs: the i-th call of a block with a signature in one
run against the i-th call of that block with that signature in the other. A matched pair is the same
work on both sides; what is left of a run's wall time after its matched frames is its *residual*:
the embedding, projector and head, transformers' glue, vtoken's hooks, the strategy's calls, and
any block call the other run does not make (a probe's extra decoding step, a projector perturbed
128 times). The difference of two runs' residuals is the difference of the runs, less the noise of
the matched blocks (which is most of it).

What it cannot see: a difference inside matched blocks, i.e. the same block on the same shapes
doing different work: a layer handed its keys by the scoring (``vtoken/adapters/key_reuse.py``; the bench
times those key projections separately), or memory effects of one run on the other's kernels.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

#: ``nn.ModuleList`` attribute names whose children are a model's transformer blocks.
BLOCK_LISTS = ("layers", "blocks")


@dataclass(frozen=True)
class BlockFrame:
    """One call of a block: its index in :attr:`BlockTime.blocks`, the signature of its input, and
    the seconds it was the innermost frame."""

    block: int
    signature: tuple
    seconds: float


@dataclass
class RunSplit:
    """One timed run: its wall time and every block call it made, in order."""

    wall: float
    frames: list[BlockFrame] = field(default_factory=list)


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of every ``nn.ModuleList`` called ``layers`` or ``blocks`` in ``model``: the
    vision encoder's and the LLM's transformer blocks in every family vtoken wraps."""
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
            blocks.extend(module)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList named {' or '.join(BLOCK_LISTS)}: no block to time")
    return blocks


def _describe(tensor) -> tuple:
    if tensor is None:
        return ("none",)
    if isinstance(tensor, torch.Tensor):
        return (tuple(tensor.shape), tuple(tensor.stride()), str(tensor.dtype))
    return (type(tensor).__name__,)


def signature(args: tuple, kwargs: dict) -> tuple:
    """What decides a block call's work: its hidden states (the first positional tensor, or
    ``hidden_states``) and its attention mask (``attention_mask``, or none), each as shape, strides
    and dtype. Argument names and bookkeeping tensors (cache positions) are left out, so the same
    layer called by transformers and by hand on the same tensors matches."""
    hidden = kwargs.get("hidden_states")
    if hidden is None:
        hidden = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return (_describe(hidden), _describe(kwargs.get("attention_mask")))


class _Frame:
    __slots__ = ("block", "signature", "seconds", "resumed")

    def __init__(self, block: int | None, signature: tuple | None, now: float):
        self.block, self.signature, self.seconds, self.resumed = block, signature, 0.0, now


class BlockTime:
    """Records the :class:`BlockFrame` of every block call while :meth:`timing` is active.

    ``with block_time.timing(): ...`` around one run (after any wrapping context is entered, so
    the hooks here run inside vtoken's), then :meth:`take` the run's frames. Work that is not the
    model's own must run inside :meth:`outside` to be kept out of a block's time.
    """

    def __init__(self, model: nn.Module):
        self.blocks = model_blocks(model)
        self._stack: list[_Frame] = []
        self._frames: list[BlockFrame] = []

    # --- the frame stack: time goes to the innermost frame ---------------------------------------
    def _push(self, block: int | None, sig: tuple | None) -> None:
        now = time.perf_counter()
        if self._stack:
            top = self._stack[-1]
            top.seconds += now - top.resumed
        self._stack.append(_Frame(block, sig, now))

    def _pop(self) -> None:
        now = time.perf_counter()
        top = self._stack.pop()
        top.seconds += now - top.resumed
        if top.block is not None:
            self._frames.append(BlockFrame(top.block, top.signature, top.seconds))
        if self._stack:
            self._stack[-1].resumed = now

    @contextmanager
    def outside(self) -> Iterator[None]:
        """Code that is not the model's own (a strategy's call, a vtoken hook): its time goes to no
        block even when a block called it. A no-op when no block is being timed."""
        if not self._stack:
            yield
            return
        self._push(None, None)
        try:
            yield
        finally:
            self._pop()

    # --- hooks on the blocks ---------------------------------------------------------------------
    @contextmanager
    def timing(self) -> Iterator[None]:
        handles = []
        for index, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(
                lambda module, args, kwargs, i=index: self._push(i, signature(args, kwargs)), with_kwargs=True))
            handles.append(block.register_forward_hook(
                lambda module, args, output: self._pop(), prepend=True, always_call=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._stack.clear()

    def take(self) -> list[BlockFrame]:
        """The frames since the last take (in call order), and start again."""
        frames, self._frames = self._frames, []
        return frames


@contextmanager
def vtoken_hooks_outside(block_time: BlockTime) -> Iterator[None]:
    """While active, hooks vtoken registers (through ``vtoken.adapters.base.UndoStack``, whose
    ``eager`` wraps every hook) run inside ``block_time.outside()``: wrap models inside this context."""
    from vtoken.adapters import base

    original = base.eager

    def eager(fn: Callable) -> Callable:
        def run(*args, **kwargs):
            with block_time.outside():
                return fn(*args, **kwargs)

        return original(run)

    base.eager = eager
    try:
        yield
    finally:
        base.eager = original


def residual(run: RunSplit, other: RunSplit) -> tuple[float, float]:
    """``(seconds, matched share)``: ``run``'s wall time less the time of its block calls that
    ``other`` makes too (same block, same signature, matched in call order), and the share of
    ``run``'s wall time those matched calls took."""
    theirs: dict[tuple, int] = defaultdict(int)
    for frame in other.frames:
        theirs[(frame.block, frame.signature)] += 1
    seen: dict[tuple, int] = defaultdict(int)
    matched = 0.0
    for frame in run.frames:
        key = (frame.block, frame.signature)
        if seen[key] < theirs[key]:
            matched += frame.seconds
        seen[key] += 1
    return run.wall - matched, (matched / run.wall if run.wall > 0 else 0.0)


def residual_difference(first: RunSplit, second: RunSplit) -> float:
    """``first``'s residual less ``second``'s (each matched against the other): the difference of
    the two runs without the time of the block calls both make."""
    return residual(first, second)[0] - residual(second, first)[0]
