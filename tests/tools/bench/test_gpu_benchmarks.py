"""``benchmarks/gpu.sh`` on the CPU (issue 14, item 4): its plan, each bench command it will run on the
GPU checked by the CLI itself, and its runner (priority order, one deadline, a limit per step, a
failing step not stopping the later ones, results flat in one folder of at most 8 files)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from agentsd.tools.bench import config_from_args
from agentsd.tools.bench.config import check_config
from agentsd.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[3]
GPU_SH = ROOT / "benchmarks" / "gpu.sh"
STEPS = ["tests", "steps-sd15", "steps-sdxl", "paper-math", "paper-default", "compiled", "compiled-graphs",
         "generation"]
ALL_METHODS = "--methods unpatched tomesd agentsd-agent agentsd-tome agentsd bound --ratios 0.4"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def gpu_sh(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", str(GPU_SH), *args], capture_output=True, text=True, env=environment,
                          timeout=timeout)


def planned(stdout: str) -> dict[str, tuple[int, str]]:
    """step name -> (time limit, command) from a dry run's output."""
    steps = re.findall(r"^# (\S+) \(at most (\d+) s\)\n\+ (.+)$", stdout, flags=re.M)
    return {name: (int(limit), command) for name, limit, command in steps}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the script says on a machine without CUDA")
def test_dry_run_plans_every_step_and_each_bench_command_passes_the_bench_checks(tmp_path):
    out = tmp_path / "results"
    dry = gpu_sh("--dry-run", "--out", str(out))
    assert dry.returncode == 0, dry.stderr
    assert "sees no CUDA GPU" in dry.stderr and "a real run would stop here" in dry.stderr
    assert "budget 540 s" in dry.stdout
    steps = planned(dry.stdout)
    assert list(steps) == STEPS  # the priority order
    assert steps["tests"][1].endswith(
        "-m pytest tests/test_cuda.py tests/tools/test_measure.py -v -rs -p no:cacheprovider")
    assert sum(limit for limit, _ in steps.values()) > 540  # the deadline, not the limits, ends the run
    bench = {name: command for name, (_, command) in steps.items() if name != "tests"}
    for command in bench.values():
        assert f"--batch-size 1 --no-progress --out {out}" in command
        assert "--device cuda --dtype fp16" in command
    with_mlp = ALL_METHODS.replace(" --ratios", " agentsd-agent+mlp agentsd+mlp --ratios")
    assert f"{with_mlp} --arch sd15 --resolution 512 1024 2048" in bench["steps-sd15"]
    assert f"{ALL_METHODS} --arch sdxl --resolution 1024 2048" in bench["steps-sdxl"]
    paper = ("--measure generation --arch sd15 --resolution 512 --steps 50 --scheduler pndm --methods "
             "unpatched tomesd agentsd --ratios 0.1 0.2 0.3 0.4 0.5 --sdpa-kernel")
    assert paper + " math" in bench["paper-math"] and paper + " default" in bench["paper-default"]
    assert "--resolution 1024 2048 --methods unpatched agentsd --ratios 0.4 --compile" in bench["compiled"]
    assert bench["compiled"].endswith("--compile-backend inductor")
    assert ("--resolution 512 1024 --methods unpatched agentsd-agent agentsd bound --ratios 0.4 --compile "
            "--compile-backend inductor --compile-mode reduce-overhead") in bench["compiled-graphs"]
    assert "--measure generation --arch sd15 sdxl --resolution 1024 --steps 50" in bench["generation"]
    # every bench command is one agentsd bench accepts, checked as it checks (archs built on the meta
    # device, methods, settings); only the device is this machine's
    for name, command in bench.items():
        args = shlex.split(command)
        args = args[args.index("agentsd") + 1:]
        args[args.index("--device") + 1] = "cpu"
        args[args.index("--out") + 1] = str(tmp_path / name)
        check_config(config_from_args(build_parser().parse_args(args)))
    assert not out.exists()  # a dry run writes nothing


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python3: records each call; the steps fail, hang or pass as the test needs
printf '%s\\n' "$*" >>"{log}"
case "$*" in
    -) cat >/dev/null; echo cpu; echo "{problem}" ;;          # the environment probes
    "-m pytest"*) echo "1 failed, 32 passed"; exit 1 ;;        # the CUDA tests fail
    *"--arch tiny-xl"*) exec sleep 600 ;;                      # steps-sdxl hangs
    *) echo "| row |" >>"$(sed 's/.*--out \\([^ ]*\\).*/\\1/' <<<"$*")/results.md" ;;
