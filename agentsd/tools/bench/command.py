"""``agentsd bench``: speed and memory of AgentSD against the unpatched UNet, ToMeSD and the bound.

For each architecture × resolution, every method runs the same UNet step (same sample, timestep,
text states and SDXL conditioning) on the same UNet, patched and unpatched in turn, round by round
(see :mod:`agentsd.tools.bench.timing`); with ``--measure generation``, whole generations of the
same pipeline (real weights with ``--model``, or the real architecture with random weights). With
``--compile`` each method is also measured with the UNet compiled (see
:mod:`agentsd.tools.bench.compiled`). Results: a markdown table on stdout; ``results.csv``,
``results.md`` and ``speedup.png`` in ``--out``, this run added to what is there, after every
measured row (see :mod:`agentsd.tools.bench.output`).

The methods are those of :mod:`agentsd.tools.methods` (``unpatched``, ``tomesd``, ``agentsd``,
``agentsd-agent``, ``agentsd-tome``, ``bound``; ``+mlp`` / ``+xattn`` merge the whole block).

Python use::

    from agentsd.tools.bench import BenchConfig, run_bench
    result = run_bench(BenchConfig(archs=["sdxl"], resolution=[1024], methods=["agentsd:0.5"]))
    print(result.report)
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agentsd.tools import options
from agentsd.tools.bench import output
from agentsd.tools.bench.config import (
    METHOD_SETTINGS,
    BenchConfig,
    Plan,
    check_config,
    check_methods_fit,
    resolution_text,
)
from agentsd.tools.bench.report import ASYNC_DEVICES, PENDING, Row
from agentsd.tools.errors import Terminated, UsageError, require_extra, summary, user_input

HELP = "time and measure AgentSD against the unpatched UNet, tomesd and the attainable bound"
DESCRIPTION = ("Time one UNet denoising step and/or whole generations (--measure) for each method, "
               "architecture and resolution, interleaving the methods round by round on the same inputs. "
               "Prints a markdown table and adds this run to results.csv, results.md and speedup.png in "
               "--out after every measured row (rows not measured yet are marked pending); runs into one "
               "folder never replace each other's rows.")


@dataclass
class BenchResult:
    """What :func:`run_bench` measured and wrote.

    Attributes:
        rows: one per method × arch × resolution (and compiled rows with ``compile``).
        report: this run's markdown report (its section of ``results.md``).
        profiles: with ``profile``: ``"<arch> <W>x<H>"`` -> method -> what
            :func:`~agentsd.tools.bench.profiling.profile_case` found (also in ``profile.md``).
        paths: the results files written (every run's results in the folder).
    """

    rows: list[Row]
    report: str
    paths: list[Path] = field(default_factory=list)
    profiles: dict[str, dict] = field(default_factory=dict)


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
    if config.guidance is not None:
        parts += ["--guidance", f"{config.guidance:g}"]
    parts += ["--methods", *(m.name for m in plan.methods)]
    parts += ["--resolution", *(resolution_text(w, h) for w, h in plan.sizes)]
    parts += ["--batch-size", str(config.batch_size), "--dtype", plan.dtype_name]
    parts += ["--device", str(plan.device), "--repeats", str(config.repeats)]
    parts += ["--warmup", str(config.warmup), "--seed", str(config.seed)]
    if config.sdpa_kernel != "default":
        parts += ["--sdpa-kernel", config.sdpa_kernel]
    for name, value in plan.patch.items():  # the flags of options.add_patch_arguments
        flag = "--" + name.replace("_", "-")
        parts += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    if config.threads:
        parts += ["--threads", str(config.threads)]
    if config.profile:
        parts.append("--profile")
    if config.compile:
        parts += ["--compile", "--compile-backend", config.compile_backend]
        parts += ["--compile-mode", config.compile_mode] if config.compile_mode != "default" else []
    parts += ["--out", str(plan.out)]
    return shlex.join(parts)


def _prepare_pipeline(pipe, plan: Plan, what: str):
    """The scheduler of ``--scheduler`` (a PNDM model runs as PLMS), no progress bar."""
    from agentsd.tools.loading import set_scheduler

    if getattr(pipe, "unet", None) is None:
        raise UsageError(f"{what} has no UNet (AgentSD patches UNet pipelines)")
    set_scheduler(pipe, plan.config.scheduler)
    if plan.generations_timed:  # again: a hub model's scheduler config was not at hand before loading
        options.check_schedule(pipe.scheduler, None, plan.config.steps)
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
    included (see :func:`~agentsd.tools.bench.config.check_config`); the results are added to those
    in ``--out`` after every measured row, atomically (see :mod:`agentsd.tools.bench.output`).

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
        for width, height in plan.sizes:
            for compiled in (False, True) if plan.config.compile else (False,):
                rows += [Row(arch=label, width=width, height=height, method=method, step_s=None,
                             compiled=compiled, status=PENDING) for method in plan.methods]
    return rows


def _stop_reason(error: BaseException) -> str:
    if isinstance(error, Terminated):
        return "terminated (SIGTERM)"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return summary(error, 160)


def _run(plan: Plan) -> BenchResult:
    from agentsd.tools.archs import arch_label
    from agentsd.tools.bench.cases import default_schedule
    from agentsd.tools.bench.profiling import profile_report
    from agentsd.tools.bench.report import csv_lines, report_text
    from agentsd.tools.files import folder_for_results, remove_stale_temporaries

    config = plan.config
    sources = [config.model] if config.model else plan.archs
    labels = {source: _model_label(source) if config.model else arch_label(source) for source in sources}
    rows = _planned_rows(plan, labels)
    command = command_line(plan)
    notes: dict[str, str] = {}
    profiles: dict[str, dict] = {}
    run = output.Run(output.new_run_id())
    state = {"stopped": None, "paths": []}

    with folder_for_results(plan.out, "--out") as out:
        remove_stale_temporaries(out)  # left by a run that was killed while writing
        schedule = default_schedule(config.seed)

        def write(final: bool = False) -> None:
            """Every row so far, the missing ones marked pending; the plot on the first and last write."""
            run.report = report_text(rows, plan, schedule, notes, command, state["stopped"])
            run.lines = csv_lines(rows, plan, run.id)
            if profiles:
                run.profile = (f"# agentsd bench --profile\n\n- command: `{command}`\n\n"
                               + "\n".join(profile_report(found, title) for title, found in profiles.items()))
            state["paths"] = output.write(out, run, plot=final or not state["paths"])

        try:
            _measure_all(plan, sources, labels, rows, schedule, notes, profiles, write)
        except BaseException as error:
            if state["paths"]:  # the rows measured so far stay, and the files say the run stopped
                state["stopped"] = _stop_reason(error)
                try:
                    write(final=True)
                except Exception:  # the original error matters more (e.g. the disk filled up)
                    pass
            raise
        write(final=True)
    return BenchResult(rows=rows, report=run.report, paths=state["paths"], profiles=profiles)


def _measure_all(plan: Plan, sources: list[str], labels: dict[str, str], rows: list[Row], schedule,
                 notes: dict[str, str], profiles: dict[str, dict], write) -> None:
    """Measure every group (model x resolution) into ``rows``, calling ``write()`` after each row."""
    from tqdm.auto import tqdm

    from agentsd.tools.archs import VAE_SCALE_FACTOR, build_unet, step_inputs
    from agentsd.tools.bench.cases import generation_case, step_case
    from agentsd.tools.bench.compiled import calls_per_method, compiled_row
    from agentsd.tools.bench.report import relate
    from agentsd.tools.bench.timing import run_interleaved, total_calls
    from agentsd.tools.methods import patch_level
    from agentsd.tools.pipelines import build_pipeline

    config = plan.config
    index = {(row.arch, row.width, row.height, row.method, row.compiled): i for i, row in enumerate(rows)}
    groups = len(sources) * len(plan.sizes)
    max_downsample = plan.patch.get("max_downsample")
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
            for width, height in plan.sizes:
                if width % vae_factor or height % vae_factor:
                    raise UsageError(
                        f"--resolution {width}x{height}: {label}'s VAE needs multiples of {vae_factor}"
                    )
            with user_input(f"{label}: "):
                step_inputs(unet, 1, vae_factor, vae_factor, vae_factor)
            check_methods_fit(label, unet, plan.sizes, plan.methods, max_downsample)
            for width, height in plan.sizes:
                inputs = step_inputs(unet, plan.unet_batch, height, width, vae_factor, config.seed)
                cases = []
                if plan.steps_timed:
                    cases += [step_case(m, unet, inputs, schedule, config.seed, plan.patch)
                              for m in plan.methods]
                if plan.generations_timed:
                    cases += [
                        generation_case(m, pipe, device=plan.device, images=config.batch_size,
                                        steps=config.steps, guidance=config.guidance, prompt=config.prompt,
                                        seed=config.seed, width=width, height=height, settings=plan.patch)
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
                    if measured and plan.device.type in ASYNC_DEVICES:
                        row.host_share = measured.host_share
                    if generated:
                        row.generate_s, row.generate_rounds = generated.median, generated.times
                        if generated.peak_bytes is not None:
                            row.generate_peak_bytes = generated.peak_bytes // config.batch_size
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
    """Register ``agentsd bench``: its flags from :class:`BenchConfig`'s fields, and the patch's."""
    parser = options.add_command(subparsers, "bench", BenchConfig, run, help=HELP, description=DESCRIPTION,
                                 defaults_text={"model": "none: give --model or --random-weights"})
    parser.add_argument("--random-weights", action="store_true",
                        help="the real architectures of --arch with random weights (speed does not depend on "
                             "the weights; runs offline); else give --model")
    options.add_patch_arguments(parser, reserved=(), exclude=METHOD_SETTINGS).description = (
        "every AgentSD method runs with these settings; ratio, the phases and the block merges come from "
        "the methods, the patch seed is --seed; --max-downsample is also the level tomesd patches and bound "
        "empties")
    for flag, message in (
        ("--batch", "is now --batch-size: images per pipeline call (a UNet step is timed at that batch, "
                    "doubled by classifier-free guidance); --batch 2 was --batch-size 1"),
        ("--append", "is gone: every run adds its rows to the results in --out"),
        ("--overwrite", "is gone: a run never replaces another's results; choose an empty --out for a "
                        "table of this run alone"),
        ("--merge-mlp", "is a method spec now: add +mlp to a method (e.g. agentsd:0.4+mlp)"),
        ("--merge-crossattn", "is a method spec now: add +xattn to a method (e.g. agentsd:0.4+xattn)"),
    ):
        options.retire(parser, flag, message, takes_value=flag == "--batch")
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed flags; refuses an ambiguous choice of weights."""
    if args.model and args.random_weights:
        raise UsageError("give either --random-weights or --model, not both")
    if not args.model and not args.random_weights:
        raise UsageError("choose the weights: --random-weights (real architectures, random weights, offline) "
                         "or --model ID_OR_PATH (a pipeline with real weights)")
    return options.config_from_args(BenchConfig, args,
                                    patch=options.patch_settings(args, exclude=METHOD_SETTINGS))


def run(args: argparse.Namespace) -> int:
    """Entry point of ``agentsd bench``: prints this run's report."""
    print(run_bench(config_from_args(args)).report)
    return 0
