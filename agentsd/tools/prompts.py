"""Prompt files, read alike by every tool: UTF-8, one prompt a line, blank lines skipped."""

from __future__ import annotations

import os
import re

from agentsd.tools.errors import UsageError
from agentsd.tools.files import existing_file

_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # only these end a prompt: not U+2028, U+0085 or form feed


def split_prompts(text: str) -> list[str]:
    """The prompts in a prompt file's text: one per line, blank lines skipped.

    Only ``\\n``, ``\\r\\n`` and ``\\r`` end a line: other Unicode line breaks inside a line
    (U+2028, U+0085, form feed) stay part of its prompt.
    """
    return [line.strip() for line in _LINE_BREAK.split(text) if line.strip()]


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts of one prompt file (UTF-8, an optional byte-order mark is dropped).

    Raises:
        UsageError: the file is missing, not a regular file, unreadable, not UTF-8 or has no prompt.
    """
    name = repr(str(path))
    path = existing_file(path, "prompt file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"prompt file {name} is not UTF-8 text") from None
    except OSError as error:
        raise UsageError(f"prompt file {name} cannot be read: {error.strerror}") from None
    prompts = split_prompts(text)
    if not prompts:
        why = "it is empty" if not text else "it has only blank lines"
        raise UsageError(f"prompt file {name} has no prompts: {why}")
    return prompts
