"""A wrapped model keeps nothing of a call once it returns: the encoding of a call's images (the
vision tower's output and vtoken's record of it, ``request.ImageRun``) lives only as long as the
features object it returned, and unwrapping leaves nothing that holds the model.

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
from vtoken.request import ImageRun


def _live_encodings() -> int:
    gc.collect()
    return sum(type(o) is ImageRun for o in gc.get_objects())  # type(): no lazy module attribute is touched


@pytest.mark.parametrize("method", ["random", "vflowopt", "fastv"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_finished_calls_leave_no_encoding_and_unwrap_frees_the_model(name, method):
    model = FAMILIES[name].make()
    x = FAMILIES[name].inputs(model)
    before = _live_encodings()
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
