"""What strategies can ask the context for: instruction-row attention, observed layer inputs and
outputs, and the projector with its inputs. Each is checked against the unwrapped model."""

import dataclasses

import pytest
import torch

import vtoken
from vtoken.signals import Needs, Signal
from vtoken.config import PruneConfig
from vtoken.registry import register
from vtoken.strategies.base import Strategy
from tiny import llava_inputs, llava_next_inputs, tiny_llava, tiny_llava_next


@dataclasses.dataclass
class _ProbeConfig(PruneConfig):
    method = "_test_probe"


@register
class _Probe(Strategy):
    """Test-only: records what its context offers, keeps a fixed prefix of each row."""

    name = "_test_probe"
    Config = _ProbeConfig
    seen: dict = {}
    layers = {"vision": [1], "llm": [1]}

    def needs(self):
        layered = [Signal(f"{site}_observed", layer) for site, layers in self.layers.items() for layer in layers]
        return Needs.of(Signal("projector_input"), *layered)

    def observe(self, site, layer, io, valid):
        # Per token: the block output itself, so the test can compare with hidden states.
        return io["block"][1]

    def score(self, ctx):
        record = {"rows": ctx.tokens}
        if ctx.stage.site == "llm":
            record["instruction"] = ctx.attention(query="instruction", layer="previous")
            record["observed"] = ctx.observed(1)
        if ctx.stage.site == "vision":
            record["observed"] = ctx.observed(1)
        if ctx.stage.site == "projector":
            record["projected"] = ctx.projector(ctx.projector_input)
        type(self).seen[ctx.stage.name] = record
        n = ctx.tokens.valid.shape[1]
        return -torch.arange(n, dtype=torch.float).expand_as(ctx.tokens.valid)


def test_instruction_attention_and_llm_observation_match_eager_model():
    model = tiny_llava("eager")
    x = llava_inputs(3)
    with torch.no_grad():
        out = model(**x, output_attentions=True, output_hidden_states=True)
    with vtoken.pruned(model, "_test_probe", site="llm", layer=2, keep=0.5):
        with torch.no_grad():
            model(**x)
    seen = _Probe.seen["llm:2"]
    image = model.config.image_token_id
    for b in range(3):
        ids = x["input_ids"][b]
        visual = torch.nonzero(ids == image).squeeze(-1)
        instruction = torch.arange(int(visual[-1]) + 1, ids.shape[0])
        expected = out.attentions[1][b][:, instruction][:, :, visual]  # layer K-1 = 1: [H, Q, N]
        got = seen["instruction"][b][:, : len(instruction)]
        assert torch.allclose(got, expected, atol=1e-6)
        assert torch.all(seen["instruction"][b][:, len(instruction):] == 0)
        # Observed block output of layer 1 == hidden state after layer 1 at the visual tokens.
        assert torch.allclose(seen["observed"][b], out.hidden_states[2][b, visual], atol=1e-6)


def test_vision_observation_matches_the_encoder_hidden_states():
    model = tiny_llava()
    x = llava_inputs(2)
    with torch.no_grad():
        hidden = model.model.vision_tower(x["pixel_values"], output_hidden_states=True).hidden_states
    with vtoken.pruned(model, "_test_probe", stages=[{"site": "vision", "layer": 1, "keep": 0.5}]):
        with torch.no_grad():
            model(**x)
    observed = _Probe.seen["vision:1"]["observed"]
    assert torch.allclose(observed, hidden[2][:, 1:], atol=1e-6)  # layer 1's output, CLS excluded


@pytest.mark.parametrize("make,inputs", [(tiny_llava, lambda m: llava_inputs(2)), (tiny_llava_next, llava_next_inputs)])
def test_projector_and_its_inputs_reproduce_the_projected_tokens(make, inputs):
    model = make()
    x = inputs(model)
    with vtoken.pruned(model, "_test_probe", keep=0.5):
        with torch.no_grad():
            model(**x)
    seen = _Probe.seen["projector"]
    rows = seen["rows"]
    is_patch = rows.valid & (seen["projected"].abs().sum(-1) > 0)
    assert is_patch.sum() > 0
    assert torch.allclose(seen["projected"][is_patch], rows.features[is_patch], atol=1e-5)
    # What is not a patch is a NeXT newline (no projector input): one per high-resolution grid row,
    # 4 + 8 + 8 rows for the three images of llava_next_inputs; LLaVA-1.5 has none.
    assert int((rows.valid & ~is_patch).sum()) == (0 if make is tiny_llava else 20)


def test_vision_pruned_then_projector_inputs_stay_aligned():
    model = tiny_llava()
    x = llava_inputs(2)
    stages = [{"site": "vision", "layer": 1, "keep": 0.75}, {"site": "projector", "keep": 0.5}]
    with vtoken.pruned(model, "_test_probe", stages=stages):
        with torch.no_grad():
            model(**x)
    seen = _Probe.seen["projector"]
    rows = seen["rows"]
    assert torch.allclose(seen["projected"][rows.valid], rows.features[rows.valid], atol=1e-5)
