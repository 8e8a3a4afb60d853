"""``agentsd bench`` end to end on tiny UNets, and its errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import agentsd
from agentsd.tools.bench.cases import default_schedule
from agentsd.tools.bench.timing import Case, run_interleaved
from agentsd.tools.cli import main
from agentsd.tools.methods import KINDS

ROOT = Path(__file__).resolve().parents[3]


def read_rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def bench(tmp_path, *extra: str) -> int:
    # one thread: tiny ops on a shared machine spend more time in thread hand-offs than computing
    return main(["bench", "--out", str(tmp_path / "out"), "--repeats", "1", "--threads", "1", *extra])


def test_tiny_end_to_end_writes_every_row(tmp_path, capsys):
    rc = bench(tmp_path, "--random-weights", "--arch", "tiny", "tiny-xl", "--resolution", "64", "48x64",
               "--ratios", "0.2", "0.4", "--profile")
    assert rc == 0
    out = tmp_path / "out"
    rows = read_rows(out)
    ratio_methods = [m for m in KINDS if m not in ("unpatched", "bound")]
    expected = {
        (arch, width, height, method, ratio)
        for arch in ("tiny", "tiny-xl")
        for width, height in ((64, 64), (48, 64))
        for method, ratio in [("unpatched", ""), ("bound", "")]
        + [(m, r) for m in ratio_methods for r in ("0.2", "0.4")]
    }
    found = {(r["arch"], int(r["width"]), int(r["height"]), r["kind"], r["ratio"]) for r in rows}
    assert all(r["method"] == (r["kind"] if not r["ratio"] else f'{r["kind"]}:{r["ratio"]}') for r in rows)
    assert found == expected and len(rows) == len(expected)
    for row in rows:
        assert float(row["step_s"]) > 0
        assert len(row["step_s_rounds"].split(";")) == 1
        assert float(row["x_vs_unpatched"]) > 0 and float(row["bound_over_method"]) > 0
    unpatched = [r for r in rows if r["method"] == "unpatched"]
    assert all(float(r["x_vs_unpatched"]) == 1.0 for r in unpatched)

    report = (out / "results.md").read_text()
    stdout = capsys.readouterr().out
    for text in (report, stdout):
        assert "| method | ratio | arch | resolution | s / step | × vs unpatched | % of bound |" in text
        assert "bound time / method time" in text
        assert "RSS" in text  # says how memory was measured
        # SDXL-shaped UNet: tomesd is told to patch AgentSD's level (2), and the output says so
        assert "tomesd on tiny-xl: max_downsample=2" in text
        assert "tomesd on tiny: max_downsample=1" in text
        assert "20/50 × agent step" in text and "30/50 × tome step" in text
    assert report.count("\n| ") == len(rows) + 1  # header + one line per row
    # on a CPU the host does the work: no host % (a GPU's launch-bound measure)
    assert "host %" not in report and all(row["host_share"] == "" for row in rows)
    with Image.open(out / "speedup.png") as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200

    # --profile: a module breakdown and a stage breakdown of the patched blocks per arch x resolution,
    # each with a line per method, and operator tables
    profile = (out / "profile.md").read_text()
    methods = ["unpatched"] + [f"{m}:{r}" for m in ratio_methods for r in ("0.2", "0.4")] + ["bound"]
    for arch in ("tiny", "tiny-xl"):
        for size in ("64x64", "48x64"):
            section = profile.split(f"## {arch} {size}\n")[1].split("\n## ")[0]
            modules, stages = section.split("\n\nInside the patched blocks")
            for table in (modules, stages):
                lines = [line for line in table.split("###")[0].splitlines() if line.startswith("| ")][1:]
                assert [line.split(" | ")[0][2:] for line in lines] == methods
            assert section.count("top operators by self time") == len(methods)


def test_default_schedule_is_twenty_agent_then_thirty_tome_steps():
    phases = default_schedule()
    assert [(p.name, p.steps) for p in phases] == [("agent", 20), ("tome", 30)]
    assert sum(p.weight for p in phases) == pytest.approx(1.0)
    # the timed timesteps are in their phase for a bare UNet (p = 1 - t/1000, agent while p < 0.4)
    assert 1 - phases[0].timestep / 1000 < 0.4 <= 1 - phases[1].timestep / 1000


def attention_heavy_config(path: Path) -> Path:
    """A one-level UNet with few channels and many tokens: self-attention is nearly all of the time."""
    config = dict(
        block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D"], mid_block_type=None, layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, sample_size=64,
    )
    path.write_text(json.dumps(config))
    return path


def test_bound_is_not_slower_than_unpatched_where_attention_dominates(tmp_path):
    config = attention_heavy_config(tmp_path / "attention-heavy.json")
    # 512 px -> 64x64 latent -> 4096 tokens per self-attention: unpatched costs several times bound
    rc = main(["bench", "--random-weights", "--arch", str(config), "--methods", "bound", "--resolution",
               "512", "--guidance", "1", "--repeats", "3", "--threads", "1", "--out", str(tmp_path / "out")])
    assert rc == 0
    rows = {r["method"]: r for r in read_rows(tmp_path / "out")}
    assert set(rows) == {"unpatched", "bound"}
    assert rows["bound"]["arch"] == "attention-heavy"
    assert float(rows["bound"]["step_s"]) < float(rows["unpatched"]["step_s"])


def test_with_a_pipeline_times_whole_generations(tiny_sd_dir, tmp_path):
    rc = bench(tmp_path, "--model", str(tiny_sd_dir), "--resolution", "32", "--steps", "2",
               "--ratios", "0.4", "--methods", "agentsd", "tomesd")
    assert rc == 0
    rows = read_rows(tmp_path / "out")
    assert [r["method"] for r in rows] == ["unpatched", "tomesd:0.4", "agentsd:0.4"]
    assert all(float(r["generate_s_per_image"]) > 0 for r in rows)
    assert "| s / image |" in (tmp_path / "out" / "results.md").read_text()


def test_a_pndm_model_is_timed_with_plms(tiny_sd_dir, tmp_path):
    """A scheduler config without skip_prk_steps would run PNDM's Runge-Kutta warm-up (and crash below
    4 steps); bench times the paper's PLMS."""
    model = tmp_path / "prk-model"
    shutil.copytree(tiny_sd_dir, model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.pop("skip_prk_steps")
    config_file.write_text(json.dumps(config))
    rc = bench(tmp_path, "--model", str(model), "--resolution", "32", "--steps", "2", "--ratios", "0.4",
               "--methods", "agentsd")
    assert rc == 0
    assert all(float(r["generate_s_per_image"]) > 0 for r in read_rows(tmp_path / "out"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--random-weights", "--arch", "sd3"], "unknown arch 'sd3'"),
        (["--random-weights", "--methods", "deepcache"], "unknown method 'deepcache'"),
        (["--random-weights", "--resolution", "100"], "multiples of 8"),
        (["--random-weights", "--resolution", "big"], "not SIDE or WIDTHxHEIGHT"),
        (["--random-weights", "--ratios", "0.9"], "outside [0, 0.75]"),
        (["--random-weights", "--repeats", "0"], "--repeats must be at least 1"),
        (["--random-weights", "--device", "tpu"], "unknown device 'tpu'"),
        (["--model", "no/such/folder"], "no such local folder"),
        (["--arch", "tiny"], "--random-weights"),
        (["--random-weights", "--model", "x"], "not both"),
        (["--model", "x", "--arch", "sdxl"], "--arch goes with --random-weights"),
        (["--random-weights", "--arch", "missing.json"], "cannot read arch config missing.json"),
    ],
)
def test_bad_arguments_fail_with_one_line(tmp_path, capsys, args, message):
    rc = main(["bench", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("agentsd bench: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_unsupported_unet_is_reported_before_measuring(tmp_path, capsys):
    config = json.loads((ROOT / "agentsd" / "tools" / "configs" / "tiny.json").read_text())
    config["num_class_embeds"] = 10  # class-conditioned UNet: the benchmark cannot build its inputs
    path = tmp_path / "class-unet.json"
    path.write_text(json.dumps(config))
    rc = bench(tmp_path, "--random-weights", "--arch", str(path), "--resolution", "64")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "class-unet: UNets with class embeddings" in err
    assert not (tmp_path / "out").exists()


def test_results_of_earlier_versions_are_kept_and_the_run_added(tmp_path, capsys):
    """Results there were refused (or replaced with --overwrite); now a run adds itself (one policy)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("# earlier results\n")
    (out / "results.csv").write_text("arch,width,height,method,batch,step_s\nsd15,512,512,unpatched,2,6.19\n")
    assert main(["bench", "--random-weights", "--arch", "tiny", "--resolution", "64", "--methods", "bound",
                 "--repeats", "1", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    report = (out / "results.md").read_text()
    assert report.startswith("# earlier results\n\n<!-- agentsd bench run ") and "| bound |" in report
    rows = read_rows(out)
    assert (rows[0]["arch"], rows[0]["method"], rows[0]["step_s"], rows[0]["batch"]) == ("sd15", "unpatched",
                                                                                          "6.19", "2")
    assert [r["method"] for r in rows[1:]] == ["unpatched", "bound"] and rows[0]["run"] == ""
    assert len({r["run"] for r in rows[1:]}) == 1 and rows[1]["run"]


def test_command_line_error_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("AGENTSD_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "agentsd", "bench", "--random-weights", "--resolution", "1001",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("agentsd bench: error: --resolution 1001") and "multiples of 8" in lines[0]
    assert not (tmp_path / "out").exists()


def test_interleaved_rounds_alternate_order_and_restore_patches(tiny_unet):
    """Round k runs every case once (odd rounds reversed); setup/teardown wrap every run."""
    log: list[str] = []

    def case(key: str) -> Case:
        return Case(key=key, calls=[(lambda: log.append(key), 1.0)],
                    setup=lambda: log.append("+" + key), teardown=lambda: log.append("-" + key))

    found = run_interleaved([case("a"), case("b")], torch.device("cpu"), repeats=2, warmup=1)
    runs = [entry for entry in log if entry in ("a", "b")]
    # pre-warm of the first case, warm-up round, then two timed rounds (b first in the odd one)
    assert runs == ["a", "a", "b", "b", "a", "a", "b"]
    assert all(len(m.times) == 2 for m in found.values())
    assert log[:3] == ["+a", "a", "-a"]


def test_bound_uses_the_patch_targets(tiny_unet):
    from agentsd.tools.methods import Method, patcher

    targets = agentsd.patch_targets(tiny_unet)
    before = {name: p for name, p in tiny_unet.attn_processors.items()}
    apply, remove = patcher(Method("bound"), tiny_unet)
    apply()
    patched = tiny_unet.attn_processors
    assert {n for n, p in patched.items() if type(p).__name__ == "ZeroSelfAttention"} == set(targets)
    remove()
    assert tiny_unet.attn_processors == before


def test_the_plot_wraps_many_method_families_into_rows_of_four():
    """A run of the eight method families (each kind with and without +mlp) drew eight panels in one
    row, 37 inches wide; they wrap into rows of four, for each arch."""
    from agentsd.tools.bench.report import speedup_figure

    kinds = ["tomesd", "agentsd", "agentsd-agent", "agentsd-tome"]
    methods = [f"{kind}:0.4{extra}" for kind in kinds for extra in ("", "+mlp")]
    lines = [dict(method=method, status="measured", arch=arch, width="64", height="64", compiled="0",
                  x_vs_unpatched="1.2") for arch in ("tiny", "tiny-xl") for method in methods + ["bound"]]
    fig = speedup_figure(lines)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 2 * 8
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in shown} == {(4, 4)}  # 2 archs x 2 rows
    families = [method.replace(":0.4", "") for method in methods]
    assert sorted(ax.get_title() for ax in shown[:8]) == sorted(f"tiny · {f} · step" for f in families)
    width, height = fig.get_size_inches()
    assert width <= 4.2 * 4 + 1e-6 and height == pytest.approx(3.4 * 4 + 0.4)  # (+ the title)


def test_the_plot_draws_only_panels_with_points_and_names_only_the_conditions_that_differ():
    """The first GPU run's plot had empty panels (an arch without +mlp rows, generations not run) and
    legends repeating 'device cuda, dtype fp16, batch 2, sdpa_kernel default' over the points."""
    from agentsd.tools.bench.report import speedup_figure

    common = dict(status="measured", width="64", height="64", compiled="0", device="cuda", dtype="fp16",
                  batch="2")
    lines = [dict(common, method=m, arch="tiny", sdpa_kernel="default", x_vs_unpatched="1.2")
             for m in ("agentsd:0.4", "agentsd:0.4+mlp", "bound")]
    lines += [dict(common, method="agentsd:0.4", arch="tiny-xl", sdpa_kernel=kernel, x_vs_unpatched="1.1")
              for kernel in ("math", "default")]
    fig = speedup_figure(lines)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == [
        "tiny · agentsd · step", "tiny · agentsd+mlp · step", "tiny-xl · agentsd · step"]
    labels = {text.get_text() for ax in shown for text in ax.get_legend().get_texts()}
    default = "64² (sdpa_kernel default)"
    assert labels == {default, f"bound {default}", "64² (sdpa_kernel math)"}
    assert fig._suptitle.get_text().endswith("device cuda, dtype fp16, batch 2")


def test_interleaved_rounds_record_the_host_time_of_each_round():
    slept = Case("sleep", calls=[(lambda: time.sleep(0.01), 2.0)])
    measured = run_interleaved([slept], torch.device("cpu"), repeats=3, warmup=1)["sleep"]
    assert len(measured.host_times) == len(measured.times) == 3
    assert all(0.02 <= host <= time_ for host, time_ in zip(measured.host_times, measured.times, strict=True))
    assert 0.5 < measured.host_share <= 1.0  # on a CPU the host's time is the step's


def test_the_step_table_shows_how_launch_bound_each_gpu_row_is():
    from agentsd.tools.bench.report import Row, csv_lines, markdown_table
    from agentsd.tools.methods import parse_method

    rows = [Row(arch="sd15", width=512, height=512, method=parse_method(name), step_s=0.04, host_share=share)
            for name, share in (("unpatched", 0.991), ("agentsd:0.4", 0.42))]
    table = markdown_table(rows)
    assert table.splitlines()[0].endswith("| × less memory | host % |")
    assert table.splitlines()[2].endswith("| 99% |") and table.splitlines()[3].endswith("| 42% |")
    config = SimpleNamespace(sdpa_kernel="default", steps=50, batch_size=1, guidance=None,
                             compile_mode="default")
    plan = SimpleNamespace(patch={}, generations_timed=False, unet_batch=2, dtype_name="fp16",
                           device=torch.device("cuda"), config=config)
    assert [line["host_share"] for line in csv_lines(rows, plan, "run")] == ["0.9910", "0.4200"]
