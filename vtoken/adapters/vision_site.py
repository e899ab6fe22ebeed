"""The vision site, for every family: stages inside the vision encoder and the signals read there.

Shared by the vision-language pipeline (:mod:`vtoken.adapters.pipeline`) and the vision-only one
(:mod:`vtoken.adapters.vision_encoder`): both describe their tower with a
:class:`~vtoken.adapters.base.VisionSpec` and keep the encoder call's state in an
:class:`~vtoken.request.ImageRun` reached through ``pruner.encoding`` (per thread).

- A stage after block ``l`` shortens every crop's sequence in a forward hook on that block.
- A strategy whose stages run inside their block (``Strategy.inside_block``: ToMe) has the blocks
  from its first stage on run in two halves (:class:`~vtoken.adapters.base.BlockHalves`): the
  attention (with ``log(size)`` added to its logits for proportional attention), the stage, then
  the MLP. The model's own attention runs (SDPA or eager): the bias is an additive float mask.
- Observed blocks (``vision_observed``), a block's attention input (``vision_attention``) and the
  pixels are captured only when a strategy declares them.
"""

from __future__ import annotations

from functools import cache, partial

import torch
from torch import nn

from .base import BlockHalves, UndoStack, eager, move_hooks_last
from .observe import observe_layer
from vtoken import signals
from vtoken.context import Grid, VisionAttention
from vtoken.kernels import attention_rows, received_attention
from vtoken.request import ImageRun


