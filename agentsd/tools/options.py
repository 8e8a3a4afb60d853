"""The options every tool has, written once: their fields, checks and ranges, and their flags.

``--seed``, ``--steps``, ``--resolution``, ... mean the same and accept the same values in every
command because each command's config dataclass inherits :class:`Options`, its flags come from
:func:`add_arguments` and its checks from :func:`check`. A tool adopts them in four lines::

    @dataclass(kw_only=True)
    class BenchConfig(Options):
        MANY_SIZES: ClassVar[bool] = True    # --resolution takes several sizes (its --help says so)
        model: str | None = None             # a default of its own: re-declare the default only
        resolution: Sequence[Size] = (512,)
        ...                                  # the tool's own fields

    options.add_arguments(parser, BenchConfig)                  # one flag per shared field
    config = options.config_from_args(BenchConfig, args, ...)   # every flag whose dest is a field
    checked = options.check(config)                             # device, dtype, sizes, out

A ``model`` of ``None`` skips the model and schedule checks (bench's random weights); such a tool
checks its own scheduler config with :func:`check_schedule`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from agentsd.tools import files, loading
from agentsd.tools.errors import UsageError, first_line

SEED_LIMIT = 2**63  # seeds are in [0, 2**63): what torch's generators and the patch's seed take alike
Size = int | str | tuple[int, int]  # 512, "1024x768" (width x height) or (width, height)


def _flag(help: str, **argparse_kwargs) -> dict:
    return {"help": help, **argparse_kwargs}


@dataclass(kw_only=True)
class Options:
    """The options every ``agentsd`` command has (each is also a flag of the same name).

    Attributes:
        model: hub id or local diffusers pipeline folder.
        device: ``"auto"`` (recommended: CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or ``"mps"``.
        dtype: ``"auto"`` (recommended: fp16 on CUDA, fp32 elsewhere), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        seed: seed of image 0; image ``i`` uses ``seed + i``. In [0, 2**63), and so is the last
            image's seed.
        steps: denoising steps (50, the paper's); at least 1, and a schedule the scheduler can run.
        scheduler: a name of :data:`agentsd.tools.loading.SCHEDULERS` (``"pndm"`` = PLMS, the
            paper's) or ``None`` for the model's own.
        guidance: classifier-free guidance scale, a finite number >= 0 (<= 1 turns guidance off);
            ``None`` = the pipeline's (7.5 SD, 5 SDXL).
        resolution: image size in pixels, multiples of 8: ``512``, ``"1024x768"`` or
            ``(1024, 768)`` (width x height); ``None`` = the model's native size. A tool with
            ``MANY_SIZES`` takes a sequence of them.
        out: output folder.
        progress: show progress bars.
    """

    MANY_SIZES: ClassVar[bool] = False

    model: str | None = field(default=loading.DEFAULT_MODEL, metadata=_flag(
        "hub id or local diffusers pipeline folder; SD 1.x/2.x, SDXL and other UNet pipelines are "
        "recognised from the model", metavar="ID_OR_PATH"))
    device: str = field(default="auto", metadata=_flag(
        "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps", metavar="DEVICE"))
    dtype: str = field(default="auto", metadata=_flag(
        "weight dtype; auto is fp16 on CUDA, fp32 elsewhere", choices=("auto", *loading.DTYPES)))
    seed: int = field(default=0, metadata=_flag(
        "seed of image 0; image i uses seed + i, so any image can be made again alone with --seed <its "
        "seed>; in [0, 2**63), the last image's seed too", type=int, metavar="N"))
    steps: int = field(default=50, metadata=_flag(
        "denoising steps: at least 1, at most the scheduler's training timesteps (checked against the "
        "schedule it makes)", type=int, metavar="N"))
    scheduler: str | None = field(default=None, metadata=_flag(
        f"sampler: {', '.join(loading.SCHEDULERS)}; pndm is PLMS, the paper's sampler",
        choices=tuple(loading.SCHEDULERS), metavar="NAME", none="the model's own"))
    guidance: float | None = field(default=None, metadata=_flag(
        "classifier-free guidance scale, a finite number >= 0 (1 or less turns guidance off)", type=float,
        metavar="SCALE", none="the pipeline's: 7.5 for SD, 5 for SDXL"))
    resolution: Size | Sequence[Size] | None = field(default=None, metadata=_flag(
        "image size in pixels, SIDE (a square) or WIDTHxHEIGHT, multiples of 8", metavar="SIDE|WxH",
        none="the model's native size"))
    out: str | os.PathLike = field(default="out", metadata=_flag("output folder", type=Path,
                                                                 metavar="FOLDER"))
    progress: bool = field(default=True, metadata=_flag("hide the progress bars"))


@dataclass(frozen=True)
class Checked:
    """The shared options once checked and resolved."""

    device: torch.device
    dtype: torch.dtype
    sizes: tuple[tuple[int, int], ...]  # (width, height) each; empty for the model's native size
    out: Path

    @property
    def size(self) -> tuple[int, int] | None:
        """The one size of a tool without ``MANY_SIZES``; ``None`` for the model's native size."""
        return self.sizes[0] if self.sizes else None


# ------------------------------------------------------------------------------------------ flags


class _Renamed(argparse.Action):
    """A flag that was renamed: using it is a one-line error naming the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now --resolution: give --resolution WIDTHxHEIGHT (e.g. 768x512), "
                     "or --resolution SIDE for a square")


def shared_flags() -> dict[str, str]:
    """``{flag: help}`` of every shared option, as every command shows it."""
    return {_flag_name(f): f.metadata["help"] for f in dataclasses.fields(Options)}


def _flag_name(f: dataclasses.Field) -> str:
    return "--no-progress" if f.name == "progress" else "--" + f.name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser,
    config_cls: type[Options],
    defaults_text: Mapping[str, str] | None = None,
) -> argparse._ArgumentGroup:
    """Add one flag per shared option to ``parser``, with ``config_cls``'s defaults.

    Args:
        parser: the (sub)command parser.
        config_cls: the tool's config (a subclass of :class:`Options`); a field without a default
            makes its flag required.
        defaults_text: how ``--help`` words a ``None`` default, by field name, where the tool's
            differs from the shared one (e.g. generate's resolution: "the init image's").

    ``--height`` and ``--width`` stay as hidden flags that name ``--resolution``.
    """
    group = parser.add_argument_group("options shared by every agentsd command")
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    for f in dataclasses.fields(Options):
        spec = dict(f.metadata)
        text, none, default = spec.pop("help"), spec.pop("none", None), defaults[f.name]
        many = f.name == "resolution" and config_cls.MANY_SIZES
        if f.name == "progress":  # a flag that turns a default off says no default
            group.add_argument(_flag_name(f), dest="progress", action="store_false", help=text)
            continue
        if default is dataclasses.MISSING:
            spec["required"], shown = True, "required"
        else:
            spec["default"] = default
            shown = (defaults_text or {}).get(f.name, none) if default is None else default
        if many:
            spec["nargs"], text = "+", text.replace("image size", "one or more image sizes")
            shown = " ".join(str(size) for size in default)
        group.add_argument(_flag_name(f), help=f"{text} (default: {shown})".replace("%", "%%"), **spec)
    for old in ("--height", "--width"):
        group.add_argument(old, action=_Renamed, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return group


def config_from_args(config_cls: type[Options], args: argparse.Namespace, **values) -> Options:
    """``config_cls`` from parsed flags: every field named like a flag's dest, then ``values``
    (the fields a tool maps itself, e.g. ``mode`` from ``--compare``)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
             if f.init and hasattr(args, f.name)}
    return config_cls(**{**given, **values})


# ------------------------------------------------------------------------------------------ checks


def parse_size(value: Size) -> tuple[int, int]:
    """``512`` -> (512, 512); ``"1024x768"`` or ``(1024, 768)`` -> (1024, 768) as (width, height)."""
    if isinstance(value, tuple):
        sizes = list(value)
    elif isinstance(value, int):
        sizes = [value]
    else:
        try:
            sizes = [int(part) for part in str(value).lower().split("x")]
        except ValueError:
            sizes = []
    text = str(value)
    if len(sizes) not in (1, 2):
        raise UsageError(f"--resolution {text!r} is not SIDE or WIDTHxHEIGHT in pixels (e.g. 1024x768)")
    for size in sizes:
        if isinstance(size, bool) or size < 8 or size % 8:
            raise UsageError(
                f"--resolution {text}: sizes must be positive multiples of 8 (the VAE's factor), got {size}"
            )
    return sizes[0], sizes[-1]


def _sizes(options: Options) -> tuple[tuple[int, int], ...]:
    value = options.resolution
    if value is None:
        return ()
    values = value if type(options).MANY_SIZES else [value]
    return tuple(dict.fromkeys(parse_size(size) for size in values))


def check_seed(seed: int, images: int = 1) -> None:
    """``seed`` and the last image's, ``seed + images - 1``, must be in [0, 2**63)."""
    high = SEED_LIMIT - images
    if not 0 <= seed <= high:
        last = "" if images == 1 else f" (image i uses seed + i, up to seed + {images - 1})"
        raise UsageError(f"--seed must be in [0, {high}]{last}, got {seed}")


def check(options: Options, *, images: int = 1) -> Checked:
    """Check every shared option without loading a model; raise a one-line :class:`UsageError`.

    Numbers first, then sizes, device and dtype, the scheduler's name, the output folder (nothing is
    created), the model reference (a local folder on disk, a hub id with one request), and the
    steps against the model's scheduler config where it is at hand (see :func:`check_schedule`;
    tools check again once the pipeline has loaded).

    Args:
        options: the tool's config.
        images: how many images the run makes, so the last image's seed is in range too.
    """
    check_seed(options.seed, images)
    if options.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {options.steps}")
    if options.guidance is not None and not (math.isfinite(options.guidance) and options.guidance >= 0):
        raise UsageError(f"--guidance must be a finite number >= 0, got {options.guidance:g}")
    sizes = _sizes(options)
    device = loading.resolve_device(options.device)
    dtype = loading.resolve_dtype(options.dtype, device)
    if options.scheduler is not None:
        loading.scheduler_class(options.scheduler)
    files.check_writable_folder(options.out, "--out")
    if options.model is not None:
        loading.check_model_reference(options.model)
        config = loading.scheduler_config(options.model)
        if config is not None:
            check_schedule(config, options.scheduler, options.steps)
    return Checked(device, dtype, sizes, Path(options.out).expanduser())


def _scheduler(config, name: str | None):
    """A fresh scheduler of ``config`` (a config mapping or a scheduler), or ``name`` built from it."""
    import diffusers

    if not isinstance(config, Mapping):  # a scheduler: its config and its class
        config, cls = config.config, type(config)
    else:
        cls = getattr(diffusers, str(config.get("_class_name")), None)
    if name is not None:
        return loading.build_scheduler(name, config)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        return None  # a scheduler diffusers does not ship: it shows what it does when it runs
    return cls.from_config(config)


def _problem(scheduler, steps: int, limit: int) -> str | None:
    """Why ``scheduler`` cannot run ``steps`` steps, or ``None``."""
    label = type(scheduler).__name__
    try:
        scheduler.set_timesteps(steps)
    except ValueError as error:  # diffusers' own refusal (e.g. LCM above its original steps)
        return f"the {label} refuses it ({first_line(error)})"
    top = float(scheduler.timesteps.max())
    if top >= limit or float(scheduler.timesteps.min()) < 0:
        return f"the {label} schedule reaches timestep {top:g}, outside its {limit} training timesteps"
    return None


def check_schedule(config, name: str | None, steps: int) -> None:
    """Refuse a step count the scheduler cannot run, with the largest one it can, before any model loads.

    More steps than training timesteps would make the schedule degenerate (its stride becomes 0:
    every step at one timestep) or make diffusers refuse; some counts within them still reach a
    timestep past the last (an index error mid-run). Building a scheduler and its schedule takes
    milliseconds, and the count is bounded before diffusers allocates anything for it.

    Args:
        config: the model's scheduler config (``scheduler_config.json``'s content) or a scheduler.
        name: the scheduler that replaces it (``--scheduler``), or ``None`` for the model's own.
        steps: the step count, at least 1.
    """
    scheduler = _scheduler(config, name)
    if scheduler is None:
        return
    limit, label = int(scheduler.config.num_train_timesteps), type(scheduler).__name__
    if steps > limit:
        problem = f" is more than the {limit} timesteps the {label} was trained with"
    else:
        why = _problem(scheduler, steps, limit)
        if why is None:
            return
        problem = f": {why}"
    # the largest count it can run, searched downwards (the first one below usually is)
    start = min(steps - 1, limit)
    best = next((n for n in range(start, max(0, start - 64), -1) if not _problem(scheduler, n, limit)), None)
    raise UsageError(f"--steps {steps}{problem}; " + (f"use at most {best}" if best else "use fewer steps"))
