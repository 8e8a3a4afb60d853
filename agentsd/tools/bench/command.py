"""``agentsd bench``: speed and memory of AgentSD against the unpatched UNet, ToMeSD and the bound.

For each architecture × resolution, every method runs the same UNet step (same sample, timestep,
text states and SDXL conditioning) on the same UNet, patched and unpatched in turn, round by round
(see :mod:`agentsd.tools.bench.timing`); with ``--measure generation``, whole generations of the
same pipeline (real weights with ``--model``, or the real architecture with random weights). With
``--compile`` each method is also measured with the UNet compiled (see
:mod:`agentsd.tools.bench.compiled`). Results: a markdown table on stdout, ``results.csv``,
``results.md`` and ``speedup.png`` in ``--out``, written after every measured row (see
:mod:`agentsd.tools.bench.output`).

The methods are those of :mod:`agentsd.tools.methods` (``unpatched``, ``tomesd``, ``agentsd``,
``agentsd-agent``, ``agentsd-tome``, ``bound``).

Python use::

    from agentsd.tools.bench import BenchConfig, run_bench
    result = run_bench(BenchConfig(archs=["sdxl"], resolutions=[1024], methods=["agentsd:0.5"]))
    print(result.report)
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agentsd.tools import options
from agentsd.tools.bench.config import (
    COMPILE_BACKENDS,
    DEFAULT_RATIOS,
    MEASURES,
    METHOD_SETTINGS,
    SCHEDULE_STEPS,
    SDPA_KERNELS,
    BenchConfig,
    Plan,
    check_config,
    check_methods_fit,
    resolution_text,
)
from agentsd.tools.bench.report import PENDING, Row
from agentsd.tools.errors import Terminated, UsageError, require_extra, user_input
from agentsd.tools.loading import SCHEDULERS
from agentsd.tools.methods import KINDS, MAX_RATIO


@dataclass
class BenchResult:
    """What :func:`run_bench` measured and wrote.

    Attributes:
        rows: one per method × arch × resolution (and compiled rows with ``compile``).
        report: the markdown report (also in ``paths["results.md"]``).
        profiles: with ``profile``: ``"<arch> <W>x<H>"`` -> method -> what
            :func:`~agentsd.tools.bench.profiling.profile_case` found (also in ``profile.md``).
        paths: file name -> where it was written (``results-2.md`` etc. when a concurrent run wrote
            ``results.md`` into the same folder first).
    """

    rows: list[Row]
    report: str
    paths: dict[str, Path] = field(default_factory=dict)
    profiles: dict[str, dict] = field(default_factory=dict)


def _flag(name: str, value: object) -> list[str]:
    """The flag of an AgentSD setting (as :mod:`agentsd.tools.options` names it) and its value."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + name.replace("_", "-")]
    return [flag, "none" if value is None else str(value)]


def command_line(plan: Plan) -> str:
    """The exact command that reproduces this run."""
    config = plan.config
    parts = ["agentsd", "bench"]
    if config.model:
        parts += ["--model", config.model]
    else:
        parts += ["--random-weights", "--arch", *plan.archs]
    parts += ["--measure", *plan.measure]
    if plan.generations_timed:
        parts += ["--steps", str(config.steps), "--prompt", config.prompt]
        if config.scheduler:
            parts += ["--scheduler", config.scheduler]
    parts += ["--methods", *(m.name for m in plan.methods)]
    parts += ["--resolution", *(resolution_text(w, h) for w, h in plan.resolutions)]
    parts += ["--batch", str(config.batch), "--dtype", plan.dtype_name]
    parts += ["--device", str(plan.device), "--repeats", str(config.repeats)]
    parts += ["--warmup", str(config.warmup), "--seed", str(config.seed)]
    if config.sdpa_kernel != "default":
        parts += ["--sdpa-kernel", config.sdpa_kernel]
    for name, value in plan.patch.items():
        parts += _flag(name, value)
    if config.threads:
        parts += ["--threads", str(config.threads)]
    if config.profile:
        parts.append("--profile")
    if config.compile:
        parts += ["--compile", "--compile-backend", config.compile_backend]
    parts += ["--out", str(plan.out)]
    if config.append:
        parts.append("--append")
    return shlex.join(parts)


