"""``zoo_prune``: ZOO-Prune (Y. Kim, Y. Zhang, H. Liu, A. Jung, S. Lee, S. Hong, "ZOO-Prune: Training-Free
Token Pruning via Zeroth-Order Gradient Estimation in Vision-Language Models", CVPR 2026, arXiv
2509.24837; official code ``AIM-SKKU/ZOO-Prune``).

A projector-site pruning method in two steps (paper §3, "Method"; the equation numbers of the arXiv
text could not be read here, so formulas are named after their step of §3, as the project's method
notes on ZOO-Prune (§1.2) give them):

1. **Zeroth-order sensitivity** (§3, the symmetric-difference estimator and Proposition 3.1). For each
   visual token ``x_i`` (the projector's input, ``d_v`` wide) and ``m`` random directions ``u_j ~ N(0, I)``
   normalised to unit L2 norm, *shared by every token* (the projector acts on each token alone)::

       delta_ij = (M(x_i + h u_j) - M(x_i - h u_j)) / (2 h)          (central difference)
       S(i)     = (1/m) sum_j || delta_ij ||_2                       (sensitivity)

   with ``M`` the projector; Proposition 3.1: ``S(x) = E_u ||J(x) u||_2 + O(h^2)``, ``J`` the projector's
   Jacobian. Paper defaults ``m = 64`` (``directions``), ``h = 0.01`` (``step``). Written out this is
   ``2 m`` projector passes over the visual tokens (about 3.1 TFLOPs for LLaVA-1.5-7B's 576 tokens).
   A two-layer projector (LLaVA's; Qwen-VL's mergers, a LayerNorm / RMSNorm first) is scored from its
   structure instead (:func:`zo_sensitivity_two_layer`: the same ``S`` to float32 rounding, 1.24
   TFLOPs there); :meth:`ZooPruneStrategy.scoring_cost` reports ``ScoringCost("projector_sensitivity",
   passes=m)`` and ``vtoken.accounting.projector_sensitivity_flops`` counts it, so FLOPs include the
   method's own work (for LLaVA-NeXT and OneVision over the packed tokens it scores: what unpadding,
   the resize and a video's pooling leave of the crops' patches).

2. **Sensitivity-aware diverse selection** (§3, "SADS" in the code). The sensitivity is min-max
   normalised per image, ``Ŝ(i) = (S(i) - min S) / (max S - min S + 1e-8)`` (all ones when it is
   flat, see below); the distance is the cosine distance of the *projected* tokens ``Z = M(X)`` (what
   the LLM receives; the official code's docstring says pre-projector features, but the call passes
   the projector output), ``d(i, j) = 1 - cos(Z_i, Z_j)``. Greedy max-min selection weighted
   multiplicatively by the sensitivity::

       first pick:  argmax_i Ŝ(i)                 (DivPrune's first pick differs: it has no Ŝ)
       then:        argmax_{i not in P} Ŝ(i) · min_{j in P} d(i, j)    until |P| = k

   The kept tokens keep their original order. There is no weighting hyper-parameter (the paper's
   LLaVA-NeXT ablation: the product beats the sum, 98.3% vs 98.1% retained at 640 tokens). Here a running min-distance vector makes it ``O(k N d)``
   per image with no ``N x N`` matrix at all (the official LLaVA-1.5 path built an ``N x N x d``
   tensor and re-gathered the selected rows every step).

Where the paper, the official code and this implementation differ (each choice is the default):

- **Precision.** The official LLaVA-1.5 path casts the perturbed inputs to fp16, where ``h u`` (about
  3e-4 per component) is close to one ulp and ``S`` partly measures rounding. Here the finite
  differences always run in float32: the projector's parameters are copied to float32 for the
  scoring passes (``torch.func.functional_call``; the model itself is untouched) and autocast is off.
- **Determinism.** The official code draws fresh directions on every call; here they come from the
  run's generator, seeded with ``seed`` at every forward, so the same input gives the same selection
  (and a cached ``generate`` equals recomputation).
- **Batches and image spans.** The official code handles batch size 1 and assumes the image starts
  at token 35; here each image is one row of the projector-site context, found from ``input_ids`` by
  the adapter, for any batch size and padding.
- **Memory.** The ``N · m`` perturbed copies go through the projector in chunks of at most
  ``chunk_size`` rows (both signs counted), so peak memory does not grow with ``N`` or ``m``. The chunk
  size changes ``S`` only by float32 rounding (a matrix product may round differently for another
  batch size; relative differences around 1e-5 after the division by ``2h``), not the method.
- **LLaVA-NeXT.** Each image (base view + high-resolution view + newlines) is one row: sensitivity is
  normalised and the greedy selection runs over the whole image with the image's budget. The official
  NeXT code instead splits the budget evenly over crops, selects per crop, and scores with a rank-128
  SVD copy of the projector (possibly built before the weights were loaded; notes §1.5); here the real
  projector is used. **Newline tokens** have no projector input (the context gives zeros), so they
  have no sensitivity: they are not candidates while image tokens remain, and fill the budget, in
  order, only when it exceeds the image's patch tokens (so ``keep=1.0`` keeps everything). The official
  code always keeps them on top of the budget; here the budget is exact, like every vtoken method.
  A token counts as a newline when its projector input is exactly zero.
- **Linear projectors.** When ``M`` is affine its Jacobian is constant and ``S`` is the same for every
  token: ZOO-Prune becomes DivPrune's max-min selection with the first pick at the first token. When
  the relative spread ``(max S - min S) / max S`` of an image is at most ``flat_rtol`` (default 1e-3;
  the float32 rounding spread of a linear 1024 -> 4096 projector at ``h = 0.01`` is about 7e-6 for
  inputs of unit scale and 7e-4 for inputs of scale 100, while a GELU MLP gives several percent),
  ``Ŝ`` is set to ones (the official code does so only when max == min exactly; min-max
  normalisation would otherwise stretch rounding noise into random weights) and a warning is issued
  once per wrapped model.
- **Positions.** ``positions="contiguous"`` by default: the official code rebuilds the sequence from
  the kept tokens (``position_ids`` stays ``None``), so RoPE positions are compacted.

Budget default: ``keep = 1/9`` (64 of LLaVA-1.5's 576 tokens; 320 of LLaVA-NeXT's 2880). The paper has
no single default: the official run script sweeps ``SUBSET_RATIO`` 0.1112 / 0.2223 / 0.3334 (64 / 128 /
192 tokens); the tightest is the setting the paper stresses (95.2% retained on LLaVA-1.5-7B).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vtoken.config import PruneConfig, StageSpec
from vtoken.context import ScoreContext
from vtoken.projector_parts import TwoLayerProjector, cached_two_layer_projector, projector_in
from vtoken.registry import register
from vtoken import signals
from vtoken.signals import Needs, Signal
from vtoken.schedule import ScoringCost, StageShapes
from vtoken.strategies.base import Strategy

#: Added to the min-max range (the official code's epsilon).
NORM_EPS = 1e-8
#: The dtypes the perturbed projector passes may run in (``precision``); ``"mixed"`` runs them in
#: float32 and only the second layer's product in the projector's own dtype.
PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "mixed": torch.float32}


@dataclass
class ZooPruneConfig(PruneConfig):
    """ZOO-Prune options.

    ``directions``: ``m``, the number of shared random unit directions (paper: 64).
    ``step``: ``h``, the finite-difference step along each direction (paper: 0.01).
    ``chunk_size``: the most perturbed token copies sent through the projector in one call (``+h`` and
    ``-h`` copies both count); bounds the memory of the scoring passes; changes ``S`` only by float32
    rounding. None (default): :func:`default_chunk_size` of the device the projector input is on, 1024
    on a CPU (a block's temporaries, 17 MB on LLaVA-1.5-7B's projector, are reused from the heap; at
    8192 each block's 134 MB are fresh pages) and 8192 on an accelerator (fewer, larger launches).
    ``flat_rtol``: an image whose sensitivity spread ``(max - min) / max`` is at most this is treated as
    flat (linear projector): ``Ŝ = 1`` for every token, with a warning.
    ``projector_rank``: score with a rank-``r`` SVD proxy of a two-layer projector's second matrix (the
    official LLaVA-NeXT code uses 128); None (default, the paper's LLaVA-1.5 setting): the exact
    projector. Either way a two-layer projector is scored from its structure
    (:func:`zo_sensitivity_two_layer`), equal to the generic passes up to float32 rounding.
    ``precision``: ``"mixed"`` (default), ``"float32"`` or ``"float16"``; the sensitivity is accumulated
    in float32 each way. ``"mixed"`` (two-layer projectors) forms the perturbed pre-activations, their
    activations and their difference in float32, where the central difference cancels, and multiplies
    that difference (scaled by ``1 / 2h`` first, so a half dtype holds it) by ``W2`` in the dtype the
    projector's own weights are in: bfloat16 or float16 matrix units in a model of that dtype, float32
    in a float32 model (there it is ``"float32"`` bit for bit); a projector of another shape runs the
    float32 passes. ``"float32"`` runs everything in float32 (the estimator's reference). ``"float16"``
    runs the per-pair passes in float16, as the official code runs the projector in the model's fp16.
    bfloat16 passes are refused: with 8 mantissa bits ``x + h u`` at ``h = 0.01`` mostly rounds back to
    ``x`` (tests/test_zoo_prune.py measures up to 150% error). ``python eval/bench_zoo_prune.py
    --weights bfloat16`` reports each precision's time and how far its kept set agrees with float32's
    (CPU only so far): on LLaVA-1.5-7B's projector in bfloat16 ``"mixed"`` keeps float32's 64 / 128 /
    192 tokens exactly (S within 3.5e-5) in 1.5 s per image against 4.7 s (two AMX cores), float16
    keeps 47-66% of them in 4.3 s; on Qwen2-VL-7B's merger 2.0 s against 5.9 s, again every token,
    float16 28-51% (each perturbed pre-activation formed in float32 and rounded to float16 on its own).
    Hence the default. The rank-128 proxy keeps 64-81% at 4-7x the speed of the exact structure.
    """

    method = "zoo_prune"
    default_keep = 1 / 9

    site: str = "projector"
    positions: str = "contiguous"
    directions: int = 64
    step: float = 0.01
    chunk_size: int | None = None
    flat_rtol: float = 1e-3
    projector_rank: int | None = None
    precision: str = "mixed"

    def __post_init__(self) -> None:
        if self.precision == "bfloat16":
            raise ValueError("precision='bfloat16' is refused: its 8-bit mantissa cannot hold x + h u at h = 0.01 "
                             "(measured: sensitivity off by up to 150%); use 'mixed' (float32 differences, W2 in "
                             "the model's bfloat16), 'float16' (the official code's) or 'float32'")
        if not isinstance(self.precision, str) or self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if isinstance(self.directions, bool) or not isinstance(self.directions, int) or not 1 <= self.directions <= 2**20:
            raise ValueError(f"directions (m) must be a positive integer up to 2**20, got {self.directions!r}; the paper uses 64")
        if isinstance(self.step, bool) or not isinstance(self.step, (int, float)) or not (
            math.isfinite(self.step) and self.step > 0
        ):
            raise ValueError(f"step (h) must be a positive finite number, got {self.step!r}; the paper uses 0.01")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 2
        ):
            raise ValueError(
                f"chunk_size must be None (chosen per device) or an integer >= 2 (one +h and one -h copy), "
                f"got {self.chunk_size!r}"
            )
        if self.projector_rank is not None and (
            isinstance(self.projector_rank, bool) or not isinstance(self.projector_rank, int) or self.projector_rank < 1
        ):
            raise ValueError(f"projector_rank must be a positive integer or None, got {self.projector_rank!r}; "
                             "the official LLaVA-NeXT code uses 128")
        if isinstance(self.flat_rtol, bool) or not isinstance(self.flat_rtol, (int, float)) or not (
            math.isfinite(self.flat_rtol) and self.flat_rtol >= 0
        ):
            raise ValueError(f"flat_rtol must be a finite number >= 0, got {self.flat_rtol!r}")
        self.flat_rtol = float(self.flat_rtol)  # (an integer past 64 bits would reach torch as one)
        super().__post_init__()


# --------------------------------------------------------------------------------------------------
# Tensor functions (model-free)

#: ``chunk_size=None``: perturbed copies per block on a CPU, and on an accelerator.
CPU_CHUNK_SIZE, ACCELERATOR_CHUNK_SIZE = 1024, 8192


def default_chunk_size(device: torch.device) -> int:
    """The block size ``chunk_size=None`` means on ``device``: on a CPU a block's score-sized temporaries
    should come back from the heap rather than as fresh pages each block (``python eval/bench_zoo_prune.py
    --chunk-size``); an accelerator's caching allocator has no such cost and prefers fewer launches."""
    return CPU_CHUNK_SIZE if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_SIZE


def random_directions(count: int, dim: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """``[count, dim]`` float32 directions ``u ~ N(0, I)`` normalised to unit L2 norm, drawn from
    ``generator`` (on the CPU, so the draw is the same on every device)."""
    u = torch.randn(count, dim, generator=generator, dtype=torch.float32, device="cpu")
    return F.normalize(u, dim=-1).to(device)


def float32_projector(projector: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``projector`` as a float32 function (:func:`projector_in` in float32)."""
    return projector_in(projector, torch.float32)


def zo_sensitivity(
    projector: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    directions: torch.Tensor,
    step: float,
    chunk_size: int = 8192,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ZOO-Prune's sensitivity ``S(i) = (1/m) sum_j ||M(x_i + h u_j) - M(x_i - h u_j)||_2 / (2h)`` (paper
    §3, central-difference estimator) of each of ``inputs`` (``[T, d_v]``) along the shared unit
    ``directions`` (``[m, d_v]``), in float32.

    The ``T · m`` (token, direction) pairs go through ``projector`` in order, ``chunk_size // 2`` pairs
    per call (their ``+h`` and ``-h`` copies together: at most ``chunk_size`` rows), so memory is
    bounded by ``chunk_size`` whatever ``T`` and ``m``. The perturbed copies are formed in ``dtype`` (the
    projector should compute in it too: :func:`projector_in`); norms are accumulated in float32.
    """
    x = inputs.float()
    u = directions.float().to(x.device)
    tokens, m = x.shape[0], u.shape[0]
    norms = torch.empty(tokens * m, dtype=torch.float32, device=x.device)
    pairs = max(1, chunk_size // 2)
    for start in range(0, tokens * m, pairs):
        index = torch.arange(start, min(start + pairs, tokens * m), device=x.device)
        offset = (step * u[index % m]).to(dtype)
        base = x[index // m].to(dtype)
        out = projector(torch.cat([base + offset, base - offset])).float()
        n = index.shape[0]
        norms[start : start + n] = torch.linalg.vector_norm(out[:n] - out[n:], dim=-1) / (2 * step)
    return norms.view(tokens, m).mean(dim=-1)


def zo_sensitivity_two_layer(
    parts: TwoLayerProjector, inputs: torch.Tensor, directions: torch.Tensor, step: float, chunk_size: int = 8192,
    dtype: torch.dtype = torch.float32, matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`zo_sensitivity` for a two-layer projector, computed from its structure: with
    ``a = W1 x + b1`` and ``v = W1 u``, ``M(x + h u) - M(x - h u) = W2 (σ(a + h v) - σ(a - h v))`` (``b2``
    cancels), so ``W1`` runs once per token and once per direction instead of twice per (token,
    direction) pair, and ``W2`` once per pair on the difference instead of twice: 2.5x fewer FLOPs on
    LLaVA-1.5's 1024 -> 4096 -> 4096 projector, and with a rank-``r`` ``out`` (``two_layer_projector(...,
    rank=r)``) ``hidden / r`` times fewer again in the second layer. Equal to the generic estimator up to
    float32 rounding (exact ``out``). With a half ``dtype`` the per-pair part (activation of the
    perturbed pre-activations, and ``W2`` on their difference) runs in it, as the official code's fp16
    projector passes do; ``a`` and ``v`` are formed in float32 and rounded once (a merger's
    pre-activations likewise).

    A projector with a norm first (``parts.norm``: Qwen-VL's mergers) is not linear before ``σ``; when
    the norm is a LayerNorm or RMSNorm (``parts.norm_form``) ``W1`` still runs once per token and
    direction (:func:`_normed_pre_activations`); any other norm has ``W1 N(x ± h u) + b1`` computed per
    pair, in float32.

    ``matmul_dtype`` (default: ``dtype``): the dtype of ``W2``'s product alone when it differs
    (``precision="mixed"``); the difference is then scaled by ``1 / 2h`` (the derivative's size) before
    it is rounded to it, so a float16 product neither underflows nor rounds ``h``'s scale away."""
    x = inputs.float()
    u = directions.float().to(x.device)
    tokens, m = x.shape[0], u.shape[0]
    matmul_dtype = dtype if matmul_dtype is None else matmul_dtype
    norms = torch.empty(tokens, m, dtype=torch.float32, device=x.device)
    pairs = max(1, chunk_size // 2)
    # Blocks of whole tokens by blocks of directions, at most ``pairs`` (token, direction) pairs each.
    direction_block = min(m, pairs)
    token_block = max(1, pairs // direction_block)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        out = parts.out.to(x.device, matmul_dtype)
        signs = torch.tensor([1.0, -1.0], device=x.device)
        if parts.norm is None:
            # Rounded to ``dtype`` before they are added, as the official fp16 passes see them.
            a = parts.first_layer(x).to(dtype)
            signed_v = ((step * (u @ parts.w1.to(x.device).T)).to(dtype)[:, None] * signs[:, None].to(dtype))
            pre_activations = lambda t, j: a[t, None, None] + signed_v[None, j]  # noqa: E731
        elif parts.norm_form is not None:
            pre_activations = _normed_pre_activations(parts, x, step * u)
        else:
            def pre_activations(t: slice, j: slice) -> torch.Tensor:
                copies = x[t, None, None] + (step * u)[None, j, None] * signs[:, None]  # [t, j, 2, d_v]
                return parts.first_layer(copies.flatten(0, 2)).view(*copies.shape[:3], -1)
        for t0 in range(0, tokens, token_block):
            for j0 in range(0, m, direction_block):
                t, j = slice(t0, t0 + token_block), slice(j0, j0 + direction_block)
                activated = parts.act(pre_activations(t, j).to(dtype))  # [t, j, ±, hidden]
                difference = activated[:, :, 0] - activated[:, :, 1]
                if matmul_dtype == dtype:
                    norms[t, j] = torch.linalg.vector_norm((difference @ out.T).float(), dim=-1) / (2 * step)
                else:  # the cancellation is done: its quotient, rounded once, meets W2 in matmul_dtype
                    quotient = (difference * (0.5 / step)).to(matmul_dtype)
                    norms[t, j] = torch.linalg.vector_norm((quotient @ out.T).float(), dim=-1)
    return norms.mean(dim=-1)


def _normed_pre_activations(
    parts: TwoLayerProjector, x: torch.Tensor, offsets: torch.Tensor
) -> Callable[[slice, slice], torch.Tensor]:
    """``W1 N(x_t ± h u_j) + b1`` (``[t, j, 2, hidden]``, + then -) for blocks of tokens ``t`` and directions ``j``, ``N`` a
    :class:`~vtoken.projector_parts.RowStandardisation` over each of the ``G`` groups (encoder tokens)
    of a merged row, without ``W1`` on any perturbed copy.

    Per group ``g``, ``N(x_g + h u_g) = γ ⊙ (x̄_g + h ū_g) / σ_g + β`` (bars: centred for a LayerNorm,
    as is for an RMSNorm) with one scalar ``σ_g = sqrt(|x̄_g + h ū_g|² / D + ε)``, and
    ``|x̄_g ± h ū_g|² = |x̄_g|² ± 2 x̄_g·h ū_g + |h ū_g|²``. With ``A_g = W1_g (γ ⊙ x̄_g)`` per token and
    ``B_g = W1_g (γ ⊙ h ū_g)`` per direction (``W1_g``: the columns of ``W1`` group ``g`` meets)::

        W1 N(x ± h u) + b1 = sum_g (A_g ± B_g) / σ_g±  +  (W1 β + b1)

    so each pair costs ``G`` scalars and two ``G``-term sums of hidden-wide rows instead of ``W1``
    twice. Equal to the per-copy computation up to float32 rounding."""
    form, width = parts.norm_form, parts.norm_width
    groups = x.shape[-1] // width
    folded, shift = (t.to(x.device) for t in parts.folded_first_layer)  # W1_g diag(γ) [G, D, hidden]; W1 β + b1
    xg, ug = x.view(-1, groups, width), offsets.view(-1, groups, width)
    if form.centred:
        xg, ug = xg - xg.mean(-1, keepdim=True), ug - ug.mean(-1, keepdim=True)
    # A_g per token, with W1 β + b1 as one more group of coefficient 1: [T, G + 1, hidden].
    a = torch.cat([torch.einsum("tgd,gdh->tgh", xg, folded), shift.expand(xg.shape[0], 1, -1)], dim=1)
    b = torch.einsum("jgd,gdh->jgh", ug, folded)  # B_g per direction: [m, G, hidden]
    xx, uu = xg.square().sum(-1), ug.square().sum(-1)  # [T, G], [m, G]
    signs = torch.tensor([1.0, -1.0], device=x.device)[:, None]

    def pre_activations(t: slice, j: slice) -> torch.Tensor:
        cross = 2 * torch.einsum("tgd,jgd->tjg", xg[t], ug[j])  # [t, j, G]
        squares = (xx[t, None] + uu[None, j])[:, :, None] + signs * cross[:, :, None]  # [t, j, ±, G]
        scale = torch.rsqrt(squares / width + form.eps)  # 1 / σ_g±
        ones = torch.ones(*scale.shape[:3], 1, device=x.device)
        on_tokens = torch.einsum("tjsg,tgh->tjsh", torch.cat([scale, ones], dim=-1), a[t])
        return on_tokens + torch.einsum("tjsg,jgh->tjsh", scale * signs, b[j])  # [t, j, ±, hidden]

    return pre_activations


def normalise_sensitivity(
    sensitivity: torch.Tensor, eligible: torch.Tensor, flat_rtol: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, min-max normalise ``sensitivity`` (``[R, N]``) over the ``eligible`` tokens:
    ``Ŝ = (S - min S) / (max S - min S + 1e-8)`` (paper §3, SADS). A row whose relative spread
    ``(max - min) / max`` is at most ``flat_rtol`` is flat (a linear projector): its ``Ŝ`` is 1.
    Returns ``Ŝ`` (zero at ineligible tokens) and the ``[R]`` flat flags (True also for rows with
    fewer than two eligible tokens, where there is nothing to compare)."""
    s = sensitivity.float()
    low = s.masked_fill(~eligible, float("inf")).amin(-1, keepdim=True)
    high = s.masked_fill(~eligible, float("-inf")).amax(-1, keepdim=True)
    spread = high - low
    flat = ~(spread > flat_rtol * high.abs()) | (eligible.sum(-1, keepdim=True) < 2)
    scaled = (s - low) / (spread + NORM_EPS)
    scaled = torch.where(flat, torch.ones_like(s), scaled)
    return scaled.masked_fill(~eligible, 0.0), flat[:, 0]


def weighted_maxmin_order(
    features: torch.Tensor,
    weight: torch.Tensor,
    eligible: torch.Tensor,
    valid: torch.Tensor,
    count: torch.Tensor,
) -> torch.Tensor:
    """Sensitivity-weighted greedy max-min selection (paper §3, SADS), per row.

    ``features`` ``[R, N, d]`` (the projected tokens), ``weight`` ``[R, N]`` (``Ŝ`` >= 0), ``eligible``
    ``[R, N]`` (tokens that may be picked on merit), ``valid`` ``[R, N]``, ``count`` ``[R]`` picks per row.
    The first pick is ``argmax Ŝ``; each next one ``argmax Ŝ(i) · min_{j in P} (1 - cos(z_i, z_j))``
    over unpicked tokens, kept in a running ``[R, N]`` min-distance vector (``O(k N d)``, no ``N x N``
    matrix). Valid tokens that are not eligible (newlines) rank below every eligible one and are
    picked, in order, only after all of those. Ties go to the lower index.

    Returns ``[R, N]`` float32 ranks as scores: ``-t`` for the ``t``-th pick (0-based), ``-(N + 1)`` for
    unpicked tokens, so a top-``count`` of the scores is exactly the selection.
    """
    rows, n = valid.shape
    z = F.normalize(features.float(), dim=-1)
    w = weight.float()
    scores = torch.full((rows, n), -float(n + 1), dtype=torch.float32, device=valid.device)
    picked = torch.zeros(rows, n, dtype=torch.bool, device=valid.device)
    arange = torch.arange(rows, device=valid.device)
    steps = int(count.max()) if rows else 0
    nearest = None  # min over picked j of d(i, j)
    for t in range(steps):
        merit = w if nearest is None else w * nearest
        s = torch.where(eligible, merit, torch.full_like(merit, -1.0))
        s = s.masked_fill(~valid | picked, float("-inf"))
        j = s.argmax(dim=-1)
        live = count > t
        picked[arange[live], j[live]] = True
        scores[arange[live], j[live]] = -float(t)
        distance = (1.0 - torch.einsum("rnd,rd->rn", z, z[arange, j])).clamp(min=0.0)
        nearest = distance if nearest is None else torch.minimum(nearest, distance)
    return scores


# --------------------------------------------------------------------------------------------------


@register
class ZooPruneStrategy(Strategy):
    name = "zoo_prune"
    Config = ZooPruneConfig
    sites = ("projector",)
    reads = (signals.PROJECTOR_INPUT,)

    def needs(self) -> Needs:
        # A rank-r proxy needs the projector's second matrix (LLaVA's projector, Qwen-VL's mergers):
        # refused at wrap on a projector of another shape.
        structure = [Signal(signals.TWO_LAYER_PROJECTOR)] if self.config.projector_rank is not None else []
        return Needs.of(Signal(signals.PROJECTOR_INPUT), *structure)

    def __init__(self, config: ZooPruneConfig):
        super().__init__(config)
        self._warned_flat = False

    def scoring_cost(self, stage: StageSpec, shapes: StageShapes | None = None) -> list[ScoringCost]:
        # m directions: from a two-layer projector's structure, or 2m full passes (the FLOPs model
        # knows which each family's projector gets; ScoringCost "projector_sensitivity"). An image
        # whose budget keeps every token is not scored (score() skips it).
        if shapes is not None and shapes.kept >= shapes.tokens:
            return []
        return [ScoringCost("projector_sensitivity", passes=self.config.directions, rows=self.config.projector_rank or 0)]

    def sensitivity(self, ctx: ScoreContext, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[R, N]`` float32 sensitivity ``S`` of the eligible tokens (those with projector input) of
        ``rows`` (``[R]`` bool, default all), and the ``[R, N]`` eligibility mask."""
        config = self.config
        projector = ctx.require("projector", self.name)
        inputs = ctx.require("projector_input", self.name)
        valid = ctx.tokens.valid
        eligible = valid & (inputs != 0).any(dim=-1).to(valid.device)
        wanted = eligible if rows is None else eligible & rows[:, None]
        sensitivity = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        if bool(wanted.any()):
            u = random_directions(config.directions, inputs.shape[-1], ctx.generator, inputs.device)
            chosen = inputs[wanted.to(inputs.device)]
            parts = cached_two_layer_projector(projector, config.projector_rank)
            dtype = PRECISIONS[config.precision]
            chunk = config.chunk_size if config.chunk_size is not None else default_chunk_size(chosen.device)
            if parts is not None:
                matmul_dtype = parts.weight_dtype if config.precision == "mixed" else dtype
                values = zo_sensitivity_two_layer(parts, chosen, u, float(config.step), chunk, dtype,
                                                  matmul_dtype)
            else:
                if config.projector_rank is not None:
                    raise ValueError(
                        "zoo_prune: projector_rank needs a two-layer (Linear, activation, Linear; a row norm first at most) projector; this "
                        "model's is not one: drop projector_rank"
                    )
                values = zo_sensitivity(projector_in(projector, dtype), chosen, u, float(config.step),
                                        chunk, dtype)
            sensitivity[wanted] = values.to(sensitivity.device)
        return sensitivity, eligible

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        rows = ctx.tokens
        valid, budget = rows.valid, rows.budget.to(rows.valid.device)
        choose = budget < valid.sum(-1)  # rows that keep everything need no scoring
        if not bool(choose.any()):
            ctx.report(sensitivity=torch.zeros(valid.shape, dtype=torch.float32, device=valid.device))
            return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        sensitivity, eligible = self.sensitivity(ctx, choose)
        ctx.report(sensitivity=sensitivity)  # [R, N] S, zeros where not computed; vtoken.diagnostics
        weight, flat = normalise_sensitivity(sensitivity, eligible, self.config.flat_rtol)
        informative = choose & (eligible.sum(-1) >= 2)
        if bool((flat & informative).any()) and not self._warned_flat:
            self._warned_flat = True
            warnings.warn(
                "zoo_prune: the projector's sensitivity is the same for every token of an image (relative "
                f"spread <= flat_rtol={self.config.flat_rtol}); the projector is linear (or linear on these "
                "inputs), so ZOO-Prune reduces to DivPrune's max-min diversity selection starting at the "
                "first token. Use a method that suits a linear projector, or raise flat_rtol only if the "
                "projector is known to be non-linear.",
                stacklevel=2,
            )
        count = torch.where(choose, budget, torch.zeros_like(budget))
        scores = weighted_maxmin_order(rows.features, weight, eligible, valid, count)
        # Rows that keep everything: any order, all of them are kept.
        return torch.where(choose[:, None], scores, torch.zeros_like(scores))
