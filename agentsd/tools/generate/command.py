"""``agentsd generate``: make images with or without the AgentSD patch, from the shell or Python
(``run_generate(GenerateConfig(prompts=["a corgi"], steps=50, out="images"))``).

Every input is checked before the model is loaded; each image is saved with its JSON sidecar as
one unit as soon as it is made, so an interrupted run keeps everything finished so far.
"""

from __future__ import annotations

import argparse
import datetime
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

import agentsd
from agentsd.tools import env, files, loading, measure, options
from agentsd.tools.errors import user_input
from agentsd.tools.generate import output
from agentsd.tools.generate.config import MODES, GenerateConfig, Job, Plan, prepare

VARIANT_LABELS = {"agentsd": "AgentSD", "original": "original"}
HELP = "generate images with the AgentSD patch (or without, or both side by side)"
DESCRIPTION = ("Generate images with a Stable Diffusion pipeline patched with AgentSD. Each image is saved "
               "as NNNNN-<seed>-<prompt>.png with a .json sidecar holding every setting; existing files are "
               "never overwritten.")


# ---------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` and its flags on the ``agentsd`` command's subparsers."""
    native = {"resolution": "the model's native size; with --init-image, the init image's"}
    parser = options.add_command(subparsers, "generate", GenerateConfig, run, help=HELP,
                                 description=DESCRIPTION, defaults_text=native)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-patch", action="store_true", help="the unpatched model (baseline)")
    mode.add_argument("--compare", action="store_true",
                      help="make each image both ways with the same seed and save a side-by-side grid "
                      "labelled with each half's seconds")
    options.add_patch_arguments(parser, reserved=("seed",))
    options.retire(parser, "--num-images", "is now --images-per-prompt (eval's --num-images counts the "
                   "images of each method)")
    return parser


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    """The :class:`GenerateConfig` of parsed command-line arguments."""
    mode = "original" if args.no_patch else "compare" if args.compare else "agentsd"
    return options.config_from_args(GenerateConfig, args, mode=mode, patch=options.patch_settings(args))


def run(args: argparse.Namespace) -> int:
    """``agentsd generate`` from parsed arguments: run it and print the one-line summary."""
    result = run_generate(config_from_args(args))
    print(result.summary())
    return 0


# ---------------------------------------------------------------- Python API


@dataclass
class GenerateResult:
    """What :func:`run_generate` made."""

    folder: Path
    files: list[Path] = field(default_factory=list)  # images and grids, in the order they were saved
    seconds: dict[str, list[float]] = field(default_factory=dict)  # per variant, per image
    peak_memory: tuple[int, str] = (0, "")  # (bytes, what was measured)

    def summary(self) -> str:
        """E.g. ``agentsd generate: 4 images in images: AgentSD 1.54 s/image, peak memory 3.13 GB``."""
        total = sum(len(s) for s in self.seconds.values())
        parts = [f"{VARIANT_LABELS[v]} {sum(s) / len(s):.2f} s/image" for v, s in self.seconds.items() if s]
        if len(self.seconds) == 2 and sum(self.seconds["agentsd"]) > 0:
            parts.append(f"speed-up {sum(self.seconds['original']) / sum(self.seconds['agentsd']):.2f}x")
        memory = f"peak memory {measure.format_bytes(self.peak_memory[0])}"
        parts.append(memory + (" (process RSS)" if self.peak_memory[1] == "process_rss" else ""))
        images = f"{total} image{'s' if total != 1 else ''}"
        return f"agentsd generate: {images} in {self.folder}: " + ", ".join(parts)


