"""An eval resume remakes a deleted image exactly, also without classifier-free guidance (core 0.3).

Without CFG the UNet's batch is the number of images in a pipeline call, so a resumed image is made
in a smaller (here odd) batch than the first time. agentsd 0.2 turned the random dst positions off
for odd batches, so the remade image differed from the one it replaced.
"""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from agentsd.tools.evaluate import images as imgs
from agentsd.tools.evaluate.command import EvalConfig, run_eval


def _pixels(folder, index: int) -> np.ndarray:
    with Image.open(imgs.image_path(folder, index)) as image:
        return np.asarray(image.convert("RGB"))


def test_resume_without_cfg_remakes_a_deleted_image_bit_identically(tiny_sd_dir, tmp_path, one_thread):
    out = tmp_path / "run"
    config = EvalConfig(model=str(tiny_sd_dir), out=str(out), methods=["agentsd:0.5"], steps=3,
                        resolution=32, num_images=4, batch_size=2, guidance=1.0, fid=False, clip=False,
                        time_batches=0, progress=False)
    run_eval(config)
    folder = out / "agentsd-0.5"
    first = [_pixels(folder, i) for i in range(4)]
    assert any(np.abs(first[0].astype(int) - image).max() > 0 for image in first[1:])  # four real images

    for index in (0, 3):  # each remade alone, in a batch of one
        resumed = tmp_path / f"resumed-{index}"
        shutil.copytree(out, resumed)
        imgs.image_path(resumed / "agentsd-0.5", index).unlink()
        run_eval(EvalConfig(**{**config.__dict__, "out": str(resumed)}))
        assert np.array_equal(_pixels(resumed / "agentsd-0.5", index), first[index])
