"""The peak memory one call adds, on CPU or CUDA: the one meter of ``eval/bench_speed.py`` and
``eval/bench_kernels.py``."""

from __future__ import annotations

import ctypes
import gc
import re
from pathlib import Path

import torch


def _status_kib(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M).group(1))


class PeakMemory:
    """The peak memory one call adds. CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``
    minus what was allocated before. CPU: the process's peak RSS (``VmHWM``), reset to the current RSS
    by writing 5 to ``/proc/self/clear_refs``, minus the RSS before the call; where that file cannot
    be written, the rise of ``getrusage``'s all-time ``ru_maxrss`` (a lower bound: 0 whenever an
    earlier call peaked higher). Freed heap is handed back (``malloc_trim``) before each call, so
    memory the allocator kept from earlier calls does not hide this one's."""

    def __init__(self, device: torch.device):
        self.device = device
        self._trim = None
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            pass
        if device.type == "cuda":
            self.how = "torch.cuda.max_memory_allocated (reset before each call) minus the allocated bytes before it"
        elif self._reset_hwm():
            self.how = ("peak RSS (VmHWM, reset through /proc/self/clear_refs before each call, heap trimmed) minus "
                        "the RSS before the call")
        else:
            self.how = ("rise of getrusage's ru_maxrss over the call (/proc/self/clear_refs is not writable here, so "
                        "the peak cannot be reset: a lower bound, 0 when an earlier call peaked higher)")

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def measure(self, fn):
        """``(peak bytes added, fn's result)``."""
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            with torch.no_grad():
                result = fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before, result
        if self._reset_hwm():
            before = _status_kib("VmRSS")
            with torch.no_grad():
                result = fn()
            return max(0, _status_kib("VmHWM") - before) * 1024, result
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.no_grad():
            result = fn()
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, result
