"""Image files of an evaluation: completeness checks, loading folders as tensors (writing goes
through :mod:`agentsd.tools.files`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from agentsd.tools.errors import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def image_path(folder: Path, index: int) -> Path:
    """Path of image ``index`` of a method: ``folder/00042.png`` (zero-padded so names sort)."""
    return Path(folder) / f"{index:05d}.png"


def is_complete_png(path: Path, size: tuple[int, int] | None = None) -> bool:
    """True if ``path`` is a PNG that decodes completely (and has ``size`` = (width, height) if given)."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or (size is not None and im.size != tuple(size)):
                return False
            im.load()  # decodes every row: a truncated file raises here
        return True
    except READ_ERRORS:
        return False


def missing_indices(folder: Path, count: int, size: tuple[int, int]) -> list[int]:
    """Indices in ``range(count)`` whose image in ``folder`` is absent, unreadable or of another size.

    Raises:
        UsageError: something that is not a file stands where an image goes (e.g. a folder named
            ``00003.png``): it cannot be replaced without losing what it holds.
    """
    missing = []
    for i in range(count):
        path = image_path(folder, i)
        if path.exists() and not path.is_file():
            raise UsageError(f"{path} is a folder (or another non-file) where image {i} goes: move it away")
        if not is_complete_png(path, size):
            missing.append(i)
    return missing


def list_images(folder: Path) -> list[Path]:
    """Files with an image suffix under ``folder`` (recursively, hidden files skipped), sorted."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def to_uint8_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A ``(3, H, W)`` uint8 tensor of an image; with ``size`` = (width, height), center-cropped to its
    aspect ratio and resized (bicubic) to it, so real images of any shape batch with generated ones."""
    image = image.convert("RGB")
    if size is not None and image.size != tuple(size):
        image = ImageOps.fit(image, tuple(size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def load_uint8(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Image file ``path`` as a ``(3, H, W)`` uint8 tensor (see :func:`to_uint8_tensor`).

    Raises:
        UsageError: the file is missing or cannot be decoded (one line naming it).
    """
    try:
        with Image.open(path) as im:
            return to_uint8_tensor(im, size)
    except READ_ERRORS as e:
        raise UsageError(f"cannot read image {path}: {e}") from None


def iter_batches(
    paths: Sequence[Path], batch_size: int, size: tuple[int, int] | None = None
) -> Iterator[tuple[torch.Tensor, list[Path]]]:
    """Yield ``(uint8 tensor (B, 3, H, W), files that failed to decode)`` batches of ``paths``.

    Every file is decoded completely (a truncated JPEG passes Pillow's ``verify`` but fails here);
    one that fails is skipped and named rather than stopping a long evaluation.
    """
    batch: list[torch.Tensor] = []
    skipped: list[Path] = []
    for path in paths:
        try:
            batch.append(load_uint8(path, size))
        except UsageError:
            skipped.append(path)
            continue
        if len(batch) == batch_size:
            yield torch.stack(batch), skipped
            batch, skipped = [], []
    if batch or skipped:
        yield (torch.stack(batch) if batch else torch.empty(0, 3, 0, 0, dtype=torch.uint8)), skipped
