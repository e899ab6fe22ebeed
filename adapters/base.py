"""The interface between vtoken and one model family.

An adapter knows where a family keeps its visual tokens, its vision-encoder layers, its projector and
its LLM decoder layers, and how positions work; it installs the hooks that realise the pruning sites
and records an undo action for each change so that ``unwrap`` restores the model exactly.
Strategies never see an adapter: they get tensors and the callables the adapter puts on their
:class:`~vtoken.context.ScoreContext`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from vtoken.context import Grid
from vtoken.signals import Needs, Signal


@dataclass
class ImageInfo:
    """One image of the batch as the LLM sees it.

    ``offset``/``num_tokens``: its span within the sample's visual tokens (sample-level indices).
    ``grids``: patch grids in image-local token indices. ``crops``: global indices of the vision
    encoder inputs (crops) it came from. ``source``: for each of its tokens, the crop token it came
    from as ``crop * tokens_per_crop + token``, or -1 for tokens with no crop origin (separators).
    ``geometry``: what ``vtoken.show`` needs to draw the tokens over the picture.
    """

    sample: int
    offset: int
    num_tokens: int
    grids: tuple[Grid, ...]
    crops: list[int]
    source: torch.Tensor
    geometry: dict[str, Any] = field(default_factory=dict)


@dataclass
class VisualLayout:
    """Where the visual tokens are in a batch: ``visual_index``/``image_index`` are ``[B, L]`` (-1 for
    text), ``images`` lists every image in order, ``tokens_per_crop`` is the number of tokens each
    crop hands the projector."""

    visual_index: torch.Tensor
    image_index: torch.Tensor
    images: list[ImageInfo]
    tokens_per_crop: int = 0

    @property
    def batch_size(self) -> int:
        return self.visual_index.shape[0]

    def visual_count(self, sample: int) -> int:
        return int((self.visual_index[sample] >= 0).sum())

    def crop_to_visual(self, num_crops: int) -> torch.Tensor:
        """``[C, tokens_per_crop]``: the sample-level visual index each crop token lands on, or -1."""
        out = torch.full((num_crops, self.tokens_per_crop), -1, dtype=torch.long)
        for image in self.images:
            local = torch.nonzero(image.source >= 0).squeeze(-1)
            src = image.source[local]
            out.view(-1)[src] = image.offset + local
        return out


class UndoStack:
    """Every change made to a model, as an action that reverts it; run in reverse by ``unwrap``."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []

    def push(self, action: Callable[[], None]) -> None:
        self._actions.append(action)

    def hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self.push(handle.remove)

    def run(self) -> None:
        while self._actions:
            self._actions.pop()()


class Adapter(ABC):
    """Base class of the model-family adapters."""

    #: Human-readable family name.
    family: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter handles ``model``."""

    # --- structure ----------------------------------------------------------------------------
    @abstractmethod
    def vision_layers(self) -> nn.ModuleList:
        """The vision encoder's transformer layers."""

    @abstractmethod
    def projector(self) -> nn.Module:
        """The module mapping vision features to the LLM width."""

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers."""

    @abstractmethod
    def visual_tokens_per_image(self) -> int | None:
        """Visual tokens one image gives the LLM at the default input size (None if it varies)."""

    def vision_tokens(self) -> int | None:
        """Patch tokens one crop holds in the vision encoder (None if it varies)."""
        return None

    def site_width(self, site: str) -> tuple[int, int]:
        """``(feature width, attention head size)`` of the tokens a stage at ``site`` works on:
        the vision encoder's at the vision and projector sites (where scoring reads vision features
        and attention), the LLM's inside it."""
        raise NotImplementedError

    def vision_feature_layer(self) -> int | None:
        """The vision-encoder layer (0-based) whose output the projector reads (the last one read when
        several are concatenated); None when the family does not say."""
        return None

    @property
    def family_name(self) -> str:
        """The family as users name it (``"LLaVA-NeXT"``), for messages."""
        return self.family

    def unavailable(self, signal: Signal) -> str | None:
        """None when this model provides ``signal`` (:mod:`vtoken.signals`); otherwise what it gives
        instead or why not, for the error that refuses the method."""
        return "no such signal in this family"

    def missing_signal(self, needs: Needs) -> tuple[Signal, str] | None:
        """The first signal of ``needs`` this model cannot provide, with the reason; None if all."""
        for signal in needs.signals:
            reason = self.unavailable(signal)
            if reason is not None:
                return signal, reason
        return None

    def one_grid_per_image(self) -> str | None:
        """None when every image reaches the LLM as exactly one intact patch grid (nothing else);
        otherwise a short description of what it gets instead, for error messages."""
        return None

    # --- runtime ------------------------------------------------------------------------------
    @abstractmethod
    def install(self, pruner: Any, undo: UndoStack) -> None:
        """Install the hooks realising ``pruner``'s stages; register each change on ``undo``."""

    def validate(self, stages: tuple) -> None:
        """Refuse stages this model cannot run (a layer index out of range, say)."""
