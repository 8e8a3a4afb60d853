"""``agentsd eval``: the paper's quality / speed / memory table for any model, on any hardware.

For every method (baseline, ToMeSD and AgentSD at several ratios) the same pipeline makes the same
images (same prompts, same seeds), one method at a time, patched and unpatched again. Images go to
``<out>/<method>/<index>.png``; runs resume from the complete images on disk. Under
``accelerate launch`` the images are sharded across processes; the metrics (torchmetrics FID and
CLIP score) are computed once, on the main process, after every shard is done.

Python use (e.g. with another FID feature extractor)::

    from agentsd.tools.evaluate.command import EvalConfig, run_eval
    rows = run_eval(EvalConfig(model="path/to/sd15", out="runs/sd15"), fid_feature=my_module)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

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
from agentsd.tools.evaluate.prompts import DEFAULT_TEMPLATE, IMAGENET, load_prompts
from agentsd.tools.evaluate.report import Row, plot_fid_vs_time, write_csv, write_markdown
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
        methods: specs ``baseline``, ``tome:R``, ``agentsd:R``; default: the paper's 11 rows.
        prompts: ``"imagenet"`` (``template`` filled with the 1000 class names) or a text file.
        template: prompt template for ImageNet class names, with a ``{name}`` field.
        num_images: images per method; image ``i`` uses prompt ``i % len(prompts)`` and seed
            ``seed + i``. 2000 (two per ImageNet class) as in the paper.
        seed: seed of image 0.
        steps: denoising steps (50, the paper's).
        scheduler: scheduler name from ``agentsd.tools.loading.SCHEDULERS`` (``pndm`` = PLMS, the paper's).
        guidance: classifier-free guidance scale (7.5).
        height, width: image size in pixels (512, the paper's; multiples of 8).
        batch_size: images per pipeline call (1; larger batches are faster per image on big GPUs
            but the time column then is per image of a batch).
        dtype: ``auto`` (fp16 on CUDA, fp32 elsewhere), ``fp32``, ``fp16`` or ``bf16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; under ``accelerate launch`` with
            several processes accelerate assigns the devices and this must stay ``auto``.
        ref_dir: folder of real images (e.g. ImageNet val) for FID; ``None`` = FID to the baseline's
            images.
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


def _warn(message: str) -> None:
    print(f"agentsd eval: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------- checks before any model is loaded


def _check_numbers(cfg: EvalConfig) -> None:
    for name in ("steps", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("height", "width"):
        value = getattr(cfg, name)
        if value < 8 or value % 8:
            raise ValueError(f"--{name} must be a positive multiple of 8, got {value}")
    if cfg.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {cfg.seed}")
    if cfg.time_batches < 0:
        raise ValueError(f"--time-batches must be non-negative, got {cfg.time_batches}")
    if cfg.guidance < 0:
        raise ValueError(f"--guidance must be non-negative, got {cfg.guidance}")


def _check_fid_inputs(cfg: EvalConfig, methods: list[Method]) -> None:
    if not cfg.fid:
        return
    if cfg.num_images < 2:
        raise ValueError("FID needs at least 2 images per method: raise --num-images or pass --no-fid")
    if cfg.ref_dir is None:
        if Method("baseline") not in methods:
            raise ValueError(
                "FID to the baseline needs the baseline method: add baseline to --methods, "
                "or pass --ref-dir with real images"
            )
    elif not Path(cfg.ref_dir).is_dir():
        raise ValueError(f"--ref-dir {cfg.ref_dir} is not a folder")
    if cfg.fid_weights is not None and not Path(cfg.fid_weights).is_file():
        raise ValueError(f"--fid-weights {cfg.fid_weights} is not a file")


def _manifest(cfg: EvalConfig, dtype: torch.dtype, prompts: list[str]) -> dict:
    settings = {name: getattr(cfg, name) for name in IMAGE_SETTINGS}
    settings["dtype"] = str(dtype).removeprefix("torch.")
    return {"settings": settings, "prompts": prompts}


def _check_resume(out: Path, manifest: dict) -> None:
    """Refuse an output folder whose images were made with other settings or prompts."""
    path = out / MANIFEST
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old_settings, old_prompts = old["settings"], old["prompts"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(
            f"{path} is unreadable: remove it only if the images in {out} are disposable"
        ) from None
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
        raise ValueError(
            f"{out} holds images made with other settings ({'; '.join(changed)}): use another --out"
        )


def _write_manifest(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    if path.is_file():  # keep the longest prompt list seen, so a smaller re-run does not forget images
        old = json.loads(path.read_text(encoding="utf-8"))["prompts"]
        if len(old) > len(manifest["prompts"]):
            manifest = {**manifest, "prompts": old}
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    tmp.replace(path)


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
    """Seconds per image and (on CUDA) GB per image of ``method``; images are not saved.

    Time: one warm-up batch, then ``time_batches`` batches of ``batch_size`` images, each timed with
    the device synchronised; total seconds / images. Memory (CUDA only): the paper's growth of peak
    memory when the batch grows by one image, peak(batch_size + 1) - peak(batch_size), both peaks of
    whole generations. Elsewhere no resettable per-call peak exists, so memory is not measured.
    """
    from agentsd.tools.loading import Timer, peak_memory, reset_peak_memory

    result: dict = {"s_per_image": None, "gb_per_image": None, "peak_gb": None}
    if cfg.time_batches == 0:
        return result
    count = len(prompts)
    batch = [i % count for i in range(cfg.batch_size)]
    _generate(pipe, cfg, method, prompts, batch)  # warm-up: kernels, allocator, caches
    seconds = 0.0
    for _ in range(cfg.time_batches):
        reset_peak_memory(device)
        with Timer(device) as timer:
            _generate(pipe, cfg, method, prompts, batch)
        seconds += timer.seconds
    result["s_per_image"] = seconds / (cfg.time_batches * cfg.batch_size)
    if device.type == "cuda":
        peak, _ = peak_memory(device)
        reset_peak_memory(device)
        _generate(pipe, cfg, method, prompts, [i % count for i in range(cfg.batch_size + 1)])
        bigger, _ = peak_memory(device)
        result["peak_gb"] = peak / 1e9
        result["gb_per_image"] = (bigger - peak) / 1e9
    return result


# ---------------------------------------------------------------- metrics (main process)


def _reference_images(cfg: EvalConfig) -> list[Path]:
    """Readable real images of ``--ref-dir``, warning about unreadable ones and small sets."""
    candidates = imgs.list_images(Path(cfg.ref_dir))
    good, bad = imgs.readable_images(candidates)
    if bad:
        _warn(f"skipped {len(bad)} unreadable image(s) in --ref-dir {cfg.ref_dir} (e.g. {bad[0]})")
    if len(good) < 2:
        raise ValueError(f"--ref-dir {cfg.ref_dir} has {len(good)} readable image(s); FID needs at least 2")
    return good


def _generated_batches(folder: Path, count: int, size: tuple[int, int]) -> Iterator[torch.Tensor]:
    for chunk in _batches(range(count), METRIC_BATCH):
        try:
            batch = [imgs.load_uint8(imgs.image_path(folder, i), size) for i in chunk]
        except ValueError as e:
            raise ValueError(f"{e} (run the same command again to remake it)") from None
        yield torch.stack(batch)


def _compute_metrics(
    cfg: EvalConfig, methods: list[Method], prompts: list[str], rows: dict[Method, Row], fid, clip,
    ref_paths: list[Path] | None, device: torch.device, progress: bool,
) -> None:
    from tqdm import tqdm

    out, size, n = Path(cfg.out), (cfg.width, cfg.height), cfg.num_images
    steps = (1 if fid is not None else 0) + len(methods) * ((fid is not None) + (clip is not None))
    if steps == 0:
        return
    bar = tqdm(total=steps, desc="metrics", unit="set", disable=not progress)
    if fid is not None:
        fid.to(device)
        if ref_paths is not None:
            skipped = 0

            def real_batches():
                nonlocal skipped
                for batch, bad in imgs.iter_batches(ref_paths, METRIC_BATCH, size):
                    skipped += bad
                    yield batch

            feed_fid(fid, real_batches(), real=True)
            if skipped:
                _warn(f"skipped {skipped} --ref-dir image(s) that failed to decode")
        else:
            feed_fid(fid, _generated_batches(out / "baseline", n, size), real=True)
        bar.update()
        for method in methods:
            if ref_paths is not None or method.family != "baseline":
                rows[method].fid = fid_score(fid, _generated_batches(out / method.slug, n, size))
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


def _prepare_on_main(cfg: EvalConfig, methods: list[Method], manifest: dict, fid_feature: int | nn.Module):
    """Main process: reference images, metric models, output folder, and the images still to make.

    Returns ``(fid metric or None, clip metric or None, reference paths or None, {method: missing
    indices})``. The output folder is created only once everything that can fail here has passed.
    """
    fid = clip = ref_paths = None
    if cfg.fid and cfg.ref_dir is not None:
        ref_paths = _reference_images(cfg)
        needed = int(fid_feature if isinstance(fid_feature, int) else getattr(fid_feature, "num_features", 0))
        if len(ref_paths) < needed:
            _warn(f"--ref-dir has {len(ref_paths)} readable images; FID with {needed} features needs at "
                  f"least {needed} for a stable estimate (the paper used 50,000)")
    if cfg.fid:
        fid = fid_metric(fid_feature, cfg.fid_weights if isinstance(fid_feature, int) else None)
    if cfg.clip_model is not None:
        clip = clip_metric(cfg.clip_model)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, manifest)
    missing = {}
    for method in methods:
        (out / method.slug).mkdir(exist_ok=True)
        missing[method] = imgs.missing_indices(out / method.slug, cfg.num_images, (cfg.width, cfg.height))
    return fid, clip, ref_paths, missing


def _share(state, items: list) -> list:
    """This process's share of ``items`` (contiguous, as ``PartialState.split_between_processes``)."""
    with state.split_between_processes(items) as share:
        return list(share)


