"""Settings of ``agentsd bench``: :class:`BenchConfig` as given, :class:`Plan` once checked.

:func:`check_config` validates everything that can be validated without loading a model — the
methods and their ratios, sizes, numbers, device, dtype, the model reference, each ``--arch``
config (built on the meta device: no memory, no time) and what each method can run at each
size — and that ``--out`` can be written, so a run never measures for minutes and then fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agentsd.tools.errors import UsageError, user_input
from agentsd.tools.methods import KINDS, MAX_RATIO, Method, parse_methods

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
OUTPUT_FILES = ("results.csv", "results.md", "speedup.png")
SCHEDULE_STEPS = 50
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# what a run can time: one UNet denoising step, or whole generations (text encoders, steps, VAE)
MEASURES = ("step", "generation")
# SDPA kernels a run can be held to (torch.nn.attention.sdpa_kernel): torch's choice, or the math
# kernel, which materialises the softmax as the paper's baseline (its attention was no flash kernel)
SDPA_KERNELS = ("default", "math")
# AgentSD settings the methods set themselves (see agentsd.tools.methods), so no flag gives them;
# seed is --seed
METHOD_SETTINGS = ("ratio", "agent_until", "merge_until", "seed")


@dataclass
class BenchConfig:
    """What ``agentsd bench`` measures (one field per flag; defaults are the CLI's).

    Attributes:
        model: a diffusers pipeline (hub id or folder) with real weights; also times whole
            generations. ``None`` (default): the UNets of ``archs`` with random weights (speed does
            not depend on the weights; runs offline).
        archs: with random weights: ``sd15``, ``sd21``, ``sdxl``, ``tiny``, ``tiny-xl`` or paths of
            UNet ``config.json`` files.
        methods: specs of :mod:`agentsd.tools.methods`; a ratio kind without ``:R`` (``agentsd``)
            runs at every ratio of ``ratios``. ``unpatched`` is always run, as the reference.
        ratios: merge ratios of bare ratio kinds, in [0, 0.75].
        resolutions: image sizes in pixels: ``512``, ``"1024x768"`` (width x height) or
            ``(width, height)``; multiples of 8.
        batch: UNet batch (2 = one image with classifier-free guidance).
        dtype: ``auto`` (fp16 on CUDA, fp32 on CPU), ``fp32``, ``fp16`` or ``bf16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        repeats: timed rounds; the median is reported (3 or more).
        warmup: untimed rounds before the timed ones; memory is probed in the last one.
        measure: what to time: ``step`` (one UNet denoising step per method) and/or ``generation``
            (whole generations: seconds and peak memory per image). ``None``: ``step`` with random
            weights; ``step`` and ``generation`` with ``model`` (``step`` alone if ``steps`` is 0).
            Generations with random weights build the whole pipeline of the arch (text encoders, VAE;
            ``sd15``, ``sd21``, ``sdxl``, ``tiny``, ``tiny-xl``).
        steps: denoising steps of each timed generation (with ``model`` and no ``measure``, 0 times
            none).
        scheduler: scheduler of the generations, a name of :data:`agentsd.tools.loading.SCHEDULERS`
            (``pndm`` = PLMS, the paper's); ``None``: the model's own (PNDM is always run as PLMS).
        prompt: prompt of the timed generations.
        sdpa_kernel: SDPA kernel every method of the run is held to: ``default`` (torch's choice:
            flash or memory-efficient where available) or ``math`` (the softmax materialised, as the
            paper's baseline).
        patch: AgentSD settings (``apply_patch`` keywords other than those in :data:`METHOD_SETTINGS`)
            for every AgentSD method; ``max_downsample`` also sets the level tomesd patches and the
            layers ``bound`` empties.
        seed: seed of the inputs and of the patches.
        threads: CPU threads for torch (``None``: torch's choice).
        out: folder of results.csv, results.md, speedup.png (and profile.md).
        overwrite: replace result files already in ``out``.
        append: add this run's table (results.md) and rows (results.csv; profile.md too) to those
            already in ``out`` instead of refusing; no speedup.png is drawn.
        profile: also write profile.md (time per kind of module, top operators).
        compile: time the methods with the UNet compiled by ``torch.compile`` too (compiled rows:
            step time apart from the compile time of the first call, and graph breaks).
        compile_backend: ``torch.compile`` backend: ``inductor`` (recommended, the default),
            ``aot_eager`` or ``eager`` (only tracing: graph breaks, no speed-up).
        progress: show a progress bar.
    """

    model: str | None = None
    archs: Sequence[str] = ("sd15",)
    methods: Sequence[str] = KINDS
    ratios: Sequence[float] = DEFAULT_RATIOS
    resolutions: Sequence[str | int | tuple[int, int]] = (512,)
    batch: int = 2
    dtype: str = "auto"
    device: str = "auto"
    repeats: int = 3
    warmup: int = 1
    measure: Sequence[str] | None = None
    steps: int = SCHEDULE_STEPS
    scheduler: str | None = None
    prompt: str = "a photograph of an astronaut riding a horse"
    sdpa_kernel: str = "default"
    patch: Mapping[str, object] = field(default_factory=dict)
    seed: int = 0
    threads: int | None = None
    out: str | Path = "bench-results"
    overwrite: bool = False
    append: bool = False
    profile: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    progress: bool = True


@dataclass
class Plan:
    """A checked :class:`BenchConfig`: typed values, ready to run."""

    config: BenchConfig
    methods: list[Method]  # table order, unpatched first
    resolutions: list[tuple[int, int]]  # (width, height)
    dtype: torch.dtype
    device: torch.device
    out: Path
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
    def dtype_name(self) -> str:
        from agentsd.tools.loading import DTYPES

        return next(name for name, value in DTYPES.items() if value == self.dtype)

    @property
    def output_files(self) -> tuple[str, ...]:
        files = tuple(f for f in OUTPUT_FILES if not (self.config.append and f == "speedup.png"))
        return files + (("profile.md",) if self.config.profile else ())


def parse_resolution(value: str | int | tuple[int, int]) -> tuple[int, int]:
    """``"512"`` -> (512, 512); ``"1024x768"`` -> (1024, 768) as (width, height)."""
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
    width, height = sizes[0], sizes[-1]
    for size in (width, height):
        if size < 8 or size % 8:
            raise UsageError(
                f"--resolution {text}: sizes must be positive multiples of 8 (the VAE's factor), got {size}"
            )
    return width, height


def resolution_text(width: int, height: int) -> str:
    return str(width) if width == height else f"{width}x{height}"


def _device(name: str) -> torch.device:
    """``--device``: as :func:`agentsd.tools.loading.resolve_device`, limited to what the benchmark times."""
    from agentsd.tools.loading import resolve_device

    try:
        device = resolve_device(name)
    except ValueError as e:  # the loader's message does not name the flag
        raise UsageError(f"--device: {e}") from None
    if device.type not in ("cpu", "cuda"):
        if name == "auto":  # e.g. Apple MPS: time on the CPU
            return torch.device("cpu")
        raise UsageError(f"--device {name}: the benchmark runs on cpu or cuda")
    return device


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


def check_unet(label: str, config: dict, resolutions: Sizes, methods: Sequence[Method],
               max_downsample: int | None = None) -> None:
    """What a UNet of ``config`` cannot run, as a :class:`UsageError`, before it is built.

    Args:
        label: the arch's name in messages.
        config: its UNet config.
        resolutions: (width, height) sizes.
        methods: the methods to run.
        max_downsample: the run's AgentSD ``max_downsample`` (``None``: AgentSD's default level).
    """
    from agentsd.tools.archs import check_conditioning, meta_unet

    with user_input(f"{label}: "):
        check_conditioning(config)
        unet = meta_unet(config)
    check_methods_fit(label, unet, resolutions, methods, max_downsample)


def _measure(config: BenchConfig) -> tuple[str, ...]:
    """``--measure`` checked, or its default (see :class:`BenchConfig`)."""
    if config.measure is None:
        if config.model is not None and config.steps:
            return MEASURES
        return ("step",)
    measure = tuple(dict.fromkeys(config.measure))
    unknown = [m for m in measure if m not in MEASURES]
    if unknown or not measure:
        raise UsageError(f"--measure {' '.join(unknown) or '(none)'}: choose from {', '.join(MEASURES)}")
    return measure


def _check_patch_settings(config: BenchConfig, methods: Sequence[Method]) -> dict[str, object]:
    """The AgentSD settings of ``config.patch`` that are not the defaults, checked by AgentSD itself."""
    import dataclasses

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


def _check_sdpa_kernel(name: str) -> None:
    if name not in SDPA_KERNELS:
        raise UsageError(f"--sdpa-kernel {name!r}: choose from {', '.join(SDPA_KERNELS)}")
    if name != "default":
        try:
            import torch.nn.attention  # noqa: F401  (torch >= 2.3)
        except ImportError:
            raise UsageError(f"--sdpa-kernel {name} needs torch 2.3 or newer") from None


def check_methods_fit(label: str, unet, resolutions: Sizes, methods: Sequence[Method],
                      max_downsample: int | None = None) -> None:
    """Refuse sizes a method cannot run on ``unet`` (a built, loaded or meta UNet), and a
    ``max_downsample`` that selects none of its levels."""
    from agentsd.tools.methods import patch_level

    if max_downsample is not None:
        with user_input(f"{label}: --max-downsample {max_downsample}: "):
            patch_level(unet, max_downsample)
    if any(m.kind == "tomesd" and m.ratio > 0 for m in methods):
        level = patch_level(unet, max_downsample)
        for width, height in resolutions:
            problem = tomesd_problem(unet.config, level, width, height)
            if problem:
                raise UsageError(f"{label}: {problem}")


def check_config(config: BenchConfig) -> Plan:
    """Check every setting before anything is built or loaded; raise :class:`UsageError` with one line."""
    from agentsd.tools.archs import arch_label, unet_config
    from agentsd.tools.files import check_writable_folder
    from agentsd.tools.loading import check_model_reference, resolve_dtype

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
    if config.compile and config.compile_backend not in COMPILE_BACKENDS:
        raise UsageError(
            f"--compile-backend {config.compile_backend!r}: choose from {', '.join(COMPILE_BACKENDS)}"
        )
    resolutions = list(dict.fromkeys(parse_resolution(value) for value in config.resolutions))
    for name in ("batch", "repeats", "warmup", "threads"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    if config.steps < 0:
        raise UsageError(f"--steps must be >= 0, got {config.steps}")
    measure = _measure(config)
    if "generation" in measure and config.steps < 1:
        raise UsageError(f"--steps {config.steps}: a timed generation needs at least 1 step")
    if config.scheduler is not None:
        from agentsd.tools.loading import scheduler_class

        with user_input("--scheduler: "):
            scheduler_class(config.scheduler)
    if "generation" in measure and config.model is None:
        from agentsd.tools.pipelines import PIPELINE_ARCHS

        for arch in configs:
            if arch not in PIPELINE_ARCHS:
                raise UsageError(
                    f"--arch {arch}: whole generations with random weights need a shipped pipeline "
                    f"({', '.join(PIPELINE_ARCHS)}); a UNet config times steps only"
                )
    _check_sdpa_kernel(config.sdpa_kernel)
    for flag, asked in (("--profile", config.profile), ("--compile", config.compile)):
        if asked and "step" not in measure:
            raise UsageError(f"{flag} works on one UNet step of each method: add step to --measure")
    if config.append and config.overwrite:
        raise UsageError("give either --append or --overwrite, not both")
    if not 0 <= config.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {config.seed}")
    patch = _check_patch_settings(config, methods)
    device = _device(config.device)
    try:
        dtype = resolve_dtype(config.dtype, device)
    except ValueError as e:
        raise UsageError(f"--dtype: {e}") from None
    if config.model is not None:
        check_model_reference(config.model)  # a missing folder or unknown hub id, before anything is built
    out = Path(config.out).expanduser()
    check_writable_folder(out, "--out")
    plan = Plan(config=config, methods=methods, resolutions=resolutions, dtype=dtype, device=device, out=out,
                configs=configs, measure=measure, patch=patch)
    if config.append:
        from agentsd.tools.bench.output import check_appendable

        check_appendable(out, plan.output_files)
    elif not config.overwrite:
        existing = [name for name in plan.output_files if (out / name).exists()]
        if existing:
            raise UsageError(f"{out / existing[0]} already exists: choose another --out, or pass --overwrite "
                             "or --append")
    for arch, unet_cfg in configs.items():
        check_unet(arch_label(arch), unet_cfg, resolutions, methods, patch.get("max_downsample"))
    return plan
