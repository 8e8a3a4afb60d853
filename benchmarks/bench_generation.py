"""Seconds per image of whole generations (text encoding, every denoising step, VAE decoding) with
random weights, unpatched / tomesd / AgentSD, interleaved round by round.

The pipeline is the real architecture of ``--arch`` built offline from the configs shipped in the
package (:mod:`agentsd.tools.pipelines`); speed does not depend on the weights. The patches are
applied through their public APIs (``agentsd.apply_patch`` / ``tomesd.apply_patch``), as a user
would. Writes ``generation.md`` and ``generation.csv`` to ``--out`` after each resolution.

Examples:
    python benchmarks/bench_generation.py --arch sd15 --resolution 512 1024 --out results/gen-sd15
    python benchmarks/bench_generation.py --arch sd15 --resolution 2048 --max-downsample 2 --out x
    python benchmarks/bench_generation.py --arch tiny --resolution 64 --steps 2 --out /tmp/gen
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import agentsd
from agentsd.tools.bench.timing import Case, run_interleaved
from agentsd.tools.loading import resolve_device, resolve_dtype
from agentsd.tools.pipelines import PIPELINE_ARCHS, build_pipeline

try:
    from agentsd.tools.env import machine_description, versions_line
except ImportError:  # a checkout from before the shared environment module
    from agentsd.tools.bench.command import machine_description
    from agentsd.tools.bench.command import versions as versions_line
try:
    from agentsd.tools.measure import memory_method
except ImportError:  # a checkout from before the shared measuring module
    from agentsd.tools.bench.timing import memory_method

OUTPUT_FILES = ("generation.md", "generation.csv")
# Both patches merge with 2x2 cells in (part of) their schedule: at most 3 of 4 tokens can go.
MAX_RATIO = 0.75
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass(frozen=True)
class Method:
    """``unpatched``, or a patch (``tomesd`` / ``agentsd``) at a merge ratio."""

    kind: str
    ratio: float = 0.0

    @property
    def name(self) -> str:
        return self.kind if self.kind == "unpatched" else f"{self.kind}:{self.ratio:g}"


def parse_method(spec: str) -> Method:
    kind, _, ratio = spec.partition(":")
    if kind == "unpatched" and not ratio:
        return Method("unpatched")
    if kind not in ("tomesd", "agentsd") or not ratio:
        raise ValueError(f"method {spec!r}: use unpatched, tomesd:R or agentsd:R (R: merge ratio, e.g. 0.4)")
    try:
        value = float(ratio)
    except ValueError:
        raise ValueError(f"method {spec!r}: ratio {ratio!r} is not a number") from None
    if not 0 <= value < MAX_RATIO:
        raise ValueError(f"method {spec!r}: ratio must be in [0, {MAX_RATIO})")
    return Method(kind, value)


def parse_resolution(text: str) -> tuple[int, int]:
    """``512`` -> (512, 512); ``1024x768`` -> (1024, 768) as (width, height); multiples of 8."""
    try:
        sizes = [int(part) for part in text.lower().split("x")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or any(size <= 0 or size % 8 for size in sizes):
        raise ValueError(f"resolution {text!r}: give SIDE or WIDTHxHEIGHT in pixels, multiples of 8")
    return (sizes[0], sizes[-1])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_generation.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", default="sd15", choices=list(PIPELINE_ARCHS), help="architecture (sd15)")
    p.add_argument("--resolution", nargs="+", default=["512"], metavar="PX",
                   help="image sizes, SIDE or WIDTHxHEIGHT (512)")
    p.add_argument("--methods", nargs="+", default=["unpatched", "tomesd:0.4", "agentsd:0.4"], metavar="M",
                   help="unpatched, tomesd:R, agentsd:R (default: unpatched tomesd:0.4 agentsd:0.4)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per generation (50)")
    p.add_argument("--images", type=int, default=1, help="images per generation (1)")
    p.add_argument("--dtype", default="auto", help="fp32, fp16, bf16 or auto (fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported (3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds; memory probed in the last (1)")
    p.add_argument("--max-downsample", type=int, default=None, metavar="N",
                   help="patch levels downsampled at most N times (both patches; default: the first level "
                        "with attention, 1 for SD 1.x/2.x, 2 for SDXL)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, generations and patches (0)")
    p.add_argument("--out", required=True, help="folder for generation.md and generation.csv")
    p.add_argument("--overwrite", action="store_true", help="replace result files already in --out")
    return p


@dataclass
class Settings:
    arch: str
    resolutions: list[tuple[int, int]]
    methods: list[Method]
    steps: int
    images: int
    dtype: torch.dtype
    device: torch.device
    repeats: int
    warmup: int
    max_downsample: int | None
    seed: int
    out: Path
    overwrite: bool


def validate(args: argparse.Namespace) -> Settings:
    """Check every argument before a model is built; ValueError with one line naming the problem."""
    methods = [parse_method(spec) for spec in args.methods]
    if len(set(methods)) != len(methods):
        raise ValueError("a method is given twice")
    if Method("unpatched") not in methods:
        methods.insert(0, Method("unpatched"))  # the reference of the speed-ups
    for name in ("steps", "images", "repeats", "warmup"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    # The library's own checks (tomesd gets the same max_downsample, so it is checked without agentsd too).
    agentsd.check_settings(max_downsample=args.max_downsample)
    for method in methods:
        if method.kind == "agentsd":
            agentsd.check_settings(ratio=method.ratio, max_downsample=args.max_downsample)
    if any(m.kind == "tomesd" for m in methods):
        import tomesd  # noqa: F401  (fail now, not after building the model)
    device = resolve_device(args.device)
    out = Path(args.out)
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{out / existing[0]} exists: choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    return Settings(
        arch=args.arch,
        resolutions=[parse_resolution(text) for text in args.resolution],
        methods=methods,
        steps=args.steps,
        images=args.images,
        dtype=resolve_dtype(args.dtype, device),
        device=device,
        repeats=args.repeats,
        warmup=args.warmup,
        max_downsample=args.max_downsample,
        seed=args.seed,
        out=out,
        overwrite=args.overwrite,
    )


def attention_level(unet) -> int:
    """Downsampling of the UNet's first level with attention (1 for SD 1.x/2.x, 2 for SDXL)."""
    for index, kind in enumerate(unet.config.down_block_types):
        if "CrossAttn" in kind:
            return 2**index
    raise ValueError("the UNet has no attention")


