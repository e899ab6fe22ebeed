"""``fastv``: FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

At LLM layer K, rank the visual tokens by the attention they receive and drop the lowest-ranked
(paper §4.2: K=2, R=50%). The paper defines the score as the average attention a token receives from
all tokens; the official implementation (and this one) uses the attention from the last token only,
taken from layer K-1's attention map and averaged over heads. The paper's all-token criterion is not
offered: it needs every query row (the column sums of the attention map). "The last token" is each
sample's last valid token, so a right-padded batch never scores a pad token. Kept tokens keep their
original position ids (the official code sets ``position_ids = keep_indexs``).

Decoding: the official in-place code keeps no KV cache (its evaluation calls ``generate`` with
``use_cache=False``), so it re-ranks with each newly generated token as "the last token". vtoken
prunes once, at the prefill, as the repository's KV-cache variant (``fastv_forward``) does; with
``use_cache=False`` every step replays the prefill's choice, so cached and uncached decoding agree.

Unlike the official code this never needs ``attn_implementation="eager"``: the one attention row is
recomputed beside SDPA/FlashAttention from layer K-1's input (see ``vtoken.kernels.attention_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtoken.config import PruneConfig, StageSpec
from vtoken.context import ScoreContext
from vtoken.registry import register
from vtoken import signals
from vtoken.signals import Needs, Signal
from vtoken.schedule import ScoringCost, StageShapes
from vtoken.strategies.base import Strategy


@dataclass
class FastVConfig(PruneConfig):
    """FastV options. ``layer`` is K (tokens are dropped before decoder layer K runs).

    ``score_layer``: ``"previous"`` takes the attention of layer K-1 (official code), ``"current"`` that
    of layer K computed on its input (PyramidDrop's variant).
    """

    method = "fastv"
    default_keep = 0.5

    site: str = "llm"
    layer: int | None = 2
    score_layer: str = "previous"

    def __post_init__(self) -> None:
        if self.score_layer not in ("previous", "current"):
            raise ValueError(f"score_layer must be 'previous' or 'current', got {self.score_layer!r}")
        for stage in self.resolved_stages():
            if stage.site == "llm" and stage.layer == 0 and self.score_layer == "previous":
                raise ValueError("fastv at layer 0 has no previous layer to score with; use layer >= 1")
        super().__post_init__()


@register
class FastVStrategy(Strategy):
    name = "fastv"
    Config = FastVConfig
    sites = ("llm",)
    reads = (signals.LLM_ATTENTION,)

    def needs(self) -> Needs:
        return Needs.of(Signal(signals.LLM_ATTENTION))

    def scoring_cost(self, stage: StageSpec, shapes: StageShapes | None = None) -> list[ScoringCost]:
        # One query row (the last token) against every key of the scoring layer; layer K-1 has run,
        # so its keys are read from the KV cache.
        previous = self.config.score_layer == "previous"
        layer = stage.layer - 1 if previous else stage.layer
        # "current": layer K itself is handed the kept rows' keys the scoring projected (adapters/key_reuse.py).
        return [ScoringCost("llm_attention_rows", layer=layer, rows=1, keys_cached=previous, keys_reused=not previous)]

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        attention = ctx.require_attention(self.name)
        probs = attention(query="last", layer=self.config.score_layer)  # [R, H, 1, N]
        return probs.mean(dim=1)[:, 0]
