"""The scripts in examples/ run end to end on tiny random-weight models saved to folders.

Each script is meant for real weights (its ``--model`` defaults to a hub id); here ``--model`` (and
``--controlnet``) point at tiny local pipelines so the same code path runs offline in seconds.
"""

import runpy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.tiny import make_sdxl_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("one_thread", "offline")


@pytest.fixture
def picture(tmp_path):
    """A 48x48 picture with a few shapes (so its edge map is not empty)."""
    image = np.zeros((48, 48, 3), dtype=np.uint8)
    image[8:40, 8:20] = (200, 40, 40)
    image[20:44, 26:44] = (40, 200, 90)
    path = tmp_path / "picture.png"
    Image.fromarray(image).save(path)
    return path


def run_example(name: str, argv: list[str], capsys) -> str:
    main = runpy.run_path(str(EXAMPLES / name))["main"]
    main(argv)
    return capsys.readouterr().out


def _check_outputs(prefix: Path, size: int, stdout: str) -> None:
    original, patched = (np.asarray(Image.open(f"{prefix}-{v}.png")) for v in ("original", "agentsd"))
    assert original.shape == patched.shape == (size, size, 3)
    assert not np.array_equal(original, patched)  # the patch ran
    assert stdout.strip().splitlines()[-1].startswith("original ") and "AgentSD" in stdout


def test_txt2img_sd15(tiny_sd_dir, tmp_path, capsys):
    prefix = tmp_path / "corgi"
    out = run_example(
        "txt2img_sd15.py",
        ["--model", str(tiny_sd_dir), "--steps", "3", "--size", "32", "--out", str(prefix)], capsys,
    )
    _check_outputs(prefix, 32, out)


def test_sdxl(tmp_path, capsys):
    model = tmp_path / "tiny-sdxl"
    make_sdxl_pipeline().save_pretrained(model)
    prefix = tmp_path / "sdxl"
    out = run_example(
        "sdxl_1024.py", ["--model", str(model), "--steps", "3", "--size", "32", "--out", str(prefix)], capsys
    )
    _check_outputs(prefix, 32, out)
    assert "of StableDiffusionXLPipeline" in out


def test_img2img(tiny_sd_dir, picture, tmp_path, capsys):
    prefix = tmp_path / "i2i"
    argv = [str(picture), "--model", str(tiny_sd_dir), "--steps", "4", "--strength", "0.75", "--size", "32"]
    out = run_example("img2img.py", [*argv, "--out", str(prefix)], capsys)
    _check_outputs(prefix, 32, out)


def test_controlnet(tiny_sd_dir, picture, tmp_path, capsys):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    # one stride-2 layer in the conditioning embedding: the tiny VAE downsamples by 2, not 8
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    controlnet.save_pretrained(tmp_path / "tiny-controlnet")
    prefix = tmp_path / "cn"
    argv = [str(picture), "--model", str(tiny_sd_dir), "--controlnet", str(tmp_path / "tiny-controlnet")]
    out = run_example("controlnet.py", [*argv, "--steps", "3", "--size", "32", "--out", str(prefix)], capsys)
    _check_outputs(prefix, 32, out)
    edges = np.asarray(Image.open(f"{prefix}-edges.png"))
    assert 0 < (edges > 0).mean() < 0.5  # white edges on black