class VisionSite:
    """Mixin of the adapters: installs the vision-site stages and signals of ``self.pruner`` on the
    tower ``self.description.vision``."""

    def install_vision(self, undo: UndoStack) -> None:
        pruner, vision = self.pruner, self.description.vision
        needs = pruner.needs
        for layer in needs.layers(signals.VISION_OBSERVED):
            observe_layer(
                vision.layers[layer], vision.parts,
                active=lambda: pruner.encoding is not None, done=partial(self._observed_vision, layer), undo=undo,
            )
        for layer in needs.layers(signals.VISION_ATTENTION):
            hook = partial(self._vision_attention_input, layer)
            undo.pre_hook(vision.attention_module(vision.layers[layer]), hook, with_kwargs=True)
        inside = pruner.strategy.inside_block()
        stages = pruner.stages_at("vision")
        #: vtoken's hooks that change a block's output, kept behind the model's own (move_hooks_last).
        self.last_vision_hooks: list[torch.utils.hooks.RemovableHandle] = []
        if inside is None:
            for stage in stages:
                self.last_vision_hooks.append(
                    undo.post_hook(vision.layers[stage.layer], partial(self._after_vision_layer, stage)))
            if stages:
                # A block's hidden state (output_hidden_states) is its output before the stage after it,
                # as an LLM layer's is before a stage at the next layer, whenever the model's
                # output-capturing hooks were installed.
                undo.pre_hook(vision.layers[0], lambda module, args: move_hooks_last(self.last_vision_hooks))
        elif stages:
            self._run_blocks_in_halves(stages, inside.proportional_attention, undo)

    @property
    def family_name(self) -> str:
        return self.description.name

    def vision_layers(self) -> nn.ModuleList:
        return self.description.vision.layers

    def vision_unavailable(self, signal) -> str | None:
        """Why the tower cannot give ``signal`` (None when it can, or when it is not a vision signal)."""
        vision = self.description.vision
        if signal.name == signals.VISION_CLS and not vision.has_cls:
            return f"a {vision.kind} tower without a CLS token"
        if signal.name == signals.VISION_BLOCK_KEYS and vision.halves is None:
            return f"a {vision.kind} tower whose blocks vtoken cannot split into attention and MLP yet"
        if signal.name in signals.VISION_LAYERED and not 0 <= signal.layer < len(vision.layers):
            return f"no layer {signal.layer} (it has {len(vision.layers)})"
        return None

    # --- stages ---------------------------------------------------------------------------------
    def _grid(self, images: ImageRun | None = None) -> Grid:
        rows, cols = images.grid if images is not None and images.grid is not None else self.description.vision.grid
        return Grid(0, rows, cols, cols)

    def _after_vision_layer(self, stage, module, args, output):
        images = self.pruner.encoding
        if images is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        prefix = self.description.vision.prefix_tokens
        pruned = self.pruner.run_vision_stage(images, stage, hidden, prefix, self._grid(images))
        return (pruned, *output[1:]) if isinstance(output, tuple) else pruned

    def _run_blocks_in_halves(self, stages, proportional: bool, undo: UndoStack) -> None:
        """Replace the ``forward`` of the blocks that need it, on the instance (undone by ``unwrap``):
        the stage blocks, and with proportional attention every block from the first stage on (a
        merged token's size weighs its key in every later attention)."""
        vision = self.description.vision
        if vision.halves is None:
            raise ValueError(
                f"{self.pruner.strategy.name} runs inside the vision blocks, which this {self.family_name} "
                "tower cannot split into attention and MLP; use a method that prunes after a block"
            )
        by_layer = {stage.layer: stage for stage in stages}
        layers = range(min(by_layer), len(vision.layers)) if proportional else sorted(by_layer)
        for layer in layers:
            block = vision.layers[layer]
            halves = vision.halves(block, undo)
            original = block.forward
            forward = partial(self._block_in_halves, by_layer.get(layer), halves, original, proportional)
            undo.set_attribute(block, "forward", eager(forward))

    def _block_in_halves(self, stage, halves: BlockHalves, original, proportional: bool, *args, **kwargs):
        images = self.pruner.encoding
        if images is None:
            return original(*args, **kwargs)
        hidden, rest = halves.split_call(args, kwargs)
        bias = self._size_bias(images, hidden) if proportional else None
        hidden, keys = halves.attention(hidden, bias, rest)
        if stage is not None:
            prefix = self.description.vision.prefix_tokens
            # The keys are averaged over heads only for a strategy that reads them (not for a replay).
            keys = keys() if self.pruner.needs.has(signals.VISION_BLOCK_KEYS) else None
            hidden = self.pruner.run_vision_stage(images, stage, hidden, prefix, self._grid(images), keys=keys)
        return halves.output(halves.mlp(hidden))

    def _size_bias(self, images: ImageRun, hidden: torch.Tensor) -> torch.Tensor | None:
        """``[C, 1, 1, T]``: ``log(size)`` of every token of the block's sequence (ToMe's
        proportional attention, Eq. 1), 0 for the prefix tokens; None while every size is 1."""
        if images.owner is None:
            return None
        cached = images.size_bias
        if cached is not None and cached[0] is images.owner and cached[1] is images.vision_positions:
            return cached[2]  # no stage since the last block: the same tokens, the same sizes
        sizes = images.sizes().to(hidden.device)
        bias = None
        if not bool((sizes == 1).all()):
            prefix = hidden.shape[1] - sizes.shape[1]
            full = torch.cat([sizes.new_ones(sizes.shape[0], prefix), sizes], dim=1)
            bias = full.clamp(min=1).log().to(hidden.dtype)[:, None, None, :]
        images.size_bias = (images.owner, images.vision_positions, bias)
        return bias

    # --- signals --------------------------------------------------------------------------------
    def _observed_vision(self, layer: int, io: dict) -> None:
        images = self.pruner.encoding
        hidden = io["block"][0]
        valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        summary = self.pruner.strategy.observe("vision", layer, io, valid)
        images.observed[layer] = (summary, images.vision_positions, self.description.vision.prefix_tokens)

    def _vision_attention_input(self, layer, module, args, kwargs):
        """Keep what vision ``layer``'s attention takes in (the normed hidden states), to recompute
        its queries and keys when the strategy asks (:meth:`VisionSource.attention`)."""
        images = self.pruner.encoding
        if images is not None and images.vision_source is not None:
            hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            images.vision_source.inputs[layer] = hidden
        return None


