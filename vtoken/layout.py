"""Sequence layouts: which original token sits in each slot of a (possibly pruned) LLM sequence.

After pruning, samples of a batch keep different numbers of tokens. A layout packs each sample's kept
tokens to the right and left-pads the batch to the longest, so the last token stays in the last
column (what ``generate`` and ``logits_to_keep`` rely on). Every layer group of the LLM (the layers
between two pruning points) has one layout; its KV cache holds exactly those slots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vtoken.kernels import compact_index, gather_tokens


def positions_in(positions: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """A model's position ids in vtoken's layout form: ``[B, L]`` for 1-D RoPE, ``[B, L, k]`` for a
    model that gives ``[k, B, L]`` (M-RoPE: k = 3 components t/h/w, or 4 with a text row first), so
    that every per-slot gather works on the slot axis alone."""
    if positions is None:
        return torch.arange(length, device=device)[None].expand(batch, length)
    if positions.dim() == 3:
        return positions.permute(1, 2, 0).expand(batch, length, positions.shape[0])
    return positions.expand(batch, length)


def positions_out(positions: torch.Tensor) -> torch.Tensor:
    """Layout-form position ids back in the model's form (``[k, B, L]`` for M-RoPE)."""
    return positions.permute(2, 0, 1) if positions.dim() == 3 else positions


def rotary_positions(positions: torch.Tensor) -> torch.Tensor:
    """The position ids the rotary embedding takes, in the model's form: M-RoPE's three t/h/w rows
    (the leading text row of a 4-row form only serves mask building)."""
    if positions.dim() == 3:
        return positions_out(positions[..., -3:])
    return positions


