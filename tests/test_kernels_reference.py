"""The PyTorch reference kernels against plain loops, dense attention and the strategies' own formulas."""

import pytest
import torch

from vtoken.kernels import (
    attention_rows, compact_index, cu_seqlens, gather_tokens, masked_topk, received_attention, token_shift, token_shifts,
)


def test_compact_index_left_pads_each_row():
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    index = compact_index(keep)
    assert index.tolist() == [[-1, -1, 0, 2, 3], [-1, -1, -1, -1, 2], [0, 1, 2, 3, 4]]


def test_gather_tokens_fills_padding():
    x = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    index = torch.tensor([[-1, 1, 3], [0, 2, -1]])
    out = gather_tokens(x, index, fill=-5.0)
    assert torch.equal(out[0, 0], torch.full((3,), -5.0))
    assert torch.equal(out[0, 1:], x[0, [1, 3]])
    assert torch.equal(out[1, :2], x[1, [0, 2]])


@pytest.mark.parametrize("batch", [1, 3])
def test_gather_tokens_is_the_loop_for_every_layout(batch):
    """Row by row, ``out[b, j] = x[b, index[b, j]]`` (``fill`` at -1), for one sample and several:
    positions ``[B, L]``, hidden states ``[B, L, d]``, KV rows ``[B, L, h, d]``, inputs whose token
    axis is not contiguous or whose batch axis is broadcast, integer and boolean values, no index."""
    g = torch.Generator().manual_seed(7)
    length = 11
    tensors = [
        torch.randint(0, 100, (batch, length), generator=g),
        torch.randn(batch, length, 6, generator=g),
        torch.randn(batch, length, 2, 4, generator=g).to(torch.bfloat16),
        torch.randn(batch, 5, length, generator=g).transpose(1, 2),  # token axis strided
        torch.randn(1, length, 6, generator=g).expand(batch, -1, -1),  # one row for every sample
        torch.randn(batch, length, generator=g) > 0,
    ]
    for width in (0, 1, 7, 15):
        index = torch.randint(-1, length, (batch, width), generator=g)
        for x in tensors:
            fill = False if x.dtype == torch.bool else 3
            want = torch.stack([
                torch.stack([x[b, i] if i >= 0 else torch.full_like(x[b, 0], fill) for i in index[b].tolist()])
                if width else x[b, :0] for b in range(batch)])
            got = gather_tokens(x, index, fill=fill)
            assert got.dtype == x.dtype and torch.equal(got, want), (tuple(x.shape), x.dtype, width)


def test_masked_topk_matches_loop():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 9, generator=g)
    valid = torch.rand(5, 9, generator=g) > 0.2
    budget = torch.tensor([1, 3, 4, 2, 5])
    budget = torch.minimum(budget, valid.sum(-1))
    out = masked_topk(scores, valid, budget)
    for r in range(5):
        order = sorted(range(9), key=lambda i: (-(scores[r, i].item() if valid[r, i] else float("-inf")), i))
        expected = sorted(order[: int(budget[r])])
        got = [i for i in out[r].tolist() if i >= 0]
        assert got == expected


@pytest.mark.parametrize("layout", ["all valid, one budget", "a pad", "budgets differ"])
def test_masked_topk_matches_loop_on_each_path(layout):
    # All valid with one budget takes the unmasked path; a pad or a smaller budget the masked one.
    # Ties (scores rounded to a few values) must still go to the lower index on both.
    g = torch.Generator().manual_seed(3)
    rows, width = 4, 40
    scores = (torch.randn(rows, width, generator=g) * 2).round()
    valid = torch.ones(rows, width, dtype=torch.bool)
    budget = torch.full((rows,), 13)
    if layout == "a pad":
        valid[1, 5] = False
    elif layout == "budgets differ":
        budget[2] = 7
    out = masked_topk(scores, valid, budget)
    assert out.shape == (rows, 13)
    for r in range(rows):
        order = sorted(range(width), key=lambda i: (-(scores[r, i].item() if valid[r, i] else float("-inf")), i))
        expected = sorted(order[: int(budget[r])])
        assert [i for i in out[r].tolist() if i >= 0] == expected
        assert out[r].tolist()[len(expected):] == [-1] * (13 - len(expected))