def _prepare_pipeline(pipe, plan: Plan, what: str):
    """The scheduler of ``--scheduler`` (a PNDM model runs as PLMS), no progress bar."""
    from agentsd.tools.loading import set_scheduler

    if getattr(pipe, "unet", None) is None:
        raise UsageError(f"{what} has no UNet (AgentSD patches UNet pipelines)")
    if plan.config.scheduler is not None:
        set_scheduler(pipe, plan.config.scheduler)
    elif type(pipe.scheduler).__name__ == "PNDMScheduler":
        set_scheduler(pipe, "pndm")  # PLMS, the paper's sampler, whatever the model's config says
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_pipeline(plan: Plan):
    from agentsd.tools.loading import load_pipeline

    pipe = load_pipeline(plan.config.model, dtype=plan.dtype, device=plan.device)
    return _prepare_pipeline(pipe, plan, f"--model {plan.config.model}")


def _scheduler_name(pipe) -> str:
    name = type(pipe.scheduler).__name__
    if name == "PNDMScheduler" and pipe.scheduler.config.get("skip_prk_steps"):
        name += " (PLMS)"
    return name


def _model_label(model: str) -> str:
    return Path(model.rstrip("/")).name or model


def _tomesd_note(label: str, level: int, given: bool = False) -> str:
    if given:
        return f"tomesd on {label}: max_downsample={level}, as --max-downsample gives every AgentSD method"
    if level == 1:
        return f"tomesd on {label}: max_downsample=1 (its default), the level AgentSD patches"
    return (
        f"tomesd on {label}: max_downsample={level}, the level AgentSD patches (tomesd's default "
        f"max_downsample=1 would patch nothing: this UNet has no attention at full resolution)"
    )


def run_bench(config: BenchConfig) -> BenchResult:
    """Measure every method of ``config`` and write the results to ``config.out``.

    Everything that can be checked is checked before any model is built or loaded, ``--out``
    included (see :func:`~agentsd.tools.bench.config.check_config`); the results are written
    atomically and never replace a concurrent run's (see :func:`~agentsd.tools.bench.report.publish`).

    Raises:
        UsageError: a setting, model or output folder the user can fix (one line).
    """
    from agentsd.tools.bench.timing import sdpa_kernel

    require_extra("bench")
    plan = check_config(config)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        with sdpa_kernel(config.sdpa_kernel):
            return _run(plan)
    finally:
        torch.set_num_threads(threads)


def _planned_rows(plan: Plan, labels: dict[str, str]) -> list[Row]:
    """Every row the run will measure, in table order, all ``pending``."""
    rows = []
    for label in labels.values():
        for width, height in plan.resolutions:
            for compiled in (False, True) if plan.config.compile else (False,):
                rows += [Row(arch=label, width=width, height=height, method=method, step_s=None,
                             compiled=compiled, status=PENDING) for method in plan.methods]
    return rows


def _stop_reason(error: BaseException) -> str:
    from agentsd.tools.bench.compiled import first_line

    if isinstance(error, Terminated):
        return "terminated (SIGTERM)"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return first_line(error)


def _run(plan: Plan) -> BenchResult:
    from agentsd.tools.archs import arch_label
    from agentsd.tools.bench.cases import default_schedule
    from agentsd.tools.bench.output import ResultFiles
    from agentsd.tools.bench.profiling import profile_report
    from agentsd.tools.bench.report import csv_text, plot, report_text

    config = plan.config
    sources = [config.model] if config.model else plan.archs
    labels = {source: _model_label(source) if config.model else arch_label(source) for source in sources}
    rows = _planned_rows(plan, labels)
    command = command_line(plan)
    notes: dict[str, str] = {}
    profiles: dict[str, dict] = {}
    state = {"report": "", "stopped": None}

    with ResultFiles(plan.out, overwrite=config.overwrite, append=config.append) as files:
        schedule = default_schedule(config.seed)

        def write(final: bool = False) -> None:
            """Every row so far, the missing ones marked pending; the plot on the first and last write."""
            state["report"] = report_text(rows, plan, schedule, notes, command, state["stopped"])
            contents: dict = {"results.md": state["report"], "results.csv": csv_text(rows, plan)}
            if profiles:
                sections = [profile_report(found, title) for title, found in profiles.items()]
                contents["profile.md"] = (f"# agentsd bench --profile\n\n- command: `{command}`\n\n"
                                          + "\n".join(sections))
            if not config.append and (final or not files.paths):
                contents["speedup.png"] = lambda f: plot(rows, plan, f)
            files.write(contents)

        try:
            _measure_all(plan, sources, labels, rows, schedule, notes, profiles, write)
        except BaseException as error:
            if files.paths:  # the rows measured so far stay, and the files say the run stopped
                state["stopped"] = _stop_reason(error)
                try:
                    write(final=True)
                except Exception:  # the original error matters more (e.g. the disk filled up)
                    pass
            raise
        write(final=True)
    return BenchResult(rows=rows, report=state["report"], paths=files.paths, profiles=profiles)


