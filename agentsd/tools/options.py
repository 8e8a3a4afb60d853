"""The options every tool has, written once: fields with their flags, checks and ranges; and the
flags of the AgentSD patch's settings, from :class:`agentsd.AgentSDConfig`'s fields.

A tool's config inherits :class:`Options` (so ``--seed`` means the same everywhere), declares its own
fields with :func:`option`, and re-declares a shared field only to change its default, as
``agentsd bench`` does (:class:`agentsd.tools.bench.BenchConfig`)::

    @dataclass(kw_only=True)
    class BenchConfig(Options):
        MANY_SIZES: ClassVar[bool] = True  # --resolution takes several sizes, and --help says so
        model: str | None = None           # None: random weights; check() skips the model checks
        resolution: Sequence[Size] = (512,)
        batch_size: int = batch_size_option()  # --batch-size: one meaning wherever a tool batches
        repeats: int = option(3, "timed rounds; the median is reported", type=int, metavar="N")

    options.add_arguments(parser, BenchConfig)           # every flag, from the fields
    config = options.config_from_args(BenchConfig, args)  # and back, by name
    checked = options.check(config)                      # device, dtype, sizes, out, batch size
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import ClassVar

import torch

import agentsd
from agentsd.tools import files, loading
from agentsd.tools.errors import UsageError, first_line

PATCH_DEST = "patch_"  # args.patch_<name>: the patch's settings, apart from the tool's own options
SEED_LIMIT = 2**63  # seeds are in [0, 2**63): what torch's generators and the patch's seed take alike
Size = int | str | tuple[int, int]  # 512, "1024x768" (width x height) or (width, height)


def option(default=MISSING, help: str = "", *, default_factory=MISSING, default_text: str | None = None,
           **argparse_kwargs) -> dataclasses.Field:
    """A config field that is also a flag: ``help`` says what it means, its range and recommended
    value; ``default_text`` words its default in ``--help`` (``None`` as "the model's own");
    ``argparse_kwargs`` go to ``add_argument``, with ``flag`` for a name other than ``--<field-name>``
    (no dashes: positional). Without a default the flag is required."""
    meta = {"help": help, "default_text": default_text, "argparse": argparse_kwargs}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


@dataclass(kw_only=True)
class Options:
    """The options every ``agentsd`` command has; each field's ``help`` says what it means."""

    MANY_SIZES: ClassVar[bool] = False

    model: str | None = option(
        loading.DEFAULT_MODEL, "hub id or local diffusers pipeline folder; SD 1.x/2.x, SDXL and other UNet "
        "pipelines are recognised from the model", metavar="ID_OR_PATH")
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps",
                         metavar="DEVICE")
    dtype: str = option("auto", "weight dtype; auto (recommended) is fp16 on CUDA, fp32 elsewhere",
                        choices=("auto", *loading.DTYPES))
    seed: int = option(0, "seed of image 0; image i uses seed + i, so any image can be made again alone with "
                       "--seed <its seed>; in [0, 2**63), the last image's seed too", type=int, metavar="N")
    steps: int = option(50, "denoising steps (50, the paper's): at least 1, at most the scheduler's training "
                        "timesteps, and a schedule it can run", type=int, metavar="N")
    scheduler: str | None = option(None, f"sampler: {', '.join(loading.SCHEDULERS)}; pndm is PLMS, the "
                                   "paper's", choices=tuple(loading.SCHEDULERS), metavar="NAME",
                                   default_text="the model's own")
    guidance: float | None = option(None, "classifier-free guidance scale, a finite number >= 0 (1 or less "
                                    "turns guidance off)", type=float, metavar="SCALE",
                                    default_text="the pipeline's: 7.5 for SD, 5 for SDXL")
    resolution: Size | Sequence[Size] | None = option(
        None, "image size in pixels, SIDE (a square) or WIDTHxHEIGHT, multiples of 8", metavar="SIDE|WxH",
        default_text="the model's native size")
    out: str | os.PathLike = option("out", "output folder", type=Path, metavar="FOLDER")
    progress: bool = option(True, "show progress bars")


def batch_size_option() -> dataclasses.Field:
    """The ``--batch-size`` field of a tool that makes several images per pipeline call (``eval``,
    ``bench``): written once, so the flag means one thing; :func:`check` checks it."""
    return option(1, "images per pipeline call, at least 1 (larger batches are faster per image on big GPUs; "
                  "times and memory are then per image of a batch)", type=int, metavar="N")


@dataclass(kw_only=True)
class Checked:
    """The shared options once checked (a tool's plan extends it); no size: the native one."""

    device: torch.device
    dtype: torch.dtype
    sizes: tuple[tuple[int, int], ...]
    out: Path

    @property
    def size(self) -> tuple[int, int] | None:
        return self.sizes[0] if self.sizes else None


# ------------------------------------------------------------------------------------------ flags


class _Retired(argparse.Action):
    def __init__(self, option_strings, dest, message: str = "", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} {self.message}")