def test_masked_topk_breaks_ties_toward_lower_index():
    scores = torch.zeros(1, 6)
    out = masked_topk(scores, torch.ones(1, 6, dtype=torch.bool), torch.tensor([3]))
    assert out.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_rows_equal_dense_softmax(kv_heads):
    g = torch.Generator().manual_seed(1)
    b, h, n, d = 2, 4, 7, 8
    q_all = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, kv_heads, n, d, generator=g)
    k_rep = k.repeat_interleave(h // kv_heads, dim=1)
    mask = torch.ones(b, n, n, dtype=torch.bool).tril()
    mask[1, :, :2] = False  # sample 1 left-padded by two
    mask[1, :2, :2] = torch.eye(2, dtype=torch.bool)
    dense = torch.softmax((q_all @ k_rep.transpose(-1, -2) * 0.3).masked_fill(~mask[:, None], float("-inf")), -1)
    rows = [n - 1, 3]
    out = attention_rows(q_all[:, :, rows], k, 0.3, mask[:, rows])
    assert torch.allclose(out, dense[:, :, rows], atol=1e-6)


def test_received_attention_equals_dense_column_mass():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 11, 8, generator=g)
    k = torch.randn(2, 2, 11, 8, generator=g)
    dense = torch.softmax(q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.4, -1)
    expected = dense.sum(dim=2).mean(dim=1)
    assert torch.allclose(received_attention(q, k, 0.4, chunk=3), expected, atol=1e-6)


def test_cu_seqlens_counts_kept_tokens():
    keep = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = cu_seqlens(keep)
    assert out.dtype == torch.int32 and out.tolist() == [0, 3, 3, 7]
    assert cu_seqlens(torch.zeros(0, 5, dtype=torch.bool)).tolist() == [0]


def test_token_shift_is_the_strategies_formulas_bit_for_bit():
    """Representation Shift's token_distance and TransPrune's direction and magnitude terms."""
    from vtoken.strategies.repshift import token_distance
    from vtoken.strategies.transprune import direction_change, magnitude_change

    g = torch.Generator().manual_seed(3)
    x_in = torch.randn(2, 9, 32, generator=g).to(torch.bfloat16)
    x_out = torch.randn(2, 9, 32, generator=g).to(torch.bfloat16)
    x_in[0, 0] = 0
    x_out[1, 1] = -x_in[1, 1]
    for metric in ("l2", "l1", "cos"):
        assert torch.equal(token_shift(x_out, x_in, metric), token_distance(x_out, x_in, metric))
    assert torch.equal(token_shift(x_out, x_in, "cos"), direction_change(x_in, x_out, "signed"))
    assert torch.equal(token_shift(x_out, x_in, "abs_cos"), direction_change(x_in, x_out, "abs"))
    assert torch.equal(token_shift(x_out, x_in, "norm_ratio"), magnitude_change(x_in, x_out))
    with pytest.raises(ValueError, match="metric"):
        token_shift(x_out, x_in, "l3")