def _measure_all(plan: Plan, sources: list[str], labels: dict[str, str], rows: list[Row], schedule,
                 notes: dict[str, str], profiles: dict[str, dict], write) -> None:
    """Measure every group (model x resolution) into ``rows``, calling ``write()`` after each row."""
    from tqdm.auto import tqdm

    from agentsd.tools.archs import VAE_SCALE_FACTOR, build_unet, step_inputs
    from agentsd.tools.bench.cases import generation_case, generation_images, step_case
    from agentsd.tools.bench.compiled import calls_per_method, compiled_row
    from agentsd.tools.bench.report import relate
    from agentsd.tools.bench.timing import run_interleaved, total_calls
    from agentsd.tools.methods import patch_level
    from agentsd.tools.pipelines import build_pipeline

    config = plan.config
    index = {(row.arch, row.width, row.height, row.method, row.compiled): i for i, row in enumerate(rows)}
    groups = len(sources) * len(plan.resolutions)
    max_downsample = plan.patch.get("max_downsample")
    images = generation_images(config.batch)
    bar = None  # made when measuring starts, so an error before prints one line only
    try:
        for source in sources:
            label = labels[source]
            if config.model:
                pipe = _load_pipeline(plan)
                unet, vae_factor = pipe.unet, pipe.vae_scale_factor
            elif plan.generations_timed:
                pipe = _prepare_pipeline(build_pipeline(source, plan.dtype, plan.device, config.seed), plan,
                                         f"--arch {source}")
                unet, vae_factor = pipe.unet, pipe.vae_scale_factor
            else:
                pipe = None
                unet = build_unet(plan.configs[source], plan.dtype, plan.device, config.seed)
                vae_factor = VAE_SCALE_FACTOR
            scheduler = _scheduler_name(pipe) if pipe is not None else None
            notes[label] = _tomesd_note(label, patch_level(unet, max_downsample), max_downsample is not None)
            # everything this model cannot run is reported before anything is measured
            for width, height in plan.resolutions:
                if width % vae_factor or height % vae_factor:
                    raise UsageError(
                        f"--resolution {width}x{height}: {label}'s VAE needs multiples of {vae_factor}"
                    )
            with user_input(f"{label}: "):
                step_inputs(unet, 1, vae_factor, vae_factor, vae_factor)
            check_methods_fit(label, unet, plan.resolutions, plan.methods, max_downsample)
            for width, height in plan.resolutions:
                inputs = step_inputs(unet, config.batch, height, width, vae_factor, config.seed)
                cases = []
                if plan.steps_timed:
                    cases += [step_case(m, unet, inputs, schedule, config.seed, plan.patch)
                              for m in plan.methods]
                if plan.generations_timed:
                    cases += [
                        generation_case(m, pipe, device=plan.device, batch=config.batch, steps=config.steps,
                                        prompt=config.prompt, seed=config.seed, width=width, height=height,
                                        settings=plan.patch)
                        for m in plan.methods
                    ]

                if bar is None:  # every group has the same cases
                    per_group = total_calls(cases, config.repeats, config.warmup)
                    if config.compile:
                        per_group += sum(calls_per_method(m, schedule, plan) for m in plan.methods)
                    bar = tqdm(total=groups * per_group, unit="run", desc="bench",
                               disable=not config.progress)
                bar.set_description(f"{label} {width}x{height}")

                def advance(key: str, bar=bar) -> None:
                    bar.set_postfix_str(key, refresh=False)
                    bar.update(1)

                with torch.inference_mode():
                    found = run_interleaved(cases, plan.device, config.repeats, config.warmup, advance)
                group = []
                for method in plan.methods:
                    measured = found.get(method.name)
                    generated = found.get("generate:" + method.name)
                    row = Row(arch=label, width=width, height=height, method=method,
                              step_s=measured.median if measured else None,
                              rounds=measured.times if measured else [],
                              peak_bytes=measured.peak_bytes if measured else None)
                    if generated:
                        row.generate_s, row.generate_rounds = generated.median, generated.times
                        if generated.peak_bytes is not None:
                            row.generate_peak_bytes = generated.peak_bytes // images
                        row.scheduler = scheduler
                    group.append(row)
                relate(group)
                for row in group:
                    rows[index[(label, width, height, row.method, False)]] = row
                if config.profile and plan.steps_timed:
                    title = f"{label} {width}x{height}"
                    profiles[title] = _profile(cases[: len(plan.methods)], unet, plan)
                write()
                if config.compile:
                    for method in plan.methods:
                        with torch.inference_mode():
                            row = compiled_row(method, unet, inputs, schedule, plan, label, width, height,
                                               advance)
                        group.append(row)
                        relate(group)
                        rows[index[(label, width, height, method, True)]] = row
                        write()
            del unet, pipe
    finally:
        if bar is not None:
            bar.close()


