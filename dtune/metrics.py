"""Plain local metrics: `metrics.jsonl` (one object per logged step or eval) and peak memory."""
from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import sys
import threading
from pathlib import Path

import torch

from dtune.files import open_for_append, refuse_symlink, write_atomically
from dtune.run_dir import read_metrics

GIB = 1024**3


class MetricsLog:
    """Appends JSON lines. On resume, lines past the checkpoint's step are dropped first,
    so a killed run's steps that were never checkpointed do not appear twice."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        refuse_symlink(self.path)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._handle = open_for_append(self.path)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._handle.write(json.dumps(clean) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def peak_memory_bytes() -> int:
    """Peak accelerator memory when training on CUDA, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return int(torch.cuda.max_memory_allocated())
    return peak_host_memory_bytes()


def peak_host_memory_bytes() -> int:
    """The process's peak RSS: all of it on a CPU, what offload keeps on the host on a GPU."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_reserved_bytes() -> int | None:
    """The CUDA caching allocator's peak reservation (allocated plus what it keeps cached),
    the figure that runs out; None off a GPU."""
    return int(torch.cuda.max_memory_reserved()) if torch.cuda.is_available() else None


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class TrainingPeakMemory:
    """Peak memory while training, apart from loading: on CUDA the allocator's peak since
    `start`; on CPU the highest RSS sampled every few milliseconds by a background thread
    (the process peak also holds load-time transients, such as a mapped checkpoint)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "TrainingPeakMemory":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        elif sys.platform.startswith("linux"):
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            self._stop.wait(self.interval_s)

    def stop(self) -> int:
        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        return self.peak


def release_free_heap() -> None:
    """Hand memory freed while loading back to the OS (glibc keeps it otherwise), so RSS
    during training reflects what training holds."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
