"""A wrapped model keeps nothing of a call once it returns: the encoding of a call's images (the
vision tower's output and vtoken's record of it, ``request.ImageRun``) lives only as long as the
features object it returned, and unwrapping leaves nothing that holds the model or its last run.

Each forward used to leave its encoding behind for good: the pruner keeps an encoding until its
features object dies, and the encoding held that object itself, so neither ever died, and through
them the model outlived ``unwrap`` and ``del`` (memory grew by an encoding per call)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import vtoken
from families import FAMILIES
from vision_families import VISION_FAMILIES, images
from vtoken.request import ImageRun, PruneRun


def _live(kind: type) -> int:
    gc.collect()
    return sum(type(o) is kind for o in gc.get_objects())  # type(): no lazy module attribute is touched


def _live_encodings() -> int:
    return _live(ImageRun)


@pytest.mark.parametrize("method", ["random", "vflowopt", "fastv"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_finished_calls_leave_no_encoding_and_unwrap_frees_the_model(name, method):
    model = FAMILIES[name].make()
    x = FAMILIES[name].inputs(model)
    before, runs = _live_encodings(), _live(PruneRun)
    vtoken.wrap(model, method, keep=0.5)
    with torch.no_grad():
        for _ in range(3):
            model(**x)
        model.generate(**x, max_new_tokens=2, do_sample=False)
    assert _live_encodings() == before  # none of the four calls' encodings is left
    assert vtoken.selection(model)  # what the last call kept is still reported (PruneRun, not its encoding)
    alive = weakref.ref(model)
    vtoken.unwrap(model)
    del model
    gc.collect()
    assert alive() is None
    assert _live(PruneRun) == runs  # nor the last call's run, which the thread's context held


@pytest.mark.parametrize("name", list(VISION_FAMILIES))
def test_unwrapping_a_vision_encoder_lets_go_of_its_last_run(name):
    """A vision-only model's last run holds its encoding (the kept patches, the tower's features) for
    ``vtoken.selection``; the run stayed in the thread's context after unwrap, one per wrap."""
    family = VISION_FAMILIES[name]
    model = family.make()
    x = images(2)
    before = (_live(ImageRun), _live(PruneRun))
    for _ in range(3):  # wrap and unwrap again and again, as a sweep does
        with vtoken.pruned(model, "random", keep=0.5), torch.no_grad():
            family.embed(model, x)
            assert vtoken.selection(model)
    assert (_live(ImageRun), _live(PruneRun)) == before
