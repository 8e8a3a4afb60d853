"""Settings of ``agentsd bench``: :class:`BenchConfig` as given (the shared options and bench's own),
:class:`Plan` once checked.

:func:`check_config` validates everything that can be validated without loading a model — the
shared options (:func:`agentsd.tools.options.check`: device, dtype, seed, steps against the
scheduler, sizes, ``--out``), the methods and their ratios, each ``--arch`` config (built on the
meta device: no memory, no time), what each method can run at each size, and that the results
already in ``--out`` are bench's — so a run never measures for minutes and then fails.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from agentsd.tools import options
from agentsd.tools.errors import UsageError, user_input
from agentsd.tools.loading import COMPILE_MODE_HELP, COMPILE_MODES, check_compile_mode
from agentsd.tools.methods import KINDS, MAX_RATIO, Method, kind_specs, parse_methods
from agentsd.tools.options import Checked, Options, Size, option

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
SCHEDULE_STEPS = 50
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# what a run can time: one UNet denoising step, or whole generations (text encoders, steps, VAE)
MEASURES = ("step", "generation")
# SDPA kernels a run can be held to (torch.nn.attention.sdpa_kernel): torch's choice, or the math
# kernel, which materialises the softmax as the paper's baseline (its attention was no flash kernel)
SDPA_KERNELS = ("default", "math")
# AgentSD settings the methods set themselves (agentsd.tools.methods: the phases, the block merges of
# +mlp / +xattn), so no flag gives them; seed is --seed
METHOD_SETTINGS = ("ratio", "agent_until", "merge_until", "merge_mlp", "merge_crossattn", "seed")


@dataclass(kw_only=True)
class BenchConfig(Options):
    """What ``agentsd bench`` measures: the shared :class:`~agentsd.tools.options.Options` and bench's
    own; each field's ``help`` says what it means, the defaults are the command line's.

    ``model=None`` (the default) times the real architectures of ``archs`` with random weights
    (speed does not depend on the weights; runs offline). ``resolution`` takes several sizes. A UNet
    step is timed at the batch the pipeline runs it at: ``batch_size`` images, doubled by
    classifier-free guidance unless ``guidance`` is 1 or less. ``patch``: AgentSD settings
    (``apply_patch`` keywords other than :data:`METHOD_SETTINGS`) for every AgentSD method.
    """

    MANY_SIZES: ClassVar[bool] = True

    model: str | None = None
    resolution: Sequence[Size] = (512,)
    out: str | os.PathLike = "bench-results"
    archs: Sequence[str] | None = option(
        None, "with --random-weights: sd15, sd21, sdxl, tiny, tiny-xl, or a UNet config.json (steps only)",
        flag="--arch", nargs="+", metavar="ARCH", default_text="sd15")
    measure: Sequence[str] | None = option(
        None, "what to time: step (one UNet denoising step of each method) and/or generation (whole "
        "generations: seconds and peak memory per image; with --random-weights the arch's whole pipeline)",
        nargs="+", choices=MEASURES, metavar="WHAT",
        default_text="step with --random-weights, step generation with --model")
    methods: Sequence[str] = option(
        KINDS, f"{kind_specs(KINDS)}; a ratio kind without :R runs at every --ratios; unpatched is always "
        "run, as the reference", nargs="+", metavar="METHOD", default_text="every kind")
    ratios: Sequence[float] = option(DEFAULT_RATIOS, f"merge ratios of the methods given without :R, in [0, "
                                     f"{MAX_RATIO}]", nargs="+", type=float, metavar="R")
    batch_size: int = options.batch_size_option()
    repeats: int = option(3, "timed rounds, at least 1; the median is reported (3 or more recommended)",
                          type=int, metavar="N")
    warmup: int = option(1, "untimed rounds before the timed ones, at least 1; memory is probed in the last",
                         type=int, metavar="N")
    prompt: str = option("a photograph of an astronaut riding a horse", "prompt of the timed generations",
                         metavar="TEXT")
    sdpa_kernel: str = option(
        "default", "SDPA kernel every method of the run is held to: default (torch's choice: flash or "
        "memory-efficient attention where they apply) or math (the softmax materialised, as the paper's "
        "baseline)", choices=SDPA_KERNELS)
    threads: int | None = option(None, "CPU threads for torch, at least 1", type=int, metavar="N",
                                 default_text="torch's own choice")
    profile: bool = option(False, "after timing, run each method's step once more under torch.profiler and "
                           "write profile.md: time per kind of module, the stages inside the patched blocks, "
                           "the top operators")
    compile: bool = option(False, "also time every method's step with the UNet compiled as agentsd generate "
                           "--compile compiles it (regional compilation of its transformer blocks where "
                           "diffusers offers it, else the whole UNet): step time, compile time of the "
                           "first call, graph breaks")
    compile_backend: str = option("inductor", "torch.compile backend of --compile: inductor (recommended), "
                                  "aot_eager or eager (tracing only)", choices=COMPILE_BACKENDS)
    compile_mode: str = option("default", COMPILE_MODE_HELP, choices=COMPILE_MODES)
    patch: Mapping[str, object] = field(default_factory=dict)  # mapped by the command line: the patch flags


@dataclass(kw_only=True)
class Plan(Checked):
    """A checked :class:`BenchConfig`, ready to run (``sizes``: (width, height) of every size)."""

    config: BenchConfig
    methods: list[Method]  # table order, unpatched first
    configs: dict[str, dict] = field(default_factory=dict)  # arch -> UNet config (random weights)
    measure: tuple[str, ...] = ("step",)
    patch: dict[str, object] = field(default_factory=dict)  # AgentSD settings that are not defaults

    @property
    def archs(self) -> list[str]:
        return list(self.configs)

    @property
    def steps_timed(self) -> bool:
        return "step" in self.measure

    @property
    def generations_timed(self) -> bool:
        return "generation" in self.measure

    @property
    def unet_batch(self) -> int:
        """The batch of a timed UNet step: the images of a pipeline call, doubled by guidance."""
        guidance = self.config.guidance
        return self.config.batch_size * (1 if guidance is not None and guidance <= 1 else 2)

    @property
    def dtype_name(self) -> str:
        from agentsd.tools.loading import DTYPES

        return next(name for name, value in DTYPES.items() if value == self.dtype)


def resolution_text(width: int, height: int) -> str:
    return str(width) if width == height else f"{width}x{height}"


def tomesd_problem(config: dict | object, level: int, width: int, height: int) -> str | None:
    """Why tomesd cannot run at ``width`` x ``height`` on the level it patches, or ``None``.

    tomesd picks one dst token per 2x2 cell; a latent with a side of 1 token at that level has no
    complete cell, and tomesd fails inside its merge (an ``IndexError``).
    """
    from agentsd.tools.archs import latent_side

    w, h = latent_side(width, level), latent_side(height, level)
    if min(w, h) < 2:
        return (f"tomesd cannot merge at {resolution_text(width, height)}: the latent is {w}x{h} tokens at "
                f"the level it patches (/{level}) and its 2x2 cells need 2 in each direction; drop tomesd "
                "from --methods or raise --resolution")
    return None


Sizes = Sequence[tuple[int, int]]


def check_unet(label: str, config: dict, sizes: Sizes, methods: Sequence[Method],
               max_downsample: int | None = None) -> None:
    """What a UNet of ``config`` cannot run, as a :class:`UsageError`, before it is built.

    Args:
        label: the arch's name in messages.
        config: its UNet config.
        sizes: (width, height) sizes.
        methods: the methods to run.
        max_downsample: the run's AgentSD ``max_downsample`` (``None``: AgentSD's default level).
    """
    from agentsd.tools.archs import check_conditioning, meta_unet

    with user_input(f"{label}: "):
        check_conditioning(config)
        unet = meta_unet(config)
    check_methods_fit(label, unet, sizes, methods, max_downsample)


def check_methods_fit(label: str, unet, sizes: Sizes, methods: Sequence[Method],
                      max_downsample: int | None = None) -> None:
    """Refuse sizes a method cannot run on ``unet`` (a built, loaded or meta UNet), and a
    ``max_downsample`` that selects none of its levels."""
    from agentsd.tools.methods import patch_level

    if max_downsample is not None:
        with user_input(f"{label}: --max-downsample {max_downsample}: "):
            patch_level(unet, max_downsample)
    if any(m.kind == "tomesd" and m.ratio > 0 for m in methods):
        level = patch_level(unet, max_downsample)
        for width, height in sizes:
            problem = tomesd_problem(unet.config, level, width, height)
            if problem:
                raise UsageError(f"{label}: {problem}")


def _check_patch_settings(config: BenchConfig, methods: Sequence[Method]) -> dict[str, object]:
    """The AgentSD settings of ``config.patch`` that are not the defaults, checked by AgentSD itself."""
    import agentsd
    from agentsd.tools.methods import AGENTSD_PHASES, agentsd_settings

    given = dict(config.patch)
    reserved = sorted(set(given) & set(METHOD_SETTINGS))
    if reserved:
        raise UsageError(f"AgentSD setting {reserved[0]!r} is set by the methods (or --seed), not by "
                         "the run's AgentSD settings")
    with user_input("AgentSD settings: "):
        agentsd.check_settings(**given)  # names the unknown or invalid setting
    defaults = {f.name: f.default for f in dataclasses.fields(agentsd.AgentSDConfig)}
    changed = {name: value for name, value in given.items() if value != defaults[name]}
    for method in methods:
        if method.kind in AGENTSD_PHASES:
            with user_input(f"{method.name}: "):
                agentsd.check_settings(**agentsd_settings(method, changed, config.seed))
    return changed


def _check_random_weights(config: BenchConfig, configs: Mapping[str, dict], measure: Sequence[str]) -> None:
    """Steps against each shipped pipeline's scheduler; generations only of shipped pipelines."""
    from agentsd.tools.pipelines import PIPELINE_ARCHS, component_config

    for arch in configs:
        if arch in PIPELINE_ARCHS:
            with user_input(f"--arch {arch}: "):
                options.check_schedule(component_config(arch, "scheduler"), config.scheduler, config.steps)
        elif "generation" in measure:
            raise UsageError(f"--arch {arch}: whole generations with random weights need a shipped pipeline "
                             f"({', '.join(PIPELINE_ARCHS)}); a UNet config times steps only")


