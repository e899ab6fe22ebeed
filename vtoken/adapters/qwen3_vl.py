"""Adapter for transformers Qwen3-VL (``Qwen3VLForConditionalGeneration``, ``Qwen3VLModel``) and
Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``, ``Qwen3VLMoeModel``: the same model with
mixture-of-experts MLPs in the LLM, which vtoken never reads).

What differs from Qwen2-VL (:mod:`vtoken.adapters.qwen2_vl`, whose pipeline it reuses):

- **DeepStack.** Vision blocks ``deepstack_visual_indexes`` each feed a merger of their own; its
  per-token features are added to the hidden states of the visual tokens after LLM layers
  ``0 .. len(deepstack) - 1`` (``Qwen3VLTextModel._deepstack_process``). They follow the pruning: the
  model's ``_deepstack_process`` is replaced on the instance by one that adds each DeepStack row to
  the token it belongs to in the layout the LLM runs at that layer (a token dropped before the LLM or
  inside it gets none; the rows are matched through each token's original place). Inside the
  vision tower, a DeepStack merger after a vision stage reads the kept units only, and its output is
  put back in unit places as the main merger's is.
  A mask stage's rerun of the prompt's tail (AIF) gets them too: in a left-padded batch that tail
  can hold another sample's last visual tokens. A prefill fed only the tokens a vision stage kept
  (the kept-token entrance) hands the LLM DeepStack's inputs of the whole prompt
  (:meth:`Qwen3VLAdapter.whole_prompt_llm_inputs`), which the forward derives from the placeholders.
- **Positions.** M-RoPE with the interleaved layout (``PositionScheme(interleaved=True)``): vtoken
  carries the model's own 3-D ids per token, so the layout is the model's business.
- **Vision tower.** Learned position embeddings interpolated to each image's grid (added before
  the first block) and 16-pixel patches; every block attends over whole frames (no windows).

Deviation: a method that merges tokens (pool, VisionZip, Representation Shift's merge mode) replaces a
kept token's embedding; its DeepStack features stay the kept token's own (they are not merged with
the merged-in tokens' DeepStack features).
"""

from __future__ import annotations

import torch
from torch import nn

from .qwen2_vl import FAMILY_GAPS as _QWEN2_GAPS
from .qwen2_vl import QwenVLAdapter
from vtoken import compat
from vtoken.pruner import Pruner

#: The signals Qwen3-VL's models never provide (yet), and why (``vtoken.methods``): as Qwen2-VL's.
FAMILY_GAPS = {"Qwen3-VL": dict(_QWEN2_GAPS["Qwen2-VL"])}


def _classes() -> tuple[type, ...]:
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLModel, Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeModel

    return (Qwen3VLForConditionalGeneration, Qwen3VLModel, Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeModel)


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    interleaved_mrope = True
    decoder_token_inputs = compat.DEEPSTACK_KWARGS

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _classes())

    def family_label(self) -> str:
        return "Qwen3-VL"

    def family_gaps(self) -> dict[str, str]:
        return FAMILY_GAPS["Qwen3-VL"]

    def install(self, pruner: Pruner, undo) -> None:
        super().install(pruner, undo)
        visual = self.core.visual
        if pruner.stages_at("vision"):
            for merger in compat.deepstack_mergers(visual):
                undo.post_hook(merger, self._after_projector)
        self._follow_deepstack(self.core.language_model, undo)

    def whole_prompt_llm_inputs(self, encoded, is_image: torch.Tensor) -> dict[str, object]:
        """DeepStack's inputs, as the forward builds them from the whole prompt: the image tokens'
        places and, per DeepStack layer, every image's rows in order (the LLM adds them to the kept
        tokens' hidden states by their places in the whole prompt: :func:`add_deepstack`)."""
        places, rows = compat.DEEPSTACK_KWARGS
        return {places: is_image, rows: compat.deepstack_rows(encoded)}

    def _follow_deepstack(self, language_model: nn.Module, undo) -> None:
        original = getattr(language_model, compat.DEEPSTACK_PROCESS)
        pruner = self.pruner

        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            run = pruner.active
            if run is None or not run.groups:
                return original(hidden_states, visual_pos_masks, visual_embeds)
            if run.side_pass == "recompute":
                # A mask stage reruns the prompt from slot ``start`` on: in a padded batch the slots
                # there may hold another sample's last visual tokens, which get their rows as in the
                # prefill (the layout is the prefill's: a mask stage prunes nothing).
                layout = run.groups[0][1]
                orig = layout.orig_index[:, run.recompute.start:]
                return add_deepstack(hidden_states, visual_pos_masks, visual_embeds, orig)
            if run.side_pass is not None:  # the probe's decoding step: a text token
                return hidden_states
            layouts = [layout for _, layout in reversed(run.groups) if layout.length == hidden_states.shape[1]]
            if not layouts:
                raise RuntimeError("vtoken: no layout of this request matches the LLM's hidden states at a DeepStack layer")
            return add_deepstack(hidden_states, visual_pos_masks, visual_embeds, layouts[0].orig_index)

        undo.set_attribute(language_model, compat.DEEPSTACK_PROCESS, deepstack_process)


def add_deepstack(hidden: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor,
                  orig_index: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``[B, L', d]`` (a layout whose slot ``j`` of sample ``b`` holds the original token
    ``orig_index[b, j]``, -1 for none) plus each visual token's DeepStack row: ``visual_embeds`` has one
    row per True of ``visual_pos_masks`` ``[B, L]`` (the original sequence) in flattened order."""
    mask = visual_pos_masks.to(hidden.device).bool()
    orig = orig_index.to(hidden.device)
    rank = (mask.reshape(-1).long().cumsum(0) - 1).view_as(mask)
    samples = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(orig)
    safe = orig.clamp(min=0)
    present = (orig >= 0) & mask[samples, safe]
    rows = rank[samples, safe][present]
    hidden = hidden.clone()
    hidden[present] = hidden[present] + visual_embeds.to(hidden.device, hidden.dtype)[rows]
    return hidden
