"""Adapter for transformers LLaVA 1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT
(``LlavaNextForConditionalGeneration``).

Where the visual tokens are: the processor expands each image into runs of ``image_token_id``
placeholders; the model scatters the image features into them in flattened (batch, position) order,
so image i owns the i-th block of placeholders. LLaVA-NeXT (AnyRes) packs a base view and the
unpadded high-resolution crops with one newline embedding after each row; the token-to-crop mapping
is obtained by running the model's own ``pack_image_features`` on crop-token ids, so it always
matches the installed transformers.

The sites are realised by the generic pipeline (:mod:`vtoken.adapters.pipeline`); this module says
what LLaVA is: its description and its token maps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaModel, LlavaNextForConditionalGeneration, LlavaNextModel

from .base import IMAGE_SHAPES, DecoderSpec, FamilyDescription, ImageInfo, ProjectorSpec, TokenMap, VisionSpec
from .clip import hf_encoder_halves
from .pipeline import LLM_ATTENTION_LIMITS, VisionLanguageAdapter
from vtoken import compat, signals
from vtoken.context import Grid
from vtoken.model_dims import LLAVA_VISION_TOWERS

_NEXT_CLASSES = (LlavaNextForConditionalGeneration, LlavaNextModel)
_CLASSES = (LlavaForConditionalGeneration, LlavaModel, *_NEXT_CLASSES)


#: The vision towers (``vision_config.model_type``) whose layers and token grid this adapter reads
#: (the towers whose FLOPs ``vtoken.flops`` models: one list for both).
VISION_TOWERS = LLAVA_VISION_TOWERS

#: Per family this adapter serves: the signals its models never provide, and why (``vtoken.methods``).
FAMILY_GAPS = {
    "LLaVA-1.5": {},
    "LLaVA-NeXT": {signals.ONE_GRID_PER_IMAGE: "AnyRes gives a base view, high-resolution crops and newline tokens"},
}
#: Family -> the signals only some of its models give (``vtoken.methods()``'s ``limits``; see
#: :meth:`LlavaAdapter.one_grid_per_image`, which names the model's reason at wrap).
FAMILY_LIMITS = {
    "LLaVA-1.5": {
        **LLM_ATTENTION_LIMITS,
        signals.ONE_GRID_PER_IMAGE: "not on models that feed the CLS token to the projector besides the grid "
                                    "(vision_feature_select_strategy='full'), nor on a tower without CLS under 'default'",
        signals.PATCH_GRID: "not on a tower without CLS under vision_feature_select_strategy='default' (its grid "
                            "misses a patch)",
    },
    "LLaVA-NeXT": dict(LLM_ATTENTION_LIMITS),
}


class LlavaAdapter(VisionLanguageAdapter):
    family = "llava"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _CLASSES)

    @staticmethod
    def inner_model(model: nn.Module) -> nn.Module:
        return model.model if hasattr(model, "lm_head") and hasattr(model, "model") else model

    def __init__(self, model: nn.Module):
        self.core = self.inner_model(model)
        self.is_next = isinstance(self.core, LlavaNextModel)
        vision_config = self.core.config.vision_config
        if vision_config.model_type not in VISION_TOWERS:
            # LLaVA's classes also hold other towers (Pixtral's: images of any size in one packed
            # sequence, 2-D RoPE, row-break tokens), whose token layout this adapter does not describe.
            raise ValueError(
                f"vtoken's {self.family_label()} adapter reads CLIP and SigLIP vision towers; this model's is "
                f"{type(self.core.vision_tower).__name__} (vision_config.model_type={vision_config.model_type!r}), "
                "which it does not support yet: use the model unwrapped"
            )
        self.grid_side = vision_config.image_size // vision_config.patch_size
        self.has_cls = vision_config.model_type == "clip_vision_model"
        self.select = self.core.config.vision_feature_select_strategy
        super().__init__(model)

    def describe(self) -> FamilyDescription:
        config = self.config
        vision_config, text_config = config.vision_config, config.text_config
        tower = self.core.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        language_model = self.core.language_model
        return FamilyDescription(
            name=self.family_label(),
            vision=VisionSpec(
                layers=layers,
                prefix_tokens=int(self.has_cls),
                grid=(self.grid_side, self.grid_side),
                patch_size=vision_config.patch_size,
                width=vision_config.hidden_size,
                head_dim=_head_dim(vision_config),
                attention=lambda layer: compat.attention_parts(compat.layer_attention(layers[layer])),
                read_layer=self._read_layers(len(layers))[-1],
                kind=vision_config.model_type,
                halves=hf_encoder_halves,
            ),
            projector=ProjectorSpec(self.core.multi_modal_projector, dropped_prefix=int(self.select == "default")),
            decoder=DecoderSpec(
                stack=language_model,
                layers=language_model.layers,
                head=getattr(self.model, "lm_head", None),  # absent on a bare model
                width=text_config.hidden_size,
                head_dim=_head_dim(text_config),
            ),
            gaps={},
        )

    def family_label(self) -> str:
        return "LLaVA-NeXT" if self.is_next else "LLaVA-1.5"

    embeds_then_scatters = True

    def grid_packing(self) -> str | None:
        return compat.ANYRES_PACKING if self.is_next else None

    def _read_layers(self, num: int) -> list[int]:
        """The vision blocks (0-based, ascending) whose outputs the projector reads: hidden_states[j]
        is the output of block j - 1 (hidden_states[0]: the embeddings)."""
        layers = self.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        return sorted(max(j % (num + 1) - 1, 0) for j in layers)

    def first_read_layer(self) -> int:
        return self._read_layers(len(self.vision_layers()))[0]

    def visual_tokens_per_image(self) -> int | None:
        return None if self.is_next else self.tokens_per_crop

    def one_grid_per_image(self) -> str | None:
        if self.is_next:
            return "LLaVA-NeXT AnyRes: a base view, high-resolution crops and newline tokens"
        if self.has_cls and self.select != "default":
            return "the CLS token besides the grid (vision_feature_select_strategy='full'; use 'default')"
        if not self.has_cls and self.select == "default":
            return "a grid missing its first patch (a tower without CLS under vision_feature_select_strategy='default')"
        return None

    def incomplete_patch_grid(self) -> str | None:
        if not self.has_cls and self.select == "default":
            return ("a grid missing its first patch (a tower without CLS under vision_feature_select_strategy='default' "
                    "drops a patch; 'full' keeps them all)")
        return None

    def vision_site_refusal(self) -> str | None:
        if not self.has_cls and self.select == "default":
            return (
                "vision-site pruning needs a tower with a CLS token when vision_feature_select_strategy="
                "'default' (LLaVA then drops the first token of the pruned sequence); use the projector site"
            )
        if self.is_next and self.select != "default":
            if not self.has_cls:
                return (
                    "vision-site pruning on LLaVA-NeXT needs a tower with a CLS token under vision_feature_select_strategy="
                    "'default'; this tower has no CLS token: use the projector site (site='projector') or the LLM"
                )
            return "vision-site pruning on LLaVA-NeXT needs vision_feature_select_strategy='default'"
        return None

    # --- where the visual tokens are ------------------------------------------------------------
    def image_infos(self, arguments: dict[str, Any]) -> list[ImageInfo]:
        pixel_values, image_sizes = arguments["pixel_values"], arguments.get("image_sizes")
        if self.is_next:
            return self._next_images(pixel_values, image_sizes)
        return self._plain_images(pixel_values)

    def _plain_images(self, pixel_values) -> list[ImageInfo]:
        per = self.tokens_per_crop
        first_patch = self.description.first_patch_slot  # the CLS token stays a visual token in "full" mode
        grid = (Grid(first_patch, self.grid_side, self.grid_side, self.grid_side),)
        geometry = {"kind": "grid", "grid": (self.grid_side, self.grid_side), "first": first_patch}
        return [
            ImageInfo(-1, -1, per, grid, [i], TokenMap.one_to_one(i * per + torch.arange(per)), geometry)
            for i in range(pixel_values.shape[0])
        ]

    def crops_per_image(self, image_sizes) -> list[int]:
        config = self.config
        return [
            compat.image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in image_sizes
        ]

    def crop_pixels(self, arguments: dict[str, Any]) -> torch.Tensor:
        """``[C, channels, H, W]``: every crop the encoder sees, in encoder order (LLaVA-NeXT's
        ``[images, max crops, ...]`` without the padding past each image's crops)."""
        pixel_values = arguments["pixel_values"]
        if pixel_values.dim() == 5:
            crops = self.crops_per_image(arguments.get("image_sizes"))
            return torch.cat([p[:n] for p, n in zip(pixel_values, crops)])
        return pixel_values

    def _next_images(self, pixel_values, image_sizes) -> list[ImageInfo]:
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes from its processor")
        images, first = [], 0
        for i, n in enumerate(self.crops_per_image(image_sizes)):
            size = image_sizes[i : i + 1]
            shape = (tuple(int(v) for v in size[0]),)
            images.append(self._image_of_shape(first, n, shape, lambda: self._next_image_shape(n, size)))
            first += n
        return images

    def _image_of_shape(self, first: int, crops: int, shape: tuple, read) -> ImageInfo:
        """The :class:`ImageInfo` of an image whose first crop is ``first``: its token map, grids and
        geometry as ``read()`` reads them off the model (numbered from crop 0), once per image shape
        (:data:`IMAGE_SHAPES`, keyed by ``shape``, the crops and every config value a map depends on),
        its map numbered from that crop."""
        config = self.config
        key = (type(self.core), crops, *shape, self.tokens_per_crop, self.grid_side, self.select,
               config.vision_config.image_size, repr(config.image_grid_pinpoints))
        token_map, grids, geometry = IMAGE_SHAPES.get(key, read)
        return ImageInfo(-1, -1, token_map.num_tokens, grids, list(range(first, first + crops)),
                         token_map.shifted(first * self.tokens_per_crop), dict(geometry))

    def _next_image_shape(self, crops: int, size) -> tuple[TokenMap, tuple, dict]:
        """One image's token map (numbered from crop 0), grids and geometry: the model's own packing
        run on crop-token ids, with -1 for the newline, says where each crop token lands (unpadding
        and newlines included)."""
        per, side = self.tokens_per_crop, self.grid_side
        ids = [torch.arange(crops * per, dtype=torch.float64).view(crops, per, 1)]
        (tokens,) = compat.pack_anyres_features(
            self.core, ids, size, self.select, image_newline=torch.tensor([-1.0], dtype=torch.float64)
        )
        source = tokens.view(-1).round().long().cpu()
        grids = [Grid(0, side, side, side)]
        rest = source[side * side :]
        rows = int((rest < 0).sum())
        width = (rest.numel() - rows) // rows if rows else 0
        if crops > 1 and width > 0:  # an unpadded grid with no column (an extreme aspect ratio) is newlines only
            grids.append(Grid(side * side, rows, width, width + 1))
        return TokenMap.one_to_one(source), tuple(grids), self._next_geometry(size[0], crops)

    def _next_geometry(self, size, crops: int) -> dict:
        config = self.config
        height, width = (int(v) for v in size)
        rows, cols = compat.anyres_grid_shape((height, width), config.image_grid_pinpoints, config.vision_config.image_size)
        return {
            "kind": "anyres", "grid": (self.grid_side, self.grid_side), "image_size": (height, width),
            "crop_grid": (int(rows), int(cols)), "crops": crops, "tokens_per_crop": self.tokens_per_crop,
        }


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
