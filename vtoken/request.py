"""The state of one request: an encoding of its images (:class:`ImageRun`) and its prefill through
its decoding steps (:class:`PruneRun`). Both are reached by the adapter's hooks through the pruner
(per thread), never stored on a strategy or on transformers' objects.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Callable

import torch

from vtoken.config import PruneConfig, StageSpec
from vtoken.fingerprint import update_with_tensor
from vtoken.layout import SequenceLayout


class ImageRun:
    """One call of the vision encoder: its images (image-local token structure) and what the
    vision-site stages kept of every crop.

    It is separate from :class:`PruneRun` because ``generate`` encodes the images before the first
    forward; the forward then picks up the encoding it is handed.
    """

    def __init__(
        self, images: list, candidate_local: torch.Tensor, config: PruneConfig,
        crop_pixels: Callable[[], torch.Tensor] | None = None, tokens_per_crop: int | None = None,
    ):
        self.images = images
        #: The kind of visual input encoded (``"image"``, ``"video"``: ``Modality.name``).
        self.modality = "image"
        #: Tokens of one crop the projector reads (slots ``crop * tokens_per_crop + token``).
        self.tokens_per_crop = tokens_per_crop if tokens_per_crop is not None else candidate_local.shape[1]
        self.seed = config.seed
        #: ``[C, ...]`` the pixels of every crop in encoder order (for per-image seeds), when known.
        self.crop_pixels = crop_pixels
        self._pixels: torch.Tensor | None = None
        self._keys: dict[tuple[int, ...], int] = {}
        #: ``[C, P]`` image-local token index each encoder candidate (non-CLS token) lands on, or -1.
        self.candidate_local = candidate_local
        self.crop_image = torch.empty(candidate_local.shape[0], dtype=torch.long)
        for i, image in enumerate(images):
            self.crop_image[image.crops] = i
        self.generator = torch.Generator().manual_seed(config.seed)
        #: For each crop, the candidate index of each token still in the encoder (None: no vision stage ran).
        self.vision_positions: torch.Tensor | None = None
        #: ``[C, P]``: for each patch of each crop, the current encoder candidate that holds it (a
        #: merged token holds several), -1 once dropped; None while no vision stage has run.
        self.owner: torch.Tensor | None = None
        #: ``(rows, cols)`` of the patch grid of this call's crops, where it differs from the family's
        #: default (a vision-only model run at another image size); None otherwise.
        self.grid: tuple[int, int] | None = None
        #: The proportional-attention bias of the current tokens with the ``owner`` and
        #: ``vision_positions`` it was built from (they change only at a stage, so every block
        #: between two stages reuses it); None before the first.
        self.size_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        #: ``vision_positions`` after each vision stage, by stage name.
        self.stage_positions: dict[str, torch.Tensor] = {}
        #: Vision layer -> (per-token summary ``[C, T, k]``, candidate positions then, first candidate).
        self.observed: dict[int, tuple] = {}
        #: ``[C * tokens_per_crop, d_vision]``: the projector input of every crop token (when asked for).
        self.projector_table: torch.Tensor | None = None
        #: Encoder tokens one LLM token's projector input concatenates (``ProjectorSpec.unit``).
        self.projector_unit = 1
        #: ``[C * tokens_per_crop, d_llm]``: every crop token's projected features in grid places, kept
        #: after a vision stage when an image's tokens mix several encoder tokens (re-weighted later).
        self.projected: torch.Tensor | None = None
        #: Set when the projector's output after a vision stage is only the kept rows, which the
        #: family's packing then places itself (``VisionLanguageAdapter._packing_of_kept_rows``).
        self.kept_rows_pending = False
        # The features object this encoding returned (:attr:`output`), held weakly: the pruner keeps
        # this run for as long as that object lives (``Pruner.remember_encoding``), so a strong
        # reference here would keep both alive for good, and with them the model.
        self._output: weakref.ref | None = None
        #: The per-image tensors of :attr:`output`, to recognise them when a forward receives them.
        self.features: list[torch.Tensor] = []
        #: Set by the adapter for strategies that read the encoder itself (VFlowOpt): an object with
        #: ``attention(layer)`` (a :class:`~vtoken.context.VisionAttention`) and ``pixel_patches()``.
        self.vision_source = None
        #: The adapter's per-call scratch (a packed tower's current sequence, :mod:`vtoken.adapters.qwen_vision`).
        self.family_state: dict = {}
        #: The strategy's per-request scratch (``ScoreContext.state``), shared by every stage.
        self.strategy_state: dict = {}
        #: Stage name -> what the strategy reported (``ScoreContext.report``) at the vision stages.
        self.diagnostics: dict = {}
        #: The last fresh prefill this encoding served (see :class:`Served`), for replays.
        self.served: Served | None = None

    @property
    def output(self):
        """The features object this encoding returned, while it lives (None after)."""
        return self._output() if self._output is not None else None

    @output.setter
    def output(self, value) -> None:
        self._output = weakref.ref(value) if value is not None else None

    @property
    def first_patch_slot(self) -> int:
        """The slot of a crop's first patch among the tokens the projector reads."""
        return self.tokens_per_crop - self.candidate_local.shape[1]

    def follow(self, reduction) -> None:
        """Move :attr:`owner` through one vision stage's :class:`~vtoken.context.Reduction`: a patch
        goes to the kept token its holder was merged into (``merged_into``) or is kept as (plain
        pruning), and is dropped with its holder otherwise."""
        keep = reduction.keep
        crops = keep.shape[0]
        current = self.vision_positions.shape[1] if self.vision_positions is not None else self.candidate_local.shape[1]
        slot_of = reduction.columns(current)
        owner = self.owner
        if owner is None:
            owner = torch.arange(self.candidate_local.shape[1], device=keep.device).expand(crops, -1)
        owner = owner.to(keep.device)
        self.owner = torch.where(owner >= 0, torch.gather(slot_of, 1, owner.clamp(min=0)), -1)

    def sizes(self) -> torch.Tensor:
        """``[C, N]`` float: how many patches each current encoder candidate holds (1 each before any
        merge; a pruned token's patches are gone, so a kept token holds only its own)."""
        current = self.vision_positions.shape[1] if self.vision_positions is not None else self.candidate_local.shape[1]
        crops = self.candidate_local.shape[0]
        if self.owner is None:
            return torch.ones(crops, current)
        owner = self.owner
        counts = torch.zeros(crops, current + 1, device=owner.device)
        counts.scatter_add_(1, torch.where(owner >= 0, owner, current), torch.ones_like(owner, dtype=counts.dtype))
        return counts[:, :current]

    def kept_slots(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``[C * tokens_per_crop]`` bool: the encoder slots present when each crop holds the
        candidates at ``positions`` (default: what the vision stages left; every slot when none ran).
        Prefix slots the projector reads (CLS under 'full') always stay."""
        positions = self.vision_positions if positions is None else positions
        crops, first = self.candidate_local.shape[0], self.first_patch_slot
        if positions is None:
            return torch.ones(crops * self.tokens_per_crop, dtype=torch.bool)
        kept = torch.zeros(crops, self.tokens_per_crop, dtype=torch.bool)
        kept[:, : max(first, 0)] = True
        kept.scatter_(1, positions.cpu() + first, True)
        return kept.view(-1)

    def image_key(self, crops: list[int]) -> int:
        """A fingerprint of one image's own pixels (the encoder crops it came from), so that a seed
        derived from it depends on the image and never on the batch it is in."""
        crops = tuple(crops)
        if crops not in self._keys:
            if self.crop_pixels is None:
                raise ValueError("this encoding has no pixels to derive per-image seeds from")
            if self._pixels is None:
                self._pixels = self.crop_pixels()
            # Each crop's own pixels (a family whose crops differ in size hands a list), so the key
            # never depends on the padding a batch adds; each reduced where it lies (fingerprint.py).
            digest = hashlib.blake2b(digest_size=8)
            for c in crops:
                update_with_tensor(digest, self._pixels[c])
            self._keys[crops] = int.from_bytes(digest.digest(), "little")
        return self._keys[crops]

    def row_seed(self, crops: list[int], *place: int) -> int:
        """The seed of a row of the image behind ``crops`` (see :func:`row_seed`)."""
        return row_seed(self.seed, self.image_key(crops), *place)

    def replay_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict | None:
        """The reductions of the prefill this encoding served last, when ``input_ids`` (and the mask)
        continue that prefill's prompt row by row: ``generate`` without a KV cache re-runs the whole
        sequence at each step, and each such step must prune exactly as the first did."""
        served = self.served
        if served is None or input_ids.shape[0] != served.input_ids.shape[0]:
            return None
        length = served.input_ids.shape[1]
        if input_ids.shape[1] <= length or not torch.equal(input_ids[:, :length], served.input_ids):
            return None
        if (attention_mask is None) != (served.attention_mask is None):
            return None
        if attention_mask is not None and not torch.equal(attention_mask[:, :length].bool(), served.attention_mask):
            return None
        return served.reductions


def row_seed(seed: int, image_key: int, *place: int) -> int:
    """A 63-bit seed from the config's seed, an image's fingerprint and the row's place (crop within
    the image, stage index)."""
    text = ":".join(str(v) for v in (seed, image_key, *place)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def renumbers(positions: str, site: str) -> bool:
    """Whether a stage at ``site`` renumbers the kept tokens under position mode ``positions``."""
    return positions == "contiguous" or (positions == "pre_llm" and site in ("vision", "projector"))


class Served:
    """A fresh prefill an encoding served: its prompt (``input_ids`` and the boolean attention mask)
    and every stage's reduction, by stage name."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, reductions: dict):
        self.input_ids = input_ids
        self.attention_mask = attention_mask.bool() if attention_mask is not None else None
        self.reductions = reductions


