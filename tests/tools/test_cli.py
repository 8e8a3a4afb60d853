"""The top-level command line: one-line errors for malformed flags too."""

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
