"""Which LLaVA-NeXT newline tokens survive a vision stage (``pruner.separators_follow_their_runs``):
a newline closes a row of the crop grid and survives when any token of that row does (README,
Budgets: "the newline tokens closing each row stay"; a row left empty loses its newline), and a
newline that closes no token at all (an unpadded grid left with no column) always stays, as the model
packs it. Checked on a grid known by construction, against the rule written out one separator at a
time, and end to end on LLaVA-NeXT and LLaVA-OneVision images whose unpadded grid has no column."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig,
)

import vtoken
from vtoken.pruner import separators_follow_their_runs


def _one_separator_at_a_time(reached: torch.Tensor, has_origin: torch.Tensor) -> torch.Tensor:
    out, start = reached.clone(), 0
    for separator in torch.nonzero(~has_origin).squeeze(-1).tolist():
        out[separator] = bool(reached[start:separator].any()) or start == separator  # an empty run's stays
        start = separator + 1
    return out


def test_a_newline_survives_exactly_when_its_row_keeps_a_token():
    # A 3 x 3 grid, a newline after each row, then two base tokens without a separator after them.
    has_origin = torch.tensor([1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    reached = torch.tensor([0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    out = separators_follow_their_runs(reached, has_origin)
    assert out.tolist() == [False, True, False, True, False, False, False, False, False, False, True, True, True, False]
    assert reached[3].item() is False  # the input is left as it was


def test_the_separator_rule_matches_it_written_out():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 50, (1,), generator=generator))
        has_origin = torch.rand(n, generator=generator) > 0.3
        reached = torch.rand(n, generator=generator) > 0.7  # a separator's own entry must not count
        assert torch.equal(separators_follow_their_runs(reached, has_origin),
                           _one_separator_at_a_time(reached & has_origin, has_origin))


def test_no_separator_leaves_the_tokens_as_they_are():
    reached = torch.tensor([True, False, True])
    assert torch.equal(separators_follow_their_runs(reached, torch.ones(3, dtype=torch.bool)), reached)


def test_a_newline_that_closes_no_token_stays():
    # Two base tokens, then two rows of no token at all, each closed by a newline.
    has_origin = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    reached = torch.tensor([1, 0, 0, 0], dtype=torch.bool)
    assert separators_follow_their_runs(reached, has_origin).tolist() == [True, False, True, True]


# --- an unpadded grid with no column --------------------------------------------------------------
# A 38 x 11 image (3.5:1, tall) on the only pinpoint, a 1 x 2 row of 16 px crops of 2 x 2 patches:
# unpadding keeps no column of the crop grid, so the model feeds the LLM the base view's 4 tokens and
# one newline per grid row (6 visual tokens); the image has no patch grid beyond its base view.
SIZE, PINPOINTS = (38, 11), [[16, 32]]


def _degenerate_next():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4)
    text = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlavaNextForConditionalGeneration(LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=99, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS, image_seq_length=4)).eval()


def _degenerate_onevision():
    torch.manual_seed(0)
    vision = SiglipVisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4)
    text = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=99, video_token_id=98, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=PINPOINTS)).eval()


def _degenerate_inputs(model) -> dict:
    crops = 3  # the base view and the two crops of the 1 x 2 pinpoint
    pixels = torch.randn(1, crops, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.model.get_image_features(pixels, torch.tensor([SIZE]))
    tokens = (features.pooler_output if hasattr(features, "pooler_output") else features)[0].shape[0]
    assert tokens == 4 + 2  # the base view's 2 x 2 patches and the two rows' newlines
    ids = torch.tensor([[1, 5, *[99] * tokens, 6, 7]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
            "image_sizes": torch.tensor([SIZE])}


RUNS_HERE = [m["name"] for m in vtoken.methods()
             if not m["name"].startswith("_") and m["name"] not in ("oracle", "tokenpacker", "visionzip")]


@pytest.mark.parametrize("build", [_degenerate_next, _degenerate_onevision], ids=["next", "onevision"])
def test_an_image_whose_unpadded_grid_has_no_column(build):
    """Every method at keep=1.0 gives the plain model's logits (the newlines that close no token
    stay), and at keep=0.5 it runs and keeps the budget of the base view's grid; it used to stop with
    an IndexError (VFlowOpt's grid cells) or a reshape error (pool) on the empty grid, and a vision
    stage dropped the empty rows' newlines even at keep=1.0."""
    model = build()
    x = _degenerate_inputs(model)
    with torch.no_grad():
        plain = model(**x).logits
    for method in RUNS_HERE:
        options = {"layer": 1} if method == "fastv" else {}
        sites = [{}] + ([{"site": "vision", "layer": 0}] if method in ("random", "pool") else [])
        for site in sites:
            with vtoken.pruned(model, method, keep=1.0, **options, **site), torch.no_grad():
                out = model(**x).logits
            assert out.shape == plain.shape, (method, site)
            torch.testing.assert_close(out, plain, rtol=0, atol=1e-5, msg=lambda m: f"{method} {site}: {m}")
            with vtoken.pruned(model, method, keep=0.5, **options, **site), torch.no_grad():
                out = model(**x).logits
            assert out.shape[1] < plain.shape[1] or method == "aif", (method, site)  # AIF hides, never drops
