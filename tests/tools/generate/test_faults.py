"""``agentsd generate`` under faults and unusual input: nothing lost, nothing misleading (issue 11).

Each test here failed before its fix; they run a tiny random-weight pipeline for 1-2 steps.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agentsd.tools import loading
from agentsd.tools.cli import main

REPO = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.usefixtures("one_thread", "offline")


def generate(model_dir, out, *args, steps: str = "1") -> int:
    return main(["generate", *args, "--model", str(model_dir), "--steps", steps, "--out", str(out)])


def sidecars(out: Path) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("*.json"))]


def no_debris(out: Path) -> bool:
    """No temporary file, and every PNG has its sidecar."""
    if not out.exists():
        return True
    names = set(os.listdir(out))
    pngs = {n for n in names if n.endswith(".png") and not n.endswith("-compare.png")}
    return not [n for n in names if n.startswith(".")] and all(n[:-4] + ".json" in names for n in pngs)


def test_a_number_taken_by_another_run_moves_on_instead_of_discarding_the_image(
    tiny_sd_dir, tmp_path, monkeypatch
):
    from agentsd.tools.generate import output

    new_stem = output.OutputFolder.new_stem
    taken = []

    def racing_new_stem(self, name):  # as a run that does not take the folder's lock would
        stem = new_stem(self, name)
        if not taken:  # another run publishes this very number first
            for suffix in (".png", ".json"):
                (self.path / (stem + suffix)).write_text("the other run's")
            taken.append(stem)
        return stem

    monkeypatch.setattr(output.OutputFolder, "new_stem", racing_new_stem)
    assert generate(tiny_sd_dir, tmp_path, "a cat") == 0
    assert (tmp_path / "00001-0-a-cat.png").read_text() == "the other run's"  # untouched
    with Image.open(tmp_path / "00002-0-a-cat.png") as image:  # ours, under the next number
        assert image.size == (32, 32)
    assert json.loads((tmp_path / "00002-0-a-cat.json").read_text())["file"] == "00002-0-a-cat.png"


def test_an_interrupt_while_saving_leaves_no_png_without_its_sidecar(tiny_sd_dir, tmp_path, monkeypatch):
    import json as json_module

    def interrupted(original):
        def dump(obj, *args, **kwargs):
            if isinstance(obj, dict) and "prompt" in obj and "seed" in obj:  # the image's sidecar
                raise KeyboardInterrupt
            return original(obj, *args, **kwargs)

        return dump

    monkeypatch.setattr(json_module, "dump", interrupted(json_module.dump))
    monkeypatch.setattr(json_module, "dumps", interrupted(json_module.dumps))
    out = tmp_path / "out"
    assert generate(tiny_sd_dir, out, "a cat") == 130
    assert no_debris(out)
    assert not out.exists()  # the run made the folder and saved nothing: no empty folder left


def test_sigterm_while_writing_leaves_no_temporary_files(tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from PIL import Image\n"
        "save = Image.Image.save\n"
        "def terminated_save(self, *args, **kwargs):\n"
        "    save(self, *args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # as if killed while writing the image\n"
        "Image.Image.save = terminated_save\n"
        "from agentsd.tools.cli import main\n"
        f"sys.exit(main(['generate', 'a cat', '--model', {str(tiny_sd_dir)!r}, '--steps', '1',"
        f" '--out', {str(out)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=240, check=False)
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "agentsd generate: terminated"
    assert no_debris(out) and not out.exists()


def test_every_prompt_file_counts_and_only_newlines_end_a_prompt(tiny_sd_dir, tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    # a byte-order mark, and Unicode line breaks that are not newlines, inside one line
    first.write_bytes("\ufeffa red car\n\n".encode())
    second.write_text("a cat\u2028on a mat\x0cwith\u0085a hat\r\na dog\n", encoding="utf-8")
    out = tmp_path / "out"
    assert generate(tiny_sd_dir, out, "--prompt-file", str(first), "--prompt-file", str(second)) == 0
    assert [r["prompt"] for r in sidecars(out)] == [
        "a red car", "a cat\u2028on a mat\x0cwith\u0085a hat", "a dog"
    ]


def test_init_image_exif_orientation_is_applied(tiny_sd_dir, tmp_path):
    init = tmp_path / "init.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    Image.new("RGB", (48, 40), "gray").save(init, exif=exif)
    out = tmp_path / "out"
    assert generate(tiny_sd_dir, out, "a house", "--init-image", str(init), "--strength", "1", steps="2") == 0
    record = sidecars(out)[0]
    assert (record["width"], record["height"]) == (40, 48)  # as any image viewer shows it
    with Image.open(out / record["file"]) as image:
        assert image.size == (40, 48)


def test_full_disk_is_one_line_and_leaves_nothing(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    def full_disk(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "out"
    assert generate(tiny_sd_dir, out, "a cat") == 2
    err = capsys.readouterr().err  # after the loading progress bars, one line
    last = err.strip().splitlines()[-1]
    assert "No space left on device" in last and str(out) in last and "Traceback" not in err
    assert last.startswith("agentsd generate: error: cannot write ")
    assert not out.exists()  # nothing half-written, no empty folder


def test_files_get_the_usual_mode_from_the_umask(tiny_sd_dir, tmp_path):
    old = os.umask(0o022)
    try:
        assert generate(tiny_sd_dir, tmp_path / "out", "a cat") == 0
    finally:
        os.umask(old)
    modes = {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()}
    assert modes == {"0o644"}  # as eval's files and any other program's (was 0600)


def test_sidecar_names_the_model_by_one_spelling(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_sd_dir.parent)
    assert generate(f"./{tiny_sd_dir.name}/", tmp_path / "out", "a cat") == 0
    assert sidecars(tmp_path / "out")[0]["model"] == str(tiny_sd_dir.resolve())


@pytest.mark.parametrize("scheduler", [["--scheduler", "pndm"], []])
def test_scheduler_pndm_is_plms_even_if_the_model_config_lacks_skip_prk_steps(tiny_sd_dir, tmp_path,
                                                                             scheduler):
    """``pndm`` is PLMS; so is a PNDM model's own scheduler, in every tool (bench ran it so, generate
    refused 2 steps: one meaning of the default --scheduler since issue 16)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    config_path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.pop("skip_prk_steps")  # PNDM's default is then the Runge-Kutta warm-up
    config_path.write_text(json.dumps(config))
    out = tmp_path / "out"
    # 2 steps: PNDM with Runge-Kutta warm-up crashes below 4 steps
    assert generate(model, out, "a cat", *scheduler, steps="2") == 0
    record = sidecars(out)[0]
    assert record["scheduler_class"] == "PNDMScheduler" and record["phases"] == {"agent": 1, "tome": 1}


