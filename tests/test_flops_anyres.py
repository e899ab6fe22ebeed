"""vtoken.flops for a vision-site stage on an AnyRes model (LLaVA-NeXT, LLaVA-OneVision): what the
wrapped model's forward sends to the LLM, and the FLOPs ``FlopCounterMode`` counts for it.

Every crop keeps the same number of encoder tokens; the LLM then gets, per image, the kept patches
that unpadding leaves, the newline closing each grid row that still holds a token, and (OneVision, a
large image) the tokens of the resized grid that a kept patch reaches. ``flops`` counts that with
every newline kept (``token_geometry.AnyresLayout``): for a pruning method on a grid that is not resized
the count is exact less the newlines of rows left empty, which the test finds in the model's own
packing (transformers' ``pack_image_features`` on zero features with a ones newline), not in vtoken.
"""

from __future__ import annotations

import pytest
import torch
from test_flops import Tally, next_inputs, tiny_llava_next
from test_flops_onevision import IMAGE, image_inputs, tiny_onevision

import vtoken
from vtoken.accounting import flops

TEXT = 7  # 3 tokens before the image, 4 after


@pytest.fixture(scope="module")
def models():
    return {"next": tiny_llava_next(), "onevision": tiny_onevision()}


def _inputs(family, model, size, seed=0):
    torch.manual_seed(seed)
    if family == "next":
        pixels, sizes, packed = next_inputs(model, size)
        return dict(pixel_values=pixels, image_sizes=sizes), packed, 100
    inputs, packed, _ = image_inputs(model, [size])
    return inputs, packed, IMAGE


def _newlines(family, model, inputs) -> set[int]:
    """Positions of the newline tokens among the image's packed tokens, from the model's packing."""
    crops = inputs["pixel_values"].shape[1]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    features = [torch.zeros(crops, side * side, 2)]
    newline = torch.ones(2)
    core = model.model
    if family == "next":
        packed, _ = core.pack_image_features(features, inputs["image_sizes"], "default", image_newline=newline)
    else:
        packed, _ = core.pack_image_features(features, inputs["image_sizes"], image_newline=newline,
                                             vision_aspect_ratio=model.config.vision_aspect_ratio)
    return set(torch.nonzero(packed[0][:, 0] != 0).squeeze(-1).tolist())


def _run(model, inputs, packed, token, method, options):
    ids = torch.tensor([[1, 2, 3] + [token] * packed + [4, 5, 6, 7]])
    with vtoken.pruned(model, method, **options):
        tally = Tally()
        tally("all", lambda: model(input_ids=ids, **inputs, logits_to_keep=1))
        report = flops(model, text_tokens=TEXT, image_size=tuple(inputs["image_sizes"][0].tolist()))
        kept = vtoken.selection(model)[0][f"vision:{options['layer']}"]
    return report, tally.parts["all"], set(kept.tolist())


# Image sizes whose unpadded grid is not resized: square (nothing cut), wide and tall (rows or columns cut).
SIZES = [(56, 56), (30, 56), (100, 30), (56, 20)]


CASES = [(size, keep) for size in SIZES for keep in (0.5, 0.2)] + [((12, 100), 0.75)]  # a crop under its budget


@pytest.mark.parametrize("family", ["next", "onevision"])
@pytest.mark.parametrize("size, keep", CASES)
def test_a_pruning_vision_stage_reaches_the_llm_as_counted(models, family, size, keep):
    model = models[family]
    inputs, packed, token = _inputs(family, model, size)
    report, counted, kept = _run(model, inputs, packed, token, "random", dict(keep=keep, site="vision", layer=0))
    empty_rows = len(_newlines(family, model, inputs) - kept)
    assert report.layer_visual_tokens[0] == len(kept) + empty_rows  # exact when no row is left empty
    if empty_rows == 0:
        assert report.prefill == counted  # FLOP for FLOP
    else:
        assert report.prefill > counted
    assert any("upper bound" in note for note in report.notes)


@pytest.mark.parametrize("family", ["next", "onevision"])
@pytest.mark.parametrize("size", SIZES)
def test_a_merging_vision_stage_stays_under_the_count(models, family, size):
    """pool places each window's token at one of its patches, which unpadding may cut: the count bounds it."""
    model = models[family]
    inputs, packed, token = _inputs(family, model, size)
    report, counted, kept = _run(model, inputs, packed, token, "pool", dict(keep=0.25, site="vision", layer=0))
    assert len(kept) <= report.layer_visual_tokens[0] and counted <= report.prefill


@pytest.mark.parametrize("size", [(112, 112), (168, 56), (200, 200)])
@pytest.mark.parametrize("keep", [0.5, 0.2])
def test_a_resized_onevision_grid_stays_under_the_count(models, size, keep):
    """A grid larger than anyres_max crops' worth is shrunk bilinearly: a resized token survives when
    any of its sources does, so the kept patches reach at most fan-out x their count of it."""
    model = models["onevision"]
    inputs, packed, token = _inputs("onevision", model, size)
    report, counted, kept = _run(model, inputs, packed, token, "random", dict(keep=keep, site="vision", layer=0))
    assert len(kept) <= report.layer_visual_tokens[0] < packed
    assert counted <= report.prefill
    if keep == 0.5:  # half of every crop reaches nearly the whole resized grid: the bound is close
        assert report.layer_visual_tokens[0] - len(kept) <= 0.06 * packed


def test_several_onevision_images_keep_their_newline(models):
    """Several images in one sample: each is its base view plus one newline, which stays."""
    model = models["onevision"]
    torch.manual_seed(0)
    inputs, packed, _ = image_inputs(model, [(56, 56), (30, 56)], batch_num_images=[2])
    ids = torch.tensor([[1, 2, 3] + [IMAGE] * packed + [4, 5, 6, 7]])
    with vtoken.pruned(model, "random", keep=0.5, site="vision", layer=0):
        tally = Tally()
        tally("all", lambda: model(input_ids=ids, **inputs, logits_to_keep=1))
        report = flops(model, text_tokens=TEXT, images=2)
        kept = vtoken.selection(model)[0]["vision:0"]
    assert report.layer_visual_tokens[0] == len(kept) == 2 * (8 + 1)
    assert report.prefill == tally.parts["all"]