def _generate_all(pipe, cfg, state, methods, prompts, missing, device, show: bool) -> dict[Method, Row]:
    """Apply each method in turn, time it (main process), make this process's missing images, remove it."""
    from tqdm import tqdm

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
                    imgs.save_png_atomic(image, imgs.image_path(folder, index))
                bar.update(len(batch))
                overall.update(len(batch))
            bar.close()
    overall.close()
    return rows


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _header(
    cfg: EvalConfig, dtype: torch.dtype, fid, fid_feature, ref_paths, device, processes: int
) -> list[str]:
    """The settings lines at the top of results.md."""
    import diffusers

    from agentsd import __version__

    if fid is None:
        fid_line = "FID: not computed"
    else:
        against = (f"{len(ref_paths)} real images in `{cfg.ref_dir}`" if ref_paths is not None
                   else "the baseline's own images")
        extractor = (f"InceptionV3, {fid_feature} features" if isinstance(fid_feature, int)
                     else f"feature extractor {type(fid_feature).__name__}")
        fid_line = f"FID: against {against}; {extractor}"
    timing = (f"timing: batch size {cfg.batch_size}, {cfg.time_batches} timed batch(es) after a warm-up"
              if cfg.time_batches else "timing: not measured")
    prompts = cfg.prompts + (f' ("{cfg.template}")' if cfg.prompts == IMAGENET else "")
    return [
        f"model: `{cfg.model}`, {cfg.height}×{cfg.width}, {cfg.steps} steps ({cfg.scheduler}), guidance "
        f"{cfg.guidance:g}, {str(dtype).removeprefix('torch.')}, "
        f"seeds {cfg.seed}…{cfg.seed + cfg.num_images - 1}",
        f"prompts: {prompts}, {cfg.num_images} images per method",
        fid_line,
        f"CLIP model: {cfg.clip_model or 'not computed'}",
        f"{timing}, on {_device_name(device)} ({processes} process(es) generating)",
        f"agentsd {__version__}, diffusers {diffusers.__version__}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}",
    ]


