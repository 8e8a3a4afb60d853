"""agentsd.tools.env: one version lookup and the machine description."""

import platform

import torch

import agentsd
from agentsd.tools import env


def test_versions_report_the_running_packages():
    found = env.versions()
    assert found["agentsd"] == agentsd.__version__ and found["torch"] == torch.__version__
    assert found["python"] == platform.python_version()
    assert env.version("no-such-package-xyz") is None
    assert env.versions_line(("agentsd",)).startswith(f"agentsd {agentsd.__version__}, python ")


def test_machine_description_names_cpu_threads():
    assert f"{torch.get_num_threads()} torch threads" in env.machine_description("cpu")