def retire(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, message: str,
           takes_value: bool = True) -> None:
    """A hidden ``flag`` that is gone: giving it is one line, ``<flag> <message>`` (say what replaced it)."""
    parser.add_argument(flag, action=_Retired, message=message, nargs=None if takes_value else 0,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _metadata(f: dataclasses.Field) -> Mapping:
    """The :func:`option` metadata of a config field; a shared field re-declared with another default
    keeps the shared meaning. Empty for a field a tool maps itself."""
    return f.metadata or next((g.metadata for g in dataclasses.fields(Options) if g.name == f.name), {})


def add_arguments(parser: argparse.ArgumentParser, config_cls: type[Options],
                  defaults_text: Mapping[str, str] | None = None) -> None:
    """Add a flag for every field of ``config_cls`` declared with :func:`option` (a bool's is
    ``--name/--no-name``), the shared ones in a group of their own; ``defaults_text`` words a default
    the tool's own way, by field name. ``--height``/``--width`` are hidden flags naming ``--resolution``."""
    shared = {f.name for f in dataclasses.fields(Options)}
    group = parser.add_argument_group("options shared by every agentsd command")
    for f in dataclasses.fields(config_cls):
        meta = _metadata(f)
        if not meta:
            continue  # mapped by the tool itself (e.g. generate's mode)
        kwargs = dict(meta["argparse"])
        flag = kwargs.pop("flag", "--" + f.name.replace("_", "-"))
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        # the shared words describe the shared default: a re-declared one is shown as its value
        shown = (defaults_text or {}).get(f.name) or (meta["default_text"] if f.metadata or default is None
                                                      else None)
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        if f.name == "resolution" and config_cls.MANY_SIZES:
            kwargs["nargs"], meta = "+", {**meta, "help": meta["help"].replace("image size", "image sizes")}
        if flag.startswith("-"):
            kwargs["dest"] = f.name
        if default is MISSING:
            kwargs["required"], shown = True, "required"
        else:
            kwargs["default"] = default
            if shown is None and default not in (None, (), []):
                shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        suffix = "" if shown is None else f" ({'default: ' if default is not MISSING else ''}{shown})"
        text = meta["help"] + suffix
        (group if f.name in shared else parser).add_argument(flag, help=text.replace("%", "%%"), **kwargs)
    for old in ("--height", "--width"):
        retire(group, old, "is now --resolution: give --resolution WIDTHxHEIGHT (e.g. 768x512), or "
               "--resolution SIDE for a square")


def add_command(subparsers, name: str, config_cls: type[Options], run, *, help: str, description: str,
                defaults_text: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """Register the subcommand ``name`` (the shape every tool has, see :mod:`agentsd.tools.cli`): its
    flags from ``config_cls``'s fields (:func:`add_arguments`), ``run(args)`` its entry point; returns
    its parser, for the flags a tool maps itself."""
    parser = subparsers.add_parser(name, help=help, description=description)
    add_arguments(parser, config_cls, defaults_text)
    parser.set_defaults(func=run)
    return parser


def config_from_args(config_cls: type[Options], args: argparse.Namespace, **values) -> Options:
    """``config_cls`` from parsed flags: every field named like a flag's dest, then ``values``
    (the fields a tool maps itself, e.g. ``mode`` from ``--compare``)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}
    return config_cls(**{**given, **values})


# ------------------------------------------------------------------------ the patch settings' flags


def _none_or(kind: type):
    """An argparse ``type`` for an optional setting: ``none`` or ``default`` is ``None``."""

    def parse(text: str):
        return None if text.lower() in ("none", "default") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error: "invalid int value"
    return parse


def add_patch_arguments(parser: argparse.ArgumentParser, reserved: Collection[str] = ("seed",),
                        exclude: Collection[str] = ()) -> argparse._ArgumentGroup:
    """One flag per :class:`agentsd.AgentSDConfig` field (an ``apply_patch`` setting) with the library's
    default and help, so the CLI cannot drift from the library; values land in ``args.patch_<name>``
    (read them with :func:`patch_settings`). ``reserved``: names the command uses for something else,
    whose flags get a ``patch-`` prefix (``seed`` -> ``--patch-seed``); ``exclude``: settings the
    command sets itself (no flag; pass the same to :func:`patch_settings`). Returns the flags' group."""
    group = parser.add_argument_group("AgentSD patch (apply_patch settings; defaults are the library's, "
                                      "from the paper)")
    hints = typing.get_type_hints(agentsd.AgentSDConfig)
    for f in dataclasses.fields(agentsd.AgentSDConfig):
        if f.name in exclude:
            continue
        kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        kwargs = dict(dest=PATCH_DEST + f.name, default=f.default,
                      help=f.metadata.get("help", "").replace("%", "%%") + " (default: %(default)s)")
        if kinds[0] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            choices = f.metadata.get("choices")  # shown, but checked by the library (its message)
            optional = type(None) in typing.get_args(hints[f.name])
            kwargs.update(type=_none_or(kinds[0]) if optional else kinds[0],
                          metavar="{" + ",".join(str(c).lower() for c in choices) + "}" if choices
                          else kinds[0].__name__.upper())
        flag = "--" + ("patch-" if f.name in reserved else "") + f.name.replace("_", "-")
        group.add_argument(flag, **kwargs)
    return group


def patch_settings(args: argparse.Namespace, exclude: Collection[str] = ()) -> dict:
    """The AgentSD settings given on the command line (defaults included), for ``apply_patch``."""
    return {f.name: getattr(args, PATCH_DEST + f.name) for f in dataclasses.fields(agentsd.AgentSDConfig)
            if f.name not in exclude}


# ------------------------------------------------------------------------------------------ checks


def parse_size(value: Size) -> tuple[int, int]:
    """``512`` -> (512, 512); ``"1024x768"`` or ``(1024, 768)`` -> (1024, 768) as (width, height)."""
    try:
        sizes = list(value) if isinstance(value, tuple) else [int(side) for side in str(value).split("x")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2):
        raise UsageError(f"--resolution {str(value)!r} is not SIDE or WIDTHxHEIGHT in pixels (e.g. 1024x768)")
    for size in sizes:
        if isinstance(size, bool) or size < 8 or size % 8:
            raise UsageError(f"--resolution {value}: sizes must be positive multiples of 8 (the VAE's "
                             f"factor), got {size}")
    return sizes[0], sizes[-1]


def check_seed(seed: int, images: int = 1) -> None:
    """``seed`` and the last image's, ``seed + images - 1``, must be in [0, 2**63)."""
    high = SEED_LIMIT - images
    if not 0 <= seed <= high:
        last = "" if images == 1 else f" (image i uses seed + i, up to seed + {images - 1})"
        raise UsageError(f"--seed must be in [0, {high}]{last}, got {seed}")


def check(options: Options, *, images: int = 1) -> Checked:
    """Check every shared option without loading a model (nothing is created); raise a one-line
    :class:`UsageError`. ``images``: how many the run makes, so the last one's seed is in range too.

    The model is checked on disk or with one hub request, and the steps against its scheduler config
    where that is at hand (tools check again with the loaded pipeline's scheduler).
    """
    check_seed(options.seed, images)
    for f in dataclasses.fields(options):  # the choices argparse checks, for Python callers too
        choices = _metadata(f).get("argparse", {}).get("choices")
        value = getattr(options, f.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if choices is not None and item is not None and item not in choices:
                raise UsageError(f"--{f.name.replace('_', '-')} {item!r}: choose from {', '.join(choices)}")
    batch = getattr(options, "batch_size", 1)  # the field of batch_size_option()
    if batch < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch}")
    if options.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {options.steps}")
    if options.guidance is not None and not (math.isfinite(options.guidance) and options.guidance >= 0):
        raise UsageError(f"--guidance must be a finite number >= 0, got {options.guidance:g}")
    many = options.MANY_SIZES and not isinstance(options.resolution, (int, str))  # 512 is one size anyway
    given = options.resolution if many else [options.resolution]
    sizes = tuple(dict.fromkeys(parse_size(size) for size in given if size is not None))
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
    return Checked(device=device, dtype=dtype, sizes=sizes, out=Path(options.out).expanduser())


def _problem(scheduler, steps: int) -> str | None:
    """Why ``scheduler`` cannot run ``steps`` steps, or ``None``."""
    limit, label = scheduler.config.num_train_timesteps, type(scheduler).__name__
    if steps > limit:
        return f" is more than the {limit} timesteps the {label} was trained with"
    try:
        scheduler.set_timesteps(steps)
    except ValueError as error:  # diffusers' own refusal (e.g. LCM above its original steps)
        return f": the {label} refuses it ({first_line(error)})"
    top = float(scheduler.timesteps.max())
    if top >= limit or float(scheduler.timesteps.min()) < 0:  # an index error mid-run
        return f": the {label} schedule reaches timestep {top:g}, outside its {limit} training timesteps"
    return None


def check_schedule(config, name: str | None, steps: int) -> None:
    """Refuse ``steps`` the scheduler cannot run, naming the largest it can, in milliseconds.

    More steps than training timesteps make a schedule degenerate (a stride of 0: every step at one
    timestep); some counts below still reach a timestep past the last. ``config`` is the model's
    ``scheduler_config.json`` or a scheduler; ``name`` replaces it (``--scheduler``) unless ``None``.
    """
    import diffusers

    if not isinstance(config, Mapping):  # a scheduler: its class and config
        config, cls = config.config, type(config)
    else:
        cls = getattr(diffusers, str(config.get("_class_name")), None)
    name = loading.scheduler_name(name, config)  # as the run will use it
    if name is not None:
        scheduler = loading.build_scheduler(name, config)
    elif isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin):
        scheduler = cls.from_config(config)
    else:
        return  # a scheduler diffusers does not ship: it shows what it does when it runs
    problem = _problem(scheduler, steps)
    if problem is not None:
        start = min(steps - 1, scheduler.config.num_train_timesteps)
        best = next((n for n in range(start, max(0, start - 64), -1) if not _problem(scheduler, n)), None)
        advice = f"use at most {best}" if best else "use fewer steps"
        raise UsageError(f"--steps {steps}{problem}; {advice}")
