"""Writing generated images: numbered names that never overwrite, image + sidecar units, comparison grids."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from agentsd.tools import files

# the files generate numbers: NNNNN-<seed>-<slug><suffix>, five digits or more
_NUMBERED = re.compile(r"^(\d{5,})--?\d+-[a-z0-9-]*\.(?:png|json)$")


def slug(text: str, length: int = 40) -> str:
    """A file-name-safe lowercase excerpt: ``"A photo, of a corgi!"`` -> ``a-photo-of-a-corgi``."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:length].rstrip("-") or "image"


class OutputFolder:
    """A folder of numbered result groups (``00001-<name>.png``, ``00001-<name>.json``, ...).

    A group takes the number after the highest in the folder, whoever wrote it, chosen and published
    under the folder's lock (:func:`agentsd.tools.files.folder_lock`): two runs writing into one folder
    at once never share a number. Numbers have five digits or more, without limit. Nothing is
    overwritten, half-written or orphaned (:mod:`agentsd.tools.files`); temporary files of killed
    runs are removed when the folder is opened.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder).expanduser()
        self.path.mkdir(parents=True, exist_ok=True)
        files.remove_stale_temporaries(self.path)

    def new_stem(self, name: str) -> str:
        """``NNNNN-name`` with the number after the highest in the folder (hold the folder's lock)."""
        numbers = [int(m.group(1)) for f in os.listdir(self.path) if (m := _NUMBERED.match(f))]
        return f"{max(numbers, default=0) + 1:05d}-{name}"

    def save_new_group(self, name: str, parts: Callable[[str], Sequence[tuple[str, files.Data]]]) -> str:
        """Publish ``parts(stem)`` (``(suffix, data)`` pairs, one unit) under a new number; returns the
        stem, for the group's later files (e.g. a comparison grid)."""
        while True:
            with files.folder_lock(self.path):
                stem = self.new_stem(name)
                try:
                    files.write_unit([(self.path / (stem + suffix), data) for suffix, data in parts(stem)])
                except FileExistsError:  # a writer that does not take the lock got there first
                    continue
            return stem


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """Images side by side, each under a strip with its label (e.g. ``"AgentSD  1.54 s"``).

    A cell is as wide as its image or its label, whichever is wider, so small images stay readable.
    """
    height = max(image.height for image in images)
    font = _font(max(12, min(32, height // 20)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), label, font=font) for label in labels]
    strip = max(box[3] for box in boxes) + 8
    widths = [max(image.width, box[2] + 8) for image, box in zip(images, boxes, strict=True)]
    grid = Image.new("RGB", (sum(widths), height + strip), "white")
    draw = ImageDraw.Draw(grid)
    x = 0
    for image, label, width in zip(images, labels, widths, strict=True):
        grid.paste(image.convert("RGB"), (x + (width - image.width) // 2, strip))
        draw.text((x + 4, 4), label, fill="black", font=font)
        x += width
    return grid
