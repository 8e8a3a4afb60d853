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