class TextOnlyPrefill:
    """The record of a prefill that had no visual input and passed through unpruned
    (``text_only="passthrough"``, or image tokens without pixels, which are text to the model): what
    ``vtoken.selection`` / ``diagnostics`` / ``show`` report after it, so they describe that prefill
    (nothing kept, nothing reported) instead of an earlier request's. Each sample reads as a sample
    without images in a batch with some: every stage, each keeping nothing."""

    class _NoVisuals:
        images: tuple = ()

    def __init__(self, batch_size: int, stages: list[str]):
        self.visual = self._NoVisuals()
        self.selections: list[dict[str, torch.Tensor]] = [
            {name: torch.zeros(0, dtype=torch.long) for name in stages} for _ in range(batch_size)
        ]
        self.diagnostics: dict[str, dict[str, torch.Tensor]] = {}
        self.groups: list = []  # no layer group changed the sequence: labels and logits are the prompt's
        self.prompt_groups = None  # (as a PruneRun's: no mask stage compacted decoding's layout)


class PruneRun:
    """One request, from its prefill through its decoding steps.

    Attached to the request's KV cache after prefill, so concurrent generations with different caches
    never share state, and a step without a cache starts afresh.
    """

    def __init__(self, visual, config: PruneConfig, image_run: ImageRun | None = None):
        self.visual = visual
        self.image_run = image_run
        #: After the prefill, where a vision stage ran: ``(owner, vision_positions, candidate_local)`` of
        #: its encoding (:class:`ImageRun`), for ``show`` to tint what each merged token holds.
        self.vision_merges: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.prefill = True
        self.generator = image_run.generator if image_run is not None else torch.Generator().manual_seed(config.seed)
        #: (first LLM layer, layout) per layer group, in order; group 0 starts at layer 0.
        self.groups: list[tuple[int, SequenceLayout]] = []
        #: The groups the prompt's own forward ran with, once a mask stage has set decoding's layout
        #: apart from them (AIF's eviction compacts what decoding reads, not the prompt's slots): the
        #: slots that forward's logits and labels cover. None while ``groups`` are those.
        self.prompt_groups: list[tuple[int, SequenceLayout]] | None = None
        #: Image (index in ``visual.images``) -> ``[V]``: for each of its visual tokens, the image-local
        #: index of the kept token that holds it after the projector and LLM stages (a merged token
        #: holds several: pool's windows), -1 once dropped; absent while no such stage ran.
        self.holders: dict[int, torch.Tensor] = {}
        #: Per sample: stage name -> kept sample-level visual indices (ascending).
        self.selections: list[dict[str, torch.Tensor]] = [{} for _ in range(visual.batch_size)]
        self.orig_length = 0
        #: ``[B]``: the largest position id of each sample's prompt, unwrapped (renumbering shifts the
        #: positions of generated tokens by what it took off it).
        self.orig_max_position: torch.Tensor | None = None
        #: ``[B, k]``: the ids of each sample's last prompt token, unwrapped (every row of an M-RoPE form).
        self.orig_last_position: torch.Tensor | None = None
        #: True while decoding steps take M-RoPE ids the caller numbered from the unpruned prompt
        #: (``generate``'s own, continuing from the last token's ids).
        self.decode_ids_from_caller = False
        self.seen = 0
        # Set at each decoding step: the attention-mask columns and position ids of the new tokens.
        self.new_mask: torch.Tensor | None = None
        self.new_positions: torch.Tensor | None = None
        #: LLM layer -> (per-token summary ``[B, L, k]``, the layout of that layer).
        self.observed: dict[int, tuple] = {}
        # Per forward: layer-group kwargs already built, layer inputs kept for scoring.
        self.group_kwargs: dict[int, dict] = {}
        #: Per forward: the slots each layer of a static KV cache holds (its masks span them all), or
        #: None for a growing cache.
        self.static_capacity: int | None = None
        self.stash: dict[int, tuple] = {}
        #: LLM layer -> the keys scoring projected there, for the layer itself
        #: (:class:`~vtoken.adapters.key_reuse.PendingKeys`).
        self.reused_keys: dict[int, object] = {}
        #: LLM layer -> (``observe_attention``'s summary ``[B, L, k]``, the layout of that layer).
        self.attention_observed: dict[int, tuple] = {}
        #: LLM layer -> its own query projection of every slot ``[B, L, heads * head_dim]`` (before
        #: any q norm and the rotary), kept from its attention's ``q_proj`` until its observed
        #: attention takes the query rows from it.
        self.layer_queries: dict[int, torch.Tensor] = {}
        #: Set while the adapter runs an extra pass of the LLM inside a prefill for a mask stage:
        #: ``"next"`` (the probe decoding step) or ``"recompute"`` (the masked text rows).
        self.side_pass: str | None = None
        #: During ``"recompute"``: the rerun (:class:`~vtoken.adapters.mask_stage.Recompute`).
        self.recompute: tuple | None = None
        #: True when this prefill decides its mask stage at the stage's layer and runs masked from there
        #: (:meth:`~vtoken.adapters.mask_stage.MaskStagePass.decides_in_pass`), False for probe-then-rerun.
        self.mask_in_pass = False
        #: The mask stage decided in the pass (:class:`~vtoken.adapters.mask_stage.DecidedInPass`),
        #: once its layer's input was reached.
        self.decided_mask: tuple | None = None
        #: True once a stage at layer 0 changed the layout of layer group 0 (:meth:`decode_from`):
        #: decoding masks and positions then come from it.
        self.input_layout_changed = False
        #: True when the adapter added a KV cache the caller did not ask for (a mask stage reuses the
        #: prefix's KV); it is not returned.
        self.cache_added = False
        #: The strategy's per-request scratch (``ScoreContext.state``); emptied when the prefill ends.
        self.strategy_state: dict = image_run.strategy_state if image_run is not None else {}
        #: Stage name -> the :class:`Reduction` this prefill applied (its rows in layout order).
        self.reductions: dict = {}
        #: Stage name -> what the strategy reported (``ScoreContext.report``), for ``vtoken.diagnostics``.
        self.diagnostics: dict = dict(image_run.diagnostics) if image_run is not None else {}
        #: Set when this prefill continues the prompt of one its encoding served before (``generate``
        #: without a cache): stage name -> the reduction to apply again instead of scoring.
        self.replay: dict | None = None
        #: The prompt of this prefill (``input_ids``, ``attention_mask``), recorded for replays.
        self.prompt: tuple | None = None
        #: When the prefill's input runs past the prompt ``generate`` was given (assisted decoding
        #: feeds candidate tokens with it): the prompt's length, so scoring reads only its rows.
        self.prompt_end: int | None = None
        #: The ``generate`` call that ran this prefill (``Pruner.generate_call``; None outside one): its
        #: decoding steps carry position ids it numbered from the whole, unpruned prompt.
        self.generate_call: object | None = None
        #: ``[B, L]`` which tokens of the prompt entered the model, when only the ones the vision
        #: stages kept did (``VisionLanguageAdapter._enter_kept_tokens``); None when the whole prompt did.
        self.entered: torch.Tensor | None = None
        #: The LLM's per-token inputs besides its embeddings that the forward derives from the whole
        #: prompt (Qwen3-VL's DeepStack features and their positions), for a prefill fed only the kept
        #: tokens: handed to the LLM in the forward's place (``DecoderPruning._before_lm``).
        self.entered_inputs: dict[str, object] = {}

    @property
    def batch_size(self) -> int:
        return self.visual.batch_size

    def end_prefill(self) -> None:
        """Drop what only the prefill needed (layer inputs, observations, image features), so the
        run that rides on the KV cache through decoding stays small."""
        self.prefill = False
        self.stash.clear()
        self.reused_keys.clear()
        self.observed.clear()
        self.attention_observed.clear()
        self.layer_queries.clear()
        self.strategy_state.clear()
        if self.image_run is not None:
            images = self.image_run
            if images.owner is not None and images.vision_positions is not None:
                # what show() draws of a vision stage's merges (small: [crops, patches] each)
                self.vision_merges = (images.owner, images.vision_positions, images.candidate_local)
            # The encoding keeps what a replay needs for as long as it lives (generate holds it for the
            # whole call); the run that rides on the KV cache lets go of it.
            if self.replay is None and self.prompt is not None:
                self.image_run.served = Served(*self.prompt, self.reductions)
            self.image_run = None

    def decode_from(self, layout: SequenceLayout) -> None:
        """Make ``layout`` the input layout decoding continues from: a stage at layer 0 (a pruning
        stage, a mask stage) changed what every layer holds, so each step's mask and positions are
        rebuilt from it at the model's input, as for a stage before the LLM."""
        self.groups[0] = (0, layout)
        self.input_layout_changed = True

    def drop_prompt_tail(self, cut: int) -> None:
        """Forget the last ``cut`` tokens of the prefill: assisted and prompt-lookup decoding feed
        candidate tokens after the prompt in the first forward, and generate crops the rejected ones
        from the cache. They are the sequence's last tokens (text, never pruned), so they are the last
        slots of every layout; their positions ran on by one each from the prompt's last."""
        length = self.orig_length - cut
        self.groups = [(first, layout.without_last(cut)) for first, layout in self.groups]
        if self.prompt_groups is not None:
            self.prompt_groups = [(first, layout.without_last(cut)) for first, layout in self.prompt_groups]
        self.orig_length = self.seen = length
        self.orig_max_position = self.orig_max_position - cut
        self.orig_last_position = self.orig_last_position - cut
        if self.prompt is not None:
            ids, mask = self.prompt
            self.prompt = (ids[:, :length], None if mask is None else mask[:, :length])

    def group_for(self, layer: int) -> tuple[int, SequenceLayout]:
        current = self.groups[0]
        for first, layout in self.groups:
            if first <= layer:
                current = (first, layout)
        return current

    def record(self, stage: StageSpec, sample: int, indices: torch.Tensor) -> None:
        self.selections[sample][stage.name] = torch.sort(indices.cpu()).values
