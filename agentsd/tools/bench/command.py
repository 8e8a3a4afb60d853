"""``agentsd bench``: speed and memory of AgentSD against the unpatched UNet, ToMeSD and the bound.

For each architecture × resolution, every method runs the same UNet step (same sample, timestep,
text states and SDXL conditioning) on the same UNet, patched and unpatched in turn, round by round
(see :mod:`agentsd.tools.bench.timing`). Results: a markdown table on stdout, ``results.csv``, ``results.md``
and ``speedup.png`` in ``--out``.

Methods:

- ``unpatched``: diffusers' default attention processor (SDPA), the reference; always measured.
- ``tomesd``: the ``tomesd`` package at each ratio, on the level AgentSD patches.
- ``agentsd-agent``: AgentSD's agent phase alone (``agent_until=1, merge_until=1``).
- ``agentsd-tome``: AgentSD's late phase alone, ToMe with 2x2 cells (``agent_until=0``).
- ``agentsd``: the default schedule, one step averaged over a 50-step run.
- ``bound``: the patched self-attentions replaced by nothing (a processor returning zeros, so the
  block's residual passes unchanged): no patch of those layers can be faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

METHODS = ("unpatched", "tomesd", "agentsd-agent", "agentsd-tome", "agentsd", "bound")
RATIO_METHODS = ("tomesd", "agentsd-agent", "agentsd-tome", "agentsd")
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
OUTPUT_FILES = ("results.csv", "results.md", "speedup.png")
# The highest ratio every method accepts: ToMe's 2x2 cells (tomesd, AgentSD's late phase) keep one
# token in four.
MAX_RATIO = 0.75
SCHEDULE_STEPS = 50


def add_parser(subparsers) -> None:
    """Register ``agentsd bench`` and its flags."""
    parser = subparsers.add_parser(
        "bench",
        help="time and measure AgentSD against the unpatched UNet, tomesd and the attainable bound",
        description=(
            "Time one UNet denoising step (and, with --model, whole generations) for each method, "
            "architecture and resolution, interleaving the methods round by round on the same inputs. "
            "Prints a markdown table and writes results.csv, results.md and speedup.png to --out."
        ),
    )
    source = parser.add_argument_group("model (one of)")
    source.add_argument(
        "--random-weights", action="store_true",
        help="build the real UNet architectures of --arch with random weights (speed does not depend "
             "on the weights; runs offline)",
    )
    source.add_argument(
        "--model", metavar="ID_OR_PATH",
        help="a diffusers pipeline (hub id or folder) with real weights; also times whole generations",
    )
    parser.add_argument(
        "--arch", nargs="+", metavar="ARCH",
        help="with --random-weights: sd15, sd21, sdxl, tiny, tiny-xl or a UNet config.json (default sd15)",
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), metavar="METHOD",
        help=f"methods to run, from {', '.join(METHODS)} (default all; unpatched is always run as the "
             "reference)",
    )
    parser.add_argument(
        "--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS), metavar="R",
        help=f"token merging ratios of tomesd and AgentSD, in [0, {MAX_RATIO}] (default 0.1 to 0.5)",
    )
    parser.add_argument(
        "--resolution", nargs="+", default=["512"], metavar="PX",
        help="image sizes in pixels, SIDE or WIDTHxHEIGHT, multiples of 8 (default 512)",
    )
    parser.add_argument("--batch", type=int, default=2, help="UNet batch; 2 = one image with CFG (default)")
    parser.add_argument(
        "--dtype", default="auto", help="fp32, fp16, bf16 or auto (fp16 on CUDA, fp32 on CPU; default)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported (3)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds before; memory is probed in the last (1)"
    )
    parser.add_argument(
        "--steps", type=int, default=SCHEDULE_STEPS,
        help="with --model: denoising steps of each timed generation, 0 to skip generations (50)",
    )
    parser.add_argument(
        "--prompt", default="a photograph of an astronaut riding a horse",
        help="with --model: prompt of the timed generations",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for torch (default: torch's own choice, one per core)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the patches (0)")
    parser.add_argument(
        "--out", default="bench-results", help="folder for results.csv, results.md, speedup.png"
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="after timing, run each method once more under torch.profiler and write profile.md: time per "
             "kind of module and the top operators",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace result files already in --out")
    parser.set_defaults(func=run)


# --------------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """The validated options of one benchmark run."""

    archs: list[str]
    model: str | None
    methods: list[str]
    ratios: list[float]
    resolutions: list[tuple[int, int]]  # (width, height)
    batch: int
    dtype: torch.dtype
    device: torch.device
    repeats: int
    warmup: int
    steps: int
    prompt: str
    seed: int
    threads: int | None
    out: Path
    overwrite: bool
    profile: bool = False
    configs: dict[str, dict] = field(default_factory=dict)  # arch -> UNet config (random weights)

    @property
    def dtype_name(self) -> str:
        from agentsd.tools.loading import DTYPES

        return next(name for name, value in DTYPES.items() if value == self.dtype)


def _usage_error(message: str) -> Exception:
    from agentsd.tools.cli import UsageError

    return UsageError(message)


def parse_resolution(text: str) -> tuple[int, int]:
    """``"512"`` -> (512, 512); ``"1024x768"`` -> (1024, 768) as (width, height)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2):
        raise _usage_error(f"--resolution {text!r} is not SIDE or WIDTHxHEIGHT in pixels (e.g. 1024x768)")
    width, height = sizes[0], sizes[-1]
    for size in (width, height):
        if size < 8 or size % 8:
            raise _usage_error(
                f"--resolution {text}: sizes must be positive multiples of 8 (the VAE's factor), got {size}"
            )
    return width, height