class VisionSource:
    """What a strategy may read from one call of the vision encoder (``ScoreContext.vision_attention``
    and ``pixel_patches``): a chosen layer's self-attention, recomputed beside SDPA from the layer's
    input, and the pixels behind every patch token, crop by crop in encoder order."""

    def __init__(self, adapter: VisionSite, crop_pixels, grid: tuple[int, int] | None = None):
        self.vision = adapter.description.vision
        #: ``() -> [C, channels, H, W]``: every crop's pixels in encoder order.
        self.crop_pixels = crop_pixels
        #: The patch grid of the crops (the family's default unless the call's pixels say otherwise).
        self.grid = grid or self.vision.grid
        #: Vision layer -> the input of its attention ``[C, T, D]`` (set by a hook during encoding).
        self.inputs: dict[int, torch.Tensor] = {}

    def attention(self, layer: int) -> VisionAttention:
        vision = self.vision
        if layer not in self.inputs:
            raise ValueError(f"vision layer {layer}'s attention was not recorded; declare Signal('vision_attention', {layer}) in needs()")
        x = self.inputs[layer]
        first, patches = vision.prefix_tokens, self.grid[0] * self.grid[1]
        if x.shape[1] != first + patches:
            raise ValueError(
                f"vision layer {layer} saw {x.shape[1]} tokens per crop, not the full {first + patches}; "
                "its attention map needs every patch (no vision-site pruning before it)"
            )
        attn = vision.attention(layer)
        crops, tokens, _ = x.shape
        head_dim = attn.head_dim
        scaling = attn.scaling
        with torch.no_grad():
            k = attn.k_proj(x).view(crops, tokens, -1, head_dim).transpose(1, 2)
            if attn.k_norm is not None:
                k = attn.k_norm(k)

        def project_queries(rows: torch.Tensor) -> torch.Tensor:
            """``[C, H, Q, head_dim]`` queries of the tokens ``rows`` ``[C, Q, D]`` of the layer input."""
            q = attn.q_proj(rows).view(crops, rows.shape[1], -1, head_dim).transpose(1, 2)
            return attn.q_norm(q) if attn.q_norm is not None else q

        # Every token's query only when a strategy reads more than the CLS row (VisionZip reads only
        # CLS: projecting all queries cost as much as its whole selection), then kept for the request.
        all_queries = cache(lambda: project_queries(x))

        def cls_row() -> torch.Tensor:  # VisionZip's CLS row, made on first use (VisionAttention.cls)
            with torch.no_grad():
                return attention_rows(project_queries(x[:, :1]), k, scaling).mean(dim=1)[:, 0, first:]

        def column_mass() -> torch.Tensor:
            with torch.no_grad():
                return received_attention(all_queries()[:, :, first:], k, scaling)[:, first:] / patches

        def rows(index: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                q = all_queries()
                index = index.to(q.device)
                picked = torch.gather(q, 2, (first + index.clamp(min=0))[:, None, :, None].expand(-1, q.shape[1], -1, head_dim))
                probs = attention_rows(picked, k, scaling).mean(dim=1)[..., first:]
            return probs * (index >= 0)[..., None].to(probs.dtype)

        return VisionAttention(rows=rows, keys=k.mean(dim=1)[:, first:], cls_row=cls_row if vision.has_cls else None,
                               column_mass=column_mass)

    def pixel_patches(self) -> torch.Tensor:
        """``[C, P, channels, p_h, p_w]``: the (normalised) pixel values behind each crop's patch
        tokens, in the row-major order of the encoder's patch embedding."""
        pixels = self.crop_pixels()
        tall, wide = self.vision.patch_size
        crops, channels = pixels.shape[:2]
        rows, cols = self.grid
        cut = pixels[:, :, : rows * tall, : cols * wide].unfold(2, tall, tall).unfold(3, wide, wide)
        return cut.permute(0, 2, 3, 1, 4, 5).reshape(crops, rows * cols, channels, tall, wide)
