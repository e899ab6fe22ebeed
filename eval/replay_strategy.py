"""A bench-only strategy that replays a method's recorded decisions with no scoring (the in-LLM
oracle of ``eval/bench_speed.py``, issue "Speed that holds up").

``record(model, method, inputs, **options)`` wraps ``model`` with ``method``, runs one forward and
keeps every stage's :class:`~vtoken.context.Reduction` (vision stages included, which a
``PruneRun`` does not keep) by stage name, and the logits. ``replaying(model, recording)`` then wraps
the model with ``_replay``: the SAME stages (the method's bound ``StageSpec`` objects, so ToMe's and
Representation Shift's own stage classes and depth-resolved layers come along), the same placement
(ToMe's inside-block stages with proportional attention, AIF's mask stage, the position mode), and
a ``reduce`` that hands back the recorded reduction of the stage. It reads no signal (``needs()`` is
empty): no eager attention, no attention rows recomputed beside SDPA, no observers on any layer, no
projector perturbations, no probe decoding step; a mask stage (AIF's) is then decided at its layer's
input and the prefill runs masked from there, one pass with no probe and no rerun of the text
(``vtoken.adapters.mask_stage``). What is left is the schedule itself, run by
vtoken's machinery: the fastest any implementation of that schedule can be inside vtoken.

Merges. A reduction that merges (``merged_into``) carries the merged vectors. When they are the
size-weighted means of their members (ToMe, pool: checked on the recorded call), the replay computes
them again from the live features and sizes, so the averaging stays in the replayed cost; otherwise
(VisionZip's target-plus-mean, and reductions with ``features`` but no ``merged_into``:
Representation Shift's merge mode, VFlowOpt's recycled tokens, whose weights are the method's scores)
the recorded vectors are handed back as they are (``Recording.verbatim`` names those stages): the
replay is then exact only on the recorded inputs, which is how the bench uses it.

The name starts with ``_``: the registry's convention for internal strategies (``vtoken bench`` and
the generic test suites skip it); it is registered when this module is imported.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

import vtoken
from vtoken.config import PruneConfig, StageSpec
from vtoken.context import Reduction, ScoreContext
from vtoken.registry import register
from vtoken.schedule import SITES
from vtoken.signals import Needs
from vtoken.strategies.base import InsideBlock, MaskStage, Strategy

NAME = "_replay"


@dataclass
class Recording:
    """One recorded call of a method: its bound strategy (stages, placement), each stage's reduction
    by stage name, the stages whose merged vectors are replayed as recorded (``verbatim``), the
    call's logits and ``vtoken.selection``."""

    method: str
    source: Strategy
    reductions: dict[str, Reduction]
    recompute: set[str] = field(default_factory=set)
    verbatim: set[str] = field(default_factory=set)
    logits: torch.Tensor | None = None
    selection: list[dict[str, torch.Tensor]] | None = None


@dataclass
class ReplayConfig(PruneConfig):
    method = NAME
    #: The recording to replay (a :class:`Recording`); not a JSON value: this config is never saved.
    recording: Any = None


@register
class ReplayStrategy(Strategy):
    """Replays a :class:`Recording`: the recorded method's stages, placement and reductions, no scoring."""

    name = NAME
    Config = ReplayConfig
    sites = SITES
    reads = ()

    def __init__(self, config: ReplayConfig):
        if not isinstance(config.recording, Recording):
            raise ValueError("_replay needs recording=<a Recording from replay_strategy.record>")
        super().__init__(config)
        self.recording: Recording = config.recording
        self.source: Strategy = config.recording.source

    def stages(self) -> tuple[StageSpec, ...]:
        return self.source.stages()

    def mask_stage(self) -> MaskStage | None:
        return self.source.mask_stage()

    def inside_block(self) -> InsideBlock | None:
        return self.source.inside_block()

    def needs(self) -> Needs:
        return Needs()

    def reduce(self, ctx: ScoreContext) -> Reduction:
        name = ctx.stage.name
        try:
            recorded = self.recording.reductions[name]
        except KeyError:
            raise RuntimeError(f"no recorded reduction for stage {name!r} of {self.recording.method}") from None
        if name in self.recording.recompute:
            return Reduction(recorded.keep, size_weighted_merge(ctx, recorded), recorded.merged_into)
        return recorded