def resolve_device(name: str) -> torch.device:
    """``--device``: as :func:`agentsd.tools.loading.resolve_device`, limited to what bench can time."""
    from agentsd.tools.loading import resolve_device as resolve

    try:
        device = resolve(name)
    except ValueError as e:
        raise _usage_error(f"--device: {e}") from None
    if device.type not in ("cpu", "cuda"):
        if name == "auto":  # e.g. Apple MPS: no peak-memory counter to report, time on the CPU
            return torch.device("cpu")
        raise _usage_error(f"--device {name}: the benchmark runs on cpu or cuda")
    return device


def validate(args: argparse.Namespace) -> Settings:
    """Check every option before anything is built or loaded; raise UsageError with one line."""
    import agentsd
    from agentsd.tools.archs import unet_config
    from agentsd.tools.loading import check_model_reference, resolve_dtype

    if args.model and args.random_weights:
        raise _usage_error("give either --random-weights or --model, not both")
    if not args.model and not args.random_weights:
        raise _usage_error(
            "choose the weights: --random-weights (real architectures, random weights, offline) "
            "or --model ID_OR_PATH (a pipeline with real weights)"
        )
    archs = list(dict.fromkeys(args.arch or ["sd15"]))
    configs: dict[str, dict] = {}
    if args.model:
        if args.arch:
            raise _usage_error("--arch goes with --random-weights; with --model the checkpoint sets the UNet")
        archs = []
    else:
        for arch in archs:
            try:
                configs[arch] = unet_config(arch)
            except ValueError as e:
                raise _usage_error(str(e)) from None
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise _usage_error(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    methods = [m for m in METHODS if m == "unpatched" or m in args.methods]
    ratios = list(dict.fromkeys(args.ratios))
    for ratio in ratios:
        if not (0 <= ratio <= MAX_RATIO):
            raise _usage_error(f"--ratios: {ratio} is outside [0, {MAX_RATIO}]")
        try:  # what apply_patch would say, before any model is built
            agentsd.check_settings(ratio=ratio)
        except ValueError as e:
            raise _usage_error(f"--ratios: {e}") from None
    resolutions = list(dict.fromkeys(parse_resolution(text) for text in args.resolution))
    for name in ("batch", "repeats", "warmup", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise _usage_error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.steps < 0:
        raise _usage_error(f"--steps must be >= 0, got {args.steps}")
    device = resolve_device(args.device)
    try:
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as e:
        raise _usage_error(f"--dtype: {e}") from None
    if args.model:
        try:  # a missing folder or an unknown hub id is reported before anything is built
            check_model_reference(args.model)
        except ValueError as e:
            raise _usage_error(str(e)) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _usage_error(f"--out {out} exists and is not a folder")
    if not args.overwrite:
        names = OUTPUT_FILES + (("profile.md",) if args.profile else ())
        existing = [name for name in names if (out / name).exists()]
        if existing:
            raise _usage_error(
                f"{out / existing[0]} already exists: choose another --out or pass --overwrite"
            )
    return Settings(
        archs=archs, model=args.model, methods=methods, ratios=ratios, resolutions=resolutions,
        batch=args.batch, dtype=dtype, device=device, repeats=args.repeats, warmup=args.warmup,
        steps=args.steps, prompt=args.prompt, seed=args.seed, threads=args.threads, out=out,
        overwrite=args.overwrite, profile=args.profile, configs=configs,
    )


def command_line(settings: Settings) -> str:
    """The exact command that reproduces this run."""
    parts = ["agentsd", "bench"]
    if settings.model:
        parts += ["--model", settings.model, "--steps", str(settings.steps), "--prompt", settings.prompt]
    else:
        parts += ["--random-weights", "--arch", *settings.archs]
    parts += ["--methods", *settings.methods, "--ratios", *map(str, settings.ratios)]
    parts += ["--resolution", *(str(w) if w == h else f"{w}x{h}" for w, h in settings.resolutions)]
    parts += ["--batch", str(settings.batch), "--dtype", settings.dtype_name]
    parts += ["--device", str(settings.device), "--repeats", str(settings.repeats)]
    parts += ["--warmup", str(settings.warmup), "--seed", str(settings.seed)]
    if settings.threads:
        parts += ["--threads", str(settings.threads)]
    if settings.profile:
        parts.append("--profile")
    parts += ["--out", str(settings.out)]
    return shlex.join(parts)


# ------------------------------------------------------------------------------------------- schedule


@dataclass
class Phase:
    """One phase of AgentSD's default schedule on a 50-step run."""

    name: str  # "agent", "tome" or "full"
    timestep: int  # the first timestep of the run in this phase; the one timed
    steps: int  # number of denoising steps in this phase

    @property
    def weight(self) -> float:
        return self.steps / SCHEDULE_STEPS


def default_schedule(seed: int = 0) -> list[Phase]:
    """Phases of ``apply_patch``'s default schedule over a 50-step PNDM (PLMS) run, as it really runs.

    A tiny UNet, patched with the defaults, is driven with the 51 UNet calls of Stable Diffusion's
    PNDM scheduler at 50 steps (a bare UNet's progress is ``1 - t/1000``), and the steps of each phase
    are counted from :func:`agentsd.phase_history`: 20 agent, 30 ToMe with the defaults. The phase of
    a step depends only on its timestep and the schedule, not on the UNet.
    """
    from diffusers import PNDMScheduler

    import agentsd
    from agentsd.tools.archs import build_unet, step_inputs, unet_config

    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        steps_offset=1, set_alpha_to_one=False,
    )
    scheduler.set_timesteps(SCHEDULE_STEPS)
    unet = build_unet(unet_config("tiny"), torch.float32, torch.device("cpu"), seed=seed)
    inputs = step_inputs(unet, batch=2, height=64, width=64, seed=seed)
    agentsd.apply_patch(unet, seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads would only add hand-off latency
    try:
        with torch.inference_mode():
            for t in scheduler.timesteps:
                unet(timestep=t, **inputs)
    finally:
        torch.set_num_threads(threads)
    steps = agentsd.phase_history(unet)
    calls = agentsd.phase_history(unet, per_call=True)
    if len(steps) != SCHEDULE_STEPS or len(calls) != len(scheduler.timesteps):
        raise RuntimeError(
            f"phase_history gave {len(steps)} steps / {len(calls)} calls for a {SCHEDULE_STEPS}-step "
            f"run of {len(scheduler.timesteps)} UNet calls"
        )
    phases = []
    for name in dict.fromkeys(steps):
        first = calls.index(name)
        phases.append(Phase(name, int(scheduler.timesteps[first]), steps.count(name)))
    return phases


# --------------------------------------------------------------------------------------------- methods


class ZeroSelfAttention:
    """An attention processor that costs nothing: it returns zeros, so the block's residual passes through."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return torch.zeros_like(hidden_states)


def patch_level(unet) -> int:
    """The downsampling level AgentSD patches by default (1 for SD 1.x/2.x, 2 for SDXL)."""
    import agentsd

    default = set(agentsd.patch_targets(unet))
    for level in (1, 2, 4, 8):
        if set(agentsd.patch_targets(unet, max_downsample=level)) == default:
            return level
    raise RuntimeError("patch_targets() with no limit patches levels below /8")


def _fingerprint(unet) -> tuple:
    """What a patch changes: processors, module classes (tomesd swaps them) and hooks."""
    modules = list(unet.modules())
    return (
        tuple((name, id(processor)) for name, processor in unet.attn_processors.items()),
        tuple(type(module).__name__ for module in modules),
        sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules),
    )


@dataclass
class Spec:
    """One row: a method at a ratio (None for ratio-free methods)."""

    method: str
    ratio: float | None

    @property
    def key(self) -> str:
        return self.method if self.ratio is None else f"{self.method}@{self.ratio:g}"


def plan(settings: Settings) -> list[Spec]:
    """Rows in table order: unpatched, each ratio method at each ratio, bound."""
    specs = [Spec("unpatched", None)]
    for method in RATIO_METHODS:
        if method in settings.methods:
            specs += [Spec(method, ratio) for ratio in settings.ratios]
    if "bound" in settings.methods:
        specs.append(Spec("bound", None))
    return specs


def _patcher(spec: Spec, model, level: int, seed: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(apply, remove)`` of ``spec``'s method on ``model`` (a pipeline or a UNet)."""
    import tomesd

    import agentsd

    if spec.method == "unpatched":
        return (lambda: None), (lambda: None)
    if spec.method == "tomesd":
        return (
            lambda: tomesd.apply_patch(model, ratio=spec.ratio, max_downsample=level),
            lambda: tomesd.remove_patch(model),
        )
    if spec.method == "bound":
        targets = list(agentsd.patch_targets(model).values())
        saved: list = []

        def apply() -> None:
            saved[:] = [attn.processor for attn in targets]
            for attn in targets:
                attn.set_processor(ZeroSelfAttention())

        def remove() -> None:
            for attn, processor in zip(targets, saved, strict=True):
                attn.set_processor(processor)

        return apply, remove
    phases = {
        "agentsd-agent": dict(agent_until=1.0, merge_until=1.0),
        "agentsd-tome": dict(agent_until=0.0),
        "agentsd": {},
    }[spec.method]
    return (
        lambda: agentsd.apply_patch(model, ratio=spec.ratio, seed=seed, **phases),
        lambda: agentsd.remove_patch(model),
    )


def _restoring(remove: Callable[[], None], unet, key: str) -> Callable[[], None]:
    """``remove``, then a check that the UNet is exactly as before the patch (processors, classes, hooks)."""
    reference = _fingerprint(unet)

    def teardown() -> None:
        remove()
        if _fingerprint(unet) != reference:
            raise RuntimeError(f"removing {key} did not restore the UNet exactly")

    return teardown


def _expected_phases(spec: Spec, schedule: list[Phase]) -> list[str] | None:
    return {
        "agentsd-agent": ["agent"],
        "agentsd-tome": ["tome"],
        "agentsd": [phase.name for phase in schedule],
    }.get(spec.method)


def step_case(spec: Spec, unet, inputs: dict, schedule: list[Phase], level: int, seed: int):
    """The timing case of one UNet step of ``spec`` (two weighted steps for the schedule)."""
    import agentsd
    from agentsd.tools.bench.timing import Case

    apply, remove = _patcher(spec, unet, level, seed)

    sample = inputs["sample"]
    rest = {name: value for name, value in inputs.items() if name != "sample"}

    def forward(t: int) -> Callable[[], object]:
        # sample and timestep positionally, as pipelines call the UNet (tomesd's hook needs it so)
        return lambda: unet(sample, t, return_dict=False, **rest)

    if spec.method == "agentsd":
        calls = [(forward(phase.timestep), phase.weight) for phase in schedule]
    else:
        calls = [(forward(schedule[0].timestep), 1.0)]

    expected = _expected_phases(spec, schedule)

    def check() -> None:
        ran = agentsd.phase_history(unet, per_call=True)
        if ran != expected:
            raise RuntimeError(f"{spec.key} ran the phases {ran}, expected {expected}")

    return Case(key=spec.key, calls=calls, setup=apply, teardown=_restoring(remove, unet, spec.key),
                check=check if expected else None)


def generation_case(spec: Spec, pipe, settings: Settings, width: int, height: int, level: int):
    """The timing case of one whole generation of ``spec`` (seconds per image)."""
    import agentsd
    from agentsd.tools.bench.timing import Case

    apply, remove = _patcher(spec, pipe, level, settings.seed)
    images = max(1, settings.batch // 2)

    def generate() -> None:
        generator = torch.Generator(settings.device).manual_seed(settings.seed)
        pipe(
            settings.prompt, height=height, width=width, num_inference_steps=settings.steps,
            num_images_per_prompt=images, generator=generator, output_type="np",
        )

    def check() -> None:
        ran = agentsd.phase_history(pipe)
        only = {"agentsd-agent": {"agent"}, "agentsd-tome": {"tome"}}.get(spec.method)
        if len(ran) != settings.steps or (only is not None and set(ran) != only):
            raise RuntimeError(f"generation with {spec.key} ran the phases {ran}")

    return Case(key="generate:" + spec.key, calls=[(generate, 1.0 / images)], setup=apply,
                teardown=_restoring(remove, pipe.unet, "generate:" + spec.key),
                check=check if spec.method.startswith("agentsd") else None)


# ----------------------------------------------------------------------------------------------- run


@dataclass
class Row:
    arch: str
    width: int
    height: int
    method: str
    ratio: float | None
    step_s: float
    rounds: list[float]
    peak_bytes: int | None
    generate_s: float | None = None
    x_vs_unpatched: float | None = None
    bound_fraction: float | None = None
    x_less_memory: float | None = None


def _load_pipeline(settings: Settings):
    from agentsd.tools.loading import load_pipeline

    pipe = load_pipeline(settings.model, dtype=settings.dtype, device=settings.device)
    if getattr(pipe, "unet", None) is None:
        raise _usage_error(f"--model {settings.model} has no UNet (AgentSD patches UNet pipelines)")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _model_label(model: str) -> str:
    return Path(model.rstrip("/")).name or model


def run(args: argparse.Namespace) -> int:
    """Entry point of ``agentsd bench``."""
    settings = validate(args)
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings)
    finally:
        torch.set_num_threads(threads)


def _run(settings: Settings) -> int:
    from tqdm.auto import tqdm

    from agentsd.tools.archs import VAE_SCALE_FACTOR, arch_label, build_unet, step_inputs
    from agentsd.tools.bench.timing import run_interleaved, total_calls

    schedule = default_schedule(settings.seed)
    specs = plan(settings)
    with_generation = bool(settings.model and settings.steps)
    sources = [settings.model] if settings.model else settings.archs
    groups = len(sources) * len(settings.resolutions)
    bar = None  # made when measuring starts, so an error before prints one line only

    rows: list[Row] = []
    notes: dict[str, str] = {}
    profiles: list[str] = []
    try:
        for source in sources:
            if settings.model:
                pipe = _load_pipeline(settings)
                unet, vae_factor, label = pipe.unet, pipe.vae_scale_factor, _model_label(source)
            else:
                pipe = None
                unet = build_unet(settings.configs[source], settings.dtype, settings.device, settings.seed)
                vae_factor, label = VAE_SCALE_FACTOR, arch_label(source)
            level = patch_level(unet)
            notes[label] = _tomesd_note(label, level)
            # everything this model cannot run is reported before anything is measured
            for width, height in settings.resolutions:
                if width % vae_factor or height % vae_factor:
                    raise _usage_error(
                        f"--resolution {width}x{height}: {label}'s VAE needs multiples of {vae_factor}"
                    )
            try:
                step_inputs(unet, 1, vae_factor, vae_factor, vae_factor)
            except ValueError as e:
                raise _usage_error(f"{label}: {e}") from None
            for width, height in settings.resolutions:
                inputs = step_inputs(unet, settings.batch, height, width, vae_factor, settings.seed)
                cases = [step_case(s, unet, inputs, schedule, level, settings.seed) for s in specs]
                if with_generation:
                    cases += [generation_case(s, pipe, settings, width, height, level) for s in specs]

                if bar is None:  # every group has the same cases
                    total = groups * total_calls(cases, settings.repeats, settings.warmup)
                    bar = tqdm(total=total, unit="run", desc="bench")
                bar.set_description(f"{label} {width}x{height}")

                def advance(key: str, bar=bar) -> None:
                    bar.set_postfix_str(key, refresh=False)
                    bar.update(1)
                with torch.inference_mode():
                    found = run_interleaved(
                        cases, settings.device, settings.repeats, settings.warmup, advance
                    )
                group = []
                for spec in specs:
                    measured = found[spec.key]
                    generated = found.get("generate:" + spec.key)
                    group.append(Row(
                        arch=label, width=width, height=height, method=spec.method, ratio=spec.ratio,
                        step_s=measured.median, rounds=measured.times, peak_bytes=measured.peak_bytes,
                        generate_s=generated.median if generated else None,
                    ))
                _relate(group)
                rows += group
                if settings.profile:
                    title = f"{label} {width}x{height}"
                    profiles.append(_profile(cases[: len(specs)], unet, settings, title))
            del unet, pipe
    finally:
        if bar is not None:
            bar.close()

    from agentsd.tools.bench.report import write_outputs

    table = write_outputs(rows, settings, schedule, notes, command_line(settings))
    if profiles:
        mode = "w" if settings.overwrite else "x"
        with open(settings.out / "profile.md", mode, encoding="utf-8") as f:
            f.write(f"# agentsd bench --profile\n\n- command: `{command_line(settings)}`\n\n")
            f.write("\n".join(profiles))
    print(table)
    return 0


def _profile(cases, unet, settings: Settings, title: str) -> str:
    """profile.md section of one arch x resolution: one more run of each method's step."""
    import agentsd
    from agentsd.tools.bench.profiling import profile_case, profile_report

    patched = list(agentsd.patch_targets(unet).values())
    with torch.inference_mode():
        results = {case.key: profile_case(case, unet, patched, settings.device) for case in cases}
    return profile_report(results, title)


def _tomesd_note(label: str, level: int) -> str:
    if level == 1:
        return f"tomesd on {label}: max_downsample=1 (its default), the level AgentSD patches"
    return (
        f"tomesd on {label}: max_downsample={level}, the level AgentSD patches (tomesd's default "
        f"max_downsample=1 would patch nothing: this UNet has no attention at full resolution)"
    )


def _relate(group: list[Row]) -> None:
    """Fill the ratios of each row of one arch × resolution against unpatched and bound."""
    reference = next(row for row in group if row.method == "unpatched")
    bound = next((row for row in group if row.method == "bound"), None)
    for row in group:
        row.x_vs_unpatched = reference.step_s / row.step_s if row.step_s > 0 else None
        if bound is not None and row.step_s > 0:
            row.bound_fraction = bound.step_s / row.step_s
        if reference.peak_bytes and row.peak_bytes and row.peak_bytes > 0:
            row.x_less_memory = reference.peak_bytes / row.peak_bytes


def machine_description(device: torch.device) -> str:
    """The accelerator or CPU model, cores and torch threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def versions() -> str:
    found = []
    for package in ("agentsd", "torch", "diffusers", "tomesd"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            if package == "agentsd":
                from agentsd import __version__

                found.append(f"agentsd {__version__}")
    return ", ".join(found)
