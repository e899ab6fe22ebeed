"""Adapter for timm ``VisionTransformer`` models (``timm.create_model("vit_base_patch16_224")``, DeiT,
register ViTs, ViTs with global average pooling and no class token), used on their own.

The model keeps its API: ``forward``, ``forward_features`` / ``forward_head``, its classifier's
logits. The sequence is the prefix tokens (class token, then ``reg_tokens`` registers; none for a
ViT without class token) then the patch grid; prefix tokens are never pruned or merged. Pooling
(``global_pool="token"`` reads the class token, ``"avg"`` averages the patch tokens left) reads what
the stages left. Position embeddings are added in ``_pos_embed``, before any block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import BlockHalves, FamilyDescription, UndoStack, VisionSpec, block_call_splitter
from .observe import OutputRecorder
from .vision_encoder import VisionEncoderAdapter, vision_only_gaps
from vtoken.compat import AttentionParts

#: Per family this adapter serves: the signals its models never provide, and why (``vtoken.methods``).
FAMILY_GAPS = {"timm ViT": vision_only_gaps()}


def _vit_class():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


class TimmViTAdapter(VisionEncoderAdapter):
    family = "timm"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            return isinstance(model, _vit_class())
        except ImportError:  # timm not installed: no timm model to match
            return False

    def describe(self) -> FamilyDescription:
        return FamilyDescription(name="timm ViT", vision=timm_vision_spec(self.model), projector=None,
                                 decoder=None, gaps=vision_only_gaps())

    def pixel_entry(self) -> nn.Module:
        return self.model.patch_embed


def timm_vision_spec(vit: nn.Module) -> VisionSpec:
    """The description of a timm ``VisionTransformer`` tower (also open_clip's timm trunks)."""
    blocks = vit.blocks
    attention = blocks[0].attn
    rows, cols = vit.patch_embed.grid_size
    width = vit.embed_dim
    return VisionSpec(
        layers=blocks,
        prefix_tokens=vit.num_prefix_tokens,
        grid=(int(rows), int(cols)),
        patch_size=int(vit.patch_embed.patch_size[0]),
        width=width,
        head_dim=attention.head_dim,
        attention=lambda layer: fused_qkv_parts(blocks[layer].attn),
        read_layer=len(blocks) - 1,
        kind="timm vit",
        cls=getattr(vit, "cls_token", None) is not None,
        parts={"attention": "ls1", "mlp": "ls2"},
        attention_module=lambda block: block.attn,
        halves=timm_block_halves,
    )


def fused_qkv_parts(attention: nn.Module) -> AttentionParts:
    """Query and key projections of a timm ``Attention`` (one fused ``qkv`` linear), with its q/k norms."""
    inner = attention.num_heads * attention.head_dim
    weight, bias = attention.qkv.weight, attention.qkv.bias

    def projection(part: int):
        rows = slice(part * inner, (part + 1) * inner)
        return lambda x: F.linear(x, weight[rows], None if bias is None else bias[rows])

    return AttentionParts(projection(0), projection(1), attention.head_dim, float(attention.scale),
                          attention.q_norm, attention.k_norm)


def timm_block_halves(block: nn.Module, undo: UndoStack) -> BlockHalves:
    """A timm ``Block`` (``norm1``, ``attn``, ``ls1``, ``drop_path1``, then ``norm2``, ``mlp``, ``ls2``,
    ``drop_path2``) in two halves. The attention is the block's own module, handed the size bias as
    its float ``attn_mask`` (SDPA or its eager path); its keys (after ``k_norm``) are read by a hook
    on ``attn.k_norm`` that records only inside the halves."""
    from timm.models.vision_transformer import Block

    if type(block) is not Block:
        raise ValueError(
            f"this timm ViT's blocks are {type(block).__name__}, not the standard Block that vtoken splits into "
            "attention and MLP; use a method that prunes after a block (repshift, random, pool)"
        )
    attention = block.attn
    keys = OutputRecorder(attention.k_norm, undo)

    def run_attention(hidden, bias, rest):
        mask = rest.pop("attn_mask", None)
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(~mask, float("-inf"))
        mask = bias if mask is None else (mask if bias is None else mask + bias)
        out, normed_keys = keys.recording(attention, block.norm1(hidden), attn_mask=mask, **rest)
        # [C, heads, T, head_dim] -> [C, T, head_dim]
        return hidden + block.drop_path1(block.ls1(out)), normed_keys.mean(dim=1)

    def mlp(hidden):
        return hidden + block.drop_path2(block.ls2(block.mlp(block.norm2(hidden))))

    return BlockHalves(block_call_splitter("x", "attn_mask"), run_attention, mlp)
