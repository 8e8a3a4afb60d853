"""The compiled rows of ``agentsd bench --compile``: each method with the UNet compiled.

The UNet is compiled as ``agentsd generate --compile`` compiles it (:func:`agentsd.tools.loading.
compile_unet`: regional compilation of the transformer blocks where diffusers offers it). A compiled
UNet guards on the modules it traced (processors, hooks), so applying another patch recompiles. The
compiled rows are therefore measured method by method rather than interleaved: dynamo's caches are
reset, the UNet is compiled and the method applied (after compiling: tomesd swaps the blocks'
class), the first call of each AgentSD phase is timed as the compile time, and the graphs and graph
breaks dynamo made for those calls are counted (its counters: no second trace), then the warm-up and
timed rounds run as in the eager rows, and the UNet is left unpatched and eager.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from agentsd.tools.bench.cases import Phase, expected_phases, restoring, step_calls
from agentsd.tools.bench.config import Plan
from agentsd.tools.bench.report import ASYNC_DEVICES, Row
from agentsd.tools.bench.timing import Measurement
from agentsd.tools.errors import summary
from agentsd.tools.measure import PeakMemory, Timer, synchronize
from agentsd.tools.methods import Method, patcher


def _dynamo_counts() -> tuple[int, int]:
    """(unique graphs, graph breaks) dynamo has made so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def compiled_row(method: Method, unet, inputs: dict, schedule: list[Phase], plan: Plan, label: str,
                 width: int, height: int, advance: Callable[[str], None]) -> Row:
    """Measure ``method`` with ``unet`` compiled; the UNet is left unpatched and uncompiled after."""
    import agentsd
    from agentsd.tools.loading import compile_unet, uncompile_unet

    config = plan.config
    key = method.name + " (compiled)"
    row = Row(arch=label, width=width, height=height, method=method, step_s=None, compiled=True)
    apply, remove = patcher(method, unet, config.seed, plan.patch)
    torch._dynamo.reset()
    teardown = restoring(remove, unet, key)
    advance(key)
    try:
        compile_unet(unet, config.compile_backend, config.compile_mode)
        apply()
        calls = step_calls(method, unet, inputs, schedule)
        expected = expected_phases(method, schedule)
        graphs, breaks = _dynamo_counts()
        try:
            row.compile_s = 0.0
            for fn, _ in calls:  # the first call of each phase compiles it
                with Timer(plan.device) as timer:
                    fn()
                row.compile_s += timer.seconds
            now = _dynamo_counts()
            row.graphs, row.graph_breaks = now[0] - graphs, now[1] - breaks
        except Exception as error:
            if method.kind != "tomesd":
                raise
            row.compile_s = None
            row.note = f"tomesd does not compile: {summary(error, 160)}"
            return row
        if expected is not None:
            ran = agentsd.phase_history(unet, per_call=True)[-len(calls):]
            if ran != expected:
                raise RuntimeError(f"compiled {method.name} ran the phases {ran}, expected {expected}")
        advance(key)
        measured = Measurement()
        for round_index in range(config.warmup + config.repeats):
            if round_index >= config.warmup:
                measured.time_round(calls, plan.device, lambda: advance(key))
                continue
            for fn, _ in calls:
                if round_index == config.warmup - 1:  # memory probed in the last warm-up round
                    with PeakMemory(plan.device) as probe:
                        fn()
                        synchronize(plan.device)
                    if probe.added is not None:
                        row.peak_bytes = max(row.peak_bytes or 0, probe.added)
                else:
                    fn()
                advance(key)
        row.step_s, row.rounds = measured.median, measured.times
        if plan.device.type in ASYNC_DEVICES:
            row.host_share = measured.host_share
        return row
    finally:
        uncompile_unet(unet)
        teardown()
        torch._dynamo.reset()


def calls_per_method(method: Method, schedule: list[Phase], plan: Plan) -> int:
    """Progress-bar units of :func:`compiled_row`."""
    calls = len(schedule) if method.kind == "agentsd" else 1
    return 2 + (plan.config.warmup + plan.config.repeats) * calls
