"""``SequenceLayout.renumbered`` on M-RoPE ids (``positions="contiguous"`` for Qwen-VL), against a
slot-by-slot reference written from the rule ``get_rope_index`` numbers a prompt by: a text token
takes the largest id so far plus one (all three components), or its own id less the shift of the
tokens before it where that is less (after a video whose temporal ids pass its spatial ones); an
image's tokens keep their (t, h, w) offsets from the text token just before the image. The layout
works a run of slots at a time; the reference a slot at a time, on random layouts with pads, dropped
slots, several images (two of them adjacent, with no text between), a video of more frames than
columns and the 4-row form whose first row serves mask building only."""

from __future__ import annotations

import pytest
import torch

from vtoken.layout import SequenceLayout


def _reference(ids: torch.Tensor, valid: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``[B, L, 3]`` renumbered ids, one slot at a time (pads keep theirs)."""
    out = ids.clone()
    for b in range(ids.shape[0]):
        shift, largest = 0, None
        for j in range(ids.shape[1]):
            if not valid[b, j]:
                continue
            if image[b, j] >= 0:
                out[b, j] = ids[b, j] - shift
            elif largest is None:
                out[b, j] = ids[b, j, 0]
            else:  # the largest id so far plus one, never later than the model's own id shifted
                out[b, j] = min(largest + 1, int(ids[b, j, 0]) - shift)
            if image[b, j] < 0:
                shift = int(ids[b, j, 0] - out[b, j, 0])
            top = int(out[b, j].max())
            largest = top if largest is None else max(largest, top)
    return out


def _mrope_prompt(g: torch.Generator, runs: list[tuple[str, int]], start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt's M-RoPE ids ``[L, 3]`` and image index ``[L]`` as transformers' get_rope_index numbers
    it: text runs on consecutively; an image is an h x w grid (w = 2..4) from the position after the
    text; a video ("video", n) is n // 2 frames of a 1 x 2 grid, its temporal ids past its spatial
    ones, and the text after it goes on from the spatial ids alone."""
    ids, image, next_id, count = [], [], start, 0
    for kind, n in runs:
        if kind == "text":
            ids += [[next_id + i] * 3 for i in range(n)]
            image += [-1] * n
            next_id += n
        elif kind == "video":
            grid = [[next_id + f, next_id, next_id + i] for f in range(n // 2) for i in range(2)]
            ids += grid
            image += [count] * n
            count += 1
            next_id += 2
        else:
            width = int(torch.randint(2, 5, (), generator=g))
            grid = [[next_id, next_id + i // width, next_id + i % width] for i in range(n)]
            ids += grid
            image += [count] * n
            count += 1
            next_id = max(max(row) for row in grid) + 1
    return torch.tensor(ids), torch.tensor(image)


@pytest.mark.parametrize("rows", [3, 4])
@pytest.mark.parametrize("seed", range(6))
def test_mrope_renumbering_equals_the_slot_by_slot_rule(seed, rows):
    g = torch.Generator().manual_seed(seed)
    layouts = [
        [("text", 5), ("image", 12), ("text", 7)],
        [("image", 9), ("text", 4)],  # the image first: its ids are kept as they are
        [("text", 3), ("image", 8), ("image", 6), ("text", 2), ("image", 10), ("text", 1)],  # adjacent images
        [("text", 4), ("video", 12), ("text", 3), ("image", 6), ("text", 2)],
    ]
    prompts = [_mrope_prompt(g, runs, start=int(torch.randint(0, 3, (), generator=g))) for runs in layouts]
    length = max(ids.shape[0] for ids, _ in prompts) + 2
    batch = len(prompts)
    ids = torch.zeros(batch, length, 3, dtype=torch.long)
    image = torch.full((batch, length), -1)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    for b, (p_ids, p_image) in enumerate(prompts):  # left padding
        ids[b, length - len(p_ids):], image[b, length - len(p_ids):] = p_ids, p_image
        valid[b, length - len(p_ids):] = True
    # Drop a random third of the visual slots (pruning) and, in each sample, a text slot before an
    # image (what an image's ids shift by follows the text token just before it).
    dropped = (torch.rand(batch, length, generator=g) < 0.35) & (image >= 0)
    for b, (p_ids, p_image) in enumerate(prompts):
        text_before_image = [j for j in range(1, len(p_image)) if p_image[j - 1] < 0 and p_image[j] >= 0]
        if text_before_image:
            dropped[b, length - len(p_ids) + text_before_image[0] - 2] = True
    valid &= ~dropped
    positions = ids if rows == 3 else torch.cat([ids[..., :1] * 0 + 7, ids], dim=-1)
    orig = torch.arange(length).expand(batch, length)
    layout = SequenceLayout(orig, valid, torch.where(image >= 0, 0, -1), image, positions)

    renumbered = layout.renumbered().position_ids
    expected = _reference(ids, valid, image)
    assert torch.equal(renumbered[..., -3:], expected)
    if rows == 4:
        assert torch.equal(renumbered[..., 0], expected[..., 0])  # the text row follows the temporal one
    # By construction: with nothing dropped the ids are the model's own.
    whole = SequenceLayout(orig, valid | dropped, layout.visual_index, image, positions)
    assert torch.equal(whole.renumbered().position_ids[..., -3:][valid | dropped], ids[valid | dropped])


def test_slot_of_original_finds_each_kept_token_and_nothing_else():
    """Two samples compacted twice (left pads added, tokens dropped): the map from original index to
    slot is the loop over the slots written out, built once per layout and length."""
    length = 9
    orig = torch.arange(length).expand(2, length)
    layout = SequenceLayout(orig, torch.ones(2, length, dtype=torch.bool), torch.full((2, length), -1),
                            torch.full((2, length), -1), orig.clone())
    keep = torch.ones(2, length, dtype=torch.bool)
    keep[0, [1, 4, 5]] = False
    keep[1, [0, 8]] = False
    once, _ = layout.compact(keep)
    keep = torch.ones_like(once.valid)
    keep[1, 3] = False
    twice, _ = once.compact(keep)
    for current in (layout, once, twice):
        want = torch.full((2, length + 2), -1)
        for b in range(2):
            for slot, index in enumerate(current.orig_index[b].tolist()):
                if index >= 0:
                    want[b, index] = slot
        got = current.slot_of_original(length + 2)
        assert torch.equal(got, want)
        assert current.slot_of_original(length + 2) is got  # built once
        assert torch.equal(current.slot_of_original(length), want[:, :length])
    assert int(twice.slot_of_original(length)[0, 4]) == -1 and int(twice.slot_of_original(length)[1, 2]) >= 0


def test_contiguous_renumbering_starts_at_each_samples_first_valid_position():
    """1-D renumbering (``positions="contiguous"``) numbers the valid slots on from the position id of
    each sample's first valid slot: 0 under ``generate``, the pad count in a plain forward of a
    left-padded batch (transformers then numbers the pads too), so a batch row keeps the ids the
    unwrapped model gives its first token. Dropped slots (invalid) take no id of their own."""
    valid = torch.tensor([[False, False, True, True, False, True],
                          [True, False, True, True, True, False]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 4]])
    orig = torch.arange(6).expand(2, 6)
    layout = SequenceLayout(orig, valid, torch.full((2, 6), -1), torch.full((2, 6), -1), positions)
    renumbered = layout.renumbered().position_ids
    assert renumbered[valid].tolist() == [2, 3, 4, 0, 1, 2, 3]
