"""Memory metrics (`skip_memory_metrics=False`), named as transformers names them:
`<stage>_mem_cpu_alloc_delta`, `<stage>_mem_cpu_peaked_delta` (process RSS, bytes) and, on CUDA,
`<stage>_mem_gpu_alloc_delta`, `<stage>_mem_gpu_peaked_delta` (allocated tensor memory, bytes).

alloc_delta = memory at the end - at the start; peaked_delta = peak during the stage - memory at the
end (as transformers: how much more the stage needed at its worst than it kept). The CPU peak is
sampled by a background thread every few milliseconds; a stage inside another (evaluate during
train) is not tracked separately, because both would share one peak counter.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

_current: list[MemoryTracker] = []  # the tracker that owns the counters now (at most one)


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux) or psutil elsewhere."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return int(psutil.Process().memory_info().rss)


class MemoryTracker:
    """start() ... stop(stage) -> metrics; does nothing when disabled or nested in a running one."""

    def __init__(self, enabled: bool, interval_s: float = 0.002) -> None:
        self.enabled = enabled
        self.interval_s = interval_s
        self._owner = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu_start = self._cpu_peak = 0
        self._gpu_start = 0

    def start(self, stage: str = "train") -> MemoryTracker:
        if not self.enabled:
            return self
        if _current:
            if stage != "train":
                return self  # nested in a running stage (evaluate during train): not tracked
            _current[0]._release()  # train never nests: what is left is from a train() that failed
        _current.append(self)
        self._owner = True
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._gpu_start = torch.cuda.memory_allocated()
        self._cpu_start = self._cpu_peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="ember-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._cpu_peak = max(self._cpu_peak, rss_bytes())

    def stop(self, stage: str) -> dict[str, Any]:
        if not self._owner:
            return {}
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        end = rss_bytes()
        peak = max(self._cpu_peak, end)
        metrics: dict[str, Any] = {
            f"{stage}_mem_cpu_alloc_delta": end - self._cpu_start,
            f"{stage}_mem_cpu_peaked_delta": max(0, peak - end),
        }
        if torch.cuda.is_available():
            now = torch.cuda.memory_allocated()
            metrics[f"{stage}_mem_gpu_alloc_delta"] = now - self._gpu_start
            metrics[f"{stage}_mem_gpu_peaked_delta"] = max(0, torch.cuda.max_memory_allocated() - now)
        self._release()
        return metrics

    def _release(self) -> None:
        self._stop.set()
        self._owner = False
        if self in _current:
            _current.remove(self)
