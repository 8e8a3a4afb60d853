"""agentsd eval under bad input and faults: each case failed before its fix (issue 11, item 5)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from agentsd.tools.cli import main
from agentsd.tools.evaluate import EvalConfig, run_eval
from tests.tools.evaluate.test_eval import TinyFeatures

REPO = Path(__file__).resolve().parents[3]
TINY = ["--steps", "2", "--resolution", "32", "--batch-size", "2", "--no-progress",
        "--no-clip"]


def eval_cli(model: Path, out: Path, *extra: str) -> int:
    return main(["eval", "--model", str(model), "--out", str(out), *TINY, *extra])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("agentsd eval: error: "), err
    for word in words:
        assert word in err, err
    return err


def random_jpeg(path: Path, seed: int, truncate: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    array = torch.randint(0, 256, (40, 56, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(array).save(path, format="JPEG")
    if truncate:  # the header and structure still verify; decoding the pixels fails
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def test_adding_a_method_keeps_the_rows_already_on_disk(tiny_sd_dir, tmp_path):
    out = tmp_path / "run"
    assert eval_cli(tiny_sd_dir, out, "--num-images", "2", "--no-fid", "--time-batches", "1",
                    "--methods", "unpatched", "agentsd:0.5") == 0
    first = {row["method"]: row for row in read_csv(out / "results.csv")}
    assert set(first) == {"unpatched", "agentsd:0.5"} and float(first["agentsd:0.5"]["s_per_image"]) > 0

    assert eval_cli(tiny_sd_dir, out, "--num-images", "2", "--no-fid", "--time-batches", "0",
                    "--methods", "tomesd:0.4") == 0
    rows = {row["method"]: row for row in read_csv(out / "results.csv")}
    assert list(rows) == ["unpatched", "tomesd:0.4", "agentsd:0.5"]  # the registry's order
    for method in ("unpatched", "agentsd:0.5"):  # the earlier rows, timings included, are kept
        assert rows[method]["s_per_image"] == first[method]["s_per_image"]
    assert rows["agentsd:0.5"]["speedup"] == first["agentsd:0.5"]["speedup"] != ""
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| Unpatched | 0 |" in table and "| ToMeSD | 40 |" in table and "| AgentSD | 50 |" in table


def test_old_method_names_and_folders_resume(tiny_sd_dir, tmp_path):
    """A run made before the rename (baseline/, tome-0.5/) resumes into unpatched/, tomesd-0.5/."""
    out = tmp_path / "run"
    assert eval_cli(tiny_sd_dir, out, "--num-images", "2", "--no-fid", "--time-batches", "0",
                    "--methods", "baseline", "tome:0.5") == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["tomesd-0.5", "unpatched"]
    made = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if p.parent != out}
    (out / "unpatched").rename(out / "baseline")
    (out / "tomesd-0.5").rename(out / "tome-0.5")
    assert eval_cli(tiny_sd_dir, out, "--num-images", "2", "--no-fid", "--time-batches", "0",
                    "--methods", "unpatched", "tomesd:0.5") == 0
    assert {p: p.stat().st_mtime_ns for p in made} == made  # moved back, not remade
    assert not (out / "baseline").exists() and not (out / "tome-0.5").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_guidance_must_be_finite(tiny_sd_dir, tmp_path, capsys, value):
    rc = eval_cli(tiny_sd_dir, tmp_path / "out", "--no-fid", "--num-images", "2", f"--guidance={value}")
    assert rc == 2
    one_line_error(capsys, "--guidance", "finite")
    assert not (tmp_path / "out").exists()


def test_num_images_is_bounded_before_planning(tiny_sd_dir, tmp_path, capsys):
    assert eval_cli(tiny_sd_dir, tmp_path / "out", "--no-fid", "--num-images", "1000000000") == 2
    one_line_error(capsys, "--num-images", "at most")
    assert not (tmp_path / "out").exists()


def test_prompts_that_is_a_folder(tiny_sd_dir, tmp_path, capsys):
    assert eval_cli(tiny_sd_dir, tmp_path / "out", "--no-fid", "--prompts", str(tmp_path)) == 2
    err = one_line_error(capsys, "is a folder")
    assert "does not exist" not in err


@pytest.mark.parametrize(
    "manifest", [{"settings": None, "prompts": None}, {"settings": [], "prompts": {}},
                 {"settings": {}, "prompts": None}, [], {"settings": {}, "prompts": [1, 2]}]
)
def test_malformed_manifest_is_one_line(tiny_sd_dir, tmp_path, capsys, manifest):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text(json.dumps(manifest))
    assert eval_cli(tiny_sd_dir, out, "--no-fid", "--num-images", "2") == 2
    one_line_error(capsys, "eval.json")
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"]


def test_undecodable_reference_images_are_not_counted(tiny_sd_dir, tmp_path, capsys):
    ref = tmp_path / "real"
    ref.mkdir()
    for i in range(3):
        random_jpeg(ref / f"good{i}.jpg", i)
    for i in range(2):
        random_jpeg(ref / f"cut{i}.jpg", 10 + i, truncate=True)
    out = tmp_path / "out"
    cfg = EvalConfig(model=str(tiny_sd_dir), out=str(out), methods=["unpatched"], ref_dir=str(ref),
                     clip=False, time_batches=0, steps=2, resolution=32, num_images=2,
                     batch_size=2, progress=False)
    rows = run_eval(cfg, fid_feature=TinyFeatures()).rows
    assert rows[0].fid is not None
    assert "FID: against 3 real images" in (out / "results.md").read_text(encoding="utf-8")
    assert "skipped 2" in capsys.readouterr().err


def test_ref_dir_with_one_decodable_image_fails_before_generating(tiny_sd_dir, tmp_path, capsys):
    ref = tmp_path / "real"
    ref.mkdir()
    random_jpeg(ref / "good.jpg", 0)
    for i in range(3):
        random_jpeg(ref / f"cut{i}.jpg", 10 + i, truncate=True)  # verify() passes, decoding fails
    out = tmp_path / "out"
    rc = eval_cli(tiny_sd_dir, out, "--num-images", "2", "--methods", "unpatched", "--ref-dir", str(ref))
    err = capsys.readouterr().err
    assert rc == 2 and "has 1 readable image(s); FID needs at least 2" in err and "Traceback" not in err
    assert not out.exists()


def test_folder_named_like_an_image_is_reported(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "unpatched" / "00000.png").mkdir(parents=True)
    rc = eval_cli(tiny_sd_dir, out, "--no-fid", "--num-images", "2", "--methods", "unpatched",
                  "--time-batches", "0")
    assert rc == 2
    one_line_error(capsys, "00000.png", "folder")
    assert (out / "unpatched" / "00000.png").is_dir()


def test_stale_temporary_files_are_removed_on_resume(tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    folder = out / "unpatched"
    folder.mkdir(parents=True)
    dead = 2**22 + 12345  # above Linux's pid_max default: no such process
    for name in (f".00000.png.{dead}-k2j4.tmp", f".results.csv.{dead}-x9q1.tmp"):
        (folder if name.startswith(".0") else out).joinpath(name).write_bytes(b"left by SIGTERM")
    assert eval_cli(tiny_sd_dir, out, "--no-fid", "--num-images", "2", "--methods", "unpatched",
                    "--time-batches", "0") == 0
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_files_are_written_with_the_umask(tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        assert eval_cli(tiny_sd_dir, out, "--no-fid", "--num-images", "2", "--methods", "unpatched",
                        "--time-batches", "0") == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o640}, modes


def test_full_disk_is_one_line_and_leaves_no_debris(tiny_sd_dir, tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE) makes writes past 1 kB fail (EFBIG)."""
    out = tmp_path / "out"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))\n"
        "from agentsd.tools.cli import main\n"
        f"sys.exit(main(['eval', '--model', {str(tiny_sd_dir)!r}, '--out', {str(out)!r}, '--no-fid',"
        " '--num-images', '2', '--methods', 'unpatched', '--time-batches', '0', '--steps', '2',"
        " '--resolution', '32', '--no-progress', '--no-clip']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("AGENTSD_DEBUG", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("agentsd eval: error: cannot write") and "00000.png" in lines[0]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- issue 16


def test_an_unknown_method_suggests_only_what_eval_runs(tiny_sd_dir, tmp_path, capsys):
    assert eval_cli(tiny_sd_dir, tmp_path / "out", "--methods", "foo") == 2
    err = one_line_error(capsys, "unknown method 'foo'", "agentsd-tome:R")
    assert "bound" not in err
    assert eval_cli(tiny_sd_dir, tmp_path / "out", "--methods", "unpatched", "bound") == 2
    one_line_error(capsys, "bound", "agentsd bench")


def test_prompt_files_split_as_generate_splits_them(tmp_path):
    """A lone carriage return ends a prompt in both tools (eval kept it inside the prompt)."""
    from agentsd.tools.prompts import load_prompts, read_prompt_file

    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa cat\ra dog\r\n\na cow\u2028on grass\n".encode())
    assert load_prompts(str(path), 3) == read_prompt_file(path) == ["a cat", "a dog", "a cow\u2028on grass"]
