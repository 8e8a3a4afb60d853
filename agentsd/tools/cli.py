"""The ``agentsd`` command line: one entry point, one folder per subcommand.

Every subcommand has the same shape, in its own package ``agentsd/tools/<name>/``:

- a **config dataclass** (``GenerateConfig``, ``EvalConfig``, ...) inheriting the shared options
  (:mod:`agentsd.tools.options`), every field with its default and its flag; checking it needs no model;
- a **Python API** ``run_<name>(config)`` that checks the config (raising
  :class:`~agentsd.tools.errors.UsageError` for the user's mistakes, before any model loads),
  does the work and returns a result object; it never prints errors or calls ``sys.exit``;
- a thin **CLI layer**: ``add_parser(subparsers)`` registers the command with its flags built from
  the config's fields and ``func=run`` (``options.add_command``); ``run(args) -> int`` turns ``args`` into the
  config (``config_from_args``), calls ``run_<name>`` and prints the summary.

The package's ``__init__`` exports those four names. A subcommand that needs an optional
dependency declares its pip extra in :data:`SUBCOMMANDS`; :func:`main` checks it before running
(``run_<name>`` should call :func:`~agentsd.tools.errors.require_extra` first too, for Python callers).
How errors are reported: :mod:`agentsd.tools.errors`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence

from agentsd.tools.errors import (
    DEBUG_ENV,
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Terminated,
    UsageError,
    bug_message,
    print_error,
    require_extra,
    terminate_gracefully,
)

# subcommand name -> (package holding it, pip extra it needs or None)
SUBCOMMANDS = {
    "generate": ("agentsd.tools.generate", None),
    "bench": ("agentsd.tools.bench", "bench"),
    "eval": ("agentsd.tools.evaluate", "eval"),
}

__all__ = ["main", "build_parser", "UsageError", "SUBCOMMANDS"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage block before the message)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from agentsd import __version__

    parser = _Parser(
        prog="agentsd",
        description="Agent Attention (AgentSD) for Stable Diffusion: generate, benchmark, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"agentsd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name, _extra in SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``agentsd`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command
    debug = bool(os.environ.get(DEBUG_ENV))
    try:
        with terminate_gracefully():
            extra = SUBCOMMANDS[command][1]
            if extra is not None:
                require_extra(extra)
            return int(args.func(args) or 0)
    except UsageError as error:
        if debug:
            raise
        print_error(command, " ".join(str(error).split()) or type(error).__name__)
        return EXIT_USAGE
    except MemoryError as error:  # torch.OutOfMemoryError is not one: see _is_out_of_memory
        return _out_of_memory(command, error, debug)
    except KeyboardInterrupt:
        print(f"agentsd {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"agentsd {command}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as error:
        if _is_out_of_memory(error):
            return _out_of_memory(command, error, debug)
        if debug:
            raise
        print(bug_message(command, error), file=sys.stderr)
        return EXIT_BUG


# torch's CPU allocator refuses with a RuntimeError, e.g. "DefaultCPUAllocator: can't allocate memory: you
# tried to allocate 4611686018427387904 bytes"; the number is the request that did not fit
_CPU_ALLOCATOR = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or bool(_CPU_ALLOCATOR.search(str(error)))


def _out_of_memory(command: str, error: BaseException, debug: bool) -> int:
    """Running out of memory is the machine's limit, not a bug: one line saying what did not fit."""
    if debug:
        raise error
    device = "GPU" if type(error).__name__ == "OutOfMemoryError" else "host"
    request = _CPU_ALLOCATOR.search(str(error))
    what = f" (an allocation of {int(request.group(1))} bytes was refused)" if request else ""
    print_error(command, f"out of {device} memory{what}; use a smaller size or batch, fewer images per run, "
                "or fp16 on a GPU")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
