"""Interleaved timing and peak-memory probes for comparing variants of one model.

Each variant (a :class:`Case`) is set up, run and torn down once per round, and every round runs
every case, so slow drift of the machine (thermal state, other processes) hits all cases alike
instead of whichever ran last. Odd rounds run the cases in reverse order, which also cancels a
drift that is linear within a round.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from agentsd.tools.measure import PeakMemory, Timer, synchronize


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
    host_times: list[float] = field(default_factory=list)  # the host's seconds in those rounds (Timer)
    peak_bytes: int | None = None  # memory added at the peak of one run; None when unmeasurable

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def time_round(self, calls: Sequence[tuple[Callable[[], object], float]], device: torch.device,
                   after_call: Callable[[], None] | None = None) -> None:
        """Time one round of ``calls`` (``(fn, weight)``) and add its weighted seconds and host seconds."""
        total = host = 0.0
        for fn, weight in calls:
            with Timer(device) as timer:
                fn()
            total += weight * timer.seconds
            host += weight * timer.host_seconds
            if after_call:
                after_call()
        self.times.append(total)
        self.host_times.append(host)

    @property
    def host_share(self) -> float:
        """Median over rounds of the host's seconds over the device's: near 1 on CUDA, the device waited
        for the host's kernel launches (see :class:`~agentsd.tools.measure.Timer`)."""
        return statistics.median(h / t for h, t in zip(self.host_times, self.times, strict=True) if t > 0)


def sdpa_kernel(name: str) -> contextlib.AbstractContextManager:
    """Context that holds ``torch.nn.functional.scaled_dot_product_attention`` to one kernel.

    Args:
        name: ``"default"`` (torch chooses: flash or memory-efficient attention where they apply; no
            change) or ``"math"`` (the math kernel only: the softmax is materialised, as in the
            paper's baseline).
    """
    if name == "default":
        return contextlib.nullcontext()
    if name != "math":
        raise ValueError(f"unknown SDPA kernel {name!r}: use default or math")
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel as hold

    return hold([SDPBackend.MATH])


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
                results[case.key].time_round(case.calls, device, on_call and (lambda: on_call(case.key)))
                return
            for fn, _ in case.calls:
                # each call probed on its own: a heap trimmed before each one, the largest peak kept
                probe = PeakMemory(device) if mode == "memory" else None
                with probe or contextlib.nullcontext():
                    fn()
                    synchronize(device)
                if probe and probe.added is not None:
                    before = results[case.key].peak_bytes or 0
                    results[case.key].peak_bytes = max(before, probe.added)
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
