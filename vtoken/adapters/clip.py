"""Adapter for transformers CLIP and SigLIP vision towers used on their own: ``CLIPModel``,
``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``SiglipModel``, ``SiglipVisionModel``.

Only the vision tower is touched (a ``CLIPModel``'s text tower runs unchanged). CLIP's sequence is
CLS then the patch grid (the CLS token is never pruned; ``get_image_features`` pools it); SigLIP has
no CLS token and pools every token left by its attention-pooling head. Position embeddings are added
in the embeddings, before any block, so kept tokens carry theirs.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection, SiglipModel, SiglipVisionModel,
)

from .base import BlockHalves, FamilyDescription, UndoStack, VisionSpec, block_call_splitter
from .observe import OutputRecorder
from .vision_encoder import VisionEncoderAdapter, vision_only_gaps
from vtoken import compat, signals

_CLIP = (CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection)
_SIGLIP = (SiglipModel, SiglipVisionModel)

#: Per family this adapter serves: the signals its models never provide, and why (``vtoken.methods``).
FAMILY_GAPS = {
    "CLIP": vision_only_gaps(),
    "SigLIP": {**vision_only_gaps(), signals.VISION_CLS: "a SigLIP tower, which has no CLS token (it pools every token)"},
}


class ClipVisionAdapter(VisionEncoderAdapter):
    family = "clip"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, (*_CLIP, *_SIGLIP))

    def describe(self) -> FamilyDescription:
        tower = compat.clip_vision_tower(self.model)
        config = tower.config
        layers = tower.encoder.layers
        has_cls = hasattr(tower.embeddings, "class_embedding")
        side = config.image_size // config.patch_size
        name = "CLIP" if isinstance(self.model, _CLIP) else "SigLIP"
        return FamilyDescription(
            name=name,
            vision=VisionSpec(
                layers=layers,
                prefix_tokens=int(has_cls),
                grid=(side, side),
                patch_size=config.patch_size,
                width=config.hidden_size,
                head_dim=config.hidden_size // config.num_attention_heads,
                attention=lambda layer: compat.attention_parts(compat.layer_attention(layers[layer])),
                read_layer=len(layers) - 1,
                kind=config.model_type,
                halves=hf_encoder_halves,
            ),
            projector=None,
            decoder=None,
            gaps=FAMILY_GAPS[name],
        )

    def pixel_entry(self) -> nn.Module:
        return compat.clip_vision_tower(self.model).embeddings


def hf_encoder_halves(block: nn.Module, undo: UndoStack) -> BlockHalves:
    """A transformers CLIP/SigLIP encoder layer (``layer_norm1``, ``self_attn``, ``layer_norm2``,
    ``mlp``, pre-norm residuals) in two halves. The attention is the layer's own module (SDPA or
    eager, as the model is configured), handed the size bias as its additive ``attention_mask``;
    its keys are read off ``k_proj``'s output by a hook that only records inside the halves."""
    attention = compat.layer_attention(block)
    norm_before_attention, norm_before_mlp = compat.encoder_layer_norms(block)
    keys = OutputRecorder(attention.k_proj, undo)

    def run_attention(hidden, bias, rest):
        mask = rest.pop("attention_mask", None)
        mask = bias if mask is None else (mask if bias is None else mask + bias)
        out, projected = keys.recording(attention, hidden_states=norm_before_attention(hidden), attention_mask=mask, **rest)
        out = out[0] if isinstance(out, tuple) else out
        return hidden + out, lambda: projected.view(*hidden.shape[:2], -1, attention.head_dim).mean(dim=2)

    def mlp(hidden):
        return hidden + block.mlp(norm_before_mlp(hidden))

    return BlockHalves(block_call_splitter("hidden_states", "attention_mask"), run_attention, mlp)