def check_config(config: BenchConfig) -> Plan:
    """Check every setting before anything is built or loaded; raise :class:`UsageError` with one line."""
    from agentsd.tools.archs import arch_label, unet_config
    from agentsd.tools.bench.output import check_results_folder

    if config.model is not None and config.archs:
        raise UsageError("--arch goes with --random-weights; with --model the checkpoint sets the UNet")
    configs: dict[str, dict] = {}
    if config.model is None:
        for arch in dict.fromkeys(config.archs or ["sd15"]):
            with user_input():
                configs[arch] = unet_config(arch)
    ratios = list(dict.fromkeys(float(r) for r in config.ratios))
    for ratio in ratios:
        if not 0 <= ratio <= MAX_RATIO:  # nan fails too
            raise UsageError(f"--ratios: {ratio} is outside [0, {MAX_RATIO}]")
    with user_input("--methods: "):
        methods = parse_methods(config.methods, ratios)
    if Method("unpatched") not in methods:  # the reference of every ratio in the table
        methods.insert(0, Method("unpatched"))
    methods.sort(key=lambda m: m.order)
    for name in ("repeats", "warmup", "threads"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    measure = tuple(dict.fromkeys(config.measure or (MEASURES if config.model is not None else ["step"])))
    checked = options.check(config, images=config.batch_size)
    _check_random_weights(config, configs, measure)
    if config.sdpa_kernel != "default":
        try:
            import torch.nn.attention  # noqa: F401  (torch >= 2.3)
        except ImportError:
            raise UsageError(f"--sdpa-kernel {config.sdpa_kernel} needs torch 2.3 or newer") from None
    check_compile_mode(config.compile, config.compile_mode, config.compile_backend)
    for flag, asked in (("--profile", config.profile), ("--compile", config.compile)):
        if asked and "step" not in measure:
            raise UsageError(f"{flag} works on one UNet step of each method: add step to --measure")
    patch = _check_patch_settings(config, methods)
    check_results_folder(checked.out)
    for arch, unet_cfg in configs.items():
        check_unet(arch_label(arch), unet_cfg, checked.sizes, methods, patch.get("max_downsample"))
    return Plan(**vars(checked), config=config, methods=methods, configs=configs, measure=measure,
                patch=patch)
