"""``agentsd generate``: make images from the shell with (or without) the AgentSD patch.

    agentsd generate "a photo of a corgi" "a castle at dusk" --steps 50 --seed 0 --out images/

Every input is checked before the model is loaded; each image is saved (PNG + JSON sidecar) as
soon as it is made, so an interrupted run keeps everything finished so far.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

import agentsd
from agentsd.tools import flags, loading
from agentsd.tools.cli import UsageError
from agentsd.tools.generate import output

VARIANT_LABELS = {"agentsd": "AgentSD", "original": "original"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` and its flags on the ``agentsd`` command's subparsers."""
    parser = subparsers.add_parser(
        "generate",
        help="generate images with the AgentSD patch (or without, or both side by side)",
        description="Generate images with a Stable Diffusion pipeline patched with AgentSD. Each image "
        "is saved as NNNNN-<seed>-<prompt>.png with a .json sidecar holding every setting; "
        "existing files are never overwritten.",
    )
    add = parser.add_argument
    add("prompts", nargs="*", metavar="PROMPT", help="text prompt(s)")
    add("--prompt-file", type=Path, metavar="FILE",
        help="text file with one prompt per line (blank lines are skipped)")
    add("--negative-prompt", default=None, metavar="TEXT", help="negative prompt, used for every image")
    add("--num-images", type=int, default=1, metavar="N", help="images per prompt (default: %(default)s)")
    add("--seed", type=int, default=0, metavar="N",
        help="image i (counting across prompts from 0) uses seed+i, so any image can be made again "
        "alone with --seed <its seed> (default: %(default)s)")
    add("--steps", type=int, default=50, metavar="N", help="denoising steps (default: %(default)s)")
    add("--guidance", type=float, default=None, metavar="SCALE",
        help="classifier-free guidance scale (default: the pipeline's: 7.5 for SD, 5 for SDXL)")
    add("--height", type=int, default=None, metavar="PX",
        help="image height in pixels, a multiple of 8 (default: the model's native size; with "
        "--init-image, the init image's)")
    add("--width", type=int, default=None, metavar="PX", help="image width in pixels, as --height")
    add("--scheduler", choices=list(loading.SCHEDULERS), default=None, metavar="NAME",
        help=f"sampler: {', '.join(loading.SCHEDULERS)} (default: the model's own; the paper used pndm, "
        "i.e. PLMS)")
    add("--dtype", choices=["auto", *loading.DTYPES], default="auto",
        help="weight dtype (default: fp16 on CUDA, fp32 elsewhere)")
    add("--device", default="auto", metavar="DEVICE",
        help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    add("--model", default=loading.DEFAULT_MODEL, metavar="ID_OR_PATH",
        help="hub id or local diffusers pipeline folder (default: %(default)s)")
    add("--out", type=Path, default=Path("images"), metavar="FOLDER",
        help="output folder (default: %(default)s)")
    add("--init-image", type=Path, default=None, metavar="FILE", help="image-to-image: the starting image")
    add("--strength", type=float, default=0.8, metavar="S",
        help="image-to-image: how much of the init image to repaint, in (0, 1] (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-patch", action="store_true", help="the unpatched model (baseline)")
    mode.add_argument("--compare", action="store_true",
                      help="make each image both ways with the same seed and save a side-by-side grid "
                      "labelled with each half's seconds")
    flags.add_patch_arguments(
        parser,
        reserved=("seed",),
        help_overrides={"seed": "seed of the patch's own random choices (default: each image's seed)"},
    )
    parser.set_defaults(func=run)
    return parser


@dataclass
class Job:
    """One image to make."""

    index: int
    prompt: str
    seed: int


# ---------------------------------------------------------------- checks (before loading anything)


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.prompt_file is not None:
        path = args.prompt_file
        if not path.exists():
            raise UsageError(f"prompt file {str(path)!r} does not exist")
        if not path.is_file():
            raise UsageError(f"prompt file {str(path)!r} is not a file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UsageError(f"prompt file {str(path)!r} is not UTF-8 text") from None
        except OSError as error:
            raise UsageError(f"prompt file {str(path)!r} cannot be read: {error.strerror}") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise UsageError(f"prompt file {str(path)!r} has no prompts (it is empty)")
        prompts += from_file
    if not prompts:
        raise UsageError("no prompt: give prompts as arguments or with --prompt-file")
    if any(not p.strip() for p in prompts):
        raise UsageError("empty prompt: every prompt needs some text")
    return prompts


def _check_size(name: str, value: int | None) -> None:
    if value is not None and (value <= 0 or value % 8):
        raise UsageError(f"--{name} must be a positive multiple of 8, got {value}")


def _read_init_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise UsageError(f"init image {str(path)!r} does not exist")
    if not path.is_file():
        raise UsageError(f"init image {str(path)!r} is not a file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        reason = "not an image Pillow can read" if isinstance(error, UnidentifiedImageError) else error
        raise UsageError(f"init image {str(path)!r} cannot be read: {reason}") from None


def _check_numbers(args) -> None:
    if args.num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {args.num_images}")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UsageError(f"--guidance must be a finite number, got {args.guidance}")
    _check_size("height", args.height)
    _check_size("width", args.width)
    if args.init_image is not None:
        if not 0 < args.strength <= 1:
            raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
        if int(args.steps * args.strength) < 1:
            raise UsageError(
                f"--steps {args.steps} x --strength {args.strength} leaves no denoising step; "
                "raise one of them"
            )


def _patch_kwargs(args, seed: int) -> dict:
    kwargs = flags.patch_kwargs(args)
    if kwargs["seed"] is None:
        kwargs["seed"] = seed
    return kwargs


def _init_size(image, args) -> tuple[int, int]:
    width = args.width or image.width // 8 * 8
    height = args.height or image.height // 8 * 8
    if width < 8 or height < 8:
        raise UsageError(f"init image {str(args.init_image)!r} is smaller than 8x8 pixels")
    return width, height


# ---------------------------------------------------------------- generation


class _Generator:
    """Holds the loaded pipeline and the fixed call settings; makes one image per call."""

    def __init__(self, pipe, args, device: torch.device, init_image) -> None:
        self.pipe = pipe
        self.args = args
        self.device = device
        self.init_image = init_image
        if init_image is not None:
            self.width, self.height = init_image.size
        else:  # the native size: the UNet's latent size times the VAE's scale factor
            size = pipe.unet.config.sample_size
            native_h, native_w = (size, size) if isinstance(size, int) else size
            self.width = args.width or native_w * pipe.vae_scale_factor
            self.height = args.height or native_h * pipe.vae_scale_factor
        self.progress_bar = dict(position=1, leave=False, desc="steps", dynamic_ncols=True)
        pipe.set_progress_bar_config(**self.progress_bar)

    def call_kwargs(self, prompt: str, seed: int, steps: int) -> dict:
        kwargs = dict(
            prompt=prompt,
            negative_prompt=self.args.negative_prompt,
            num_inference_steps=steps,
            # a CPU generator gives the same noise on every device
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        if self.args.guidance is not None:
            kwargs["guidance_scale"] = self.args.guidance
        if self.init_image is not None:
            kwargs.update(image=self.init_image, strength=self.args.strength)
        else:
            kwargs.update(height=self.height, width=self.width)
        return kwargs

    def set_variant(self, variant: str, seed: int) -> None:
        if variant == "agentsd":
            agentsd.apply_patch(self.pipe, **_patch_kwargs(self.args, seed))
        else:
            agentsd.remove_patch(self.pipe)

    def make(self, variant: str, prompt: str, seed: int):
        """One image: ``(image, seconds, peak memory bytes, peak memory kind)``."""
        self.set_variant(variant, seed)
        loading.reset_peak_memory(self.device)
        kwargs = self.call_kwargs(prompt, seed, self.args.steps)
        with loading.Timer(self.device) as timer:
            image = self.pipe(**kwargs).images[0]
        used, kind = loading.peak_memory(self.device)
        return image, timer.seconds, used, kind

    def warm_up(self, variants: list[str], prompt: str, seed: int) -> None:
        """A few untimed steps per variant so the first timed image does not pay for warm-up."""
        steps = 2 if self.init_image is None else max(2, math.ceil(1 / self.args.strength) + 1)
        self.pipe.set_progress_bar_config(disable=True)
        try:
            for variant in variants:
                self.set_variant(variant, seed)
                self.pipe(**self.call_kwargs(prompt, seed, steps))
        finally:
            self.pipe.set_progress_bar_config(**self.progress_bar)


def _versions() -> dict:
    import diffusers
    import transformers

    return {
        "agentsd": agentsd.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _phase_counts(pipe) -> dict[str, int]:
    counts: dict[str, int] = {}
    for phase in agentsd.phase_history(pipe):
        counts[phase] = counts.get(phase, 0) + 1
    return counts


@dataclass
class _Plan:
    """Everything checked and resolved before the model is loaded."""

    jobs: list[Job]
    variants: list[str]
    init_image: object | None
    device: torch.device
    dtype: torch.dtype


def _prepare(args: argparse.Namespace) -> _Plan:
    """Check every input that can be checked without the model; raise one-line errors."""
    prompts = _read_prompts(args)
    _check_numbers(args)
    init_image = None
    if args.init_image is not None:
        from PIL import Image

        init_image = _read_init_image(args.init_image)
        init_image = init_image.resize(_init_size(init_image, args), resample=Image.Resampling.LANCZOS)
    output.check_output_folder(args.out)
    device = loading.resolve_device(args.device)
    dtype = loading.resolve_dtype(args.dtype, device)
    variants = ["original"] if args.no_patch else ["original", "agentsd"] if args.compare else ["agentsd"]
    if "agentsd" in variants:
        agentsd.check_settings(**_patch_kwargs(args, args.seed))  # the library's own messages
    loading.check_model_reference(args.model)
    jobs = [
        Job(index=i, prompt=prompt, seed=args.seed + i)
        for i, prompt in enumerate(p for p in prompts for _ in range(args.num_images))
    ]
    return _Plan(jobs, variants, init_image, device, dtype)


def run(args: argparse.Namespace) -> int:
    """Check every input, load the model, make and save the images, print a summary line."""
    plan = _prepare(args)
    task = "img2img" if plan.init_image is not None else "text2img"
    pipe = loading.load_pipeline(args.model, task=task, dtype=plan.dtype, device=plan.device)
    loading.set_scheduler(pipe, args.scheduler)
    patched_blocks = 0
    if "agentsd" in plan.variants:  # model-specific problems (e.g. no UNet) surface now, before any image
        agentsd.apply_patch(pipe, **_patch_kwargs(args, args.seed))
        patched_blocks = len(agentsd.patch_targets(pipe, flags.patch_kwargs(args)["max_downsample"]))
    gen = _Generator(pipe, args, plan.device, plan.init_image)
    folder = output.OutputFolder(args.out)
    if args.compare:
        gen.warm_up(plan.variants, plan.jobs[0].prompt, plan.jobs[0].seed)
    settings = {  # the same for every image of the run
        "task": task,
        "model": args.model,
        "pipeline": type(pipe).__name__,
        "steps": args.steps,
        "height": gen.height,
        "width": gen.width,
        "scheduler": args.scheduler,
        "scheduler_class": type(pipe.scheduler).__name__,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "device": str(plan.device),
        "init_image": str(args.init_image) if plan.init_image is not None else None,
        "strength": args.strength if plan.init_image is not None else None,
        "patched_blocks": patched_blocks,
        "versions": _versions(),
    }

    from tqdm.auto import tqdm

    seconds: dict[str, list[float]] = {v: [] for v in plan.variants}
    peak = (0, "")
    total = len(plan.jobs) * len(plan.variants)
    with tqdm(total=total, desc="images", unit="image", position=0, dynamic_ncols=True) as bar:
        for job in plan.jobs:
            for variant, secs, memory in _make_group(gen, folder, job, plan.variants, settings):
                seconds[variant].append(secs)
                peak = max(peak, memory)
                bar.update(1)
    print(_summary(seconds, peak, folder.path))
    return 0


def _make_group(gen: _Generator, folder: output.OutputFolder, job: Job, variants: list[str], settings: dict):
    """Make and save one job's image(s) (both variants and their grid with --compare).

    Yields ``(variant, seconds, (peak bytes, kind))`` as each image is saved.
    """
    args, compare = gen.args, len(variants) > 1
    stem = folder.new_stem(f"{job.seed}-{output.slug(job.prompt)}", _suffixes(compare))
    made = {}
    for variant in variants:
        image, secs, used, kind = gen.make(variant, job.prompt, job.seed)
        name = stem + ("-original" if compare and variant == "original" else "")
        patched = variant == "agentsd"
        record = {
            "file": name + ".png",
            "prompt": job.prompt,
            "negative_prompt": args.negative_prompt,
            "seed": job.seed,
            "index": job.index,
            "variant": variant,
            "guidance_scale": getattr(gen.pipe, "guidance_scale", args.guidance),
            **settings,
            "patch": _patch_kwargs(args, job.seed) if patched else None,
            "patched_blocks": settings["patched_blocks"] if patched else 0,
            "phases": _phase_counts(gen.pipe) if patched else None,
            "seconds": round(secs, 4),
            "peak_memory_bytes": used,
            "peak_memory": loading.format_bytes(used),
            "peak_memory_kind": kind,
            "compare_grid": stem + "-compare.png" if compare else None,
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        try:
            folder.save_image(image, name + ".png")
        except FileExistsError:  # only if another run writes the same name at this very moment
            raise UsageError(
                f"{folder.path / name}.png appeared while this run was writing it; "
                "is another run writing into the same folder?"
            ) from None
        folder.save_json(record, name + ".json")
        made[variant] = (image, secs)
        yield variant, secs, (used, kind)
    if compare:
        labels = [f"{VARIANT_LABELS[v]}  {made[v][1]:.2f} s" for v in variants]
        folder.save_image(output.labelled_grid([made[v][0] for v in variants], labels), stem + "-compare.png")


def _suffixes(compare: bool) -> tuple[str, ...]:
    if not compare:
        return (".png", ".json")
    return (".png", ".json", "-original.png", "-original.json", "-compare.png")


def _summary(seconds: dict[str, list[float]], peak: tuple[int, str], folder: Path) -> str:
    """E.g. ``agentsd generate: 4 images in images: AgentSD 1.54 s/image, peak memory 3.13 GB``."""
    total = sum(len(s) for s in seconds.values())
    parts = [f"{VARIANT_LABELS[v]} {sum(s) / len(s):.2f} s/image" for v, s in seconds.items()]
    if len(seconds) == 2 and sum(seconds["agentsd"]) > 0:
        parts.append(f"speed-up {sum(seconds['original']) / sum(seconds['agentsd']):.2f}x")
    memory = f"peak memory {loading.format_bytes(peak[0])}"
    parts.append(memory + (" (process RSS)" if peak[1] == "process_peak_rss" else ""))
    return f"agentsd generate: {total} image{'s' if total != 1 else ''} in {folder}: " + ", ".join(parts)
