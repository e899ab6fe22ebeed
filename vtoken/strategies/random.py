"""``random``: keep a uniformly random subset of each image's visual tokens (seeded).

The floor every method must beat at the same budget. Each image's draws are seeded from the config's
``seed``, the image's own pixels and the stage (``ScoreContext.uniform``), so the same image gets the
same subset at every forward, alone or in any batch, and two different images get independent ones.
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
        return ctx.uniform()