def patcher(method: Method, pipe, settings: Settings):
    """``(apply, remove)`` of ``method`` on ``pipe`` through the patches' public APIs."""
    if method.kind == "agentsd":
        def apply() -> None:
            agentsd.apply_patch(
                pipe, ratio=method.ratio, max_downsample=settings.max_downsample, seed=settings.seed
            )

        return apply, lambda: agentsd.remove_patch(pipe)
    if method.kind == "tomesd":
        import tomesd

        # tomesd's default (level 1) patches nothing on SDXL: give it the level AgentSD patches.
        level = settings.max_downsample or attention_level(pipe.unet)

        def apply_tomesd() -> None:
            tomesd.apply_patch(pipe, ratio=method.ratio, max_downsample=level)

        return apply_tomesd, lambda: tomesd.remove_patch(pipe)
    return (lambda: None), (lambda: None)


def generation_case(method: Method, pipe, settings: Settings, size: tuple[int, int]) -> Case:
    width, height = size
    apply, remove = patcher(method, pipe, settings)

    def generate() -> None:
        pipe(
            PROMPT,
            num_inference_steps=settings.steps,
            num_images_per_prompt=settings.images,
            width=width,
            height=height,
            generator=torch.Generator(settings.device).manual_seed(settings.seed),
            output_type="np",  # random weights give NaNs at times; np skips the uint8 cast that warns
        )

    def check() -> None:
        phases = set(agentsd.phase_history(pipe))
        expected = {"agent", "tome"} if settings.steps >= 2 else {"agent"}
        if phases != expected:
            raise RuntimeError(f"{method.name} ran the phases {sorted(phases)}, expected {sorted(expected)}")

    return Case(
        key=method.name,
        calls=[(generate, 1.0 / settings.images)],
        setup=apply,
        teardown=remove,
        check=check if method.kind == "agentsd" else None,
    )


