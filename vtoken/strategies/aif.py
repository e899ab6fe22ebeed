"""``aif``: Adaptive Information Flow (Liu, Choi, Zhang, Oh, "Aligning What Vision-Language Models
See and Perceive with Adaptive Information Flow", CVPR 2026; arXiv 2604.15809; no official code).

AIF is an attention *modulation*, not a pruning method: text tokens may no longer attend to the
visual tokens judged irrelevant, while every token stays in the sequence (visual tokens still
attend to each other) and positions are untouched. It aims at accuracy, not cost. The paper's text
was not available; the equations below follow the reconstruction in the project's notes
(``shared/papers/transprune_vflowopt_aif.md`` §3, from the abstract, project page and third-party
notes quoting Eqs. 2-5); every unclear choice is an option.

Token dynamics, from a probe (the prefill):

- Eq. 2, ``d^l_i = max_j a^l_{j,i}``: at every LLM layer l, the largest attention a text query j
  pays to visual token i (:func:`token_dynamics`). Query rows (``query``): ``"instruction"``
  (default: every text token after the sample's last image, i.e. the question and the chat
  template's tail: the reading most consistent with the paper's "text-to-image attention") or
  ``"next"`` (the first generated token, attending in one greedy probe decoding step: the "one-step
  language decoding" of the project page). Heads (``heads``, unspecified in the sources): ``"max"``
  (default, as the RLX re-implementation) or ``"mean"``.
- Eq. 3, ``mu_i = (1/L) sum_l d^l_i`` (:func:`dynamics_mean`).
- Eq. 4, ``Ent_i = -sum_l p_l log p_l`` with ``p_l = d^l_i / (L mu_i)`` (:func:`dynamics_entropy`):
  a token active in few layers has low entropy and is important; one attended evenly across layers
  has the largest entropy, ``log L``. A token no text attends to at all (``mu = 0``) gets ``log L``.
- Eq. 5, the adaptive ratio (:func:`adaptive_mask_ratio`): with ``S_0`` the entropy of
  ``q_i = mu_i / sum mu`` over an image's visual tokens and ``S(r)`` the same over the tokens left
  after masking the ``floor(r N)`` highest-entropy ones, ``r* = argmax_r |S(r) - S_0|`` over
  ``ratios`` (default 0.1 .. 0.9; the first r wins a tie). An image no text attends to is not masked.

The tokens kept visible to the text are the lowest-entropy ones. How many (``ratio``):
``"auto"`` (default) keeps the configured budget when ``keep``/``keep_tokens`` is given (so the
benchmark, which always gives one, compares methods at equal counts) and ``N - floor(r* N)`` by
Eq. 5 when none is; ``"adaptive"`` always uses Eq. 5 (a budget is then an error); ``"budget"``
always keeps the budget (``default_keep`` when none is given).

Modes (``mode``): ``"modulate"`` (the paper's): the KV cache keeps every token, and from LLM layer
``layer`` on (default 0: all layers, the sources' presumed scope) no text token, of the prompt or
generated, attends to a masked visual token. ``"evict"``: the same attention, and the masked
tokens' keys and values are then dropped from the KV cache of those layers, since only text comes
later; outputs are the same, decoding reads and stores fewer tokens (per sample counts may differ;
positions are unchanged).

Faithful to the paper's probe-then-masked-pass at less cost (notes §3.4 item 6): the prefill runs
unchanged as the probe (statistics gathered beside SDPA from every layer's query rows and keys, no
eager attention, no L x L map); then only the slots from the first text token after a masked token
on are recomputed over the probe's KV cache with the modulated mask (visual rows before them are
unchanged by construction). This is the same as a full masked forward pass, tested against the
unwrapped eager model given the explicit 4-D additive mask.

Cost: the probe adds the attention rows of every layer (reported by ``scoring_cost``) and the
recomputation of the text rows after the image (plus one decoding step for ``query="next"``).
``vtoken.selection`` reports, per image, the tokens text may still attend to (stage ``"llm:<layer>"``).
The pruning schedule (``vtoken.schedule_of``) has no stage: every token runs through every layer at
prefill, so the FLOPs reported are the unpruned model's; "evict" saves only decoding reads and the
KV-cache bytes of the masked tokens, which the schedule carries as ``cache_evicted`` (``kv_cache_bytes``
and the decode FLOPs follow it; with an adaptive budget it holds the configured one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtoken.config import PruneConfig, StageSpec
from vtoken.context import Reduction, ScoreContext
from vtoken.kernels import masked_topk
from vtoken.registry import register
from vtoken import signals
from vtoken.signals import Needs, Signal
from vtoken.schedule import ScoringCost, StageShapes, instruction_rows
from vtoken.strategies.base import MaskStage, Strategy

#: Candidate mask ratios of Eq. 5.
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def token_dynamics(probs: torch.Tensor, query_valid: torch.Tensor, heads: str = "max") -> torch.Tensor:
    """Eq. 2 at one layer: ``[B, L]`` the largest attention any valid query row pays to each key.

    ``probs`` is ``[B, H, Q, L]``, ``query_valid`` ``[B, Q]``; heads are reduced first by ``heads``
    (``"max"`` or ``"mean"``), then the rows by their maximum."""
    per_head = probs.amax(dim=1) if heads == "max" else probs.mean(dim=1)  # [B, Q, L]
    per_head = per_head.masked_fill(~query_valid[..., None].to(torch.bool), 0.0)
    return per_head.amax(dim=1)


def dynamics_mean(dynamics: torch.Tensor) -> torch.Tensor:
    """Eq. 3: the mean over layers (last dimension) of a token's dynamics ``[..., L]``."""
    return dynamics.mean(dim=-1)


