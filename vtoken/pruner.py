"""The model-independent half of a wrapped model: it runs the strategy at each stage and routes each
hook to the request running in its thread (the request's state is in :mod:`vtoken.request`). The
adapter's hooks call into it with tensors; it never touches a module.
"""

from __future__ import annotations

import contextvars
import copy
import weakref
from functools import partial
from typing import Callable, NamedTuple

import torch

from vtoken.config import PruneConfig, StageSpec
from vtoken.context import Grid, Reduction, ScoreContext, TokenRows
from vtoken.reduction_checks import check_reduction
from vtoken.kernels import gather_tokens
from vtoken.layout import SequenceLayout
from vtoken.request import ImageRun, PruneRun, TextOnlyPrefill, renumbers
from vtoken.signals import Needs


class StageResult(NamedTuple):
    """What a sequence stage made of its input: the new layout and hidden states, and
    ``selected_from``: the ``[B, L']`` slot index that gathered the new hidden states from the input
    when every kept row is an input row unchanged (None when the strategy merged features into them),
    so any per-token tensor computed on the input (a layer's keys) gathers with it too."""

    layout: SequenceLayout
    hidden: torch.Tensor
    selected_from: torch.Tensor | None


_CACHE_LINK = "_vtoken_decoding"


class CacheLink:
    """What a KV cache filled by a wrapped model's prefill carries: the pruner (weakly: the cache
    does not keep a model alive) and the request its decoding steps continue. A deep copy of the
    cache continues a copy of the request (its own count of processed tokens); a pickled cache loses
    the link (a request does not pickle) and is then refused as unknown when it is shorter than its
    prompt."""

    def __init__(self, pruner: "weakref.ref[Pruner]", run: PruneRun) -> None:
        self.pruner, self.run = pruner, run

    def __deepcopy__(self, memo: dict) -> "CacheLink":
        return CacheLink(self.pruner, copy.copy(self.run))

    def __reduce__(self):
        return type(None), ()


