"""Prompts: prompt files, read alike by every tool (UTF-8, one prompt a line, blank lines skipped),
and the ImageNet-1k class prompts of an evaluation."""

from __future__ import annotations

import os
import re
from importlib import resources

from agentsd.tools.errors import UsageError
from agentsd.tools.files import existing_file

IMAGENET = "imagenet"
# Images per method at most: 100,000 is twice the 50,000 of a standard FID, and names stay 5 digits.
MAX_IMAGES = 100_000
DEFAULT_TEMPLATE = "a photo of a {name}"
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


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names, in class-index order (the first WordNet lemma of each class)."""
    data = resources.files("agentsd.tools.evaluate").joinpath("data/imagenet_classes.txt")
    text = data.read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_prompts(source: str, num_images: int, template: str = DEFAULT_TEMPLATE) -> list[str]:
    """The prompt of each of ``num_images`` images (in [1, :data:`MAX_IMAGES`]): image ``i`` gets
    prompt ``i % len(prompts)``.

    Args:
        source: ``"imagenet"`` for ``template`` (a format string with a ``{name}`` field) filled with
            each ImageNet-1k class name (2000 images give two per class, the paper's setting), or a
            prompt file (:func:`read_prompt_file`; e.g. COCO captions).

    Raises:
        UsageError: ``num_images`` out of range, a bad prompt file or template.
    """
    if not 1 <= num_images <= MAX_IMAGES:
        raise UsageError(f"--num-images must be between 1 and {MAX_IMAGES} (at most), got {num_images}")
    if source == IMAGENET:
        if "{name}" not in template:
            raise UsageError(f"prompt template {template!r} has no {{name}} field for the class name")
        try:
            base = [template.format(name=name) for name in imagenet_classes()]
        except (KeyError, IndexError, ValueError) as e:
            raise UsageError(f"prompt template {template!r} is not a valid format string ({e})") from None
    else:
        base = read_prompt_file(source)
    return [base[i % len(base)] for i in range(num_images)]