def size_weighted_merge(ctx: ScoreContext, reduction: Reduction) -> torch.Tensor:
    """``[R, K, d]``: for each kept column of ``reduction``, the mean of the candidates it holds
    (``merged_into``), weighted by their sizes (``TokenRows.sizes``; 1 where none): ToMe's merge
    (``sum(s x) / sum(s)``, float32) and pool's window mean."""
    rows = ctx.tokens
    features = rows.features
    into = reduction.merged_into.to(features.device).long()
    sizes = rows.sizes.to(features.device).float() if rows.sizes is not None else rows.valid.float()
    merged, _ = held_means(features, sizes, into, reduction.keep.shape[1])
    return merged.to(features.dtype) * (reduction.keep >= 0)[..., None].to(features.dtype)


def held_means(features: torch.Tensor, sizes: torch.Tensor, into: torch.Tensor, columns: int):
    """``([R, columns, d], [R, columns])`` float32: for each column, the mean of the ``features``
    ``[R, N, d]`` that ``into`` ``[R, N]`` puts there (-1: nowhere), weighted by ``sizes`` ``[R, N]``,
    and the summed sizes (ToMe's ``merge_wavg``: ``sum(s x) / sum(s)``, and ``merge(s, sum)``)."""
    count, _, dim = features.shape
    held = into >= 0
    weight = torch.where(held, sizes.float(), torch.zeros_like(sizes, dtype=torch.float32))
    target = torch.where(held, into, columns)  # a spare column collects what nothing holds
    total = features.new_zeros(count, columns + 1, dim, dtype=torch.float32)
    total.scatter_add_(1, target[..., None].expand(-1, -1, dim), features.float() * weight[..., None])
    mass = weight.new_zeros(count, columns + 1).scatter_add_(1, target, weight)
    return total[:, :columns] / mass[:, :columns].clamp(min=1e-12)[..., None], mass[:, :columns]


def record(model, method: str, inputs: dict, atol: float = 1e-5, **options) -> Recording:
    """Run ``method`` on ``inputs`` once and record every stage's reduction (see the module docstring).
    A merge whose vectors the size-weighted mean reproduces within ``atol`` is replayed by recomputing
    it; any other stage that replaces features is replayed verbatim."""
    reductions: dict[str, Reduction] = {}
    recompute: set[str] = set()
    verbatim: set[str] = set()
    with vtoken.pruned(model, method, **options):
        strategy = vtoken.strategy_of(model)
        decide = strategy.reduce

        def recording_reduce(ctx: ScoreContext) -> Reduction:
            reduction = decide(ctx)
            name = ctx.stage.name
            if name in reductions:
                raise RuntimeError(f"{method}: stage {name!r} was decided twice in one call; a replay cannot "
                                   "tell the two apart")
            reductions[name] = reduction
            if reduction.features is not None:
                same = reduction.merged_into is not None and torch.allclose(
                    size_weighted_merge(ctx, reduction).float(), reduction.features.float(), atol=atol, rtol=0)
                (recompute if same else verbatim).add(name)
            return reduction

        strategy.reduce = recording_reduce  # this instance only; unwrap drops the instance
        try:
            with torch.no_grad():
                logits = model(**inputs).logits
            selection = vtoken.selection(model)
        finally:
            del strategy.reduce
    return Recording(method, strategy, reductions, recompute, verbatim, logits, selection)


@contextmanager
def replaying(model, recording: Recording) -> Iterator[Any]:
    """``model`` wrapped with the replay of ``recording`` for the block (the recorded method's
    position mode, seed and text-only behaviour)."""
    source = recording.source.config
    config = ReplayConfig(positions=source.positions, text_only=source.text_only, seed=source.seed,
                          recording=recording)
    vtoken.wrap(model, config=config)
    try:
        yield model
    finally:
        vtoken.unwrap(model)


def replay_logits(model, recording: Recording, inputs: dict) -> torch.Tensor:
    with replaying(model, recording), torch.no_grad():
        return model(**inputs).logits


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of two logits tensors (inf when their shapes differ)."""
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
