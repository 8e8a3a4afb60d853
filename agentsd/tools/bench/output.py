"""Where ``agentsd bench`` writes: every run adds itself to the results in ``--out``, and keeps every
finished row on disk as it goes.

The tools' policy (:mod:`agentsd.tools.reports`): a run adds to its folder and never loses what
another run made there. Each run of ``agentsd bench`` is its own experiment (its methods timed
together, interleaved), so it is a section of ``results.md`` (and of ``profile.md``) and the lines
of ``results.csv`` whose ``run`` column is its id; runs never replace each other's. The files are
rewritten after every measured row through :func:`agentsd.tools.reports.update_results`, which
merges under the folder's lock: a run that is killed keeps every row it finished (the others marked
``pending``), and two runs writing into one folder at once keep both. ``speedup.png`` is drawn from
the measured lines of every run. Files written before runs had ids are kept as one earlier run.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from agentsd.tools import files, reports
from agentsd.tools.bench.report import CSV_FIELDS, speedup_figure
from agentsd.tools.errors import UsageError, user_input

MARKER = "<!-- agentsd bench run {} -->"
_MARKER = re.compile(r"^<!-- agentsd bench run (\S*) -->\n", flags=re.M)
KEY_COLUMNS = ("arch", "width", "height", "method")  # a results.csv without them is not bench's


_RUNS = itertools.count(1)  # runs of this process: two in one second get two ids


def new_run_id() -> str:
    """A run's id, unique: when it started, its process and its number there (``20260101T120000-4242-1``)."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{next(_RUNS)}"


@dataclass
class Run:
    """One run's part of the results files."""

    id: str
    lines: list[dict] = field(default_factory=list)  # its lines of results.csv
    report: str = ""  # its section of results.md
    profile: str = ""  # its section of profile.md


def _sections(path: Path) -> dict[str, str]:
    """Run id -> its section of a results file; text before the first marker belongs to run ``""``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    parts = [part.rstrip("\n") for part in _MARKER.split(text)]  # [before, id, section, id, section, ...]
    found = {"": parts[0]} if parts[0].strip() else {}
    found.update(zip(parts[1::2], parts[2::2], strict=True))
    return found


def check_results_folder(out: Path) -> None:
    """Refuse an ``out`` whose ``results.csv`` is not bench's (e.g. ``agentsd eval``'s), before measuring."""
    read(out)


def read(out: Path) -> list[Run]:
    """The runs whose results are in ``out``, in the order they were added."""
    path = out / "results.csv"
    with user_input():
        lines = reports.read_csv(path)
    if lines and not set(KEY_COLUMNS) <= set(lines[0]):
        raise UsageError(f"{path} is not a results file of agentsd bench (it has no {', '.join(KEY_COLUMNS)} "
                         "columns): choose another --out")
    reports_, profiles = _sections(out / "results.md"), _sections(out / "profile.md")
    runs = {id_: Run(id_) for id_ in [*reports_, *(line.get("run") or "" for line in lines), *profiles]}
    for line in lines:
        runs[line.get("run") or ""].lines.append(line)
    for id_, text in reports_.items():
        runs[id_].report = text
    for id_, text in profiles.items():
        runs[id_].profile = text
    return list(runs.values())


def merge(old: list[Run], new: list[Run]) -> list[Run]:
    """``old`` with each run of ``new`` in its place (a run rewriting its part) or added at the end."""
    runs = {run.id: run for run in old}
    runs.update({run.id: run for run in new})
    return list(runs.values())


def _text(runs: list[Run], part: str) -> str:
    sections = [(MARKER.format(run.id) + "\n" if run.id else "") + getattr(run, part).rstrip("\n")
                for run in runs if getattr(run, part)]
    return "\n\n".join(sections) + "\n"


def render(runs: list[Run], plot: bool = True) -> list[tuple[str, files.Data]]:
    """Every results file of ``runs``; ``speedup.png`` only with ``plot`` (it is slow to draw)."""
    lines = [line for run in runs for line in run.lines]
    fields = [*CSV_FIELDS, *dict.fromkeys(key for line in lines for key in line if key not in CSV_FIELDS)]
    found = [("results.csv", reports.csv_text(fields, lines)), ("results.md", _text(runs, "report"))]
    if any(run.profile for run in runs):
        found.append(("profile.md", _text(runs, "profile")))
    if plot:
        found.append(("speedup.png", reports.png(speedup_figure(lines))))
    return found


def write(out: Path, run: Run, plot: bool) -> list[Path]:
    """Add ``run`` (or its newer state) to the results in ``out``, under the folder's lock."""
    return reports.update_results(out, [run], read, merge, lambda runs: render(runs, plot))[1]