def dynamics_entropy(dynamics: torch.Tensor) -> torch.Tensor:
    """Eq. 4: the entropy over layers of ``p_l = d^l / sum_l d^l`` (``0 log 0 = 0``) for dynamics
    ``[..., L]``; ``log L`` where a token is never attended (``sum = 0``)."""
    dynamics = dynamics.float()
    total = dynamics.sum(dim=-1, keepdim=True)
    p = dynamics / total.clamp(min=torch.finfo(torch.float32).tiny)
    entropy = -(p * torch.log(p.clamp(min=torch.finfo(torch.float32).tiny))).sum(dim=-1)
    return torch.where(total[..., 0] > 0, entropy, math.log(dynamics.shape[-1]))


def distribution_entropy(mass: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[R]``: the entropy of ``q_i = mass_i / sum mass`` over the valid entries of each row
    (``mass`` ``[R, N]``, non-negative): S_0 and S(r) of Eq. 5."""
    mass = mass.float() * valid
    q = mass / mass.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return -(q * torch.log(q.clamp(min=torch.finfo(torch.float32).tiny))).sum(dim=-1)


def adaptive_mask_ratio(
    mean: torch.Tensor, entropy: torch.Tensor, valid: torch.Tensor, ratios=RATIOS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 per row: ``(r*, masked count)``, each ``[R]``.

    For each ratio r the ``floor(r N)`` highest-entropy valid tokens are masked and ``S(r)`` is the
    entropy of the remaining tokens' means; ``r* = argmax_r |S(r) - S_0|`` (first on ties). A row
    whose means are all zero (no text attends to it) gets ratio 0 and masks nothing."""
    rows, width = valid.shape
    counts = valid.sum(dim=-1)
    s0 = distribution_entropy(mean, valid)
    # Rank of each token by entropy, highest first (ties: lower index first), invalid last.
    ranked = entropy.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(width, device=valid.device).expand(rows, -1))
    gaps, masked_counts = [], []
    for r in ratios:
        masked = torch.floor(torch.as_tensor(r, dtype=torch.float64) * counts.double()).long()
        remaining = valid & (rank >= masked[:, None])
        gaps.append((distribution_entropy(mean, remaining) - s0).abs())
        masked_counts.append(masked)
    gaps_t, counts_t = torch.stack(gaps, dim=-1), torch.stack(masked_counts, dim=-1)  # [R, len(ratios)]
    best = gaps_t.argmax(dim=-1)  # the first maximum
    ratio = torch.as_tensor(ratios, dtype=torch.float32, device=valid.device)[best]
    count = torch.gather(counts_t, 1, best[:, None])[:, 0]
    attended = (mean.float() * valid).sum(dim=-1) > 0
    return torch.where(attended, ratio, 0.0), torch.where(attended, count, 0)


