"""The PyTorch reference kernels against plain loops and dense attention."""

import pytest
import torch

from vtoken.kernels import attention_rows, compact_index, gather_tokens, masked_topk


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
