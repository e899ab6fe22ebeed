"""``vtoken.projector_parts.row_standardisation``: a projector's row norm read as ``γ ⊙ (y - c·mean(y)) /
sqrt(mean((y - c·mean(y))²) + ε) + β`` from probes only, the values known by construction (the
module's own weight, bias and eps), and norms of any other form refused (ZOO-Prune then runs the
merger's first layer on every perturbed copy instead of moving it outside the norm)."""

from __future__ import annotations

import pytest
import torch

from vtoken.projector_parts import projector_in, row_standardisation


def _randomised(norm: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return norm


@pytest.mark.parametrize("width", [1280, 17, 2])
@pytest.mark.parametrize("eps", [1e-6, 1e-5, 1e-12])
def test_a_layer_norm_is_read_with_its_weight_bias_and_eps(width, eps):
    norm = _randomised(torch.nn.LayerNorm(width, eps=eps))
    form = row_standardisation(projector_in(norm), width)
    assert form is not None and form.centred
    torch.testing.assert_close(form.weight, norm.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(form.bias, norm.bias.detach(), rtol=0, atol=1e-6)
    assert form.eps == pytest.approx(eps, rel=1e-2, abs=1e-9)


@pytest.mark.parametrize("width", [1280, 17])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_an_rms_norm_is_read_uncentred_without_bias(width, eps):
    norm = _randomised(torch.nn.RMSNorm(width, eps=eps))
    form = row_standardisation(projector_in(norm), width)
    assert form is not None and not form.centred
    torch.testing.assert_close(form.weight, norm.weight.detach(), rtol=1e-5, atol=1e-6)
    assert float(form.bias.abs().max()) == 0.0
    assert form.eps == pytest.approx(eps, rel=1e-2)
    rows = torch.randn(5, width) * 4 + 1
    torch.testing.assert_close(form(rows), norm(rows).detach(), rtol=1e-5, atol=1e-5)


def test_l2_normalisation_is_an_rms_norm_of_weight_one_over_root_width():
    """y / |y| = y / (sqrt(D) · rms(y)): the form holds, with γ = 1/sqrt(D) and ε = 0."""
    form = row_standardisation(lambda y: torch.nn.functional.normalize(y, dim=-1), 16)
    assert form is not None and not form.centred and form.eps < 1e-9
    torch.testing.assert_close(form.weight, torch.full((16,), 0.25))


@pytest.mark.parametrize("other", [
    lambda y: y / y.abs().amax(-1, keepdim=True),  # scaled by the largest entry, not the root mean square
    lambda y: (y - y.mean(-1, keepdim=True)) / (y.std(-1, keepdim=True) + 0.1),  # eps outside the root
    lambda y: torch.tanh(y),
    lambda y: y * 2 + 1,
])
def test_a_norm_of_another_form_is_refused(other):
    assert row_standardisation(other, 16) is None