@dataclass
class AIFConfig(PruneConfig):
    """AIF options (see the module docstring for the equations).

    ``layer``: the first LLM layer whose text queries no longer see the masked tokens (0: all).
    ``mode``: ``"modulate"`` (paper) or ``"evict"`` (same outputs, masked tokens leave the KV cache).
    ``ratio``: ``"auto"`` (the budget when one is given, else Eq. 5), ``"adaptive"`` (Eq. 5) or
    ``"budget"``. ``ratios``: Eq. 5's candidates. ``query``: ``"instruction"`` or ``"next"``.
    ``heads``: ``"max"`` or ``"mean"``. ``default_keep`` only serves ``ratio="budget"`` without a
    budget.
    """

    method = "aif"
    default_keep = 0.5

    site: str = "llm"
    layer: int | None = 0
    mode: str = "modulate"
    ratio: str = "auto"
    ratios: tuple = RATIOS
    query: str = "instruction"
    heads: str = "max"

    def __post_init__(self) -> None:
        if self.mode not in ("modulate", "evict"):
            raise ValueError(f"mode must be 'modulate' (the paper's attention mask) or 'evict', got {self.mode!r}")
        if self.ratio not in ("auto", "adaptive", "budget"):
            raise ValueError(f"ratio must be 'auto', 'adaptive' or 'budget', got {self.ratio!r}")
        if self.ratio == "adaptive" and (self.keep is not None or self.keep_tokens is not None):
            raise ValueError(
                "ratio='adaptive' chooses each image's count by Eq. 5; remove keep/keep_tokens, or use "
                "ratio='budget' (or 'auto') to keep a fixed budget"
            )
        try:
            self.ratios = tuple(float(r) for r in self.ratios)
        except (TypeError, ValueError):
            raise ValueError(f"ratios must be a list of fractions in (0, 1), got {self.ratios!r}") from None
        if not self.ratios or not all(0.0 < r < 1.0 for r in self.ratios):
            raise ValueError(f"ratios must be a non-empty list of fractions in (0, 1), got {list(self.ratios)}")
        if self.query not in ("instruction", "next"):
            raise ValueError(
                f"query must be 'instruction' (text after the image) or 'next' (first generated token), got {self.query!r}"
            )
        if self.heads not in ("max", "mean"):
            raise ValueError(f"heads must be 'max' or 'mean', got {self.heads!r}")
        if self.stages:
            raise ValueError("aif has a single mask stage; give site='llm', layer and keep/keep_tokens instead of stages")
        if self.positions != "original":
            raise ValueError("aif keeps every token's position; use positions='original'")
        super().__post_init__()
        if self.site != "llm":
            raise ValueError(f"aif masks attention inside the LLM: use site='llm' (with layer), not {self.site!r}")

    @property
    def adaptive(self) -> bool:
        """True when Eq. 5 sets each image's count."""
        no_budget = self.keep is None and self.keep_tokens is None
        return self.ratio == "adaptive" or (self.ratio == "auto" and no_budget)


