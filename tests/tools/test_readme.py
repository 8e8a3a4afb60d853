"""The README's command lines and flag tables follow the code (issue 16): every ``agentsd`` command
in its shell examples parses with today's flags, and the shared-options table names the flags each
command has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from agentsd.tools.cli import build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def commands() -> list[str]:
    """Each ``agentsd ...`` line of the README's bash blocks, continuation lines joined."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("agentsd "):
                found.append(line)
    return found


@pytest.mark.parametrize("line", commands())
def test_every_command_in_the_readme_parses(line):
    build_parser().parse_args(shlex.split(line)[1:])  # argparse exits on an unknown or renamed flag


def test_the_shared_options_table_names_each_commands_flags():
    table = README.split("### Options every command shares")[1].split("\n\n")[2]
    flags = re.findall(r"^\| `(--[a-z-]+)", table, flags=re.M)
    assert "--resolution" in flags and "--batch-size" in flags
    parser = build_parser()
    for command in ("generate", "eval", "bench"):
        known = parser._subparsers._group_actions[0].choices[command]._option_string_actions
        for flag in flags:
            assert flag in known or (flag == "--batch-size" and command == "generate"), (command, flag)
    assert len(commands()) >= 10