def test_token_shifts_shares_its_sums_and_gives_each_metric_bit_for_bit():
    """Several metrics in one call are each the single-metric result; TransPrune's TTV (which asks for
    the norm ratio and the cosine together) is softmax(direction) * magnitude of the separate terms."""
    from vtoken.strategies.transprune import direction_change, magnitude_change, transition_variation

    g = torch.Generator().manual_seed(4)
    x_in = torch.randn(2, 11, 48, generator=g)
    x_out = torch.randn(2, 11, 48, generator=g)
    x_in[0, 3] = 0
    x_out[1, 2] = -2 * x_in[1, 2]
    metrics = ("norm_ratio", "cos", "abs_cos", "l2", "l1", "cos")
    for metric, got in zip(metrics, token_shifts(x_out, x_in, metrics), strict=True):
        assert torch.equal(got, token_shift(x_out, x_in, metric)), metric
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :3] = False
    for direction in ("signed", "abs"):
        want = torch.softmax(direction_change(x_in, x_out, direction).masked_fill(~valid, float("-inf")), -1)
        want = torch.where(valid, want * magnitude_change(x_in, x_out), 0.0)
        assert torch.equal(transition_variation(x_in, x_out, valid, direction), want)
    # Known values: a reversed token has 1 - cos = 2 and norm ratio 2; a zero input has cosine 0.
    ratio, turn = token_shifts(x_out, x_in, ("norm_ratio", "cos"))
    assert turn[1, 2].item() == pytest.approx(2.0) and ratio[1, 2].item() == pytest.approx(2.0)
    assert turn[0, 3].item() == 1.0
    with pytest.raises(ValueError, match="metric"):
        token_shifts(x_out, x_in, ("cos", "l3"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_shifts_over_many_tokens_are_the_whole_tensor_sums_bit_for_bit(dtype):
    """Hidden states of more tokens than one chunk of the sums (795 x 768, as a LLaVA-OneVision
    prompt; rows of a wider tensor; a batch axis that is not outermost in memory; a feature axis that
    is not contiguous, which a chunk would sum in another order): every metric is its
    formula written out on the whole tensors, bit for bit, and the gradient flows."""
    g = torch.Generator().manual_seed(6)

    def written_out(a, b, metric):
        a, b = a.float(), b.float()
        norms = torch.linalg.vector_norm(a, dim=-1), torch.linalg.vector_norm(b, dim=-1)
        cos = (a * b).sum(dim=-1) / (norms[0].clamp_min(1e-8) * norms[1].clamp_min(1e-8))
        return {"l2": lambda: torch.linalg.vector_norm(a - b, dim=-1), "l1": lambda: (a - b).abs().sum(dim=-1),
                "cos": lambda: 1.0 - cos, "abs_cos": lambda: 1.0 - cos.abs(),
                "norm_ratio": lambda: norms[0] / norms[1].clamp_min(1e-12)}[metric]()

    wide = torch.randn(2, 301, 1600, generator=g).to(dtype)
    pairs = [
        (torch.randn(1, 795, 768, generator=g).to(dtype), torch.randn(1, 795, 768, generator=g).to(dtype)),
        (wide[..., :768], wide[..., 800:1568]),
        (torch.randn(301, 2, 768, generator=g).to(dtype).transpose(0, 1), torch.randn(2, 301, 768, generator=g).to(dtype)),
        (torch.randn(1, 768, 795, generator=g).to(dtype).transpose(1, 2), torch.randn(1, 795, 768, generator=g).to(dtype)),
    ]
    metrics = ("norm_ratio", "cos", "abs_cos", "l2", "l1")
    for after, before in pairs:
        after[..., -1, :] = 0  # the last chunk's last token: a zero vector
        for metric, got in zip(metrics, token_shifts(after, before, metrics), strict=True):
            assert torch.equal(got, written_out(after, before, metric)), (metric, tuple(after.shape))
    after = torch.randn(1, 300, 768, generator=g, requires_grad=True)
    token_shift(after, torch.randn(1, 300, 768, generator=g), "cos").sum().backward()
    assert after.grad is not None and bool(after.grad.abs().sum() > 0)


def test_token_shifts_broadcast_like_the_formulas_written_out():
    """One vector against every token, and two batches broadcast against each other: each metric is
    its formula written out on the broadcast tensors (``F.cosine_similarity`` for the cosine)."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(3, 7, 40, generator=g)
    for after, before in ((tokens, tokens.mean(dim=1, keepdim=True)),
                          (torch.randn(3, 1, 5, 40, generator=g), torch.randn(1, 4, 5, 40, generator=g))):
        a, b = torch.broadcast_tensors(after, before)
        want = {
            "l2": (a - b).norm(dim=-1), "l1": (a - b).abs().sum(dim=-1),
            "cos": 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8),
            "abs_cos": 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8).abs(),
            "norm_ratio": a.norm(dim=-1) / b.norm(dim=-1),
        }
        got = token_shifts(after, before, tuple(want))
        for (metric, expected), value in zip(want.items(), got, strict=True):
            assert value.shape == a.shape[:-1], metric
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{metric}: {m}")
