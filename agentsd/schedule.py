"""Where a UNet call stands in its denoising: the step and progress of its timestep.

Pipelines pass the UNet an element of ``scheduler.timesteps``. Its index there (the storage offset: no
value is read) gives the step, once the schedule tensor itself has been read, which happens once per
schedule (cached by weak reference). Any other timestep is placed by value, ``p = 1 - t / T``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Schedule:
    """A scheduler's ``timesteps`` tensor, read once: the UNet calls it holds and the steps they make."""

    ref: weakref.ref
    offset: int
    calls: int
    steps: int

    def progress(self, index: int) -> float:
        """Progress in [0, 1) of call ``index``: its step over the step count. Schedulers with several
        calls per step (Heun, KDPM2, PNDM's doubled first step) spread them evenly over the steps."""
        return index * self.steps // self.calls / self.steps


class Locator:
    """Places the timesteps of UNet calls in their schedules.

    Args:
        pipeline: the pipeline that was patched, if any (kept by weak reference). When its scheduler
            holds a schedule, the scheduler's ``num_inference_steps`` gives the step count: KDPM2
            makes the two calls of a step at distinct timesteps, which the values alone cannot tell.
            Its ``num_train_timesteps`` is ``T`` of the placement by value (default 1000).
    """

    def __init__(self, pipeline=None):
        self.pipeline = None if pipeline is None else weakref.ref(pipeline)
        config = getattr(getattr(pipeline, "scheduler", None), "config", None)
        self.num_train_timesteps = getattr(config, "num_train_timesteps", None) or 1000
        self._read: dict[int, Schedule] = {}

    def __getstate__(self):
        return {**self.__dict__, "pipeline": None, "_read": {}}

    def locate(self, timestep) -> tuple[Schedule | None, list[float]]:
        """``(schedule, [progress])`` of an element of a schedule; else ``(None, progress of each distinct
        value)``, with progress in [0, 1)."""
        if torch.is_tensor(timestep) and timestep._base is not None and timestep.numel():
            schedule = self._schedule(timestep._base)
            index = -1 if schedule is None else timestep.storage_offset() - schedule.offset
            if 0 <= index < schedule.calls:
                return schedule, [schedule.progress(index)]
        values = timestep.detach().reshape(-1).unique().tolist() if torch.is_tensor(timestep) else [timestep]
        return None, [min(max(1.0 - float(v) / self.num_train_timesteps, 0.0), 1.0 - 1e-9) for v in values]

    def _schedule(self, base: torch.Tensor) -> Schedule | None:
        schedule = self._read.get(id(base))
        if schedule is None or schedule.ref() is not base:
            self._read = {key: s for key, s in self._read.items() if s.ref() is not None}
            schedule = self._read[id(base)] = self._read_schedule(base)
        return schedule if schedule.calls else None

    def _read_schedule(self, base: torch.Tensor) -> Schedule:
        values = base.detach().float().cpu() if base.ndim == 1 and base.stride(0) == 1 else base.new_empty(0)
        # A schedule falls; equal values throughout are a batch of per-sample timesteps, not steps.
        steps, falls = 0, len(values) and bool((values[1:] <= values[:-1]).all())
        if not falls or (len(values) > 1 and bool((values == values[0]).all())):
            return Schedule(weakref.ref(base), 0, 0, 0)
        scheduler = getattr(self.pipeline() if self.pipeline else None, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if torch.is_tensor(timesteps) and timesteps.device == base.device and (
            timesteps.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        ):
            steps = getattr(scheduler, "num_inference_steps", None) or 0
        steps = min(steps or len(torch.unique_consecutive(values)), len(values))
        return Schedule(weakref.ref(base), base.storage_offset(), len(values), steps)
