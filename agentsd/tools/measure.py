"""Measurement shared by the tools: one synchronize, one timer, one peak-memory probe.

- :func:`synchronize` waits for the queued work of a CUDA or Apple MPS device (a no-op on CPU).
- :class:`Timer` times a block: CUDA events on a CUDA device (the GPU's own clock, no host
  jitter), ``time.perf_counter`` around a synchronised block elsewhere.
- :class:`PeakMemory` reads the memory a block adds at its peak. What it reads depends on the
  device, and :func:`memory_method` says it in one sentence for reports:

  - CUDA: ``torch.cuda.max_memory_allocated`` (tensors of the caching allocator, not its reserve)
    after a reset, minus what was allocated before the block;
  - MPS: ``torch.mps.current_allocated_memory`` sampled every millisecond;
  - CPU: the process's resident set size (``/proc/self/statm``, Linux only) sampled every
    millisecond, after ``malloc_trim`` gave freed heap back to the OS. This is the whole process,
    not just tensors, and a peak shorter than the sampling interval can be missed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait until the work queued on ``device`` is done (CUDA and MPS; nothing to wait for on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Timer:
    """Seconds taken by the enclosed block on ``device``; ``seconds`` and ``host_seconds`` are set on exit.

    The device is synchronised on entry, so earlier queued work is not counted. On CUDA the block is
    timed with CUDA events recorded on the current stream; elsewhere with ``time.perf_counter``
    after a final synchronisation. Nested timers are fine (the profiler's module timers nest).

    ``host_seconds`` is the host's own time in the block, up to the final wait for the device. On a
    device that runs its work asynchronously (CUDA, MPS), ``host_seconds`` close to ``seconds`` means
    the device waited for the host to issue the work: the block is launch-bound. On CPU the two are
    the same time.

    Example::

        with Timer(device) as timer:
            image = pipe(prompt).images[0]
        print(timer.seconds)
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds = float("nan")
        self.host_seconds = float("nan")
        self._events: tuple | None = None
        self._start = 0.0

    def __enter__(self) -> Timer:
        synchronize(self.device)
        if self.device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.host_seconds = time.perf_counter() - self._start
        if self._events is not None:
            start, end = self._events
            end.record()
            end.synchronize()
            self.seconds = start.elapsed_time(end) / 1e3
            return
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc: ctypes.CDLL | bool | None = None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so that RSS growth reflects new allocations."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def resident_bytes() -> int | None:
    """Current resident set size of this process (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated during the run (tensors, not the allocator's cached "
            "reserve), minus the memory allocated before it",
    "mps": "torch.mps.current_allocated_memory sampled every 1 ms during the run, minus its value before",
    "cpu": "resident set size (RSS) of the whole process sampled every 1 ms from /proc/self/statm during the "
           "run, after malloc_trim, minus its value before (a peak shorter than 1 ms can be missed)",
}


def memory_method(device: torch.device | str) -> str:
    """One sentence saying what :class:`PeakMemory` reads on ``device``, for reports."""
    device = torch.device(device)
    if device.type == "cpu" and resident_bytes() is None:
        return "not measured (no /proc/self/statm on this system)"
    return _METHODS.get(device.type, "not measured on this device")


class PeakMemory:
    """Context manager reading the memory the enclosed block uses at its peak (see the module notes).

    After the block:

    - ``added``: bytes above the reading at entry, at the block's peak (the block's own footprint:
      activations, workspaces); ``None`` where nothing can be read.
    - ``peak``: the reading itself at the peak (weights included), or ``None``.

    Args:
        device: where the block runs.
        interval: sampling period in seconds on CPU and MPS (1 ms: a step's activations last longer).
    """

    def __init__(self, device: torch.device | str, interval: float = 1e-3) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.added: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0
        self._max = 0

    @property
    def kind(self) -> str:
        """What ``peak`` reads: ``cuda_max_allocated``, ``mps_allocated`` or ``process_rss``."""
        return {"cuda": "cuda_max_allocated", "mps": "mps_allocated"}.get(self.device.type, "process_rss")

    def _read(self) -> int | None:
        if self.device.type == "mps":
            return torch.mps.current_allocated_memory()
        if self.device.type == "cpu":
            return resident_bytes()
        return None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, self._read() or 0)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        synchronize(self.device)
        if self.device.type == "cpu":
            _trim_heap()
        start = self._read()
        if start is not None:
            self._start = self._max = start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.added = self.peak - self._start
            return
        if self._thread is not None:
            synchronize(self.device)
            self._max = max(self._max, self._read() or 0)
            self._stop.set()
            self._thread.join()
            self.peak = self._max
            self.added = self._max - self._start


def format_bytes(n: int) -> str:
    """``n`` bytes as a short human string, e.g. ``"3.13 GB"`` (decimal units, as the paper)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
