"""agentsd.tools.reports: the writers bench and eval share, and the policy for results already on disk."""

from __future__ import annotations

import threading
import time

from agentsd.tools import reports


def test_markdown_table_and_csv(tmp_path):
    table = reports.markdown_table(["method", "s"], [["unpatched", "1.00"], ["agentsd:0.4", None]],
                                   align="lr")
    assert table.splitlines() == [
        "| method | s |", "|---|---:|", "| unpatched | 1.00 |", "| agentsd:0.4 | – |"
    ]
    text = reports.csv_text(["method", "s"], [{"method": "a", "s": 1.5}, {"method": "b", "s": None}])
    (tmp_path / "r.csv").write_text(text)
    assert reports.read_csv(tmp_path / "r.csv") == [{"method": "a", "s": "1.5"}, {"method": "b", "s": ""}]
    assert reports.read_csv(tmp_path / "none.csv") == []


def test_two_runs_merging_into_one_folder_keep_both_rows(tmp_path):
    """Read, merge, write is done under the folder's lock: a run that reads while another writes would
    otherwise write back a table without the other's row."""

    def read(path):
        return [row["method"] for row in reports.read_csv(path / "results.csv")]

    def merge(old, new):
        time.sleep(0.3)  # a slow merge: the other run reads meanwhile
        return sorted(set(old) | set(new))

    def render(rows):
        return [("results.csv", reports.csv_text(["method"], [{"method": m} for m in rows]))]

    runs = [threading.Thread(target=reports.update_results, args=(tmp_path, [name], read, merge, render))
            for name in ("a", "b")]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert read(tmp_path) == ["a", "b"]
