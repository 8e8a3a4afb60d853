"""``agentsd generate``'s settings (:class:`GenerateConfig`) and every check that needs no model."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import agentsd
from agentsd.tools import files, options
from agentsd.tools.errors import UsageError, user_input
from agentsd.tools.loading import COMPILE_MODE_HELP, COMPILE_MODES, check_compile_mode
from agentsd.tools.options import Checked, Options, option
from agentsd.tools.prompts import read_prompt_file

MODES = ("agentsd", "original", "compare")
# the variants each mode makes, in the order they are made
VARIANTS = {"agentsd": ("agentsd",), "original": ("original",), "compare": ("original", "agentsd")}
DEFAULT_STRENGTH = 0.8


@dataclass(kw_only=True)
class GenerateConfig(Options):
    """Settings of one ``agentsd generate`` run: the shared :class:`~agentsd.tools.options.Options`
    (image ``i``, counting across prompts from 0, uses ``seed + i``; ``resolution=None`` is the
    model's native size, or the init image's) and generate's own; each field's ``help`` says what it
    means, the defaults are the command line's."""

    out: str | os.PathLike = "images"
    prompts: Sequence[str] = option((), "text prompt(s)", flag="prompts", nargs="*", metavar="PROMPT")
    prompt_files: Sequence[str | os.PathLike] = option(
        help="UTF-8 text file with one prompt per line (blank lines are skipped), read after the PROMPTs; "
        "may be repeated", default_factory=list, flag="--prompt-file", action="append", type=Path,
        metavar="FILE")
    negative_prompt: str | None = option(None, "negative prompt, used for every image", metavar="TEXT")
    images_per_prompt: int = option(1, "images per prompt, at least 1 (eval's --num-images counts the images "
                                    "of each method)", type=int, metavar="N")
    init_image: str | os.PathLike | None = option(None, "image-to-image: the starting image (its EXIF "
                                                  "orientation is applied)", type=Path, metavar="FILE")
    strength: float | None = option(None, "image-to-image: how much of the init image to repaint, in (0, 1]; "
                                    "only with --init-image", type=float, metavar="S", default_text="0.8")
    compile: bool = option(
        False, "compile the UNet before generating (regional compilation of its transformer blocks where "
        "diffusers offers it, else the whole UNet); an untimed warm-up pays for compiling")
    compile_mode: str = option("default", COMPILE_MODE_HELP, choices=COMPILE_MODES)
    # mapped by the command line itself: --no-patch / --compare, and the patch flags
    mode: str = "agentsd"  # "agentsd" (patched), "original" (unpatched) or "compare" (both, and a grid)
    patch: Mapping[str, object] | agentsd.AgentSDConfig = field(default_factory=dict)  # apply_patch settings


@dataclass
class Job:
    """One image (one per variant) to make."""

    index: int
    prompt: str
    seed: int


@dataclass(kw_only=True)
class Plan(Checked):
    """Everything checked and resolved before the model is loaded."""

    config: GenerateConfig
    prompts: list[str]
    variants: tuple[str, ...]
    init_image: object | None  # a PIL image, already at its final size
    strength: float | None  # with an init image
    patch: dict  # the full apply_patch settings

    @property
    def count(self) -> int:
        """Jobs in the run (each makes one image per variant)."""
        return len(self.prompts) * self.config.images_per_prompt

    def jobs(self) -> Iterator[Job]:
        """The jobs in order, made lazily (a huge ``images_per_prompt`` costs no memory up front)."""
        for index in range(self.count):
            yield Job(index, self.prompts[index // self.config.images_per_prompt], self.config.seed + index)


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
    if config.steps >= 1 and int(config.steps * strength) < 1:  # (steps < 1: options.check says so)
        raise UsageError(f"--steps {config.steps} x --strength {strength} leaves no denoising step; "
                         "raise one of them")
    return strength


def prepare(config: GenerateConfig) -> Plan:
    """Check every input that can be checked without the model, creating nothing; raise one-line
    :class:`UsageError`\\ s."""
    if config.mode not in MODES:
        raise UsageError(f"unknown mode {config.mode!r}: use one of {', '.join(MODES)}")
    prompts = read_prompts(config)
    if config.images_per_prompt < 1:
        raise UsageError(f"--images-per-prompt must be at least 1, got {config.images_per_prompt}")
    check_compile_mode(config.compile, config.compile_mode)
    strength = _check_image_to_image(config)  # flags' own mistakes before the model is looked up
    with user_input():  # the library's own messages
        settings = config.patch
        if not isinstance(settings, agentsd.AgentSDConfig):
            agentsd.check_settings(**settings)  # unknown names and ranges, in the library's words
            settings = agentsd.AgentSDConfig(**settings)
    checked = options.check(config, images=len(prompts) * config.images_per_prompt)
    init_image = None
    if config.init_image is not None:
        from PIL import Image

        init_image = read_init_image(config.init_image)
        size = checked.size or (init_image.width // 8 * 8, init_image.height // 8 * 8)
        if min(size) < 8:
            raise UsageError(f"init image {str(config.init_image)!r} is smaller than 8x8 pixels")
        init_image = init_image.resize(size, resample=Image.Resampling.LANCZOS)
    return Plan(**vars(checked), config=config, prompts=prompts, variants=VARIANTS[config.mode],
                init_image=init_image, strength=strength, patch=dataclasses.asdict(settings))
