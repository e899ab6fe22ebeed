"""``transprune``: TransPrune (Li, Duan et al., "TransPrune: Token Transition Pruning for Efficient
Large Vision-Language Model", CVPR 2026; arXiv 2507.20630; official code ``liaolea/TransPrune``).

Progressive pruning of visual tokens inside the LLM. Before each pruning layer every visual token of
an image gets a score made of two parts:

- **Token Transition Variation (TTV)**, Eqs. 1-4. For a sub-module F of a decoder layer (the
  self-attention, the FFN) with input ``T_in`` (the RMS-normed hidden state the sub-module sees) and
  output ``T_out = F(T_in)`` (its branch output, before the residual add), the magnitude change is
  ``m = ||T_out|| / ||T_in||`` and the direction change ``d = cos(T_out, T_in)``;
  ``TTV(F) = softmax_tokens(1 - d) * m`` per token (Eqs. 1-2), the layer's ``TTV_l = TTV(Attn) +
  TTV(FFN)`` (Eq. 3), accumulated over the accumulation layers up to the pruning layer,
  ``TTV_p = sum_{l in A, l <= p} TTV_l`` (Eq. 4). A token whose sub-modules leave it unchanged
  (zero branch output) has TTV 0; one turned by 90 degrees has direction term 1.
- **Instruction-Guided Attention (IGA)**, Eq. 5: the attention the instruction tokens (every text
  token after the image: the question and the chat template's tail, as the official code takes
  them) pay to each visual token, from the queries and keys of the first layer after the pruning
  point, averaged over heads and over instruction tokens.
- **Score**, Eq. 6: ``alpha * TTV + (1 - alpha) * IGA`` with ``alpha = 0.5``; as in the official code
  each term is first L1-normalised over the image's current visual tokens (eps 1e-8). The highest
  scores are kept; nothing is merged.

Where paper and official code differ (the default is the code's, which produced the published
numbers: the released scripts reproduce TransPrune-High's 1.56 TFLOPs exactly):

- ``direction="signed"`` uses ``1 - cos`` (official ``compute_transf_weight``); ``"abs"`` uses the
  paper's ``1 - |cos|`` (the code keeps it commented out; its ablation is in the supplement).
- The code's softmax runs over every element of its ``[B, L]`` tensor, i.e. over the whole batch
  (the code only runs batch 1). Here it is always taken per sample over that sample's valid tokens
  (system prompt, image and text, as the code at batch 1): samples of a batch never mix.
- Kept tokens are renumbered contiguously (``positions="contiguous"``), as the code does.
- Each stage keeps ``int(n * ratio)`` tokens (``rounding="floor"``), as the code does; vtoken's other
  methods round to the nearest. One token apart where ``n * ratio`` is not whole (LLaVA-NeXT).

Layers (0-based ``model.layers[i]``; a stage at layer K prunes *before* layer K runs, i.e. after the
paper's 1-based layer K). The released LLaVA-1.5-7B / LLaVA-NeXT-7B setting (TransPrune-High) prunes
after 1-based layers 7, 9, 12 to 0.875, 0.625, 0.125 of the original tokens (576 -> 504 -> 360 ->
72) and accumulates TTV over 1-based layers 7-12: stages at K = 7, 9, 12 and accumulation layers
6..11 here. Other depths scale those layers by ``depth / 32`` (:func:`paper_prune_layers`); the
accumulation span is always the layer before the first pruning point to the layer before the last.

Budgets: ``keep`` / ``keep_tokens`` set the final stage's budget; earlier stages keep their default
fraction or the final budget, whichever is larger (``keep=1.0`` keeps everything; with
``keep_tokens`` per image, :class:`AtLeastStage`), so no earlier stage cuts below what the last
one keeps.

Scores never need eager attention: TTV comes from forward hooks on the attention and MLP modules
(``observe``), IGA from ``ctx.attention(query="instruction", layer="current")``, computed beside
SDPA/FlashAttention from the layer's input. ``ttv_only=True`` (the paper's attention-free variant,
Table 7) computes no attention rows at all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from vtoken.config import PruneConfig, StageSpec, check_budget_options
from vtoken.kernels import token_shift, token_shifts
from vtoken.context import ScoreContext
from vtoken.registry import register
from vtoken import signals
from vtoken.signals import Needs, Signal
from vtoken.schedule import ScoringCost, StageShapes, instruction_rows
from vtoken.strategies.base import Strategy

#: The model the paper's layers are given for (LLaVA-1.5-7B / LLaVA-NeXT-7B: 32 decoder layers).
PAPER_DEPTH = 32
#: Pruning layers of the released scripts, as "before decoder layer K" (= after 1-based layer K).
PAPER_PRUNE_LAYERS = (7, 9, 12)
#: TransPrune-High keep fractions, relative to the original visual-token count.
PAPER_KEEP_RATIOS = (0.875, 0.625, 0.125)
DIRECTIONS = ("signed", "abs")


# --- the formulas ---------------------------------------------------------------------------------
_EPS = 1e-8


def magnitude_change(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Eq. 1: ``m = ||T_out|| / ||T_in||`` per token (float32; a zero input counts as a tiny norm)."""
    return token_shift(x_out, x_in, "norm_ratio")  # one pass (a Triton kernel on CUDA)