class _Generator:
    """Holds the loaded pipeline and the fixed call settings; makes one image per call."""

    def __init__(self, pipe, config: GenerateConfig, plan: Plan) -> None:
        self.pipe = pipe
        self.config = config
        self.plan = plan
        self.variant: str | None = None
        if plan.init_image is not None:
            self.width, self.height = plan.init_image.size
        elif plan.size is not None:
            self.width, self.height = plan.size
        else:  # the native size: the UNet's latent size times the VAE's scale factor
            size = pipe.unet.config.sample_size
            native_h, native_w = (size, size) if isinstance(size, int) else size
            self.width, self.height = native_w * pipe.vae_scale_factor, native_h * pipe.vae_scale_factor
        self.progress_bar = dict(position=1, leave=False, desc="steps", dynamic_ncols=True,
                                 disable=not config.progress)
        pipe.set_progress_bar_config(**self.progress_bar)

    def call_kwargs(self, prompt: str, seed: int, steps: int) -> dict:
        # a CPU generator gives the same noise on every device
        kwargs = dict(prompt=prompt, negative_prompt=self.config.negative_prompt, num_inference_steps=steps,
                      generator=torch.Generator("cpu").manual_seed(seed))
        if self.config.guidance is not None:
            kwargs["guidance_scale"] = self.config.guidance
        if self.plan.init_image is not None:
            kwargs.update(image=self.plan.init_image, strength=self.plan.strength)
        else:
            kwargs.update(height=self.height, width=self.width)
        return kwargs

    def set_variant(self, variant: str) -> None:
        """Patch or unpatch, only when the variant changes (a compiled UNet keeps its graphs)."""
        if variant == self.variant:
            return
        if variant == "agentsd":
            agentsd.apply_patch(self.pipe, **self.plan.patch)
        else:
            agentsd.remove_patch(self.pipe)
        self.variant = variant

    def make(self, variant: str, prompt: str, seed: int):
        """One image: ``(image, seconds, peak memory bytes, peak memory kind)``."""
        self.set_variant(variant)
        device = self.plan.device
        kwargs = self.call_kwargs(prompt, seed, self.config.steps)
        with measure.PeakMemory(device) as memory, measure.Timer(device) as timer:
            image = self.pipe(**kwargs).images[0]
        return image, timer.seconds, memory.peak or 0, memory.kind

    def warm_up(self, variants: tuple[str, ...], prompt: str, seed: int) -> float:
        """A few untimed steps per variant so the first timed image does not pay for warm-up (or for
        compiling). Returns the seconds it took."""
        steps = 2 if self.plan.init_image is None else max(2, math.ceil(1 / self.plan.strength) + 1)
        self.pipe.set_progress_bar_config(disable=True)
        try:
            with measure.Timer(self.plan.device) as timer:
                for variant in variants:
                    self.set_variant(variant)
                    self.pipe(**self.call_kwargs(prompt, seed, steps))
        finally:
            self.pipe.set_progress_bar_config(**self.progress_bar)
        return timer.seconds


