"""``benchmarks/bench_attention.py``, the core's A/B speed check, is a thin caller of ``agentsd bench``
(issue 16, item 4): the same methods and report, its stage breakdown from the profiler, and no
benchmark script reaches into the core's internals or keeps a method list of its own."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import agentsd

ROOT = Path(__file__).resolve().parents[3]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_bench_attention_times_the_level_one_unet_and_splits_the_patched_blocks(capsys, tmp_path):
    path = ROOT / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert module.main(["--resolution", "64", "--repeats", "1", "--threads", "1", "--out",
                            str(tmp_path / "out")]) == 0
    finally:
        del sys.modules[spec.name]
    out = capsys.readouterr().out
    for method in ("unpatched", "tomesd:0.4", "agentsd-agent:0.4", "bound"):
        assert f"| {method} | " in out.split("## One UNet step")[1].split("- s / step")[0]
    stages = out.split("The patched blocks")[1]
    assert "| method | patched blocks ms | attention (SDPA, softmax) | linear projections" in stages
    assert "| agentsd-agent:0.4 | " in stages
    assert "A/B: agent phase " in out and f"from {Path(agentsd.__file__).parent}" in out
    assert (tmp_path / "out" / "profile.md").exists()


def test_benchmark_scripts_use_only_the_public_api_and_the_tools():
    public = set(agentsd.__all__)
    for script in SCRIPTS:
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "agentsd":
                module = node.module
                assert module == "agentsd" or module.startswith("agentsd.tools"), (script.name, module)
                names = [alias.name for alias in node.names]
                assert not [n for n in names if n.startswith("_")], (script.name, module, names)
                if module == "agentsd":
                    assert set(names) <= public, (script.name, names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name == "agentsd" or not alias.name.startswith("agentsd"), script.name
            elif isinstance(node, ast.Attribute) and re.match(r"_[^_]", node.attr):
                base = node.value
                assert not (isinstance(base, ast.Name) and base.id == "agentsd"), (script.name, node.attr)
    assert [s.name for s in SCRIPTS] == ["bench_attention.py"]  # whole generations are agentsd bench's
