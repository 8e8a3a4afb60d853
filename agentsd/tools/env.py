"""The environment a result was made in: package versions and the machine, looked up in one place."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch

# packages whose versions change results; reported in this order when installed
PACKAGES = ("agentsd", "torch", "diffusers", "transformers", "tomesd", "accelerate", "torchmetrics")


def version(package: str) -> str | None:
    """The installed version of ``package``, or ``None`` if it is not installed.

    ``agentsd`` itself reports the imported package's ``__version__`` (a source checkout on
    ``PYTHONPATH`` may differ from the installed metadata).
    """
    if package == "agentsd":
        from agentsd import __version__

        return __version__
    if package == "torch":
        return torch.__version__
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{package: version}`` for the installed ones among ``packages``, plus ``python``."""
    found = {name: v for name in packages if (v := version(name)) is not None}
    found["python"] = platform.python_version()
    return found


def versions_line(packages: tuple[str, ...] = PACKAGES) -> str:
    """E.g. ``"agentsd 0.1.0, torch 2.13.0, diffusers 0.42.1, python 3.11.7"``."""
    return ", ".join(f"{name} {v}" for name, v in versions(packages).items())


def machine_description(device: torch.device | str) -> str:
    """The accelerator (CUDA device name and CUDA version) or the CPU model, cores and torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()}, macOS {platform.mac_ver()[0]})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
