"""The one pipeline that realises the pruning sites on every vision-language family.

A family adapter subclasses :class:`VisionLanguageAdapter` and supplies what is its own: its
:class:`~vtoken.adapters.base.FamilyDescription` (vision blocks, projector, decoder, position scheme,
gaps), the token map of each image for a given input (:meth:`image_infos`), the pixels of each crop,
and the names of its encoder entry point and placeholder token. Everything else is here, once:

- the encoder entry (``get_image_features``) is wrapped to open an :class:`~vtoken.request.ImageRun`
  (the encoding's per-request state) and register it by the identity of the features it returns;
- a pre-hook on the model opens the request's :class:`~vtoken.request.PruneRun` and places each
  image's tokens in its sample (:meth:`visual_layout`);
- vision-site stages shorten each crop's sequence after a vision block. Where each LLM token is one
  encoder token's (LLaVA-1.5, NeXT, OneVision below the AnyRes-Max limit), the family's packing is
  handed the kept projected rows and places them itself, and the model is handed the kept tokens'
  embeddings alone (text and features, as its forward would build them), so nothing of a dropped
  token is built; otherwise the projector's output is put back in grid places, the family's own
  packing runs unchanged, and the dropped tokens are removed in front of the LLM (tokens of a
  weighted map are re-weighted over their kept sources);
- the projector site and the LLM site run in :class:`~vtoken.adapters.hf_decoder.DecoderPruning`;
- the signals a strategy declares (:mod:`vtoken.signals`) are captured by hooks installed only when
  declared: observed blocks, a vision block's attention input, the projector input, the pixels.

Every hook reaches the request through the pruner's per-thread route (``pruner.encoding`` during an
encoder call, ``pruner.active`` during a forward); nothing per-request is stored on a module.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
from abc import abstractmethod
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from .base import Adapter, FamilyDescription, ImageInfo, Modality, UndoStack, VisualLayout, eager, move_hooks_last
from .generate_call import check_mask_shape, install_generate_wrapper
from .hf_decoder import DecoderPruning, padding_from_4d_mask
from .outer_call import may_drop_tokens, misaligned_outer_argument
from .vision_site import VisionSite, VisionSource
from vtoken import compat, signals
from vtoken.kernels import compact_index, gather_tokens
from vtoken.layout import SequenceLayout
from vtoken.projector_parts import two_layer_projector
from vtoken.pruner import Pruner, same_feature
from vtoken.request import ImageRun, PruneRun, TextOnlyPrefill, renumbers


#: What an LLM under a LLaVA family may lack for the methods that read its attention rows (the
#: backbone is the checkpoint's choice): :meth:`VisionLanguageAdapter.unavailable` and ``validate``
#: name the model's reason at wrap; ``vtoken.methods()`` lists it as those families' limits. Fused qkv
#: projections (Phi-3) and soft-capped logits (Gemma2) are recomputed as the model computes them.
LLM_ATTENTION_LIMITS = {
    signal: "not on an LLM that rotates each layer type with its own rotary embedding (Gemma3), nor on one "
            "whose attention has neither q_proj and k_proj nor a fused qkv_proj"
    for signal in (signals.LLM_ATTENTION, signals.LLM_ATTENTION_OBSERVED)
}


class MergingProjectorOnTokens(nn.Module):
    """A merging projector (Qwen-VL's merger: ``unit`` encoder tokens in, one LLM token out) on per-LLM-token
    inputs ``[..., unit * width]``: each token's encoder tokens go in as rows of ``width``. Holds the
    model's projector as its child (no copy), so its parameters are this module's."""

    def __init__(self, projector: nn.Module, width: int) -> None:
        super().__init__()
        self.projector = projector
        self.width = width

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.projector(tokens.reshape(-1, self.width))
        return out.reshape(*tokens.shape[:-1], out.shape[-1])


class VisionLanguageAdapter(VisionSite, Adapter):
    """A family whose images are encoded crop by crop ([crops, tokens, width]), projected token by
    token, placed into placeholder tokens of ``input_ids`` and read by a Llama-style decoder."""

    #: Whether the model's forward embeds ``input_ids`` and scatters the image features into the
    #: placeholders before the LLM (LLaVA, Qwen-VL), so a prefill after a vision stage may be handed
    #: the embeddings of the kept tokens instead (``_enter_kept_tokens``); what else the forward reads
    #: ``input_ids`` for is supplied by ``numbers_whole_prompt`` (Qwen-VL's M-RoPE ids) and
    #: ``whole_prompt_llm_inputs`` (Qwen3-VL's DeepStack inputs).
    embeds_then_scatters: ClassVar[bool] = False

    #: The keyword arguments of the model's forward that its encoder call takes too.
    encoder_kwargs: ClassVar[tuple[str, ...]] = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.core = self.inner_model(model)
        self.config = self.core.config
        self.description: FamilyDescription = self.describe()

    # --- what the family supplies ---------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def inner_model(model: nn.Module) -> nn.Module:
        """The module that owns the encoder entry point and runs vision, projector and LLM."""

    @abstractmethod
    def describe(self) -> FamilyDescription:
        """The family's description (read once, at wrap time)."""

    @abstractmethod
    def image_infos(self, arguments: dict[str, Any]) -> list[ImageInfo]:
        """The token structure of each image of one encoder call (``arguments``: the call's bound
        arguments), not yet placed in a sample."""

    @abstractmethod
    def crop_pixels(self, arguments: dict[str, Any]) -> torch.Tensor:
        """``[C, channels, H, W]``: every crop the encoder sees in this call, in encoder order."""

    @property
    def placeholder_id(self) -> int:
        """The token id the processor repeats once per visual token of an image."""
        return self.config.image_token_id

    def modalities(self) -> tuple[Modality, ...]:
        """The kinds of visual input this family prunes (images; a family with videos adds theirs)."""
        return (Modality("image", "get_image_features", "pixel_values", self.placeholder_id, self.encoder_kwargs,
                         self.image_infos, self.crop_pixels),)

    def vision_site_refusal(self) -> str | None:
        """None when vision-site stages can run on this model, else why not (with the fix)."""
        return None

    def tokens_per_crop_for(self, images: list[ImageInfo]) -> int:
        """Tokens of one crop the projector reads, for the images of one encoder call (fixed for
        most families; a family whose crops vary in size gives the call's largest)."""
        return self.tokens_per_crop

    # --- structure, from the description --------------------------------------------------------
    def projector(self) -> nn.Module:
        return self.description.projector.module

    def language_model(self) -> nn.Module:
        return self.description.decoder.stack

    def decoder_layers(self) -> nn.ModuleList:
        return self.description.decoder.layers

    @property
    def tokens_per_crop(self) -> int:
        return self.description.tokens_per_crop

    def vision_tokens(self) -> int | None:
        return self.description.vision.patches

    def site_width(self, site: str) -> tuple[int, int]:
        if site in ("vision", "projector"):
            return self.description.vision.width, self.description.vision.head_dim
        return self.description.decoder.width, self.description.decoder.head_dim

    def vision_feature_layer(self) -> int | None:
        return self.description.vision.read_layer

    @functools.cached_property
    def _attention_rows_gap(self) -> str | None:
        """Why vtoken cannot recompute this LLM's attention rows (None where it can), read once: AIF
        asks it for each of its per-layer signals. Every layer: an LLM may mix layer types (sliding
        and global, rotary and NoPE)."""
        return next(filter(None, map(compat.attention_rows_gap, self.decoder_layers())), None)

    def unavailable(self, signal) -> str | None:
        gap = self.description.gaps.get(signal.name)
        if gap is not None:
            return gap
        if signal.name == signals.ONE_GRID_PER_IMAGE:
            return self.one_grid_per_image()
        if signal.name == signals.PATCH_GRID:
            return self.incomplete_patch_grid()
        if signal.name == signals.TWO_LAYER_PROJECTOR and two_layer_projector(self.projector_on_tokens()) is None:
            return (f"a {type(self.description.projector.module).__name__} projector of another structure (without "
                    "projector_rank, ZOO-Prune's exact estimator runs on any projector)")
        if signal.name in (signals.LLM_ATTENTION, signals.LLM_ATTENTION_OBSERVED) and self._attention_rows_gap:
            return self._attention_rows_gap
        if signal.name == signals.LLM_OBSERVED and signal.layer is not None and 0 <= signal.layer < len(self.decoder_layers()):
            layer = self.decoder_layers()[signal.layer]
            if compat.decoder_layer_parts(layer) is None:
                return (f"a {type(layer).__name__} whose attention and MLP branches are not one self_attn and one "
                        "mlp module each, whose inputs and outputs vtoken observes")
        vision = self.vision_unavailable(signal)
        if vision is not None:
            return vision
        if signal.layer is not None and signal.name not in signals.VISION_LAYERED:
            depth = len(self.decoder_layers())
            if not 0 <= signal.layer < depth:
                return f"no layer {signal.layer} (it has {depth})"
        return None

    # --- validation -----------------------------------------------------------------------------
    def _refuse_llm_vtoken_cannot_prune(self) -> None:
        """In-LLM stages need every decoder layer to mix tokens through its ``self_attn`` alone, and
        one rotary embedding for every layer: a ValueError naming what this LLM does otherwise."""
        mixers = next(((layer, names) for layer in self.decoder_layers()
                       if (names := compat.other_token_mixers(layer))), None)
        if mixers is not None:
            layer, names = type(mixers[0]).__name__, ", ".join(mixers[1])
            where = ("beside a self_attn and an MLP (a token mixer of another kind, as FalconH1's mamba)"
                     if compat.decoder_has_self_attention(mixers[0]) else "and no self_attn")
            raise ValueError(
                f"this LLM's {layer} runs {names} {where}, which vtoken's in-LLM stages do not prune along; use "
                "a method that prunes before the LLM (site='projector' or 'vision')"
            )
        if compat.rotary_needs_layer_type(self.language_model()):
            raise ValueError(
                f"this LLM ({type(self.language_model()).__name__}) rotates each layer type with its own rotary "
                "embedding (Gemma3's local and global), which vtoken's in-LLM stages do not rebuild yet; use a "
                "method that prunes before the LLM (site='projector' or 'vision')"
            )

    def validate(self, stages: tuple) -> None:
        num_vision = len(self.vision_layers())
        read = self.description.vision.read_layer
        decoder_layers = len(self.decoder_layers())
        if any(stage.site == "llm" for stage in stages):
            self._refuse_llm_vtoken_cannot_prune()
        for stage in stages:
            if stage.site == "llm" and stage.layer >= decoder_layers:
                raise ValueError(
                    f"llm layer {stage.layer} does not exist: the LLM has {decoder_layers} decoder layers "
                    f"(0..{decoder_layers - 1})"
                )
            if stage.site == "vision" and stage.layer >= num_vision:
                raise ValueError(f"vision layer {stage.layer} does not exist: the vision encoder has {num_vision} layers")
            if stage.site == "vision":
                refusal = self.vision_site_refusal()
                if refusal is not None:
                    raise ValueError(refusal)
                if stage.layer >= self.first_read_layer():
                    read = getattr(self.config, "vision_feature_layer", None)
                    fix = (f"use a vision layer <= {self.first_read_layer() - 1}" if self.first_read_layer() > 0 else
                           "no vision layer comes before it, so prune at the projector or in the LLM "
                           "(site='projector' or site='llm')")
                    raise ValueError(
                        f"vision layer {stage.layer} is at or after the layer {self.family_name} reads its features "
                        f"from (layer {self.first_read_layer()}, vision_feature_layer={read}); {fix}"
                    )
            per_image = self.visual_tokens_per_image()
            # A budget the stage cannot meet raises here. AnyRes: an image's token count depends on its
            # size, so only a fraction's per-crop budget is known before a call (a count is checked at it).
            if stage.site == "vision" and self.vision_tokens() is not None and (per_image is not None or stage.keep is not None):
                stage.crop_budget(self.vision_tokens(), per_image or self.vision_tokens())
            if per_image is not None and stage.keep_tokens is not None and stage.keep_tokens > per_image:
                raise ValueError(
                    f"keep_tokens={stage.keep_tokens} is larger than the {per_image} visual tokens of an image; "
                    f"use keep_tokens <= {per_image} (or keep=1.0 to keep all)"
                )

    def first_read_layer(self) -> int:
        """The first vision block (0-based) whose output the projector reads."""
        return self.description.vision.read_layer

    # --- where the visual tokens are ------------------------------------------------------------
    def candidate_local(self, images: list[ImageInfo]) -> torch.Tensor:
        """``[C, P]``: for each encoder candidate (patch token), the image-local LLM token it weighs
        most in, or -1 when it reaches none (cut by unpadding)."""
        crops = sum(len(image.crops) for image in images)
        per = self.tokens_per_crop
        slots = crops * per
        best = torch.full((slots + 1,), -1, dtype=torch.long)  # last entry: "none"
        weight = torch.zeros(slots + 1)
        for image in images:
            index, share = image.token_map.index, image.token_map.weight.float()
            tokens = torch.arange(index.shape[0])[:, None].expand_as(index)
            used = (index >= 0) & (share > 0)
            # Visit entries by increasing weight so the heaviest share of each slot is written last.
            order = torch.argsort(share[used], stable=True)
            best[index[used][order]] = tokens[used][order]
            weight[index[used][order]] = share[used][order]
        patch_slots = torch.arange(self.description.vision.patches) + self.description.first_patch_slot
        crop_base = torch.arange(crops)[:, None] * per
        flat = torch.where(patch_slots[None] >= 0, crop_base + patch_slots[None], slots)
        return best[flat]

    def visual_layout(self, input_ids: torch.Tensor, images: list[ImageInfo], placeholder: int | None = None) -> VisualLayout:
        """Place each image in its sample: image i owns the i-th block of placeholders in flattened
        (batch, position) order, as ``masked_scatter`` fills them."""
        placeholder = self.placeholder_id if placeholder is None else placeholder
        placeholders = (input_ids == placeholder).cpu()
        batch, length = input_ids.shape
        visual_index = torch.where(placeholders, placeholders.long().cumsum(-1) - 1, -1)
        image_index = torch.full((batch, length), -1, dtype=torch.long)
        counts = [image.num_tokens for image in images]
        if sum(counts) != int(placeholders.sum()):
            raise ValueError(
                f"the prompt has {int(placeholders.sum())} image tokens but the images give {sum(counts)} "
                "features; build input_ids and pixel_values with the same processor call"
            )
        flat_rows, flat_pos = placeholders.nonzero(as_tuple=True)
        placed, start = [], 0
        for i, (image, count) in enumerate(zip(images, counts)):
            rows = flat_rows[start : start + count]
            if bool((rows != rows[0]).any()):
                raise ValueError(f"image {i}'s tokens straddle two samples of the batch; check the prompts")
            image_index[rows, flat_pos[start : start + count]] = i
            sample = int(rows[0])
            offset = int(visual_index[sample, flat_pos[start]])
            placed.append(dataclasses.replace(image, sample=sample, offset=offset))
            start += count
        return VisualLayout(visual_index, image_index, placed, self.tokens_per_crop)

    # --- hooks ----------------------------------------------------------------------------------
    def install(self, pruner: Pruner, undo: UndoStack) -> None:
        self.pruner = pruner
        self._modalities = self.modalities()
        for modality in self._modalities:
            self._wrap_entry(modality, undo)
        undo.pre_hook(self.core, self._before_model, with_kwargs=True)
        if self.embeds_then_scatters and pruner.stages_at("vision"):
            # This thread's prefill that entered its kept tokens alone: the encoding it took out of
            # the model's inputs and whether the caller asked for a tuple (set in _before_model, which
            # starts every call with none).
            self._entered_encoding: contextvars.ContextVar = contextvars.ContextVar(f"vtoken_entered_{id(self)}", default=None)
            undo.post_hook(self.core, self._encoding_in_output, with_kwargs=True)
        if pruner.needs.has(signals.PROJECTOR_INPUT):
            undo.pre_hook(self.projector(), self._before_projector)
        self.install_vision(undo)
        if pruner.stages_at("vision"):
            placing = undo.post_hook(self.projector(), self._after_projector)
            # Behind every other hook of the projector, whenever it was registered: a hook of the
            # user's sees the projector's own output (the kept tokens), not the grid vtoken rebuilds.
            undo.pre_hook(self.projector(), lambda module, args: move_hooks_last([placing]))
            packing = self.grid_packing()
            if packing is not None:
                undo.set_attribute(self.core, packing, self._packing_of_kept_rows(getattr(self.core, packing)))
        decoder = self.description.decoder
        DecoderPruning(decoder.stack, pruner, self._pre_llm, head=decoder.head,
                       token_inputs=decoder.token_inputs).install(undo)
        if callable(getattr(self.model, "generate", None)):
            install_generate_wrapper(self.model, pruner, undo, self._carries_visual_input)
        if self.model is not self.core:  # the model with the LM head computes the loss from labels
            self._labels: contextvars.ContextVar = contextvars.ContextVar(f"vtoken_labels_{id(self)}", default=None)
            undo.pre_hook(self.model, self._take_labels, with_kwargs=True)
            undo.post_hook(self.model, self._loss_on_kept_tokens, with_kwargs=True, always_call=True)
            self._positions_kept = contextvars.ContextVar(f"vtoken_logits_to_keep_{id(self)}", default=None)
            undo.pre_hook(self.model, self._take_positions_to_keep, with_kwargs=True)
            undo.post_hook(self.model, self._logits_at_kept_positions, with_kwargs=True, always_call=True)
    @staticmethod
    def _given(kwargs: dict, modality: Modality) -> bool:
        """Whether a call's inputs hold ``modality``'s pixels or an encoding of them."""
        return kwargs.get(modality.pixels) is not None or compat.encoded_output(kwargs, modality.name) is not None

    def _carries_visual_input(self, generate_kwargs: dict) -> bool:
        """Whether a ``generate`` call's inputs hold pixels or an encoding of any modality."""
        return any(self._given(generate_kwargs, m) for m in self._modalities)

    # --- training: labels follow the kept tokens ------------------------------------------------
    def _take_labels(self, module, args, kwargs):
        """Hold the labels back from the model's own loss (its logits may cover fewer tokens than the
        labels); :meth:`_loss_on_kept_tokens` computes the loss once the kept tokens are known."""
        labels = kwargs.get("labels")
        if labels is None:
            self._labels.set(None)
            return None
        self._labels.set((labels, self.pruner.thread_last_run))
        return args, {**kwargs, "labels": None}

    def _loss_on_kept_tokens(self, module, args, kwargs, output):
        """The model's own loss function on the labels of the tokens its logits cover: the labels
        gathered through the final layout of this forward (text labels are never dropped, a pad slot
        added by pruning is ignored), so the loss equals the loss computed on the kept sequence."""
        held = self._labels.get()
        self._labels.set(None)
        if held is None or output is None:
            return None
        labels, before = held
        logits = output[0] if isinstance(output, tuple) else output.logits
        _, layout = self._final_layout(before, logits.shape[1])
        if layout is not None:
            index = layout.orig_index.to(labels.device)
            labels = torch.where(index >= 0, torch.gather(labels, 1, index.clamp(min=0)), -100)
        extra = {k: kwargs[k] for k in ("num_items_in_batch",) if kwargs.get(k) is not None}
        loss = self.model.loss_function(
            logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **extra
        )
        if isinstance(output, tuple):
            return (loss, *output)
        output.loss = loss
        return output

    def _final_layout(self, before: PruneRun | None, length: int) -> tuple[PruneRun | None, SequenceLayout | None]:
        """``(run, layout)``: this thread's run of the forward that has just returned (None if it made
        none: its last run is still ``before``) and the layout of its last layer group whose length is
        ``length`` (the slots the logits cover), or None. The groups are the prompt's own (a mask stage
        that evicts has since compacted decoding's layout, which may have the prompt's length too)."""
        run = self.pruner.thread_last_run
        if run is None or run is before:
            return None, None
        groups = run.prompt_groups if run.prompt_groups is not None else run.groups
        return run, next((layout for _, layout in reversed(groups) if layout.length == length), None)

    # --- logits_to_keep given as positions of the prompt -------------------------------------------
    def _take_positions_to_keep(self, module, args, kwargs):
        """A prefill's ``logits_to_keep`` as a tensor names positions (or a mask) of the prompt the
        user passed, which pruning renumbers: hold it back, let the model compute every kept slot's
        logits, and :meth:`_logits_at_kept_positions` picks the asked ones. An int (the last N) needs
        nothing: the last tokens stay last."""
        positions = kwargs.get("logits_to_keep")
        cache = compat.cache_from(kwargs)
        if not isinstance(positions, torch.Tensor) or (cache is not None and compat.cache_length(cache) > 0):
            self._positions_kept.set(None)
            return None
        self._positions_kept.set((positions, self.pruner.thread_last_run))
        return args, {**kwargs, "logits_to_keep": 0}

    def _logits_at_kept_positions(self, module, args, kwargs, output):
        held = self._positions_kept.get()
        self._positions_kept.set(None)
        if held is None or output is None:
            return None
        positions, before = held
        at = 1 if isinstance(output, tuple) and output[0].dim() == 0 else 0  # a tuple may open with the loss
        logits = output[at] if isinstance(output, tuple) else output.logits
        batch = logits.shape[0]
        run, layout = self._final_layout(before, logits.shape[1])
        if layout is not None:
            # Per sample, the slot that holds each prompt position (-1: a token pruning dropped).
            orig = layout.orig_index.to(logits.device)
            slot_of = torch.full((batch, run.orig_length), -1, dtype=torch.long, device=logits.device)
            samples, slots = (orig >= 0).nonzero(as_tuple=True)
            slot_of[samples, orig[samples, slots]] = slots
        else:
            slot_of = torch.arange(logits.shape[1], device=logits.device).expand(batch, -1)
        # The model's own slicing applied to (sample, slot) pairs of the prompt's positions.
        sample_of = torch.arange(batch, device=logits.device)[:, None].expand_as(slot_of)
        picked = compat.slice_logits_to_keep(torch.stack([sample_of, slot_of], dim=-1), positions.to(logits.device))
        if bool((picked[..., 1] < 0).any()):
            raise ValueError(
                "logits_to_keep asks for the logits of a visual token that pruning dropped (the pruned model has "
                "none there); ask for text positions, pass an int (the last N tokens), or call vtoken.unwrap(model)"
            )
        kept = logits[picked[..., 0], picked[..., 1]]
        if isinstance(output, tuple):
            return (*output[:at], kept, *output[at + 1:])
        output.logits = kept
        return output

    def _wrap_entry(self, modality: Modality, undo: UndoStack) -> None:
        """Wrap the encoder entry of ``modality`` so each call opens its own :class:`ImageRun`."""
        pruner = self.pruner
        encode = getattr(self.core, modality.entry)
        needs = pruner.needs
        # Strategies that read the encoder itself (VFlowOpt): one layer's attention, the pixels.
        reads_encoder = bool(needs.layers(signals.VISION_ATTENTION)) or needs.has(signals.PIXEL_PATCHES)
        signature = inspect.signature(encode)

        @functools.wraps(encode)  # keeps the signature generate() inspects
        def encoder_entry(*args, **kwargs):
            if pruner.encoding is not None:
                # An entry calling another (Qwen3-VL's get_video_features runs get_image_features):
                # the outer call's encoding holds the request.
                return encode(*args, **kwargs)
            arguments = signature.bind(*args, **kwargs).arguments
            images = modality.infos(arguments)
            crop_pixels = partial(modality.crop_pixels, arguments)
            run = ImageRun(
                images, self.candidate_local(images), pruner.config, crop_pixels=crop_pixels,
                tokens_per_crop=self.tokens_per_crop_for(images),
            )
            run.modality = modality.name
            if reads_encoder:
                run.vision_source = self.vision_source_for(run, crop_pixels)
            # The encoding is remembered by its output object, so it is asked for as a ModelOutput;
            # a caller who asked for a tuple gets one.
            requested = kwargs.get("return_dict")
            as_tuple = (getattr(self.config, "return_dict", True) if requested is None else requested) is False
            pruner.encoding = run
            # Called from vtoken's pre-hook on the core or by generate, before the core's forward: an
            # offloaded core's own weights (image_newline) are not loaded yet.
            compat.bring_in_offloaded_weights(self.core)
            try:
                output = encode(*args, **{**kwargs, "return_dict": True})
            finally:
                pruner.encoding = None
            run.output = output
            run.features = compat.image_features(output)
            pruner.remember_encoding(output, run)
            return output.to_tuple() if as_tuple else output

        undo.set_attribute(self.core, modality.entry, eager(encoder_entry))

    def _before_model(self, module, args, kwargs):
        pruner = self.pruner
        pruner.active = None
        if hasattr(self, "_entered_encoding"):
            self._entered_encoding.set(None)  # a call before that raised left one
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None and kwargs.get("inputs_embeds") is not None:
            # As the plain model does: the placeholders are where the embeddings equal the image
            # token's embedding (the layout only needs where they are).
            input_ids = self._placeholders_in(kwargs["inputs_embeds"])
        cache = compat.cache_from(kwargs)
        present = [m for m in self._modalities if input_ids is not None and bool((input_ids == m.placeholder).any())]
        if cache is not None and compat.cache_length(cache) > 0:
            # A decoding step. Image tokens without images (a generated token that happens to be the
            # image token's id) are text to the model, as to the unwrapped one; new images are not.
            if any(self._given(kwargs, m) for m in present):
                raise ValueError(
                    f"vtoken prunes images at prefill, from an empty KV cache; this call adds images to a cache "
                    f"that already holds {compat.cache_length(cache)} tokens (a cached prefix, an earlier turn, "
                    "PEFT prefix tuning): start a new prompt with every image from an empty cache (or call "
                    "vtoken.unwrap(model) for this use)"
                )
            run = pruner.run_for_cache(cache)
            pruner.active = run
            if run is None:
                self._refuse_unknown_pruned_cache(cache, kwargs.get("attention_mask"), input_ids)
                return None
            self._roll_back_rejected(run, cache)
            continuing = run.generate_call is None or run.generate_call is not pruner.generate_call.get()
            in_generate = pruner.generate_call.get() is not None
            return self._skip_processed_tokens(run, args, kwargs, continuing,
                                               pruner.prompt_length.get() if in_generate else None)
        if input_ids is None:
            raise ValueError("vtoken finds the visual tokens in input_ids or inputs_embeds; pass one of them")
        # Placeholders without pixels or an encoding are text to the model (an assistant model in
        # assisted decoding is called so): nothing to prune, as the plain model runs them.
        present = [m for m in present if self._given(kwargs, m)]
        if not present:
            call = pruner.generate_call.get()
            if call is not None and call.images_prefilled:
                # A forward a logits processor makes inside generate (classifier-free guidance's
                # unconditional pass): the plain model's, and not a request selection() describes.
                return None
            if pruner.config.text_only == "error" and not self._has_placeholders(input_ids):
                raise ValueError(
                    "this input has no image tokens, so there is nothing to prune; add an image, "
                    "call vtoken.unwrap(model) for text-only use, or wrap with text_only='passthrough'"
                )
            # This prefill is the last one: selection() / diagnostics() / show() describe it, not an
            # earlier request's images.
            stages = [stage.name for stage in pruner.stages] + ([pruner.mask.name] if pruner.mask is not None else [])
            pruner.last_run = TextOnlyPrefill(input_ids.shape[0], stages)
            return None
        if len(present) > 1:
            raise ValueError(
                f"this input holds {' and '.join(m.name + 's' for m in present)} at once (in one prompt or across the "
                "batch); vtoken prunes one kind of visual input per call: send them in separate calls (or call "
                "vtoken.unwrap(model) for this use)"
            )
        mask = compat.full_attention_mask(kwargs.get("attention_mask"))
        check_mask_shape(mask, input_ids)
        (modality,) = present
        if self.model is self.core:
            # The bare model wrapped and a stage that drops tokens: the positions its caller's labels
            # name would no longer line up (a budget of every token keeps them in place).
            reason = misaligned_outer_argument(self.core)
            if reason is not None and may_drop_tokens(pruner.stages, input_ids, modality.placeholder):
                raise ValueError(reason)
        encoded = compat.encoded_output(kwargs, modality.name)
        if kwargs.get(modality.pixels) is not None:
            # Encode here (through the wrapped entry) so the forward sees the encoding it will use,
            # exactly as generate() does.
            extra = {k: kwargs[k] for k in modality.forward_kwargs if kwargs.get(k) is not None}
            entry = getattr(self.core, modality.entry)
            encoded = entry(**{modality.pixels: kwargs[modality.pixels]}, return_dict=True, **extra)
            kwargs[modality.pixels] = None
            compat.set_encoded_output(kwargs, modality.name, encoded)
        images = pruner.encoding_of(encoded)
        order = self._encoded_order(images, encoded)
        placed = self.visual_layout(input_ids, [images.images[i] for i in order], modality.placeholder)
        run = PruneRun(placed, pruner.config, images)
        if mask is not None and mask.dim() == 4:  # generate() with a static cache: the prompt's padding
            mask = padding_from_4d_mask(mask, input_ids.shape[1])
        run.prompt = (input_ids, mask)
        prompt_length = pruner.prompt_length.get()
        if prompt_length is not None and input_ids.shape[1] > prompt_length:
            run.prompt_end = prompt_length
        run.generate_call = pruner.generate_call.get()
        if run.generate_call is not None:
            run.generate_call.images_prefilled = True
        # generate() without a KV cache re-runs the whole sequence at every step with the features
        # it encoded once: such a step continues the prompt this encoding served, and prunes as it did.
        run.replay = images.replay_for(input_ids, mask)
        pruner.active = run
        if self._enters_kept_tokens(run, modality, args, kwargs) and self.numbers_whole_prompt(input_ids, kwargs):
            args = self._enter_kept_tokens(run, modality, encoded, input_ids, kwargs)
        return args, kwargs

    def _enters_kept_tokens(self, run: PruneRun, modality: Modality, args, kwargs) -> bool:
        """Whether this prefill feeds the model only the tokens the vision stages kept: a family whose
        forward only embeds the prompt and scatters the image features into it (``embeds_then_scatters``),
        images whose kept tokens have every one of their sources (:meth:`kept_tokens_whole`), the prompt
        given as ``input_ids`` (the only positional argument, if any)."""
        images = run.image_run
        given = args[0] if args else kwargs.get("input_ids")
        return (
            self.embeds_then_scatters and images.vision_positions is not None and modality.name == "image"
            and len(args) <= 1 and given is not None and kwargs.get("inputs_embeds") is None
            and self.kept_tokens_whole(run)
        )

    def kept_tokens_whole(self, run: PruneRun) -> bool:
        """Whether every visual token the vision stages kept has all of its encoder tokens, so the
        features the model scatters are its final ones (a token mixed from several, some dropped, is
        rebuilt from the kept ones in front of the LLM: :meth:`_reweighted`). True for one-to-one token
        maps."""
        return all(image.token_map.is_one_to_one for image in run.visual.images)

    def numbers_whole_prompt(self, input_ids: torch.Tensor, kwargs: dict) -> bool:
        """Make a forward fed only the kept tokens number them as it numbers the whole prompt; False
        where it cannot (the whole prompt is fed then). Here nothing to do: the LLM's entry numbers
        the prompt from its length (``DecoderPruning`` takes the whole prompt's)."""
        return True

    def _enter_kept_tokens(self, run: PruneRun, modality: Modality, encoded, input_ids: torch.Tensor, kwargs: dict) -> tuple:
        """Hand the model the prompt's embeddings at the kept tokens alone, as the model would build
        them (the text's embeddings, each image token its feature row in the order the forward
        scatters them), in place of ``input_ids`` and the encoding. The model then embeds, scatters
        and the LLM's entry gathers only those tokens, not the whole prompt's (on the speed bench's
        LLaVA-OneVision shape 100 of 796 rows); the LLM's entry lays them out
        (:meth:`_pre_llm`). The model's output still carries the encoding (:meth:`_encoding_in_output`).
        Returns the forward's positional arguments (none: ``input_ids`` is None now)."""
        keep = self._kept_by_vision(run, input_ids.device)
        is_image = run.visual.image_index.to(input_ids.device) >= 0
        parts = compat.image_features(encoded)
        features = parts[0] if len(parts) == 1 else torch.cat(parts)
        if int(is_image.sum()) != features.shape[0]:
            raise ValueError(
                f"the prompt holds {int(is_image.sum())} image tokens but its images give {features.shape[0]} features; "
                "build the prompt with the model's processor (one image token per feature)"
            )
        index = compact_index(keep)
        row = (is_image.flatten().cumsum(0) - 1).view_as(is_image)  # the feature each image token gets, in order
        embeds = self.core.get_input_embeddings()(gather_tokens(input_ids, index, fill=0))
        rows = gather_tokens(row, index, fill=-1)
        there = gather_tokens(is_image, index, fill=False)
        # Out of place, as the model's masked_scatter: the embeddings may be a leaf that requires grad
        # (enable_input_require_grads).
        embeds = embeds.index_put(torch.nonzero(there, as_tuple=True), features[rows[there]].to(embeds.device, embeds.dtype))
        run.entered = keep
        run.entered_inputs = self.whole_prompt_llm_inputs(encoded, is_image)
        # The output is built as a dict whatever the caller asked for, so the encoding goes back where
        # the model's own output type has it, then made a tuple as the model's forward would.
        self._entered_encoding.set((encoded, compat.returns_tuple(self.core, kwargs)))
        kwargs["return_dict"] = True
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = embeds
        kwargs[modality.pixels] = None
        compat.drop_encoded_output(kwargs, modality.name)
        return ()

    def whole_prompt_llm_inputs(self, encoded, is_image: torch.Tensor) -> dict[str, object]:
        """The LLM's per-token inputs besides its embeddings (``DecoderSpec.token_inputs``) that the
        forward derives from the whole prompt's image tokens (``is_image`` ``[B, L]``) and the
        ``encoded`` images; a forward fed the kept tokens alone cannot, so they are handed to the LLM
        (``PruneRun.entered_inputs``). None here."""
        return {}

    def _encoding_in_output(self, module, args, kwargs, output):
        """The encoding a prefill that entered the kept tokens alone took out of the model's inputs,
        put back where the model's output carries it."""
        entered = self._entered_encoding.get()
        if entered is None:
            return None
        self._entered_encoding.set(None)
        encoded, as_tuple = entered
        output = compat.with_output_encoding(output, "image", encoded)
        return output.to_tuple() if as_tuple else output

    def _placeholders_in(self, embeds: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids: each modality's placeholder where ``embeds`` is its token's embedding, -1
        elsewhere."""
        table = self.core.get_input_embeddings()
        ids = torch.full(embeds.shape[:2], -1, dtype=torch.long, device=embeds.device)
        for modality in self._modalities:
            token = table(torch.tensor(modality.placeholder, device=embeds.device)).to(embeds.dtype)
            ids[(embeds == token).all(-1)] = modality.placeholder
        return ids

    def _has_placeholders(self, input_ids: torch.Tensor) -> bool:
        return any(bool((input_ids == m.placeholder).any()) for m in self._modalities)

    @staticmethod
    def _refuse_unknown_pruned_cache(cache, mask: torch.Tensor | None, tokens: torch.Tensor | None) -> None:
        """A cache no request of this wrapper filled decodes as the plain model's, which is right for
        one filled before ``wrap`` (every token cached); one shorter than the prompt its attention mask
        covers was filled by a pruned prefill whose layout is lost, and would be read wrong."""
        if mask is None or mask.dim() != 2 or tokens is None:
            return
        cached = compat.cache_length(cache)
        if mask.shape[1] > cached + tokens.shape[1]:
            raise ValueError(
                f"this KV cache holds {cached} tokens but the attention mask covers {mask.shape[1] - tokens.shape[1]} "
                "before the new ones: a pruned prefill filled it and vtoken no longer knows its layout (a cache from "
                "another wrap, or copied other than by copy.deepcopy); continue from the cache generate returned (or a "
                "copy.deepcopy of it), or start again from the prompt"
            )

    @staticmethod
    def _roll_back_rejected(run: PruneRun, cache) -> None:
        """Assisted and prompt-lookup decoding feed several candidate tokens, then crop the rejected
        ones from the cache to the length its first layer should have. Layers that cache fewer tokens
        (after an in-LLM stage) are cropped to their own length here, and the request's count of
        processed tokens follows."""
        new_before = run.seen - run.orig_length
        removed = run.groups[0][1].length + new_before - compat.cache_length(cache)
        if removed <= 0:
            return
        run.seen -= removed
        if run.seen < run.orig_length:  # candidates of the prefill's own forward were rejected
            run.drop_prompt_tail(run.orig_length - run.seen)
        new = run.seen - run.orig_length
        for layer in range(compat.num_cache_layers(cache)):
            compat.crop_cache_layer(cache, layer, run.group_for(layer)[1].length + new)

    @staticmethod
    def _skip_processed_tokens(run: PruneRun, args, kwargs, continuing: bool, generate_prompt: int | None = None):
        """A decoding step fed tokens this request already processed: ``generate`` continued from a
        returned cache counts the tokens to feed from the cache's length, which pruning made shorter
        than the sequence. The attention mask spans the whole sequence, so the tokens past
        ``run.seen`` are the new ones; the others are dropped (their keys are in the cache).

        Without a mask (generate drops an all-ones one: a batch with no padding) the sequence is the
        prompt of the ``generate`` call making the step (``generate_prompt``, its whole input): a step
        of another call than the prefill's (``continuing``) feeds its tokens past ``run.seen`` as
        new. Outside ``generate`` every token fed without a mask is new (the caller's own steps).
        Under a static cache generate hands a 4-D mask instead, numbered from the cache's own length:
        it cannot say where the sequence ends. Only a step of another call than the prefill's counts
        from that length (the first of a continued ``generate``), so its sequence is the cache's
        length plus the tokens fed; within the prefill's call every token fed is new (assisted
        decoding's candidates included). The mask's rows for dropped tokens go too."""
        mask = compat.full_attention_mask(kwargs.get("attention_mask"))
        if args:  # input_ids given by position
            kwargs = {**kwargs, "input_ids": args[0]}
            args = args[1:]
        tokens = kwargs.get("input_ids")
        tokens = tokens if tokens is not None else kwargs.get("inputs_embeds")
        if tokens is None or not continuing and (mask is None or mask.dim() == 4):
            return args, kwargs
        fed = tokens.shape[1]
        if mask is None:
            if generate_prompt is None:
                return args, kwargs
            length = generate_prompt
        elif mask.dim() == 2:
            length = mask.shape[1]
        elif mask.dim() == 4:
            length = run.groups[0][1].length + run.seen - run.orig_length + fed
        else:
            return args, kwargs
        new = length - run.seen
        if fed <= new or new <= 0:
            return args, kwargs
        for name in ("input_ids", "inputs_embeds", "position_ids"):
            value = kwargs.get(name)
            if value is not None:
                kwargs[name] = value[..., fed - new :] if name == "position_ids" else value[:, fed - new :]
        if mask is not None and mask.dim() == 4 and mask.shape[2] == fed:
            given = kwargs["attention_mask"]  # one mask, or one per layer type (Qwen2 under a static cache)
            kwargs["attention_mask"] = ({kind: m[:, :, fed - new :] for kind, m in given.items()}
                                        if isinstance(given, dict) else given[:, :, fed - new :])
        return args, kwargs

    @staticmethod
    def _encoded_order(images: ImageRun | None, encoded) -> list[int]:
        """Which encoded image each per-image feature handed to the forward is. generate() repeats
        the features for beam search or several returned sequences (the same tensors, reordered)."""
        if images is not None:
            order = []
            for feature in compat.image_features(encoded):
                match = [i for i, mine in enumerate(images.features) if mine is feature]
                # A stacked output (videos) gives new row views on every read, generate() repeats it
                # into a new tensor for beam search, and offloading moves it: the same rows, by value.
                match = match or [i for i, mine in enumerate(images.features) if same_feature(mine, feature)]
                if not match:
                    break
                order.append(match[0])
            else:
                return order
        raise ValueError(
            "these image features were not encoded by the wrapped model; pass pixel_values, or compute "
            "mm_encoder_outputs with the wrapped model's get_image_features"
        )

    def vision_source_for(self, images: ImageRun, crop_pixels) -> VisionSource:
        """What strategies read of this encoder call's tower (its attention, its pixels)."""
        return VisionSource(self, crop_pixels)

    def projector_on_tokens(self):
        """The projector as a callable on per-LLM-token inputs ``[..., unit * width]`` (what
        ``ctx.projector`` is): the module itself for a token-by-token projector; a merging one
        (``ProjectorSpec.unit`` > 1) gets each token's encoder tokens back as rows."""
        spec = self.description.projector
        if spec.unit == 1:
            return spec.module
        return self._merging_projector

    @functools.cached_property
    def _merging_projector(self) -> "MergingProjectorOnTokens":
        """The merging projector on per-LLM-token inputs: a module, not a closure, so a strategy that runs
        the projector in another precision (ZOO-Prune's float32 perturbations of a half-precision model)
        reaches its parameters through it; one per wrap, so what a strategy caches per projector module
        (ZOO-Prune's two-layer structure, found by probing the projector) is found once, not per call."""
        return MergingProjectorOnTokens(self.description.projector.module, self.description.vision.width)

    def _before_projector(self, module, args):
        """Keep every crop token's projector input, in its grid place (ZOO-Prune perturbs them)."""
        images = self.pruner.encoding
        if images is None:
            return None
        features = args[0]
        images.projector_table = self._to_grid(images, features).reshape(-1, features.shape[-1])
        return None

    def _to_grid(self, images: ImageRun, tokens: torch.Tensor) -> torch.Tensor:
        """``[C, T', d]`` projector-side tokens back to ``[C, tokens_per_crop, d]`` grid places
        (zeros where a vision stage dropped a token)."""
        if images.vision_positions is None:
            return tokens
        crops, _, width = tokens.shape
        first = self.description.first_patch_slot
        slots = images.vision_positions.to(tokens.device) + first
        full = tokens.new_zeros(crops, self.tokens_per_crop, width)
        if first > 0:  # prefix tokens the projector reads (CLS under 'full') stay in front
            full[:, :first] = tokens[:, :first]
            tokens = tokens[:, first:]
        return full.scatter_(1, slots[..., None].expand(-1, -1, width), tokens)  # into the fresh zeros: no second copy

    def _after_projector(self, module, args, output):
        images = self.pruner.encoding
        if images is None or images.vision_positions is None:
            return None
        one_to_one = all(image.token_map.is_one_to_one for image in images.images)
        if images.modality == "image" and self.grid_packing() is not None and one_to_one:
            # The family's packing is handed the kept rows as they are and places them itself
            # (_packing_of_kept_rows): no grid of zeros to build and then move.
            images.kept_rows_pending = True
            return None
        placed = self._to_grid(images, output)
        if not one_to_one:
            # Tokens mixed from several encoder tokens are rebuilt in front of the LLM from their kept
            # sources (the family's packing mixed in zeros for the dropped ones).
            images.projected = placed.reshape(-1, placed.shape[-1])
        return placed

    def grid_packing(self) -> str | None:
        """The name of the model's method that packs an image's projected crop grids into its LLM
        tokens (LLaVA-NeXT / OneVision: crops unpadded, a newline per row), for a family whose
        :class:`~vtoken.adapters.base.TokenMap` is read off that packing; None for a family that
        places the grid as it is."""
        return None

    def _packing_of_kept_rows(self, pack):
        """The family's packing, which after a vision stage places the kept rows straight where the
        token map says, instead of being handed every crop's grid with zeros for the dropped tokens:
        for a one-to-one map the packing only moves rows, so the result is the same tensors, without
        building a grid of every crop token and copying it through the packing's permutes (on the
        speed bench's LLaVA-OneVision shape that is 4 copies of 576 rows for 100 kept ones)."""

        @functools.wraps(pack)
        def packing(image_features, image_sizes, *args, **kwargs):
            images = self.pruner.encoding
            if images is None or not images.kept_rows_pending:
                return pack(image_features, image_sizes, *args, **kwargs)
            images.kept_rows_pending = False
            rows = torch.cat(list(image_features)) if len(image_features) > 1 else image_features[0]  # [C, T', d]
            newline = kwargs.get("image_newline")
            if newline is None:  # a packing without newlines: the map has them; the family's own packing decides
                grid = self._to_grid(images, rows)
                crops = [len(image.crops) for image in images.images]
                return pack(list(torch.split(grid, crops)), image_sizes, *args, **kwargs)
            row_of_slot = self._row_of_kept_slot(images, *rows.shape[:2])
            placed = [self._kept_rows_placed(rows, row_of_slot, image.token_map, newline) for image in images.images]
            lengths = torch.tensor([p.shape[0] for p in placed], dtype=torch.long, device=rows.device)
            return placed, lengths

        return packing

    def _row_of_kept_slot(self, images: ImageRun, crops: int, current: int) -> torch.Tensor:
        """``[C * tokens_per_crop]``: each slot's row among the kept projected rows ``[C, current, d]``
        (prefix tokens the projector reads first, then the patches a vision stage kept), -1 if dropped."""
        first, per = self.description.first_patch_slot, images.tokens_per_crop
        kept = images.vision_positions.to("cpu") + first
        if first:
            kept = torch.cat([torch.arange(first).expand(crops, -1), kept], dim=1)
        crop = torch.arange(crops)[:, None]
        row_of_slot = torch.full((crops * per,), -1, dtype=torch.long)
        row_of_slot[(crop * per + kept).reshape(-1)] = (crop * current + torch.arange(current)).reshape(-1)
        return row_of_slot

    def _kept_rows_placed(self, rows: torch.Tensor, row_of_slot: torch.Tensor, token_map, newline: torch.Tensor) -> torch.Tensor:
        """``[V, d]``: one image's LLM tokens from the kept projected rows ``rows`` ``[C, T', d]`` of
        every crop (``row_of_slot``: :meth:`_row_of_kept_slot`): each token whose slot was kept gets
        its row, each token with no slot (a newline) gets ``newline``, a dropped token zeros (what the
        packing of the zero-filled grid gives)."""
        width = rows.shape[-1]
        source = token_map.index[:, 0]
        row = torch.where(source >= 0, row_of_slot[source.clamp(min=0)], -1)
        there = torch.nonzero(row >= 0).squeeze(1)
        out = rows.new_zeros(source.shape[0], width)
        out.index_copy_(0, there.to(rows.device), rows.reshape(-1, width).index_select(0, row[there].to(rows.device)))
        out[(source < 0).to(rows.device)] = newline.to(out.dtype)
        return out

    def _pre_llm(self, run: PruneRun, layout, embeds):
        pruner = self.pruner
        if run.image_run.vision_positions is not None:
            whole_prompt = run.entered is None  # else the model was fed the kept tokens alone
            keep = self._kept_by_vision(run, embeds.device) if whole_prompt else run.entered.to(embeds.device)
            layout, index = layout.compact(keep)
            if renumbers(pruner.config.positions, "vision"):
                layout = layout.renumbered()
            if whole_prompt:
                embeds = gather_tokens(self._reweighted(run, embeds), index)
        projector = self.projector_on_tokens() if pruner.needs.has(signals.PROJECTOR_INPUT) else None
        for stage in pruner.stages_at("projector"):
            layout, embeds, _ = pruner.run_sequence_stage(run, stage, layout, embeds, projector=projector)
        return layout, embeds

    def _kept_by_vision(self, run: PruneRun, device) -> torch.Tensor:
        """``[B, L]``: the prompt's text and the visual tokens that survive the vision stages (each
        stage's selection is recorded)."""
        kept = self.pruner.vision_kept_visual(run).to(device)
        visual = run.visual
        position = visual.visual_index.to(device).clamp(min=0)
        return (visual.image_index.to(device) < 0) | kept[torch.arange(kept.shape[0], device=device)[:, None], position]

    def _reweighted(self, run: PruneRun, embeds: torch.Tensor) -> torch.Tensor:
        """Tokens of a weighted map that lost some of their sources, rebuilt as the weighted mean of
        the kept ones' projected features (a token that lost all is removed anyway; one that lost
        none keeps the family's own value)."""
        images = run.image_run
        if images.projected is None:
            return embeds
        kept_slots = images.kept_slots().to(images.projected.device)
        rebuilt_embeds = embeds  # copied at the first token rebuilt: the tensor the model built is never written
        for image in run.visual.images:
            if image.token_map.is_one_to_one:
                continue
            index = image.token_map.index
            used = index >= 0
            dropped = used & ~kept_slots.cpu()[index.clamp(min=0)]
            # Only tokens that lost some, not all, of their sources differ from the family's packing.
            mixed = torch.nonzero(dropped.any(1) & (used & ~dropped).any(1)).squeeze(-1)
            if mixed.numel() == 0:
                continue
            rebuilt = image.token_map.gather(images.projected, kept_slots)[mixed]
            row = run.visual.visual_index[image.sample]
            slots = torch.nonzero(row >= 0).squeeze(-1)[image.offset + mixed]
            if rebuilt_embeds is embeds:  # most prefills rebuild none: no copy of the whole sequence then
                rebuilt_embeds = embeds.clone()
            rebuilt_embeds[image.sample, slots.to(embeds.device)] = rebuilt.to(embeds.device, embeds.dtype)
        return rebuilt_embeds
