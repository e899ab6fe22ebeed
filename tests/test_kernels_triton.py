"""Every Triton kernel of ``vtoken.kernels`` against its PyTorch reference, in Triton's CPU interpreter,
and the per-call dispatch between them.

Triton decides when it is imported whether ``@triton.jit`` functions (its own ``tl.zeros``,
``tl.sum``... included) are compiled or interpreted, and another test file may import it first (through
``torch.compile``, or during collection), so setting ``TRITON_INTERPRET=1`` inside this process would
depend on the order pytest runs files in. The kernel checks therefore run in one worker process
(``interpreter`` fixture, spawned once per module with ``TRITON_INTERPRET=1`` and
``VTOKEN_KERNELS=triton`` in its environment from the start); each test sends it one case and gets the
assertion back. The environment of the pytest process itself is left as it was.

Tolerances: the kernels read fp16 / bf16 inputs in their own type and compute in float32 (exact
products, float32 sums), as the references do after ``.float()``, so every dtype is compared with
the float32 tolerances below (summation order is the only difference); rows with no attended key are
NaN in both, as ``torch.softmax`` of a row of -inf.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import types
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

import vtoken.kernels as kernels
from vtoken.kernels import reference

ATOL, RTOL = 2e-6, 1e-5  # attention probabilities (values in [0, 1])
SHIFT_RTOL = 1e-5  # shift scores (sums over D in another order)
WORKER_ENV = {"TRITON_INTERPRET": "1", "VTOKEN_KERNELS": "triton"}


def _worker_ready() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret) and os.environ.get("VTOKEN_KERNELS") == "triton"


@pytest.fixture(scope="module")
def interpreter():
    """``run(check, *args)``: ``check(*args)`` in a process that imported Triton with its interpreter on."""
    pytest.importorskip("triton")
    saved = {key: os.environ.get(key) for key in WORKER_ENV}
    os.environ.update(WORKER_ENV)  # inherited by the worker, which is started by the first submit
    try:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        assert pool.submit(_worker_ready).result(timeout=300)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield lambda check, *args: pool.submit(check, *args).result(timeout=600)
    pool.shutdown()


def _masks(kind: str, batch: int, rows: int, keys: int, g: torch.Generator) -> torch.Tensor | None:
    """``None``; ``"padding"``: ``[B, 1, N]`` left padding; ``"causal"``: ``[B, Q, N]`` each row's
    slot (random, the last one the last key) and everything before it, minus the left padding."""
    if kind == "none":
        return None
    pad = torch.randint(0, max(1, keys // 3), (batch,), generator=g)
    pad[0] = 0
    slots = torch.arange(keys)[None, :]
    valid = slots >= pad[:, None]
    if kind == "padding":
        return valid[:, None, :]
    query_slot = torch.randint(0, keys, (batch, rows), generator=g)
    query_slot[:, -1] = keys - 1
    query_slot = torch.maximum(query_slot, pad[:, None])  # a query row is itself a valid token
    return (slots[:, None, :] <= query_slot[:, :, None]) & valid[:, None, :]


# --- 1. attention rows ---------------------------------------------------------------------------

ROW_CASES = [
    # batch, heads, kv_heads, rows, keys, head_dim, mask, dtype
    (1, 4, 4, 1, 1, 16, "none", torch.float32),
    (2, 4, 4, 1, 7, 16, "padding", torch.float32),
    (2, 8, 2, 3, 129, 64, "causal", torch.float32),
    (1, 6, 3, 5, 333, 40, "padding", torch.float32),
    (2, 4, 1, 2, 600, 32, "causal", torch.float32),
    (1, 8, 8, 1, 577, 64, "none", torch.float32),
    (2, 8, 2, 4, 257, 64, "causal", torch.bfloat16),
    (1, 4, 2, 3, 65, 16, "causal", torch.float16),
    (1, 2, 1, 1, 2001, 128, "padding", torch.float32),
]


def _sweep_case(seed: int, max_keys: int) -> tuple:
    """A seeded random shape: batch 1-3, GQA group 1-4, 1-6 rows, 1..max_keys keys, head dims that
    are and are not powers of two, any mask kind and dtype."""
    g = torch.Generator().manual_seed(1000 + seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    kv_heads, group = pick([1, 2, 4]), pick([1, 2, 3, 4])
    return (
        pick([1, 2, 3]), kv_heads * group, kv_heads, pick([1, 2, 5, 6]),
        int(torch.randint(1, max_keys + 1, (1,), generator=g)), pick([16, 24, 64, 80, 128]),
        pick(["none", "padding", "causal"]), pick([torch.float32, torch.float32, torch.float16, torch.bfloat16]),
    )


ROW_CASES += [_sweep_case(seed, 600) for seed in range(8)]


def _check_attention_rows(case):
    batch, heads, kv_heads, rows, keys, head_dim, kind, dtype = case
    g = torch.Generator().manual_seed(keys * 31 + rows)
    q = (torch.randn(batch, heads, rows, head_dim, generator=g) * 2).to(dtype)
    k = (torch.randn(batch, kv_heads, keys, head_dim, generator=g) * 2).to(dtype)
    mask = _masks(kind, batch, rows, keys, g)
    assert kernels.backend(q, k) == "triton"
    got = kernels.attention_rows(q, k, head_dim**-0.5, mask)
    want = reference.attention_rows(q, k, head_dim**-0.5, mask)
    assert got.dtype == torch.float32 and got.shape == (batch, heads, rows, keys)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: "b{}h{}kv{}q{}n{}d{}-{}-{}".format(*c[:7], str(c[7])[6:]))
def test_attention_rows_match_reference(interpreter, case):
    interpreter(_check_attention_rows, case)


def _check_attention_rows_strided_and_empty():
    g = torch.Generator().manual_seed(5)
    batch, heads, kv_heads, rows, keys, head_dim = 2, 6, 2, 4, 50, 24
    q = torch.randn(batch, rows, heads, head_dim, generator=g).transpose(1, 2)
    k = torch.randn(batch, keys, kv_heads, head_dim, generator=g).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    mask = torch.rand(batch, rows, keys, generator=g) > 0.5
    mask[1, 2] = False  # an empty row
    mask[0, :, :3] = False
    got = kernels.attention_rows(q, k, 0.2, mask)
    want = reference.attention_rows(q, k, 0.2, mask)
    assert got[1, :, 2].isnan().all() and want[1, :, 2].isnan().all()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, equal_nan=True)
    shared = mask[:, :1]  # [B, 1, N], broadcast over the rows
    torch.testing.assert_close(
        kernels.attention_rows(q, k, 0.2, shared), reference.attention_rows(q, k, 0.2, shared), atol=ATOL, rtol=RTOL
    )
    # Logits up to ~110, past float32's exp range (88): only the max subtraction keeps them finite.
    big = q * 40
    torch.testing.assert_close(
        kernels.attention_rows(big, k, 0.2, mask), reference.attention_rows(big, k, 0.2, mask),
        atol=ATOL, rtol=RTOL, equal_nan=True,
    )
    assert kernels.attention_rows(q[:, :, :0], k, 0.2).shape == (batch, heads, 0, keys)
    assert kernels.attention_rows(q, k[:, :, :0], 0.2).shape == (batch, heads, rows, 0)
    # fp64 inputs: computed in float32, as the reference does.
    torch.testing.assert_close(
        kernels.attention_rows(q.double(), k.double(), 0.2), reference.attention_rows(q.double(), k.double(), 0.2),
        atol=ATOL, rtol=RTOL,
    )


def test_attention_rows_strided_inputs_and_empty_rows(interpreter):
    """Transposed views (as the adapters pass them), a row with no attended key (NaN, as the
    reference), a [B, Q, N] mask and a [B, 1, N] one, logits beyond exp's range, zero query rows,
    zero keys, fp64 inputs."""
    interpreter(_check_attention_rows_strided_and_empty)


def _check_attention_rows_soft_capped():
    g = torch.Generator().manual_seed(9)
    batch, heads, kv_heads, rows, keys, head_dim = 2, 4, 2, 5, 70, 32
    q = torch.randn(batch, heads, rows, head_dim, generator=g) * 3
    k = torch.randn(batch, kv_heads, keys, head_dim, generator=g) * 3
    mask = torch.rand(batch, rows, keys, generator=g) > 0.3
    assert kernels.backend(q, k) == "triton"
    # A cap the logits pass (tanh bends them), one they stay far below (the series near 0), one between.
    for cap in (2.0, 500.0, 20.0):
        got = kernels.attention_rows(q, k, head_dim**-0.5, mask, softcap=cap)
        want = reference.attention_rows(q, k, head_dim**-0.5, mask, softcap=cap)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    uncapped = reference.attention_rows(q, k, head_dim**-0.5, mask)
    assert (got - uncapped).abs().max() > 1e-3  # the cap is applied, not ignored
    # Logits far below the cap, where tanh from exponentials alone cancels (its error, times the cap,
    # reaches 1e-5 of a logit, 6e-5 of a probability here): the series keeps each within 1e-6.
    got = kernels.attention_rows(q, k, head_dim**-0.5, mask, softcap=5000.0)
    want = reference.attention_rows(q, k, head_dim**-0.5, mask, softcap=5000.0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_attention_rows_soft_capped(interpreter):
    """Gemma2's logit soft-cap ``c * tanh(s / c)`` in the kernel equals the reference's ``torch.tanh``."""
    interpreter(_check_attention_rows_soft_capped)


# --- 2. received attention -----------------------------------------------------------------------

RECEIVED_CASES = [
    # batch, heads, kv_heads, rows, keys, head_dim, dtype
    (1, 2, 2, 1, 1, 16, torch.float32),
    (2, 4, 2, 17, 17, 32, torch.float32),
    (1, 4, 1, 40, 600, 64, torch.float32),
    (2, 2, 2, 145, 145, 40, torch.float32),
    (1, 4, 2, 33, 97, 64, torch.bfloat16),
]
RECEIVED_CASES += [(*case[:3], min(case[3] * 7, case[4]), case[4], case[5], case[7]) for case in map(lambda s: _sweep_case(s, 300), range(4))]


def _check_received_attention(case):
    batch, heads, kv_heads, rows, keys, head_dim, dtype = case
    g = torch.Generator().manual_seed(keys + rows)
    q = (torch.randn(batch, heads, rows, head_dim, generator=g) * 2).to(dtype)
    k = (torch.randn(batch, kv_heads, keys, head_dim, generator=g) * 2).to(dtype)
    got = kernels.received_attention(q, k, head_dim**-0.5)
    want = reference.received_attention(q, k, head_dim**-0.5)
    assert got.shape == (batch, keys) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Each query row hands out a total mass of 1 (averaged over heads).
    torch.testing.assert_close(got.sum(-1), torch.full((batch,), float(rows)), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", RECEIVED_CASES, ids=lambda c: "b{}h{}kv{}q{}n{}d{}-{}".format(*c[:6], str(c[6])[6:]))
def test_received_attention_matches_reference(interpreter, case):
    interpreter(_check_received_attention, case)


def _check_row_logsumexp_and_empty():
    from vtoken.kernels.triton_attention import row_logsumexp

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 9, 16, generator=g)
    k = torch.randn(2, 2, 70, 16, generator=g)
    dense = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.25
    torch.testing.assert_close(row_logsumexp(q, k, 0.25), torch.logsumexp(dense, -1), atol=1e-5, rtol=1e-6)
    big = q * 60  # logits far past float32's exp range
    torch.testing.assert_close(kernels.received_attention(big, k, 0.25), reference.received_attention(big, k, 0.25), atol=1e-5, rtol=1e-5)
    assert torch.equal(kernels.received_attention(q[:, :, :0], k, 0.25), torch.zeros(2, 70))
    assert kernels.received_attention(q, k[:, :, :0], 0.25).shape == (2, 0)


def test_received_attention_row_logsumexp_and_empty_inputs(interpreter):
    interpreter(_check_row_logsumexp_and_empty)


# --- 3. token shift ------------------------------------------------------------------------------

SHIFT_CASES = [
    ((2, 77, 300), torch.float32),
    ((1, 1, 1), torch.float32),
    ((3, 13, 1030), torch.float32),
    ((2, 33, 64), torch.bfloat16),
    ((2, 9, 48), torch.float16),
]


def _check_token_shift(case):
    shape, dtype = case
    g = torch.Generator().manual_seed(sum(shape))
    before = torch.randn(*shape, generator=g).to(dtype)
    after = (before.float() + 0.3 * torch.randn(*shape, generator=g)).to(dtype)
    if shape[1] > 2:
        before[0, 0] = 0  # a zero token: the cosine's and the ratio's clamps
        after[0, 1] = 0
        after[0, 2] = -before[0, 2]  # reversed: cos = -1
    for metric in reference.SHIFT_METRICS:
        got = kernels.token_shift(after, before, metric)
        want = reference.token_shift(after, before, metric)
        assert got.dtype == torch.float32 and got.shape == shape[:-1], metric
        torch.testing.assert_close(got, want, rtol=SHIFT_RTOL, atol=1e-5, msg=lambda m: f"{metric}: {m}")
    # Several metrics at once (the cosine and ratio from one shared pass, the others on their own).
    metrics = ("norm_ratio", "cos", "abs_cos", "l2")
    for metric, got in zip(metrics, kernels.token_shifts(after, before, metrics), strict=True):
        want = reference.token_shift(after, before, metric)
        assert got.dtype == torch.float32 and got.shape == shape[:-1], metric
        torch.testing.assert_close(got, want, rtol=SHIFT_RTOL, atol=1e-5, msg=lambda m: f"token_shifts {metric}: {m}")


@pytest.mark.parametrize("case", SHIFT_CASES, ids=lambda c: "x".join(map(str, c[0])) + "-" + str(c[1])[6:])
def test_token_shift_matches_reference(interpreter, case):
    interpreter(_check_token_shift, case)


def _check_token_shift_strided_and_broadcast():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 2, 96, generator=g).transpose(0, 1)
    b = torch.randn(2, 40, 96, generator=g)
    for metric in reference.SHIFT_METRICS:
        torch.testing.assert_close(kernels.token_shift(a, b, metric), reference.token_shift(a, b, metric), rtol=SHIFT_RTOL, atol=1e-5)
    mean = b.mean(dim=1, keepdim=True)  # one vector against every token
    torch.testing.assert_close(kernels.token_shift(b, mean, "cos"), reference.token_shift(b, mean, "cos"), rtol=SHIFT_RTOL, atol=1e-6)
    try:
        kernels.token_shift(a, b, "l3")
    except ValueError as error:
        assert "metric" in str(error)
    else:
        raise AssertionError("an unknown metric was accepted")


def test_token_shift_strided_and_broadcast_inputs(interpreter):
    interpreter(_check_token_shift_strided_and_broadcast)


# --- 4. compaction -------------------------------------------------------------------------------


def _index(batch: int, length: int, width: int, g: torch.Generator) -> torch.Tensor:
    """compact_index of a random keep mask, cut or left-padded to ``width``: ragged rows, -1 first."""
    keep = torch.rand(batch, length, generator=g) > 0.4
    keep[:, -1] = True
    index = reference.compact_index(keep)
    if index.shape[1] < width:
        index = torch.cat([torch.full((batch, width - index.shape[1]), -1), index], dim=1)
    return index[:, -width:]


GATHER_CASES = {
    # name: (x, fill)
    "hidden-f32": (lambda g: torch.randn(3, 257, 70, generator=g), -2.5),
    "hidden-bf16": (lambda g: torch.randn(2, 33, 40, generator=g).bfloat16(), 0.0),
    "hidden-f16": (lambda g: torch.randn(2, 9, 300, generator=g).half(), 1.0),
    "valid-bool": (lambda g: torch.rand(3, 41, generator=g) > 0.5, False),
    "orig-index-long": (lambda g: torch.randint(0, 1000, (3, 41), generator=g), -1),
    "kv-cache-view": (lambda g: torch.randn(2, 4, 37, 16, generator=g).transpose(1, 2), 0.0),
    "mrope-positions": (lambda g: torch.randint(0, 50, (3, 2, 29), generator=g).permute(1, 2, 0), 0),
    "five-dims": (lambda g: torch.randn(2, 11, 3, 4, 5, generator=g), 7.0),
    "cos-table": (lambda g: torch.randn(1, 600, 8, generator=g).expand(2, -1, -1), 0.0),
}


def _check_gather(name):
    make, fill = GATHER_CASES[name]
    g = torch.Generator().manual_seed(len(name))
    x = make(g)
    for width in (1, x.shape[1] // 2 + 1, x.shape[1]):
        index = _index(x.shape[0], x.shape[1], width, g)
        got = kernels.gather_tokens(x, index, fill)
        want = reference.gather_tokens(x, index, fill)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), name


@pytest.mark.parametrize("name", list(GATHER_CASES))
def test_gather_tokens_matches_reference(interpreter, name):
    interpreter(_check_gather, name)


def _check_gather_edges_and_gradient():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 3, generator=g)
    assert kernels.gather_tokens(x, torch.empty(2, 0, dtype=torch.long)).shape == (2, 0, 3)
    all_pad = torch.full((2, 4), -1)
    assert torch.equal(kernels.gather_tokens(x, all_pad, 9.0), reference.gather_tokens(x, all_pad, 9.0))
    try:
        kernels.gather_tokens(x, torch.tensor([[0, 5], [1, 2]]))  # the reference refuses it too
    except IndexError:
        pass
    else:
        raise AssertionError("an index past the end was accepted")
    # The kernel has a backward: gradients equal the reference's (a repeated index accumulates).
    index = torch.tensor([[-1, 1, 1, 4], [0, 2, 3, -1]])
    weights = torch.randn(2, 4, 3, generator=g)
    leaf = x.clone().requires_grad_(True)
    (kernels.gather_tokens(leaf, index) * weights).sum().backward()
    expected = x.clone().requires_grad_(True)
    (reference.gather_tokens(expected, index) * weights).sum().backward()
    assert torch.equal(leaf.grad, expected.grad)


def test_gather_tokens_edges_and_gradient(interpreter):
    interpreter(_check_gather_edges_and_gradient)


def _check_cu_seqlens(batch, length):
    g = torch.Generator().manual_seed(batch * 1000 + length)
    keep = torch.rand(batch, length, generator=g) > 0.5
    if batch > 1:
        keep[1] = False  # an empty row
    got = kernels.cu_seqlens(keep)
    want = reference.cu_seqlens(keep)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    assert torch.equal(kernels.cu_seqlens(keep.long()), want)  # any dtype: nonzero is kept


@pytest.mark.parametrize("batch,length", [(1, 1), (3, 5), (4, 600), (2, 1500), (3, 0)])
def test_cu_seqlens_match_reference(interpreter, batch, length):
    interpreter(_check_cu_seqlens, batch, length)


# --- dispatch (in this process; the Triton entry points are replaced by recorders) ----------------

ALL = ["attention_rows", "received_attention", "token_shift", "gather_tokens", "cu_seqlens"]


@pytest.fixture
def spies(monkeypatch):
    """Records the calls that reach each Triton entry point (which then return the reference's result)."""
    pytest.importorskip("triton")
    from vtoken.kernels import triton_attention, triton_gather, triton_shift

    calls = []
    for module in (triton_attention, triton_shift, triton_gather):
        for name in ALL:
            if hasattr(module, name):
                fallback = getattr(reference, name)
                monkeypatch.setattr(module, name, lambda *a, _f=fallback, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    return calls


def _call_all():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 2, 16, generator=g), torch.randn(1, 1, 5, 16, generator=g)
    kernels.attention_rows(q, k, 0.25)
    kernels.received_attention(q, k, 0.25)
    kernels.token_shift(k, k, "l2")
    kernels.gather_tokens(k[0], torch.tensor([[0, -1]]))
    kernels.cu_seqlens(torch.ones(2, 3, dtype=torch.bool))


def test_cpu_tensors_use_the_reference_by_default(monkeypatch, spies):
    monkeypatch.delenv("VTOKEN_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.backend(torch.zeros(2, 3)) == "reference"
    _call_all()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter alone does not choose Triton
    assert kernels.backend(torch.zeros(2, 3)) == "reference"
    _call_all()
    assert spies == []


def test_vtoken_kernels_is_read_at_every_call(monkeypatch, spies):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VTOKEN_KERNELS", "triton")
    _call_all()
    assert spies == ALL
    monkeypatch.setenv("VTOKEN_KERNELS", "reference")
    _call_all()
    assert spies == ALL
    monkeypatch.setenv("VTOKEN_KERNELS", "triton")
    _call_all()
    assert spies == ALL + ALL


def test_forcing_triton_on_cpu_without_the_interpreter_is_a_one_line_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("VTOKEN_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1") as error:
        kernels.attention_rows(torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 2, 16), 1.0)
    assert "\n" not in str(error.value)
    monkeypatch.setenv("VTOKEN_KERNELS", "cuda")
    with pytest.raises(ValueError, match="VTOKEN_KERNELS must be"):
        kernels.token_shift(torch.zeros(2, 3), torch.zeros(2, 3))


def test_interpreter_switched_on_after_triton_was_imported_is_named(monkeypatch):
    pytest.importorskip("triton")
    from vtoken.kernels import triton_shift

    if type(triton_shift._shift_sums_kernel).__name__ == "InterpretedFunction":
        pytest.skip("this process imported triton with TRITON_INTERPRET set")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="set it before the first import of triton"):
        triton_shift.token_shift(torch.zeros(2, 3), torch.zeros(2, 3))


