"""The GPU benchmark scripts on the CPU: ``benchmarks/gpu.sh --dry-run`` and a 2-step run of
``benchmarks/bench_generation.py`` on the tiny architecture."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
GPU_SH = ROOT / "benchmarks" / "gpu.sh"


def gpu_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        ["bash", str(GPU_SH), *args], capture_output=True, text=True, env=environment, timeout=600
    )


@pytest.fixture(scope="module")
def generation():
    """benchmarks/bench_generation.py imported as a module (it is a script, not part of the package)."""
    path = ROOT / "benchmarks" / "bench_generation.py"
    spec = importlib.util.spec_from_file_location("bench_generation", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the script says on a machine without CUDA")
def test_gpu_sh_dry_run_prints_every_command_and_a_real_run_refuses(tmp_path):
    out = tmp_path / "results"
    dry = gpu_sh("--dry-run", "--out", str(out))
    assert dry.returncode == 0, dry.stderr
    assert "sees no CUDA GPU" in dry.stderr and "a real run would stop here" in dry.stderr
    commands = [line[2:] for line in dry.stdout.splitlines() if line.startswith("+ ")]
    assert commands[0].endswith("-m pytest tests/test_cuda.py -v -rs -p no:cacheprovider")
    bench = [c for c in commands if " -m agentsd bench " in c]
    assert len(bench) >= 2
    for command in bench:
        assert "--random-weights" in command and "--dtype fp16 --batch 2 --device cuda" in command
        assert "unpatched tomesd agentsd-agent agentsd-tome agentsd bound" in command
    assert any("--arch sd15 --resolution 512 1024 2048" in c for c in bench)
    assert any("--arch sdxl --resolution 1024 2048" in c for c in bench)
    generations = [c for c in commands if "benchmarks/bench_generation.py" in c]
    assert any("--arch sd15 --resolution 512 1024 2048" in c for c in generations)
    assert any("--arch sdxl --resolution 1024 2048" in c for c in generations)
    assert any("--resolution 2048 --max-downsample 2" in c for c in generations)
    assert all("--steps 50" in c for c in generations)
    # compiled rows: asked for, or said clearly why not
    assert all("--compile" in c for c in bench) or "has no --compile" in dry.stderr
    assert not out.exists()  # a dry run writes nothing

    real = gpu_sh("--out", str(out))
    assert real.returncode == 2
    assert "cannot run" in real.stderr and "sees no CUDA GPU" in real.stderr
    assert not out.exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_sh_bad_arguments_exit_2(tmp_path):
    for args in (["--only", "everything"], ["--frobnicate"], ["--out"]):
        result = gpu_sh(*args)
        assert result.returncode == 2 and result.stderr.startswith("gpu.sh: error:"), args
        assert result.stdout == ""


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_generation_timing_on_tiny_two_steps(generation, tmp_path, capsys, one_thread):
    out = tmp_path / "gen"
    args = ["--arch", "tiny", "--resolution", "64", "--steps", "2", "--repeats", "1", "--device", "cpu",
            "--methods", "tomesd:0.3", "agentsd:0.4", "--out", str(out)]
    assert generation.main(args) == 0
    rows = read_rows(out / "generation.csv")
    assert [row["method"] for row in rows] == ["unpatched", "tomesd:0.3", "agentsd:0.4"]
    for row in rows:
        assert (row["arch"], row["width"], row["height"], row["steps"]) == ("tiny", "64", "64", "2")
        assert float(row["s_per_image"]) > 0 and row["rounds"] == "1"
    assert float(rows[0]["speedup"]) == 1.0
    md = (out / "generation.md").read_text()
    assert "| tiny | 64x64 | agentsd:0.4 | 2 |" in md
    assert "command: python benchmarks/bench_generation.py --arch tiny" in md and "versions:" in md

    # a second run refuses to replace the results, before building anything
    before = (out / "generation.csv").read_bytes()
    capsys.readouterr()
    assert generation.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists: choose another --out or pass --overwrite" in err
    assert (out / "generation.csv").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "agentsd:0.9"], "ratio must be in [0, 0.75)"),
        (["--methods", "fast"], "use unpatched, tomesd:R or agentsd:R"),
        (["--methods", "agentsd:0.4", "agentsd:0.4"], "given twice"),
        (["--resolution", "100"], "multiples of 8"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--max-downsample", "3"], "max_downsample must be None or a power of two"),
        (["--device", "cuda:7"], "CUDA is not available"),
    ],
)
def test_generation_timing_bad_arguments_exit_2_before_building(generation, tmp_path, capsys, args, message):
    if "cuda:7" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert generation.main(["--arch", "tiny", "--out", str(tmp_path / "gen"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_generation.py: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "gen").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_sh_reports_a_broken_bench_instead_of_skipping_its_flags(tmp_path):
    # an interpreter whose `agentsd bench --help` crashes, as a broken install would
    python = tmp_path / "python"
    python.write_text(
        '#!/usr/bin/env bash\n'
        'if [[ "$*" == "-m agentsd bench --help" ]]; then echo "KeyError: broken" >&2; exit 1; fi\n'
        f'exec {shutil.which("python") or "python3"} "$@"\n'
    )
    python.chmod(0o755)
    result = gpu_sh("--dry-run", "--only", "bench", PYTHON=str(python))
    assert result.returncode == 0
    assert "'" + str(python) + " -m agentsd bench --help' fails: KeyError: broken" in result.stderr
