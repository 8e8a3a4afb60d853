"""The resume manifest of an evaluation folder (``eval.json``): the settings and prompts its images
were made with, so that a run into a folder made with other settings is refused rather than mixed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from agentsd.tools.errors import UsageError
from agentsd.tools.evaluate.config import Plan
from agentsd.tools.files import json_text, write_atomic
from agentsd.tools.loading import model_key
from agentsd.tools.methods import Method

MANIFEST = "eval.json"


def build(plan: Plan, dtype: torch.dtype) -> dict:
    """The manifest of a run: every setting that changes the images, and the prompts."""
    cfg = plan.config
    settings = {"model": model_key(cfg.model),  # ./m/pipe and /abs/m/pipe are one model
                "steps": cfg.steps, "scheduler": cfg.scheduler, "guidance": cfg.guidance,
                "height": plan.size[1], "width": plan.size[0], "seed": cfg.seed,
                "dtype": str(dtype).removeprefix("torch.")}
    return {"settings": settings, "prompts": plan.prompts}


def read(path: Path) -> dict | None:
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


def check_resume(out: Path, manifest: dict) -> None:
    """Refuse an output folder whose images were made with other settings or prompts."""
    old = read(out / MANIFEST)
    if old is None:
        return
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


def write(out: Path, manifest: dict) -> None:
    """Write the manifest, keeping the longest prompt list seen, so a smaller re-run forgets no image."""
    old = read(out / MANIFEST)
    if old is not None and len(old["prompts"]) > len(manifest["prompts"]):
        manifest = {**manifest, "prompts": old["prompts"]}
    write_atomic(out / MANIFEST, json_text(manifest))


def adopt_legacy_folders(out: Path, methods: list[Method]) -> None:
    """Rename the folders of runs made before the method names were unified (``baseline``, ``tome-R``)."""
    for method in methods:
        target = out / method.slug
        for legacy in method.legacy_slugs:
            if not target.exists() and (out / legacy).is_dir():
                (out / legacy).rename(target)
