"""Making an evaluation's images and timing each method, sharded across ``accelerate`` processes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from agentsd.tools.evaluate import images as imgs
from agentsd.tools.evaluate.config import Plan
from agentsd.tools.evaluate.report import Row
from agentsd.tools.files import save_png
from agentsd.tools.measure import PeakMemory, Timer
from agentsd.tools.methods import Method, applied, reseed


def batches(indices: Sequence, size: int) -> list[list]:
    """``indices`` cut into lists of ``size`` (the last may be shorter)."""
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def generate(pipe, plan: Plan, method: Method, indices: Sequence[int]):
    """PIL images of ``indices``, each from its own CPU generator seeded ``seed + index``.

    One generator per image (a list for a batch) makes image ``i`` the same whatever batch or
    process it is made in; CPU generators make the initial noise the same on every device.
    """
    cfg = plan.config
    reseed(pipe, method, cfg.seed)
    guidance = {} if cfg.guidance is None else {"guidance_scale": cfg.guidance}
    return pipe(
        prompt=[plan.prompts[i] for i in indices],
        generator=[torch.Generator("cpu").manual_seed(cfg.seed + i) for i in indices],
        num_inference_steps=cfg.steps,
        width=plan.size[0],
        height=plan.size[1],
        output_type="pil",
        **guidance,
    ).images


def measure(pipe, plan: Plan, method: Method, device: torch.device) -> dict:
    """Seconds and GB per image of ``method`` (images not saved). Time: one warm-up batch, then
    ``time_batches`` timed batches; seconds / images. Memory: the paper's growth of the peak when the
    batch grows by one image, both peaks read by :class:`agentsd.tools.measure.PeakMemory`."""
    cfg = plan.config
    result: dict = {"s_per_image": None, "gb_per_image": None, "peak_gb": None}
    if cfg.time_batches == 0:
        return result
    count = len(plan.prompts)
    batch = [i % count for i in range(cfg.batch_size)]
    generate(pipe, plan, method, batch)  # warm-up: kernels, allocator, caches
    seconds = 0.0
    for _ in range(cfg.time_batches):
        with Timer(device) as timer:
            generate(pipe, plan, method, batch)
        seconds += timer.seconds
    result["s_per_image"] = seconds / (cfg.time_batches * cfg.batch_size)
    with PeakMemory(device) as at_batch:
        generate(pipe, plan, method, batch)
    with PeakMemory(device) as one_more:
        generate(pipe, plan, method, [i % count for i in range(cfg.batch_size + 1)])
    if at_batch.peak is not None and one_more.peak is not None:
        result["peak_gb"] = at_batch.peak / 1e9
        result["gb_per_image"] = (one_more.peak - at_batch.peak) / 1e9
    return result


def generate_all(
    pipe, plan: Plan, state, missing: dict[Method, list[int]], device: torch.device, show: bool
) -> dict[Method, Row]:
    """Apply each method in turn, time it (main process), make this process's missing images, remove it."""
    from tqdm import tqdm

    cfg = plan.config
    # Whole batches are dealt out, so a batch holds the same images with 1 or N processes.
    mine = {}
    for method in plan.methods:
        with state.split_between_processes(batches(missing[method], cfg.batch_size)) as share:
            mine[method] = list(share)  # this process's share, contiguous
    total = sum(len(batch) for shares in mine.values() for batch in shares)
    overall = tqdm(total=total, desc="all methods", unit="img", position=0, disable=not show)
    rows = {m: Row(m, images=cfg.num_images) for m in plan.methods}
    for method in plan.methods:
        folder = Path(plan.out) / method.slug
        with applied(pipe, method, cfg.seed):
            if state.is_main_process:
                overall.set_postfix_str(f"timing {method.name}")
                for key, value in measure(pipe, plan, method, device).items():
                    setattr(rows[method], key, value)
                overall.set_postfix_str("")
            todo = sum(len(batch) for batch in mine[method])
            bar = tqdm(total=todo, desc=method.name, unit="img", position=1, leave=False, disable=not show)
            for batch in mine[method]:
                for index, image in zip(batch, generate(pipe, plan, method, batch), strict=True):
                    # a broken file left by an earlier run is replaced
                    save_png(imgs.image_path(folder, index), image, overwrite=True)
                bar.update(len(batch))
                overall.update(len(batch))
            bar.close()
    overall.close()
    return rows