esac
"""


def fake_python(folder: Path, problem: str = "") -> Path:
    python = folder / "python3"
    python.write_text(FAKE_PYTHON.format(log=folder / "calls.txt", problem=problem))
    python.chmod(0o755)
    return python


def test_an_environment_problem_stops_a_real_run_before_it_writes(tmp_path):
    python = fake_python(tmp_path, problem="torch 2.11 sees no CUDA GPU")
    result = gpu_sh("--out", str(tmp_path / "results"), timeout=60, PYTHON=str(python))
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["gpu.sh: environment: torch 2.11 sees no CUDA GPU",
                                          "gpu.sh: error: cannot run (see above)"]
    assert not (tmp_path / "results").exists()
    assert "-m pytest" not in (tmp_path / "calls.txt").read_text()


def test_steps_run_in_priority_order_under_one_deadline(tmp_path):
    log = tmp_path / "calls.txt"
    python = fake_python(tmp_path)
    out = tmp_path / "results"
    # the smoke plan keeps 2 s for the summary: steps-sdxl gets what is left of the 8 s
    result = gpu_sh("--smoke", "--budget", "8", "--out", str(out), timeout=120, PYTHON=str(python))
    assert result.returncode == 1, result.stderr  # some step failed, timed out or was skipped

    # every call after the probes is a step's command, in order, each one the plan's
    calls = [line for line in log.read_text().splitlines() if line != "-"]
    assert calls[0] == "-m pytest tests/test_cuda.py tests/tools/test_measure.py -v -rs -p no:cacheprovider"
    assert "--arch tiny --resolution 64 96 128" in calls[1]
    assert "--arch tiny-xl --resolution 96 128" in calls[2]
    assert len(calls) == 3  # then the deadline left no time

    summary = (out / "gpu.md").read_text()
    outcomes = dict(re.findall(r"^\| (\S+) \| \d+ \| \d* \| ([^|]+) \|", summary, flags=re.M))
    assert list(outcomes) == STEPS
    assert outcomes["tests"].startswith("failed (exit 1; see test_cuda.txt)")
    assert outcomes["steps-sd15"].strip() == "ok"  # a failed step does not stop the later ones
    assert outcomes["steps-sdxl"].startswith("timed out at")  # cut at the deadline, not its own 100 s
    assert all(outcomes[name].startswith("skipped: no time left") for name in STEPS[3:])

    # one flat folder of at most 8 files (what the device gives back), each step's output in it
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.txt", "gpu.md", "log.txt", "results.md", "test_cuda.txt"]
    assert "1 failed, 32 passed" in (out / "test_cuda.txt").read_text()
    assert (out / "results.md").read_text() == "| row |\n"

    again = gpu_sh("--smoke", "--out", str(out), PYTHON=str(python))  # results there: refuse
    assert again.returncode == 2 and "already holds results" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["--only", "everything"], "--only takes tests, steps, paper, compiled or generation"),
    (["--frobnicate"], "unknown argument"),
    (["--out"], "--out needs a value"),
    (["--budget", "9m"], "--budget takes whole seconds"),
    (["--wheels", "EMPTY"], "holds no .whl file"),
])
def test_bad_arguments_exit_2(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    result = gpu_sh(*[str(tmp_path / "empty") if a == "EMPTY" else a for a in args], timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("gpu.sh: error:"), result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_fetch_wheels_asks_pip_for_this_machines_diffusers_and_tomesd_for_the_device(tmp_path):
    from importlib.metadata import version

    result = gpu_sh("--fetch-wheels", str(tmp_path / "whl"), "--dry-run", timeout=60)
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip().removeprefix("+ ")
    assert ("-m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp"
            in command)
    assert command.endswith(f"-d {tmp_path / 'whl'} diffusers=={version('diffusers')} "
                            f"tomesd=={version('tomesd')}")
