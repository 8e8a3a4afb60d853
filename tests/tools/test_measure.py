"""agentsd.tools.measure: the one synchronize, timer and peak-memory probe of the tools."""

from __future__ import annotations

import time

import pytest
import torch

from agentsd.tools import measure


def test_timer_measures_wall_time_on_cpu_where_the_host_does_the_work():
    with measure.Timer("cpu") as timer:
        time.sleep(0.05)
    assert 0.05 <= timer.host_seconds <= timer.seconds < 1.0


def test_synchronize_waits_for_mps_too(monkeypatch):
    """The old bench copy synchronised CUDA only: MPS timings then measured the launch, not the work."""
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    measure.synchronize("mps")
    measure.synchronize("cpu")
    assert calls == ["mps"]


@pytest.mark.skipif(measure.resident_bytes() is None, reason="needs Linux /proc/self/statm")
def test_peak_memory_sees_a_freed_allocation():
    """The sampler catches memory that is gone again when the probe ends (a step's activations)."""
    with measure.PeakMemory(torch.device("cpu")) as probe:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.05)  # held for 50 sampling intervals
        del block
    assert probe.added is not None and 48 * 2**20 <= probe.added < 256 * 2**20
    assert probe.peak > 50e6 and probe.kind == "process_rss"  # the whole process: torch alone is larger
    with measure.PeakMemory(torch.device("cpu")) as probe:
        pass
    assert probe.added < 16 * 2**20


def test_memory_method_says_what_is_read():
    assert "resident set size" in measure.memory_method("cpu")
    assert "max_memory_allocated" in measure.memory_method("cuda")
    assert "current_allocated_memory" in measure.memory_method("mps")


def test_format_bytes():
    assert measure.format_bytes(3_130_000_000) == "3.13 GB"
    assert measure.format_bytes(512) == "512 B"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: CUDA events and max_memory_allocated")
def test_cuda_timer_and_peak_memory():
    device = torch.device("cuda")
    x = torch.randn(2048, 2048, device=device)
    with measure.PeakMemory(device) as probe, measure.Timer(device) as timer:
        y = x @ x
        del y
    assert timer.seconds > 0
    assert probe.added >= 2048 * 2048 * 4 and probe.kind == "cuda_max_allocated"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the GPU runs after the host has issued")
def test_cuda_timer_tells_the_host_time_from_the_device_time():
    """host_seconds is what bench's host % reads: small for a kernel the GPU takes long over, all of
    the time for a host that issues slowly."""
    device = torch.device("cuda")
    with measure.Timer(device) as gpu_bound:
        torch.cuda._sleep(200_000_000)  # one kernel spinning ~0.1 s on the GPU
    assert gpu_bound.seconds > 0.02 and gpu_bound.host_seconds < 0.2 * gpu_bound.seconds
    x = torch.ones(8, device=device)
    with measure.Timer(device) as host_bound:
        for _ in range(20):
            x = x + 1
            time.sleep(0.002)
    assert host_bound.host_seconds > 0.9 * host_bound.seconds
