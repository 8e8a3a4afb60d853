"""``agentsd generate`` end to end on a tiny random-weight pipeline loaded by path (offline).

Images are 32x32 px (the tiny model's native size) with 2-4 steps; the same inputs always give the
same pixels on CPU, which several tests rely on.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import agentsd
from agentsd.tools import loading
from agentsd.tools.cli import main

REPO = Path(__file__).resolve().parents[3]
STEPS = "3"  # PNDM: 3 steps = 2 agent steps + 1 ToMe step with the default schedule


pytestmark = pytest.mark.usefixtures("one_thread", "offline")


def generate(model_dir, out, *args) -> int:
    return main(["generate", *args, "--model", str(model_dir), "--steps", STEPS, "--out", str(out)])


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def first_run(tiny_sd_dir, tmp_path_factory):
    """Two images of one prompt, seeds 5 and 6, patched with the defaults."""
    out = tmp_path_factory.mktemp("first")
    assert generate(tiny_sd_dir, out, "a photo of a corgi", "--images-per-prompt", "2", "--seed", "5") == 0
    return out


def test_png_and_sidecar(first_run, tiny_sd_dir):
    names = sorted(os.listdir(first_run))
    assert names == [
        "00001-5-a-photo-of-a-corgi.json", "00001-5-a-photo-of-a-corgi.png",
        "00002-6-a-photo-of-a-corgi.json", "00002-6-a-photo-of-a-corgi.png",
    ]
    image = pixels(first_run / names[1])
    assert image.shape == (32, 32, 3)  # the model's native size
    assert image.std() > 1  # a real picture, not a blank
    record = json.loads((first_run / names[0]).read_text())
    import diffusers

    assert record["file"] == names[1]
    assert record["prompt"] == "a photo of a corgi" and record["negative_prompt"] is None
    assert (record["seed"], record["index"]) == (5, 0)
    assert record["variant"] == "agentsd" and record["task"] == "text2img"
    assert record["model"] == str(tiny_sd_dir) and record["pipeline"] == "StableDiffusionPipeline"
    assert (record["steps"], record["height"], record["width"]) == (3, 32, 32)
    assert record["guidance_scale"] == 7.5 and record["dtype"] == "float32" and record["device"] == "cpu"
    assert record["versions"]["agentsd"] == agentsd.__version__
    assert record["versions"]["diffusers"] == diffusers.__version__
    assert record["seconds"] > 0 and record["peak_memory_bytes"] > 0
    # every AgentSD setting with the library's default (the patch seed too: see the next test)
    defaults = {f.name: f.default for f in dataclasses.fields(agentsd.AgentSDConfig)}
    assert record["patch"] == defaults
    assert record["patched_blocks"] == len(agentsd.patch_targets(agentsd.apply_patch(_unet(tiny_sd_dir))))
    assert record["phases"] == {"agent": 2, "tome": 1}
    assert json.loads((first_run / names[2]).read_text())["seed"] == 6


def test_same_pixels_as_apply_patch_in_python(first_run, tiny_pipe):
    """The CLI patches with the library's defaults: apply_patch(pipe) and the same generator seed
    give the same image in Python."""
    import torch

    agentsd.apply_patch(tiny_pipe)
    image = tiny_pipe("a photo of a corgi", num_inference_steps=int(STEPS), height=32, width=32,
                      generator=torch.Generator("cpu").manual_seed(6)).images[0]
    assert np.array_equal(np.asarray(image), pixels(first_run / "00002-6-a-photo-of-a-corgi.png"))


def _unet(model_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")


def test_size_scheduler_negative_prompt_and_summary(tiny_sd_dir, tmp_path, capsys):
    args = ["a castle", "--images-per-prompt", "2", "--resolution", "48x40",
            "--scheduler", "euler-a", "--negative-prompt", "fog", "--guidance", "5"]
    assert generate(tiny_sd_dir, tmp_path, *args) == 0
    assert pixels(tmp_path / "00002-1-a-castle.png").shape == (40, 48, 3)
    record = json.loads((tmp_path / "00001-0-a-castle.json").read_text())
    assert (record["height"], record["width"], record["guidance_scale"]) == (40, 48, 5)
    assert (record["scheduler"], record["scheduler_class"]) == ("euler-a", "EulerAncestralDiscreteScheduler")
    assert record["negative_prompt"] == "fog"
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith(f"agentsd generate: 2 images in {tmp_path}: AgentSD ")
    assert "s/image" in out[0] and "peak memory" in out[0]


def test_same_seed_same_pixels_and_one_image_alone(first_run, tiny_sd_dir, tmp_path):
    """Image i uses seed+i: the second image of the first run is made again alone with --seed 6."""
    assert generate(tiny_sd_dir, tmp_path, "a photo of a corgi", "--seed", "6") == 0
    again = pixels(tmp_path / "00001-6-a-photo-of-a-corgi.png")
    assert np.array_equal(again, pixels(first_run / "00002-6-a-photo-of-a-corgi.png"))
    assert not np.array_equal(again, pixels(first_run / "00001-5-a-photo-of-a-corgi.png"))


def test_no_patch_differs_and_compare_matches_both(first_run, tiny_sd_dir, tmp_path):
    patched = pixels(first_run / "00001-5-a-photo-of-a-corgi.png")
    plain_dir, compare_dir = tmp_path / "plain", tmp_path / "compare"
    assert generate(tiny_sd_dir, plain_dir, "a photo of a corgi", "--seed", "5", "--no-patch") == 0
    plain = pixels(plain_dir / "00001-5-a-photo-of-a-corgi.png")
    record = json.loads((plain_dir / "00001-5-a-photo-of-a-corgi.json").read_text())
    assert record["variant"] == "original" and record["patch"] is None and record["phases"] is None
    assert np.abs(plain.astype(int) - patched).mean() > 1  # the patch changes the image

    assert generate(tiny_sd_dir, compare_dir, "a photo of a corgi", "--seed", "5", "--compare") == 0
    stem = compare_dir / "00001-5-a-photo-of-a-corgi"
    assert sorted(os.listdir(compare_dir)) == sorted(
        f"00001-5-a-photo-of-a-corgi{s}"
        for s in (".png", ".json", "-original.png", "-original.json", "-compare.png")
    )
    # both halves use the same seed: they equal the single-variant runs
    assert np.array_equal(pixels(f"{stem}.png"), patched)
    assert np.array_equal(pixels(f"{stem}-original.png"), plain)
    with Image.open(f"{stem}-compare.png") as grid:
        assert grid.width >= 64 and grid.height > 32  # two images side by side under a label strip
    records = [json.loads(Path(f"{stem}{s}.json").read_text()) for s in ("", "-original")]
    assert [r["variant"] for r in records] == ["agentsd", "original"]
    assert all(r["compare_grid"] == stem.name + "-compare.png" and r["seconds"] > 0 for r in records)


def test_img2img(tiny_sd_dir, tmp_path):
    rng = np.random.default_rng(0)
    init = tmp_path / "init.png"
    Image.fromarray(rng.integers(0, 255, (45, 40, 3), dtype=np.uint8)).save(init)
    out = tmp_path / "out"
    args = ["a red house", "--init-image", str(init), "--strength", "0.7", "--seed", "1"]
    assert generate(tiny_sd_dir, out, *args) == 0
    record = json.loads((out / "00001-1-a-red-house.json").read_text())
    assert record["task"] == "img2img" and record["pipeline"] == "StableDiffusionImg2ImgPipeline"
    assert (record["width"], record["height"], record["strength"]) == (40, 40, 0.7)  # floored to /8
    assert record["init_image"] == str(init)
    image = pixels(out / "00001-1-a-red-house.png")
    assert image.shape == (40, 40, 3)
    # a different strength repaints a different amount of the same start image
    assert generate(tiny_sd_dir, out, *args[:-4], "--strength", "1.0", "--seed", "1") == 0
    assert not np.array_equal(image, pixels(out / "00002-1-a-red-house.png"))


def test_second_run_keeps_the_first(first_run, tiny_sd_dir):
    before = {name: (first_run / name).read_bytes() for name in os.listdir(first_run)}
    assert generate(tiny_sd_dir, first_run, "a photo of a corgi", "--seed", "5") == 0
    after = set(os.listdir(first_run))
    assert after == set(before) | {"00003-5-a-photo-of-a-corgi.png", "00003-5-a-photo-of-a-corgi.json"}
    for name, data in before.items():
        assert (first_run / name).read_bytes() == data
    assert not [n for n in after if n.startswith(".")]  # no temporary files left behind


def _library_message(**kwargs) -> str:
    with pytest.raises(ValueError) as info:
        agentsd.apply_patch(_unet_for_messages(), **kwargs)
    return str(info.value)


def _unet_for_messages():
    from tests.tiny import make_unet

    return make_unet()


TMP = "{tmp}"
ERROR_CASES = {  # name: (arguments, the message stderr must contain)
    "no prompt": ([], "no prompt"),
    "missing prompt file": (
        ["--prompt-file", f"{TMP}/none.txt"], f"prompt file '{TMP}/none.txt' does not exist"
    ),
    "empty prompt file": (
        ["--prompt-file", f"{TMP}/empty.txt"], f"prompt file '{TMP}/empty.txt' has no prompts"
    ),
    "height": (["x", "--resolution", "48x36"], "--resolution 48x36: sizes must be positive multiples of 8"),
    "width": (["x", "--resolution", "0x48"], "--resolution 0x48: sizes must be positive multiples of 8"),
    "out is a file": (["x", "--out", f"{TMP}/empty.txt"], "is a file, not a folder"),
    "out under a file": (
        ["x", "--out", f"{TMP}/empty.txt/images"], f"cannot be created: '{TMP}/empty.txt' is a file"
    ),
    "missing init image": (
        ["x", "--init-image", f"{TMP}/none.png"], f"init image '{TMP}/none.png' does not exist"
    ),
    "unreadable init image": (
        ["x", "--init-image", f"{TMP}/empty.txt"], f"init image '{TMP}/empty.txt' cannot be read"
    ),
    "strength 0": (
        ["x", "--init-image", f"{TMP}/init.png", "--strength", "0"], "--strength must be in (0, 1]"
    ),
    "no step left": (
        ["x", "--init-image", f"{TMP}/init.png", "--strength", "0.2", "--steps", "4"],
        "--steps 4 x --strength 0.2 leaves no denoising step",
    ),
    "strength 1.5": (
        ["x", "--init-image", f"{TMP}/init.png", "--strength", "1.5"], "--strength must be in (0, 1]"
    ),
    # patch parameters: exactly the library's own message
    "ratio": (["x", "--ratio", "0.99"], _library_message(ratio=0.99)),
    "strides": (["x", "--sx", "0"], _library_message(sx=0)),
    "schedule": (
        ["x", "--agent-until", "0.8", "--merge-until", "0.5"],
        _library_message(agent_until=0.8, merge_until=0.5),
    ),
    "attn precision": (["x", "--attn-precision", "fp16"], _library_message(attn_precision="fp16")),
    # the model: local path, hub id (here offline: the network)
    "no such folder": (["x", "--model", f"{TMP}/no-model"], f"model '{TMP}/no-model': no such local folder"),
    "not a pipeline": (["x", "--model", TMP], "the local folder is not a diffusers pipeline"),
    "hub id offline": (["x", "--model", "someone/some-model"], "offline mode (HF_HUB_OFFLINE) is on"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_one_line_before_loading(case, tiny_sd_dir, tmp_path, capsys, monkeypatch):
    args, message = ERROR_CASES[case]
    (tmp_path / "empty.txt").write_text("\n  \n")
    Image.new("RGB", (32, 32), "gray").save(tmp_path / "init.png")

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_pipeline", must_not_load)
    out = tmp_path / "out"
    argv = ["generate", *(a.format(tmp=tmp_path) for a in args)]
    if "--model" not in args:
        argv += ["--model", str(tiny_sd_dir)]
    if "--out" not in args:
        argv += ["--out", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("agentsd generate: error: ")
    assert message.format(tmp=tmp_path) in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()  # nothing made, not even the folder


def test_entry_point_subprocess(tiny_sd_dir, tmp_path):
    """The installed ``agentsd`` command (its console script), importing this checkout; ``python -m
    agentsd`` where no script is installed or it was installed before the entry point moved."""
    script = shutil.which("agentsd")
    current = script is not None and "agentsd.tools.cli" in Path(script).read_text(errors="replace")
    command = [script] if current else [sys.executable, "-m", "agentsd"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    run = subprocess.run(
        [*command, "generate", "a tree", "--model", str(tiny_sd_dir), "--steps", "2", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"agentsd generate: 1 image in {out}: AgentSD ")
    assert sorted(os.listdir(out)) == ["00001-0-a-tree.json", "00001-0-a-tree.png"]

    bad = subprocess.run(
        [*command, "generate", "--prompt-file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "b")],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        f"agentsd generate: error: prompt file '{tmp_path / 'missing.txt'}' does not exist"
    ]
