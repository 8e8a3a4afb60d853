"""``agentsd eval``'s settings (:class:`EvalConfig`) and every check that needs no model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from agentsd.tools import options
from agentsd.tools.errors import UsageError, user_input
from agentsd.tools.evaluate.metrics import DEFAULT_CLIP_MODEL
from agentsd.tools.evaluate.prompts import DEFAULT_TEMPLATE, IMAGENET, load_prompts
from agentsd.tools.methods import DEFAULT_METHODS, IMAGE_KINDS, Method, parse_methods
from agentsd.tools.options import Options, Size


@dataclass(kw_only=True)
class EvalConfig(Options):
    """Settings of an evaluation run (the CLI flags of ``agentsd eval``).

    The options every tool has are those of :class:`~agentsd.tools.options.Options`, with the
    paper's defaults here: 50 PLMS steps (``scheduler="pndm"``), guidance 7.5, 512x512 images;
    image ``i`` uses seed ``seed + i`` for every method. Under ``accelerate launch`` with several
    processes, accelerate assigns the devices and ``device`` must stay ``"auto"``.

    Attributes:
        out: output folder (images per method, results.md / .csv, fid_vs_time.png); required.
        methods: specs of :mod:`agentsd.tools.methods` (``unpatched``, ``tomesd:R``, ``agentsd:R``,
            ``agentsd-agent:R``, ``agentsd-tome:R``; ``baseline`` and ``tome:R`` are accepted);
            default: the paper's 11 rows.
        prompts: ``"imagenet"`` (``template`` filled with the 1000 class names) or a text file.
        template: prompt template for ImageNet class names, with a ``{name}`` field.
        num_images: images per method, at most 100,000; image ``i`` uses prompt ``i % len(prompts)``.
            2000 (two per ImageNet class) as in the paper.
        batch_size: images per pipeline call (1; larger batches are faster per image on big GPUs
            but the time column then is per image of a batch).
        ref_dir: folder of real images (e.g. ImageNet val) for FID; ``None`` = FID to the unpatched
            model's images.
        fid: compute FID.
        fid_weights: local InceptionV3 weights file for FID (else torch-fidelity downloads them).
        clip_model: CLIP hub id or local folder for the CLIP score; ``None`` skips the CLIP score.
        time_batches: batches timed per method after one warm-up batch (0 skips timing).
    """

    out: str | os.PathLike
    scheduler: str | None = "pndm"
    guidance: float | None = 7.5
    resolution: Size | None = 512
    methods: Sequence[str] = DEFAULT_METHODS
    prompts: str = IMAGENET
    template: str = DEFAULT_TEMPLATE
    num_images: int = 2000
    batch_size: int = 1
    ref_dir: str | None = None
    fid: bool = True
    fid_weights: str | None = None
    clip_model: str | None = DEFAULT_CLIP_MODEL
    time_batches: int = 3


@dataclass
class Plan:
    """A checked :class:`EvalConfig`, ready to run."""

    config: EvalConfig
    methods: list[Method]
    prompts: list[str]  # the prompt of every image
    size: tuple[int, int]  # (width, height)
    device: torch.device  # of one process; accelerate gives each of several its own
    out: Path


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


def check(cfg: EvalConfig) -> Plan:
    """Everything a user can get wrong, before any model loads: one-line :class:`UsageError`\\ s.

    Nothing is created on disk.
    """
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.time_batches < 0:
        raise UsageError(f"--time-batches must be non-negative, got {cfg.time_batches}")
    with user_input("--methods: "):
        methods = parse_methods(cfg.methods, kinds=IMAGE_KINDS)
    prompts = load_prompts(cfg.prompts, cfg.num_images, cfg.template)  # num_images is checked here
    checked = options.check(cfg, images=cfg.num_images)
    if checked.size is None:
        raise UsageError("eval compares images of one size: give a resolution")
    _check_fid_inputs(cfg, methods)
    return Plan(cfg, methods, prompts, checked.size, checked.device, checked.out)