def test_compile_makes_the_same_image(tiny_sd_dir, tmp_path):
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    assert generate(tiny_sd_dir, plain, "a cat", steps="2") == 0
    assert generate(tiny_sd_dir, compiled, "a cat", "--compile", steps="2") == 0
    record = sidecars(compiled)[0]
    assert record["compile"] == "regional" and record["phases"] == {"agent": 1, "tome": 1}
    assert record["compile_mode"] == "default" and sidecars(plain)[0]["compile_mode"] is None
    images = [np.asarray(Image.open(folder / "00001-0-a-cat.png"), dtype=int) for folder in (plain, compiled)]
    assert np.abs(images[0] - images[1]).max() <= 2  # compiled kernels round differently, by a hair


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was checked")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", str(2**63)], f"--seed must be in [0, {2**63 - 1}], got {2**63}"),
        (["--seed", str(2**63 - 1), "--images-per-prompt", "2"], "(image i uses seed + i, up to seed + 1)"),
        (["--images-per-prompt", "0"], "--images-per-prompt must be at least 1, got 0"),
        (["--sx", str(2**32)], "sx must be in [1, 64], got 4294967296"),
        (["--init-image", "{tmp}/big.png", "--strength", "1"], "is too large"),
        (["--prompt-file", "{tmp}/blank.txt"], "has no prompts: it has only blank lines"),
        (["--prompt-file", "{tmp}/empty.txt"], "has no prompts: it is empty"),
    ],
)
def test_bad_input_is_one_line_before_loading(args, message, tiny_sd_dir, tmp_path, monkeypatch, capsys):
    Image.new("RGB", (32, 32), "gray").save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 is then a decompression bomb
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    (tmp_path / "empty.txt").write_text("")
    monkeypatch.setattr(loading, "load_pipeline", _must_not_load)
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path) for a in args]
    prompt = [] if "--prompt-file" in args else ["a cat"]
    assert generate(tiny_sd_dir, out, *prompt, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("agentsd generate: error: ") and message in err, err
    assert not out.exists()


def test_temporaries_left_by_a_killed_run_are_removed(tiny_sd_dir, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    out = tmp_path / "out"
    out.mkdir()
    debris = out / f".00001-0-a-cat.png.{dead}-x1y2z3.tmp"  # as a SIGKILLed run leaves it
    debris.write_bytes(b"half an image")
    assert generate(tiny_sd_dir, out, "a cat") == 0
    assert sorted(os.listdir(out)) == ["00001-0-a-cat.json", "00001-0-a-cat.png"]


def test_python_api_takes_an_agentsd_config(tiny_sd_dir, tmp_path):
    import agentsd
    from agentsd.tools.generate import GenerateConfig, run_generate

    config = GenerateConfig(prompts=["a cat"], model=str(tiny_sd_dir), steps=2, out=tmp_path,
                            patch=agentsd.AgentSDConfig(ratio=0.5), progress=False)
    result = run_generate(config)
    assert [p.name for p in result.files] == ["00001-0-a-cat.png"] and len(result.seconds["agentsd"]) == 1
    assert sidecars(tmp_path)[0]["patch"]["ratio"] == 0.5
    assert result.summary().startswith(f"agentsd generate: 1 image in {tmp_path}: AgentSD ")


def test_python_api_names_an_unknown_setting(tiny_sd_dir, tmp_path):
    from agentsd.tools.errors import UsageError
    from agentsd.tools.generate import GenerateConfig, run_generate

    with pytest.raises(UsageError, match="unknown AgentSD setting.* rattio"):
        run_generate(GenerateConfig(prompts=["a cat"], model=str(tiny_sd_dir), out=tmp_path / "out",
                                    patch={"rattio": 0.5}))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- issue 16: inputs that got through


def test_strength_without_an_init_image_is_refused(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loading, "load_pipeline", _must_not_load)
    assert generate(tiny_sd_dir, tmp_path / "out", "a cat", "--strength", "0.5") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--strength goes with --init-image" in err, err
    assert not (tmp_path / "out").exists()
    # a flag's own mistake is named before the model is looked up (offline, a hub id cannot be)
    assert generate("stable-diffusion-v1-5/stable-diffusion-v1-5", tmp_path / "out", "a cat",
                    "--strength", "0.5") == 2
    assert "--strength goes with --init-image" in capsys.readouterr().err


def test_a_prompt_file_that_is_a_device_says_so(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loading, "load_pipeline", _must_not_load)
    assert generate(tiny_sd_dir, tmp_path / "out", "--prompt-file", "/dev/null") == 2
    err = capsys.readouterr().err
    assert err.strip() == "agentsd generate: error: prompt file '/dev/null' is a device, not a regular file"


def test_resolution_sets_width_and_height(tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    assert generate(tiny_sd_dir, out, "a cat", "--resolution", "48x40", "--no-progress") == 0
    record = sidecars(out)[0]
    assert (record["width"], record["height"]) == (48, 40)
    with Image.open(out / record["file"]) as image:
        assert image.size == (48, 40)


def test_no_progress_hides_the_bars(tiny_sd_dir, tmp_path, capsys):
    assert generate(tiny_sd_dir, tmp_path / "out", "a cat", "--no-progress") == 0
    captured = capsys.readouterr()
    assert not captured.err, captured.err  # no loading, image or step bars
    assert captured.out.startswith("agentsd generate: 1 image in ")


def _group(stem: str):
    return [(".json", "{}"), (".png", b"png")]


def test_two_runs_in_one_folder_never_share_a_number(tmp_path):
    """Two runs opened the folder before either saved: each image still gets its own number."""
    from agentsd.tools.generate import output

    first, second = output.OutputFolder(tmp_path), output.OutputFolder(tmp_path)
    assert first.save_new_group("0-a-cat", _group) == "00001-0-a-cat"
    assert second.save_new_group("0-a-dog", _group) == "00002-0-a-dog"
    assert first.save_new_group("1-a-cat", _group) == "00003-1-a-cat"


def test_numbering_goes_on_after_99999(tmp_path):
    from agentsd.tools.generate import output

    (tmp_path / "99999-0-a-cat.png").write_bytes(b"")
    folder = output.OutputFolder(tmp_path)
    assert folder.save_new_group("0-a-dog", _group) == "100000-0-a-dog"
    again = output.OutputFolder(tmp_path)  # a later run counts the six-digit number too
    assert again.save_new_group("0-a-cow", _group) == "100001-0-a-cow"
    # a file of the user's whose name starts with digits is not taken for one of ours
    (tmp_path / "20240101-notes.txt").write_text("mine")
    assert again.save_new_group("0-a-pig", _group) == "100002-0-a-pig"


def _save_groups(folder, run: str) -> None:
    from agentsd.tools.generate import output

    out = output.OutputFolder(folder)
    for i in range(40):
        out.save_new_group(f"{i}-run-{run}", _group)


def test_concurrent_processes_get_unique_numbers(tmp_path):
    """Two processes saving groups into one folder at the same time, each under its own names."""
    import multiprocessing

    # forked: the children only write files, and start without importing torch again
    runs = [multiprocessing.get_context("fork").Process(target=_save_groups, args=(tmp_path, run))
            for run in "ab"]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=120)
    assert [run.exitcode for run in runs] == [0, 0]
    numbers = [name.split("-")[0] for name in os.listdir(tmp_path) if name.endswith(".png")]
    assert len(numbers) == 80 and len(set(numbers)) == 80


def test_num_images_is_now_images_per_prompt(tmp_path, capsys):
    """--num-images counted images per prompt in generate and per method in eval (issue 16): generate's
    is --images-per-prompt now, and the old flag says so in one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a cat", "--num-images", "2", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-images is now --images-per-prompt" in err
    assert not (tmp_path / "out").exists()
