"""The base class every strategy derives from.

A strategy is model-free tensor code (as in ToMe and kvpress): it gets a :class:`ScoreContext` and
returns one score per candidate token (``score``), or overrides ``reduce`` to merge tokens. The base
turns scores into a per-row top-k under each row's budget, so a new method usually writes ``score``
only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vtoken.config import PruneConfig, StageSpec
from vtoken.context import Reduction, ScoreContext
from vtoken.reduction_checks import check_scores
from vtoken.kernels import masked_topk
from vtoken.schedule import SITES, ScoringCost, StageShapes
from vtoken.signals import Needs


@dataclass(frozen=True)
class MaskStage:
    """A stage that hides visual tokens from the text instead of removing them (``Strategy.mask_stage``).

    ``stage``: where (an ``"llm"`` layer) and the default budget. ``evict``: drop the hidden tokens'
    keys and values from the KV cache of layers ``>= stage.layer`` once the prefill is done (only
    text queries come later and they may not attend to them, so outputs are unchanged while decoding
    reads and stores fewer tokens). ``adaptive_budget``: the strategy chooses how many tokens each
    row keeps (AIF's adaptive ratio); the budget is then only a default, and each row keeps at least
    one token."""

    stage: StageSpec
    evict: bool = False
    adaptive_budget: bool = False


@dataclass(frozen=True)
class InsideBlock:
    """The strategy's vision stages run inside their block, between its attention and its MLP
    (ToMe's placement, Bolya et al. ICLR 2023 §3): the block's MLP already runs on the reduced tokens,
    ``TokenRows.features`` are the hidden states after the attention's residual add and
    ``ScoreContext.keys`` that attention's keys. ``proportional_attention``: every vision block from
    the first stage on adds ``log(size)`` of each key to its attention logits (ToMe Eq. 1), as an
    additive float mask the model's SDPA or eager attention takes."""

    proportional_attention: bool = True


class Strategy:
    #: Registry name (``vtoken.wrap(model, name)``).
    name: ClassVar[str] = ""
    #: The config dataclass of this method.
    Config: ClassVar[type[PruneConfig]] = PruneConfig
    #: Sites the method can prune at.
    sites: ClassVar[tuple[str, ...]] = SITES
    #: True for methods that need trained weights (TokenPacker).
    trained: ClassVar[bool] = False
    #: The names of the signals (:mod:`vtoken.signals`) this method may read, for listings before it
    #: is bound to a model (``vtoken.methods()``); ``needs()`` gives the layers once bound.
    reads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PruneConfig):
        self.config = config
        #: Layer counts of the wrapped model (``{"vision": n, "llm": n}``), set by ``bind``.
        self.depths: dict[str, int] = {}
        for stage in config.resolved_stages():
            if stage.site not in self.sites:
                raise ValueError(
                    f"method {self.name!r} cannot prune at the {stage.site!r} site; "
                    f"it supports: {', '.join(self.sites)}"
                )

    def bind(self, depths: dict[str, int]) -> None:
        """Called by ``wrap`` before validation with the model's layer counts, so a method whose
        defaults are relative to depth (TransPrune's layers for a 32-layer LLM) can resolve them."""
        self.depths = dict(depths)

    def stages(self) -> tuple[StageSpec, ...]:
        """The stages to run on the bound model; the config's by default."""
        return self.config.resolved_stages()

    def needs(self) -> Needs:
        """Every signal this method reads (:mod:`vtoken.signals`), by name and layer, on the bound
        model: the layers whose inputs and outputs ``observe`` sees (``vision_observed``,
        ``llm_observed``), the LLM layers and query rows whose attention ``observe_attention`` sees
        (``llm_attention_observed``), the vision layers whose attention ``ctx.vision_attention``
        offers, and the rest by name. The family provides them; ``wrap`` refuses what it cannot.
        Nothing by default."""
        return Needs()

    def observe(
        self, site: str, layer: int, io: dict[str, tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor
    ) -> torch.Tensor:
        """Summarise one layer per token: ``io`` maps ``"attention"``, ``"mlp"`` and ``"block"`` to the
        (input, output) of that sub-module (``[B, L, d]``; at the vision site ``[crops, T, d]``), and
        ``valid`` (``[B, L]``) marks the real tokens (padding is False). Return ``[B, L]`` or
        ``[B, L, k]``; it is handed back, aligned with the candidate rows, by ``ctx.observed(layer)``.
        For Llama-style layers the attention input is the RMS-normed hidden state the attention sees
        and its output the branch before the residual add; likewise for the MLP."""
        raise NotImplementedError(f"{type(self).__name__} lists observed layers but does not implement observe()")

    def observe_attention(
        self, layer: int, probs: torch.Tensor, query_valid: torch.Tensor, key_valid: torch.Tensor
    ) -> torch.Tensor:
        """Summarise the attention of LLM ``layer`` per key token (the layers and query rows of the
        ``llm_attention_observed`` signals in ``needs()``: ``"last"``, each sample's last token;
        ``"instruction"``, the valid text tokens after its last image; ``"next"``, the token the
        model would generate next, in one probe decoding step after the prefill, only for strategies
        with a ``mask_stage``). ``probs`` (``[B, H, Q, L]``,
        float32) are the softmax probabilities of the Q query rows over the L prompt slots, computed
        beside the model's attention from the layer's queries and keys (never an L x L map; eager
        attention gives the same numbers); rows absent for a sample (``query_valid [B, Q]`` False)
        and keys a row may not attend (``key_valid [B, L]`` False: padding, later tokens) are zero.
        For ``"next"`` the probe token's own key is left out of the L slots. Return ``[B, L]`` or
        ``[B, L, k]``; ``ctx.observed_attention(layer)`` hands it back aligned with the candidate
        rows."""
        raise NotImplementedError(
            f"{type(self).__name__} lists attention layers but does not implement observe_attention()"
        )

    def mask_stage(self) -> MaskStage | None:
        """A stage that hides visual tokens from the text instead of removing them (attention
        modulation, as AIF). Every token stays in the sequence with its position, and from decoder
        layer ``stage.layer`` on no text token (prompt or generated) attends to the tokens it does
        not keep, while visual tokens still attend to every visual token. A strategy that observes
        LLM layers at or after ``stage.layer`` (or the next token's attention) has it decided after
        the whole prefill, whose affected text rows are then recomputed from the prefix's KV cache;
        one that does not has it decided at that layer's input, and the prefill runs masked from
        there in one pass (``vtoken.adapters.mask_stage``). The strategy decides it through ``score``/``reduce``
        like an ``"llm"`` stage (with ``ctx.observed_attention``); it is not one of ``stages()``, so
        the pruning schedule shows no stage for it. ``vtoken.selection`` reports the tokens text may
        attend to. :class:`MaskStage` also says how it behaves. None (no such stage) by default."""
        return None

    def inside_block(self) -> InsideBlock | None:
        """Run the vision stages inside their block (see :class:`InsideBlock`); None (the default):
        a vision stage acts on its block's output."""
        return None

    def scoring_cost(self, stage: StageSpec, shapes: StageShapes | None = None) -> list[ScoringCost]:
        """Extra work this method does to decide ``stage`` (for honest FLOPs); none by default.
        ``shapes`` (when known) gives the stage's sizes per image, for costs that depend on them."""
        return []

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """``[R, N]`` importance of each candidate token; higher is kept first."""
        raise NotImplementedError(f"{type(self).__name__} must implement score() or reduce()")

    def reduce(self, ctx: ScoreContext) -> Reduction:
        scores = self.score(ctx)
        check_scores(self.name, scores, ctx.tokens)
        return Reduction(keep=masked_topk(scores, ctx.tokens.valid, ctx.tokens.budget))