def run_eval(cfg: EvalConfig, *, fid_feature: int | nn.Module = FID_FEATURES) -> list[Row] | None:
    """Make every method's images (resuming), time them, compute FID / CLIP score, write the results.

    Args:
        cfg: the run's settings.
        fid_feature: 2048 (InceptionV3 pool features, needs torch-fidelity; recommended) or an
            ``nn.Module`` mapping uint8 ``(B, 3, H, W)`` images to ``(B, D)`` features.

    Returns:
        One :class:`~agentsd.tools.evaluate.report.Row` per method on the main process; ``None`` on
        the others.

    Raises:
        ValueError: for bad settings, prompts, model or reference images (one-line message), raised
            before any model is loaded and before anything is written where possible.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    from agentsd.tools.loading import (
        check_model_reference,
        load_pipeline,
        resolve_device,
        resolve_dtype,
        scheduler_class,
        set_scheduler,
    )

    # Everything a user can get wrong is checked first, identically on every process.
    methods = parse_methods(cfg.methods)
    prompts = load_prompts(cfg.prompts, cfg.num_images, cfg.template)
    _check_numbers(cfg)
    _check_fid_inputs(cfg, methods)
    scheduler_class(cfg.scheduler)
    check_model_reference(cfg.model)  # a local folder is checked on disk, a hub id with one request
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
            raise ValueError(f"--device {cfg.device} cannot be used with {state.num_processes} processes: "
                             "accelerate gives each process its device")
        device = state.device
    else:
        device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file")
    manifest = _manifest(cfg, dtype, prompts)
    _check_resume(out, manifest)
    main = state.is_main_process

    # What can still fail is done by the main process alone, and its outcome handed to everyone:
    # no process is left waiting on one that failed.
    fid = clip = ref_paths = None
    shared: list = [None, None]
    if main:
        try:
            fid, clip, ref_paths, missing = _prepare_on_main(cfg, methods, manifest, fid_feature)
            shared = [None, missing]
        except (ValueError, OSError) as e:
            shared = [str(e), None]
    broadcast_object_list(shared)
    error, missing = shared
    if error is not None:
        raise ValueError(error)

    pipe = load_pipeline(cfg.model, dtype=dtype, device=device)
    set_scheduler(pipe, cfg.scheduler)
    pipe.set_progress_bar_config(disable=True)
    show = cfg.progress and main
    rows = _generate_all(pipe, cfg, state, methods, prompts, missing, device, show)
    state.wait_for_everyone()
    if not main:
        return None

    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _compute_metrics(cfg, methods, prompts, rows, fid, clip, ref_paths, device, show)
    table = [rows[m] for m in methods]
    fid_reference = None if fid is None else ("real" if ref_paths is not None else "baseline")
    header = _header(cfg, dtype, fid, fid_feature, ref_paths, device, state.num_processes)
    write_markdown(out / "results.md", table, fid_reference, header)
    write_csv(out / "results.csv", table)
    plot_fid_vs_time(out / "fid_vs_time.png", table, "FID" if fid_reference == "real" else "FID to baseline")
    return table


# ---------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``agentsd eval`` and its flags."""
    from agentsd.tools.loading import DEFAULT_MODEL, SCHEDULERS

    p = subparsers.add_parser(
        "eval",
        help="reproduce the paper's FID / CLIP / time / memory table (resumable, multi-GPU via accelerate)",
        description=(
            "Generate the same images with the baseline, ToMeSD and AgentSD at several ratios, then write "
            "results.md, results.csv and fid_vs_time.png to --out. Resumes from the images on disk; shard "
            "across GPUs with `accelerate launch -m agentsd eval ...`."
        ),
    )
    add = p.add_argument
    add("--model", default=DEFAULT_MODEL, help=f"hub id or local pipeline folder (default: {DEFAULT_MODEL})")
    add("--out", required=True, help="output folder: <out>/<method>/<index>.png and the results")
    add("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="SPEC",
        help="baseline, tome:R (tomesd) or agentsd:R (this package), space- or comma-separated "
        "(default: baseline, tome:0.1 ... tome:0.5, agentsd:0.1 ... agentsd:0.5, the paper's rows)")
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
        help="folder of real images (e.g. ImageNet val) for FID (default: FID to the baseline's images)")
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


def run(args: argparse.Namespace) -> int:
    """Run ``agentsd eval`` from parsed arguments; prints the table on the main process."""
    cfg = EvalConfig(
        model=args.model, out=args.out, methods=args.methods, prompts=args.prompts, template=args.template,
        num_images=args.num_images, seed=args.seed, steps=args.steps, scheduler=args.scheduler,
        guidance=args.guidance, height=args.height, width=args.width, batch_size=args.batch_size,
        dtype=args.dtype, device=args.device, ref_dir=args.ref_dir, fid=args.fid,
        fid_weights=args.fid_weights, clip_model=None if args.no_clip else args.clip_model,
        time_batches=args.time_batches, progress=args.progress,
    )
    rows = run_eval(cfg)
    if rows is not None:
        print((Path(cfg.out) / "results.md").read_text(encoding="utf-8"))
        print(f"results: {Path(cfg.out) / 'results.md'}, results.csv, fid_vs_time.png")
    return 0


