"""``agentsd bench`` keeps every finished row (issue 14, item 1): results are written after every
measured row, a killed or terminated run leaves them on disk with the missing rows marked; and every
run adds itself to the results in its folder, never replacing another's (issue 16: the tools' one
policy for outputs that exist, which replaced ``--overwrite``, the ``-2`` suffix and ``--append``)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agentsd.tools.cli import main

ROOT = Path(__file__).resolve().parents[3]
# group 1 (64 px) is quick; group 2 (512 px: 4096 tokens per self-attention) takes seconds on a CPU,
# long enough to stop the run while it measures
TWO_GROUPS = ["bench", "--random-weights", "--arch", "tiny", "--resolution", "64", "512", "--methods",
              "bound", "--guidance", "1", "--repeats", "2", "--threads", "1", "--no-progress"]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def wait_for(path: Path, timeout: float = 300, child: subprocess.Popen | None = None) -> None:
    """Until ``path`` exists; fails if ``child`` ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or (child is not None and child.poll() is not None):
            raise AssertionError(f"{path} did not appear (the run ended or {timeout} s passed)")
        time.sleep(0.02)


def assert_first_group_only(out: Path) -> None:
    rows = read_rows(out / "results.csv")
    status = {(row["width"], row["method"]): row["status"] for row in rows}
    assert status == {("64", "unpatched"): "measured", ("64", "bound"): "measured",
                      ("512", "unpatched"): "pending", ("512", "bound"): "pending"}
    for row in rows:
        assert (float(row["step_s"]) > 0) if row["status"] == "measured" else row["step_s"] == ""
    report = (out / "results.md").read_text()
    assert "status: **incomplete**: 2 of 4 rows measured" in report
    assert report.count("| pending |") == 2


def test_a_killed_run_leaves_its_finished_rows_and_names_the_missing_ones(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "agentsd", *TWO_GROUPS, "--out", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out / "results.md", child=child)  # the first group's rows, before the second is measured
        child.kill()  # as a timeout's SIGKILL: no chance to clean up
    finally:
        child.kill()
        _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err
    assert_first_group_only(out)
    assert "the run was still measuring when this was written" in (out / "results.md").read_text()
    assert (out / "speedup.png").exists()  # the set was claimed whole at the first write


def test_a_terminated_run_says_it_stopped_and_keeps_its_rows(tmp_path, capsys):
    out = tmp_path / "out"
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a late signal must not end pytest

    def terminate_when_written() -> None:
        wait_for(out / "results.md")
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=terminate_when_written, daemon=True)
    try:
        watcher.start()
        rc = main([*TWO_GROUPS, "--out", str(out)])
        watcher.join(timeout=60)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert rc == 143
    assert "terminated" in capsys.readouterr().err
    assert_first_group_only(out)
    assert "(the run stopped (terminated (SIGTERM)))" in (out / "results.md").read_text()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def bench(out: Path, *extra: str) -> int:
    return main(["bench", "--random-weights", "--arch", "tiny", "--resolution", "64", "--guidance", "1",
                 "--repeats", "1", "--threads", "1", "--no-progress", "--out", str(out), *extra])


def test_every_run_adds_its_section_and_rows_to_the_folder(tmp_path, capsys):
    out = tmp_path / "out"
    assert bench(out, "--methods", "bound") == 0
    assert bench(out, "--methods", "agentsd-agent:0.3") == 0
    rows = read_rows(out / "results.csv")
    assert [row["method"] for row in rows] == ["unpatched", "bound", "unpatched", "agentsd-agent:0.3"]
    assert all(row["status"] == "measured" for row in rows)
    assert rows[0]["run"] == rows[1]["run"] != rows[2]["run"] == rows[3]["run"]
    assert (out / "results.csv").read_text().count("arch,width,height") == 1  # one header
    report = (out / "results.md").read_text()
    assert report.count("# agentsd bench\n") == 2 and report.count("<!-- agentsd bench run ") == 2
    assert report.index("| bound |") < report.index("| agentsd-agent:0.3 |")
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md", "speedup.png"]

    # a results.csv that is not bench's (here eval's) is left alone, before anything is measured
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.csv").write_text("method,kind,ratio,images\nunpatched,unpatched,0,2\n")
    capsys.readouterr()
    assert bench(tmp_path / "other", "--methods", "bound") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a results file of agentsd bench" in err
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["results.csv"]


def test_a_run_writing_again_keeps_what_another_run_wrote_meanwhile(tmp_path):
    """Each write merges this run's part into the files under the folder's lock: two runs measuring
    into one folder at once (each rewriting after every row) keep both."""
    from agentsd.tools.bench import output

    def run(id_: str, status: str) -> output.Run:
        line = {"arch": "tiny", "width": "64", "height": "64", "method": "bound", "status": status,
                "run": id_}
        return output.Run(id_, [line], report=f"# run {id_}: {status}\n")

    output.write(tmp_path, run("a", "pending"), plot=False)
    output.write(tmp_path, run("b", "pending"), plot=False)
    output.write(tmp_path, run("a", "measured"), plot=True)
    output.write(tmp_path, run("b", "measured"), plot=False)
    rows = read_rows(tmp_path / "results.csv")
    assert [(row["run"], row["status"]) for row in rows] == [("a", "measured"), ("b", "measured")]
    report = (tmp_path / "results.md").read_text()
    assert report == ("<!-- agentsd bench run a -->\n# run a: measured\n\n"
                      "<!-- agentsd bench run b -->\n# run b: measured\n")
    assert (tmp_path / "speedup.png").exists()
    assert output.new_run_id() != output.new_run_id()  # two runs of one process in one second: two ids


@pytest.mark.parametrize("args, message", [
    (["--append"], "--append is gone: every run adds its rows to the results in --out"),
    (["--overwrite"], "--overwrite is gone: a run never replaces another's results"),
    (["--batch", "2"], "--batch is now --batch-size: images per pipeline call"),
    (["--merge-mlp"], "--merge-mlp is a method spec now: add +mlp to a method"),
])
def test_retired_flags_name_what_replaced_them(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        bench(tmp_path / "out", "--methods", "bound", *args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()
