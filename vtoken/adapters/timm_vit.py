"""Adapter for timm ``VisionTransformer`` models (``timm.create_model("vit_base_patch16_224")``, DeiT,
register ViTs, ViTs with global average pooling and no class token), used on their own.

The model keeps its API: ``forward``, ``forward_features`` / ``forward_head``, its classifier's
logits. The sequence is the prefix tokens (class token, then ``reg_tokens`` registers; none for a
ViT without class token) then the patch grid; prefix tokens are never pruned or merged. Pooling
(``global_pool="token"`` reads the class token, ``"avg"`` averages the patch tokens left) reads what
the stages left. Position embeddings are added in ``_pos_embed``, before any block. ``Block`` and
``ResPostBlock`` serve every method; other blocks (``ParallelScalingBlock``, ...) only the methods that
prune after a block. While wrapped, ``forward_intermediates`` gives each block's tokens as NLC and
refuses NCHW maps (the tokens left no longer fill the patch grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import BlockHalves, FamilyDescription, UndoStack, VisionSpec, block_call_splitter
from .observe import OutputRecorder
from .vision_encoder import VisionEncoderAdapter, vision_only_gaps
from vtoken import signals
from vtoken.compat import AttentionParts

#: Per family this adapter serves: the signals its models never provide, and why (``vtoken.methods``).
FAMILY_GAPS = {"timm ViT": {
    **vision_only_gaps(),
    signals.VISION_CLS: "only a ViT with a class token has one (not one built with class_token=False: "
                        "global average pooling, SigLIP)",
}}
#: Family -> the signals only some of its block classes give (``vtoken.methods()``'s ``limits``; see
#: :func:`timm_block_gap`, which names the blocks at wrap).
FAMILY_LIMITS = {"timm ViT": {
    signals.VISION_ATTENTION: "only on blocks whose attn is timm's Attention (one fused qkv projection)",
    signals.VISION_OBSERVED: "only on blocks with separate attention and MLP branches (Block's ls1 / ls2)",
    signals.VISION_BLOCK_KEYS: "only on the Block / ResPostBlock layout with timm's Attention",
}}


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

    def unavailable(self, signal) -> str | None:
        return super().unavailable(signal) or timm_block_gap(self.vision_layers(), signal)

    def feature_map_modules(self) -> list[nn.Module]:
        return [self.model]

    def install(self, pruner, undo: UndoStack) -> None:
        super().install(pruner, undo)
        # After the stages' own hooks: a block sees the tokens they left.
        for block in self.vision_layers():
            undo.pre_hook(block, self._refuse_stale_mask, with_kwargs=True)

    def _refuse_stale_mask(self, block, args, kwargs):
        """timm's ``forward(x, attn_mask=..., is_causal=...)`` hands every block the caller's mask, made
        for the tokens the model embedded: refused in one line once pruning or merging has left fewer
        (timm's attention raised a shape error), as is ``is_causal`` beside ToMe's size bias, which it
        passes as a mask (SDPA takes one or the other)."""
        mask, causal = kwargs.get("attn_mask"), kwargs.get("is_causal", False)
        if mask is None and not causal:
            return None
        method = self.pruner.strategy.name
        hidden = args[0] if args else kwargs.get("x")
        if mask is not None and hidden is not None and mask.shape[-1] != hidden.shape[-2]:
            raise ValueError(
                f"attn_mask covers the {mask.shape[-1]} tokens the model embedded, but {method} has left "
                f"{hidden.shape[-2]} by this block; call the model without attn_mask, or vtoken.unwrap(model) "
                "first to mask the tokens")
        if causal and self.pruner.strategy.inside_block() is not None:
            raise ValueError(
                f"is_causal=True cannot run beside {method}'s size bias (which the attention takes as its mask); "
                "call the model without is_causal, or vtoken.unwrap(model) first")
        return None


def timm_vision_spec(vit: nn.Module) -> VisionSpec:
    """The description of a timm ``VisionTransformer`` tower (also open_clip's timm trunks). Blocks
    other than ``Block`` and ``ResPostBlock`` are described too (methods that prune after a block run
    on them); :func:`timm_block_gap` says what else they cannot serve."""
    blocks = vit.blocks
    rows, cols = vit.patch_embed.grid_size
    width = vit.embed_dim
    return VisionSpec(
        layers=blocks,
        prefix_tokens=vit.num_prefix_tokens,
        grid=(int(rows), int(cols)),
        patch_size=tuple(vit.patch_embed.patch_size),
        width=width,
        head_dim=_head_dim(blocks[0], width),
        attention=lambda layer: fused_qkv_parts(blocks[layer].attn),
        read_layer=len(blocks) - 1,
        kind="timm vit",
        cls=getattr(vit, "cls_token", None) is not None,
        parts=_branch_parts(blocks[0]) or {"attention": "ls1", "mlp": "ls2"},
        attention_module=lambda block: block.attn,
        halves=timm_block_halves,
        pads=bool(getattr(vit.patch_embed, "dynamic_img_pad", False)),
    )


def _block_types() -> tuple[type, type]:
    from timm.models.vision_transformer import Block, ResPostBlock

    return Block, ResPostBlock


def _timm_attention(block: nn.Module) -> nn.Module | None:
    """The block's timm ``Attention`` (``attn``: one fused ``qkv`` linear of ``num_heads`` heads of
    ``head_dim`` for each of q, k and v, q/k norms) that vtoken reads and runs; None when it has none.
    Another attention class with a fused ``qkv`` (timm's ``DiffAttention``: two maps per head, a
    ``head_dim`` of half the width per head) is not one: its keys are not where vtoken reads them."""
    from timm.layers import Attention

    attention = getattr(block, "attn", None)
    if not isinstance(attention, Attention) or not isinstance(getattr(attention, "qkv", None), nn.Linear):
        return None
    if not all(hasattr(attention, a) for a in ("num_heads", "head_dim", "scale", "q_norm", "k_norm")):
        return None
    return attention if attention.qkv.out_features == 3 * attention.num_heads * attention.head_dim else None


def _head_dim(block: nn.Module, width: int) -> int:
    attention = _timm_attention(block)
    if attention is not None:
        return attention.head_dim
    return next((m.head_dim for m in block.modules() if isinstance(getattr(m, "head_dim", None), int)), width)


def _branch_parts(block: nn.Module) -> dict[str, str] | None:
    """The sub-modules whose outputs are the block's attention and MLP branches (before the residual
    add): ``Block``'s layer scales, ``ResPostBlock``'s norms (it normalises each branch); None for
    other blocks."""
    block_cls, post_cls = _block_types()
    if type(block) is block_cls:
        return {"attention": "ls1", "mlp": "ls2"}
    if type(block) is post_cls:
        return {"attention": "norm1", "mlp": "norm2"}
    return None


def timm_block_gap(blocks: nn.ModuleList, signal) -> str | None:
    """Why these timm blocks cannot serve ``signal`` (None when they can, or when it is not about
    their structure): the block class, what it lacks, and which methods still run on it."""
    layered = signal.name in signals.VISION_LAYERED
    if layered and not 0 <= signal.layer < len(blocks):
        return None  # (the generic check names the missing layer)
    block = blocks[signal.layer if layered else 0]
    attention, branches = _timm_attention(block) is not None, _branch_parts(block) is not None
    if signal.name == signals.VISION_ATTENTION and not attention:
        missing = "an attn module with one fused qkv projection (timm's Attention) whose attention vtoken recomputes"
    elif signal.name == signals.VISION_OBSERVED and not branches:
        missing = "separate attention and MLP branches (Block's ls1 / ls2) for vtoken to observe"
    elif signal.name == signals.VISION_BLOCK_KEYS and not (attention and branches):
        missing = "the Block / ResPostBlock layout with timm's Attention that vtoken splits into attention and MLP"
    else:
        return None
    runs = ["random", "pool"] + ["repshift"] * branches + ["visionzip"] * attention
    return f"{type(block).__name__} blocks, which lack {missing} (only {', '.join(runs[:-1])} and {runs[-1]} run on them)"


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
    ``drop_path2``) or ``ResPostBlock`` (``attn`` then ``norm1``, ``mlp`` then ``norm2``: each branch
    normalised after) in two halves. The attention is the block's own module, handed the size bias as
    its float ``attn_mask`` (SDPA or its eager path); its keys (after ``k_norm``) are read by a hook
    on ``attn.k_norm`` that records only inside the halves."""
    parts = _branch_parts(block) if _timm_attention(block) is not None else None
    if parts is None:
        raise ValueError(
            f"this timm ViT's blocks are {type(block).__name__}, not the Block / ResPostBlock with timm's Attention that vtoken splits into "
            "attention and MLP; use a method that prunes after a block (random, pool)"
        )
    post = parts["attention"] == "norm1"  # ResPostBlock: the norm closes the branch
    attention = block.attn
    keys = OutputRecorder(attention.k_norm, undo)

    def run_attention(hidden, bias, rest):
        mask = rest.pop("attn_mask", None)
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(~mask, float("-inf"))
        mask = bias if mask is None else (mask if bias is None else mask + bias)
        out, normed_keys = keys.recording(attention, hidden if post else block.norm1(hidden), attn_mask=mask, **rest)
        # [C, heads, T, head_dim] -> [C, T, head_dim]
        return hidden + block.drop_path1(block.norm1(out) if post else block.ls1(out)), lambda: normed_keys.mean(dim=1)

    def mlp(hidden):
        if post:
            return hidden + block.drop_path2(block.norm2(block.mlp(hidden)))
        return hidden + block.drop_path2(block.ls2(block.mlp(block.norm2(hidden))))

    return BlockHalves(block_call_splitter("x", "attn_mask"), run_attention, mlp)
