"""What the module that holds a wrapped bare model passed to its own forward.

A user may wrap the bare model (``LlavaModel``, ``Qwen2VLModel``: ``model.model``) and call the
model with the LM head around it. Generation then works as with the whole model wrapped, but two
arguments of the outer forward name positions of the prompt the user passed, which pruning
renumbers, and only the outer model reads them:

- ``labels``: the outer model's loss compares its logits, one per *kept* slot, with labels of the
  *whole* prompt. The shapes may disagree (a raw error from the loss) or, when the padded batch
  keeps its width, agree while every sample's labels sit on the wrong slots (a silently wrong loss).
- ``logits_to_keep`` as a tensor of positions: the outer model slices the kept slots with them.

Wrapping the whole model handles both (``pipeline._loss_on_kept_tokens``,
``pipeline._logits_at_kept_positions``); with the bare model wrapped, a prefill that may drop tokens
(:func:`may_drop_tokens`) is refused in one line instead (:func:`misaligned_outer_argument`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from vtoken.config import StageSpec
from vtoken.frames import VTOKEN_FOLDER, first_frame_outside, package_folder

#: Frames of these packages lie between a module's ``__call__`` and its caller (torch's call
#: machinery, the eager wrapper of vtoken's hooks, vtoken's own hooks); the caller is the first other one.
_CALL_MACHINERY = (package_folder(torch.__file__), VTOKEN_FOLDER)
#: How far up to look for the caller: a hook sits a handful of frames below it.
_MAX_FRAMES = 16


def may_drop_tokens(stages: Sequence[StageSpec], input_ids: torch.Tensor, placeholder: int) -> bool:
    """Whether a stage may drop a visual token of this input: one whose budget is under a sample's
    ``placeholder`` tokens, all of them taken as one image. Exact for a sample of one image; for
    several (or a video whose frames text separates) a budget per image that keeps each of them
    whole can still be under their sum, which only makes this say True where nothing drops: the
    refusal it guards errs on the safe side."""
    counts = (input_ids == placeholder).sum(dim=1)
    return any(stage.budget(tokens) < tokens for stage in stages for tokens in counts.unique().tolist() if tokens)


def misaligned_outer_argument(core: nn.Module) -> str | None:
    """The one-line reason to refuse this call of the wrapped bare model ``core``, or None.

    Called from ``core``'s forward pre-hook: when the forward that called ``core`` is a module's
    that holds ``core`` as a direct child (the ``...ForConditionalGeneration`` around it) and was
    given ``labels`` or ``logits_to_keep`` as a tensor, the reason names the argument and the fix.
    Anything else (``core`` called on its own, from compiled code, by a function) is None."""
    _, caller = first_frame_outside(_CALL_MACHINERY, sys._getframe(1), limit=_MAX_FRAMES)
    if caller is None:
        return None
    local = caller.f_locals
    outer = local.get("self")
    if not isinstance(outer, nn.Module) or not any(child is core for child in outer.children()):
        return None
    name, bare = type(outer).__name__, type(core).__name__
    if local.get("labels") is not None:
        what = (f"labels were passed to {name}.forward, whose loss would compare the logits of the kept tokens "
                "with the labels of the whole prompt")
    elif isinstance(local.get("logits_to_keep"), torch.Tensor):
        what = (f"logits_to_keep was passed to {name}.forward as positions of the prompt, which pruning "
                "renumbers")
    else:
        return None
    return (f"{what}, and only the {bare} inside it is wrapped; wrap the {name} itself (vtoken.wrap(model, ...) "
            f"instead of vtoken.wrap(model.model, ...)): it gathers them for the kept tokens")
