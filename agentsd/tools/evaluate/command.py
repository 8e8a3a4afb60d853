"""``agentsd eval``: the paper's quality / speed / memory table for any model, on any hardware.

For every method (:mod:`agentsd.tools.methods`) the same pipeline makes the same images (same
prompts, same seeds), one method at a time; runs resume from the complete images on disk. Under
``accelerate launch`` the images are sharded across processes; the metrics are computed once, on
the main process. Here: the run across processes and the command line; the parts are in
:mod:`.config`, :mod:`.manifest`, :mod:`.generation`, :mod:`.metrics` and :mod:`.report`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from agentsd.tools import options
from agentsd.tools.errors import UsageError, require_extra, user_input
from agentsd.tools.evaluate import config, images, manifest, metrics, report
from agentsd.tools.evaluate.config import EvalConfig, Plan
from agentsd.tools.evaluate.generation import generate_all
from agentsd.tools.files import remove_stale_temporaries

HELP = "reproduce the paper's FID / CLIP / time / memory table (resumable, multi-GPU via accelerate)"
DESCRIPTION = ("Generate the same images unpatched, with ToMeSD and with AgentSD at several ratios, then "
               "add their rows to results.md, results.csv and fid_vs_time.png in --out. Resumes from the "
               "images on disk; shard across GPUs with `accelerate launch -m agentsd eval ...`.")


@dataclass
class EvalResult:
    """What :func:`run_eval` wrote on the main process."""

    rows: list[report.Row]  # the whole table: this run's rows merged with those in results.csv
    paths: list[Path]  # results.csv, fid_vs_time.png, results.md


def _prepare_on_main(plan: Plan, fid_feature: int | nn.Module, device: torch.device):
    """Main process: ``(fid metric, clip metric, reference images fed, {method: missing indices})``,
    ``None`` for what is not computed. Nothing is written: the folder appears once the model loads."""
    cfg = plan.config
    fid = clip = real_count = None
    if cfg.fid and cfg.ref_dir is not None:
        metrics.feed_reference(cfg.ref_dir, plan.size)  # fails fast, before the FID model is built
    if cfg.fid:
        fid = metrics.fid_metric(fid_feature, cfg.fid_weights if isinstance(fid_feature, int) else None)
        if cfg.ref_dir is not None:
            real_count = metrics.feed_reference(cfg.ref_dir, plan.size, fid, device)
            needed = int(getattr(fid_feature, "num_features", 0) if isinstance(fid_feature, nn.Module)
                         else fid_feature)
            if real_count < needed:
                metrics.warn(f"--ref-dir has {real_count} readable images; FID with {needed} features needs "
                             f"at least {needed} for a stable estimate (the paper used 50,000)")
    if cfg.clip:
        clip = metrics.clip_metric(cfg.clip_model)
    with user_input():
        report.read_csv(plan.out / "results.csv")  # unreadable results are reported before generating
    if plan.out.is_dir():
        manifest.adopt_legacy_folders(plan.out, plan.methods)
        remove_stale_temporaries(plan.out)
    missing = {}
    for method in plan.methods:
        remove_stale_temporaries(plan.out / method.slug)
        missing[method] = images.missing_indices(plan.out / method.slug, cfg.num_images, plan.size)
    return fid, clip, real_count, missing


def run_eval(cfg: EvalConfig, *, fid_feature: int | nn.Module = metrics.FID_FEATURES) -> EvalResult | None:
    """Make every method's images (resuming), time them, compute FID / CLIP score, write the results;
    returns the :class:`EvalResult` on the main process, ``None`` on the others.

    Args:
        cfg: the run's settings.
        fid_feature: 2048 (InceptionV3 pool features, needs torch-fidelity; recommended) or an
            ``nn.Module`` mapping uint8 ``(B, 3, H, W)`` images to ``(B, D)`` features.

    Raises:
        UsageError: bad settings, prompts, model, reference images or output folder (one line),
            raised before any model is loaded and before anything is written where possible.
    """
    require_extra("eval")
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    from agentsd.tools.loading import load_pipeline, resolve_dtype, set_scheduler
    from agentsd.tools.measure import memory_method

    plan = config.check(cfg)  # identically on every process
    # PartialState uses gloo for CPU processes only when told to (Accelerator reads ACCELERATE_USE_CPU,
    # set by `accelerate launch --cpu`; PartialState does not); without CUDA there is nothing else.
    # The others wait while the main process checks --ref-dir, downloads the metric models and scans
    # the images on disk (minutes on a big run), and while it times each method: hence the long timeout.
    state = PartialState(
        cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available(),
        timeout=timedelta(hours=2),
    )
    device = plan.device
    if state.num_processes > 1:
        if cfg.device != "auto":
            raise UsageError(f"--device {cfg.device} cannot be used with {state.num_processes} processes: "
                             "accelerate gives each process its device")
        device = state.device
    dtype = resolve_dtype(cfg.dtype, device)
    made_with = manifest.build(plan, dtype)
    manifest.check_resume(plan.out, made_with)
    main = state.is_main_process

    # What can still fail is done by the main process alone, and its outcome handed to everyone:
    # no process is left waiting on one that failed.
    fid = clip = real_count = None
    shared: list = [None, None]
    if main:
        try:
            fid, clip, real_count, missing = _prepare_on_main(plan, fid_feature, device)
            shared = [None, missing]
        except UsageError as e:
            shared = [str(e), None]
    broadcast_object_list(shared)
    error, missing = shared
    if error is not None:
        raise UsageError(error)

    pipe = load_pipeline(cfg.model, dtype=dtype, device=device, progress=cfg.progress and main)
    set_scheduler(pipe, cfg.scheduler)
    options.check_schedule(pipe.scheduler, None, cfg.steps)  # again: a hub model's config was not at hand
    pipe.set_progress_bar_config(disable=True)
    if main:  # the folder appears only once the model has loaded
        for method in plan.methods:
            (plan.out / method.slug).mkdir(parents=True, exist_ok=True)
        manifest.write(plan.out, made_with)
    state.wait_for_everyone()
    show = cfg.progress and main
    rows = generate_all(pipe, plan, state, missing, device, show)
    state.wait_for_everyone()
    if not main:
        return None

    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    metrics.compute_metrics(plan, rows, fid, clip, real_count, device, show)
    lines = report.header(plan, dtype, fid, fid_feature, real_count, device, state.num_processes)
    table, paths = report.write(plan.out, [rows[m] for m in plan.methods], lines, memory_method(device))
    return EvalResult(rows=table, paths=paths)


# ---------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``agentsd eval`` and its flags."""
    return options.add_command(subparsers, "eval", EvalConfig, run, help=HELP, description=DESCRIPTION)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The :class:`EvalConfig` of parsed flags."""
    return options.config_from_args(EvalConfig, args)


def run(args: argparse.Namespace) -> int:
    """Run ``agentsd eval`` from parsed arguments; prints the table on the main process."""
    result = run_eval(config_from_args(args))
    if result is not None:
        print(result.paths[-1].read_text(encoding="utf-8"))
        print("results: " + ", ".join(str(path) for path in reversed(result.paths)))
    return 0
