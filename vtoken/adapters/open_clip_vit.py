"""Adapter for open_clip models (``open_clip.create_model_and_transforms``): a ``CLIP`` /
``CustomTextCLIP`` whose image tower is open_clip's ``VisionTransformer``, or that tower alone; a
tower that wraps a timm ViT (``TimmModel``) is described from its timm trunk.

The model keeps its API (``encode_image``, ``forward``, ``encode_text`` untouched). open_clip's
sequence is the class token then the patch grid (``pool_type="tok"`` reads the class token, ``"avg"``
averages the patch tokens left); position embeddings are added in ``_embeds``, before any block.
Its blocks use ``nn.MultiheadAttention``: for stages inside a block (ToMe) the attention runs as
SDPA on that module's own weights, so the size bias is a broadcast float mask and never an N x N one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import BlockHalves, FamilyDescription, UndoStack, VisionSpec
from .timm_vit import timm_block_gap, timm_vision_spec
from .vision_encoder import VisionEncoderAdapter, vision_only_gaps
from vtoken import signals
from vtoken.compat import AttentionParts

#: Per family this adapter serves: the signals its models never provide, and why (``vtoken.methods``).
FAMILY_GAPS = {"open_clip ViT": {
    **vision_only_gaps(),
    signals.VISION_CLS: "only a tower with a class token has one (not a timm trunk built without: the SigLIP models)",
}}
#: Family -> the signals only some of its towers give, and which do not (``vtoken.methods()``'s
#: ``limits``): a method that reads one runs on the family's standard towers and is refused at wrap on
#: the others, naming the blocks.
FAMILY_LIMITS = {"open_clip ViT": {
    signals.VISION_ATTENTION: "not on towers of block_type='custom' blocks (qk_norm, scaled cosine attention), "
                              "whose attention is not nn.MultiheadAttention",
    signals.VISION_BLOCK_KEYS: "not on towers of block_type='custom' blocks, which vtoken does not split into "
                               "attention and MLP",
}}


def _open_clip():
    import open_clip

    return open_clip


class OpenClipAdapter(VisionEncoderAdapter):
    family = "open_clip"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            open_clip = _open_clip()
        except ImportError:  # open_clip not installed: no open_clip model to match
            return False
        from open_clip.transformer import VisionTransformer

        tower = getattr(model, "visual", model)
        return isinstance(tower, VisionTransformer) or _timm_trunk(tower) is not None and isinstance(
            model, (open_clip.CLIP, open_clip.CustomTextCLIP)
        )

    @property
    def tower(self) -> nn.Module:
        return getattr(self.model, "visual", self.model)

    def describe(self) -> FamilyDescription:
        trunk = _timm_trunk(self.tower)
        vision = timm_vision_spec(trunk) if trunk is not None else self._vision_spec()
        return FamilyDescription(name="open_clip ViT", vision=vision, projector=None, decoder=None,
                                 gaps=vision_only_gaps())

    def _vision_spec(self) -> VisionSpec:
        tower = self.tower
        if not tower.transformer.batch_first:
            raise ValueError("this open_clip ViT runs its blocks sequence-first (batch_first=False); "
                             "vtoken needs batch-first blocks (open_clip >= 2.24 builds them so)")
        blocks = tower.transformer.resblocks
        rows, cols = tower.grid_size
        width = tower.transformer.width
        heads = blocks[0].attn.num_heads
        return VisionSpec(
            layers=blocks,
            prefix_tokens=1,
            grid=(int(rows), int(cols)),
            patch_size=tuple(tower.patch_size),
            width=width,
            head_dim=width // heads,
            attention=lambda layer: multihead_parts(blocks[layer].attn),
            read_layer=len(blocks) - 1,
            kind="open_clip vit",
            parts={"attention": "ls_1", "mlp": "ls_2"},
            attention_module=lambda block: block.attn,
            halves=open_clip_block_halves,
        )

    def pixel_entry(self) -> nn.Module:
        trunk = _timm_trunk(self.tower)
        return trunk.patch_embed if trunk is not None else self.tower.conv1

    def unavailable(self, signal) -> str | None:
        gap = super().unavailable(signal)
        if gap is None and _timm_trunk(self.tower) is not None:
            return timm_block_gap(self.vision_layers(), signal)
        if gap is None and signal.name == signals.VISION_BLOCK_KEYS:
            # What open_clip_block_halves splits, asked at wrap: at every budget, not only where a stage
            # would split the blocks (ToMe at keep=1.0 or r=0 was accepted on blocks it cannot split).
            from open_clip.transformer import ResidualAttentionBlock

            other = next((b for b in self.vision_layers() if type(b) is not ResidualAttentionBlock
                          or not isinstance(getattr(b, "attn", None), nn.MultiheadAttention)), None)
            if other is not None:
                return (f"{type(other).__name__} blocks, not the ResidualAttentionBlock vtoken splits into attention "
                        "and MLP")
        if gap is None and signal.name == signals.VISION_ATTENTION:
            layered = signal.name in signals.VISION_LAYERED
            blocks = self.vision_layers()
            block = blocks[signal.layer if layered and 0 <= signal.layer < len(blocks) else 0]
            if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
                # block_type="custom" (qk_norm, scaled cosine attention): its own Attention module.
                return (f"{type(block).__name__} blocks, whose attention is {type(getattr(block, 'attn', None)).__name__}, "
                        "not nn.MultiheadAttention, so vtoken cannot recompute their attention map")
        return gap

    def feature_map_modules(self) -> list[nn.Module]:
        trunk = _timm_trunk(self.tower)  # a TimmModel tower calls its trunk's forward_intermediates
        return [self.tower if trunk is None else trunk]


def _timm_trunk(tower: nn.Module) -> nn.Module | None:
    """The timm ViT inside an open_clip ``TimmModel`` tower, if that is what it is."""
    trunk = getattr(tower, "trunk", None)
    if trunk is None:
        return None
    from .timm_vit import _vit_class

    return trunk if isinstance(trunk, _vit_class()) else None


def multihead_parts(attention: nn.Module) -> AttentionParts:
    """Query and key projections of an ``nn.MultiheadAttention`` (its packed ``in_proj``)."""
    if not isinstance(attention, nn.MultiheadAttention):
        raise ValueError("this open_clip block's attention is not nn.MultiheadAttention; its attention map "
                         "cannot be recomputed by vtoken (use a method that does not read it)")
    width, head_dim = attention.embed_dim, attention.head_dim
    weight, bias = attention.in_proj_weight, attention.in_proj_bias

    def projection(part: int):
        rows = slice(part * width, (part + 1) * width)
        return lambda x: F.linear(x, weight[rows], None if bias is None else bias[rows])

    return AttentionParts(projection(0), projection(1), head_dim, head_dim ** -0.5)


def open_clip_block_halves(block: nn.Module, undo: UndoStack) -> BlockHalves:
    """An open_clip ``ResidualAttentionBlock`` (``ln_1``, ``attn``, ``ls_1``, then ``ln_2``, ``mlp``,
    ``ls_2``) in two halves; the attention is SDPA on the ``nn.MultiheadAttention``'s own packed
    projection and output weights (what its fast path computes), with the size bias added."""
    from open_clip.transformer import ResidualAttentionBlock

    if type(block) is not ResidualAttentionBlock or not isinstance(block.attn, nn.MultiheadAttention):
        raise ValueError(
            f"this open_clip ViT's blocks are {type(block).__name__}, not the ResidualAttentionBlock vtoken splits "
            "into attention and MLP; use a method that prunes after a block (repshift, random, pool)"
        )
    attention: nn.MultiheadAttention = block.attn

    def split_call(args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("q_x")
        for name, value in zip(("k_x", "v_x", "attn_mask"), args[1:]):
            kwargs[name] = value
        if kwargs.get("k_x") is not None or kwargs.get("v_x") is not None:
            raise ValueError("vtoken runs open_clip's vision blocks as self-attention; this call passes k_x / v_x")
        return hidden, kwargs

    def run_attention(hidden, bias, rest):
        mask = rest.get("attn_mask")
        if mask is not None:
            mask = mask.to(hidden.dtype)
            bias = mask if bias is None else mask + bias
        batch, tokens, width = hidden.shape
        heads = attention.num_heads
        q, k, v = F.linear(block.ln_1(hidden), attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(batch, tokens, heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = attention.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))
        return hidden + block.ls_1(out), lambda: k.mean(dim=1)

    def mlp(hidden):
        return hidden + block.ls_2(block.mlp(block.ln_2(hidden)))

    return BlockHalves(split_call, run_attention, mlp)
