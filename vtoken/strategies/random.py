"""``random``: keep a uniformly random subset of each image's visual tokens (seeded).

The floor every method must beat at the same budget. Draws come from a generator seeded with the
config's ``seed`` at each forward, so the same input gives the same selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtoken.config import PruneConfig
from vtoken.context import ScoreContext
from vtoken.registry import register
from vtoken.strategies.base import Strategy


@dataclass
class RandomConfig(PruneConfig):
    method = "random"


@register
class RandomStrategy(Strategy):
    name = "random"
    Config = RandomConfig

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        valid = ctx.tokens.valid
        return torch.rand(valid.shape, generator=ctx.generator, device="cpu").to(valid.device)
