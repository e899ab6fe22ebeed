"""The vision site inside a packed vision tower (Qwen2-VL, Qwen2.5-VL): every image of a call runs in
one sequence ``[N, d]`` cut into frames by ``cu_seqlens``, with 2-D rotary ``position_embeddings`` per
token, and the 2x2 merger after the last block reads groups of ``merge**2`` consecutive patches.
Qwen2.5-VL runs the sequence in window order (``window_index``: merge units grouped by attention
window) and most blocks attend within windows (``cu_window_seqlens``), the
``fullatt_block_indexes`` ones over whole frames; the merger's output is put back in row-major order
after it.

A stage after block ``l`` keeps whole merge units: one row per frame (an image is one frame), its
candidates the frame's units (a unit's feature is the mean of its patches' hidden states), the
budget the frame's share of the image's budget in LLM tokens (one unit is one LLM token). The kept
units' patches stay in sequence order; every later block is handed the ``cu_seqlens`` and
``max_seqlen`` of the kept patches (per frame, or per window for a windowed block, empty windows
dropped) and their ``position_embeddings`` (each keeps its own 2-D rotary position), and the merger's
output is put back in the units' places (zeros for dropped units) so the model's own reordering,
split and placement run unchanged; the pipeline then removes the dropped tokens in front of the LLM, each kept
token with its original M-RoPE position.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from vtoken import compat
from vtoken.context import Grid, TokenRows, VisionAttention
from vtoken.kernels import attention_rows, gather_tokens, received_attention
from vtoken.request import ImageRun
from vtoken.pruner import vision_not_observed

#: The block keyword arguments that describe the packed sequence.
PACKED_KWARGS = ("cu_seqlens", "max_seqlen", "position_embeddings")


@dataclass(frozen=True)
class WindowOrder:
    """Where a windowed tower (Qwen2.5-VL) runs each merge unit of one call's images: ``order[u]`` is
    unit ``u``'s place in the sequence the blocks run on (the model's ``window_index`` inverted),
    ``window[place]`` the attention window of a place, ``windows`` their count. The same for every
    call with the same image grids (``QwenVLAdapter.window_order`` keeps it per grid shape)."""

    order: torch.Tensor
    window: torch.Tensor
    windows: int

    @classmethod
    def of(cls, window_index: torch.Tensor, cu_window_seqlens: torch.Tensor, unit: int) -> "WindowOrder":
        """From the model's ``(window_index, cu_window_seqlens)`` (units in window order, the windows'
        cumulative lengths in patches) for merge units of ``unit`` patches."""
        bounds = torch.unique_consecutive(cu_window_seqlens.cpu().long()) // unit
        window = torch.searchsorted(bounds, torch.arange(len(window_index)), right=True) - 1
        return cls(torch.argsort(window_index.cpu()), window, int(window.max()) + 1)


class PackedTower:
    """One encoder call's packed sequence as the vision stages left it.

    Units (groups of ``merge**2`` patches, one LLM token each) are numbered row-major per frame and
    image (the token maps' order); ``order[u]`` is unit ``u``'s place in the sequence the blocks run on
    (Qwen2-VL: the same; Qwen2.5-VL: its window order, :class:`WindowOrder`), ``windows`` the
    windows (Qwen2.5-VL; None for a tower without). ``index`` holds the sequence places of the patches
    still in the sequence (ascending); ``frames`` per frame its image, its first unit and the units
    still in it (ascending); ``position_embeddings`` the rotary positions of the current sequence
    (from block 0's call, then gathered by each stage), ``lengths`` per attention kind the segment
    lengths of the current sequence once a stage ran."""

    def __init__(self, images: list, unit: int, windows: WindowOrder | None = None):
        self.unit = unit
        self.frames: list[dict] = []
        first = 0
        for image, info in enumerate(images):
            for frame, grid in enumerate(info.grids):  # one grid of merge units per frame
                units = grid.height * grid.width
                self.frames.append({"image": image, "frame": frame, "first": first, "units": torch.arange(units),
                                    "rows": grid.height, "cols": grid.width, "all": units})
                first += units
        self.order = torch.arange(first) if windows is None else windows.order
        self.windows = windows
        self.index = torch.arange(first * unit)
        self.position_embeddings: tuple | None = None
        self.lengths: dict[str, torch.Tensor] | None = None

    def places(self, frame: dict) -> torch.Tensor:
        """The sequence places (in units) of a frame's current units."""
        return self.order[frame["first"] + frame["units"]]

    def patches(self, frame: dict) -> torch.Tensor:
        """The sequence places of a frame's current patches (each unit's ``merge**2`` in order)."""
        return (self.places(frame)[:, None] * self.unit + torch.arange(self.unit)).reshape(-1)


class PackedVisionSite:
    """Mixin of the Qwen-VL adapter: the vision-site stages of a packed tower (see the module)."""

    def install_packed(self, undo) -> None:
        if self.pruner.stages_at("vision"):
            for layer, block in enumerate(self.vision_layers()):
                undo.pre_hook(block, partial(self._packed_block_inputs, layer), with_kwargs=True)

    def full_attention(self, layer: int) -> bool:
        """Whether vision block ``layer`` attends over whole frames (else within windows)."""
        return True

    def kept_tokens_whole(self, run) -> bool:
        """A vision stage keeps or drops whole merge units (:meth:`_packed_stage`), so every kept LLM
        token has its four patches and the merger's output for it is final."""
        return True

    def window_order(self, images: ImageRun) -> WindowOrder | None:
        """Where a windowed tower runs each merge unit of this call; None for a tower without windows."""
        return None

    def _packed(self, images: ImageRun) -> PackedTower:
        state = images.family_state.get("packed")
        if state is None:
            state = PackedTower(images.images, self.merge**2, self.window_order(images))
            images.family_state["packed"] = state
        return state

    def _packed_block_inputs(self, layer, module, args, kwargs):
        """Block 0 records the sequence's rotary positions; after a stage every block gets the
        segments (whole frames or windows, as the block attends) and positions of the kept patches."""
        images = self.pruner.encoding
        if images is None:
            return None
        state = self._packed(images)
        if state.position_embeddings is None:
            state.position_embeddings = kwargs.get("position_embeddings")
        if state.lengths is None:
            return None
        lengths = state.lengths["full" if self.full_attention(layer) or state.windows is None else "window"]
        out = dict(kwargs)
        if "cu_seqlens" in kwargs:
            old = kwargs["cu_seqlens"]
            out["cu_seqlens"] = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(old.device, old.dtype)
        if kwargs.get("max_seqlen") is not None:
            old, longest = kwargs["max_seqlen"], int(lengths.max())
            out["max_seqlen"] = torch.as_tensor(longest, device=old.device, dtype=old.dtype) if torch.is_tensor(old) else longest
        if "position_embeddings" in kwargs:
            out["position_embeddings"] = state.position_embeddings
        return args, out

    def vision_source_for(self, images: ImageRun, crop_pixels) -> "PackedVisionSource":
        return PackedVisionSource(self, images, crop_pixels)

    def _vision_attention_input(self, layer, module, args, kwargs):
        """Keep what vision ``layer``'s attention takes in: the normed packed sequence, its segments
        (``cu_seqlens``: frames, or windows) and rotary positions."""
        images = self.pruner.encoding
        if images is not None and images.vision_source is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            images.vision_source.inputs[layer] = (hidden, kwargs.get("cu_seqlens"), kwargs.get("position_embeddings"))
        return None

    def _observed_vision(self, layer: int, io: dict) -> None:
        """A packed block's per-patch summary (the strategy's ``observe`` on the sequence as one row),
        kept with the sequence places of the patches it covers."""
        images = self.pruner.encoding
        packed = {name: (a[None], b[None]) for name, (a, b) in io.items()}
        valid = torch.ones(1, io["block"][0].shape[0], dtype=torch.bool, device=io["block"][0].device)
        summary = self.pruner.strategy.observe("vision", layer, packed, valid)[0]
        images.observed[layer] = (summary, self._packed(images).index.clone())

    def _after_vision_layer(self, stage, module, args, output):
        images = self.pruner.encoding
        if images is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        pruned = self._packed_stage(images, stage, hidden)
        return (pruned, *output[1:]) if isinstance(output, tuple) else pruned

    def _packed_stage(self, images: ImageRun, stage, hidden: torch.Tensor) -> torch.Tensor:
        state = self._packed(images)
        device = hidden.device
        frames = state.frames
        width = max(len(f["units"]) for f in frames)
        dim = hidden.shape[-1]
        features = hidden.new_zeros(len(frames), width, dim)
        valid = torch.zeros(len(frames), width, dtype=torch.bool, device=device)
        local = torch.full((len(frames), width), -1, dtype=torch.long, device=device)
        budget = torch.zeros(len(frames), dtype=torch.long, device=device)
        grids = []
        for r, frame in enumerate(frames):
            places = torch.searchsorted(state.index, state.patches(frame)).to(device)  # current places
            count = len(frame["units"])
            features[r, :count] = hidden[places].view(count, state.unit, dim).mean(dim=1)
            valid[r, :count] = True
            local[r, :count] = (frame["frame"] * frame["all"] + frame["units"]).to(device)
            image = images.images[frame["image"]]
            budget[r] = stage.crop_budget(frame["all"], image.num_tokens)
            if int(budget[r]) > count:
                raise ValueError(
                    f"the budget ({int(budget[r])} tokens of a frame) exceeds the {count} tokens left in the vision "
                    f"encoder at {stage.name}; lower keep/keep_tokens"
                )
            whole = count == frame["all"]
            grids.append((Grid(0, frame["rows"], frame["cols"], frame["cols"]),) if whole else None)
        rows = TokenRows(features, valid, budget, torch.tensor([f["image"] for f in frames], device=device), grids, local)
        stage_index = self.pruner._stage_index(stage)

        def row_seeds() -> list[int]:  # a frame's row: its image, the frame, the stage
            return [images.row_seed(images.images[f["image"]].crops, f["frame"], stage_index) for f in frames]

        def observed(layer: int) -> torch.Tensor:  # [R, units, k]: a unit's summary, the mean of its patches'
            if layer not in images.observed:
                raise vision_not_observed(layer)
            summary, then = images.observed[layer]
            summary = summary if summary.dim() == 2 else summary[:, None]
            out = summary.new_zeros(len(frames), width, summary.shape[-1])
            for r, frame in enumerate(frames):
                where_then = torch.searchsorted(then, state.patches(frame)).to(summary.device)
                out[r, : len(frame["units"])] = summary[where_then].view(-1, state.unit, summary.shape[-1]).mean(dim=1)
            return out

        reduction = self.pruner._reduce(images, stage, rows, row_seeds=row_seeds, observed=observed)
        shifts = []
        for r, frame in enumerate(frames):
            keep = reduction.keep[r]
            picked = keep[keep >= 0]
            frame["units"] = frame["units"][picked.cpu()]
            if reduction.features is not None:
                # A merging method gives each kept unit a new feature: its patches move by the change
                # of the unit's mean, so the unit's mean is the merged feature and its patches keep
                # their differences (the merger reads all of them).
                change = reduction.features[r, : len(picked)] - features[r, picked]
                shifts.append(change.repeat_interleave(state.unit, dim=0))
        kept = torch.sort(torch.cat([state.patches(f) for f in frames])).values  # in sequence order
        current = torch.searchsorted(state.index, kept).to(device)
        self._renew_segments(state, current, kept)
        state.index = kept
        self._record_positions(images, stage, frames, state)
        out = gather_tokens(hidden[None], current[None])[0]
        return out + torch.cat(shifts).to(out.dtype) if shifts else out

    @staticmethod
    def _renew_segments(state: PackedTower, current: torch.Tensor, kept: torch.Tensor) -> None:
        """The segments of the kept patches: per frame (a frame keeps at least one unit; frames are
        contiguous in the sequence), per window where the tower has windows (empty ones dropped),
        and each kept patch's own rotary position."""
        full = torch.tensor([len(f["units"]) * state.unit for f in state.frames])
        state.lengths = {"full": full}
        if state.windows is not None:
            counts = torch.bincount(state.windows.window[kept[:: state.unit] // state.unit], minlength=state.windows.windows)
            state.lengths["window"] = counts[counts > 0] * state.unit
        if state.position_embeddings is not None:
            state.position_embeddings = tuple(t[current.to(t.device)] for t in state.position_embeddings)

    @staticmethod
    def _record_positions(images: ImageRun, stage, frames: list[dict], state: PackedTower) -> None:
        """``vision_positions``: per image, the image-local patch candidates still present (padded by
        repeating the first: the pipeline's slot sets ignore repeats)."""
        per_image: dict[int, list[torch.Tensor]] = {}
        for frame in frames:
            first_patch = frame["frame"] * frame["all"] * state.unit
            units = frame["units"]
            patches = first_patch + (units[:, None] * state.unit + torch.arange(state.unit)).reshape(-1)
            per_image.setdefault(frame["image"], []).append(patches)
        rows = [torch.cat(per_image[i]) for i in range(len(images.images))]
        width = max(len(r) for r in rows)
        positions = torch.stack([torch.cat([r, r[:1].expand(width - len(r))]) for r in rows])
        images.vision_positions = positions
        images.stage_positions[stage.name] = positions

    def _before_projector(self, module, args):
        """Keep every patch's merger input (the last block's output), in row-major slots
        ``image * tokens_per_crop + patch`` (zeros for patches a vision stage dropped): each LLM
        token's projector input is its unit's patches, concatenated (``ProjectorSpec.unit``)."""
        images = self.pruner.encoding
        if images is None:
            return None
        features = args[0]
        state = self._packed(images)
        per = images.tokens_per_crop
        table = features.new_zeros(len(images.images) * per, features.shape[-1])
        within = torch.arange(state.unit)
        slots, places = [], []
        for frame in state.frames:
            units = frame["units"]
            first_patch = frame["image"] * per + frame["frame"] * frame["all"] * state.unit
            slots.append((first_patch + units[:, None] * state.unit + within).reshape(-1))
            places.append((state.places(frame)[:, None] * state.unit + within).reshape(-1))
        current = torch.searchsorted(state.index, torch.cat(places)).to(features.device)
        table[torch.cat(slots).to(features.device)] = features[current]
        images.projector_table = table
        images.projector_unit = state.unit
        return None

    def _after_projector(self, module, args, output):
        """The merger's output for the kept units, put back in every unit's place (zeros for dropped
        ones), so ``get_image_features`` splits it per image as it expects."""
        images = self.pruner.encoding
        if images is None or images.vision_positions is None:
            return None
        state = self._packed(images)
        kept_units = torch.div(state.index[:: state.unit], state.unit, rounding_mode="floor")
        total = int(sum(f["all"] for f in state.frames))
        if output.shape[0] == total:  # a merger that ran before any stage (Qwen3-VL's DeepStack)
            return None
        full = output.new_zeros(total, output.shape[-1])
        full[kept_units.to(output.device)] = output
        return full


class PackedVisionSource:
    """What a strategy may read from one call of a packed tower (``ScoreContext.vision_attention`` and
    ``pixel_patches``), with images as the "crops": patches in each image's own order (slots
    ``image * tokens_per_crop + patch``), padded to the call's largest image (``VisionAttention.valid``).
    A layer's attention is recomputed beside SDPA from the layer's input, its rotary positions and its
    segments (a query attends within its frame, or its window in Qwen2.5-VL's windowed blocks)."""

    def __init__(self, adapter: PackedVisionSite, images: ImageRun, crop_pixels):
        self.adapter, self.images, self.crop_pixels = adapter, images, crop_pixels
        #: Vision layer -> (its attention input ``[N, d]``, ``cu_seqlens``, ``(cos, sin)``).
        self.inputs: dict[int, tuple] = {}

    def _slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, patch)`` of every place of the packed sequence (every patch present)."""
        state = self.adapter._packed(self.images)
        image = torch.empty(len(state.index), dtype=torch.long)
        patch = torch.empty(len(state.index), dtype=torch.long)
        for frame in state.frames:
            places = state.patches(frame)
            within = (frame["frame"] * frame["all"] + frame["units"]) * state.unit
            image[places] = frame["image"]
            patch[places] = (within[:, None] + torch.arange(state.unit)).reshape(-1)
        return image, patch

    def attention(self, layer: int) -> VisionAttention:
        if layer not in self.inputs:
            raise ValueError(f"vision layer {layer}'s attention was not recorded; declare Signal('vision_attention', {layer}) in needs()")
        hidden, cu_seqlens, (cos, sin) = self.inputs[layer]
        state = self.adapter._packed(self.images)
        if hidden.shape[0] != sum(f["all"] for f in state.frames) * state.unit:
            raise ValueError(
                f"vision layer {layer} saw {hidden.shape[0]} patches, not all of them; its attention map needs every "
                "patch (no vision-site pruning before it)"
            )
        attention = self.adapter.vision_layers()[layer].attn
        heads = attention.num_heads
        with torch.no_grad():
            # The queries and keys alone: the fused projection's first two thirds (the values are the
            # block's own work, not the map's).
            qk = compat.FusedSlice(attention.qkv, 0, 2 * hidden.shape[-1])(hidden)  # qkv: [N, 3 * width]
            q, k = qk.reshape(hidden.shape[0], 2, heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = compat.qwen_vision_rotary(attention)(q, k, cos, sin)
        scaling = attention.head_dim ** -0.5 if hasattr(attention, "head_dim") else q.shape[-1] ** -0.5
        image_of, patch_of = self._slots()
        crops, width = len(self.images.images), self.images.candidate_local.shape[1]
        counts = torch.tensor([info.token_map.index.numel() for info in self.images.images])
        valid = torch.arange(width)[None] < counts[:, None]
        bounds = cu_seqlens.tolist()
        segments = list(zip(bounds[:-1], bounds[1:]))
        keys = k.float().mean(dim=1)  # [N, head_dim]
        key_table = keys.new_zeros(crops, width, keys.shape[-1])
        key_table[image_of, patch_of] = keys
        place_of = torch.full((crops, width), -1, dtype=torch.long)
        place_of[image_of, patch_of] = torch.arange(len(image_of))

        def segment_probs(start: int, end: int, queries: torch.Tensor) -> torch.Tensor:
            """``[Q, end - start]`` head-averaged probabilities of sequence places ``queries``."""
            qs = q[queries].transpose(0, 1)[None]  # [1, H, Q, d]
            ks = k[start:end].transpose(0, 1)[None]
            with torch.no_grad():
                return attention_rows(qs.float(), ks.float(), scaling)[0].mean(dim=0)

        def column_mass() -> torch.Tensor:
            # Per segment, the attention each patch receives from every query of its segment, summed
            # chunk by chunk (kernels.received_attention): never the segment's N x N map, which for
            # one 2304-patch image is 21M scores per layer.
            received = torch.zeros(len(image_of))
            for start, end in segments:
                qs = q[start:end].transpose(0, 1)[None].float()  # [1, H, N, d]
                ks = k[start:end].transpose(0, 1)[None].float()
                with torch.no_grad():
                    received[start:end] = received_attention(qs, ks, scaling)[0].cpu()
            table = torch.zeros(crops, width)
            table[image_of, patch_of] = received
            return table / counts[:, None].clamp(min=1)

        def rows(index: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(*index.shape, width)
            index = index.cpu()
            crop_ids, row_ids = (index >= 0).nonzero(as_tuple=True)
            places = place_of[crop_ids, index[crop_ids, row_ids]]
            segment_of = torch.searchsorted(torch.tensor(bounds[1:]), places, right=True)
            # One attention_rows call per segment for all the rows asked of it.
            for s in segment_of.unique().tolist():
                start, end = segments[s]
                mine = segment_of == s
                probs = segment_probs(start, end, places[mine]).cpu()  # [rows, end - start]
                out[crop_ids[mine][:, None], row_ids[mine][:, None], patch_of[start:end][None, :]] = probs
            return out

        return VisionAttention(rows=rows, keys=key_table, cls_row=None, column_mass=column_mass, valid=valid)

    def pixel_patches(self) -> torch.Tensor:
        """``[C, P, channels, p, p]``: each image's patches as the processor flattened them (its first
        temporal slice), padded with zeros to the largest image."""
        pixels = self.crop_pixels()  # per image: [patches, channels * temporal * p * p]
        vision = self.adapter.config.vision_config
        channels, temporal, size = vision.in_channels, vision.temporal_patch_size, vision.patch_size
        width = self.images.candidate_local.shape[1]
        out = torch.zeros(len(pixels), width, channels, size, size, dtype=pixels[0].dtype)
        for c, rows in enumerate(pixels):
            out[c, : rows.shape[0]] = rows.view(rows.shape[0], channels, temporal, size, size)[:, :, 0]
        return out
