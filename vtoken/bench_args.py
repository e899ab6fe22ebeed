"""Checks of ``vtoken bench``'s arguments, run before any model loads: each bad value is a
``ValueError`` whose one line names the problem and the fix (the CLI prints it and exits with 2)."""

from __future__ import annotations

import importlib.util
import os


def public_methods() -> list[str]:
    from vtoken.registry import strategy_names

    return [name for name in strategy_names() if not name.startswith("_")]


def trained_methods() -> list[str]:
    from vtoken.registry import get_strategy

    return [name for name in public_methods() if get_strategy(name).trained]


def check_methods(methods: list[str] | None, trained: bool = False) -> list[str] | None:
    """``methods`` if every one is registered (and trained, when ``trained``)."""
    if methods is None:
        return None
    known = public_methods()
    for name in methods:
        if name not in known:
            raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known)}")
        if trained and name not in trained_methods():
            raise ValueError(f"--trained {name}: {name} is not a trained method (trained: "
                             f"{', '.join(trained_methods())}); give it with --methods instead")
    return methods


def check_budgets(budgets: list[str]) -> list[str]:
    from vtoken.bench import parse_budget

    for budget in budgets:
        parse_budget(budget)
    return budgets


def check_data(path: str) -> None:
    """Read the whole JSONL file now: a malformed line names the file and line before anything runs."""
    if not os.path.isfile(path):
        raise ValueError(f"--data {path!r}: no such file (give a JSONL file, one record per line)")
    from vtoken.vqa.data import load_jsonl

    if not load_jsonl(path):
        raise ValueError(f"--data {path!r}: the file holds no records")


def check_device(device: str | None, attn: str | None) -> None:
    """The device exists here, and FlashAttention 2 has what it needs."""
    if device is not None:
        import torch

        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise ValueError(f"--device {device!r} is not a device; write cpu, cuda, cuda:N or mps") from None
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if parsed.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    if attn == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("--attn flash_attention_2 needs the flash-attn package (pip install flash-attn) "
                             "and a CUDA device; use --attn sdpa otherwise")
        if device is None or not device.startswith("cuda"):
            raise ValueError("--attn flash_attention_2 runs on CUDA only: add --device cuda, or use --attn sdpa")
