"""agentsd.tools.errors: which errors are the user's, extras, signals held around a unit of work."""

import os
import signal
import sys

import pytest

from agentsd.tools import errors
from agentsd.tools.errors import UsageError


def test_user_input_turns_only_value_errors_into_usage_errors():
    with pytest.raises(UsageError, match="^--ratio: ratio must be in"), errors.user_input("--ratio: "):
        raise ValueError("ratio must be in [0, 1), got 2")
    with pytest.raises(KeyError), errors.user_input():
        raise KeyError("a bug stays a bug")
    assert issubclass(UsageError, ValueError)  # Python callers may catch either


def test_require_extra(monkeypatch):
    errors.require_extra("eval")  # installed here (the dev extra): no error
    monkeypatch.setitem(sys.modules, "tomesd", None)
    message = r"agentsd\[bench\] \(tomesd is missing\): pip install 'agentsd\[bench\]'"
    with pytest.raises(UsageError, match=message):
        errors.require_extra("bench")


def test_signals_are_held_until_the_unit_is_done():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with errors.signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("first")  # the interrupt waits...
            done.append("second")
    assert done == ["first", "second"]  # ...until both steps ran
