"""``agentsd eval``'s settings (:class:`EvalConfig`) and every check that needs no model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agentsd.tools import options
from agentsd.tools.errors import UsageError, user_input
from agentsd.tools.evaluate.metrics import DEFAULT_CLIP_MODEL
from agentsd.tools.methods import DEFAULT_METHODS, IMAGE_KINDS, Method, kind_specs, parse_methods
from agentsd.tools.options import Checked, Options, Size, option
from agentsd.tools.prompts import DEFAULT_TEMPLATE, IMAGENET, load_prompts


@dataclass(kw_only=True)
class EvalConfig(Options):
    """Settings of an evaluation run: the shared :class:`~agentsd.tools.options.Options` with the
    paper's defaults (50 PLMS steps, guidance 7.5, 512x512; image ``i`` uses ``seed + i`` for every
    method; under ``accelerate launch`` with several processes ``device`` stays ``"auto"``), and
    eval's own; each field's ``help`` says what it means."""

    out: str | os.PathLike = option(help="output folder: <out>/<method>/<index>.png and the results",
                                    type=Path, metavar="FOLDER")
    scheduler: str | None = "pndm"
    guidance: float | None = 7.5
    resolution: Size | None = 512
    methods: Sequence[str] = option(
        DEFAULT_METHODS, f"{kind_specs(IMAGE_KINDS)}; space- or comma-separated; "
        "results of earlier runs into --out are kept", nargs="+", metavar="SPEC",
        default_text="unpatched, tomesd:0.1 ... tomesd:0.5, agentsd:0.1 ... agentsd:0.5, the paper's rows")
    prompts: str = option(IMAGENET, "'imagenet' (the 1000 ImageNet-1k class names in --template) or a UTF-8 "
                          "text file, one prompt a line; image i gets prompt i modulo their count")
    template: str = option(DEFAULT_TEMPLATE, "prompt template for class names, with a {name} field")
    num_images: int = option(2000, "images per method, at most 100,000", type=int, metavar="N",
                             default_text="2000, two per ImageNet class")
    batch_size: int = options.batch_size_option()
    ref_dir: str | None = option(None, "folder of real images (e.g. ImageNet val) for FID", metavar="FOLDER",
                                 default_text="FID to the unpatched model's images")
    fid: bool = option(True, "compute FID")
    fid_weights: str | None = option(
        None, "local InceptionV3 weights (torch-fidelity's pt_inception-2015-12-05 file) for offline FID",
        metavar="FILE")
    clip: bool = option(True, "compute the CLIP score")
    clip_model: str = option(DEFAULT_CLIP_MODEL, "CLIP hub id or local folder for the CLIP score",
                             metavar="ID_OR_PATH")
    time_batches: int = option(3, "batches timed per method after one warm-up batch; 0: no timing", type=int,
                               metavar="N")


@dataclass(kw_only=True)
class Plan(Checked):
    """A checked :class:`EvalConfig`, ready to run (``device``: of one process; accelerate gives each
    of several its own)."""

    config: EvalConfig
    methods: list[Method]
    prompts: list[str]  # the prompt of every image


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
    """Check everything a user can get wrong before any model loads, creating nothing; one-line
    :class:`UsageError`\\ s."""
    if cfg.time_batches < 0:
        raise UsageError(f"--time-batches must be non-negative, got {cfg.time_batches}")
    with user_input("--methods: "):
        methods = parse_methods(cfg.methods, kinds=IMAGE_KINDS)
    prompts = load_prompts(cfg.prompts, cfg.num_images, cfg.template)  # num_images is checked here
    checked = options.check(cfg, images=cfg.num_images)
    if checked.size is None:
        raise UsageError("eval compares images of one size: give a resolution")
    _check_fid_inputs(cfg, methods)
    return Plan(**vars(checked), config=cfg, methods=methods, prompts=prompts)
