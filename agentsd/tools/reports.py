"""Result files of the tools: markdown tables, CSVs, plots, and what happens to results already on disk.

The policy for outputs that already exist, the same in every tool: **a run adds to its output
folder and never loses what another run made there.** Images are never replaced by a run's own
images (``generate`` numbers new ones after every number in the folder; ``eval`` keeps complete
images and remakes only missing or broken ones). Results files (tables, CSVs, plots) hold the
rows of every run into the folder: :func:`update_results` merges a run's rows into those on disk
under the folder's lock, so two runs finishing at once both keep their rows (``eval`` merges by
method, its folder being one experiment; ``bench`` keeps each run as its own section and lines).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from agentsd.tools import files

R = TypeVar("R")
MISSING = "–"  # how a table shows a value that was not measured


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table of ``rows`` of cells (text, formatted first; ``None`` shows :data:`MISSING`);
    ``align`` has one letter per column, ``l`` or ``r`` (numbers), default all left."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in (align or "l" * len(header)))
    lines = ["| " + " | ".join(header) + " |", rule]
    for row in rows:
        lines.append("| " + " | ".join(MISSING if cell is None else str(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"


def csv_text(fields: Sequence[str], rows: Iterable[Mapping[str, object]]) -> str:
    """CSV text with the columns ``fields``; ``None`` values are empty cells."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV file as dicts; ``[]`` if there is no file.

    Raises:
        ValueError: the file exists but cannot be read as UTF-8 CSV (the message names it).
    """
    try:
        return list(csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8"))))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"cannot read {path} as a CSV file: {error}") from None


def figure(width: float, height: float, dpi: int = 120):
    """A matplotlib figure made without pyplot (no GUI backend, no global state)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


def png(fig) -> files.Writer:
    """A writer that saves the figure ``fig`` as PNG, for :func:`agentsd.tools.files.write_unit`."""
    return lambda f: fig.savefig(f, format="png")


def update_results(
    out: Path,
    rows: Sequence[R],
    read: Callable[[Path], list[R]],
    merge: Callable[[list[R], list[R]], list[R]],
    render: Callable[[list[R]], Sequence[tuple[str, files.Data]]],
) -> tuple[list[R], list[Path]]:
    """Merge ``rows`` into the results in the folder ``out`` and rewrite every results file as one unit;
    returns all rows and the paths written.

    ``read(out)`` gives the rows on disk (``[]`` for none), ``merge(on disk, this run's)`` all rows
    in table order, ``render(all rows)`` the ``(file name, data)`` of every results file. All three
    run under the folder's lock (:func:`agentsd.tools.files.folder_lock`), so a run finishing
    while another writes does not write back a table without the other's rows.
    """
    with files.folder_lock(out):
        merged = merge(read(out), list(rows))
        paths = files.write_unit([(out / name, data) for name, data in render(merged)], overwrite=True)
    return merged, paths
