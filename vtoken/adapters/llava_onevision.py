"""Adapter for transformers LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``), VFlowOpt's
own target model: a SigLIP tower without CLS (``vision_feature_select_strategy='full'``), a Qwen2 LLM.

What differs from LLaVA-NeXT, and how the token map follows it:

- **AnyRes-Max.** An image is a base view plus the crops of its best ``image_grid_pinpoints``
  resolution; the crops' grid is unpadded and then, when it holds more than ``max`` crops' worth of
  patches (``vision_aspect_ratio='anyres_max_9'``: ratio ``sqrt(h w / (9 * 27^2)) > 1.1``),
  bilinearly interpolated down, so one LLM token mixes up to four encoder patches. The map is read
  off the model's own ``pack_image_features`` run on each patch's (row, column) in the crop grid:
  bilinear interpolation reproduces a linear ramp exactly, so each output gives the fractional
  source coordinate, hence its four sources and their weights (:class:`~vtoken.adapters.base.TokenMap`).
- **Newlines.** One newline token closes every row of the crop grid; an image with a single crop
  (and every image of a multi-image sample, ``batch_num_images``) is its base view plus one newline.
- **Video** (``pixel_values_videos``, ``get_video_features``): every frame is one crop of the
  encoder, its projected patches pooled 2x2 by bilinear interpolation (27x27 -> 14x14 patches at
  384 px), one newline after the whole video. A video is one unit of the token budget (as an image
  is); its map is read off the model's own ``apply_pooling`` as for AnyRes-Max. A prompt holds
  images or videos, not both (refused with a message).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from .base import ImageInfo, Modality, TokenMap
from .llava import LlavaAdapter
from .pipeline import LLM_ATTENTION_LIMITS
from vtoken import compat, signals
from vtoken.context import Grid

_CLASSES = (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)

#: The signals LLaVA-OneVision models never provide, and why (``vtoken.methods``).
FAMILY_GAPS = {
    "LLaVA-OneVision": {
        signals.ONE_GRID_PER_IMAGE: "AnyRes-Max gives a base view, interpolated high-resolution crops and newline tokens",
        signals.VISION_CLS: "a SigLIP tower without a CLS token",
    },
}
FAMILY_LIMITS = {"LLaVA-OneVision": dict(LLM_ATTENTION_LIMITS)}

#: Fractional coordinates closer than this to an integer are that integer (float64 round-off).
_SNAP = 1e-9


class LlavaOnevisionAdapter(LlavaAdapter):
    family = "llava_onevision"
    encoder_kwargs = (
        "image_sizes", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio", "batch_num_images",
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _CLASSES)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.is_next = True  # crops, AnyRes and newlines, as LLaVA-NeXT

    def family_label(self) -> str:
        return "LLaVA-OneVision"

    def visual_tokens_per_image(self) -> int | None:
        return None

    def one_grid_per_image(self) -> str | None:
        return "LLaVA-OneVision AnyRes-Max: a base view, (interpolated) high-resolution crops and newline tokens"

    def vision_site_refusal(self) -> str | None:
        if self.tokens_per_crop != self.description.vision.patches:
            return "vision-site pruning on LLaVA-OneVision needs every crop token to be a patch (a tower without CLS under 'full')"
        return None

    def modalities(self) -> tuple[Modality, ...]:
        video = Modality(
            "video", "get_video_features", "pixel_values_videos", self.config.video_token_id,
            ("vision_feature_layer", "vision_feature_select_strategy"), self.video_infos, self.video_pixels,
        )
        return (*super().modalities(), video)

    # --- videos ---------------------------------------------------------------------------------
    @staticmethod
    def video_pixels(arguments: dict[str, Any]) -> torch.Tensor:
        """``[videos * frames, channels, H, W]``: every frame, as the encoder sees them."""
        return arguments["pixel_values_videos"].flatten(0, 1)

    def video_infos(self, arguments: dict[str, Any]) -> list[ImageInfo]:
        """One :class:`ImageInfo` per video: each frame's pooled grid, then one newline."""
        videos, frames = arguments["pixel_values_videos"].shape[:2]
        per, side = self.tokens_per_crop, self.grid_side
        # The model's own pooling, run on each patch's (row, column): fractional where it interpolates.
        token = torch.arange(per, dtype=torch.float64)
        coordinates = torch.stack([torch.div(token, side, rounding_mode="floor"), token % side], dim=-1)
        pooled = compat.pool_video_features(self.core, coordinates[None])[0]  # [pooled tokens, 2]
        pooled_side = int(round(pooled.shape[0] ** 0.5))
        infos = []
        for video in range(videos):
            maps = [
                _bilinear_map(pooled, lambda y, x, f=(video * frames + frame): f * per + y * side + x)
                for frame in range(frames)
            ]
            token_map = TokenMap.concat([*maps, TokenMap.one_to_one(torch.tensor([-1]))])
            grids = tuple(Grid(f * pooled.shape[0], pooled_side, pooled_side, pooled_side) for f in range(frames))
            geometry = {"kind": "video", "frames": frames, "grid": (pooled_side, pooled_side)}
            crops = list(range(video * frames, (video + 1) * frames))
            infos.append(ImageInfo(-1, -1, token_map.num_tokens, grids, crops, token_map, geometry))
        return infos

    # --- where the visual tokens are ------------------------------------------------------------
    def crops_per_image(self, image_sizes, batch_num_images=None) -> list[int]:
        """Crops the encoder sees per image: every crop of AnyRes for a sample with one image, the
        base view alone for each image of a multi-image sample (``batch_num_images``)."""
        if batch_num_images is None:
            patching = [True] * len(image_sizes)
        else:
            patching = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        anyres = super().crops_per_image(image_sizes)
        return [n if patch else 1 for n, patch in zip(anyres, patching)]

    def crop_pixels(self, arguments: dict[str, Any]) -> torch.Tensor:
        pixel_values = arguments["pixel_values"]
        if pixel_values.dim() == 5:
            crops = self.crops_per_image(arguments["image_sizes"], arguments.get("batch_num_images"))
            return torch.cat([p[:n] for p, n in zip(pixel_values, crops)])
        return pixel_values

    def image_infos(self, arguments: dict[str, Any]) -> list[ImageInfo]:
        image_sizes = arguments.get("image_sizes")
        if image_sizes is None:
            raise ValueError("LLaVA-OneVision needs image_sizes from its processor")
        aspect = arguments.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        crops_per_image = self.crops_per_image(image_sizes, arguments.get("batch_num_images"))
        images, first = [], 0
        for n, size in zip(crops_per_image, image_sizes):
            images.append(self._image(first, n, size, aspect))
            first += n
        return images

    def _image(self, first: int, crops: int, size, aspect: str) -> ImageInfo:
        size = tuple(int(v) for v in size)
        # Read off the model's packing once per shape (every prefill of a served model has the same few).
        return self._image_of_shape(first, crops, (size, aspect), lambda: self._image_shape(crops, size, aspect))

    def _image_shape(self, crops: int, size: tuple[int, int], aspect: str) -> tuple[TokenMap, tuple, dict]:
        """An image's token map (numbered from crop 0), grids and geometry."""
        per, side = self.tokens_per_crop, self.grid_side
        base = TokenMap.one_to_one(torch.cat([torch.arange(per), torch.tensor([-1])]))
        grid = Grid(0, side, side, side)
        if crops == 1:
            return base, (grid,), {"kind": "grid", "grid": (side, side), "first": 0}
        rows, cols = compat.anyres_grid_shape(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
        if rows * cols != crops - 1:
            raise ValueError(f"image of size {size} has {crops - 1} crops, not {rows}x{cols}")
        coordinates = self._packed_coordinates(crops, size, aspect)  # [T, 2]: (row, col) in the crop grid
        crop_grid = self._crop_grid_map(coordinates, int(cols))
        token_map = TokenMap.concat([base[:per], crop_grid])
        newlines = int((~crop_grid.has_origin).sum())
        width = (crop_grid.num_tokens - newlines) // max(newlines, 1)
        # An unpadded grid with no column (an extreme aspect ratio) is newlines only: no patch grid.
        grids = (grid, Grid(per, newlines, width, width + 1)) if width > 0 else (grid,)
        geometry = {
            "kind": "anyres", "grid": (side, side), "image_size": size,
            "crop_grid": (int(rows), int(cols)), "crops": crops, "tokens_per_crop": per,
        }
        return token_map, grids, geometry

    def _packed_coordinates(self, crops: int, size, aspect: str) -> torch.Tensor:
        """``[T, 2]``: for each token the model packs after the base view, the (row, column) in the
        crop grid it was interpolated from (fractional when interpolated), ``(-1, -1)`` for newlines.
        The model's own packing runs on coordinate features, so unpadding and interpolation are
        always those of the installed transformers."""
        side, per = self.grid_side, self.tokens_per_crop
        rows, cols = compat.anyres_grid_shape(tuple(int(v) for v in size), self.config.image_grid_pinpoints,
                                              self.config.vision_config.image_size)
        crop = torch.arange(crops - 1, dtype=torch.float64)[:, None]
        token = torch.arange(per, dtype=torch.float64)[None, :]
        row = torch.div(crop, cols, rounding_mode="floor") * side + torch.div(token, side, rounding_mode="floor")
        col = (crop % cols) * side + token % side
        features = torch.stack([row, col], dim=-1)  # [crops - 1, per, 2]
        features = torch.cat([torch.zeros(1, per, 2, dtype=torch.float64), features])  # the base view
        newline = torch.full((2,), -1.0, dtype=torch.float64)
        return compat.pack_anyres_max_features(self.core, [features], [size], newline, aspect)[0][per:]

    def _crop_grid_map(self, coordinates: torch.Tensor, cols: int) -> TokenMap:
        """The bilinear sources of each packed crop-grid token (row, column in the grid of crops),
        numbered from the image's first crop (the base view's)."""
        side, per = self.grid_side, self.tokens_per_crop

        def slot(y, x):
            crop = 1 + (y // side) * cols + x // side
            return crop * per + (y % side) * side + x % side

        return _bilinear_map(coordinates, slot)


def _bilinear_map(coordinates: torch.Tensor, slot) -> TokenMap:
    """A :class:`TokenMap` from the fractional source coordinates ``[T, 2]`` (row, column) that
    ``interpolate(mode="bilinear")`` gives a linear ramp: each token's (up to) four neighbouring
    cells with their bilinear weights; ``slot(rows, cols)`` numbers the cells. Negative coordinates
    mark tokens with no source (newlines)."""
    is_token = coordinates[:, 0] >= 0
    coordinates = coordinates.clamp(min=0)
    base = torch.floor(coordinates + _SNAP)
    frac = (coordinates - base).clamp(min=0)
    frac = torch.where(frac < _SNAP, 0.0, frac)
    index, weight = [], []
    for dy in (0, 1):
        for dx in (0, 1):
            share = (frac[:, 0] if dy else 1 - frac[:, 0]) * (frac[:, 1] if dx else 1 - frac[:, 1])
            y, x = (base[:, 0] + dy).long(), (base[:, 1] + dx).long()
            used = is_token & (share > 0)
            index.append(torch.where(used, slot(y, x), -1))
            weight.append(torch.where(used, share, 0.0).float())
    return TokenMap(torch.stack(index, dim=1), torch.stack(weight, dim=1)).without_unused_entries()
