"""Model-family adapters. ``adapter_for(model)`` picks the one that handles a model."""

from __future__ import annotations

from torch import nn

from .base import Adapter, ImageInfo, UndoStack, VisualLayout
from . import clip, llava, llava_onevision, open_clip_vit, qwen2_vl, qwen3_vl, timm_vit, vision_encoder
from .clip import ClipVisionAdapter
from .llava import LlavaAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .open_clip_vit import OpenClipAdapter
from .qwen2_vl import QwenVLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .timm_vit import TimmViTAdapter

# The more specific adapter first: every family a class matches, the first one wins.
ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaOnevisionAdapter, LlavaAdapter, Qwen3VLAdapter, QwenVLAdapter, ClipVisionAdapter, TimmViTAdapter, OpenClipAdapter,
)
#: Family -> the signals (``vtoken.signals``) its models never provide, and why.
FAMILY_GAPS: dict[str, dict[str, str]] = {
    **llava.FAMILY_GAPS, **llava_onevision.FAMILY_GAPS, **qwen2_vl.FAMILY_GAPS, **qwen3_vl.FAMILY_GAPS,
    **clip.FAMILY_GAPS, **timm_vit.FAMILY_GAPS, **open_clip_vit.FAMILY_GAPS,
}
#: Family -> the signals only some of its models give, and which not (the family's verdict in
#: ``vtoken.methods()`` stays "runs"; wrap refuses the others).
FAMILY_LIMITS: dict[str, dict[str, str]] = {
    **llava.FAMILY_LIMITS, **llava_onevision.FAMILY_LIMITS, **timm_vit.FAMILY_LIMITS,
    **open_clip_vit.FAMILY_LIMITS,
}
#: Families whose models are a vision tower alone: they have only the vision site.
VISION_ONLY: frozenset[str] = frozenset({*clip.FAMILY_GAPS, *timm_vit.FAMILY_GAPS, *open_clip_vit.FAMILY_GAPS})
#: Family -> the pruning sites its models lack, and why.
MISSING_SITES: dict[str, dict[str, str]] = {
    **qwen2_vl.MISSING_SITES, **{family: vision_encoder.vision_only_missing_sites() for family in VISION_ONLY},
}


def adapter_for(model: nn.Module) -> type[Adapter]:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    families = ", ".join(a.family for a in ADAPTERS)
    # A PeftModel, or the tuner it holds (peft_model.base_model: a LoraModel, ...): both are peft's.
    from_peft = type(model).__module__.split(".")[0] == "peft" or type(model).__name__.startswith("Peft")
    peft = ("; for a PEFT model, wrap the model it holds (vtoken.wrap(peft_model.base_model.model, ...)) or wrap "
            "before peft.get_peft_model" if from_peft else "")
    raise ValueError(
        f"no vtoken adapter handles {type(model).__name__}; supported families: {families} "
        "(LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration, "
        "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration, "
        "Qwen3VLMoeForConditionalGeneration, CLIPModel, CLIPVisionModel, "
        f"SiglipModel, SiglipVisionModel, timm VisionTransformer, open_clip CLIP / VisionTransformer){peft}"
    )


__all__ = ["Adapter", "ADAPTERS", "FAMILY_GAPS", "FAMILY_LIMITS", "MISSING_SITES", "VISION_ONLY", "ImageInfo", "UndoStack", "VisualLayout", "adapter_for"]
