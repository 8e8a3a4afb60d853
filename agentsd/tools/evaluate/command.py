"""``agentsd eval``: the paper's quality / speed / memory table for any model, on any hardware.

For every method (unpatched, ToMeSD and AgentSD at several ratios; see :mod:`agentsd.tools.methods`)
the same pipeline makes the same images (same prompts, same seeds), one method at a time, patched
and unpatched again. Images go to ``<out>/<method>/<index>.png``; runs resume from the complete
images on disk, and the results files merge this run's rows with those already there. Under
``accelerate launch`` the images are sharded across processes; the metrics (torchmetrics FID and
CLIP score) are computed once, on the main process, after every shard is done.

The parts: :mod:`.config` (settings and checks), :mod:`.manifest` (what a folder's images were made
with), :mod:`.generation` (images and timing), :mod:`.metrics`, :mod:`.report`; here the run across
processes and the command line.

Python use (e.g. with another FID feature extractor)::

    from agentsd.tools.evaluate import EvalConfig, run_eval
    rows = run_eval(EvalConfig(model="path/to/sd15", out="runs/sd15"), fid_feature=my_module).rows
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
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
from agentsd.tools.evaluate.prompts import DEFAULT_TEMPLATE, IMAGENET
from agentsd.tools.files import remove_stale_temporaries
from agentsd.tools.methods import DEFAULT_METHODS, IMAGE_KINDS, RATIO_KINDS


@dataclass
class EvalResult:
    """What :func:`run_eval` wrote on the main process.

    Attributes:
        rows: the table: this run's methods merged with the rows already in ``results.csv``, in
            table order.
        paths: the files written (results.csv, fid_vs_time.png, results.md).
    """

    rows: list[report.Row]
    paths: list[Path]


def _prepare_on_main(plan: Plan, fid_feature: int | nn.Module, device: torch.device):
    """Main process: metric models, reference images, the folder's state, and the images still to make.

    Returns ``(fid metric or None, clip metric or None, number of reference images or None,
    {method: missing indices})``. Nothing new is written here: the output folder is created once the
    pipeline has loaded.
    """
    cfg = plan.config
    fid = clip = real_count = None
    if cfg.fid and cfg.ref_dir is not None:
        metrics.check_reference(cfg.ref_dir)
    if cfg.fid:
        fid = metrics.fid_metric(fid_feature, cfg.fid_weights if isinstance(fid_feature, int) else None)
        if cfg.ref_dir is not None:
            real_count = metrics.feed_reference(plan, fid, device)
            needed = int(getattr(fid_feature, "num_features", 0) if isinstance(fid_feature, nn.Module)
                         else fid_feature)
            if real_count < needed:
                metrics.warn(f"--ref-dir has {real_count} readable images; FID with {needed} features needs "
                             f"at least {needed} for a stable estimate (the paper used 50,000)")
    if cfg.clip_model is not None:
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


@contextlib.contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """diffusers' and transformers' loading progress bars shown only if ``show`` (``--no-progress``)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if show:
        yield
        return
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def run_eval(cfg: EvalConfig, *, fid_feature: int | nn.Module = metrics.FID_FEATURES) -> EvalResult | None:
    """Make every method's images (resuming), time them, compute FID / CLIP score, write the results.

    Args:
        cfg: the run's settings.
        fid_feature: 2048 (InceptionV3 pool features, needs torch-fidelity; recommended) or an
            ``nn.Module`` mapping uint8 ``(B, 3, H, W)`` images to ``(B, D)`` features.

    Returns:
        On the main process, an :class:`EvalResult` whose rows are the whole table: this run's
        methods merged with the rows already in ``<out>/results.csv``. ``None`` on the others.

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

    with _loading_bars(cfg.progress and main):
        pipe = load_pipeline(cfg.model, dtype=dtype, device=device)
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
    p = subparsers.add_parser(
        "eval",
        help="reproduce the paper's FID / CLIP / time / memory table (resumable, multi-GPU via accelerate)",
        description=(
            "Generate the same images unpatched, with ToMeSD and with AgentSD at several ratios, then write "
            "results.md, results.csv and fid_vs_time.png to --out. Resumes from the images on disk; shard "
            "across GPUs with `accelerate launch -m agentsd eval ...`."
        ),
    )
    add = p.add_argument
    specs = ", ".join(kind + (":R" if kind in RATIO_KINDS else "") for kind in IMAGE_KINDS)
    add("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="SPEC",
        help=f"{specs} (R: the merge ratio), space- or comma-separated (default: unpatched, tomesd:0.1 "
        "... tomesd:0.5, agentsd:0.1 ... agentsd:0.5, the paper's rows); results of earlier runs into --out "
        "are kept")
    add("--prompts", default=IMAGENET,
        help="'imagenet' (the 1000 ImageNet-1k class names in --template; default) or a text file, "
        "one prompt a line; image i gets prompt i modulo their count")
    add("--template", default=DEFAULT_TEMPLATE,
        help=f"prompt template for class names (default: '{DEFAULT_TEMPLATE}')")
    add("--num-images", type=int, default=2000, help="images per method (default: 2000, two per class)")
    add("--batch-size", type=int, default=1, help="images per pipeline call (default: 1)")
    add("--ref-dir", default=None,
        help="folder of real images (e.g. ImageNet val) for FID (default: FID to the unpatched model's "
        "images)")
    add("--no-fid", dest="fid", action="store_false", help="do not compute FID")
    add("--fid-weights", default=None,
        help="local InceptionV3 weights (torch-fidelity's pt_inception-2015-12-05 file) for offline FID")
    add("--clip-model", default=metrics.DEFAULT_CLIP_MODEL,
        help=f"CLIP hub id or local folder for the CLIP score (default: {metrics.DEFAULT_CLIP_MODEL})")
    add("--no-clip", action="store_true", help="do not compute the CLIP score")
    add("--time-batches", type=int, default=3,
        help="batches timed per method after one warm-up batch; 0: no timing (default: 3)")
    options.add_arguments(p, EvalConfig)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The :class:`EvalConfig` of parsed flags."""
    return options.config_from_args(EvalConfig, args, clip_model=None if args.no_clip else args.clip_model)


def run(args: argparse.Namespace) -> int:
    """Run ``agentsd eval`` from parsed arguments; prints the table on the main process."""
    result = run_eval(config_from_args(args))
    if result is not None:
        print(result.paths[-1].read_text(encoding="utf-8"))
        print("results: " + ", ".join(str(path) for path in reversed(result.paths)))
    return 0
