"""What the Triton kernel files share. Imported only from a Triton entry point (never by
``import vtoken``), so a missing Triton costs nothing until a Triton kernel is asked for."""

from __future__ import annotations

import torch
import triton


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter now (parsed as Triton parses it)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    import os

    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


def check_device(kernel, *tensors: torch.Tensor | None) -> None:
    """A kernel runs on CUDA tensors, or on CPU tensors in the interpreter; one device per call.

    ``triton.jit`` decides at decoration time, when ``triton`` and the kernel files are imported,
    whether kernels (Triton's own ``tl.zeros``, ``tl.sum``... included) are compiled or interpreted;
    setting ``TRITON_INTERPRET=1`` later cannot switch them, which is reported here instead of failing
    inside the interpreter.
    """
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"vtoken.kernels: tensors on several devices {sorted(map(str, devices))}")
    device = next(iter(devices))
    if device.type == "cuda":
        return
    if not interpreting():
        raise RuntimeError(
            f"vtoken.kernels: the Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run them on CPU"
        )
    if type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "vtoken.kernels: TRITON_INTERPRET=1 was set after triton was imported; "
            "set it before the first import of triton (kernels are compiled or interpreted from then on)"
        )


def pow2(n: int, low: int = 16) -> int:
    """The next power of two >= max(n, low)."""
    return max(low, triton.next_power_of_2(max(1, int(n))))
