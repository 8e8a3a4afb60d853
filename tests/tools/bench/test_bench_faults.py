"""agentsd bench under bad input and faults: each case failed before its fix (issue 11, item 5)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agentsd.tools.cli import main

ROOT = Path(__file__).resolve().parents[3]


def bench(out: Path, *extra: str) -> int:
    return main(["bench", "--random-weights", "--out", str(out), "--repeats", "1", "--threads", "1", *extra])


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("agentsd bench: error: "), err
    for word in words:
        assert word in err, err
    return err


def test_out_under_a_file_is_refused_before_measuring(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    rc = bench(tmp_path / "file" / "sub", "--arch", "tiny", "--resolution", "64", "--methods", "bound")
    assert rc == 2
    one_line_error(capsys, "--out", "file")


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder nobody may write into: mode 0555, or for root (who ignores modes) the immutable flag."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        undo = ["chmod", "755", str(path)]
    elif shutil.which("chattr") and not subprocess.run(["chattr", "+i", str(path)],
                                                        capture_output=True).returncode:
        undo = ["chattr", "-i", str(path)]
    else:
        pytest.skip("running as root without chattr: no folder is read-only")
    try:
        yield path
    finally:
        subprocess.run(undo, check=True)


def test_read_only_out_is_refused_before_measuring(tmp_path, capsys):
    with read_only_folder(tmp_path / "ro") as folder:
        rc = bench(folder / "out", "--arch", "tiny", "--resolution", "64", "--methods", "bound")
        assert rc == 2
        one_line_error(capsys, "--out", "not writable")


def test_tomesd_on_a_latent_too_small_to_merge_is_refused(tmp_path, capsys):
    rc = bench(tmp_path / "out", "--arch", "tiny", "--resolution", "24x8", "--ratios", "0.5")
    assert rc == 2
    one_line_error(capsys, "tomesd", "24x8")
    assert not (tmp_path / "out").exists()


def test_agentsd_alone_runs_where_tomesd_cannot(tmp_path):
    assert bench(tmp_path / "out", "--arch", "tiny", "--resolution", "24x8", "--ratios", "0.5",
                 "--methods", "agentsd", "bound") == 0


def test_arch_with_an_unsupported_conditioning_is_refused_before_building(tmp_path, capsys):
    config = json.loads((ROOT / "agentsd" / "tools" / "configs" / "tiny.json").read_text())
    config["addition_embed_type"] = "image"  # diffusers cannot even build this without encoder_hid_dim
    path = tmp_path / "image-unet.json"
    path.write_text(json.dumps(config))
    rc = bench(tmp_path / "out", "--arch", str(path), "--resolution", "64")
    assert rc == 2
    one_line_error(capsys, "image-unet", "addition_embed_type='image'")
    assert not (tmp_path / "out").exists()


def test_methods_in_either_spelling_are_planned_once(tmp_path):
    from agentsd.tools.bench import BenchConfig
    from agentsd.tools.bench.config import check_config

    plan = check_config(BenchConfig(archs=["tiny"], methods=["bound", "baseline", "tome"], ratios=[0.3],
                                    out=tmp_path / "out"))
    assert [m.name for m in plan.methods] == ["unpatched", "tomesd:0.3", "bound"]
    assert not (tmp_path / "out").exists()  # checking writes nothing
