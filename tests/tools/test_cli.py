"""The top-level command line: one-line errors for malformed flags too."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentsd.tools.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--steps", "abc", "a cat"],
        ["generate", "--scheduler", "nope", "x"],
        [],
        ["no-such-command"],
    ],
)
def test_malformed_command_lines_give_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err and "Traceback" not in err


def _raise_from_numpy(args):
    import numpy as np

    return np.ones(6) + np.ones(8)  # a ValueError from deep inside a library: a bug, not the user's


def test_unexpected_error_is_reported_as_a_bug_not_a_usage_error(monkeypatch, capsys):
    from agentsd.tools.generate import command

    monkeypatch.delenv("AGENTSD_DEBUG", raising=False)
    monkeypatch.setattr(command, "run", _raise_from_numpy)
    rc = main(["generate", "a cat"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "bug in agentsd" in err and "AGENTSD_DEBUG=1" in err and "report" in err
    assert "generate: error:" not in err and "Traceback" not in err


def test_debug_environment_variable_shows_the_traceback(monkeypatch):
    from agentsd.tools.generate import command

    monkeypatch.setenv("AGENTSD_DEBUG", "1")
    monkeypatch.setattr(command, "run", _raise_from_numpy)
    with pytest.raises(ValueError, match="broadcast"):
        main(["generate", "a cat"])


@pytest.mark.parametrize(("command", "missing"), [("bench", "tomesd"), ("eval", "torchmetrics")])
def test_tool_without_its_extra_names_the_extra_in_one_line(command, missing, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: importing it fails
    rc = main([command, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"pip install 'agentsd[{command}]'" in err and missing in err
    assert not (tmp_path / "out").exists()


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "agentsd", "--version"], capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert result.returncode == 0 and result.stdout.startswith("agentsd ")


BLOCK_EXTRAS = (
    "import sys\n"
    "for name in {blocked!r}:\n"  # as if only the core dependencies were installed
    "    sys.modules[name] = None\n"
    "from agentsd.tools.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
# accelerate stays: diffusers decides it is installed from its package metadata, which a blocked
# import cannot hide, and then imports it (without accelerate installed, diffusers does not)
EXTRA_MODULES = ("tomesd", "torchmetrics", "matplotlib", "torch_fidelity", "scipy")


def test_core_install_runs_generate_and_names_the_extra_for_the_others(tiny_sd_dir, tmp_path):
    code = BLOCK_EXTRAS.format(blocked=EXTRA_MODULES)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}

    def agentsd(*args):
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                              timeout=300, check=False)

    made = agentsd("generate", "a cat", "--model", str(tiny_sd_dir), "--steps", "1",
                   "--out", str(tmp_path / "images"))
    assert made.returncode == 0, made.stderr
    assert sorted(os.listdir(tmp_path / "images")) == ["00001-0-a-cat.json", "00001-0-a-cat.png"]
    for command, extra in (("bench", "bench"), ("eval", "eval")):
        refused = agentsd(command, "--out", str(tmp_path / command))
        assert refused.returncode == 2
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert f"pip install 'agentsd[{extra}]'" in refused.stderr


@pytest.mark.parametrize("error", ["torch", "host"])
def test_out_of_memory_is_one_line_not_a_bug(error, monkeypatch, capsys):
    import torch

    from agentsd.tools.generate import command

    def run(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB") if error == "torch" \
            else MemoryError()

    monkeypatch.delenv("AGENTSD_DEBUG", raising=False)
    monkeypatch.setattr(command, "run", run)
    assert main(["generate", "a cat"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("agentsd generate: error: out of ")
    assert "bug" not in err


def _allocate_too_much(args):
    import torch

    return torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator refuses: a RuntimeError, not a bug


def test_the_cpu_allocator_refusing_is_out_of_memory_not_a_bug(monkeypatch, capsys):
    from agentsd.tools.generate import command

    monkeypatch.delenv("AGENTSD_DEBUG", raising=False)
    monkeypatch.setattr(command, "run", _allocate_too_much)
    assert main(["generate", "a cat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agentsd generate: error: out of host memory") and err.count("\n") == 1, err
    assert "4611686018427387904 bytes" in err or "4.6 EB" in err