def run_generate(config: GenerateConfig) -> GenerateResult:
    """Check every input of ``config``, load the model, make and save the images; returns the folder,
    the files saved, the seconds per image of each variant and the peak memory.

    Raises:
        UsageError: a bad setting, file or model (one line), raised before the model loads where
            possible; or a file that cannot be written (e.g. a full disk). A failed run leaves no
            temporary file, no image without its sidecar and no empty output folder it created.
    """
    plan = prepare(config)
    task = "img2img" if plan.init_image is not None else "text2img"
    pipe = loading.load_pipeline(config.model, task=task, dtype=plan.dtype, device=plan.device,
                                 progress=config.progress)
    loading.set_scheduler(pipe, config.scheduler)
    options.check_schedule(pipe.scheduler, None, config.steps)  # again: a hub model's config was not at hand
    gen = _Generator(pipe, config, plan)
    patched_blocks = 0
    if "agentsd" in plan.variants:  # model-specific problems (e.g. no UNet) surface now, before any image
        with user_input(f"model {config.model!r}: "):
            gen.set_variant("agentsd")
        patched_blocks = len(agentsd.patch_targets(pipe, plan.patch["max_downsample"]))
    compiled, warm_up_seconds = None, None
    if config.compile:
        compiled = loading.compile_unet(pipe.unet, mode=config.compile_mode)
    first = next(plan.jobs())
    if len(plan.variants) > 1 or compiled:
        warm_up_seconds = gen.warm_up(plan.variants, first.prompt, first.seed)
    settings = {  # the same for every image of the run
        "task": task, "model": loading.model_key(config.model), "pipeline": type(pipe).__name__,
        "steps": config.steps, "height": gen.height, "width": gen.width, "scheduler": config.scheduler,
        "scheduler_class": type(pipe.scheduler).__name__, "dtype": str(plan.dtype).removeprefix("torch."),
        "device": str(plan.device), "init_image": str(config.init_image) if plan.init_image else None,
        "strength": plan.strength, "compile": compiled,
        "compile_mode": config.compile_mode if compiled else None,
        "warm_up_seconds": round(warm_up_seconds, 4) if warm_up_seconds is not None else None,
        "versions": env.versions(("agentsd", "diffusers", "transformers", "torch")),
    }

    from tqdm.auto import tqdm

    result = GenerateResult(folder=plan.out, seconds={v: [] for v in plan.variants})
    with files.folder_for_results(plan.out) as out:
        folder = output.OutputFolder(out)
        with tqdm(total=plan.count * len(plan.variants), desc="images", unit="image", position=0,
                  dynamic_ncols=True, disable=not config.progress) as bar:
            for job in plan.jobs():
                for variant, path, secs, memory in _make_group(gen, folder, job, settings, patched_blocks):
                    result.files.append(path)
                    if variant is not None:
                        result.seconds[variant].append(secs)
                        result.peak_memory = max(result.peak_memory, memory)
                        bar.update(1)
    return result


def _make_group(gen: _Generator, folder: output.OutputFolder, job: Job, settings: dict, patched_blocks: int):
    """Make and save one job's image(s) (both variants and their grid when comparing).

    Yields ``(variant, path, seconds, (peak bytes, kind))`` as each file is saved (``variant`` is
    ``None`` for the grid).
    """
    variants = gen.plan.variants
    compare = len(variants) > 1
    name = f"{job.seed}-{output.slug(job.prompt)}"
    stem = None
    made = {}
    for variant in variants:
        image, secs, used, kind = gen.make(variant, job.prompt, job.seed)
        patched = variant == "agentsd"
        suffix = "-original" if compare and variant == "original" else ""
        record = {
            "prompt": job.prompt, "negative_prompt": gen.config.negative_prompt, "seed": job.seed,
            "index": job.index, "variant": variant,
            "guidance_scale": getattr(gen.pipe, "guidance_scale", gen.config.guidance), **settings,
            "patch": gen.plan.patch if patched else None, "patched_blocks": patched_blocks if patched else 0,
            "phases": dict(Counter(agentsd.phase_history(gen.pipe))) if patched else None,
            "seconds": round(secs, 4), "peak_memory_bytes": used, "peak_memory": measure.format_bytes(used),
            "peak_memory_kind": kind,
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }

        def parts(stem_: str, record=record, image=image, suffix=suffix):
            full = {"file": stem_ + suffix + ".png", **record,
                    "compare_grid": stem_ + "-compare.png" if compare else None}
            return [(suffix + ".json", files.json_text(full)), (suffix + ".png", files.png_writer(image))]

        if stem is None:  # the group's first file takes the next free number, whatever other runs do
            stem = folder.save_new_group(name, parts)
        else:
            files.write_unit([(folder.path / (stem + s), data) for s, data in parts(stem)])
        made[variant] = (image, secs)
        yield variant, folder.path / f"{stem}{suffix}.png", secs, (used, kind)
    if compare:
        labels = [f"{VARIANT_LABELS[v]}  {made[v][1]:.2f} s" for v in variants]
        grid = output.labelled_grid([made[v][0] for v in variants], labels)
        yield None, files.save_png(folder.path / (stem + "-compare.png"), grid), 0.0, (0, "")


__all__ = ["GenerateConfig", "GenerateResult", "MODES", "add_parser", "config_from_args",
           "run", "run_generate"]