def _profile(cases, unet, plan: Plan) -> dict:
    """One more run of each method's step under the profiler: method -> what profile_case found."""
    import agentsd
    from agentsd.tools.bench.profiling import profile_case

    patched = list(agentsd.patch_targets(unet, max_downsample=plan.patch.get("max_downsample")).values())
    with torch.inference_mode():
        return {case.key: profile_case(case, unet, patched, plan.device) for case in cases}


# --------------------------------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``agentsd bench`` and its flags."""
    parser = subparsers.add_parser(
        "bench",
        help="time and measure AgentSD against the unpatched UNet, tomesd and the attainable bound",
        description=(
            "Time one UNet denoising step and/or whole generations (--measure) for each method, "
            "architecture and resolution, interleaving the methods round by round on the same inputs. "
            "Prints a markdown table and writes results.csv, results.md and speedup.png to --out, after "
            "every measured row (rows not measured yet are marked pending)."
        ),
    )
    defaults = BenchConfig()
    source = parser.add_argument_group("model (one of)")
    source.add_argument(
        "--random-weights", action="store_true",
        help="build the real architectures of --arch with random weights (speed does not depend on the "
             "weights; runs offline): the UNet, and for --measure generation the whole pipeline",
    )
    source.add_argument(
        "--model", metavar="ID_OR_PATH",
        help="a diffusers pipeline (hub id or folder) with real weights; times whole generations too",
    )
    parser.add_argument(
        "--measure", nargs="+", choices=MEASURES, metavar="WHAT",
        help="what to time: step (one UNet denoising step) and/or generation (whole generations: seconds "
             "and peak memory per image). Default: step with --random-weights, step generation with "
             "--model",
    )
    parser.add_argument(
        "--arch", nargs="+", metavar="ARCH",
        help="with --random-weights: sd15, sd21, sdxl, tiny, tiny-xl or a UNet config.json (default sd15)",
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(KINDS), metavar="METHOD",
        help=f"methods to run: {', '.join(KINDS)} (each ratio method at every --ratios), or a spec with "
             "its own ratio such as agentsd:0.3 (default all; unpatched is always run as the reference)",
    )
    parser.add_argument(
        "--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS), metavar="R",
        help=f"token merging ratios of tomesd and AgentSD, in [0, {MAX_RATIO}] (default 0.1 to 0.5)",
    )
    parser.add_argument(
        "--resolution", nargs="+", default=["512"], metavar="PX",
        help="image sizes in pixels, SIDE or WIDTHxHEIGHT, multiples of 8 (default 512)",
    )
    parser.add_argument("--batch", type=int, default=defaults.batch,
                        help="UNet batch; 2 = one image with CFG (default)")
    parser.add_argument(
        "--dtype", default="auto", help="fp32, fp16, bf16 or auto (fp16 on CUDA, fp32 on CPU; default)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--repeats", type=int, default=defaults.repeats,
                        help="timed rounds; the median is reported (3)")
    parser.add_argument(
        "--warmup", type=int, default=defaults.warmup,
        help="untimed rounds before; memory is probed in the last (1)",
    )
    parser.add_argument(
        "--steps", type=int, default=SCHEDULE_STEPS,
        help="denoising steps of each timed generation (50); with --model and no --measure, 0 skips "
             "generations",
    )
    parser.add_argument(
        "--scheduler", choices=list(SCHEDULERS), metavar="NAME",
        help=f"scheduler of the generations: {', '.join(SCHEDULERS)} (pndm = PLMS, the paper's); default "
             "the model's own (a PNDM model always runs as PLMS)",
    )
    parser.add_argument("--prompt", default=defaults.prompt, help="prompt of the timed generations")
    parser.add_argument(
        "--sdpa-kernel", default=defaults.sdpa_kernel, choices=SDPA_KERNELS,
        help="SDPA kernel every method is held to: default (torch's choice: flash or memory-efficient where "
             "they apply) or math (the softmax materialised, as the paper's baseline)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for torch (default: torch's own choice, one per core)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the patches (0)")
    parser.add_argument(
        "--out", default=str(defaults.out), help="folder for results.csv, results.md, speedup.png"
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="after timing, run each method once more under torch.profiler and write profile.md: time per "
             "kind of module and the top operators",
    )
    parser.add_argument(
        "--compile", action="store_true",
        help="also time every method with the UNet compiled by torch.compile: step time, compile time of "
             "the first call, and graph breaks from torch._dynamo.explain",
    )
    parser.add_argument(
        "--compile-backend", default=defaults.compile_backend, choices=COMPILE_BACKENDS,
        help="torch.compile backend of --compile (default inductor)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace result files already in --out")
    parser.add_argument(
        "--append", action="store_true",
        help="add this run's table and rows to results.md and results.csv already in --out (no speedup.png)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    options.add_patch_arguments(parser, reserved=(), exclude=METHOD_SETTINGS).description = (
        "every AgentSD method runs with these settings; ratio and the phases come from the methods, the "
        "patch seed is --seed; --max-downsample is also the level tomesd patches and bound empties")
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed flags; refuses an ambiguous choice of weights."""
    if args.model and args.random_weights:
        raise UsageError("give either --random-weights or --model, not both")
    if not args.model and not args.random_weights:
        raise UsageError(
            "choose the weights: --random-weights (real architectures, random weights, offline) "
            "or --model ID_OR_PATH (a pipeline with real weights)"
        )
    if args.model and args.arch:
        raise UsageError("--arch goes with --random-weights; with --model the checkpoint sets the UNet")
    return BenchConfig(
        model=args.model, archs=args.arch or ["sd15"], methods=args.methods, ratios=args.ratios,
        resolutions=args.resolution, batch=args.batch, dtype=args.dtype, device=args.device,
        repeats=args.repeats, warmup=args.warmup, measure=args.measure, steps=args.steps,
        scheduler=args.scheduler, prompt=args.prompt, sdpa_kernel=args.sdpa_kernel,
        patch=options.patch_settings(args, exclude=METHOD_SETTINGS), seed=args.seed,
        threads=args.threads, out=args.out, overwrite=args.overwrite, append=args.append,
        profile=args.profile, compile=args.compile, compile_backend=args.compile_backend,
        progress=args.progress,
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``agentsd bench``: prints the report, and where it went if not results.md."""
    result = run_bench(config_from_args(args))
    print(result.report)
    written = result.paths.get("results.md")
    if written is not None and written.name != "results.md":
        print(f"agentsd bench: {written.parent / 'results.md'} was written by another run meanwhile; "
              f"these results are in {written.name} and its siblings")
    return 0