@dataclass
class SequenceLayout:
    """Per slot (``[B, L]`` each): the original sequence index (-1 for a pad slot added by pruning),
    whether the slot may be attended, the sample-level visual-token index (-1 for text), the global
    image index (-1 for text), and the position id the slot carries (``[B, L, k]`` for M-RoPE, see
    :func:`positions_in`)."""

    orig_index: torch.Tensor
    valid: torch.Tensor
    visual_index: torch.Tensor
    image_index: torch.Tensor
    position_ids: torch.Tensor

    @property
    def length(self) -> int:
        return self.orig_index.shape[1]

    def slot_of_original(self, orig_length: int) -> torch.Tensor:
        """``[B, orig_length]``: the slot holding each original sequence index, -1 where no slot does
        (dropped, or past this layout). Built once per layout: every later stage that reads an
        observation made on this layout maps its candidates through it (a layout is never changed
        in place, so the map stays true)."""
        built = self.__dict__.setdefault("_slot_of_original", {})
        if orig_length not in built:
            where = torch.full((self.orig_index.shape[0], orig_length), -1, dtype=torch.long, device=self.orig_index.device)
            rows, slots = (self.orig_index >= 0).nonzero(as_tuple=True)
            where[rows, self.orig_index[rows, slots]] = slots
            built[orig_length] = where
        return built[orig_length]

    def compact(self, keep: torch.Tensor) -> tuple["SequenceLayout", torch.Tensor]:
        """The layout of the slots where ``keep`` (``[B, L]``) is True, and the slot index that builds
        it from this one (``[B, L']``, -1 for new pad slots): gather any ``[B, L, ...]`` tensor with it."""
        index = compact_index(keep)
        pad = index < 0
        layout = SequenceLayout(
            orig_index=gather_tokens(self.orig_index, index, fill=-1),
            valid=gather_tokens(self.valid, index, fill=False) & ~pad,
            visual_index=gather_tokens(self.visual_index, index, fill=-1),
            image_index=gather_tokens(self.image_index, index, fill=-1),
            position_ids=gather_tokens(self.position_ids, index, fill=0),
        )
        return layout, index

    def without_last(self, count: int) -> "SequenceLayout":
        """The same layout less its last ``count`` slots (every field cut alike)."""
        return SequenceLayout(**{f.name: getattr(self, f.name)[:, : self.length - count] for f in dataclasses.fields(self)})

    def renumbered(self) -> "SequenceLayout":
        """The same slots with consecutive position ids over the valid slots (PyramidDrop-style),
        starting from the position of each sample's first valid slot (0 under ``generate``)."""
        if self.position_ids.dim() == 3:
            return SequenceLayout(self.orig_index, self.valid, self.visual_index, self.image_index, self._mrope_renumbered())
        first_valid = self.valid.long().argmax(-1, keepdim=True)
        start = torch.gather(self.position_ids, 1, first_valid)
        positions = start + (self.valid.long().cumsum(-1) - 1).clamp(min=0)
        return SequenceLayout(self.orig_index, self.valid, self.visual_index, self.image_index, positions)

    def _mrope_renumbered(self) -> torch.Tensor:
        """Contiguous M-RoPE ids: every run of an image's kept tokens keeps its (t, h, w) offsets
        from the image's start, which follows the text before it; a text token takes the largest id
        so far plus one (all components), as ``get_rope_index`` numbers text after an image, or the
        id the model itself gives it less what the tokens before it were shifted by, if that is less
        (text after a video whose temporal ids run past its spatial ones). With nothing dropped this
        is the model's own numbering.

        Works a run at a time (a sample's valid slots split where text turns to image, image to text
        or one image to the next), not a slot at a time: a prompt has a handful of runs but hundreds
        of slots, and a Python step per slot cost about 3 ms a stage on a 600-token Qwen2-VL prompt."""
        positions = self.position_ids[..., -3:].clone()  # a leading text row (4-row form) follows below
        for b in range(positions.shape[0]):
            slots = torch.nonzero(self.valid[b]).squeeze(-1)
            if slots.numel() == 0:
                continue
            images = self.image_index[b, slots]
            old = positions[b, slots]  # [S, 3], the ids before renumbering
            new = old.clone()
            starts = torch.ones_like(images, dtype=torch.bool)
            starts[1:] = images[1:] != images[:-1]  # text is -1: a text run is one run whatever its length
            bounds = torch.nonzero(starts).squeeze(-1).tolist() + [images.numel()]
            is_image = (images[torch.tensor(bounds[:-1], device=images.device)] >= 0).tolist()
            shift = 0  # old - new of the last text token (an image keeps its offsets from it)
            largest = None  # the largest id given so far, every component
            for (start, end), image in zip(zip(bounds, bounds[1:]), is_image):
                if image:
                    new[start:end] = old[start:end] - shift
                    top = int(new[start:end].max())
                else:  # consecutive ids from the largest so far plus one (the first slot keeps its own) ...
                    first = int(old[start, 0])
                    if largest is not None:
                        # ... but never later than the model itself puts it, shifted as the block before it:
                        # after a video whose frames outnumber its rows and columns, get_rope_index
                        # (transformers 5) goes on from the spatial ids alone, below the temporal ones.
                        first = min(largest + 1, first - shift)
                    top = first + (end - start) - 1
                    new[start:end] = torch.arange(first, top + 1, dtype=new.dtype, device=new.device)[:, None]
                    shift = int(old[end - 1, 0]) - top
                largest = top if largest is None else max(largest, top)
            positions[b, slots] = new
        if self.position_ids.shape[-1] == 4:  # the text row (mask building only) follows the temporal one
            positions = torch.cat([positions[..., :1], positions], dim=-1)
        return positions

    def max_position(self) -> torch.Tensor:
        """``[B]``: each sample's largest position id over its valid slots (every component)."""
        positions = self.position_ids[..., -3:] if self.position_ids.dim() == 3 else self.position_ids[..., None]
        floor = torch.iinfo(positions.dtype).min if not positions.dtype.is_floating_point else float("-inf")
        return torch.where(self.valid[..., None].bool(), positions, floor).amax(dim=(1, 2))

    def last_position(self) -> torch.Tensor:
        """``[B, k]``: the position ids of each sample's last valid slot (every row of an M-RoPE form,
        ``k = 1`` for 1-D RoPE); zeros for a sample without one."""
        positions = self.position_ids if self.position_ids.dim() == 3 else self.position_ids[..., None]
        last = self.last_slot(self.valid)
        return positions[torch.arange(positions.shape[0], device=last.device), last]

    def prompt_slots(self, prompt_end: int | None) -> torch.Tensor:
        """``[B, L]`` bool: the valid slots that belong to the prompt (original index before
        ``prompt_end``; every valid slot when None). ``generate`` with an assistant feeds candidate
        tokens with the prompt in its first forward: what reads the prompt must not read them."""
        valid = self.valid.bool()
        return valid if prompt_end is None else valid & (self.orig_index < prompt_end)

    @staticmethod
    def last_slot(mask: torch.Tensor) -> torch.Tensor:
        """``[B]``: each row's last slot where ``mask`` (``[B, L]``) holds; 0 for a row where none does.
        Under right padding that is not the last slot."""
        slots = torch.arange(mask.shape[1], device=mask.device)
        return torch.where(mask.bool(), slots, -1).amax(dim=1).clamp(min=0)

    def visual_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Visual slots grouped by image, for scoring.

        Returns ``slot_index [R, N]`` (-1 padded), ``row_image [R]`` (global image index of each row)
        and ``row_sample [R]``, with one row per image present in this layout, in image order.
        """
        batch_idx, slot_idx = (self.image_index >= 0).nonzero(as_tuple=True)
        images = self.image_index[batch_idx, slot_idx]
        # nonzero is row-major and images are numbered in row-major order, so rows come out grouped.
        row_image, counts = torch.unique_consecutive(images, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(images.numel(), device=images.device) - torch.repeat_interleave(starts, counts)
        row = torch.repeat_interleave(torch.arange(row_image.numel(), device=images.device), counts)
        width = int(counts.max()) if counts.numel() else 0
        slot_index = torch.full((row_image.numel(), width), -1, dtype=torch.long, device=images.device)
        slot_index[row, rank] = slot_idx
        row_sample = torch.zeros(row_image.numel(), dtype=torch.long, device=images.device)
        row_sample[row] = batch_idx
        return slot_index, row_image, row_sample


def identity_layout(
    attention_mask: torch.Tensor, position_ids: torch.Tensor, visual_index: torch.Tensor, image_index: torch.Tensor
) -> SequenceLayout:
    batch, length = attention_mask.shape
    orig = torch.arange(length, device=attention_mask.device).expand(batch, length)
    return SequenceLayout(orig, attention_mask.bool(), visual_index, image_index, position_ids)
