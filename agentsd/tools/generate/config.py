"""``agentsd generate``'s settings (:class:`GenerateConfig`) and every check that needs no model."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import agentsd
from agentsd.tools import files, loading
from agentsd.tools.errors import UsageError, user_input

MODES = ("agentsd", "original", "compare")
# the variants each mode makes, in the order they are made
VARIANTS = {"agentsd": ("agentsd",), "original": ("original",), "compare": ("original", "agentsd")}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # only these end a prompt: not U+2028, U+0085 or form feed


@dataclass
class GenerateConfig:
    """Settings of one ``agentsd generate`` run; the defaults are the command line's.

    Attributes:
        prompts: text prompts, made in order (each ``num_images`` times).
        prompt_files: UTF-8 text files with one prompt per line (blank lines skipped), read in
            order after ``prompts``.
        negative_prompt: used for every image; ``None`` = none.
        num_images: images per prompt.
        seed: image ``i`` (counting across prompts from 0) uses ``seed + i``.
        steps: denoising steps (50 recommended, as the paper).
        guidance: classifier-free guidance scale; ``None`` = the pipeline's (7.5 SD, 5 SDXL).
        height, width: pixels, multiples of 8; ``None`` = the model's native size (with an
            init image, the init image's).
        scheduler: a name of :data:`agentsd.tools.loading.SCHEDULERS` (``"pndm"`` = PLMS, the
            paper's) or ``None`` for the model's own.
        dtype: ``"auto"`` (fp16 on CUDA, else fp32), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        model: hub id or local diffusers pipeline folder.
        out: output folder; created when the first image is saved.
        init_image: image-to-image: the starting image (its EXIF orientation is applied).
        strength: image-to-image: how much of the init image to repaint, in (0, 1].
        mode: ``"agentsd"`` (patched), ``"original"`` (the unpatched baseline) or ``"compare"``
            (both with the same seed, plus a labelled side-by-side grid).
        patch: an :class:`agentsd.AgentSDConfig`, or AgentSD settings (``apply_patch`` keywords)
            of which missing ones take the library's defaults.
        compile: compile the UNet before generating (regional compilation of its transformer
            blocks when diffusers offers it, else ``torch.compile`` of the whole UNet).
        progress: show progress bars.
    """

    prompts: Sequence[str] = ()
    prompt_files: Sequence[str | os.PathLike] = ()
    negative_prompt: str | None = None
    num_images: int = 1
    seed: int = 0
    steps: int = 50
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    model: str = loading.DEFAULT_MODEL
    out: str | os.PathLike = "images"
    init_image: str | os.PathLike | None = None
    strength: float = 0.8
    mode: str = "agentsd"
    patch: Mapping[str, object] | agentsd.AgentSDConfig = field(default_factory=dict)
    compile: bool = False
    progress: bool = True


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


def split_prompts(text: str) -> list[str]:
    """The prompts in a prompt file's text: one per line, blank lines skipped.

    Only ``\\n``, ``\\r\\n`` and ``\\r`` end a line: other Unicode line breaks inside a line
    (U+2028, U+0085, form feed) stay part of its prompt.
    """
    return [line.strip() for line in _LINE_BREAK.split(text) if line.strip()]


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts of one prompt file (UTF-8, an optional byte-order mark is dropped)."""
    name = repr(str(path))
    path = files.existing_file(path, "prompt file")
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


def _check_size(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or value <= 0 or value % 8):
        raise UsageError(f"--{name} must be a positive multiple of 8, got {value}")


def _check_numbers(config: GenerateConfig, count: int) -> None:
    if config.num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {config.num_images}")
    if config.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {config.steps}")
    if config.guidance is not None and not math.isfinite(config.guidance):
        raise UsageError(f"--guidance must be a finite number, got {config.guidance}")
    low, high = SEED_RANGE
    if not low <= config.seed <= high - (count - 1):
        last = "" if count == 1 else f" (image i uses seed + i, up to seed + {count - 1})"
        raise UsageError(f"--seed must be in [{low}, {high - (count - 1)}]{last}, got {config.seed}")
    _check_size("height", config.height)
    _check_size("width", config.width)
    if config.init_image is not None:
        if not 0 < config.strength <= 1:
            raise UsageError(f"--strength must be in (0, 1], got {config.strength}")
        if int(config.steps * config.strength) < 1:
            raise UsageError(
                f"--steps {config.steps} x --strength {config.strength} leaves no denoising step; "
                "raise one of them"
            )


def _init_size(image, config: GenerateConfig) -> tuple[int, int]:
    width = config.width or image.width // 8 * 8
    height = config.height or image.height // 8 * 8
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
    _check_numbers(config, len(prompts) * max(config.num_images, 1))
    init_image = None
    if config.init_image is not None:
        from PIL import Image

        init_image = read_init_image(config.init_image)
        init_image = init_image.resize(_init_size(init_image, config), resample=Image.Resampling.LANCZOS)
    files.check_writable_folder(config.out)
    device = loading.resolve_device(config.device)
    dtype = loading.resolve_dtype(config.dtype, device)
    if config.scheduler is not None:
        loading.scheduler_class(config.scheduler)
    variants = VARIANTS[config.mode]
    with user_input():  # the library's own messages
        settings = config.patch
        if not isinstance(settings, agentsd.AgentSDConfig):
            agentsd.check_settings(**settings)  # unknown names and ranges, in the library's words
            settings = agentsd.AgentSDConfig(**settings)
        patch = dataclasses.asdict(settings)
    loading.check_model_reference(config.model)
    return Plan(prompts, config.num_images, config.seed, variants, init_image, device, dtype, patch,
                Path(config.out).expanduser())
