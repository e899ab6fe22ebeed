"""``tome``: Token Merging (D. Bolya, C.-Y. Fu, X. Dai, P. Zhang, C. Feichtenhofer, J. Hoffman,
"Token Merging: Your ViT But Faster", ICLR 2023, arXiv 2210.09461).

Faithful to the official code, facebookresearch/ToMe at commit
``af95e4b1befa172dadccd8c81e223b10090f9579`` (the newest): ``tome/merge.py``
(``bipartite_soft_matching``, ``merge_wavg``, ``merge_source``), ``tome/utils.py`` (``parse_r``) and
``tome/patch/timm.py`` (``ToMeBlock``, ``ToMeAttention``, ``apply_patch``).

What ToMe does, in every block ``l`` of the vision transformer (paper §3, ``ToMeBlock.forward``):

- **Where.** Between the block's attention (with its residual add) and its MLP, so the MLP already
  runs on the merged tokens (``x = x + attn(norm1(x)); merge; x = x + mlp(norm2(x))``). Here:
  :meth:`ToMeStrategy.inside_block` asks the pipeline for exactly that placement.
- **Metric.** The block's attention keys averaged over heads, ``k.mean(1)`` (``ToMeAttention``),
  cosine-normalised: ``m = k / ||k||`` (the pipeline hands ``ctx.keys`` before normalisation).
- **Bipartite soft matching** (``bipartite_soft_matching``). The ``t`` tokens of the sequence, in the
  order the previous merges left them, split alternately into ``A = x[0::2]`` and ``B = x[1::2]``;
  ``S = m_A m_B^T``; the class token (position 0, in A) gets ``S[0, :] = -inf`` and is never merged.
  Each A token's best edge is ``max_j S[i, j]``; the ``r`` A tokens with the highest best edge
  (``argsort(descending=True)``) merge into their B partner; the others stay.
  ``r = min(r_l, (t - protected) // 2)`` (``protected`` = 1 with a class token, else 0), so a block
  removes at most half its tokens.
- **Merge** (``merge_wavg``): ``x <- merge(x * s, sum) / merge(s, sum)``, ``s <- merge(s, sum)`` with
  ``s`` the size (original patches each token holds, 1 at first): a merged token is the size-weighted
  mean of its members. The output order is ``[unmerged A tokens, B tokens]``; with a class token
  the unmerged A indices are sorted ascending (the class token stays first), without one they stay in
  edge order (descending best-edge score). That order is the next block's A/B split.
- **Proportional attention** (Eq. 1): ``A = softmax(q k^T / sqrt(d) + log s)`` in every block once
  sizes exist (``ToMeAttention``); ``InsideBlock(proportional_attention=...)`` asks the pipeline to
  add ``log(size)`` of each key as an additive mask.
- **Schedule** (``parse_r``): ``r`` an int (the same r in every block), a list (one r per block), or
  ``(r, inflection)``: ``min = int(r (1 - inflection))``, ``max = 2 r - min``, layer ``i`` gets
  ``int(min + (max - min) / (L - 1) * i)`` (``inflection = -1``: the paper's decreasing schedule).

How it meets the pipeline. The pipeline hands each vision stage's candidates (the patch tokens; the
class token and registers are prefix tokens, never candidates, ``TokenRows.offset`` of them) in
ascending order of their original patch index, not in ToMe's order. The strategy therefore keeps
ToMe's order itself, in ``ctx.state`` (one dict per encoder call): the ToMe position of every
candidate, the prefix taking positions ``0 .. offset - 1``. Each stage rebuilds the official sequence
(the ``offset`` prefix slots, then the candidates in ToMe order), runs the official matching and
``merge_wavg`` rules on it (the prefix slots' rows and columns of ``S`` are ``-inf``), and hands
back the survivors in ascending candidate order (``Reduction.keep``; a merged token keeps its B
member's index), their merged features, and ``merged_into`` (for each candidate the column of the
token that now holds it), from which the pipeline carries the sizes (``TokenRows.sizes``) and the
source map (``merge_source``) of the next stage. On a ViT with a class token this is the official
model, block for block (``tests/test_tome.py`` checks the token sequences, sizes and sources
against the official functions over 12 layers, and logits against the official timm patch).

Budgets. ``r`` follows the official schedule. Without ``r``, ``keep``/``keep_tokens`` is the number
of patch tokens leaving the encoder (vtoken's budget, so methods compare at equal token counts): the
``M = P - keep`` merges of an image of ``P`` patches are spread over the merging layers as evenly as
ToMe's constant r (``ceil(left / layers left)`` per layer, so earlier layers take the remainder),
moving merges to earlier layers only where a later layer could not take its share under the
half-per-layer clamp; a budget no schedule can reach is refused with the smallest one that works.
The default budget is ``40/196``: what the official README's off-the-shelf setting (``r = 13``,
ViT-S/16 and ViT-B/16, and the DeiT-S/Ti r13 checkpoints) leaves on a 224 px /16 ViT, 40 of 196
patches; on a 12-layer ViT with 196 patches the default is exactly ``r = 13``. (``r = 16``, the
README's code example, leaves 10 of 196 on ViT-B/16: the last block is clamped from 16 to 10.)

Each merging layer is one :class:`ToMeStage`; its kept count is a function of the patch count only
(the clamp ``(t - protected) // 2`` equals ``n // 2`` for ``n`` candidates whether or not a class
token precedes them, as every prefix token is protected), so ``budget(P)``/``fraction(P)`` give the
exact count, clamp included, before anything runs (``round(fraction(P) * P) == budget(P)``). The
count is not linear in ``P``: for an image of several crops (AnyRes) ``crop_budget(crop, image)``
runs the schedule on the crop's own sequence, which is what the encoder merges.

Deviations from the official code (each one says why):

1. The cosine similarities and the size-weighted averages are computed in float32 and cast back
   (the official code works in the model's dtype). Identical for float32 models; in fp16/bf16 it
   avoids ties from rounded similarities and sizes above 256 rounding in bf16.
2. ``r`` as a list must have one value per vision layer (the official ``parse_r`` pads a shorter list
   with zeros and ignores extra values): a wrong length is refused naming the depth.
3. ``keep``/``keep_tokens`` budgets (above) are vtoken's; the paper only has ``r``.
4. In a vision-language model no layer at or after the one whose output the LLM reads may merge: an
   int or ``(r, inflection)`` ``r`` is parsed over the layers before it (``parse_r(read_layer, r)``),
   and a list with a non-zero value there is refused.
5. Prefix tokens other than a class token (registers: ``offset > 1``) are all protected (never merged,
   never merged into), as the official code protects the class and distillation tokens; the
   unmerged A tokens are sorted whenever a prefix exists (the official class-token path). Without a
   prefix (``offset == 0``) they stay in edge order, as the official ``class_token=False`` path.
6. Every real encoder token takes part (``TokenRows.sizes > 0``), also those the pipeline marks
   invalid because they never reach the LLM (LLaVA-NeXT's unpadding): the encoder merges its whole
   sequence, as the official model would. On vision-only models and LLaVA-1.5 they are all valid.
7. The official ``unmerge``, ``kth_``/``random_bipartite_soft_matching`` and the MAE/SWAG patches are
   not part of this method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from collections.abc import Callable
from typing import Any

import torch

from vtoken.config import ROUNDINGS, PruneConfig, StageSpec, check_budget_options
from vtoken.context import Reduction, ScoreContext
from vtoken import signals
from vtoken.registry import register
from vtoken.signals import Needs, Signal
from vtoken.schedule import ScoringCost, StageShapes, check_site
from vtoken.strategies.base import InsideBlock, Strategy

#: The official code this file follows.
OFFICIAL = "facebookresearch/ToMe@af95e4b1befa172dadccd8c81e223b10090f9579"
#: Depth the schedule is resolved against before a model is bound (ViT-B/16, the paper's main model).
REFERENCE_DEPTH = 12
#: Where the strategy keeps ToMe's token order in ``ctx.state``.
STATE_KEY = "tome"


# --------------------------------------------------------------------------------------------------
# The schedule


def parse_r(num_layers: int, r: int | tuple[int, float] | list[int]) -> list[int]:
    """The schedule rule of ``tome/utils.py:parse_r`` for an int and an ``(r, inflection)`` pair (a one-layer
    tower, where the official step divides by zero, gets ``r`` itself); a list is returned as given
    (its length is checked by the config)."""
    if isinstance(r, list):
        return list(r)
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(min_val + step * i) for i in range(num_layers)]


def clamped_plan(rates: tuple[int, ...], patches: int) -> tuple[int, ...]:
    """Tokens each layer merges for an image of ``patches`` patch tokens: ``min(r_l, n_l // 2)`` with
    ``n_l`` the patch tokens entering layer ``l`` (``bipartite_soft_matching``'s clamp
    ``(t - protected) // 2``, the same whether or not a protected class token precedes them)."""
    return _clamped_plan(tuple(int(r) for r in rates), int(patches))


@lru_cache(maxsize=1024)
def _clamped_plan(rates: tuple[int, ...], patches: int) -> tuple[int, ...]:
    n, plan = patches, []
    for rate in rates:
        merged = max(0, min(rate, n // 2))
        plan.append(merged)
        n -= merged
    return tuple(plan)


def merge_capacity(tokens: int, layers: int) -> int:
    """The most merges ``layers`` ToMe layers can make starting from ``tokens`` tokens (each at most
    halves its tokens)."""
    total = 0
    for _ in range(layers):
        merged = tokens // 2
        total += merged
        tokens -= merged
    return total


def spread_plan(patches: int, final: int, layers: int) -> tuple[int, ...]:
    """Per-layer merges taking ``patches`` tokens to ``final`` over ``layers`` layers, as even as a
    constant r: each layer takes ``ceil(left / layers left)`` (earlier layers take the remainder),
    more only where the layers after it could not take the rest under the half-per-layer clamp."""
    return _spread_plan(int(patches), int(final), int(layers))


@lru_cache(maxsize=1024)
def _spread_plan(patches: int, final: int, layers: int) -> tuple[int, ...]:
    if final > patches:
        raise ValueError(
            f"tome: the budget ({final} tokens) exceeds the {patches} patch tokens of the image; "
            f"lower keep/keep_tokens"
        )
    left = patches - final
    if layers <= 0:
        if left:
            raise ValueError("tome has no vision layer to merge in; use a model with vision layers before the read layer")
        return ()
    most = merge_capacity(patches, layers)
    if left > most:
        raise ValueError(
            f"tome cannot merge {patches} patch tokens down to {final} in {layers} vision layer(s): each layer "
            f"merges at most half of its tokens (ToMe's bipartite matching), so at least {patches - most} remain; "
            # keep is the unit that holds for every crop (an AnyRes image's keep_tokens is shared by its crops)
            f"use keep >= {math.ceil((patches - most) / patches * 1000) / 1000:g} (keep_tokens >= {patches - most} "
            f"for an image of {patches} patches) or r= for ToMe's own schedule"
        )
    n, plan = patches, []
    for layer in range(layers):
        rest = layers - layer - 1
        cap = n // 2
        merged = min(cap, -(-left // (layers - layer)))
        while merged < min(cap, left) and left - merged > merge_capacity(n - merged, rest):
            merged += 1
        plan.append(merged)
        n -= merged
        left -= merged
    assert left == 0, (patches, final, layers, plan)
    return tuple(plan)


@dataclass(frozen=True)
class ToMeStage(StageSpec):
    """One ToMe layer (``layer``): the stage runs inside that block and keeps the patch tokens left
    after the layer's merges. Its count is computed from the image's patch count ``P`` for the whole
    schedule at once, the clamp included:

    - ``rates`` given (``r=``): ToMe's per-layer r for every vision layer (``parse_r``), clamped by
      :func:`clamped_plan`; ``keep``/``keep_tokens`` are then None.
    - ``rates`` None: ``keep``/``keep_tokens`` is the final budget, spread over the first ``layers``
      layers by :func:`spread_plan`.

    ``fraction(P)`` is ``budget(P) / P`` exactly, so ``round(fraction(P) * P)`` gives the count back.
    """

    rates: tuple[int, ...] | None = None
    layers: int = 0

    def __post_init__(self) -> None:
        if self.rates is None:
            super().__post_init__()
            return
        check_site(self.site, self.layer)
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.keep is not None or self.keep_tokens is not None:
            raise ValueError("a ToMe stage with r takes no keep/keep_tokens")

    def plan(self, patches: int) -> tuple[int, ...]:
        """Tokens merged at each layer for an image of ``patches`` patch tokens."""
        if self.rates is not None:
            return clamped_plan(self.rates, patches)
        return spread_plan(patches, StageSpec.budget(self, patches), self.layers)

    def budget(self, visual_tokens: int) -> int:
        return visual_tokens - sum(self.plan(visual_tokens)[: self.layer + 1])

    def fraction(self, visual_tokens: int) -> float:
        return self.budget(visual_tokens) / visual_tokens

    def crop_budget(self, crop_tokens: int, image_tokens: int) -> int:
        """Patch tokens one crop of ``crop_tokens`` patches keeps after this layer, for an image of
        ``image_tokens`` visual tokens (AnyRes crops: the image's budget shared in proportion). The
        schedule runs on the crop's own sequence, which is what the encoder merges: ``r`` as given,
        a final budget as the crop's share, ``round(keep * crop)`` or ``round(keep_tokens * crop /
        image)``. Equal to ``budget(crop_tokens)`` when the image is one crop."""
        if self.rates is not None or crop_tokens == image_tokens:
            return self.budget(crop_tokens)
        share = self.keep if self.keep is not None else self.keep_tokens / image_tokens
        final = max(1, round(share * crop_tokens))
        return crop_tokens - sum(spread_plan(crop_tokens, final, self.layers)[: self.layer + 1])


# --------------------------------------------------------------------------------------------------
# The config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalise_r(r: Any) -> int | tuple[int, float] | list[int] | None:
    """``r`` as ``parse_r`` takes it: an int, an ``(r, inflection)`` tuple, or a list of per-layer
    ints. A tuple of two, or a list of two whose second value is a float (what JSON makes of a saved
    pair), is a pair; any other list is per layer."""
    if r is None or _is_int(r):
        if r is not None and r < 0:
            raise ValueError(f"tome: r must be >= 0 (tokens merged per layer), got {r}")
        return r
    if isinstance(r, (tuple, list)) and len(r) == 2 and (
        isinstance(r, tuple) or (isinstance(r[1], float) and not isinstance(r[1], bool))
    ):
        rate, inflection = r
        if not _is_int(rate) or rate < 0:
            raise ValueError(f"tome: in r=(r, inflection), r must be an integer >= 0, got {rate!r}")
        if isinstance(inflection, bool) or not isinstance(inflection, (int, float)) or not -1.0 <= inflection <= 1.0:
            raise ValueError(f"tome: in r=(r, inflection), inflection must be a number in [-1, 1], got {inflection!r}")
        return (int(rate), float(inflection))
    if isinstance(r, (list, tuple)):
        values = list(r)
        if not all(_is_int(v) and v >= 0 for v in values):
            raise ValueError(f"tome: r as a list needs one integer >= 0 per vision layer, got {values!r}")
        return values
    raise ValueError(
        f"tome: r must be an int, a list with one int per vision layer, or an (r, inflection) pair; got {r!r}"
    )


@dataclass
class ToMeConfig(PruneConfig):
    """ToMe options.

    Attributes:
        r: ToMe's schedule (``model.r`` of the official patch): tokens merged in every vision layer
            (int), one value per vision layer (list), or ``(r, inflection)`` (``parse_r``;
            inflection -1 is the paper's decreasing schedule). Each layer merges at most half its
            tokens. Give ``r`` or ``keep``/``keep_tokens``, not both.
        keep / keep_tokens: without ``r``, the patch tokens leaving the encoder, the merges spread
            over the vision layers as evenly as a constant r (default ``40/196``: what the official
            r = 13 leaves on ViT-S/16 and ViT-B/16).
        proportional_attention: add ``log(size)`` to the attention logits (Eq. 1); the official
            default for off-the-shelf models. False for models trained without it (MAE).
        site: ``"vision"`` only (ToMe merges inside the vision encoder).
    """

    method = "tome"
    #: 40 of 196: what the official README's r = 13 leaves on ViT-S/16 and ViT-B/16 (224 px).
    default_keep = 40 / 196

    site: str = "vision"
    r: int | list[int] | tuple[int, float] | None = None
    proportional_attention: bool = True

    def __post_init__(self) -> None:
        if self.site != "vision":
            raise ValueError(
                f"tome merges inside the vision encoder, so it cannot prune at the {self.site!r} site; use site='vision'"
            )
        if self.layer is not None or self.stages:
            raise ValueError(
                "tome merges in every vision layer and takes no layer=/stages=; give r as a list with one value "
                "per vision layer (0 where nothing merges) to choose the layers"
            )
        self.r = normalise_r(self.r)
        check_budget_options(self.keep, self.keep_tokens)  # (keep=True would read as 1.0: nothing merged)
        if self.r is not None and (self.keep is not None or self.keep_tokens is not None):
            raise ValueError(
                "tome: give r= (ToMe's tokens merged per layer) or keep=/keep_tokens= (the tokens left after the "
                "encoder), not both; drop keep/keep_tokens to use r"
            )
        if not isinstance(self.proportional_attention, bool):
            raise ValueError(f"tome: proportional_attention must be True or False, got {self.proportional_attention!r}")
        super().__post_init__()

    def rates(self, depth: int | None = None, read: int | None = None) -> tuple[int, ...] | None:
        """ToMe's unclamped r for each of the ``depth`` vision layers (None without ``r``); ``read``
        is the layer whose output a language model reads (no merging at or after it)."""
        if self.r is None:
            return None
        if depth is None:
            depth = len(self.r) if isinstance(self.r, list) else REFERENCE_DEPTH
        usable = depth if read is None else max(0, min(read, depth))
        if isinstance(self.r, list):
            if len(self.r) != depth:
                raise ValueError(
                    f"tome: r has {len(self.r)} values but the vision encoder has {depth} layers; give one value "
                    f"per layer (0 where nothing merges)"
                )
            late = [i for i in range(usable, depth) if self.r[i] > 0]
            if late:
                raise ValueError(
                    f"tome: r merges at vision layer {late[0]}, at or after layer {usable} whose output the language "
                    f"model reads; set r[{usable}:] to 0"
                )
            return tuple(self.r)
        rates = parse_r(usable, self.r) if usable > 0 else []
        return tuple(rates) + (0,) * (depth - usable)

    def resolved_stages(self, depth: int | None = None, read: int | None = None) -> tuple[StageSpec, ...]:
        """One :class:`ToMeStage` per merging vision layer of a ``depth``-layer tower
        (``REFERENCE_DEPTH`` until a model is bound; the list's length for a per-layer ``r``)."""
        rates = self.rates(depth, read)
        if rates is not None:
            return tuple(ToMeStage("vision", layer, rates=rates) for layer, rate in enumerate(rates) if rate > 0)
        depth = REFERENCE_DEPTH if depth is None else depth
        usable = depth if read is None else max(0, min(read, depth))
        keep = self.default_keep if self.keep is None and self.keep_tokens is None else self.keep
        if keep == 1.0:
            return ()  # nothing to merge at any image size
        return tuple(
            ToMeStage("vision", layer, keep, self.keep_tokens, layers=usable) for layer in range(usable)
        )


# --------------------------------------------------------------------------------------------------
# Merging


#: What merging one group of rows gives (:func:`merge_rows`): the survivors' indices among the
#: group's ``n`` tokens ``[G, target]``, their features ``[G, target, d]`` (input dtype), their places in
#: ToMe's order ``[G, target]``, the survivor holding each of the ``n`` tokens ``[G, n]``, and their
#: sizes ``[G, target]`` (or None when the method does not carry sizes).
GroupMerge = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def merge_rows(
    method: str, features: torch.Tensor, take_part: torch.Tensor, budget: torch.Tensor,
    merge_group: Callable[[torch.Tensor, torch.Tensor, int, int], GroupMerge],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge each row's tokens that ``take_part`` down to ``budget[r]``, rows with the same count and
    budget together: ``merge_group(group, columns, n, target)`` merges the rows ``group`` (``[G]``)
    whose ``n`` taking-part tokens sit at ``columns`` (``[G, n]``, ascending) down to ``target``.

    Returns ``keep`` ``[R, K]`` (ascending columns, -1 padded), the kept features ``[R, K, d]``,
    ``merged_into`` ``[R, N]`` (the column of ``keep`` holding each token, -1 for tokens not taking
    part), the kept tokens' places in ToMe's order ``[R, K]`` and their sizes ``[R, K]`` (float32,
    zero where ``merge_group`` carries none)."""
    rows, width, dim = features.shape
    device = features.device
    counts = take_part.sum(dim=-1)
    if bool((budget > counts).any()):
        i = int((budget > counts).nonzero()[0])
        raise RuntimeError(f"{method}: the budget ({int(budget[i])}) exceeds the {int(counts[i])} tokens of row {i} "
                           "taking part in the merge")
    k = int(budget.max()) if rows else 0
    keep = torch.full((rows, k), -1, dtype=torch.long, device=device)
    out = features.new_zeros(rows, k, dim)
    merged_into = torch.full((rows, width), -1, dtype=torch.long, device=device)
    next_position = torch.full((rows, k), -1, dtype=torch.long, device=device)
    next_sizes = torch.zeros(rows, k, dtype=torch.float32, device=device)
    pairs = torch.stack([counts, budget], dim=1).cpu()
    for n, target in torch.unique(pairs, dim=0).tolist():
        group = ((counts == n) & (budget == target)).nonzero().squeeze(-1)
        columns = torch.sort(torch.where(take_part[group], torch.arange(width, device=device), width), dim=1).values[:, :n]
        local, merged, position, holder, sizes = merge_group(group, columns, n, target)
        keep[group, :target] = columns.gather(1, local)
        out[group, :target] = merged
        next_position[group, :target] = position
        if sizes is not None:
            next_sizes[group, :target] = sizes
        into_row = torch.full((len(group), width), -1, dtype=torch.long, device=device)
        into_row.scatter_(1, columns, holder)
        merged_into[group] = into_row
    return keep, out, merged_into, next_position, next_sizes


def _identity(rows: int, width: int, position: torch.Tensor, valid: torch.Tensor, n: int):
    """A row set that merges nothing (``r == 0``: the official ``do_nothing``): every valid token
    stays, in ToMe order unchanged."""
    device = valid.device
    keep = torch.sort(torch.where(valid, torch.arange(width, device=device), width), dim=1).values[:, :n]
    return keep, None, position.gather(1, keep)


def tome_merge(
    features: torch.Tensor, keys: torch.Tensor, sizes: torch.Tensor, position: torch.Tensor, r: int, offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe step on ``G`` rows that all hold ``n`` tokens and merge ``r`` of them: the first four
    results of :func:`merge_round` with ToMe's own rules (no saliency; the unmerged A tokens sorted
    when a prefix leads)."""
    return merge_round(features, keys, sizes, position, r, offset)[:4]


def merge_round(
    features: torch.Tensor, keys: torch.Tensor, sizes: torch.Tensor, position: torch.Tensor, r: int, offset: int,
    saliency: torch.Tensor | None = None, sort_unmerged: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe step on ``G`` rows that all hold ``n`` tokens and merge ``r`` of them.

    ``features`` ``[G, n, d]``, ``keys`` ``[G, n, c]`` (the metric), ``sizes`` ``[G, n]`` are the
    row's tokens in any order; ``position`` ``[G, n]`` each token's place in ToMe's order (a
    permutation of ``0..n-1``); ``offset`` protected prefix tokens precede them in the sequence.
    The matching and size-weighted merge of the official ``bipartite_soft_matching`` and
    ``merge_wavg`` (same rules, written here) run on the sequence ``[prefix slots, tokens in ToMe
    order]``.

    Returns, for the ``n - r`` survivors in ascending token index: ``keep`` ``[G, n - r]`` (indices
    into the ``n`` tokens; a merged token keeps its B member's), ``merged`` ``[G, n - r, d]`` (input
    dtype), ``new_position`` ``[G, n - r]`` (their places in ToMe's order after the merge),
    ``merged_into`` ``[G, n]`` (for each token, the column of ``keep`` holding it) and ``new_sizes``
    ``[G, n - r]`` float32 (the merged sizes: ``merge(s, sum)``).

    Two options used by other merging methods (ToMe itself uses neither; without them the result is
    ToMe's, bit for bit):

    - ``saliency`` ``[G, n]``: vid-TLDR's weighting (mlvlab/vid-TLDR, ``multi_modality/utils/
      vid_TLDR.py``, ``merging`` and ``merge_wavg``): a token that merges away (an A token in the
      top ``r``) enters its target with weight ``size x saliency`` instead of ``size``, in the merged
      features and in the merged size alike (``src = src * src_so`` inside ``merge``, which
      ``merge_wavg`` applies to ``x * size`` and to ``size``); the target and the staying tokens keep
      weight ``size``. A merged token is still ``sum(w x) / sum(w)``, a convex combination, and its
      size becomes ``sum(w)``.
    - ``sort_unmerged``: whether the staying A tokens are put in ascending place order (None:
      ToMe's rule, only when a prefix leads; vid-TLDR always sorts them).
    """
    rows, n, dim = features.shape
    device = features.device
    t = offset + n
    seq = torch.empty(rows, n, dtype=torch.long, device=device)  # token at each ToMe place
    seq.scatter_(1, position, torch.arange(n, device=device).expand(rows, n))
    ids = torch.cat([torch.full((rows, offset), -1, dtype=torch.long, device=device), seq], dim=1)  # [G, t]
    prefix_a, prefix_b = (offset + 1) // 2, offset // 2  # prefix slots at even / odd places
    n_a = (t + 1) // 2 - prefix_a
    if r > n_a:
        raise RuntimeError(
            f"tome: asked to merge {r} of {n} tokens, but only {n_a} are in set A (at most half the tokens "
            f"merge per layer); the stage budget must keep at least {n - n_a}"
        )

    with torch.no_grad():
        # ToMe's sequence: the protected prefix slots, then the tokens in its order. Places alternate
        # between set A (even) and set B (odd); each A token's edge is its most cosine-similar B token.
        metric = keys.float().gather(1, seq[..., None].expand(rows, n, keys.shape[-1]))
        metric = torch.cat([metric.new_ones(rows, offset, metric.shape[-1]), metric], dim=1)
        unit = metric / metric.norm(dim=-1, keepdim=True)
        similarity = unit[:, 0::2] @ unit[:, 1::2].transpose(1, 2)  # [G, |A|, |B|]
        similarity[:, :prefix_a, :] = -math.inf  # a protected slot in A never merges away
        similarity[:, :, :prefix_b] = -math.inf  # nor does anything merge into one in B
        best, partner = similarity.max(dim=-1)
        ranking = best.argsort(dim=-1, descending=True)  # A tokens, strongest edge first
        merging, staying = ranking[:, :r], ranking[:, r:]
        if (offset > 0) if sort_unmerged is None else sort_unmerged:
            staying = staying.sort(dim=-1).values  # the prefix stays in front (ToMe sorts the unmerged A tokens then)
        target = partner.gather(1, merging)  # the B token each merging A token joins

    def fold(values: torch.Tensor) -> torch.Tensor:
        """``[G, t, c]`` -> ``[G, t - r, c]``: the staying A tokens, then B with the merging A tokens
        added into their targets."""
        width = values.shape[-1]
        side_a, side_b = values[:, 0::2], values[:, 1::2]
        kept = side_a.gather(1, staying[..., None].expand(-1, -1, width))
        moved = side_a.gather(1, merging[..., None].expand(-1, -1, width))
        side_b = side_b.scatter_add(1, target[..., None].expand(-1, -1, width), moved)
        return torch.cat([kept, side_b], dim=1)

    # A merged token is the size-weighted mean of its members (ToMe Eq. 1's sizes): sum(s x) / sum(s).
    x = features.float().gather(1, seq[..., None].expand(rows, n, dim))
    x = torch.cat([x.new_zeros(rows, offset, dim), x], dim=1)
    size = sizes.float().gather(1, seq)[..., None]
    size = torch.cat([size.new_ones(rows, offset, 1), size], dim=1)
    if saliency is not None:  # vid-TLDR: a merging A token weighs size x saliency (features and size alike)
        side_a = size[:, 0::2]
        scale = saliency.float().gather(1, seq)
        scale = torch.cat([scale.new_ones(rows, offset), scale], dim=1)[:, 0::2].gather(1, merging)
        side_a = side_a.scatter(1, merging[..., None], side_a.gather(1, merging[..., None]) * scale[..., None])
        size = size.clone()
        size[:, 0::2] = side_a
    total = fold(size)
    x = fold(x * size) / total

    # Which token each output slot is (a merged token is its B member), prefix slots dropped.
    ids_a, ids_b = ids[:, ::2], ids[:, 1::2]
    order = torch.cat([ids_a.gather(1, staying), ids_b], dim=1)  # [G, t - r], ToMe's new order
    real = order >= 0
    order = order[real].view(rows, n - r)
    x = x[real].view(rows, n - r, dim)
    keep, new_position = torch.sort(order, dim=1)  # ascending token index; its place in ToMe order
    merged = x.gather(1, new_position[..., None].expand(rows, n - r, dim)).to(features.dtype)
    new_sizes = total[real].view(rows, n - r).gather(1, new_position)
    column = torch.full((rows, n), -1, dtype=torch.long, device=device)
    column.scatter_(1, keep, torch.arange(n - r, device=device).expand(rows, n - r))
    src_ids = ids_a.gather(1, merging)
    dst_ids = ids_b.gather(1, target)
    merged_into = column.clone()
    merged_into.scatter_(1, src_ids, column.gather(1, dst_ids))
    return keep, merged, new_position, merged_into, new_sizes


# --------------------------------------------------------------------------------------------------
# The strategy


@register
class ToMeStrategy(Strategy):
    name = "tome"
    Config = ToMeConfig
    sites = ("vision",)
    reads = (signals.VISION_BLOCK_KEYS,)

    def bind(self, depths: dict[str, int]) -> None:
        super().bind(depths)
        self.stages()  # validates r against the tower's depth (a list's length, the read layer)

    def stages(self) -> tuple[StageSpec, ...]:
        return self.config.resolved_stages(self.depths.get("vision"), self.depths.get("vision_read"))

    def needs(self) -> Needs:
        return Needs.of(Signal(signals.VISION_BLOCK_KEYS))

    def inside_block(self) -> InsideBlock:
        return InsideBlock(proportional_attention=self.config.proportional_attention)

    def scoring_cost(self, stage: StageSpec, shapes: StageShapes | None = None) -> list[ScoringCost]:
        return [ScoringCost("vision_token_matching", layer=stage.layer)]

    def reduce(self, ctx: ScoreContext) -> Reduction:
        rows = ctx.tokens
        if ctx.keys is None:
            raise RuntimeError(
                "tome matches tokens by the keys of the block's attention (ScoreContext.keys), which the pipeline "
                "provides only when it runs the vision stages inside their block (Strategy.inside_block); this "
                "model's pipeline did not"
            )
        features, budget = rows.features, rows.budget.to(rows.valid.device)
        # Every real encoder token takes part (a size > 0), also those that never reach the LLM
        # (LLaVA-NeXT's unpadding: ``valid`` False): the encoder merges its whole sequence.
        valid = rows.sizes > 0 if rows.sizes is not None else rows.valid
        dim, device, offset = features.shape[-1], features.device, int(rows.offset)
        sizes = rows.sizes if rows.sizes is not None else valid.float()
        position = self._order(ctx, valid)

        def merge_group(group, columns, n, target) -> GroupMerge:
            g_position = position[group].gather(1, columns)  # ToMe place of each valid token
            g_features = features[group].gather(1, columns[..., None].expand(-1, n, dim))
            r = n - target
            if r == 0:  # the official do_nothing: features untouched, order unchanged
                local = torch.arange(n, device=device).expand(len(group), n)
                return local, g_features, g_position, local, None
            g_keys = ctx.keys[group].gather(1, columns[..., None].expand(-1, n, ctx.keys.shape[-1]))
            g_sizes = sizes[group].gather(1, columns)
            local_keep, g_out, g_next, g_into = tome_merge(g_features, g_keys, g_sizes, g_position, r, offset)
            return local_keep, g_out, g_next, g_into, None

        keep, out, merged_into, next_position, _ = merge_rows("tome", features, valid, budget, merge_group)
        ctx.state[STATE_KEY] = {"stage_index": ctx.stage_index, "position": next_position}
        ctx.report(merged=(valid.sum(-1) - budget).cpu())
        return Reduction(keep=keep, features=out, merged_into=merged_into)

    @staticmethod
    def _order(ctx: ScoreContext, valid: torch.Tensor) -> torch.Tensor:
        """``[R, N]`` each taking-part candidate's place in ToMe's order (-1 elsewhere): what the
        previous stage of this encoder call left, or the original order at the first stage."""
        previous = ctx.state.get(STATE_KEY) if ctx.state is not None else None
        if previous is not None and previous["stage_index"] < ctx.stage_index:
            position = previous["position"].to(valid.device)
            if position.shape != valid.shape or not torch.equal(position >= 0, valid):
                raise RuntimeError(
                    "tome: the candidates of this stage are not the tokens the previous ToMe stage kept, in the "
                    "order it returned them; ToMe's token order cannot be followed"
                )
            return position
        return torch.where(valid, valid.long().cumsum(-1) - 1, -1)
