"""Token-pruning kernels: plain PyTorch references (the CPU path and the test oracle), Triton kernels,
and the dispatch between them.

Every public function here takes tensors and returns tensors; which implementation runs is decided per
call, never at import time (importing this package imports neither Triton nor the kernel files):

- by default, the Triton kernel when the call's tensors are on CUDA and ``triton`` imports, else the
  PyTorch reference in ``reference.py``;
- ``VTOKEN_KERNELS=reference`` (read at every call) forces the reference; ``VTOKEN_KERNELS=triton``
  forces the kernels, on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` runs Triton's
  interpreter (how the tests run them); otherwise it is a one-line error.

The attention and shift kernels have no backward: a call that must build an autograd graph (grad mode
on and an input that requires grad) runs the reference whatever is chosen, so results and gradients
never change; scores are only ranked, so this happens in training-style forwards only.
``gather_tokens``' kernel has a backward (scatter-add) and always follows the choice. With the
default dispatch, ``attention_rows`` and ``received_attention`` keep the reference for head dims above
256 (the kernels hold a whole head in registers); forcing Triton runs them anyway.

Each public function names its kernel, reference, test and benchmark the same way:
``triton_attention.py`` (``attention_rows``, ``received_attention``), ``triton_shift.py``
(``token_shift``, ``token_shifts``) and ``triton_gather.py`` (``gather_tokens``, ``cu_seqlens``) hold functions of the
same names as ``reference.py``; ``tests/test_kernels_triton.py`` and ``eval/bench_kernels.py`` check
and time them under those names.
"""

from __future__ import annotations

import importlib
import os

import torch

from . import reference
from .reference import SHIFT_METRICS, compact_index, masked_topk

__all__ = [
    "SHIFT_METRICS", "attention_rows", "backend", "compact_index", "cu_seqlens", "gather_tokens",
    "masked_topk", "received_attention", "token_shift", "token_shifts",
]

BACKENDS = ("reference", "triton")
#: Largest head dim the default dispatch sends to the attention kernels.
MAX_TRITON_HEAD_DIM = 256


def _triton_imports() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install that fails while importing
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


def backend(*tensors: torch.Tensor | None) -> str:
    """``"triton"`` or ``"reference"``: what a kernel call on these tensors runs now.

    Reads ``VTOKEN_KERNELS`` and ``TRITON_INTERPRET`` at every call. Raises a one-line error for an
    unknown ``VTOKEN_KERNELS``, or for ``VTOKEN_KERNELS=triton`` when Triton does not import or the
    tensors are not on CUDA and the interpreter is off.
    """
    forced = os.environ.get("VTOKEN_KERNELS", "").strip().lower()
    if forced not in ("", "auto", *BACKENDS):
        raise ValueError(f"VTOKEN_KERNELS must be 'reference' or 'triton' (or unset), got {forced!r}")
    if forced == "reference":
        return "reference"
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if forced == "triton":
        if not _triton_imports():
            raise RuntimeError("VTOKEN_KERNELS=triton, but triton does not import (pip install 'vtoken[triton]')")
        if not on_cuda and not _interpreting():
            raise RuntimeError(
                "VTOKEN_KERNELS=triton runs the Triton kernels on CUDA tensors only; "
                "set TRITON_INTERPRET=1 to run them on CPU tensors in Triton's interpreter"
            )
        return "triton"
    return "triton" if on_cuda and _triton_imports() else "reference"


def _needs_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _attention_backend(query: torch.Tensor, key: torch.Tensor, *others) -> str:
    choice = backend(query, key, *others)
    if choice == "triton" and _needs_graph(query, key):
        return "reference"
    if (
        choice == "triton"
        and query.shape[-1] > MAX_TRITON_HEAD_DIM
        and os.environ.get("VTOKEN_KERNELS", "").strip().lower() != "triton"
    ):
        return "reference"
    return choice


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities ``[B, H, Q, N]`` of a few query rows against every key (GQA,
    optional boolean ``key_mask``, optional logit ``softcap``); see :func:`reference.attention_rows`
    for the contract. The Triton kernel runs an online-softmax two-pass scheme and writes only the
    result: O(rows x N) memory."""
    if _attention_backend(query, key, key_mask) == "triton":
        from .triton_attention import attention_rows as kernel

        return kernel(query, key, scaling, key_mask, softcap)
    return reference.attention_rows(query, key, scaling, key_mask, softcap)


def received_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, chunk: int | None = None
) -> torch.Tensor:
    """Attention each key receives ``[B, N]``, summed over query rows, averaged over heads; see
    :func:`reference.received_attention`. The Triton kernel computes each row's log-sum-exp, then the
    column sums in a second pass that reuses it: O(N) extra memory per head."""
    if _attention_backend(query, key) == "triton":
        from .triton_attention import received_attention as kernel

        return kernel(query, key, scaling, chunk)
    return reference.received_attention(query, key, scaling, chunk)


def token_shift(after: torch.Tensor, before: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Per-token change between two hidden states ``[..., D]`` (``"l2"``, ``"l1"``, ``"cos"``,
    ``"abs_cos"``, ``"norm_ratio"``), float32; see :func:`reference.token_shift`. The Triton kernel
    reads both tensors once."""
    if backend(after, before) == "triton" and not _needs_graph(after, before):
        from .triton_shift import token_shift as kernel

        return kernel(after, before, metric)
    return reference.token_shift(after, before, metric)


def token_shifts(after: torch.Tensor, before: torch.Tensor, metrics: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """Several of :func:`token_shift`'s metrics of the same two hidden states, one tensor per name,
    the sums they share computed once (TransPrune's norm ratio and cosine in one pass); see
    :func:`reference.token_shifts`."""
    if backend(after, before) == "triton" and not _needs_graph(after, before):
        from .triton_shift import token_shifts as kernel

        return kernel(after, before, tuple(metrics))
    return reference.token_shifts(after, before, tuple(metrics))


def gather_tokens(x: torch.Tensor, index: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``x[b, index[b, j]]`` for ``x`` ``[B, L, ...]``, ``fill`` where ``index == -1``; see
    :func:`reference.gather_tokens`. The Triton kernel gathers any dtype and strided trailing
    dimensions (KV-cache rows, M-RoPE position ids) in one launch."""
    if backend(x, index) == "triton":
        from .triton_gather import gather_tokens as kernel

        return kernel(x, index, fill)
    return reference.gather_tokens(x, index, fill)


def cu_seqlens(keep: torch.Tensor) -> torch.Tensor:
    """``[B + 1]`` int32 cumulative kept lengths of a ``[B, L]`` keep mask (variable-length
    FlashAttention's ``cu_seqlens``); see :func:`reference.cu_seqlens`."""
    if backend(keep) == "triton":
        from .triton_gather import cu_seqlens as kernel

        return kernel(keep)
    return reference.cu_seqlens(keep)