def environment(settings: Settings) -> list[str]:
    lines = [f"device: {machine_description(settings.device)}"]
    if settings.device.type == "cuda":
        driver = _nvidia_driver()
        if driver:
            lines.append(f"driver: {driver}")
    lines += [f"versions: {versions_line()}", f"memory: {memory_method(settings.device)}"]
    return lines


def _nvidia_driver() -> str | None:
    import subprocess

    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else None


COLUMNS = ("arch", "width", "height", "method", "steps", "s_per_image", "speedup", "peak_gib", "rounds")


def tables(rows: list[dict], header: list[str]) -> tuple[str, str]:
    """(markdown, csv) of the rows measured so far."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    md = ["# Whole generations, random weights", "", *(f"- {line}" for line in header), ""]
    md.append("| arch | size | method | steps | s / image | speed-up | peak memory |")
    md.append("|---|---|---|---|---|---|---|")
    for row in rows:
        peak = "n/a" if row["peak_gib"] == "" else _gib_text(row["peak_gib"])
        md.append(
            f"| {row['arch']} | {row['width']}x{row['height']} | {row['method']} | {row['steps']} | "
            f"{row['s_per_image']:.3f} | {row['speedup']:.2f}x | {peak} |"
        )
    return "\n".join(md) + "\n", buffer.getvalue()


def _gib_text(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def write_atomically(folder: Path, files: dict[str, str]) -> None:
    """Each file written to a temporary name and renamed over the old one: never half-written."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results are ordinary files
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run(settings: Settings, command: str) -> list[dict]:
    from diffusers.utils import logging

    logging.set_verbosity_error()
    dtype = str(settings.dtype).removeprefix("torch.")
    header = [*environment(settings), f"command: {command}",
              f"dtype: {dtype}, {settings.images} image(s) per generation (UNet batch {2 * settings.images}, "
              f"CFG), median of {settings.repeats} rounds"]
    print(f"building a random-weight {settings.arch} pipeline on {settings.device}", file=sys.stderr)
    pipe = build_pipeline(settings.arch, settings.dtype, settings.device, seed=settings.seed)
    pipe.set_progress_bar_config(disable=True)
    level = settings.max_downsample or attention_level(pipe.unet)
    why = "" if settings.max_downsample else ", the first level with attention"
    header.append(f"patched: tomesd and AgentSD on the levels downsampled at most {level}x{why}")
    rows: list[dict] = []
    for size in settings.resolutions:
        cases = [generation_case(method, pipe, settings, size) for method in settings.methods]
        names = ", ".join(method.name for method in settings.methods)
        print(f"{settings.arch} {size[0]}x{size[1]}: {names}", file=sys.stderr)
        results = run_interleaved(cases, settings.device, repeats=settings.repeats, warmup=settings.warmup)
        reference = results["unpatched"].median
        for method in settings.methods:
            measured = results[method.name]
            rows.append({
                "arch": settings.arch, "width": size[0], "height": size[1], "method": method.name,
                "steps": settings.steps, "s_per_image": measured.median,
                "speedup": reference / measured.median,
                "peak_gib": "" if measured.peak_bytes is None else measured.peak_bytes / 2**30,
                "rounds": len(measured.times),
            })
        md, csv_text = tables(rows, header)
        write_atomically(settings.out, {"generation.csv": csv_text, "generation.md": md})
    print(md, end="")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        settings = validate(args)
    except (ValueError, ImportError) as error:
        print(f"bench_generation.py: error: {error}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "benchmarks/bench_generation.py", *argv])
    run(settings, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
