"""Every model family vtoken supports, as the generic suites see it: how to build a tiny random model
of the family, a left-padded batch for it (images of different sizes where the family allows), and a
batch whose first sample holds two images, the second none and the third one.

A new adapter joins every generic suite (``test_all_families.py``, ``test_all_methods.py``,
``test_generation.py``, ``test_threads.py``) by adding one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tiny import (
    padded_crops, two_none_one, llava_inputs, llava_next_inputs, next_image_tokens, onevision_image_tokens, onevision_inputs,
    qwen_inputs, tiny_llava, tiny_llava_next, tiny_llava_onevision, tiny_qwen2_vl,
)


@dataclass(frozen=True)
class Family:
    make: Callable[..., nn.Module]  # (attn="sdpa", seed=0) -> a tiny model in eval mode
    inputs: Callable[[nn.Module], dict]  # a left-padded batch of 3 samples, one image each
    several_images: Callable[[nn.Module], dict]  # 2 images, none, 1 image
    #: The family as ``vtoken.methods()`` names it.
    label: str = ""
    #: A vision layer after which pruning is allowed (before the layer the projector reads).
    vision_layer: int = 1
    #: Whether the family prunes inside its vision encoder (Qwen-VL's packed tower: not yet).
    vision_site: bool = True
    #: ``(model, x) -> position ids`` a direct forward of the unwrapped model gives (``[B, L]``, or
    #: ``[3, B, L]`` for M-RoPE); None: every slot numbered 0..L-1, pads included.
    positions: Callable | None = None

    def refusal(self, method: str, options: dict) -> str | None:
        """Why ``wrap`` refuses ``method`` with ``options`` on this family's tiny model (None if it
        does not): a method's default schedule may use a site the family lacks."""
        import vtoken

        model = self.make()
        try:
            vtoken.wrap(model, method, **options)
        except ValueError as error:
            return str(error)
        vtoken.unwrap(model)
        return None

    def supports(self, options: dict) -> bool:
        """Whether this family runs a method with ``options`` (a vision-site stage needs ``vision_site``)."""
        stages = options.get("stages") or [options]
        return self.vision_site or all(stage.get("site") != "vision" for stage in stages)


def _llava_several_images(model) -> dict:
    g = torch.Generator().manual_seed(3)
    ids, mask = two_none_one([16, 16, 16])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, 32, 32, generator=g)}


def _next_several_images(model) -> dict:
    from vtoken import compat

    sizes = [(32, 64), (64, 64), (64, 40)]
    ids, mask = two_none_one(next_image_tokens(model, sizes))
    crops = [compat.image_size_to_num_patches(s, model.config.image_grid_pinpoints, 32) for s in sizes]
    pixels = padded_crops(crops, torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_sizes": torch.tensor([list(s) for s in sizes])}


def _onevision_several_images(model) -> dict:
    """Sample 0 holds two images (OneVision then encodes only their base views: batch_num_images),
    sample 2 one image (all its AnyRes-Max crops)."""
    from vtoken import compat

    sizes = [(32, 64), (64, 64), (64, 40)]
    batch_num_images = torch.tensor([2, 0, 1])
    counts = onevision_image_tokens(model, sizes[:2], batch_num_images=[2]) + onevision_image_tokens(model, sizes[2:])
    ids, mask = two_none_one(counts)
    crops = [1, 1, compat.image_size_to_num_patches(sizes[2], model.config.image_grid_pinpoints, 32)]
    pixels = padded_crops(crops, torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_sizes": torch.tensor([list(s) for s in sizes]), "batch_num_images": batch_num_images}


def _qwen_several_images(model) -> dict:
    return qwen_inputs(model, grids=((1, 4, 6), (1, 4, 4), (1, 6, 4)), images_per_sample=[2, 0, 1])


def _qwen_positions(model, x) -> torch.Tensor:
    """The M-RoPE ids of a direct forward: the model's own ``get_rope_index``."""
    positions, _ = model.model.get_rope_index(
        x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"], image_grid_thw=x.get("image_grid_thw"),
        attention_mask=x["attention_mask"],
    )
    return positions


FAMILIES: dict[str, Family] = {
    "llava": Family(tiny_llava, lambda m: llava_inputs(3), _llava_several_images, "LLaVA-1.5"),
    "next": Family(tiny_llava_next, llava_next_inputs, _next_several_images, "LLaVA-NeXT"),
    "onevision": Family(tiny_llava_onevision, onevision_inputs, _onevision_several_images, "LLaVA-OneVision"),
    "qwen2": Family(tiny_qwen2_vl, qwen_inputs, _qwen_several_images, "Qwen2-VL", positions=_qwen_positions),
    "qwen3": Family(lambda attn="sdpa", seed=0: tiny_qwen2_vl(attn, seed, version="3"), qwen_inputs,
                    _qwen_several_images, "Qwen3-VL", positions=_qwen_positions),
    "qwen2_5": Family(lambda attn="sdpa", seed=0: tiny_qwen2_vl(attn, seed, version="2.5"), qwen_inputs,
                      _qwen_several_images, "Qwen2.5-VL", positions=_qwen_positions),
}


def cases(methods: list[str], families=None) -> list:
    """``(method, family)`` pytest params for every pair, the pairs ``vtoken.methods()`` says the
    family cannot serve marked skip with its reason (``wrap`` refuses them; tested apart)."""
    import pytest

    import vtoken

    runs = {m["name"]: m["families"] for m in vtoken.methods()}
    out = []
    for method in methods:
        for name in families or FAMILIES:
            verdict = runs[method][FAMILIES[name].label]
            marks = [] if verdict == "runs" else [pytest.mark.skip(reason=f"{method} on {name}: {verdict}")]
            out.append(pytest.param(method, name, marks=marks, id=f"{method}-{name}"))
    return out