def test_cuda_tensors_pick_triton_unless_forced_or_missing(monkeypatch):
    pytest.importorskip("triton")
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("VTOKEN_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.backend(fake_cuda) == "triton"
    assert kernels.backend(fake_cuda, torch.zeros(1)) == "reference"  # a CPU tensor in the call
    monkeypatch.setenv("VTOKEN_KERNELS", "reference")
    assert kernels.backend(fake_cuda) == "reference"
    monkeypatch.delenv("VTOKEN_KERNELS")
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    assert kernels.backend(fake_cuda) == "reference"
    monkeypatch.setenv("VTOKEN_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="triton does not import"):
        kernels.backend(fake_cuda)


def test_calls_that_need_a_graph_keep_the_reference(monkeypatch, spies):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VTOKEN_KERNELS", "triton")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 2, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 5, 16, generator=g)
    kernels.attention_rows(q, k, 0.25).sum().backward()
    kernels.token_shift(q, q.detach() + 1).sum().backward()
    assert spies == [] and q.grad is not None
    with torch.no_grad():
        kernels.attention_rows(q, k, 0.25)
    kernels.gather_tokens(q[0], torch.tensor([[0, -1]]))  # has a backward of its own
    assert spies == ["attention_rows", "gather_tokens"]


def test_importing_vtoken_needs_no_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, vtoken, vtoken.kernels as k\n"
        "assert not any(m.startswith('vtoken.kernels.triton') for m in sys.modules)\n"
        "q = torch.randn(1, 2, 1, 8); kk = torch.randn(1, 2, 4, 8)\n"
        "assert k.attention_rows(q, kk, 0.3).shape == (1, 2, 1, 4)\n"
        "print('ok')\n"
    )
    env = {key: value for key, value in os.environ.items() if key not in WORKER_ENV}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
