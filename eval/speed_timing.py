"""Timing for the speed bench (``eval/bench_speed.py``): a wall clock that synchronizes an
accelerator, the timestamps of ``generate``'s steps, the KV cache's bytes, and the direct measures of
a strategy's scoring: the time inside its own calls (``StrategyCallTime``), the LLM layers' own key
projections it spared (``LayerKeyTime``), and a torch.profiler line on where its scoring time goes.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch
from transformers.generation.streamers import BaseStreamer

import vtoken
from vtoken import compat

import replay_strategy as replay  # eval/replay_strategy.py
from block_time import BlockTime  # eval/block_time.py


class Clock:
    """Wall time of one call, synchronizing an accelerator before and after."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        self.sync()
        return time.perf_counter() - start


def kv_cache_bytes(cache) -> int:
    """Bytes of every key and value tensor a KV cache holds, read layer by layer through the cache's
    ``layers[i].keys / .values`` (transformers 5.23 and 5.24 alike, through ``vtoken.compat``)."""
    if cache is None:
        raise ValueError("the prefill returned no KV cache")
    total = 0
    for layer in range(compat.num_cache_layers(cache)):
        keys, values = compat.cache_layer_kv(cache, layer)
        for name, tensor in (("keys", keys), ("values", values)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
                raise ValueError(f"KV cache layer {layer} holds no [B, H, L, D] {name} ({type(tensor).__name__})")
        if keys.shape[:3] != values.shape[:3]:
            raise ValueError(f"KV cache layer {layer}: keys {tuple(keys.shape)} and values {tuple(values.shape)} disagree")
        total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
    return total


class StepClock(BaseStreamer):
    """Timestamps of ``generate``'s streamer calls: the prompt, then each new token (already moved to
    the CPU by ``generate``, so an accelerator has finished the step)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


#: A strategy's own calls, made by vtoken's pipeline and adapters (``Strategy.reduce`` calls
#: ``score``; ``observe`` and ``observe_attention`` summarise signals as the forward goes).
STRATEGY_CALLS = ("reduce", "observe", "observe_attention")


def _around_calls(strategy, around, names=STRATEGY_CALLS):
    """Run each of ``strategy``'s own calls inside ``around(label)`` (a context manager; this
    instance only); returns an undo."""
    for name in names:
        method = getattr(strategy, name)

        def wrapped(*args, _method=method, _label=f"strategy.{name}", **kwargs):
            with around(_label):
                return _method(*args, **kwargs)

        setattr(strategy, name, wrapped)
    return lambda: [strategy.__dict__.pop(n, None) for n in names]


def _labelled(strategy):
    """Wrap ``strategy``'s own calls in profiler labels (this instance only); returns an undo."""
    from torch.profiler import record_function

    return _around_calls(strategy, record_function)


