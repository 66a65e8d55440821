"""Peak memory and throughput of one worker, in the units the README and MLflow report.

Peak CPU RSS comes from ``getrusage`` (the kernel's high-water mark, so it catches spikes
between samples); GPU figures from the CUDA caching allocator's peak counters.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch

_MIB = 1024 * 1024


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 1024 if sys.platform != "darwin" else peak / _MIB


def gpu_peaks_mib(device: torch.device | None = None) -> dict[str, float]:
    """Peak allocated and reserved CUDA memory since the last reset, in MiB (empty on CPU)."""
    if not torch.cuda.is_available():
        return {}
    return {
        "peak_gpu_allocated_mib": torch.cuda.max_memory_allocated(device) / _MIB,
        "peak_gpu_reserved_mib": torch.cuda.max_memory_reserved(device) / _MIB,
    }


def reset_gpu_peaks(device: torch.device | None = None) -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class Throughput:
    """Counts tokens over wall time; ``window`` gives the rate since the last call."""

    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    _window_tokens: int = 0
    _window_start: float = field(default_factory=time.perf_counter)

    def add(self, n: int) -> None:
        self.tokens += n
        self._window_tokens += n

    def window(self) -> float:
        now = time.perf_counter()
        rate = self._window_tokens / max(now - self._window_start, 1e-9)
        self._window_tokens, self._window_start = 0, now
        return rate

    def overall(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)


def worker_memory(device: torch.device | None = None) -> dict[str, float]:
    """All memory figures of this worker (CPU RSS always, GPU when present)."""
    return {"peak_rss_mib": peak_rss_mib(), **gpu_peaks_mib(device)}
