"""How the tools fail: the user's mistakes are one line and exit 2; anything else is a bug in agentsd.

- :class:`UsageError` (a ``ValueError``) is a problem the user can fix: a bad flag value, a missing
  or unreadable file, a model that cannot be found, a full disk, a missing optional dependency. The
  CLI prints ``agentsd <command>: error: <message>`` and exits with :data:`EXIT_USAGE`.
- Any other exception, a ``ValueError`` from deep inside numpy or diffusers included, is a bug: the
  CLI says so (how to get the traceback, where to report it) and exits with :data:`EXIT_BUG`; running
  out of memory is the machine's limit (exit 2); Ctrl-C exits 130, SIGTERM 143.

The library's own ``ValueError`` becomes a :class:`UsageError` only around calls that check the
user's input (:func:`user_input`), never around whole runs.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_USAGE = 2
EXIT_BUG = 3
EXIT_INTERRUPTED = 130  # SIGINT, as shells report it
EXIT_TERMINATED = 143  # SIGTERM

DEBUG_ENV = "AGENTSD_DEBUG"
REPORT_TO = "the agentsd issue tracker"

# optional dependencies of each tool, by the pip extra that installs them (see pyproject.toml)
EXTRAS = {
    "bench": ("tomesd", "matplotlib"),
    "eval": ("accelerate", "torchmetrics", "matplotlib"),
}


class UsageError(ValueError):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so ``finally`` blocks remove temporary files.

    A ``BaseException`` (like ``KeyboardInterrupt``) so ``except Exception`` clauses let it pass.
    """


@contextlib.contextmanager
def user_input(prefix: str = "") -> Iterator[None]:
    """Report a ``ValueError`` raised inside the block as the user's mistake (a :class:`UsageError`).

    Wrap only calls that validate what the user gave, e.g. ``agentsd.check_settings(**flags)``.

    Args:
        prefix: put before the message, e.g. ``"--init-image: "``.
    """
    try:
        yield
    except UsageError:
        raise
    except ValueError as error:
        raise UsageError(f"{prefix}{error}") from error


def require_extra(extra: str) -> None:
    """Raise :class:`UsageError` naming the pip extra to install when one of its modules is missing.

    Args:
        extra: a key of :data:`EXTRAS`, e.g. ``"bench"``.
    """
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            raise UsageError(
                f"this command needs the optional dependencies of agentsd[{extra}] ({module} is missing): "
                f"pip install 'agentsd[{extra}]'"
            ) from None


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def summary(error: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` of ``error`` (the type alone if it has none), at most ``limit``
    characters: what a report or a results file says about an error."""
    return (type(error).__name__ + (f": {first_line(error)}" if str(error).strip() else ""))[:limit]


def bug_message(command: str, error: BaseException) -> str:
    """The short text shown for an unexpected exception (a bug in agentsd, not the user's fault)."""
    what = summary(error)
    return (
        f"agentsd {command} stopped on an unexpected {what}\n"
        f"This is a bug in agentsd, not a problem with your input. Run the same command with "
        f"{DEBUG_ENV}=1 to see the full traceback, and report it with that output to {REPORT_TO}."
    )


@contextlib.contextmanager
def terminate_gracefully() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread instead of killing the
    process at once, so cleanup code runs (no ``.tmp`` debris). A no-op outside the main thread."""
    try:
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            raise Terminated()

        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, so a few quick steps run all or not at all
    (e.g. publishing an image and its sidecar); a signal that came meanwhile is delivered on exit.

    Python handlers run in the main thread whichever thread the OS hands the signal to, so the
    handlers are swapped (a thread signal mask would not hold a signal delivered to another
    thread). A no-op outside the main thread, where handlers cannot be set.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum, frame):
        pending.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in pending:
            signal.raise_signal(signum)  # now, to the handler that was there before


def print_error(command: str, message: str) -> None:
    print(f"agentsd {command}: error: {message}", file=sys.stderr)
