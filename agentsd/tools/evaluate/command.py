"""``agentsd eval``: the paper's quality / speed / memory table for any model, on any hardware.

For every method (unpatched, ToMeSD and AgentSD at several ratios; see :mod:`agentsd.tools.methods`)
the same pipeline makes the same
images (same prompts, same seeds), one method at a time, patched and unpatched again. Images go to
``<out>/<method>/<index>.png``; runs resume from the complete images on disk, and the results
files merge this run's rows with those already there. Under
``accelerate launch`` the images are sharded across processes; the metrics (torchmetrics FID and
CLIP score) are computed once, on the main process, after every shard is done.

Python use (e.g. with another FID feature extractor)::

    from agentsd.tools.evaluate import EvalConfig, run_eval
    rows = run_eval(EvalConfig(model="path/to/sd15", out="runs/sd15"), fid_feature=my_module)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from agentsd.tools.errors import UsageError, user_input
from agentsd.tools.evaluate import images as imgs
from agentsd.tools.evaluate.metrics import (
    DEFAULT_CLIP_MODEL,
    FID_FEATURES,
    clip_metric,
    clip_score,
    feed_fid,
    fid_metric,
    fid_score,
)
from agentsd.tools.evaluate.prompts import DEFAULT_TEMPLATE, IMAGENET, MAX_IMAGES, load_prompts
from agentsd.tools.evaluate.report import Row, csv_text, markdown_text, merge_rows, plot_fid_vs_time, read_csv
from agentsd.tools.methods import DEFAULT_METHODS, Method, applied, parse_methods, reseed

MANIFEST = "eval.json"
# Settings that change the images: a folder made with other values cannot be resumed.
IMAGE_SETTINGS = ("model", "steps", "scheduler", "guidance", "height", "width", "seed", "dtype")
METRIC_BATCH = 32


@dataclass
class EvalConfig:
    """Settings of an evaluation run (the CLI flags of ``agentsd eval``).

    Attributes:
        model: hub id or local folder of a Stable Diffusion pipeline.
        out: output folder (images per method, results.md / .csv, fid_vs_time.png).
        methods: specs of :mod:`agentsd.tools.methods` (``unpatched``, ``tomesd:R``, ``agentsd:R``,
            ``agentsd-agent:R``, ``agentsd-tome:R``; ``baseline`` and ``tome:R`` are accepted);
            default: the paper's 11 rows.
        prompts: ``"imagenet"`` (``template`` filled with the 1000 class names) or a text file.
        template: prompt template for ImageNet class names, with a ``{name}`` field.
        num_images: images per method, at most 100,000; image ``i`` uses prompt ``i % len(prompts)``
            and seed ``seed + i``. 2000 (two per ImageNet class) as in the paper.
        seed: seed of image 0.
        steps: denoising steps (50, the paper's).
        scheduler: scheduler name from ``agentsd.tools.loading.SCHEDULERS`` (``pndm`` = PLMS, the paper's).
        guidance: classifier-free guidance scale, finite and >= 0 (7.5; <= 1 disables guidance).
        height, width: image size in pixels (512, the paper's; multiples of 8).
        batch_size: images per pipeline call (1; larger batches are faster per image on big GPUs
            but the time column then is per image of a batch).
        dtype: ``auto`` (fp16 on CUDA, fp32 elsewhere), ``fp32``, ``fp16`` or ``bf16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; under ``accelerate launch`` with
            several processes accelerate assigns the devices and this must stay ``auto``.
        ref_dir: folder of real images (e.g. ImageNet val) for FID; ``None`` = FID to the unpatched
            model's images.
        fid: compute FID.
        fid_weights: local InceptionV3 weights file for FID (else torch-fidelity downloads them).
        clip_model: CLIP hub id or local folder for the CLIP score; ``None`` skips the CLIP score.
        time_batches: batches timed per method after one warm-up batch (0 skips timing).
        progress: show progress bars (main process only).
    """

    model: str
    out: str
    methods: Sequence[str] = DEFAULT_METHODS
    prompts: str = IMAGENET
    template: str = DEFAULT_TEMPLATE
    num_images: int = 2000
    seed: int = 0
    steps: int = 50
    scheduler: str = "pndm"
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    batch_size: int = 1
    dtype: str = "auto"
    device: str = "auto"
    ref_dir: str | None = None
    fid: bool = True
    fid_weights: str | None = None
    clip_model: str | None = DEFAULT_CLIP_MODEL
    time_batches: int = 3
    progress: bool = True


@dataclass
class EvalResult:
    """What :func:`run_eval` wrote on the main process.

    Attributes:
        rows: the table: this run's methods merged with the rows already in ``results.csv``, in
            table order.
        paths: the files written (results.md, results.csv, fid_vs_time.png).
    """

    rows: list[Row]
    paths: list[Path]


def _warn(message: str) -> None:
    print(f"agentsd eval: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------- checks before any model is loaded


def _check_numbers(cfg: EvalConfig) -> None:
    for name in ("steps", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("height", "width"):
        value = getattr(cfg, name)
        if value < 8 or value % 8:
            raise UsageError(f"--{name} must be a positive multiple of 8, got {value}")
    if not 1 <= cfg.num_images <= MAX_IMAGES:
        raise UsageError(f"--num-images must be between 1 and {MAX_IMAGES} (at most), got {cfg.num_images}")
    if not 0 <= cfg.seed or cfg.seed + cfg.num_images > 2**63:
        raise UsageError(f"--seed must be in [0, 2**63 - --num-images], got {cfg.seed}")
    if cfg.time_batches < 0:
        raise UsageError(f"--time-batches must be non-negative, got {cfg.time_batches}")
    if not math.isfinite(cfg.guidance) or cfg.guidance < 0:
        raise UsageError(f"--guidance must be a finite number >= 0, got {cfg.guidance}")


def _parse_methods(cfg: EvalConfig) -> list[Method]:
    with user_input("--methods: "):
        methods = parse_methods(cfg.methods)
    if any(m.kind == "bound" for m in methods):
        raise UsageError("--methods: bound is a speed bound of agentsd bench (its self-attentions output "
                         "zeros); its images mean nothing")
    return methods


def _check_fid_inputs(cfg: EvalConfig, methods: list[Method]) -> None:
    if not cfg.fid:
        return
    if cfg.num_images < 2:
        raise UsageError("FID needs at least 2 images per method: raise --num-images or pass --no-fid")
    if cfg.ref_dir is None:
        if Method("unpatched") not in methods:
            raise UsageError(
                "FID to the unpatched model needs the unpatched method: add unpatched to --methods, "
                "or pass --ref-dir with real images"
            )
    elif not Path(cfg.ref_dir).is_dir():
        raise UsageError(f"--ref-dir {cfg.ref_dir} is not a folder")
    if cfg.fid_weights is not None and not Path(cfg.fid_weights).is_file():
        raise UsageError(f"--fid-weights {cfg.fid_weights} is not a file")


def _manifest(cfg: EvalConfig, dtype: torch.dtype, prompts: list[str]) -> dict:
    from agentsd.tools.loading import model_key

    settings = {name: getattr(cfg, name) for name in IMAGE_SETTINGS}
    settings["model"] = model_key(cfg.model)  # ./m/pipe and /abs/m/pipe are one model
    settings["dtype"] = str(dtype).removeprefix("torch.")
    return {"settings": settings, "prompts": prompts}


def _read_manifest(path: Path) -> dict | None:
    """The manifest at ``path``, ``None`` if there is none; UsageError if it is not one."""
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        old = None
    valid = (isinstance(old, dict) and isinstance(old.get("settings"), dict)
             and isinstance(old.get("prompts"), list) and all(isinstance(p, str) for p in old["prompts"]))
    if not valid:
        raise UsageError(f"{path} is not a readable agentsd eval manifest: remove it only if the images in "
                         f"{path.parent} are disposable")
    return old


def _check_resume(out: Path, manifest: dict) -> None:
    """Refuse an output folder whose images were made with other settings or prompts."""
    old = _read_manifest(out / MANIFEST)
    if old is None:
        return
    from agentsd.tools.loading import model_key

    old_settings, old_prompts = dict(old["settings"]), old["prompts"]
    if isinstance(old_settings.get("model"), str):  # manifests written before model_key
        old_settings["model"] = model_key(old_settings["model"])
    changed = [
        f"{k} {old_settings.get(k)!r} -> {v!r}"
        for k, v in manifest["settings"].items()
        if old_settings.get(k) != v
    ]
    common = min(len(old_prompts), len(manifest["prompts"]))
    first = next((i for i in range(common) if old_prompts[i] != manifest["prompts"][i]), None)
    if first is not None:
        changed.append(f"prompt of image {first}")
    if changed:
        raise UsageError(
            f"{out} holds images made with other settings ({'; '.join(changed)}): use another --out"
        )


def _write_manifest(out: Path, manifest: dict) -> None:
    from agentsd.tools.files import json_text, write_atomic

    old = _read_manifest(out / MANIFEST)
    # keep the longest prompt list seen, so a smaller re-run does not forget images
    if old is not None and len(old["prompts"]) > len(manifest["prompts"]):
        manifest = {**manifest, "prompts": old["prompts"]}
    write_atomic(out / MANIFEST, json_text(manifest))


# ---------------------------------------------------------------- generation


def _batches(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def _generate(pipe, cfg: EvalConfig, method: Method, prompts: Sequence[str], indices: Sequence[int]):
    """PIL images of ``indices``, each from its own CPU generator seeded ``seed + index``.

    One generator per image (a list for a batch) makes image ``i`` the same whatever batch or
    process it is made in; CPU generators make the initial noise the same on every device.
    """
    reseed(pipe, method, cfg.seed)
    generators = [torch.Generator("cpu").manual_seed(cfg.seed + i) for i in indices]
    return pipe(
        prompt=[prompts[i] for i in indices],
        generator=generators,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance,
        height=cfg.height,
        width=cfg.width,
        output_type="pil",
    ).images


def _measure(pipe, cfg: EvalConfig, method: Method, prompts: Sequence[str], device: torch.device) -> dict:
    """Seconds per image and GB per image of ``method``; images are not saved.

    Time: one warm-up batch, then ``time_batches`` batches of ``batch_size`` images, each timed with
    :class:`agentsd.tools.measure.Timer`; total seconds / images. Memory: the paper's growth of
    the peak when the batch grows by one image, peak(batch_size + 1) - peak(batch_size), both read
    by :class:`agentsd.tools.measure.PeakMemory` around a whole generation (what it reads on each
    device: :func:`agentsd.tools.measure.memory_method`).
    """
    from agentsd.tools.measure import PeakMemory, Timer

    result: dict = {"s_per_image": None, "gb_per_image": None, "peak_gb": None}
    if cfg.time_batches == 0:
        return result
    count = len(prompts)
    batch = [i % count for i in range(cfg.batch_size)]
    _generate(pipe, cfg, method, prompts, batch)  # warm-up: kernels, allocator, caches
    seconds = 0.0
    for _ in range(cfg.time_batches):
        with Timer(device) as timer:
            _generate(pipe, cfg, method, prompts, batch)
        seconds += timer.seconds
    result["s_per_image"] = seconds / (cfg.time_batches * cfg.batch_size)
    with PeakMemory(device) as at_batch:
        _generate(pipe, cfg, method, prompts, batch)
    with PeakMemory(device) as one_more:
        _generate(pipe, cfg, method, prompts, [i % count for i in range(cfg.batch_size + 1)])
    if at_batch.peak is not None and one_more.peak is not None:
        result["peak_gb"] = at_batch.peak / 1e9
        result["gb_per_image"] = (one_more.peak - at_batch.peak) / 1e9
    return result


# ---------------------------------------------------------------- metrics (main process)


def _check_reference(cfg: EvalConfig) -> None:
    """Fail fast, before any model is built, when ``--ref-dir`` has fewer than 2 decodable images.

    Images are decoded completely (a truncated JPEG passes Pillow's ``verify``), stopping at the
    second good one: the full pass happens once, when the FID's real features are computed.
    """
    good: list[Path] = []
    bad: list[Path] = []
    for path in imgs.list_images(Path(cfg.ref_dir)):
        try:
            imgs.load_uint8(path, (8, 8))
            good.append(path)
        except UsageError:
            bad.append(path)
        if len(good) == 2:
            return
    if bad:
        _warn(f"skipped {len(bad)} unreadable image(s) in --ref-dir {cfg.ref_dir} (e.g. {bad[0]})")
    raise UsageError(f"--ref-dir {cfg.ref_dir} has {len(good)} readable image(s); FID needs at least 2")


def _feed_reference(cfg: EvalConfig, fid, device: torch.device) -> int:
    """Decode every image of ``--ref-dir`` into the FID's real features; returns how many were used.

    Done before any generation, so a folder with fewer than 2 decodable images fails at once.
    """
    paths = imgs.list_images(Path(cfg.ref_dir))
    skipped: list[Path] = []

    def batches():
        for batch, bad in imgs.iter_batches(paths, METRIC_BATCH, (cfg.width, cfg.height)):
            skipped.extend(bad)
            yield batch

    fid.to(device)
    try:
        used = feed_fid(fid, batches(), real=True)
    finally:
        fid.cpu()
    if skipped:
        _warn(f"skipped {len(skipped)} unreadable image(s) in --ref-dir {cfg.ref_dir} (e.g. {skipped[0]})")
    if used < 2:
        raise UsageError(f"--ref-dir {cfg.ref_dir} has {used} readable image(s); FID needs at least 2")
    return used


def _generated_batches(folder: Path, count: int, size: tuple[int, int] | None) -> Iterator[torch.Tensor]:
    for chunk in _batches(range(count), METRIC_BATCH):
        try:
            batch = [imgs.load_uint8(imgs.image_path(folder, i), size) for i in chunk]
        except UsageError as e:
            raise UsageError(f"{e} (run the same command again to remake it)") from None
        yield torch.stack(batch)


def _compute_metrics(
    cfg: EvalConfig, methods: list[Method], prompts: list[str], rows: dict[Method, Row], fid, clip,
    real_count: int | None, device: torch.device, progress: bool,
) -> None:
    from tqdm import tqdm

    out, size, n = Path(cfg.out), (cfg.width, cfg.height), cfg.num_images
    steps = (1 if fid is not None else 0) + len(methods) * ((fid is not None) + (clip is not None))
    if steps == 0:
        return
    bar = tqdm(total=steps, desc="metrics", unit="set", disable=not progress)
    if fid is not None:
        fid.to(device)
        reference = "real" if real_count is not None else "unpatched"
        if real_count is None:  # the real features of --ref-dir are in already
            feed_fid(fid, _generated_batches(out / Method("unpatched").slug, n, size), real=True)
        bar.update()
        for method in methods:
            if reference == "real" or method.kind != "unpatched":
                rows[method].fid = fid_score(fid, _generated_batches(out / method.slug, n, size))
                rows[method].fid_reference = reference
            bar.update()
        fid.cpu()
    if clip is not None:
        clip.to(device)
        for method in methods:
            batches = zip(
                _generated_batches(out / method.slug, n, None), _batches(prompts, METRIC_BATCH), strict=True
            )
            rows[method].clip = clip_score(clip, batches)
            bar.update()
        clip.cpu()
    bar.close()


# ---------------------------------------------------------------- the run


def _adopt_legacy_folders(out: Path, methods: list[Method]) -> None:
    """Rename the folders of runs made before the method names were unified (``baseline``, ``tome-R``)."""
    for method in methods:
        target = out / method.slug
        for legacy in method.legacy_slugs:
            if not target.exists() and (out / legacy).is_dir():
                (out / legacy).rename(target)


def _prepare_on_main(
    cfg: EvalConfig, methods: list[Method], fid_feature: int | nn.Module, device: torch.device
):
    """Main process: metric models, reference images, the folder's state, and the images still to make.

    Returns ``(fid metric or None, clip metric or None, number of reference images or None,
    {method: missing indices})``. Nothing new is written here: the output folder is created once the
    pipeline has loaded.
    """
    from agentsd.tools.files import remove_stale_temporaries

    fid = clip = real_count = None
    if cfg.fid and cfg.ref_dir is not None:
        _check_reference(cfg)
    if cfg.fid:
        fid = fid_metric(fid_feature, cfg.fid_weights if isinstance(fid_feature, int) else None)
        if cfg.ref_dir is not None:
            real_count = _feed_reference(cfg, fid, device)
            needed = int(getattr(fid_feature, "num_features", 0) if isinstance(fid_feature, nn.Module)
                         else fid_feature)
            if real_count < needed:
                _warn(f"--ref-dir has {real_count} readable images; FID with {needed} features needs at "
                      f"least {needed} for a stable estimate (the paper used 50,000)")
    if cfg.clip_model is not None:
        clip = clip_metric(cfg.clip_model)
    out = Path(cfg.out)
    with user_input():
        read_csv(out / "results.csv")  # an unreadable results file is reported before any generation
    if out.is_dir():
        _adopt_legacy_folders(out, methods)
        remove_stale_temporaries(out)
    missing = {}
    for method in methods:
        remove_stale_temporaries(out / method.slug)
        missing[method] = imgs.missing_indices(out / method.slug, cfg.num_images, (cfg.width, cfg.height))
    return fid, clip, real_count, missing


def _share(state, items: list) -> list:
    """This process's share of ``items`` (contiguous, as ``PartialState.split_between_processes``)."""
    with state.split_between_processes(items) as share:
        return list(share)


def _generate_all(pipe, cfg, state, methods, prompts, missing, device, show: bool) -> dict[Method, Row]:
    """Apply each method in turn, time it (main process), make this process's missing images, remove it."""
    from tqdm import tqdm

    from agentsd.tools.files import save_png

    # Whole batches are dealt out, so a batch holds the same images with 1 or N processes.
    mine = {m: _share(state, _batches(missing[m], cfg.batch_size)) for m in methods}
    total = sum(len(batch) for batches in mine.values() for batch in batches)
    overall = tqdm(total=total, desc="all methods", unit="img", position=0, disable=not show)
    rows = {m: Row(m, images=cfg.num_images) for m in methods}
    for method in methods:
        folder = Path(cfg.out) / method.slug
        with applied(pipe, method, cfg.seed):
            if state.is_main_process:
                overall.set_postfix_str(f"timing {method.name}")
                for key, value in _measure(pipe, cfg, method, prompts, device).items():
                    setattr(rows[method], key, value)
                overall.set_postfix_str("")
            todo = sum(len(batch) for batch in mine[method])
            bar = tqdm(total=todo, desc=method.name, unit="img", position=1, leave=False, disable=not show)
            for batch in mine[method]:
                for index, image in zip(batch, _generate(pipe, cfg, method, prompts, batch), strict=True):
                    # a broken file left by an earlier run is replaced
                    save_png(imgs.image_path(folder, index), image, overwrite=True)
                bar.update(len(batch))
                overall.update(len(batch))
            bar.close()
    overall.close()
    return rows


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _header(
    cfg: EvalConfig, dtype: torch.dtype, fid, fid_feature, real_count, device, processes: int
) -> list[str]:
    """The settings lines at the top of results.md."""
    from agentsd.tools.env import versions_line

    if fid is None:
        fid_line = "FID: not computed in this run"
    else:
        against = (f"{real_count} real images in `{cfg.ref_dir}`" if real_count is not None
                   else "the unpatched model's own images")
        extractor = (f"InceptionV3, {fid_feature} features" if isinstance(fid_feature, int)
                     else f"feature extractor {type(fid_feature).__name__}")
        fid_line = f"FID: against {against}; {extractor}"
    timing = (f"timing: batch size {cfg.batch_size}, {cfg.time_batches} timed batch(es) after a warm-up"
              if cfg.time_batches else "timing: not measured in this run")
    prompts = cfg.prompts + (f' ("{cfg.template}")' if cfg.prompts == IMAGENET else "")
    return [
        f"model: `{cfg.model}`, {cfg.height}×{cfg.width}, {cfg.steps} steps ({cfg.scheduler}), guidance "
        f"{cfg.guidance:g}, {str(dtype).removeprefix('torch.')}, "
        f"seeds {cfg.seed}…{cfg.seed + cfg.num_images - 1}",
        f"prompts: {prompts}, {cfg.num_images} images per method",
        fid_line,
        f"CLIP model: {cfg.clip_model or 'not computed in this run'}",
        f"{timing}, on {_device_name(device)} ({processes} process(es) generating)",
        f"{versions_line(('agentsd', 'diffusers', 'torch'))}, {time.strftime('%Y-%m-%d %H:%M')}",
    ]


def _write_results(out: Path, rows: list[Row], header: list[str], device: torch.device) -> EvalResult:
    """Merge ``rows`` with the rows on disk and write results.md, results.csv and the plot as one unit."""
    from agentsd.tools.files import write_unit
    from agentsd.tools.measure import memory_method

    with user_input():
        table = merge_rows(read_csv(out / "results.csv"), rows)
    files = [
        (out / "results.csv", csv_text(table)),
        (out / "fid_vs_time.png", lambda f: plot_fid_vs_time(table, f)),
        (out / "results.md", markdown_text(table, header, memory_method(device))),
    ]
    return EvalResult(rows=table, paths=write_unit(files, overwrite=True))


def run_eval(cfg: EvalConfig, *, fid_feature: int | nn.Module = FID_FEATURES) -> EvalResult | None:
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
    from agentsd.tools.errors import require_extra

    require_extra("eval")
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    from agentsd.tools.files import check_writable_folder
    from agentsd.tools.loading import (
        check_model_reference,
        load_pipeline,
        resolve_device,
        resolve_dtype,
        scheduler_class,
        set_scheduler,
    )

    # Everything a user can get wrong is checked first, identically on every process.
    _check_numbers(cfg)
    methods = _parse_methods(cfg)
    prompts = load_prompts(cfg.prompts, cfg.num_images, cfg.template)
    _check_fid_inputs(cfg, methods)
    scheduler_class(cfg.scheduler)
    check_model_reference(cfg.model)  # a local folder is checked on disk, a hub id with one request
    out = Path(cfg.out)
    check_writable_folder(out, "--out")
    # PartialState uses gloo for CPU processes only when told to (Accelerator reads ACCELERATE_USE_CPU,
    # set by `accelerate launch --cpu`; PartialState does not); without CUDA there is nothing else.
    # The others wait while the main process checks --ref-dir, downloads the metric models and scans
    # the images on disk (minutes on a big run), and while it times each method: hence the long timeout.
    state = PartialState(
        cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available(),
        timeout=timedelta(hours=2),
    )
    if state.num_processes > 1:
        if cfg.device != "auto":
            raise UsageError(f"--device {cfg.device} cannot be used with {state.num_processes} processes: "
                             "accelerate gives each process its device")
        device = state.device
    else:
        device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    manifest = _manifest(cfg, dtype, prompts)
    _check_resume(out, manifest)
    main = state.is_main_process

    # What can still fail is done by the main process alone, and its outcome handed to everyone:
    # no process is left waiting on one that failed.
    fid = clip = real_count = None
    shared: list = [None, None]
    if main:
        try:
            fid, clip, real_count, missing = _prepare_on_main(cfg, methods, fid_feature, device)
            shared = [None, missing]
        except UsageError as e:
            shared = [str(e), None]
    broadcast_object_list(shared)
    error, missing = shared
    if error is not None:
        raise UsageError(error)

    pipe = load_pipeline(cfg.model, dtype=dtype, device=device)
    set_scheduler(pipe, cfg.scheduler)
    pipe.set_progress_bar_config(disable=True)
    if main:  # the folder appears only once the model has loaded
        for method in methods:
            (out / method.slug).mkdir(parents=True, exist_ok=True)
        _write_manifest(out, manifest)
    state.wait_for_everyone()
    show = cfg.progress and main
    rows = _generate_all(pipe, cfg, state, methods, prompts, missing, device, show)
    state.wait_for_everyone()
    if not main:
        return None

    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _compute_metrics(cfg, methods, prompts, rows, fid, clip, real_count, device, show)
    header = _header(cfg, dtype, fid, fid_feature, real_count, device, state.num_processes)
    return _write_results(out, [rows[m] for m in methods], header, device)


# ---------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``agentsd eval`` and its flags."""
    from agentsd.tools.loading import DEFAULT_MODEL, SCHEDULERS

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
    add("--model", default=DEFAULT_MODEL, help=f"hub id or local pipeline folder (default: {DEFAULT_MODEL})")
    add("--out", required=True, help="output folder: <out>/<method>/<index>.png and the results")
    add("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="SPEC",
        help="unpatched, tomesd:R, agentsd:R, agentsd-agent:R or agentsd-tome:R (R: the merge ratio), "
        "space- or comma-separated (default: unpatched, tomesd:0.1 ... tomesd:0.5, agentsd:0.1 ... "
        "agentsd:0.5, the paper's rows); results of earlier runs into --out are kept")
    add("--prompts", default=IMAGENET,
        help="'imagenet' (the 1000 ImageNet-1k class names in --template; default) or a text file, "
        "one prompt a line; image i gets prompt i modulo their count")
    add("--template", default=DEFAULT_TEMPLATE,
        help=f"prompt template for class names (default: '{DEFAULT_TEMPLATE}')")
    add("--num-images", type=int, default=2000, help="images per method (default: 2000, two per class)")
    add("--seed", type=int, default=0, help="image i uses seed+i, for every method (default: 0)")
    add("--steps", type=int, default=50, help="denoising steps (default: 50)")
    add("--scheduler", default="pndm", choices=list(SCHEDULERS),
        help="scheduler (default: pndm, i.e. PLMS, the paper's)")
    add("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    add("--height", type=int, default=512, help="image height in pixels, a multiple of 8 (default: 512)")
    add("--width", type=int, default=512, help="image width in pixels, a multiple of 8 (default: 512)")
    add("--batch-size", type=int, default=1, help="images per pipeline call (default: 1)")
    add("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
        help="weights dtype (default: auto = fp16 on CUDA, fp32 elsewhere)")
    add("--device", default="auto",
        help="auto, cpu, cuda, cuda:N or mps; one process only, accelerate places several (default: auto)")
    add("--ref-dir", default=None,
        help="folder of real images (e.g. ImageNet val) for FID "
        "(default: FID to the unpatched model's images)")
    add("--no-fid", dest="fid", action="store_false", help="do not compute FID")
    add("--fid-weights", default=None,
        help="local InceptionV3 weights (torch-fidelity's pt_inception-2015-12-05 file) for offline FID")
    add("--clip-model", default=DEFAULT_CLIP_MODEL,
        help=f"CLIP hub id or local folder for the CLIP score (default: {DEFAULT_CLIP_MODEL})")
    add("--no-clip", action="store_true", help="do not compute the CLIP score")
    add("--time-batches", type=int, default=3,
        help="batches timed per method after one warm-up batch; 0: no timing (default: 3)")
    add("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The :class:`EvalConfig` of parsed flags."""
    return EvalConfig(
        model=args.model, out=args.out, methods=args.methods, prompts=args.prompts, template=args.template,
        num_images=args.num_images, seed=args.seed, steps=args.steps, scheduler=args.scheduler,
        guidance=args.guidance, height=args.height, width=args.width, batch_size=args.batch_size,
        dtype=args.dtype, device=args.device, ref_dir=args.ref_dir, fid=args.fid,
        fid_weights=args.fid_weights, clip_model=None if args.no_clip else args.clip_model,
        time_batches=args.time_batches, progress=args.progress,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``agentsd eval`` from parsed arguments; prints the table on the main process."""
    result = run_eval(config_from_args(args))
    if result is not None:
        print(result.paths[-1].read_text(encoding="utf-8"))
        print("results: " + ", ".join(str(path) for path in reversed(result.paths)))
    return 0
