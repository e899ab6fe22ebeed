"""Model-family adapters. ``adapter_for(model)`` picks the one that handles a model."""

from __future__ import annotations

from torch import nn

from .base import Adapter, ImageInfo, UndoStack, VisualLayout
from . import llava, llava_onevision, qwen2_vl
from .llava import LlavaAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import QwenVLAdapter

# The more specific adapter first: every family a class matches, the first one wins.
ADAPTERS: tuple[type[Adapter], ...] = (LlavaOnevisionAdapter, LlavaAdapter, QwenVLAdapter)
#: Family -> the signals (``vtoken.signals``) its models never provide, and why.
FAMILY_GAPS: dict[str, dict[str, str]] = {**llava.FAMILY_GAPS, **llava_onevision.FAMILY_GAPS, **qwen2_vl.FAMILY_GAPS}


def adapter_for(model: nn.Module) -> type[Adapter]:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    families = ", ".join(a.family for a in ADAPTERS)
    raise ValueError(
        f"no vtoken adapter handles {type(model).__name__}; supported families: {families} "
        "(LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration, "
        "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)"
    )


__all__ = ["Adapter", "ADAPTERS", "FAMILY_GAPS", "ImageInfo", "UndoStack", "VisualLayout", "adapter_for"]
