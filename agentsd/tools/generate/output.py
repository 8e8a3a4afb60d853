"""Writing generated images: numbered names that never overwrite, atomic files, comparison grids."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_NUMBERED = re.compile(r"^(\d{5})-")


def check_output_folder(folder: str | os.PathLike) -> None:
    """Raise ``ValueError`` unless ``folder`` exists as a writable folder or can be created.

    Nothing is created: the nearest existing ancestor is probed with a temporary file (which also
    catches read-only file systems, where permission bits alone would say yes to root).
    """
    path = Path(folder).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        if probe == path:
            raise ValueError(f"output folder {str(folder)!r} is a file, not a folder")
        raise ValueError(f"output folder {str(folder)!r} cannot be created: {str(probe)!r} is a file")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        reason = error.strerror or error
        raise ValueError(f"output folder {str(folder)!r} is not writable: {reason}") from None


def slug(text: str, length: int = 40) -> str:
    """A file-name-safe lowercase excerpt: ``"A photo, of a corgi!"`` -> ``a-photo-of-a-corgi``."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:length].rstrip("-") or "image"


class OutputFolder:
    """A folder of numbered result groups (``00001-<name>.png``, ``00001-<name>.json``, ...).

    Numbers continue after the highest one already in the folder and files are published with a
    hard link, which fails instead of replacing an existing file, so nothing is ever overwritten,
    even by two runs writing into one folder at once. Each file is written to a temporary name
    first: an interrupted run leaves no half-written image.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder).expanduser()
        self.path.mkdir(parents=True, exist_ok=True)
        numbers = [int(m.group(1)) for f in os.listdir(self.path) if (m := _NUMBERED.match(f))]
        self._next = max(numbers, default=0) + 1

    def new_stem(self, name: str, suffixes: Sequence[str] = (".png", ".json")) -> str:
        """The next ``NNNNN-name`` stem for which no ``stem + suffix`` exists yet."""
        while True:
            stem = f"{self._next:05d}-{name}"
            self._next += 1
            if not any((self.path / (stem + s)).exists() for s in suffixes):
                return stem

    def _publish(self, write, filename: str) -> Path:
        final = self.path / filename
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{filename}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            try:
                os.link(tmp, final)  # fails if final exists: never replaces a file
            except FileExistsError:
                raise
            except OSError:  # no hard links on this file system: check, then rename
                if final.exists():
                    raise FileExistsError(final) from None
                os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return final

    def save_image(self, image: Image.Image, filename: str) -> Path:
        """Write ``image`` as PNG to ``filename`` in the folder; ``FileExistsError`` if it exists."""
        return self._publish(lambda tmp: image.save(tmp, format="PNG"), filename)

    def save_json(self, data: dict, filename: str) -> Path:
        """Write ``data`` as indented JSON to ``filename``; ``FileExistsError`` if it exists."""

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False, default=str)
                f.write("\n")

        return self._publish(write, filename)


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
