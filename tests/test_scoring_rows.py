"""The rows and columns an LLM stage's scoring reads: the instruction rows of a layout
(``hf_decoder.instruction_slots``, whose batch-of-one form finds them directly), those rows of a
tensor (``hf_decoder._query_rows``, a slice where they are one run), the candidates' hidden states
(``pruner.candidate_features``, one ``index_select`` for one image without pads) and the candidates'
columns of an attention map (``pruner.candidate_attention``, a view where an image's slots are one
run). Each is checked against the rule written out slot by slot, on layouts with several images,
pads, prompt ends and compacted (non-contiguous) visual slots."""

from __future__ import annotations

import pytest
import torch

from vtoken.adapters.hf_decoder import _instruction_slots_batched, _query_rows, instruction_slots
from vtoken.layout import SequenceLayout
from vtoken.pruner import candidate_attention, candidate_features


def _layout(image_index: list[list[int]], valid: list[list[bool]] | None = None, orig: list[list[int]] | None = None):
    image = torch.tensor(image_index)
    batch, length = image.shape
    valid_t = torch.tensor(valid) if valid is not None else torch.ones(batch, length, dtype=torch.bool)
    orig_t = torch.tensor(orig) if orig is not None else torch.arange(length).expand(batch, length).clone()
    visual = torch.where(image >= 0, torch.arange(length), -1)
    return SequenceLayout(orig_t, valid_t, visual, image, orig_t.clone())


def _instruction_rule(layout: SequenceLayout, b: int, prompt_end: int | None) -> list[int]:
    """The valid prompt slots after sample b's last visual slot, written out."""
    image = layout.image_index[b].tolist()
    visual = [i for i, v in enumerate(image) if v >= 0]
    if not visual:
        return []
    return [i for i in range(visual[-1] + 1, layout.length)
            if bool(layout.valid[b, i]) and (prompt_end is None or int(layout.orig_index[b, i]) < prompt_end)]


def _random_layout(g: torch.Generator, batch: int, length: int = 24) -> SequenceLayout:
    image = torch.full((batch, length), -1)
    valid = torch.rand(batch, length, generator=g) > 0.15
    for b in range(batch):
        cursor = int(torch.randint(0, 4, (1,), generator=g))
        for n in range(int(torch.randint(0, 3, (1,), generator=g))):  # 0 to 2 images per sample
            size = int(torch.randint(1, 6, (1,), generator=g))
            if cursor + size > length:
                break
            image[b, cursor : cursor + size] = 2 * b + n
            cursor += size + int(torch.randint(0, 4, (1,), generator=g))
    orig = torch.arange(length).expand(batch, length).clone()
    return SequenceLayout(orig, valid, torch.where(image >= 0, torch.arange(length), -1), image, orig.clone())


@pytest.mark.parametrize("seed", range(40))
def test_instruction_slots_are_the_rule_written_out(seed):
    g = torch.Generator().manual_seed(seed)
    batch = 1 + seed % 3
    layout = _random_layout(g, batch)
    for prompt_end in (None, 18, 5):
        slots, present = instruction_slots(layout, prompt_end)
        want = [_instruction_rule(layout, b, prompt_end) for b in range(batch)]
        assert slots.shape == present.shape == (batch, max(1, *map(len, want)))
        for b in range(batch):
            assert slots[b][present[b]].tolist() == want[b]
            assert (slots[b][~present[b]] == layout.length - 1).all()
        # The batch-of-one form is the batched one, entry for entry.
        for b in range(batch):
            one = SequenceLayout(*(t[b : b + 1] for t in (layout.orig_index, layout.valid, layout.visual_index,
                                                           layout.image_index, layout.position_ids)))
            got, got_present = instruction_slots(one, prompt_end)
            ref, ref_present = _instruction_slots_batched(one, prompt_end)
            assert torch.equal(got, ref) and torch.equal(got_present, ref_present)


def test_instruction_slots_without_an_image_or_text_after_it():
    for image in ([-1, -1, -1, -1], [-1, 0, 0, 0]):
        slots, present = instruction_slots(_layout([image]))
        assert slots.tolist() == [[3]] and present.tolist() == [[False]]


