"""Every vision-only family vtoken supports, as the generic vision-only suite sees it: a tiny random
model of the family (a 14 x 14 grid of 196 patches, 6 blocks, tiny width) and the call of its own API
that gives an image's embedding. A new vision-only adapter joins ``test_vision_only.py`` by adding
one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

IMAGE = 112
PATCH = 8
PATCHES = (IMAGE // PATCH) ** 2  # 196, ViT-B/16 at 224 px
DEPTH = 6
WIDTH = 64
HEADS = 4


@dataclass(frozen=True)
class VisionFamily:
    make: Callable[..., nn.Module]  # (attn="sdpa", seed=0) -> a tiny model in eval mode
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # the model's own image embedding
    label: str  # as vtoken.methods() names the family
    prefix: int  # tokens before the patches (CLS, registers)
    has_cls: bool = True
    #: Whether its attention implementation can be switched (sdpa / eager).
    switchable: bool = True


def _hf_vision(kind: str):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    config = CLIPVisionConfig if kind == "clip" else SiglipVisionConfig
    return config(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                  image_size=IMAGE, patch_size=PATCH)


def _with_attention(model, attn: str):
    model.set_attn_implementation(attn)
    return model.eval()


def _pooled(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def make_clip(attn: str = "sdpa", seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        vision_config=_hf_vision("clip").to_dict(),
        text_config=dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
                         vocab_size=64, max_position_embeddings=16),
        projection_dim=32,
    )
    return _with_attention(CLIPModel(config), attn)


def make_clip_vision(attn: str = "sdpa", seed: int = 0):
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    return _with_attention(CLIPVisionModel(_hf_vision("clip")), attn)


def make_siglip(attn: str = "sdpa", seed: int = 0):
    from transformers import SiglipVisionModel

    torch.manual_seed(seed)
    return _with_attention(SiglipVisionModel(_hf_vision("siglip")), attn)


def _timm(attn: str, seed: int, **options):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMAGE, patch_size=PATCH, depth=DEPTH, embed_dim=WIDTH,
        num_heads=HEADS, num_classes=10, **options,
    ).eval()
    for block in model.blocks:
        block.attn.fused_attn = attn == "sdpa"
    return model


def make_timm(attn: str = "sdpa", seed: int = 0):
    return _timm(attn, seed)


def make_timm_registers(attn: str = "sdpa", seed: int = 0):
    return _timm(attn, seed, reg_tokens=4)


def make_timm_avg(attn: str = "sdpa", seed: int = 0):
    return _timm(attn, seed, class_token=False, global_pool="avg")


def make_open_clip_tower(attn: str = "sdpa", seed: int = 0):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS,
                             mlp_ratio=2.0, output_dim=32).eval()


def make_open_clip(attn: str = "sdpa", seed: int = 0):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=DEPTH, head_width=WIDTH // HEADS, mlp_ratio=2.0),
        text_cfg=dict(context_length=16, vocab_size=64, width=WIDTH, heads=HEADS, layers=2),
    ).eval()


VISION_FAMILIES: dict[str, VisionFamily] = {
    "clip": VisionFamily(make_clip, lambda m, x: _pooled(m.get_image_features(pixel_values=x)), "CLIP", 1),
    "clip_vision": VisionFamily(make_clip_vision, lambda m, x: m(pixel_values=x).last_hidden_state[:, 0], "CLIP", 1),
    "siglip": VisionFamily(make_siglip, lambda m, x: m(pixel_values=x).pooler_output, "SigLIP", 0, has_cls=False),
    "timm": VisionFamily(make_timm, lambda m, x: m(x), "timm ViT", 1),
    "timm_registers": VisionFamily(make_timm_registers, lambda m, x: m.forward_head(m.forward_features(x)), "timm ViT", 5),
    "timm_avg": VisionFamily(make_timm_avg, lambda m, x: m(x), "timm ViT", 0, has_cls=False),
    "open_clip_tower": VisionFamily(make_open_clip_tower, lambda m, x: m(x), "open_clip ViT", 1, switchable=False),
    "open_clip": VisionFamily(make_open_clip, lambda m, x: m.encode_image(x), "open_clip ViT", 1, switchable=False),
}


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def blocks_of(model: nn.Module) -> nn.Module:
    """The vision blocks, read off the model the test's own way (not through vtoken)."""
    for path in ("vision_model.encoder.layers", "encoder.layers", "blocks", "visual.transformer.resblocks", "transformer.resblocks"):
        module = model
        try:
            for name in path.split("."):
                module = getattr(module, name)
        except AttributeError:
            continue
        return module
    raise AttributeError(type(model).__name__)
