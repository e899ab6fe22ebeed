"""Every ``vtoken.kernels`` kernel against its PyTorch reference (and, for the attention kernels, against
the eager route that materialises the full N x N attention map): time and peak memory at N = 576, 2880,
8192 and 32768 tokens.

    python eval/bench_kernels.py --out /tmp/bench_kernels/cpu.md                      # CPU, a fresh file
    python eval/bench_kernels.py --repeats 3 --out eval/results/bench_kernels/cpu.md --overwrite  # the committed one
    python eval/bench_kernels.py --out eval/results/bench_kernels/h100.md             # on a CUDA machine

``--out`` is the Markdown file to write; the script refuses to replace an existing one unless
``--overwrite`` is given.

Where CUDA is available every route is timed on the GPU (``torch.cuda.synchronize`` around each call)
and its peak memory is ``torch.cuda.max_memory_allocated`` above what the inputs already hold; the
Triton kernels run compiled and are checked against the reference at every size. Without CUDA the
Triton kernels cannot be timed meaningfully: the script sets ``TRITON_INTERPRET=1`` before Triton is
imported, times the PyTorch routes on the CPU (peak memory = the rise of the process's peak resident
set, ``VmHWM`` reset through ``/proc/self/clear_refs``, with glibc's mmap threshold pinned so freed
buffers leave the resident set), and reports the interpreter's agreement with the reference only, on
the shapes listed in the output (fewer heads where the interpreter would take minutes). No CPU figure
is a GPU figure; the output says which machine it came from.

Shapes (LLaVA-1.5-7B-like in the LLM, GQA 4:1 as in current LLMs; CLIP-L-like in the vision tower):

- attention_rows: B=1, 32 query heads, 8 key heads, head_dim 128, 8 query rows (the last token and
  instruction tokens), causal mask with the rows at the end; eager = the layer's whole causal
  ``softmax(QK^T)`` map ``[B, H, N, N]``, then the rows.
- received_attention: B=1, 16 heads, head_dim 64, every one of the N tokens a query row; eager = the
  whole map summed down its columns.
- token_shift: two ``[1, N, 4096]`` hidden states, L2 and cosine; the reference is the strategies'
  eager formula (it materialises ``a - b`` or both normalised tensors).
- gather_tokens: keep 1/9 of N (ragged: 2 samples, different counts) of ``[2, N, 4096]`` hidden states
  and of a ``[2, 8, N, 128]`` KV-cache tensor (seen as ``[2, N, 8, 128]``); cu_seqlens of an
  ``[8, N]`` keep mask.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must precede the first import of triton: the interpreter is chosen when kernels are decorated.
    os.environ["TRITON_INTERPRET"] = "1"

from vtoken.kernels import reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from output import add_output_arguments, claim, command_line  # noqa: E402  (eval/output.py)
from peak_memory import PeakMemory  # noqa: E402  (eval/peak_memory.py)

try:
    from vtoken.kernels import triton_attention, triton_gather, triton_shift  # noqa: E402

    TRITON_ERROR = None
except Exception as error:  # triton missing or broken: references only
    triton_attention = triton_gather = triton_shift = None
    TRITON_ERROR = f"{type(error).__name__}: {error}"

SIZES = (576, 2880, 8192, 32768)
METER = PeakMemory(torch.device("cuda" if CUDA else "cpu"))
MiB = 2**20


# --- measuring ------------------------------------------------------------------------------------

if not CUDA and sys.platform.startswith("linux"):
    try:  # pin glibc's mmap threshold (128 KiB) so a freed large buffer leaves the resident set
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)
    except OSError:
        pass


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def measure(fn, repeats: int, slow: float = 20.0) -> tuple[float, float, int]:
    """(median seconds over ``repeats`` calls after one warm-up, peak bytes the warm-up call added
    (``eval/peak_memory.py``), calls timed). A warm-up slower than ``slow`` seconds is itself the one
    timed call."""
    if CUDA:
        torch.cuda.empty_cache()
    start = time.perf_counter()
    peak, out = METER.measure(fn)
    first = time.perf_counter() - start
    del out
    if first > slow:
        return first, max(peak, 0), 1
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - start)
        del out
    return statistics.median(times), max(peak, 0), len(times)


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference (NaNs where both are NaN ignored)."""
    got, want = got.float(), want.float()
    both = got.isnan() & want.isnan()
    return float((got - want).abs().masked_fill(both, 0).max()) if got.numel() else 0.0


