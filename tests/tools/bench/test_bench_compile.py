"""``agentsd bench --compile`` (issue 8, item 4): compiled rows with compile time and graph breaks.

The tracing is dynamo's whatever the backend; the ``eager`` backend keeps the test short (no code
generation), and the rows, compile times and graph counts are the same quantities inductor gets.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from agentsd.tools import loading
from agentsd.tools.cli import main
from tests.tools.bench.test_bench import attention_heavy_config
from tests.tools.test_loading import _compiled_classes


def test_compiled_rows_report_step_time_compile_time_and_graph_breaks(tmp_path, capsys, monkeypatch):
    # bench compiles as generate --compile does (one function): regionally, and undoes it after each row
    unets = []

    def compile_unet(unet, backend, mode):
        scope = real_compile(unet, backend, mode)
        unets.append(unet)
        assert (scope, backend, mode) == ("regional", "eager", "default")
        assert _compiled_classes(unet) == ["BasicTransformerBlock"]
        return scope

    real_compile = loading.compile_unet
    monkeypatch.setattr(loading, "compile_unet", compile_unet)
    # the CPU taken for an asynchronous device: every row, compiled ones too, reads its host share
    for module in ("command", "compiled", "report"):
        monkeypatch.setattr(f"agentsd.tools.bench.{module}.ASYNC_DEVICES", ("cpu",), raising=False)
    # a one-level tiny UNet: few modules, so dynamo traces it quickly
    arch = attention_heavy_config(tmp_path / "one-level.json")
    out = tmp_path / "out"
    rc = main(["bench", "--random-weights", "--arch", str(arch), "--resolution", "32", "--repeats", "1",
               "--threads", "1", "--no-progress", "--methods", "agentsd:0.5", "tomesd:0.5", "--compile",
               "--compile-backend", "eager", "--out", str(out)])
    assert rc == 0
    assert len(unets) == 3 and all(_compiled_classes(unet) == [] for unet in unets)  # one per method
    with open(Path(out) / "results.csv", newline="") as f:
        rows = {(r["method"], r["compiled"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(m, c) for m in ("unpatched", "tomesd:0.5", "agentsd:0.5") for c in ("0", "1")}
    for method in ("unpatched", "tomesd:0.5", "agentsd:0.5"):
        eager, compiled = rows[(method, "0")], rows[(method, "1")]
        assert eager["compile_s"] == "" and eager["graphs"] == "" and eager["compile_mode"] == ""
        assert compiled["compile_mode"] == "default"
        assert float(compiled["step_s"]) > 0 and float(compiled["compile_s"]) > 0
        assert float(compiled["x_vs_unpatched"]) > 0
        assert 0 < float(eager["host_share"]) <= 1 and 0 < float(compiled["host_share"]) <= 1
    assert float(rows[("unpatched", "1")]["x_vs_unpatched"]) == 1.0  # against the compiled unpatched row
    graphs = {method: (int(rows[(method, "1")]["graphs"]), int(rows[(method, "1")]["graph_breaks"]))
              for method in ("unpatched", "tomesd:0.5", "agentsd:0.5")}
    assert graphs["unpatched"] == (1, 0)  # the blocks of the one level share one graph
    assert graphs["tomesd:0.5"][1] > 0  # tomesd breaks the graph (tomesd #47)
    # AgentSD is compile-native: no break, one graph per phase of its schedule shared by the blocks
    assert graphs["agentsd:0.5"] == (2, 0)
    report = (out / "results.md").read_text()
    assert "| agentsd:0.5 (compiled) |" in report and "| host % | compile s | graphs / breaks |" in report
    assert "- host %: the host's time issuing a step" in report
    assert "compiled as agentsd generate --compile does (backend 'eager', mode 'default')" in report
    assert "unet.compile_repeated_blocks" in report
    assert "agentsd:0.5 (compiled)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead applies to a compiled UNet"),
    (["--compile", "--compile-backend", "eager", "--compile-mode", "reduce-overhead"],
     "--compile-mode reduce-overhead needs --compile-backend inductor"),
])
def test_compile_mode_is_checked_before_anything_is_built(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    rc = main(["bench", "--random-weights", "--arch", "tiny", "--resolution", "64", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_compile_mode_reaches_every_compiled_block(tiny_unet, monkeypatch):
    """--compile-mode reduce-overhead (CUDA graphs) is handed to torch.compile of each block."""
    seen = []
    real = torch.nn.Module.compile

    def compile_spy(module, *args, **kwargs):
        seen.append((type(module).__name__, kwargs))
        return real(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_spy)
    try:
        assert loading.compile_unet(tiny_unet, "inductor", "reduce-overhead") == "regional"
    finally:
        loading.uncompile_unet(tiny_unet)
    assert seen and all(kwargs == {"backend": "inductor", "mode": "reduce-overhead"} for _, kwargs in seen)
    assert {name for name, _ in seen} == {"BasicTransformerBlock"}
    seen.clear()
    loading.compile_unet(tiny_unet, "eager")  # the default mode is torch.compile's own: not passed
    loading.uncompile_unet(tiny_unet)
    assert seen and all(kwargs == {"backend": "eager"} for _, kwargs in seen)
