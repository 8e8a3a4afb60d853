"""Interleaved timing and peak-memory probes for comparing variants of one model.

Each variant (a :class:`Case`) is set up, run and torn down once per round, and every round runs
every case, so slow drift of the machine (thermal state, other processes) hits all cases alike
instead of whichever ran last. Odd rounds run the cases in reverse order, which also cancels a
drift that is linear within a round.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    """One variant to time.

    Attributes:
        key: unique name.
        calls: ``(fn, weight)`` pairs; a round's time is ``sum(weight * seconds(fn))``. One call with
            weight 1 for a plain step; several for a schedule averaged over its phases.
        setup: run before the calls each round (e.g. apply a patch); not timed.
        teardown: run after the calls each round (e.g. remove the patch); not timed.
        check: run once after the first warm-up run, still set up (e.g. verify the phases ran).
    """

    key: str
    calls: Sequence[tuple[Callable[[], object], float]]
    setup: Callable[[], None] = lambda: None
    teardown: Callable[[], None] = lambda: None
    check: Callable[[], None] | None = None


@dataclass
class Measurement:
    """What :func:`run_interleaved` found for one case."""

    times: list[float] = field(default_factory=list)  # seconds, one per timed round
    peak_bytes: int | None = None  # memory added at the peak of one run; None when unmeasurable

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by ``fn()``: CUDA events on a GPU (after a synchronise), a wall clock on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_time = time.perf_counter()
    fn()
    return time.perf_counter() - start_time


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc = None


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


CPU_MEMORY_METHOD = (
    "peak RSS added during one warm-up run, sampled every 1 ms from /proc/self/statm after "
    "malloc_trim (allocations shorter than 1 ms can be missed)"
)
CUDA_MEMORY_METHOD = (
    "torch.cuda.max_memory_allocated during one warm-up run, minus the memory allocated before"
)


class PeakMemory:
    """Context manager measuring the memory added at the peak of the enclosed code.

    On CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before.
    On CPU: a thread samples the resident set size every ``interval`` seconds; the heap is trimmed
    first so that memory freed earlier and kept by the allocator does not hide new allocations.
    ``peak_bytes`` is None where neither works (non-Linux CPU).
    """

    def __init__(self, device: torch.device, interval: float = 1e-3):
        self.device = device
        self.interval = interval
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0
        self._max = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, resident_bytes() or 0)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _trim_heap()
        start = resident_bytes()
        if start is not None:
            self._start = self._max = start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        if self._thread is not None:
            self._max = max(self._max, resident_bytes() or 0)
            self._stop.set()
            self._thread.join()
            self.peak_bytes = self._max - self._start


def memory_method(device: torch.device) -> str:
    """One sentence saying how :class:`PeakMemory` measures on ``device``."""
    return CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD


def total_calls(cases: Sequence[Case], repeats: int, warmup: int) -> int:
    """Number of calls :func:`run_interleaved` makes (for a progress bar)."""
    per_round = sum(len(case.calls) for case in cases)
    return len(cases[0].calls) + (warmup + repeats) * per_round if cases else 0


def run_interleaved(
    cases: Sequence[Case],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    on_call: Callable[[str], None] | None = None,
) -> dict[str, Measurement]:
    """Time every case ``repeats`` times, round by round, after ``warmup`` untimed rounds.

    The first case is run once more before everything (it takes the process's one-time costs:
    thread pools, kernel caches), then ``warmup`` rounds run every case untimed; the peak memory of
    each case is measured in the last warm-up round, away from the timed runs (the largest peak of
    its calls, each probed alone). Each timed round gives one weighted time per case.

    Args:
        cases: the variants; put the reference (e.g. the unpatched model) first.
        device: where they run; CUDA is synchronised and timed with events.
        repeats: timed rounds, >= 1. The median over rounds is the robust figure.
        warmup: untimed rounds before, >= 1.
        on_call: called with the case key after each call (e.g. to advance a progress bar).

    Returns:
        ``{case.key: Measurement}``.
    """
    if repeats < 1 or warmup < 1:
        raise ValueError(f"repeats and warmup must be >= 1, got {repeats} and {warmup}")
    results = {case.key: Measurement() for case in cases}
    checked: set[str] = set()

    def run(case: Case, mode: str) -> None:
        case.setup()
        try:
            if mode == "timed":
                total = 0.0
                for fn, weight in case.calls:
                    total += weight * time_call(fn, device)
                    if on_call:
                        on_call(case.key)
                results[case.key].times.append(total)
                return
            for fn, _ in case.calls:
                # each call probed on its own: a heap trimmed before each one, the largest peak kept
                probe = PeakMemory(device) if mode == "memory" else None
                with probe or contextlib.nullcontext():
                    fn()
                    synchronize(device)
                if probe and probe.peak_bytes is not None:
                    before = results[case.key].peak_bytes or 0
                    results[case.key].peak_bytes = max(before, probe.peak_bytes)
                if on_call:
                    on_call(case.key)
            if case.check and case.key not in checked:
                case.check()  # still set up, right after a run
                checked.add(case.key)
        finally:
            case.teardown()

    if cases:
        run(cases[0], "warm")
    for round_index in range(warmup + repeats):
        order = list(cases) if round_index % 2 == 0 else list(reversed(cases))
        for case in order:
            if round_index < warmup:
                run(case, "memory" if round_index == warmup - 1 else "warm")
            else:
                run(case, "timed")
    return results