@register
class AIFStrategy(Strategy):
    name = "aif"
    Config = AIFConfig
    sites = ("llm",)

    def __init__(self, config: AIFConfig):
        super().__init__(config)

    def bind(self, depths: dict[str, int]) -> None:
        super().bind(depths)
        layers = depths.get("llm")
        if layers is not None and not 0 <= self.config.layer < layers:
            raise ValueError(f"aif layer {self.config.layer} does not exist: the LLM has {layers} layers (0..{layers - 1})")

    def stages(self) -> tuple[StageSpec, ...]:
        return ()  # nothing is removed at prefill; the mask stage below is run by the adapter

    def mask_stage(self) -> MaskStage:
        config = self.config
        return MaskStage(config.resolved_stages()[0], evict=config.mode == "evict", adaptive_budget=config.adaptive)

    reads = (signals.LLM_ATTENTION_OBSERVED,)

    def needs(self) -> Needs:
        layers = range(self.depths.get("llm", 0))
        return Needs.of(*(Signal(signals.LLM_ATTENTION_OBSERVED, layer, self.config.query) for layer in layers))

    def observe_attention(self, layer, probs, query_valid, key_valid) -> torch.Tensor:
        return token_dynamics(probs, query_valid, self.config.heads)

    def scoring_cost(self, stage: StageSpec, shapes: StageShapes | None = None) -> list[ScoringCost]:
        # The probe's rows at every layer, and the text after the image rerun over the cached prefix
        # (one more decoding step for query="next").
        # (The instruction, every text token after the image, is input-dependent.)
        layers = self.depths.get("llm", 0)
        instruction = instruction_rows(shapes)
        next_token = self.config.query == "next"
        rows = 1 if next_token else instruction
        # Each probed layer has run: its keys are read from the KV cache (the mask stage adds one), the
        # instruction's query rows from its own projection (the next token's are projected again).
        # The probe's step attends to the prompt and to its own key, which its layers cache first.
        costs = [ScoringCost("llm_attention_rows", layer=layer, rows=rows, keys_cached=True,
                             queries_cached=not next_token, own_keys=int(next_token)) for layer in range(layers)]
        # (From the first text token after the first image: with several images, the later ones too.
        # A budget that keeps every token masks none, and nothing is rerun.)
        if shapes is None or shapes.kept < shapes.tokens:
            costs.append(ScoringCost("llm_rerun_rows", layer=0, rows=instruction, later_images=True))
        if next_token:
            # The probe's step: the greedy token from the prompt's last logits (an LM head row of its
            # own: the model's logits come from the masked pass), then one decoding step.
            costs.append(ScoringCost("lm_head_rows", rows=1))
            costs.append(ScoringCost("llm_rerun_rows", layer=0, rows=1, own_keys=1))
        return costs

    def reduce(self, ctx: ScoreContext) -> Reduction:
        observed = ctx.require("observed_attention", self.name)
        layers = self.depths.get("llm")
        if not layers:
            raise ValueError("aif needs the LLM depth; wrap the model with vtoken.wrap")
        dynamics = torch.cat([observed(layer) for layer in range(layers)], dim=-1)  # [R, N, L]
        valid = ctx.tokens.valid
        mean = dynamics_mean(dynamics)
        entropy = dynamics_entropy(dynamics)
        if self.config.adaptive:
            ratio, masked = adaptive_mask_ratio(mean, entropy, valid, self.config.ratios)
            budget = valid.sum(dim=-1) - masked
        else:
            budget = ctx.tokens.budget
            ratio = 1.0 - budget.float() / valid.sum(dim=-1).clamp(min=1)
        keep = masked_topk(-entropy, valid, budget)
        # The decision's statistics per image row, for vtoken.diagnostics: dynamics [R, N, L], mean,
        # entropy and valid [R, N], ratio and kept [R].
        ctx.report(dynamics=dynamics, mean=mean, entropy=entropy, valid=valid, ratio=ratio, kept=budget)
        return Reduction(keep=keep)
