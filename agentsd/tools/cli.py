"""The ``agentsd`` command line: one entry point, one module per subcommand.

Each subcommand module exposes ``add_parser(subparsers)`` (registers its flags and sets
``func``) and keeps its work in plain functions. Errors a user can fix are raised as
:class:`UsageError` (or the library's ``ValueError``) and printed here as one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# subcommand name -> module holding it
SUBCOMMANDS = {
    "generate": "agentsd.tools.generate",
    "bench": "agentsd.tools.bench",
    "eval": "agentsd.tools.evaluate",
}


class UsageError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage block before the message)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from agentsd import __version__

    parser = _Parser(
        prog="agentsd",
        description="Agent Attention (AgentSD) for Stable Diffusion: generate, benchmark, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"agentsd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # a subcommand not written yet on this branch
            if e.name != module_name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError) as e:
        if os.environ.get("AGENTSD_DEBUG"):
            raise
        print(f"agentsd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"agentsd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
