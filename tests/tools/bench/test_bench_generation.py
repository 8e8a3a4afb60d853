"""Whole generations with random weights in ``agentsd bench``, the paper's speed table and the SDPA
kernel a run is held to (issue 14, items 2 and 3)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from agentsd.tools.bench import BenchConfig
from agentsd.tools.bench.config import check_config
from agentsd.tools.bench.report import Row, paper_setting, paper_table
from agentsd.tools.bench.timing import sdpa_kernel
from agentsd.tools.cli import main
from agentsd.tools.methods import Method
from tests.tools.bench.test_bench import attention_heavy_config


def read_rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def bench(out: Path, *extra: str) -> int:
    return main(["bench", "--random-weights", "--repeats", "1", "--threads", "1", "--no-progress",
                 "--out", str(out), *extra])


def test_whole_generations_of_the_shipped_pipelines(tmp_path):
    out = tmp_path / "out"
    assert bench(out, "--arch", "tiny", "tiny-xl", "--measure", "generation", "--resolution", "64",
                 "--steps", "2", "--methods", "unpatched", "tomesd", "agentsd", "--ratios", "0.4") == 0
    rows = read_rows(out)
    methods = ("unpatched", "tomesd:0.4", "agentsd:0.4")
    assert [(r["arch"], r["method"]) for r in rows] == [(a, m) for a in ("tiny", "tiny-xl") for m in methods]
    for row in rows:
        assert row["status"] == "measured" and row["step_s"] == ""  # no UNet step was timed
        assert float(row["generate_s_per_image"]) > 0 and float(row["generate_x_vs_unpatched"]) > 0
        assert float(row["generate_gb_per_image"]) >= 0 and row["steps"] == "2"
    # each arch's own scheduler; SD's PNDM runs as PLMS (the paper's sampler)
    assert {r["arch"]: r["scheduler"] for r in rows} == {"tiny": "PNDMScheduler (PLMS)",
                                                          "tiny-xl": "EulerDiscreteScheduler"}
    report = (out / "results.md").read_text()
    assert "## Whole generations" in report and "## One UNet step" not in report
    assert "| agentsd:0.4 | 0.4 | tiny-xl | 64² |" in report
    for arch in ("tiny", "tiny-xl"):  # the paper's layout, per arch and size
        section = report.split(f"### In the paper's layout: {arch}, 64², 2 steps, SDPA kernel default")[1]
        lines = [line for line in section.split("\n\n")[1].splitlines() if line.startswith("| ")]
        assert [line.split(" | ")[:2] for line in lines[1:]] == [
            ["| Unpatched", "0"], ["| ToMeSD", "40"], ["| AgentSD", "40"]]
        assert "paper s/im" not in lines[0]  # not the paper's setting


def test_generations_and_steps_in_one_run_with_the_scheduler_asked_for(tmp_path):
    out = tmp_path / "out"
    assert bench(out, "--arch", "tiny-xl", "--measure", "step", "generation", "--resolution", "64",
                 "--steps", "2", "--scheduler", "pndm", "--methods", "agentsd-agent:0.3",
                 "--batch-size", "2") == 0
    rows = read_rows(out)
    assert [r["method"] for r in rows] == ["unpatched", "agentsd-agent:0.3"]
    assert all(float(r["step_s"]) > 0 and float(r["generate_s_per_image"]) > 0 for r in rows)
    # two images per pipeline call (eval's meaning of --batch-size); a step runs both halves of CFG
    assert {(r["batch_size"], r["batch"]) for r in rows} == {("2", "4")}
    assert {r["scheduler"] for r in rows} == {"PNDMScheduler (PLMS)"}
    report = (out / "results.md").read_text()
    assert "## One UNet step" in report and "## Whole generations" in report
    assert "--measure step generation --steps 2" in report and "--scheduler pndm" in report
    assert "at batch 4 (2 image(s) per pipeline call, doubled by classifier-free guidance)" in report


@pytest.mark.parametrize("args, message", [
    (["--measure", "generation", "--profile"], "--profile works on one UNet step"),
    (["--measure", "generation", "--compile"], "--compile works on one UNet step"),
    (["--measure", "generation", "--arch", "UNET"], "need a shipped pipeline"),
])
def test_generation_settings_are_checked_before_anything_is_built(tmp_path, capsys, args, message):
    unet = tmp_path / "unet.json"
    unet.write_text(json.dumps({"block_out_channels": [32]}))
    args = [str(unet) if a == "UNET" else a for a in args]
    assert bench(tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_the_paper_layout_puts_the_papers_own_figures_beside_the_measured_ones():
    def row(kind: str, ratio: float | None, seconds: float, gb: float) -> Row:
        return Row("sd15", 512, 512, Method(kind, ratio), None, generate_s=seconds,
                   generate_peak_bytes=int(gb * 1e9))

    rows = [row("unpatched", None, 2.0, 3.0), row("tomesd", 0.5, 1.6, 2.0), row("agentsd", 0.5, 1.0, 1.5)]
    for r in rows:
        r.generate_x, r.generate_x_less_memory = 2.0 / r.generate_s, 3.0e9 / r.generate_peak_bytes
    table = paper_table(rows, with_paper=True).splitlines()
    assert table[0] == "| Method | r% | s/im ↓ | GB/im ↓ | paper s/im (RTX 4090) | paper GB/im |"
    assert table[2] == "| Unpatched | 0 | 2.00 | 3.00 | 2.62 | 3.13 |"
    assert table[4] == ("| AgentSD | 50 | 1.00 (2.00× faster) | 1.50 (2.00× less) | 1.42 (1.85×) | "
                        "1.21 (2.59× less) |")


def test_the_papers_figures_are_shown_only_in_its_setting(tmp_path):
    def plan(**settings):
        config = BenchConfig(archs=["sd15"], measure=["generation"], methods=["agentsd:0.5"],
                             resolution=[512], out=tmp_path / "out", **settings)
        return check_config(config)

    row = Row("sd15", 512, 512, Method("agentsd", 0.5), None)
    assert paper_setting(plan(), row)  # sd15, 512², 50 steps, PLMS: the defaults
    assert not paper_setting(plan(steps=20), row)
    assert not paper_setting(plan(scheduler="ddim"), row)
    assert not paper_setting(plan(), Row("sd15", 1024, 1024, Method("agentsd", 0.5), None))


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernel, fused", [("default", True), ("math", False)])
def test_sdpa_kernel_holds_attention_to_the_math_kernel(kernel, fused):
    q = torch.randn(1, 2, 64, 8)
    with Ops() as ops, sdpa_kernel(kernel):
        F.scaled_dot_product_attention(q, q, q)
    # the math kernel materialises the softmax: a bmm, a softmax, a bmm; the default is one fused kernel
    assert any("flash_attention" in name for name in ops.names) == fused
    assert any("softmax" in name for name in ops.names) == (not fused)


def test_a_math_kernel_run_times_every_method_on_the_math_kernel(tmp_path):
    out = tmp_path / "out"
    arch = attention_heavy_config(tmp_path / "attention-heavy.json")
    assert bench(out, "--arch", str(arch), "--resolution", "256", "--guidance", "1", "--methods",
                 "agentsd-agent:0.4", "--sdpa-kernel", "math", "--profile") == 0
    assert {r["sdpa_kernel"] for r in read_rows(out)} == {"math"}
    assert "SDPA kernel: the math kernel only" in (out / "results.md").read_text()
    profile = (out / "profile.md").read_text()
    # the profiled runs (as the timed ones) materialise the softmax, in both methods' attentions
    for method in ("unpatched", "agentsd-agent:0.4"):
        operators = profile.split(f"### {method}: top operators by self time")[1].split("```")[1]
        assert "aten::bmm" in operators and "flash_attention" not in operators, operators