class StrategyCallTime:
    """Wall time spent inside a strategy's own calls (:data:`STRATEGY_CALLS`) during the runs since
    the last :meth:`take`: the part of the scoring that is timed directly, a few milliseconds measured
    as such rather than as the difference of two prefills of hundreds. It misses the work of
    vtoken's hooks outside those calls (recording a layer's input, say), so it bounds the scoring
    from below. CPU only: on an accelerator the calls return before their kernels finish."""

    def __init__(self, block_time: BlockTime | None = None) -> None:
        self.seconds, self._depth, self._start = 0.0, 0, 0.0
        self.block_time = block_time

    @contextmanager
    def around(self, label: str):
        # Outermost calls only: a call made from inside another is already in its time.
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1
        try:
            # A call made from inside a block (ToMe's merges, an observer) is not the block's time.
            with (self.block_time.outside() if self.block_time is not None else nullcontext()):
                yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.seconds += time.perf_counter() - self._start

    @contextmanager
    def pruned(self, model, method: str, **options):
        """``vtoken.pruned(model, method, **options)`` with the strategy's calls timed."""
        with vtoken.pruned(model, method, **options):
            undo = _around_calls(vtoken.strategy_of(model), self.around)
            try:
                yield
            finally:
                undo()

    @property
    def inside(self) -> bool:
        """True while one of the strategy's calls runs."""
        return self._depth > 0

    def take(self) -> float:
        """The seconds gathered since the last take, and start again from 0."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class LayerKeyTime:
    """Wall time in the LLM layers' own input norms and key projections (calls made outside the
    strategy's calls) during the runs since the last :meth:`take`, and whether any of them ran on no
    row: a stage's scoring normalised and projected that layer's keys and handed the kept rows to it
    (``vtoken/adapters/key_reuse.py``). The time in the strategy's calls then holds work its replay's
    layers do themselves; the replay's time in those modules less the method's is that work, taken
    off the in-calls time. CPU only, like :class:`StrategyCallTime`."""

    def __init__(self, model, calls: StrategyCallTime):
        layers = model.model.language_model.layers
        self.modules = [module for layer in layers for module in (
            compat.decoder_input_norm(layer), compat.attention_parts(compat.layer_attention(layer)).k_proj)]
        self.calls = calls
        self.seconds, self.handed, self._start = 0.0, False, None

    @contextmanager
    def timing(self):
        # Registered before vtoken's key-reuse hooks (added during the forward): the post-hook here
        # sees the module's own output, zero rows where the normed rows or keys were handed over.
        handles = [h for p in self.modules
                   for h in (p.register_forward_pre_hook(self._before), p.register_forward_hook(self._after))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _before(self, module, args) -> None:
        if not self.calls.inside:
            self._start = time.perf_counter()

    def _after(self, module, args, output) -> None:
        if self._start is not None and not self.calls.inside:
            self.seconds += time.perf_counter() - self._start
            self.handed = self.handed or output.shape[-2] == 0
        self._start = None

    def take(self) -> tuple[float, bool]:
        """(seconds, whether a layer was handed its keys) since the last take; both start again."""
        out = (self.seconds, self.handed)
        self.seconds, self.handed = 0.0, False
        return out


def _profile(fn, device: torch.device) -> dict[str, tuple[float, int]]:
    """op / label -> (self time in ms for ops, total time for labels; calls) over one call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof, torch.no_grad():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = {}
    for event in prof.key_averages():
        if event.key.startswith("strategy."):
            out[event.key] = (event.cpu_time_total / 1000, event.count)
        else:
            self_time = event.self_cpu_time_total
            if device.type == "cuda":
                self_time += getattr(event, "self_device_time_total", 0)
            out[event.key] = (self_time / 1000, event.count)
    return out


def profile_scoring(model, x, method: str, budget: int, options: dict, recording, device, calls) -> str:
    """One line on where ``method``'s scoring time goes at ``budget`` (wrapped with ``options``): the
    strategy's own calls (inclusive) and the torch ops that grew most over the replay (self time, one
    prefill each, under the profiler)."""
    with vtoken.pruned(model, method, **options):
        undo = _labelled(vtoken.strategy_of(model))
        try:
            calls(model, x)  # warm
            mine = _profile(lambda: calls(model, x), device)
        finally:
            undo()
    with replay.replaying(model, recording):
        calls(model, x)
        theirs = _profile(lambda: calls(model, x), device)
    ops = {k: v for k, v in mine.items() if not k.startswith("strategy.")}
    total = sum(v[0] for v in ops.values())
    base = sum(v[0] for k, v in theirs.items() if not k.startswith("strategy."))
    own = ", ".join(f"{k} {v[0]:.0f} ms ({v[1]}x)" for k, v in sorted(mine.items()) if k.startswith("strategy."))
    grown = sorted(((v[0] - theirs.get(k, (0.0, 0))[0], k, v[1] - theirs.get(k, (0.0, 0))[1]) for k, v in ops.items()),
                   reverse=True)[:5]
    grown_text = ", ".join(f"{k} +{d:.0f} ms ({'+' if c >= 0 else ''}{c} calls)" for d, k, c in grown if d > 0)
    return (f"- **{method}** at {budget} (op time under the profiler: {total:.0f} ms against the replay's {base:.0f} ms): "
            f"inside the strategy's own calls: {own or 'none'}; ops that grew most over the replay: {grown_text}.")