def _columns_rule(probs: torch.Tensor, row_sample: torch.Tensor, slot_index: torch.Tensor) -> torch.Tensor:
    """Each row's columns one by one, 0 for a pad candidate."""
    rows, width = slot_index.shape
    out = torch.zeros(rows, probs.shape[1], probs.shape[2], width)
    for r in range(rows):
        for j in range(width):
            slot = int(slot_index[r, j])
            if slot >= 0:
                out[r, :, :, j] = probs[int(row_sample[r]), :, :, slot]
    return out


@pytest.mark.parametrize("slot_index, row_sample", [
    ([[3, 4, 5, 6]], [0]),  # one image, one run of slots: a view
    ([[2, 3, 4, -1], [5, 6, 7, 8]], [0, 1]),  # a padded row beside a run
    ([[1, 2, 6, 7]], [1]),  # compacted: not one run
    ([[4, 5, 6], [8, 9, 10]], [0, 0]),  # two images of one sample
    ([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]], [1]),  # every slot
])
def test_candidate_attention_is_each_rows_columns(slot_index, row_sample):
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 3, 4, 12, generator=g)
    slots, samples = torch.tensor(slot_index), torch.tensor(row_sample)
    got = candidate_attention(probs, samples, slots)
    assert torch.equal(got, _columns_rule(probs, samples, slots))
    if len(slot_index) == 1 and slot_index[0] == list(range(slot_index[0][0], slot_index[0][-1] + 1)):
        assert got.data_ptr() == probs[row_sample[0], :, :, slot_index[0][0]].data_ptr()  # a view, no copy


def test_candidate_attention_of_no_rows():
    got = candidate_attention(torch.rand(1, 2, 3, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long))
    assert got.shape == (0, 2, 3, 4)


@pytest.mark.parametrize("query_slots", [
    [[5, 6, 7, 8]],  # one run: a slice
    [[11]],  # the last slot alone
    [[2, 3, 5, 6]],  # a gap
    [[4, 4, 5, 6]],  # as many slots as a run from 4 would have, not one
    [[6, 5, 4, 3]],  # descending
    [[3, 4, 5], [7, 8, 9]],  # two samples: gathered per sample
])
def test_query_rows_are_the_slots_rows(query_slots):
    x = torch.arange(2 * 12 * 3, dtype=torch.float32).view(2, 12, 3)[: len(query_slots)]
    slots = torch.tensor(query_slots)
    got = _query_rows(slots)(x)
    assert torch.equal(got, torch.stack([x[b, slots[b]] for b in range(len(query_slots))]))
    one_run = len(query_slots) == 1 and query_slots[0] == list(range(query_slots[0][0], query_slots[0][0] + len(query_slots[0])))
    assert (got.data_ptr() == x[0, query_slots[0][0]].data_ptr()) == one_run  # a view exactly when one run


@pytest.mark.parametrize("slot_index, row_sample", [
    ([[3, 4, 5, 6]], [1]),  # one image, no pad: one index_select
    ([[2, 5, 9]], [0]),  # compacted slots
    ([[2, 3, 4, -1], [5, 6, 7, 8]], [0, 1]),  # a padded row beside a full one
    ([[4, -1, 6]], [1]),  # one row with a pad
    ([[4, 5, 6], [8, 9, 10]], [0, 0]),  # two images of one sample
])
def test_candidate_features_are_each_rows_hidden_states(slot_index, row_sample):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 12, 5, generator=g)
    slots, samples = torch.tensor(slot_index), torch.tensor(row_sample)
    got = candidate_features(hidden, slots, samples, slots >= 0)
    want = torch.stack([torch.stack([hidden[int(samples[r]), s] if s >= 0 else torch.zeros(5) for s in slot_index[r]])
                        for r in range(len(slot_index))])
    assert torch.equal(got, want)
    got.add_(1.0)  # a copy: writing into it leaves the hidden states alone
    assert torch.equal(candidate_features(hidden, slots, samples, slots >= 0), want)
