"""``oracle``: keep the patches of the objects the question is about, filled up to the budget with
random patches.

A reference row that no published benchmark has, because only a generator knows which patches hold
the answer (``vtoken.vqa``). It bounds what selection can achieve at a budget on a given model. It
is not a real method: the caller hands each call its annotations, ``with vtoken.annotate(model,
relevant=[...])``: one list of image-local token indices per image (in batch order); ``vtoken bench``
does this from the records' boxes. When an image has more relevant tokens than the budget, a seeded random subset is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtoken.config import PruneConfig
from vtoken.context import ScoreContext
from vtoken.registry import register
from vtoken.schedule import is_integer
from vtoken import signals
from vtoken.signals import Needs, Signal
from vtoken.strategies.base import Strategy


@dataclass
class OracleConfig(PruneConfig):
    method = "oracle"


@register
class OracleStrategy(Strategy):
    name = "oracle"
    Config = OracleConfig
    #: Per-image annotations (``relevant``) that only a generated benchmark has.
    reads = (signals.ANNOTATIONS,)

    def needs(self) -> Needs:
        return Needs.of(Signal(signals.ANNOTATIONS, query="relevant"))

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        relevant = ctx.annotations.get("relevant")
        if relevant is None:
            raise ValueError(
                "the oracle needs the relevant patches of each image: call the model inside "
                "`with vtoken.annotate(model, relevant=[[...], ...]):` (one list of token indices per image)"
            )
        rows = ctx.tokens
        if not isinstance(relevant, (list, tuple)) or not all(
            isinstance(wanted, (list, tuple)) and all(is_integer(i) for i in wanted) for wanted in relevant
        ):
            raise ValueError(f"oracle: relevant must be one list of token indices (integers) per image, got {relevant!r:.80}")
        if len(relevant) != rows.num_rows:
            raise ValueError(f"oracle got relevant patches for {len(relevant)} images, the batch has {rows.num_rows}")
        first = ctx.stage == self.stages()[0]  # (later stages see only what earlier ones kept)
        for r, wanted in enumerate(relevant):
            if any(i < 0 for i in wanted):
                raise ValueError(f"oracle: relevant token {min(wanted)} of image {r} is negative; give image-local "
                                 "indices (0 for the image's first visual token)")
            local = rows.local_index[r][rows.valid[r]] if rows.local_index is not None else None
            count = int(local.max()) + 1 if first and local is not None and local.numel() else None
            if count is not None and wanted and max(wanted) >= count:
                # (it matched nothing: the image was filled at random, as with no annotation)
                raise ValueError(f"oracle: relevant token {max(wanted)} of image {r} is past its {count} visual "
                                 f"tokens; give image-local indices 0..{count - 1}")
        # Random in [0, 1) for every token, +1 for relevant ones: relevant first, random fill after.
        scores = ctx.uniform()  # seeded per image: an image's fill never depends on its batch
        for r, wanted in enumerate(relevant):
            if wanted:
                hit = torch.isin(rows.local_index[r], torch.tensor(wanted, device=rows.local_index.device))
                scores[r] += hit.float()
        return scores
