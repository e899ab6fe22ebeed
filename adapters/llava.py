"""Adapter for transformers LLaVA 1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT
(``LlavaNextForConditionalGeneration``).

Where the visual tokens are: the processor expands each image into runs of ``image_token_id``
placeholders; the model scatters the image features into them in flattened (batch, position) order,
so image i owns the i-th block of placeholders. LLaVA-NeXT (AnyRes) packs a base view and the
unpadded high-resolution crops with one newline embedding after each row; the token-to-crop mapping
is obtained by running the model's own ``pack_image_features`` on crop-token ids, so it always
matches the installed transformers.

Sites: vision (a forward hook on an encoder layer shortens every crop's sequence; a hook on the
projector output scatters the survivors back to their grid places so LLaVA's packing still works, and
the dropped places are removed in front of the LLM), projector (in front of the LLM) and llm (inside
the decoder stack, see :mod:`vtoken.adapters.hf_decoder`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from functools import partial

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaModel, LlavaNextForConditionalGeneration, LlavaNextModel

from .base import Adapter, ImageInfo, UndoStack, VisualLayout
from .hf_decoder import DecoderPruning
from .observe import observe_layer
from vtoken import compat, signals
from vtoken.context import Grid, VisionAttention
from vtoken.kernels import attention_rows, gather_tokens, received_attention
from vtoken.pruner import Pruner
from vtoken.request import ImageRun, PruneRun, renumbers

_NEXT_CLASSES = (LlavaNextForConditionalGeneration, LlavaNextModel)
_CLASSES = (LlavaForConditionalGeneration, LlavaModel, *_NEXT_CLASSES)


#: Per family this adapter serves: the signals its models never provide, and why (``vtoken.methods``).
FAMILY_GAPS = {
    "LLaVA-1.5": {},
    "LLaVA-NeXT": {signals.ONE_GRID_PER_IMAGE: "AnyRes gives a base view, high-resolution crops and newline tokens"},
}


class LlavaAdapter(Adapter):
    family = "llava"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _CLASSES)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.core = model.model if isinstance(model, (LlavaForConditionalGeneration, _NEXT_CLASSES[0])) else model
        self.config = self.core.config
        self.is_next = isinstance(self.core, LlavaNextModel)
        vision_config = self.config.vision_config
        self.grid_side = vision_config.image_size // vision_config.patch_size
        self.has_cls = vision_config.model_type == "clip_vision_model"
        self.select = self.config.vision_feature_select_strategy
        # Tokens the vision encoder holds per crop, and how many of them reach the projector.
        self.encoder_tokens = self.grid_side**2 + int(self.has_cls)
        self.dropped_first = int(self.select == "default")
        self.tokens_per_crop = self.encoder_tokens - self.dropped_first

    # --- structure ------------------------------------------------------------------------------
    def vision_layers(self) -> nn.ModuleList:
        tower = self.core.vision_tower
        inner = getattr(tower, "vision_model", tower)
        return inner.encoder.layers

    def projector(self) -> nn.Module:
        return self.core.multi_modal_projector

    def language_model(self) -> nn.Module:
        return self.core.language_model

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    def visual_tokens_per_image(self) -> int | None:
        return None if self.is_next else self.tokens_per_crop

    def vision_tokens(self) -> int | None:
        return self.grid_side**2

    def site_width(self, site: str) -> tuple[int, int]:
        config = self.config.vision_config if site in ("vision", "projector") else self.config.text_config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return config.hidden_size, head_dim

    def vision_feature_layer(self) -> int | None:
        # hidden_states[j] is the output of encoder layer j - 1 (hidden_states[0]: the embeddings).
        layers = self.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        num = len(self.vision_layers())
        return max(max(j % (num + 1) for j in layers) - 1, 0)

    @property
    def family_name(self) -> str:
        return "LLaVA-NeXT" if self.is_next else "LLaVA-1.5"

    def unavailable(self, signal) -> str | None:
        # Every signal exists on LLaVA and LLaVA-NeXT; only the one-grid layout depends on the model.
        if signal.name == signals.ONE_GRID_PER_IMAGE:
            return self.one_grid_per_image()
        if signal.name == signals.VISION_CLS and not self.has_cls:
            return f"a {self.config.vision_config.model_type} tower without a CLS token"
        if signal.layer is not None:
            depth = len(self.vision_layers() if signal.name in signals.VISION_LAYERED else self.decoder_layers())
            if not 0 <= signal.layer < depth:
                return f"no layer {signal.layer} (it has {depth})"
        return None

    def one_grid_per_image(self) -> str | None:
        if self.is_next:
            return "LLaVA-NeXT AnyRes: a base view, high-resolution crops and newline tokens"
        if self.has_cls and self.select != "default":
            return "the CLS token besides the grid (vision_feature_select_strategy='full'; use 'default')"
        if not self.has_cls and self.select == "default":
            return "a grid missing its first patch (a tower without CLS under vision_feature_select_strategy='default')"
        return None

    # --- validation -----------------------------------------------------------------------------
    def validate(self, stages: tuple) -> None:
        num_vision = len(self.vision_layers())
        feature_layers = self.config.vision_feature_layer
        feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
        # hidden_states[j] is the output of encoder layer j-1; pruning must happen before the first one read.
        first_read = min(j % (num_vision + 1) for j in feature_layers)
        decoder_layers = len(self.decoder_layers())
        for stage in stages:
            if stage.site == "llm" and stage.layer >= decoder_layers:
                raise ValueError(
                    f"llm layer {stage.layer} does not exist: the LLM has {decoder_layers} decoder layers "
                    f"(0..{decoder_layers - 1})"
                )
            if stage.site == "vision" and stage.layer >= num_vision:
                raise ValueError(f"vision layer {stage.layer} does not exist: the vision encoder has {num_vision} layers")
            if stage.site == "vision":
                if stage.layer + 1 >= first_read:
                    raise ValueError(
                        f"vision layer {stage.layer} is at or after the layer LLaVA reads its features from "
                        f"(hidden state {first_read}, vision_feature_layer={self.config.vision_feature_layer}); "
                        f"use a vision layer <= {first_read - 2}"
                    )
                if not self.has_cls and self.select == "default":
                    raise ValueError(
                        "vision-site pruning needs a tower with a CLS token when vision_feature_select_strategy="
                        "'default' (LLaVA then drops the first token of the pruned sequence); use the projector site"
                    )
                if self.is_next and self.select != "default":
                    raise ValueError("vision-site pruning on LLaVA-NeXT needs vision_feature_select_strategy='default'")
            per_image = self.visual_tokens_per_image()
            if per_image is not None and stage.keep_tokens is not None and stage.keep_tokens > per_image:
                raise ValueError(
                    f"keep_tokens={stage.keep_tokens} is larger than the {per_image} visual tokens of an image; "
                    f"use keep_tokens <= {per_image} (or keep=1.0 to keep all)"
                )

    # --- where the visual tokens are ------------------------------------------------------------
    def image_infos(self, pixel_values: torch.Tensor, image_sizes) -> list[ImageInfo]:
        """The token structure of each image of an encoder call (not yet placed in a sample)."""
        if self.is_next:
            return self._next_images(pixel_values, image_sizes)
        return self._plain_images(pixel_values)

    def _plain_images(self, pixel_values) -> list[ImageInfo]:
        per = self.tokens_per_crop
        first_patch = int(self.has_cls) - self.dropped_first  # CLS stays a visual token in "full" mode
        grid = (Grid(first_patch, self.grid_side, self.grid_side, self.grid_side),)
        geometry = {"kind": "grid", "grid": (self.grid_side, self.grid_side), "first": first_patch}
        return [
            ImageInfo(-1, -1, per, grid, [i], i * per + torch.arange(per), geometry)
            for i in range(pixel_values.shape[0])
        ]

    def crops_per_image(self, image_sizes) -> list[int]:
        config = self.config
        return [
            compat.image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in image_sizes
        ]

    def crop_pixels(self, pixel_values: torch.Tensor, image_sizes) -> torch.Tensor:
        """``[C, channels, H, W]``: every crop the encoder sees, in encoder order (LLaVA-NeXT's
        ``[images, max crops, ...]`` without the padding past each image's crops)."""
        if pixel_values.dim() == 5:
            return torch.cat([p[:n] for p, n in zip(pixel_values, self.crops_per_image(image_sizes))])
        return pixel_values

    def _next_images(self, pixel_values, image_sizes) -> list[ImageInfo]:
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes from its processor")
        crops_per_image = self.crops_per_image(image_sizes)
        per, side = self.tokens_per_crop, self.grid_side
        # Run the model's own packing on crop-token ids, with -1 for the newline, to learn where each
        # crop token lands (unpadding and newlines included).
        ids, first = [], 0
        for n in crops_per_image:
            ids.append(torch.arange(first * per, (first + n) * per, dtype=torch.float64).view(n, per, 1))
            first += n
        packed = compat.pack_anyres_features(
            self.core, ids, image_sizes, self.select, image_newline=torch.tensor([-1.0], dtype=torch.float64)
        )
        images, first = [], 0
        for n, tokens, size in zip(crops_per_image, packed, image_sizes):
            source = tokens.view(-1).round().long().cpu()
            grids = [Grid(0, side, side, side)]
            rest = source[side * side :]
            rows = int((rest < 0).sum())
            if n > 1 and rows > 0:
                width = (rest.numel() - rows) // rows
                grids.append(Grid(side * side, rows, width, width + 1))
            crops = list(range(first, first + n))
            images.append(ImageInfo(-1, -1, source.numel(), tuple(grids), crops, source, self._next_geometry(size, n)))
            first += n
        return images

    def _next_geometry(self, size, crops: int) -> dict:
        config = self.config
        height, width = (int(v) for v in size)
        rows, cols = compat.anyres_grid_shape((height, width), config.image_grid_pinpoints, config.vision_config.image_size)
        return {
            "kind": "anyres", "grid": (self.grid_side, self.grid_side), "image_size": (height, width),
            "crop_grid": (int(rows), int(cols)), "crops": crops, "tokens_per_crop": self.tokens_per_crop,
        }

    def candidate_local(self, images: list[ImageInfo]) -> torch.Tensor:
        """``[C, P]``: the image-local token each encoder candidate (non-CLS token) lands on, or -1."""
        crops = sum(len(image.crops) for image in images)
        by_slot = torch.full((crops * self.tokens_per_crop + 1,), -1, dtype=torch.long)  # last entry: "none"
        for image in images:
            local = torch.nonzero(image.source >= 0).squeeze(-1)
            by_slot[image.source[local]] = local
        slots = torch.arange(self.grid_side**2) + int(self.has_cls) - self.dropped_first
        crop_base = torch.arange(crops)[:, None] * self.tokens_per_crop
        flat = torch.where(slots[None] >= 0, crop_base + slots[None], by_slot.numel() - 1)
        return by_slot[flat]

    def visual_layout(self, input_ids: torch.Tensor, images: list[ImageInfo]) -> VisualLayout:
        """Place each image in its sample: image i owns the i-th block of placeholders in flattened
        (batch, position) order, as LLaVA's ``masked_scatter`` fills them."""
        placeholders = (input_ids == self.config.image_token_id).cpu()
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
        encode = self.core.get_image_features
        needs = pruner.needs
        # Strategies that read the encoder itself (VFlowOpt): one layer's attention, the pixels.
        attention_layers = needs.layers(signals.VISION_ATTENTION)
        reads_encoder = bool(attention_layers) or needs.has(signals.PIXEL_PATCHES)

        @functools.wraps(encode)  # keeps the signature generate() inspects
        def get_image_features(*args, **kwargs):
            bound = inspect.signature(encode).bind(*args, **kwargs)
            pixels, sizes = bound.arguments["pixel_values"], bound.arguments.get("image_sizes")
            images = self.image_infos(pixels, sizes)
            crop_pixels = partial(self.crop_pixels, pixels, sizes)
            run = ImageRun(images, self.candidate_local(images), pruner.config, crop_pixels=crop_pixels)
            if reads_encoder:
                run.vision_source = _VisionSource(self, crop_pixels)
            pruner.encoding = run
            try:
                output = encode(*args, **kwargs)
            finally:
                pruner.encoding = None
            run.output = output
            run.features = compat.image_features(output)
            pruner.remember_encoding(output, run)
            return output

        self.core.get_image_features = get_image_features
        undo.push(lambda: delattr(self.core, "get_image_features"))
        undo.hook(self.core.register_forward_pre_hook(self._before_model, with_kwargs=True))
        for layer in needs.layers(signals.VISION_OBSERVED):
            observe_layer(
                self.vision_layers()[layer], compat.LAYER_PARTS,
                active=lambda: pruner.encoding is not None, done=partial(self._observed_vision, layer), undo=undo,
            )
        if needs.has(signals.PROJECTOR_INPUT):
            undo.hook(self.projector().register_forward_pre_hook(self._before_projector))
        for layer in attention_layers:
            hook = partial(self._vision_attention_input, layer)
            undo.hook(compat.layer_attention(self.vision_layers()[layer]).register_forward_pre_hook(hook, with_kwargs=True))
        for stage in pruner.stages_at("vision"):
            hook = partial(self._after_vision_layer, stage)
            undo.hook(self.vision_layers()[stage.layer].register_forward_hook(hook))
        if pruner.stages_at("vision"):
            undo.hook(self.projector().register_forward_hook(self._after_projector))
        head = getattr(self.model, "lm_head", None)  # absent on a bare LlavaModel
        DecoderPruning(self.language_model(), pruner, self._pre_llm, head=head).install(undo)

    def _before_model(self, module, args, kwargs):
        pruner = self.pruner
        pruner.active = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = compat.cache_from(kwargs)
        has_images = input_ids is not None and bool((input_ids == self.config.image_token_id).any())
        if cache is not None and compat.cache_length(cache) > 0:
            # A decoding step. Image tokens without images (a generated token that happens to be the
            # image token's id) are text to the model, as to the unwrapped one; new images are not.
            if has_images and (kwargs.get("pixel_values") is not None or compat.encoded_images(kwargs) is not None):
                raise ValueError(
                    "vtoken prunes images at prefill; a new image cannot be added to a filled KV cache: start a "
                    "new prompt with every image (or call vtoken.unwrap(model) for this use)"
                )
            pruner.active = pruner.run_for_cache(cache)
            return None
        if input_ids is None:
            raise ValueError("vtoken finds the visual tokens in input_ids; call the model with input_ids, not inputs_embeds")
        if not has_images:
            if pruner.config.text_only == "error":
                raise ValueError(
                    "this input has no image tokens, so there is nothing to prune; add an image, "
                    "call vtoken.unwrap(model) for text-only use, or wrap with text_only='passthrough'"
                )
            return None
        encoded = compat.encoded_images(kwargs)
        if kwargs.get("pixel_values") is not None:
            # Encode here (through the wrapped get_image_features) so the forward sees the encoding
            # it will use, exactly as generate() does.
            names = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")
            extra = {k: kwargs[k] for k in names if kwargs.get(k) is not None}
            encoded = self.core.get_image_features(pixel_values=kwargs["pixel_values"], return_dict=True, **extra)
            kwargs["pixel_values"] = None
            compat.set_encoded_images(kwargs, encoded)
        elif encoded is None:
            raise ValueError(
                "input_ids hold image tokens but no pixel_values were given; pass the processor's pixel_values"
            )
        images = pruner.encoding_of(encoded)
        order = self._encoded_order(images, encoded)
        placed = self.visual_layout(input_ids, [images.images[i] for i in order])
        run = PruneRun(placed, pruner.config, images)
        mask = kwargs.get("attention_mask")
        run.prompt = (input_ids, mask)
        # generate() without a KV cache re-runs the whole sequence at every step with the features
        # it encoded once: such a step continues the prompt this encoding served, and prunes as it did.
        run.replay = images.replay_for(input_ids, mask)
        pruner.active = run
        return args, kwargs

    @staticmethod
    def _encoded_order(images: ImageRun | None, encoded) -> list[int]:
        """Which encoded image each per-image feature handed to the forward is. generate() repeats
        the features for beam search or several returned sequences (the same tensors, reordered)."""
        if images is not None and images.output is encoded:
            order = []
            for feature in compat.image_features(encoded):
                match = [i for i, mine in enumerate(images.features) if mine is feature]
                if not match:
                    break
                order.append(match[0])
            else:
                return order
        raise ValueError(
            "these image features were not encoded by the wrapped model; pass pixel_values, or compute "
            "mm_encoder_outputs with the wrapped model's get_image_features"
        )

    def _after_vision_layer(self, stage, module, args, output):
        images = self.pruner.encoding
        if images is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        grid = Grid(0, self.grid_side, self.grid_side, self.grid_side)
        pruned = self.pruner.run_vision_stage(images, stage, hidden, int(self.has_cls), grid)
        return (pruned, *output[1:]) if isinstance(output, tuple) else pruned

    def _observed_vision(self, layer: int, io: dict) -> None:
        images = self.pruner.encoding
        hidden = io["block"][0]
        valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        summary = self.pruner.strategy.observe("vision", layer, io, valid)
        images.observed[layer] = (summary, images.vision_positions, int(self.has_cls))

    def _vision_attention_input(self, layer, module, args, kwargs):
        """Keep what vision ``layer``'s attention takes in (the normed hidden states), to recompute
        its queries and keys when the strategy asks (``_VisionSource.attention``)."""
        images = self.pruner.encoding
        if images is not None and images.vision_source is not None:
            images.vision_source.inputs[layer] = args[0] if args else kwargs["hidden_states"]
        return None

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
        slots = images.vision_positions.to(tokens.device) + int(self.has_cls) - self.dropped_first
        full = tokens.new_zeros(crops, self.tokens_per_crop, width)
        if self.has_cls and not self.dropped_first:
            full[:, 0] = tokens[:, 0]
            tokens = tokens[:, 1:]
        return full.scatter(1, slots[..., None].expand(-1, -1, width), tokens)

    def _after_projector(self, module, args, output):
        images = self.pruner.encoding
        if images is None or images.vision_positions is None:
            return None
        return self._to_grid(images, output)

    def _pre_llm(self, run: PruneRun, layout, embeds):
        pruner = self.pruner
        if run.image_run.vision_positions is not None:
            kept = pruner.vision_kept_visual(run).to(embeds.device)
            visual = layout.visual_index
            keep = (layout.image_index < 0) | kept[torch.arange(visual.shape[0])[:, None], visual.clamp(min=0)]
            layout, index = layout.compact(keep)
            if renumbers(pruner.config.positions, "vision"):
                layout = layout.renumbered()
            embeds = gather_tokens(embeds, index)
        projector = self.projector() if pruner.needs.has(signals.PROJECTOR_INPUT) else None
        for stage in pruner.stages_at("projector"):
            layout, embeds = pruner.run_sequence_stage(run, stage, layout, embeds, projector=projector)
        return layout, embeds


class _VisionSource:
    """What a strategy may read from one call of the vision encoder (``ScoreContext.vision_attention``
    and ``pixel_patches``): a chosen layer's self-attention, recomputed beside SDPA from the layer's
    input, and the pixels behind every patch token, crop by crop in encoder order."""

    def __init__(self, adapter: LlavaAdapter, crop_pixels):
        self.adapter = adapter
        #: ``() -> [C, channels, H, W]``: every crop's pixels in encoder order (``LlavaAdapter.crop_pixels``).
        self.crop_pixels = crop_pixels
        #: Vision layer -> the input of its attention ``[C, T, D]`` (set by a hook during encoding).
        self.inputs: dict[int, torch.Tensor] = {}

    def attention(self, layer: int) -> VisionAttention:
        adapter = self.adapter
        if layer not in self.inputs:
            raise ValueError(f"vision layer {layer}'s attention was not recorded; declare Signal('vision_attention', {layer}) in needs()")
        x = self.inputs[layer]
        first, patches = int(adapter.has_cls), adapter.grid_side**2
        if x.shape[1] != first + patches:
            raise ValueError(
                f"vision layer {layer} saw {x.shape[1]} tokens per crop, not the full {first + patches}; "
                "its attention map needs every patch (no vision-site pruning before it)"
            )
        attn = compat.attention_parts(compat.layer_attention(adapter.vision_layers()[layer]))
        crops, tokens, _ = x.shape
        head_dim = attn.head_dim
        scaling = attn.scaling
        with torch.no_grad():
            q = attn.q_proj(x).view(crops, tokens, -1, head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(crops, tokens, -1, head_dim).transpose(1, 2)
            cls = attention_rows(q[:, :, :1], k, scaling).mean(dim=1)[:, 0, first:] if first else None

        def column_mass() -> torch.Tensor:
            with torch.no_grad():
                return received_attention(q[:, :, first:], k, scaling)[:, first:] / patches

        def rows(index: torch.Tensor) -> torch.Tensor:
            index = index.to(q.device)
            picked = torch.gather(q, 2, (first + index.clamp(min=0))[:, None, :, None].expand(-1, q.shape[1], -1, head_dim))
            with torch.no_grad():
                probs = attention_rows(picked, k, scaling).mean(dim=1)[..., first:]
            return probs * (index >= 0)[..., None].to(probs.dtype)

        return VisionAttention(rows=rows, keys=k.mean(dim=1)[:, first:], cls=cls, column_mass=column_mass)

    def pixel_patches(self) -> torch.Tensor:
        """``[C, P, channels, p, p]``: the (normalised) pixel values behind each crop's patch tokens,
        in the row-major order of the encoder's patch embedding."""
        pixels = self.crop_pixels()
        size = self.adapter.config.vision_config.patch_size
        crops, channels = pixels.shape[:2]
        side = self.adapter.grid_side
        cut = pixels[:, :, : side * size, : side * size].unfold(2, size, size).unfold(3, size, size)
        return cut.permute(0, 2, 3, 1, 4, 5).reshape(crops, side * side, channels, size, size)