# --- the cases ------------------------------------------------------------------------------------


def rows_inputs(n: int, dtype, device, heads=32, kv_heads=8, rows=8, head_dim=128):
    g = torch.Generator(device="cpu").manual_seed(n)
    q_all = torch.randn(1, heads, n, head_dim, generator=g).to(device, dtype)
    k = torch.randn(1, kv_heads, n, head_dim, generator=g).to(device, dtype)
    slots = torch.arange(max(0, n - rows), n, device=device)
    q = q_all[:, :, slots]
    mask = (torch.arange(n, device=device)[None, None, :] <= slots[None, :, None])
    return q_all, q, k, mask, head_dim**-0.5


def eager_rows(q_all, k, mask_rows, scale, rows):
    """What attn_implementation="eager" holds for the layer: the whole causal map, then the rows."""
    n = k.shape[2]
    k = k.float().repeat_interleave(q_all.shape[1] // k.shape[1], dim=1)
    scores = q_all.float() @ k.transpose(-1, -2) * scale
    causal = torch.ones(n, n, dtype=torch.bool, device=k.device).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return probs[:, :, n - rows :]


def received_inputs(n: int, dtype, device, heads=16, kv_heads=16, head_dim=64):
    g = torch.Generator(device="cpu").manual_seed(n + 1)
    q = torch.randn(1, heads, n, head_dim, generator=g).to(device, dtype)
    k = torch.randn(1, kv_heads, n, head_dim, generator=g).to(device, dtype)
    return q, k, head_dim**-0.5


def eager_received(q, k, scale):
    k = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    probs = torch.softmax(q.float() @ k.transpose(-1, -2) * scale, dim=-1)
    return probs.sum(dim=2).mean(dim=1)


def shift_inputs(n: int, dtype, device, dim=4096):
    g = torch.Generator(device="cpu").manual_seed(n + 2)
    before = torch.randn(1, n, dim, generator=g).to(device, dtype)
    after = (before.float() + 0.1 * torch.randn(1, n, dim, generator=g).to(device)).to(dtype)
    return after, before


def gather_inputs(n: int, dtype, device, dim=4096, kv_heads=8, head_dim=128):
    g = torch.Generator(device="cpu").manual_seed(n + 3)
    hidden = torch.randn(2, n, dim, generator=g).to(device, dtype)
    cache = torch.randn(2, kv_heads, n, head_dim, generator=g).to(device, dtype)
    keep = torch.zeros(2, n, dtype=torch.bool)
    keep[0, torch.randperm(n, generator=g)[: max(1, n // 9)]] = True
    keep[1, torch.randperm(n, generator=g)[: max(1, n // 9 - n // 50)]] = True
    index = reference.compact_index(keep).to(device)
    masks = (torch.rand(8, n, generator=g) > 0.5).to(device)
    return hidden, cache.transpose(1, 2), index, masks


# --- the run --------------------------------------------------------------------------------------


def run(sizes, repeats: int, eager_cap: float, interp_max: dict, dtype) -> tuple[list[str], list[float]]:
    device = "cuda" if CUDA else "cpu"
    triton_ok = triton_attention is not None
    lines: list[str] = []
    table = []  # (kernel, N, route, time, memory, note)

    def timed(kernel, n, route, fn, note=""):
        seconds, peak, calls = measure(fn, repeats)
        if calls == 1 and repeats > 1:
            note = (note + "; " if note else "") + "one call timed (slow)"
        table.append((kernel, n, route, f"{seconds * 1e3:.2f}", f"{peak / MiB:.1f}", note))
        print(f"{kernel:20s} N={n:6d} {route:28s} {seconds * 1e3:10.2f} ms {peak / MiB:10.1f} MiB {note}", flush=True)

    def skipped(kernel, n, route, why):
        table.append((kernel, n, route, "-", "-", why))
        print(f"{kernel:20s} N={n:6d} {route:28s} skipped: {why}", flush=True)

    def check(kernel, n, what, got, want, seconds):
        err = error(got, want)
        table.append((kernel, n, f"triton ({'compiled' if CUDA else 'interpreter'}) vs reference", "-", "-",
                      f"max abs err {err:.1e} on {what}" + ("" if CUDA else f" (interpreter {seconds:.1f} s)")))
        print(f"{kernel:20s} N={n:6d} check {what}: max abs err {err:.1e}", flush=True)
        return err

    errors = []
    for n in sizes:
        # 1. attention rows
        q_all, q, k, mask, scale = rows_inputs(n, dtype, device)
        timed("attention_rows", n, "reference", lambda: reference.attention_rows(q, k, scale, mask))
        need = 2 * q_all.shape[1] * n * n * 4
        if need <= eager_cap:
            timed("attention_rows", n, "eager full map", lambda: eager_rows(q_all, k, mask, scale, q.shape[2]))
        else:
            skipped("attention_rows", n, "eager full map", f"needs ~{need / 2**30:.1f} GiB (cap {eager_cap / 2**30:.0f} GiB)")
        if triton_ok and CUDA:
            timed("attention_rows", n, "triton", lambda: triton_attention.attention_rows(q, k, scale, mask))
            errors.append(check("attention_rows", n, "the timed shape", triton_attention.attention_rows(q, k, scale, mask),
                                reference.attention_rows(q, k, scale, mask), 0))
        elif triton_ok and n <= interp_max["attention_rows"]:
            _, qs, ks, ms, sc = rows_inputs(n, dtype, device, heads=8, kv_heads=2)
            start = time.perf_counter()
            got = triton_attention.attention_rows(qs, ks, sc, ms)
            errors.append(check("attention_rows", n, "8 heads / 2 KV heads, 8 rows, d 128", got,
                                reference.attention_rows(qs, ks, sc, ms), time.perf_counter() - start))
        del q_all, q, k, mask

        # 2. received attention
        if CUDA or n <= interp_max["received_reference"]:
            q, k, scale = received_inputs(n, dtype, device)
            timed("received_attention", n, "reference", lambda: reference.received_attention(q, k, scale))
            need = 2 * q.shape[1] * n * n * 4
            if need <= eager_cap:
                timed("received_attention", n, "eager full map", lambda: eager_received(q, k, scale))
            else:
                skipped("received_attention", n, "eager full map", f"needs ~{need / 2**30:.1f} GiB (cap {eager_cap / 2**30:.0f} GiB)")
            if triton_ok and CUDA:
                timed("received_attention", n, "triton", lambda: triton_attention.received_attention(q, k, scale))
                errors.append(check("received_attention", n, "the timed shape", triton_attention.received_attention(q, k, scale),
                                    reference.received_attention(q, k, scale), 0))
            del q, k
        else:
            skipped("received_attention", n, "reference", "over the CPU time budget (N^2 work for all N query rows)")
        if triton_ok and not CUDA and n <= interp_max["received_attention"]:
            qs, ks, sc = received_inputs(n, dtype, device, heads=2, kv_heads=1)
            start = time.perf_counter()
            got = triton_attention.received_attention(qs, ks, sc)
            errors.append(check("received_attention", n, "2 heads / 1 KV head, all N rows, d 64", got,
                                reference.received_attention(qs, ks, sc), time.perf_counter() - start))

        # 3. token shift
        after, before = shift_inputs(n, dtype, device)
        for metric in ("l2", "cos"):
            timed("token_shift", n, f"reference ({metric})", lambda: reference.token_shift(after, before, metric))
            if triton_ok and CUDA:
                timed("token_shift", n, f"triton ({metric})", lambda: triton_shift.token_shift(after, before, metric))
        if triton_ok and (CUDA or n <= interp_max["token_shift"]):
            start = time.perf_counter()
            got = torch.stack([triton_shift.token_shift(after, before, m) for m in reference.SHIFT_METRICS])
            want = torch.stack([reference.token_shift(after, before, m) for m in reference.SHIFT_METRICS])
            errors.append(check("token_shift", n, "the timed shape, all 5 metrics",
                                got / want.abs().clamp_min(1), want / want.abs().clamp_min(1), time.perf_counter() - start))
        del after, before

        # 4. compaction
        hidden, cache, index, masks = gather_inputs(n, dtype, device)
        timed("gather_tokens", n, "reference (hidden)", lambda: reference.gather_tokens(hidden, index))
        timed("gather_tokens", n, "reference (KV view)", lambda: reference.gather_tokens(cache, index))
        timed("cu_seqlens", n, "reference", lambda: reference.cu_seqlens(masks))
        if triton_ok and CUDA:
            timed("gather_tokens", n, "triton (hidden)", lambda: triton_gather.gather_tokens(hidden, index))
            timed("gather_tokens", n, "triton (KV view)", lambda: triton_gather.gather_tokens(cache, index))
            timed("cu_seqlens", n, "triton", lambda: triton_gather.cu_seqlens(masks))
        if triton_ok and (CUDA or n <= interp_max["gather_tokens"]):
            start = time.perf_counter()
            same = (torch.equal(triton_gather.gather_tokens(hidden, index), reference.gather_tokens(hidden, index))
                    and torch.equal(triton_gather.gather_tokens(cache, index), reference.gather_tokens(cache, index))
                    and torch.equal(triton_gather.cu_seqlens(masks), reference.cu_seqlens(masks)))
            errors.append(check("gather_tokens", n, "the timed shapes + cu_seqlens (bitwise)",
                                torch.tensor(0.0 if same else 1.0), torch.tensor(0.0), time.perf_counter() - start))
        del hidden, cache, index, masks

    lines.append("| kernel | N | route | time (ms) | peak extra memory (MiB) | note |")
    lines.append("|---|---:|---|---:|---:|---|")
    for row in table:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return lines, errors


def machine() -> str:
    if CUDA:
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3 if not CUDA else 20)
    parser.add_argument("--eager-cap-gib", type=float, default=6.0 if not CUDA else 60.0,
                        help="skip an eager full-map route whose map would need more than this")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32" if not CUDA else "bfloat16")
    add_output_arguments(parser, "Markdown file to write (e.g. eval/results/bench_kernels/cpu.md)")
    args = parser.parse_args(argv)
    out = claim(args.out, args.overwrite)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    # CPU: how far the interpreter goes for each check, and the largest N the O(N^2) reference of
    # received attention is timed at (4 s per call at 8192 on 2 cores, about a minute at 32768).
    interp_max = {"attention_rows": 32768, "received_attention": 576, "received_reference": 32768,
                  "token_shift": 2880, "gather_tokens": 2880}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.perf_counter()
    table, errors = run(args.sizes, args.repeats, args.eager_cap_gib * 2**30, interp_max, dtype)
    wall = time.perf_counter() - started
    header = [
        "# vtoken.kernels: Triton kernels against their references",
        "",
        f"Machine: {machine()}. torch {torch.__version__}, "
        + (f"triton {__import__('triton').__version__}" if TRITON_ERROR is None else f"triton unavailable ({TRITON_ERROR})")
        + f", Python {platform.python_version()}, {torch.get_num_threads()} torch threads. Inputs {args.dtype}."
        + f" Load average (1 min) at start: {load:.2f}.",
        f"Command: `{command_line('bench_kernels', argv)}`" + f" ({wall / 60:.1f} min).",
        "",
    ]
    if CUDA:
        header += [
            f"GPU figures: median of {args.repeats} calls after a warm-up, `torch.cuda.synchronize()` around each;",
            "peak extra memory = `torch.cuda.max_memory_allocated()` above what was allocated before the call.",
            "Every Triton kernel is checked against its reference at every size (rows \"vs reference\").",
        ]
    else:
        header += [
            "**CPU only: no GPU was available, so no GPU figure exists in this file and no Triton kernel was timed.**",
            f"Times are the PyTorch references (and the eager full-map routes) on the CPU, median of {args.repeats} calls after",
            "a warm-up; peak extra memory is the rise of the process's peak resident set (VmHWM, reset before each",
            "call) over the inputs. The Triton kernels ran in Triton's CPU interpreter (`TRITON_INTERPRET=1`) for",
            "correctness only: rows \"triton (interpreter) vs reference\" give the largest absolute difference",
            "from the reference on the shape named (fewer heads than the timed shape where the interpreter would take",
            "minutes; the interpreter's seconds say nothing about GPU speed). token_shift's error is relative to",
            "max(1, |reference|). Run the same script on a CUDA machine for kernel timings.",
        ]
    header += ["", f"Largest difference in any check: {max(errors) if errors else float('nan'):.1e}.", ""]
    out.write_text("\n".join(header + table) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