def candidate_attention(probs: torch.Tensor, row_sample: torch.Tensor, slot_index: torch.Tensor) -> torch.Tensor:
    """``[R, H, Q, N]``: the columns of attention ``probs`` ``[B, H, Q, L]`` at each candidate row's
    slots (``slot_index`` ``[R, N]``, ascending, -1 padded at the end: a padded candidate gets 0),
    from the row's sample (``row_sample`` ``[R]``).

    An image's tokens usually fill one run of slots (a stage compacts, it never interleaves), and
    then its columns are a slice of ``probs``: a view for a single row, no copy. Other rows take
    ``index_select`` of whole columns. Either way the values are the ones an index over ``[R, N]``
    gathers, without the ``[R, N, H, Q]`` copy and its permute."""
    width = slot_index.shape[1]
    firsts = slot_index[:, 0].tolist() if width else []
    lasts = slot_index[:, -1].tolist() if width else []
    rows = []
    for r, sample in enumerate(row_sample.tolist()):
        if width and firsts[r] >= 0 and lasts[r] - firsts[r] == width - 1:  # ascending, none padded
            rows.append(probs[sample : sample + 1, :, :, firsts[r] : firsts[r] + width])
            continue
        slots = slot_index[r]
        picked = probs[sample].index_select(-1, slots.clamp(min=0))
        rows.append((picked * (slots >= 0)).unsqueeze(0))
    if not rows:
        return probs.new_zeros(0, *probs.shape[1:3], width)
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def candidate_features(hidden: torch.Tensor, slot_index: torch.Tensor, row_sample: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
    """``[R, N, d]``: a copy of each row's candidate hidden states (row ``r``'s slots ``slot_index[r]``
    of sample ``row_sample[r]`` of ``hidden`` ``[B, L, d]``), zero where ``valid`` is False. One image
    with no pad is one ``index_select``, cheaper on a CPU than an advanced index and a multiply by the
    mask, for the same numbers (a product with 1 is exact)."""
    if row_sample.numel() == 1 and bool(valid.all()):
        return hidden[int(row_sample[0])].index_select(0, slot_index[0])[None]
    return hidden[row_sample[:, None], slot_index.clamp(min=0)] * valid[..., None].to(hidden.dtype)


def vision_not_observed(layer: int) -> ValueError:
    """The error for a stage that reads vision ``layer``'s observation where there is none."""
    return ValueError(f"vision layer {layer} was not observed before this stage; declare Signal('vision_observed', "
                      f"{layer}) in needs(), and read only layers that run first (a stage after vision layer K reads "
                      "layers 0..K)")


class LLMObservations:
    """What ``observe`` / ``observe_attention`` summarised at earlier LLM layers, for the candidates
    of one LLM stage (``ctx.observed(layer)``, ``ctx.observed_attention(layer)``): each layer's summary
    matched to the candidate rows through the original sequence index (the layer may have seen a
    longer layout). The candidates' original indices are found once per stage, each layout's map from
    original index to slot once per layout (:meth:`SequenceLayout.slot_of_original`); a layer that saw
    this stage's own slots needs neither."""

    def __init__(self, run: PruneRun, layout: SequenceLayout, slot_index: torch.Tensor, row_sample: torch.Tensor):
        self._run, self._layout, self._slot_index, self._row_sample = run, layout, slot_index, row_sample
        self._candidates: torch.Tensor | None = None
        self._padded = True  # whether some candidate is a pad (-1); known once the indices are found
        # Rows that are the samples themselves, in order (one image per sample): a summary needs no
        # per-row copy.
        self._rows_are_samples = row_sample.tolist() == list(range(layout.orig_index.shape[0]))

    def observed(self, layer: int) -> torch.Tensor:
        """``[R, N, k]``: what ``observe`` summarised at LLM ``layer`` for each candidate."""
        return self._rows(layer, self._run.observed, "llm_observed")

    def observed_attention(self, layer: int) -> torch.Tensor:
        """``[R, N, k]``: what ``observe_attention`` summarised at LLM ``layer`` for each candidate."""
        return self._rows(layer, self._run.attention_observed, "llm_attention_observed")

    def _original_indices(self) -> torch.Tensor:
        """``[R, N]``: each candidate's original sequence index (-1 for a padded candidate)."""
        if self._candidates is None:
            slots = self._slot_index
            found = self._layout.orig_index[self._row_sample[:, None], slots.clamp(min=0)]
            self._candidates = torch.where(slots >= 0, found, -1)
            self._padded = bool(self._candidates.numel()) and int(self._candidates.min()) < 0
        return self._candidates

    def _rows(self, layer: int, store: dict, signal: str) -> torch.Tensor:
        if layer not in store:
            raise ValueError(f"LLM layer {layer} was not observed before this stage; list it in Signal({signal!r}, "
                             f"{layer}) in needs(), and read only layers that run first (a stage before LLM layer K "
                             "reads layers 0..K-1)")
        summary, then = store[layer]
        summary = summary if summary.dim() == 3 else summary[..., None]
        rows = summary if self._rows_are_samples else summary[self._row_sample]
        if then.orig_index is self._layout.orig_index:
            # Observed on the slots this stage sees (no stage in between): a candidate's slot there is
            # its slot here, a pad's -1 included; no map through the original indices.
            return gather_tokens(rows, self._slot_index)
        orig = self._original_indices()
        where = then.slot_of_original(self._run.orig_length)
        if self._padded:
            then_slot = torch.where(orig >= 0, where[self._row_sample[:, None], orig.clamp(min=0)], -1)
        else:
            then_slot = where[self._row_sample[:, None], orig]
        return gather_tokens(rows, then_slot)


def separators_follow_their_runs(reached: torch.Tensor, has_origin: torch.Tensor) -> torch.Tensor:
    """``reached`` ``[N]`` (bool: the token survives) with each token that has no origin (a
    separator: LLaVA-NeXT's newline closing a row) set to whether any token of the run it closes
    survives, i.e. any token since the previous separator; a separator that closes no token at all
    (a row of an unpadded grid left with no column, which the model still closes) always stays. One
    pass over the tokens, not a step per separator (a 24-row grid made 24 host syncs per stage)."""
    separator = ~has_origin.to(device=reached.device, dtype=torch.bool)
    if not bool(separator.any()):
        return reached
    closes = torch.cumsum(separator.long(), 0) - separator.long()  # the run each token belongs to
    count = int(separator.sum())
    hits = torch.zeros(count + 1, dtype=torch.long, device=reached.device)
    hits.index_add_(0, closes, (reached & ~separator).long())
    members = torch.zeros(count + 1, dtype=torch.long, device=reached.device)
    members.index_add_(0, closes, (~separator).long())
    out = reached.clone()
    out[separator] = (hits[:count] > 0) | (members[:count] == 0)
    return out


class Pruner:
    """Runs one strategy's stages for a wrapped model."""

    def __init__(self, strategy):
        self.strategy = strategy
        self.config: PruneConfig = strategy.config
        self.stages: tuple[StageSpec, ...] = strategy.stages()
        #: Everything the strategy reads (by signal name and layer), once per wrap.
        self.needs: Needs = strategy.needs()
        #: The strategy's stage that hides tokens from the text instead of removing them, if any.
        #: The strategy's mask stage (how it behaves), and its stage, if any.
        self.masking = strategy.mask_stage()
        self.mask: StageSpec | None = self.masking.stage if self.masking is not None else None
        # The request whose forward runs now, and the vision-encoder call running now: one value per
        # thread (and asyncio task), so two threads using one wrapped model never see each other's.
        self._active: contextvars.ContextVar = contextvars.ContextVar(f"vtoken_active_{id(self)}", default=None)
        self._encoding: contextvars.ContextVar = contextvars.ContextVar(f"vtoken_encoding_{id(self)}", default=None)
        #: The prompt length of the ``generate`` call running in this thread (None outside one).
        self.prompt_length: contextvars.ContextVar = contextvars.ContextVar(f"vtoken_prompt_{id(self)}", default=None)
        #: The ``generate`` call running in this thread (``adapters.generate_call.GenerateCall``, one per
        #: call; None outside one).
        self.generate_call: contextvars.ContextVar = contextvars.ContextVar(f"vtoken_generate_{id(self)}", default=None)
        #: Per-input annotations for the calls made inside ``vtoken.annotate`` (this thread's).
        self.annotations: contextvars.ContextVar = contextvars.ContextVar(f"vtoken_annotations_{id(self)}", default={})
        # The most recent prefill to finish in this thread, and in any thread (for a thread that has
        # run none): what ``vtoken.selection``, ``vtoken.diagnostics`` and ``vtoken.show`` report.
        self._last_run: contextvars.ContextVar = contextvars.ContextVar(f"vtoken_last_{id(self)}", default=None)
        self._last_run_any: PruneRun | TextOnlyPrefill | None = None
        # Encodings by the identity of the features object they returned, for as long as that object
        # lives (``generate`` encodes once and hands the same object to every forward).
        self._encodings: dict[int, ImageRun] = {}

    def release(self) -> None:
        """Let go of what this pruner's calls left behind (called by ``unwrap``): the last run this
        thread and any thread finished, a call's open route, every encoding. A context variable's
        value lives in each thread's context for as long as the thread does, whatever becomes of the
        pruner, so a wrap-and-unwrap loop would otherwise keep each wrap's last run (on a vision-only
        model, its encoding and features); another thread's values go when that thread ends."""
        for var in (self._active, self._encoding, self._last_run, self.prompt_length, self.generate_call):
            var.set(None)
        self.annotations.set({})
        self._last_run_any = None
        self._encodings.clear()

    @property
    def active(self) -> PruneRun | None:
        """The request whose forward is running now in this thread (set by the adapter's outermost hook)."""
        return self._active.get()

    @active.setter
    def active(self, run: PruneRun | None) -> None:
        self._active.set(run)

    @property
    def last_run(self) -> PruneRun | TextOnlyPrefill | None:
        """The last prefill this thread finished (or, if it has finished none, any thread's last)."""
        return self._last_run.get() or self._last_run_any

    @property
    def thread_last_run(self) -> PruneRun | TextOnlyPrefill | None:
        """The last prefill this thread finished (None if it has finished none)."""
        return self._last_run.get()

    @last_run.setter
    def last_run(self, run: PruneRun | TextOnlyPrefill) -> None:
        self._last_run.set(run)
        self._last_run_any = run

    @property
    def encoding(self) -> ImageRun | None:
        """The vision-encoder call running now in this thread."""
        return self._encoding.get()

    @encoding.setter
    def encoding(self, images: ImageRun | None) -> None:
        self._encoding.set(images)

    def remember_encoding(self, output, images: ImageRun) -> None:
        key = id(output)
        self._encodings[key] = images
        weakref.finalize(output, self._encodings.pop, key, None)

    def encoding_of(self, output) -> ImageRun | None:
        """The encoding that returned ``output``: by identity, or else (an accelerate hook or a
        device move rebuilt the output object around the same features) the latest live encoding
        whose features hold every one of ``output``'s, by identity or value."""
        images = self._encodings.get(id(output))
        if images is not None and images.output is output:
            return images
        from vtoken import compat

        features = compat.image_features(output)
        for images in reversed(list(self._encodings.values())):
            if all(any(same_feature(mine, feature) for mine in images.features) for feature in features):
                return images
        return None

    def attach(self, cache, run: PruneRun) -> None:
        """Decoding steps with ``cache`` continue ``run``: the cache carries a link to it, so that a
        ``copy.deepcopy`` of the cache (transformers' prompt-reuse recipe) continues a copy of it."""
        if hasattr(cache, "__dict__"):  # (a cache class with __slots__ only would decode as unknown)
            vars(cache)[_CACHE_LINK] = CacheLink(weakref.ref(self), run)

    def run_for_cache(self, cache) -> PruneRun | None:
        link = getattr(cache, "__dict__", {}).get(_CACHE_LINK)
        return link.run if isinstance(link, CacheLink) and link.pruner() is self else None

    def stages_at(self, site: str) -> list[StageSpec]:
        return [s for s in self.stages if s.site == site]

    def llm_stage_at(self, layer: int) -> StageSpec | None:
        for stage in self.stages:
            if stage.site == "llm" and stage.layer == layer:
                return stage
        return None

    def _stage_index(self, stage: StageSpec) -> int:
        return self.stages.index(stage) if stage in self.stages else len(self.stages)

    def _reduce(
        self, run: PruneRun | ImageRun, stage: StageSpec, rows: TokenRows,
        row_seeds: Callable[[], list[int]] | None = None, **extras,
    ) -> Reduction:
        replay = getattr(run, "replay", None)
        if replay is not None and stage.name in replay:
            return replay[stage.name]
        ctx = ScoreContext(
            stage=stage,
            tokens=rows,
            generator=run.generator,
            stage_index=self._stage_index(stage),
            state=run.strategy_state,
            row_seeds=row_seeds,
            annotations=self.annotations.get(),
            diagnostics=run.diagnostics,
            **extras,
        )
        reduction = self.strategy.reduce(ctx)
        check_reduction(self.strategy.name, reduction, rows)
        if isinstance(run, PruneRun):
            run.reductions[stage.name] = reduction
        budget = rows.budget
        if self.masking is not None and self.masking.adaptive_budget and stage == self.mask:
            # The strategy chose each row's count: 1..valid tokens.
            budget = (reduction.keep >= 0).sum(-1)
            if bool((budget < 1).any() | (budget > rows.valid.sum(-1)).any()):
                raise RuntimeError(f"{self.strategy.name} kept no token, or more than the valid ones, of a row")
        expected = torch.arange(reduction.keep.shape[1], device=budget.device)[None, :] < budget[:, None]
        if not torch.equal(reduction.keep >= 0, expected):
            row = int((reduction.keep >= 0).ne(expected).any(-1).nonzero()[0])
            raise RuntimeError(f"{self.strategy.name} did not keep exactly the budget of every row: row {row} keeps "
                               f"{int((reduction.keep[row] >= 0).sum())} tokens where its budget is {int(budget[row])} "
                               "(the first that many columns of keep, -1 after them)")
        return reduction

    # --- vision site ----------------------------------------------------------------------------
    def run_vision_stage(
        self, images: ImageRun, stage: StageSpec, hidden: torch.Tensor, first_candidate: int, grid: Grid,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prune (or merge) the encoder tokens of every crop to the same count (the encoder batches
        crops).

        ``hidden`` is ``[C, T, d]``; tokens before ``first_candidate`` (CLS, registers) are always
        kept. A candidate that never reaches the LLM (cut by LLaVA-NeXT's unpadding) ranks last.
        ``keys`` (``[C, T, head_dim]``, stages inside a block) are the block attention's keys.
        """
        crops = hidden.shape[0]
        candidates = hidden[:, first_candidate:]
        full = images.candidate_local.shape[1]
        if images.vision_positions is None:
            images.vision_positions = torch.arange(full, device=hidden.device).expand(crops, -1)
        positions = images.vision_positions
        counts = {stage.crop_budget(full, images.images[i].num_tokens) for i in images.crop_image.tolist()}
        if len(counts) != 1:
            raise ValueError(
                "at the vision site every crop keeps the same number of tokens, but keep_tokens gives "
                "images of different sizes different fractions; use keep=<fraction> instead"
            )
        budget = counts.pop()
        if budget > candidates.shape[1]:
            raise ValueError(
                f"the budget ({budget} tokens per crop) exceeds the {candidates.shape[1]} tokens left in "
                f"the vision encoder at {stage.name}; lower keep/keep_tokens"
            )
        local = torch.gather(images.candidate_local.to(hidden.device), 1, positions)
        valid = local >= 0
        rows = TokenRows(
            features=candidates,
            valid=valid,
            budget=torch.full((crops,), budget, dtype=torch.long, device=hidden.device),
            sample=images.crop_image.to(hidden.device),  # the image, as samples are not known yet
            grids=[(grid,) if positions.shape[1] == full else None for _ in range(crops)],
            local_index=local,
            sizes=images.sizes().to(hidden.device),
            offset=first_candidate,
        )
        observed = partial(self._vision_observed, images, positions)
        stage_index = self._stage_index(stage)

        def row_seeds() -> list[int]:  # a crop's row: its image, its place in the image, the stage
            crops = [images.images[i].crops for i in images.crop_image.tolist()]
            return [images.row_seed(own, own.index(crop), stage_index) for crop, own in enumerate(crops)]

        extras = {"keys": keys[:, first_candidate:]} if keys is not None else {}
        if images.vision_source is not None:  # the tower's own attention and pixels (VisionZip, VFlowOpt)
            extras["vision_attention"] = images.vision_source.attention
            extras["pixel_patches"] = images.vision_source.pixel_patches
        reduction = self._reduce(images, stage, rows, row_seeds=row_seeds, observed=observed, **extras)
        kept = reduction.features if reduction.features is not None else gather_tokens(candidates, reduction.keep)
        images.follow(reduction)
        images.vision_positions = torch.gather(positions, 1, reduction.keep)
        images.stage_positions[stage.name] = images.vision_positions
        return torch.cat([hidden[:, :first_candidate], kept], dim=1)

    @staticmethod
    def _vision_observed(images: ImageRun, positions: torch.Tensor, layer: int) -> torch.Tensor:
        """The summary observed at vision ``layer`` for each current candidate ``[C, N, k]``."""
        if layer not in images.observed:
            raise vision_not_observed(layer)
        summary, then, first = images.observed[layer]
        summary = summary if summary.dim() == 3 else summary[..., None]
        crops, full = positions.shape[0], images.candidate_local.shape[1]
        if then is None:
            then = torch.arange(summary.shape[1] - first, device=summary.device).expand(crops, -1)
        where = torch.full((crops, full), -1, dtype=torch.long, device=summary.device)
        where.scatter_(1, then, torch.arange(then.shape[1], device=summary.device).expand(crops, -1))
        index = torch.gather(where, 1, positions.to(summary.device))
        picked = gather_tokens(summary[:, first:], index)
        return picked

    def vision_kept_visual(self, run: PruneRun, stages: list[StageSpec] | None = None) -> torch.Tensor:
        """``[B, V]`` True for the sample-level visual tokens that survive the vision stages (``stages``:
        those that ran, when a call stopped early; default every one); records each one's selection."""
        kept = None
        for stage in self.stages_at("vision") if stages is None else stages:
            kept = self._landed(run, run.image_run.stage_positions[stage.name])
            for sample in range(run.batch_size):
                run.record(stage, sample, torch.nonzero(kept[sample]).squeeze(-1))
        return kept

    @staticmethod
    def _landed(run: PruneRun, positions: torch.Tensor) -> torch.Tensor:
        """Visual tokens reached by the encoder tokens at ``positions``: a token survives when any of
        its sources does (its token map), and a token with no source (NeXT's newline) when any token
        since the previous such one does. Prefix tokens the projector reads (the CLS token under
        ``vision_feature_select_strategy='full'``) stay, as the encoder kept them."""
        visual, images = run.visual, run.image_run
        width = max(visual.visual_count(b) for b in range(visual.batch_size))
        kept = torch.zeros(visual.batch_size, max(width, 1), dtype=torch.bool)
        present = images.kept_slots(positions)
        for image in visual.images:  # an encoded image may be placed in several samples (beam search)
            local = separators_follow_their_runs(image.token_map.reached(present), image.token_map.has_origin)
            kept[image.sample, image.offset : image.offset + image.num_tokens] = local
        return kept

    # --- projector and LLM sites ----------------------------------------------------------------
    @staticmethod
    def _projector_rows(run: PruneRun, row_image: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """``[R, N, d_vision]``: each candidate's projector input (for a token mixed from several
        encoder tokens, the weighted mean of theirs); zeros for tokens with no encoder origin."""
        table = run.image_run.projector_table if run.image_run is not None else None
        if table is None:
            raise ValueError("projector inputs were not captured; declare Signal('projector_input') in needs()")
        images = run.visual.images
        unit = run.image_run.projector_unit
        out = table.new_zeros(*local.shape, table.shape[-1] * unit)
        for r, i in enumerate(row_image.tolist()):
            ok = local[r] >= 0
            token_map = images[i].token_map
            if unit == 1:
                rows = token_map.gather(table)
            else:  # a merging projector reads each token's encoder tokens concatenated (Qwen's merger)
                index = token_map.index.to(table.device)
                rows = (table[index.clamp(min=0)] * (index >= 0)[..., None]).reshape(index.shape[0], -1)
            out[r, ok] = rows[local[r, ok].to(table.device)]
        return out

    @staticmethod
    def _vision_rows(run: PruneRun, row_image: torch.Tensor, local: torch.Tensor, layer: int) -> torch.Tensor:
        """At the projector site: the summary observed at vision ``layer`` for each candidate
        ``[R, N, k]``, through the encoder token each candidate came from (zeros for tokens with no
        encoder candidate: NeXT's newlines, the CLS token under ``vision_feature_select_strategy='full'``)."""
        images = run.image_run
        if images is None or layer not in images.observed:
            raise vision_not_observed(layer)
        summary, then, first = images.observed[layer]
        summary = summary if summary.dim() == 3 else summary[..., None]
        candidates = summary[:, first:]
        crops, full = images.candidate_local.shape
        width = candidates.shape[-1]
        if then is not None:  # a vision stage ran before this layer: put the survivors back in place
            places = then.to(candidates.device)[..., None].expand(-1, -1, width)
            candidates = candidates.new_zeros(crops, full, width).scatter(1, places, candidates)
        return Pruner._crop_rows(run, row_image, local, candidates)

    @staticmethod
    def _crop_rows(run: PruneRun, row_image: torch.Tensor, local: torch.Tensor, table: torch.Tensor, fill=0.0):
        """A per-crop patch table ``[C, P, ...]`` (patches in encoder order, CLS excluded) mapped onto
        the candidate rows ``[R, N, ...]`` through each image's token map (a weighted mean where a
        token mixes several patches); ``fill`` where a candidate has no patch behind it."""
        images = run.image_run
        crops, patches = images.candidate_local.shape
        per, first = images.tokens_per_crop, images.first_patch_slot
        flat = table.reshape(crops * patches, *table.shape[2:])
        out = torch.full((*local.shape, *table.shape[2:]), float(fill), dtype=table.dtype, device=table.device)
        for r, i in enumerate(row_image.tolist()):
            token_map = run.visual.images[i].token_map
            crop, slot = token_map.index.div(per, rounding_mode="floor"), token_map.index % per
            patch = slot - first
            usable = (token_map.index >= 0) & (patch >= 0) & (patch < patches)
            patch_map = type(token_map)(torch.where(usable, crop * patches + patch, -1), token_map.weight)
            has_patch = usable.any(dim=1)
            ok = (local[r] >= 0).cpu()
            tokens = local[r].cpu()[ok]
            values = patch_map.gather(flat)[tokens.to(flat.device)]
            keep = has_patch[tokens].to(values.device)
            shape = (-1, *([1] * (values.dim() - 1)))
            out[r, ok.to(out.device)] = torch.where(keep.view(shape), values, torch.as_tensor(fill, dtype=values.dtype, device=values.device))
        return out

    def run_sequence_stage(
        self,
        run: PruneRun,
        stage: StageSpec,
        layout: SequenceLayout,
        hidden: torch.Tensor,
        attention: Callable[..., torch.Tensor] | None = None,
        projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> StageResult:
        """Prune the visual slots of ``layout`` (hidden states ``[B, L, d]``) to each image's budget.

        ``attention(query, layer)``, when given, returns ``[B, H, Q, L]`` probabilities over the
        layout's slots; strategies get it restricted to each row's visual tokens.
        """
        slot_index, row_image, row_sample = layout.visual_rows()
        valid = slot_index >= 0
        safe = slot_index.clamp(min=0)
        features = candidate_features(hidden, slot_index, row_sample, valid)
        images = run.visual.images
        original = torch.tensor([images[int(i)].num_tokens for i in row_image.tolist()], device=hidden.device)
        current = valid.sum(-1)
        budget = torch.tensor(
            [stage.budget(int(n)) for n in original.tolist()], dtype=torch.long, device=hidden.device
        )
        too_big = budget > current
        if bool(too_big.any()):
            r = int(too_big.nonzero()[0])
            raise ValueError(
                f"the budget ({int(budget[r])} tokens) exceeds the {int(current[r])} visual tokens of image "
                f"{int(row_image[r])} at {stage.name}; lower keep/keep_tokens (at most "
                f"{int(current[r])}, or keep=1.0 for all)"
            )
        grids = [
            images[int(i)].grids if int(c) == int(o) else None
            for i, c, o in zip(row_image.tolist(), current.tolist(), original.tolist())
        ]
        offsets = torch.tensor([images[int(i)].offset for i in row_image.tolist()], device=hidden.device)
        local = torch.where(valid, layout.visual_index[row_sample[:, None], safe] - offsets[:, None], -1)
        rows = TokenRows(features, valid, budget, row_sample, grids, local)
        row_attention = None
        if attention is not None:

            def row_attention(query: str = "last", layer: str = "previous") -> torch.Tensor:
                return candidate_attention(attention(query=query, layer=layer), row_sample, slot_index)

        extras = {"attention": row_attention}
        if stage.site == "projector":  # no LLM layer has run yet: observations are the vision encoder's
            extras["observed"] = partial(self._vision_rows, run, row_image, local)
        else:
            observations = LLMObservations(run, layout, slot_index, row_sample)
            extras["observed"] = observations.observed
            extras["observed_attention"] = observations.observed_attention
        if projector is not None:
            extras["projector"] = projector
            extras["projector_input"] = self._projector_rows(run, row_image, local)
        source = run.image_run.vision_source if run.image_run is not None else None
        if source is not None:
            extras["vision_attention"] = source.attention
            extras["pixel_patches"] = source.pixel_patches
            extras["from_crops"] = partial(self._crop_rows, run, row_image, local)
        stage_index = self._stage_index(stage)

        def row_seeds() -> list[int]:  # an image's row: the image, the stage
            return [run.image_run.row_seed(images[int(i)].crops, stage_index) for i in row_image.tolist()]

        reduction = self._reduce(run, stage, rows, row_seeds=row_seeds, **extras)
        self._follow_holders(run, reduction, local, row_image)
        kept_valid = reduction.keep >= 0
        kept_slots = torch.gather(slot_index, 1, reduction.keep.clamp(min=0))
        sample_of = row_sample[:, None].expand_as(kept_slots)
        keep = layout.image_index < 0
        keep[sample_of[kept_valid], kept_slots[kept_valid]] = True
        if reduction.features is not None:
            hidden = hidden.clone()
            hidden[sample_of[kept_valid], kept_slots[kept_valid]] = reduction.features[kept_valid].to(hidden.dtype)
        new_layout, index = layout.compact(keep)
        if renumbers(self.config.positions, stage.site):
            new_layout = new_layout.renumbered()
        for sample in range(run.batch_size):
            visual = new_layout.visual_index[sample]
            run.record(stage, sample, visual[visual >= 0])
        return StageResult(new_layout, gather_tokens(hidden, index), index if reduction.features is None else None)

    @staticmethod
    def _follow_holders(run: PruneRun, reduction: Reduction, local: torch.Tensor, row_image: torch.Tensor) -> None:
        """Move each image's :attr:`PruneRun.holders` through one stage: a token goes to the kept token
        its holder was merged into (``Reduction.merged_into``) or kept as, and is dropped otherwise."""
        keep = reduction.keep
        kept_local = torch.where(keep >= 0, torch.gather(local, 1, keep.clamp(min=0)), -1)
        into = reduction.columns(local.shape[1]).to(local.device)
        holder = torch.where(into >= 0, torch.gather(kept_local, 1, into.clamp(min=0)), -1)
        for r, i in enumerate(row_image.tolist()):
            n = run.visual.images[i].num_tokens
            step = torch.full((n,), -1, dtype=torch.long)
            ok = (local[r] >= 0).cpu()
            step[local[r].cpu()[ok]] = holder[r].cpu()[ok]
            previous = run.holders.get(i, torch.arange(n))
            run.holders[i] = torch.where(previous >= 0, step[previous.clamp(min=0)], -1)

    def run_mask_stage(
        self,
        run: PruneRun,
        stage: StageSpec,
        layout: SequenceLayout,
        hidden: torch.Tensor,
        attention: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Decide the strategy's mask stage on ``layout`` (hidden states ``[B, L, d]`` at the input of
        ``stage.layer``) once the prefill has run: the strategy keeps, per image, the tokens text may
        still attend to, exactly as at an ``"llm"`` stage (recorded for ``vtoken.selection``). Returns
        ``[B, L]``: True for the visual slots of ``layout`` that text may no longer attend to."""
        kept = self.run_sequence_stage(run, stage, layout, hidden, attention).layout
        present = torch.zeros(layout.valid.shape[0], max(run.orig_length, 1), dtype=torch.bool, device=layout.valid.device)
        rows_b, slots = (kept.orig_index >= 0).nonzero(as_tuple=True)
        present[rows_b, kept.orig_index[rows_b, slots]] = True
        still = torch.gather(present, 1, layout.orig_index.clamp(min=0))
        return (layout.image_index >= 0) & layout.valid & (layout.orig_index >= 0) & ~still


def same_feature(mine: torch.Tensor, other: torch.Tensor) -> bool:
    """``other`` is the feature tensor ``mine``: the same object, or equal values (moved, or
    repeated by ``generate`` for beam search)."""
    if mine is other:
        return True
    return mine.shape == other.shape and torch.equal(mine, other.to(mine.device, mine.dtype))
