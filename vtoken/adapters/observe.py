"""Capture what a layer and its attention and MLP sub-modules take in and give out, for strategies
that score by how tokens change across a layer (TransPrune's TTV, Representation Shift).

Forward hooks only: the sub-modules run unchanged, and nothing is kept once the strategy has
summarised the layer.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Callable

import torch
from torch import nn

from .base import UndoStack


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class OutputRecorder:
    """A forward hook on ``module`` that records its output only inside :meth:`recording` (per thread:
    the hook stays installed, a call outside a recording passes untouched). The block halves use it to
    read a block's attention keys while the block's own attention module runs."""

    def __init__(self, module: nn.Module, undo: UndoStack):
        self._box: contextvars.ContextVar = contextvars.ContextVar(f"vtoken_record_{id(module)}", default=None)
        undo.post_hook(module, self._record)

    def _record(self, module, args, output):
        box = self._box.get()
        if box is not None:
            box.append(output)

    def recording(self, call: Callable, *args, **kwargs):
        """``(call(*args, **kwargs), the module's output during it)``."""
        box: list = []
        token = self._box.set(box)
        try:
            result = call(*args, **kwargs)
        finally:
            self._box.reset(token)
        return result, box[0]


def observe_layer(
    layer: nn.Module, parts: dict[str, str], active: Callable[[], bool], done: Callable[[dict], None], undo: UndoStack
) -> None:
    """Hook ``layer`` so that, whenever ``active()`` holds, ``done(io)`` receives
    ``{"block": (in, out), name: (in, out) for each sub-module in parts}``; ``parts`` maps a part
    name (``"attention"``, ``"mlp"``) to the sub-module's attribute name in the layer."""
    # What the sub-modules saw, per thread: two threads running the model at once never mix.
    per_thread = threading.local()

    def captured() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if not hasattr(per_thread, "io"):
            per_thread.io = {}
        return per_thread.io

    def sub_hook(name, module, args, kwargs, output):
        if active():
            captured()[name] = (_input(args, kwargs), _first(output))

    def layer_hook(module, args, kwargs, output):
        if active():
            io = captured()
            io["block"] = (_input(args, kwargs), _first(output))
            per_thread.io = {}
            done(io)

    for name, attribute in parts.items():
        sub = getattr(layer, attribute)
        undo.post_hook(sub, lambda m, a, k, o, n=name: sub_hook(n, m, a, k, o), with_kwargs=True)
    # Registered first among the layer's forward hooks, so it sees the layer's own output before
    # any pruning hook on the same layer shortens it.
    undo.post_hook(layer, layer_hook, with_kwargs=True, prepend=True)