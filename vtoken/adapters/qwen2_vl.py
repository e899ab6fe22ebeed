"""Adapter for transformers Qwen2-VL (``Qwen2VLForConditionalGeneration``) and Qwen2.5-VL
(``Qwen2_5_VLForConditionalGeneration``): dynamic resolution, a packed vision tower, a 2x2 patch
merger as the projector, M-RoPE positions.

How the family maps onto the contract (:mod:`vtoken.adapters.base`):

- **Images and videos.** Each image (each video) has its own ``image_grid_thw`` (``video_grid_thw``):
  ``t x h x w`` patches, which the processor orders merge unit by merge unit, so LLM token ``j`` of an
  image is the merger's output for patches ``4j .. 4j+3``: a :class:`~vtoken.adapters.base.TokenMap`
  row of four sources with weight 1/4. (Qwen2.5-VL's tower permutes patches into attention windows
  and back; its merger output is in this same order.) A video's frames are its grids, one per
  temporal patch; a video is one unit of the budget, as an image.
- **Encoder "crops".** The tower runs every image of a call in one packed sequence, so a crop here is
  one whole image: ``tokens_per_crop`` is the largest patch count of the call, smaller images padded.
- **Positions.** The model computes the 3-D (t, h, w) M-RoPE ids of the full sequence before its LLM
  runs (``get_rope_index``; ``[3, B, L]``, or ``[4, B, L]`` with a leading text row under
  ``generate``); kept tokens keep them through every site (``positions="original"``), generated
  tokens get the unwrapped model's ids (``rope_deltas``) because ``generate`` derives them from the
  full attention mask. ``positions="contiguous"`` renumbers every component consecutively.
- **Sites.** Every site runs on the generic pipeline: inside the packed vision tower (whole merge
  units per frame; later blocks get the kept patches' ``cu_seqlens``, Qwen2.5-VL's window segments
  and their rotary positions: :mod:`vtoken.adapters.qwen_vision`), at the projector (in front of
  the LLM) and inside the LLM. The vision blocks run whole (no attention / MLP split), so ToMe,
  which merges between the two halves, is refused naming its signal.
- **Qwen3-VL** reuses this pipeline (:mod:`vtoken.adapters.qwen3_vl`: its DeepStack features follow
  the pruning there).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import IMAGE_SHAPES, DecoderSpec, FamilyDescription, ImageInfo, Modality, PositionScheme, ProjectorSpec, TokenMap, VisionSpec
from .pipeline import VisionLanguageAdapter
from .qwen_vision import PackedVisionSite, WindowOrder
from vtoken import compat, signals
from vtoken.context import Grid


#: Per family: the pruning sites its models lack (yet), and why (``vtoken.methods``).
MISSING_SITES: dict[str, dict[str, str]] = {}

#: Per family: the signals its models never provide (yet), and why (``vtoken.methods``).
FAMILY_GAPS = {
    family: {
        signals.ONE_GRID_PER_IMAGE: "the 2x2 merger packs four patches into each token (TokenPacker is trained "
                                    "for a LLaVA projector that reads one patch per token)",
        signals.VISION_CLS: "a vision tower without a CLS token",
        signals.VISION_BLOCK_KEYS: "no split vision blocks yet (vtoken does not run its packed blocks in two halves)",
    }
    for family in ("Qwen2-VL", "Qwen2.5-VL")
}


def _classes() -> tuple[type, ...]:
    from transformers import (
        Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel, Qwen2VLForConditionalGeneration, Qwen2VLModel,
    )

    return (Qwen2VLForConditionalGeneration, Qwen2VLModel, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel)


class QwenVLAdapter(PackedVisionSite, VisionLanguageAdapter):
    family = "qwen2_vl"
    encoder_kwargs = ("image_grid_thw",)
    # The forward embeds the prompt, scatters the image features into it and numbers it
    # (compute_3d_position_ids): after a vision stage it is fed the kept tokens alone, numbered as
    # the whole prompt (numbers_whole_prompt).
    embeds_then_scatters = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _classes())

    @staticmethod
    def inner_model(model: nn.Module) -> nn.Module:
        return model.model if hasattr(model, "lm_head") and hasattr(model, "model") else model

    def describe(self) -> FamilyDescription:
        config = self.config
        vision_config, text_config = config.vision_config, config.text_config
        visual = self.core.visual
        language_model = self.core.language_model
        heads = vision_config.num_heads
        width = vision_config.embed_dim if hasattr(vision_config, "embed_dim") else vision_config.hidden_size
        text_heads = text_config.num_attention_heads
        rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
        name = self.family_label()
        return FamilyDescription(
            name=name,
            vision=VisionSpec(
                layers=visual.blocks,
                prefix_tokens=0,
                grid=(0, 0),  # per image (image_grid_thw)
                patch_size=vision_config.patch_size,
                width=width,
                head_dim=width // heads,
                attention=lambda layer: None,
                read_layer=len(visual.blocks) - 1,
                sequence="packed",
                kind=vision_config.model_type,
                parts={"attention": "attn", "mlp": "mlp"},
                attention_module=lambda block: block.attn,
            ),
            projector=ProjectorSpec(visual.merger, unit=self.merge**2),
            decoder=DecoderSpec(
                stack=language_model,
                layers=language_model.layers,
                head=getattr(self.model, "lm_head", None),
                positions=PositionScheme("mrope", sections=tuple(rope.get("mrope_section", ())), interleaved=self.interleaved_mrope),
                width=text_config.hidden_size,
                head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // text_heads,
                token_inputs=self.decoder_token_inputs,
            ),
            gaps=self.family_gaps(),
        )

    #: Whether the M-RoPE sections interleave over the head dimension (Qwen3-VL) or come in blocks.
    interleaved_mrope = False
    #: The LLM's per-token inputs besides its embeddings (``DecoderSpec.token_inputs``).
    decoder_token_inputs: tuple[str, ...] = ()

    def family_label(self) -> str:
        return "Qwen2.5-VL" if "2_5" in self.config.model_type else "Qwen2-VL"

    def family_gaps(self) -> dict[str, str]:
        return FAMILY_GAPS[self.family_label()]

    @property
    def merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def visual_tokens_per_image(self) -> int | None:
        return None  # dynamic resolution

    def vision_tokens(self) -> int | None:
        return None

    def vision_tokens_for(self, visual_tokens: int) -> int | None:
        return visual_tokens * self.merge**2  # each LLM token is one merge unit of patches

    def vision_stage_keeps(self, stage, vision_tokens: int, visual_tokens: int) -> int:
        # The packed tower keeps whole merge units (the frame's budget is counted in them).
        unit = self.merge**2
        return stage.crop_budget(vision_tokens // unit, visual_tokens) * unit

    def numbers_whole_prompt(self, input_ids: torch.Tensor, kwargs: dict) -> bool:
        """The forward numbers its prompt from ``input_ids`` (M-RoPE ids of every image's grid), which
        a forward fed only the kept tokens no longer has: the whole prompt's ids are computed here as
        the forward computes them (setting the model's ``rope_deltas`` as it does) and handed to it;
        the LLM's entry keeps the kept tokens' ids. ``generate`` hands its own. False where the model
        cannot compute them (no ``mm_token_type_ids``)."""
        if kwargs.get("position_ids") is not None:
            return True
        positions = compat.model_mrope_ids(self.core, input_ids, kwargs)
        if positions is None:
            return False
        kwargs["position_ids"] = positions
        return True

    def vision_site_refusal(self) -> str | None:
        return None

    def full_attention(self, layer: int) -> bool:
        return layer in getattr(self.config.vision_config, "fullatt_block_indexes", range(len(self.vision_layers())))

    def window_order(self, images) -> WindowOrder | None:
        """Qwen2.5-VL's window order of this call's images, read off the model's own window index once
        per combination of image grids (:data:`~vtoken.adapters.base.IMAGE_SHAPES`, keyed by the
        tower's class and every value the index depends on)."""
        if not hasattr(self.config.vision_config, "fullatt_block_indexes"):
            return None  # Qwen2-VL: every block attends over whole frames
        visual = self.core.visual
        grids = tuple((len(i.grids), i.grids[0].height * self.merge, i.grids[0].width * self.merge) for i in images.images)
        key = ("qwen window order", type(visual), grids, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        return IMAGE_SHAPES.get(key, lambda: WindowOrder.of(
            *compat.qwen_vision_window_index(visual, torch.tensor(grids)), self.merge**2))

    def install_vision(self, undo) -> None:
        super().install_vision(undo)
        self.install_packed(undo)

    def one_grid_per_image(self) -> str | None:
        return None

    def modalities(self) -> tuple[Modality, ...]:
        image = Modality("image", "get_image_features", "pixel_values", self.config.image_token_id,
                         ("image_grid_thw",), self.image_infos, self.crop_pixels)
        video = Modality("video", "get_video_features", "pixel_values_videos", self.config.video_token_id,
                         ("video_grid_thw",), self.video_infos, self.video_pixels)
        return (image, video)

    # --- where the visual tokens are ------------------------------------------------------------
    def image_infos(self, arguments: dict[str, Any]) -> list[ImageInfo]:
        return self._infos(arguments.get("image_grid_thw"), "image_grid_thw")

    def video_infos(self, arguments: dict[str, Any]) -> list[ImageInfo]:
        return self._infos(arguments.get("video_grid_thw"), "video_grid_thw")

    def crop_pixels(self, arguments: dict[str, Any]) -> list[torch.Tensor]:
        return self._pixels_per_image(arguments["pixel_values"], arguments["image_grid_thw"])

    def video_pixels(self, arguments: dict[str, Any]) -> list[torch.Tensor]:
        return self._pixels_per_image(arguments["pixel_values_videos"], arguments["video_grid_thw"])

    @staticmethod
    def _pixels_per_image(pixels: torch.Tensor, grids: torch.Tensor) -> list[torch.Tensor]:
        """Each image's flattened patches ``[patches, patch values]`` (one "crop" per image)."""
        return list(torch.split(pixels, grids.prod(-1).tolist()))

    def _infos(self, grids: torch.Tensor | None, key: str) -> list[ImageInfo]:
        if grids is None:
            raise ValueError(f"{self.family_name} needs {key} from its processor")
        merge2 = self.merge**2
        per = self.tokens_per_crop_for_grids(grids)
        infos = []
        for image, (t, h, w) in enumerate(grids.tolist()):
            rows, cols = h // self.merge, w // self.merge
            tokens = t * rows * cols
            index = image * per + torch.arange(tokens * merge2).view(tokens, merge2)
            token_map = TokenMap(index, torch.full((tokens, merge2), 1.0 / merge2))
            frame_grids = tuple(Grid(f * rows * cols, rows, cols, cols) for f in range(t))
            geometry = {"kind": "grid", "grid": (rows, cols), "first": 0}
            infos.append(ImageInfo(-1, -1, tokens, frame_grids, [image], token_map, geometry))
        return infos

    @staticmethod
    def tokens_per_crop_for_grids(grids: torch.Tensor) -> int:
        return int(grids.prod(-1).max())

    def tokens_per_crop_for(self, images: list[ImageInfo]) -> int:
        return self._span(images)

    @staticmethod
    def _span(images: list[ImageInfo]) -> int:
        """The largest patch count of the call (each image is one "crop")."""
        return max(image.token_map.index.numel() for image in images)

    def candidate_local(self, images: list[ImageInfo]) -> torch.Tensor:
        """``[images, max patches]``: the LLM token each patch is merged into, -1 past an image's end."""
        per = self._span(images)
        out = torch.full((len(images), per), -1, dtype=torch.long)
        for i, image in enumerate(images):
            patches = image.token_map.index.numel()
            out[i, :patches] = torch.arange(patches) // self.merge**2
        return out