def direction_change(x_in: torch.Tensor, x_out: torch.Tensor, direction: str = "signed") -> torch.Tensor:
    """Eq. 2's direction term per token: ``1 - cos(T_out, T_in)`` (``"signed"``, official code: 0 for
    the same direction, 1 at 90 degrees, 2 when reversed) or ``1 - |cos|`` (``"abs"``, the paper: 0
    for the same or the reversed direction, 1 at 90 degrees). A zero vector has cosine 0."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return token_shift(x_out, x_in, "cos" if direction == "signed" else "abs_cos")


def transition_variation(
    x_in: torch.Tensor, x_out: torch.Tensor, valid: torch.Tensor, direction: str = "signed"
) -> torch.Tensor:
    """TTV of one sub-module per token, Eqs. 1-2: ``softmax(1 - d) * m`` (``[B, L]``, float32).

    ``x_in``/``x_out`` are the sub-module's input and output ``[B, L, d]``. The softmax runs over
    each sample's valid tokens (``valid`` ``[B, L]``), never across samples; invalid tokens get 0.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    valid = valid.to(torch.bool)
    # magnitude_change and direction_change in one pass over both tensors (they share ||T_out|| and
    # ||T_in||): the same numbers, bit for bit.
    magnitude, turn = token_shifts(x_out, x_in, ("norm_ratio", "cos" if direction == "signed" else "abs_cos"))
    if bool(valid.all()):  # no padding: the masked softmax and the zeroing change nothing
        return torch.softmax(turn, dim=-1).mul_(magnitude)
    weights = torch.softmax(turn.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.where(valid, weights * magnitude, torch.zeros_like(magnitude))


def layer_transition_variation(
    io: dict[str, tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor, direction: str = "signed"
) -> torch.Tensor:
    """``TTV_l = TTV(Attn) + TTV(FFN)`` of one decoder layer, Eq. 3 (``[B, L]``)."""
    return sum(transition_variation(*io[part], valid, direction) for part in ("attention", "mlp"))


def instruction_guided_attention(probs: torch.Tensor) -> torch.Tensor:
    """IGA, Eq. 5: ``[R, H, Q, N]`` attention probabilities of the instruction rows to the candidate
    tokens, averaged over heads and over the instruction rows present (rows that are all zero, past
    a sample's instruction count, are left out of the mean). Returns ``[R, N]``."""
    per_row = probs.float().mean(dim=1)  # [R, Q, N]
    present = per_row.amax(dim=-1) > 0  # [R, Q]
    count = present.sum(dim=-1).clamp_min(1)
    return per_row.sum(dim=1) / count[:, None]


def l1_normalise(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x / (sum x + 1e-8)`` over each row's valid entries (official code); invalid entries 0."""
    x = torch.where(valid, x.float(), torch.zeros((), dtype=torch.float32, device=x.device))
    return x / (x.sum(dim=-1, keepdim=True) + _EPS)


def combined_score(
    ttv: torch.Tensor | None, iga: torch.Tensor | None, valid: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """Eq. 6: ``alpha * TTV + (1 - alpha) * IGA`` of the L1-normalised terms (``[R, N]``); a term
    given as ``None`` is not used (TTV only, or IGA only)."""
    if ttv is None and iga is None:
        raise ValueError("combined_score needs TTV, IGA or both")
    if iga is None:
        return l1_normalise(ttv, valid)
    if ttv is None:
        return l1_normalise(iga, valid)
    return alpha * l1_normalise(ttv, valid) + (1.0 - alpha) * l1_normalise(iga, valid)


# --- the schedule ---------------------------------------------------------------------------------
def _round(x: float) -> int:
    return math.floor(x + 0.5)


def paper_prune_layers(depth: int) -> tuple[int, ...]:
    """The paper's pruning layers (7, 9, 12 of 32) scaled to an LLM of ``depth`` layers: each
    rounded from ``K * depth / 32``, then made strictly increasing within ``[1, depth - 1]`` (layer 0
    has no TTV before it). An LLM of fewer than 4 layers gets the last ``depth - 1`` stages."""
    if depth < 2:
        raise ValueError(
            f"transprune needs an LLM of at least 2 decoder layers (it prunes after accumulating TTV in "
            f"an earlier layer); this one has {depth}"
        )
    count = min(len(PAPER_PRUNE_LAYERS), depth - 1)
    wanted = PAPER_PRUNE_LAYERS[len(PAPER_PRUNE_LAYERS) - count :]
    layers = [max(1, _round(k * depth / PAPER_DEPTH)) for k in wanted]
    for i in range(1, count):
        layers[i] = max(layers[i], layers[i - 1] + 1)
    for i in reversed(range(count)):
        layers[i] = min(layers[i], depth - count + i)
    return tuple(layers)


def _is_layer_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


@dataclass(frozen=True)
class AtLeastStage(StageSpec):
    """An earlier stage of the progressive schedule under a count budget (``keep_tokens``): its
    default fraction of an image's tokens, but never fewer than ``at_least`` (the final stage's
    count, capped at the image's tokens), as ``keep`` takes ``max(ratio, keep)``."""

    at_least: int = 1

    def budget(self, visual_tokens: int) -> int:
        return min(visual_tokens, max(super().budget(visual_tokens), self.at_least))

    def fraction(self, visual_tokens: int) -> float:
        return self.budget(visual_tokens) / visual_tokens


@dataclass
class TransPruneConfig(PruneConfig):
    """TransPrune options (see the module docstring for the formulas and defaults).

    Attributes:
        prune_layers: LLM layers K to prune before (ascending); ``None``: the paper's 7, 9, 12 for a
            32-layer LLM, scaled to the model's depth when wrapped.
        keep_ratios: fraction of each image's original visual tokens kept at each pruning layer
            (non-increasing); ``None``: TransPrune-High's 0.875, 0.625, 0.125 (the last ones when
            there are fewer layers). ``keep``/``keep_tokens`` replace the last one.
        accumulate_layers: layers whose TTV is accumulated (a stage at K sums those < K); ``None``:
            from the layer before the first pruning layer to the layer before the last (6..11 for
            the paper's LLaVA-1.5-7B).
        alpha: weight of TTV against IGA in the score (Eq. 6); 0.5 in the paper. 1.0 is TTV only,
            0.0 IGA only (the paper's ablations).
        ttv_only: the attention-free variant (Table 7): score by TTV alone, compute no attention.
        direction: ``"signed"`` (``1 - cos``, official code, default) or ``"abs"`` (``1 - |cos|``,
            the paper's equation).
        rounding: how a stage's fraction becomes a count: ``"floor"`` (``int(n * ratio)``, as the
            official code, default) or ``"round"`` (vtoken's other methods). They differ by one token
            where ``n * ratio`` is not whole (LLaVA-NeXT's varying counts, custom fractions).
        layer: a single pruning stage at this layer instead of the progressive schedule.
    """

    method = "transprune"
    default_keep = 0.125

    site: str = "llm"
    positions: str = "contiguous"
    prune_layers: list[int] | None = None
    keep_ratios: list[float] | None = None
    accumulate_layers: list[int] | None = None
    alpha: float = 0.5
    ttv_only: bool = False
    direction: str = "signed"
    rounding: str = "floor"

    def __post_init__(self) -> None:
        # Depth of the model this config was last bound to (``TransPruneStrategy.bind``); not a
        # field, so never saved: the default schedule is re-derived from the model it wraps.
        object.__setattr__(self, "_depth", None)
        check_budget_options(self.keep, self.keep_tokens)
        if self.site != "llm":
            raise ValueError(f"transprune prunes inside the LLM only; use site='llm' (the default), not {self.site!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(
                f"direction must be 'signed' (1 - cos, official code) or 'abs' (1 - |cos|, paper), got {self.direction!r}"
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1] (0.5 in the paper), got {self.alpha!r}")
        if not isinstance(self.ttv_only, bool):
            raise ValueError(f"ttv_only must be True or False, got {self.ttv_only!r}")
        if self.ttv_only and self.alpha == 0.0:
            raise ValueError("ttv_only=True scores by TTV alone but alpha=0 asks for IGA alone; drop one of them")
        for name in ("prune_layers", "accumulate_layers"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_layer_list(value) or not value:
                raise ValueError(f"{name} must be a non-empty list of layer indices, got {value!r}")
            if any(v < 0 for v in value) or list(value) != sorted(set(value)):
                raise ValueError(f"{name} must be distinct layer indices >= 0 in ascending order, got {list(value)}")
        if self.keep_ratios is not None:
            ratios = self.keep_ratios
            if not isinstance(ratios, (list, tuple)) or not ratios or any(
                isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0 for r in ratios
            ):
                raise ValueError(f"keep_ratios must be a non-empty list of fractions in (0, 1], got {ratios!r}")
            if any(b > a for a, b in zip(ratios, ratios[1:])):
                raise ValueError(f"keep_ratios must not increase from one stage to the next, got {list(ratios)}")
            if self.prune_layers is not None and len(ratios) != len(self.prune_layers):
                raise ValueError(
                    f"give one keep ratio per pruning layer: {len(self.prune_layers)} prune_layers but "
                    f"{len(ratios)} keep_ratios"
                )
        if self.prune_layers is not None and self.keep_ratios is None and len(self.prune_layers) > len(PAPER_KEEP_RATIOS):
            raise ValueError(
                f"{len(self.prune_layers)} prune_layers need keep_ratios= (one fraction per layer); the "
                f"paper's defaults cover at most {len(PAPER_KEEP_RATIOS)}"
            )
        custom = [n for n in ("prune_layers", "keep_ratios") if getattr(self, n) is not None]
        if self.layer is not None:
            custom.append("layer")
        if self.stages and custom:
            raise ValueError(f"give either stages= or {', '.join(custom)}, not both")
        if self.layer is not None and len(custom) > 1:
            raise ValueError(f"layer= is a single pruning stage; it cannot be combined with {', '.join(custom[:-1])}")
        super().__post_init__()  # validates resolved_stages() for the paper's depth

    # --- schedule -------------------------------------------------------------------------------
    @property
    def uses_ttv(self) -> bool:
        return self.ttv_only or self.alpha > 0.0

    @property
    def uses_iga(self) -> bool:
        return not self.ttv_only and self.alpha < 1.0

    def resolved_stages(self, depth: int | None = None) -> tuple[StageSpec, ...]:
        """The stages for an LLM of ``depth`` layers (default: the depth it was last bound to, else
        the paper's 32)."""
        known = depth or getattr(self, "_depth", None)
        depth = known or PAPER_DEPTH
        if self.stages or self.layer is not None:
            stages = super().resolved_stages()
            if any(s.site != "llm" for s in stages):
                raise ValueError("transprune prunes inside the LLM only: every stage needs site='llm'")
        else:
            stages = self._progressive(depth)
        stages = tuple(dataclasses.replace(s, rounding=self.rounding) for s in stages)
        self._check_accumulation(stages, depth, depth_known=known is not None)
        return stages

    def _progressive(self, depth: int) -> tuple[StageSpec, ...]:
        layers = tuple(self.prune_layers) if self.prune_layers is not None else paper_prune_layers(depth)
        if self.keep_ratios is not None:
            ratios = list(self.keep_ratios)
            if len(ratios) != len(layers):
                # (checked before the model's depth is known too: the count, not the layers, is what is wrong)
                raise ValueError(
                    f"the default schedule prunes at {len(layers)} layers (the paper's {list(PAPER_PRUNE_LAYERS)} of "
                    f"{PAPER_DEPTH}, scaled to the model's depth), but {len(ratios)} keep_ratios were given; give "
                    f"prune_layers= as well, one per ratio"
                )
        else:
            ratios = list(PAPER_KEEP_RATIOS[len(PAPER_KEEP_RATIOS) - len(layers) :])
        if self.keep is not None:
            ratios = [max(r, self.keep) for r in ratios[:-1]] + [self.keep]
        stages: list[StageSpec] = []
        for i, (layer, ratio) in enumerate(zip(layers, ratios)):
            if i == len(layers) - 1 and self.keep_tokens is not None:
                stages.append(StageSpec("llm", layer, keep_tokens=self.keep_tokens))
            elif stages and stages[-1].keep == ratio:  # a stage keeping what is left does nothing
                continue
            elif self.keep_tokens is not None:
                stages.append(AtLeastStage("llm", layer, keep=ratio, at_least=self.keep_tokens))
            else:
                stages.append(StageSpec("llm", layer, keep=ratio))
        return tuple(stages)

    def accumulation(self, stages: tuple[StageSpec, ...]) -> tuple[int, ...]:
        """TTV accumulation layers for ``stages`` (Eq. 4's set A)."""
        if not self.uses_ttv:
            return ()
        if self.accumulate_layers is not None:
            return tuple(self.accumulate_layers)
        layers = [s.layer for s in stages]
        return tuple(range(max(0, layers[0] - 1), layers[-1]))

    def _check_accumulation(self, stages: tuple[StageSpec, ...], depth: int, depth_known: bool = True) -> None:
        # The pruning layers first: the default accumulation span ends before the last of them, so a
        # layer past the LLM would otherwise be reported as accumulate_layers the user never gave.
        # Before a model is known (the config alone) there is no depth to hold them to, and the default
        # schedule is a placeholder for the paper's depth: wrap checks them on the model.
        if not depth_known and self.prune_layers is None and not self.stages and self.layer is None:
            return
        beyond = [s.layer for s in stages if s.layer >= depth] if depth_known else []
        if beyond:
            if self.prune_layers is not None:
                option = f"prune_layers={list(self.prune_layers)}"
            elif self.layer is not None:
                option = f"layer={self.layer}"
            else:
                option = "stages"
            raise ValueError(
                f"transprune {option}: layer {beyond[0]} does not exist, the LLM has {depth} decoder layers "
                f"(0..{depth - 1}); prune at layers 1..{depth - 1}"
            )
        accumulate = self.accumulation(stages)
        if depth_known and any(layer >= depth for layer in accumulate):
            raise ValueError(
                f"accumulate_layers {list(accumulate)} go beyond the LLM's {depth} layers (0..{depth - 1})"
            )
        for stage in stages:
            if self.uses_ttv and not any(layer < stage.layer for layer in accumulate):
                raise ValueError(
                    f"the stage at LLM layer {stage.layer} has no TTV accumulation layer before it "
                    f"(accumulating {list(accumulate)}); prune at a layer >= 1 after an accumulation layer, "
                    f"or set alpha=0 for IGA alone"
                )


@register
class TransPruneStrategy(Strategy):
    name = "transprune"
    Config = TransPruneConfig
    sites = ("llm",)

    def __init__(self, config: TransPruneConfig):
        super().__init__(config)
        self._stages = config.resolved_stages()
        self._accumulate = config.accumulation(self._stages)

    def bind(self, depths: dict[str, int]) -> None:
        super().bind(depths)
        depth = depths.get("llm")
        if depth is None:
            return
        stages = self.config.resolved_stages(depth)  # validates against this depth before any hook
        # Remember the depth on the config too, so config_of(model).resolved_stages() describes what
        # this model runs (the generic tests replay it).
        object.__setattr__(self.config, "_depth", depth)
        self._stages = stages
        self._accumulate = self.config.accumulation(stages)

    def stages(self) -> tuple[StageSpec, ...]:
        return self._stages

    @property
    def accumulate_layers(self) -> tuple[int, ...]:
        return self._accumulate

    reads = (signals.LLM_OBSERVED, signals.LLM_ATTENTION)

    def needs(self) -> Needs:
        observed = [Signal(signals.LLM_OBSERVED, layer) for layer in self._accumulate]
        attention = [Signal(signals.LLM_ATTENTION)] if self.config.uses_iga else []
        return Needs.of(*observed, *attention)

    def observe(self, site, layer, io, valid) -> torch.Tensor:
        return layer_transition_variation(io, valid, self.config.direction)

    def scoring_cost(self, stage: StageSpec, shapes: StageShapes | None = None) -> list[ScoringCost]:
        # IGA: the instruction rows against every key of layer K (recomputed beside SDPA); the keys
        # of the tokens the stage keeps are handed to layer K itself (keys_reused). TTV's norms and
        # cosines are element-wise work on tensors the layers produce anyway (O(L d) per layer, under
        # 1e-4 of a layer's matmuls) and are not counted, like the layers' own norms.
        # Its rows are the instruction's (every text token after the image), input-dependent.
        if not self.config.uses_iga:
            return []
        return [ScoringCost("llm_attention_rows", layer=stage.layer, rows=instruction_rows(shapes), keys_reused=True)]

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        valid = ctx.tokens.valid
        ttv = iga = None
        if self.config.uses_ttv:
            observed = ctx.require("observed", self.name)
            layers = [layer for layer in self._accumulate if layer < ctx.stage.layer]
            if not layers:
                raise ValueError(f"transprune has no TTV accumulation layer before LLM layer {ctx.stage.layer}")
            ttv = sum(observed(layer)[..., 0].float() for layer in layers)
        if self.config.uses_iga:
            attention = ctx.require_attention(self.name)
            iga = instruction_guided_attention(attention(query="instruction", layer="current"))
        alpha = 1.0 if self.config.ttv_only else self.config.alpha
        return combined_score(ttv, iga, valid, alpha)
