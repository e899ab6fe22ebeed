"""Which LLaVA-NeXT newline tokens survive a vision stage (``pruner.separators_follow_their_runs``):
a newline closes a row of the crop grid and survives when any token of that row does (README,
Budgets: "the newline tokens closing each row stay"; a row left empty loses its newline). Checked on
a grid known by construction and against the rule written out one separator at a time."""

from __future__ import annotations

import torch

from vtoken.pruner import separators_follow_their_runs


def _one_separator_at_a_time(reached: torch.Tensor, has_origin: torch.Tensor) -> torch.Tensor:
    out, start = reached.clone(), 0
    for separator in torch.nonzero(~has_origin).squeeze(-1).tolist():
        out[separator] = bool(reached[start:separator].any())
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
