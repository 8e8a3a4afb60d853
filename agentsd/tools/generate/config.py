"""``agentsd generate``'s settings (:class:`GenerateConfig`) and every check that needs no model."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import agentsd
from agentsd.tools import files, options
from agentsd.tools.errors import UsageError, user_input
from agentsd.tools.options import Options
from agentsd.tools.prompts import read_prompt_file

MODES = ("agentsd", "original", "compare")
# the variants each mode makes, in the order they are made
VARIANTS = {"agentsd": ("agentsd",), "original": ("original",), "compare": ("original", "agentsd")}
DEFAULT_STRENGTH = 0.8


@dataclass(kw_only=True)
class GenerateConfig(Options):
    """Settings of one ``agentsd generate`` run; the defaults are the command line's.

    The options every tool has (model, device, dtype, seed, steps, scheduler, guidance,
    resolution, out, progress) are those of :class:`~agentsd.tools.options.Options`; here image
    ``i`` (counting across prompts from 0) uses ``seed + i``, ``resolution=None`` is the model's
    native size (with an init image, the init image's) and ``out`` is created when the first image
    is saved.

    Attributes:
        prompts: text prompts, made in order (each ``num_images`` times).
        prompt_files: UTF-8 text files with one prompt per line (blank lines skipped), read in
            order after ``prompts``.
        negative_prompt: used for every image; ``None`` = none.
        num_images: images per prompt.
        init_image: image-to-image: the starting image (its EXIF orientation is applied).
        strength: image-to-image: how much of the init image to repaint, in (0, 1]; ``None`` = 0.8.
            Only with ``init_image``.
        mode: ``"agentsd"`` (patched), ``"original"`` (the unpatched baseline) or ``"compare"``
            (both with the same seed, plus a labelled side-by-side grid).
        patch: an :class:`agentsd.AgentSDConfig`, or AgentSD settings (``apply_patch`` keywords)
            of which missing ones take the library's defaults.
        compile: compile the UNet before generating (regional compilation of its transformer
            blocks when diffusers offers it, else ``torch.compile`` of the whole UNet).
    """

    out: str | os.PathLike = "images"
    prompts: Sequence[str] = ()
    prompt_files: Sequence[str | os.PathLike] = ()
    negative_prompt: str | None = None
    num_images: int = 1
    init_image: str | os.PathLike | None = None
    strength: float | None = None
    mode: str = "agentsd"
    patch: Mapping[str, object] | agentsd.AgentSDConfig = field(default_factory=dict)
    compile: bool = False


@dataclass
class Job:
    """One image (one per variant) to make."""

    index: int
    prompt: str
    seed: int


@dataclass
class Plan:
    """Everything checked and resolved before the model is loaded."""

    prompts: list[str]
    num_images: int
    seed: int
    variants: tuple[str, ...]
    init_image: object | None  # a PIL image, already at its final size
    strength: float | None  # with an init image
    size: tuple[int, int] | None  # (width, height); None: the model's native size
    device: torch.device
    dtype: torch.dtype
    patch: dict  # the full apply_patch settings
    out: Path

    @property
    def count(self) -> int:
        """Jobs in the run (each makes one image per variant)."""
        return len(self.prompts) * self.num_images

    def jobs(self) -> Iterator[Job]:
        """The jobs in order, made lazily (a huge ``num_images`` costs no memory up front)."""
        index = 0
        for prompt in self.prompts:
            for _ in range(self.num_images):
                yield Job(index=index, prompt=prompt, seed=self.seed + index)
                index += 1


def read_prompts(config: GenerateConfig) -> list[str]:
    """The run's prompts: ``config.prompts`` then every prompt file's, in order."""
    prompts = [str(p) for p in config.prompts]
    if any(not p.strip() for p in prompts):
        raise UsageError("empty prompt: every prompt needs some text")
    for path in config.prompt_files:
        prompts += read_prompt_file(path)
    if not prompts:
        raise UsageError("no prompt: give prompts as arguments or with --prompt-file")
    return prompts


def read_init_image(path: str | os.PathLike):
    """The init image as an upright RGB PIL image (EXIF orientation applied)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = repr(str(path))
    path = files.existing_file(path, "init image")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except Image.DecompressionBombError:
        raise UsageError(
            f"init image {name} is too large: over {2 * Image.MAX_IMAGE_PIXELS} pixels, Pillow's limit "
            "against decompression bombs; scale it down first"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        reason = "not an image Pillow can read" if isinstance(error, UnidentifiedImageError) else error
        raise UsageError(f"init image {name} cannot be read: {reason}") from None


def _check_image_to_image(config: GenerateConfig) -> float | None:
    """The strength of an image-to-image run, ``None`` without an init image."""
    if config.init_image is None:
        if config.strength is not None:
            raise UsageError("--strength goes with --init-image: without an init image there is nothing "
                             "to repaint")
        return None
    strength = DEFAULT_STRENGTH if config.strength is None else config.strength
    if not 0 < strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {strength}")
    if int(config.steps * strength) < 1:
        raise UsageError(f"--steps {config.steps} x --strength {strength} leaves no denoising step; "
                         "raise one of them")
    return strength


def _init_size(image, config: GenerateConfig, size: tuple[int, int] | None) -> tuple[int, int]:
    width, height = size or (image.width // 8 * 8, image.height // 8 * 8)
    if width < 8 or height < 8:
        raise UsageError(f"init image {str(config.init_image)!r} is smaller than 8x8 pixels")
    return width, height


def prepare(config: GenerateConfig) -> Plan:
    """Check every input that can be checked without the model; raise one-line :class:`UsageError`\\ s.

    Nothing is created on disk.
    """
    if config.mode not in MODES:
        raise UsageError(f"unknown mode {config.mode!r}: use one of {', '.join(MODES)}")
    prompts = read_prompts(config)
    if config.num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {config.num_images}")
    checked = options.check(config, images=len(prompts) * config.num_images)
    strength = _check_image_to_image(config)
    init_image = None
    if config.init_image is not None:
        from PIL import Image

        init_image = read_init_image(config.init_image)
        size = _init_size(init_image, config, checked.size)
        init_image = init_image.resize(size, resample=Image.Resampling.LANCZOS)
    with user_input():  # the library's own messages
        settings = config.patch
        if not isinstance(settings, agentsd.AgentSDConfig):
            agentsd.check_settings(**settings)  # unknown names and ranges, in the library's words
            settings = agentsd.AgentSDConfig(**settings)
        patch = dataclasses.asdict(settings)
    return Plan(prompts, config.num_images, config.seed, VARIANTS[config.mode], init_image, strength,
                checked.size, checked.device, checked.dtype, patch, checked.out)
