"""Where ``agentsd bench`` writes its results: rewritten after every measured row, never half-written.

A run writes its files (``results.md``, ``results.csv``, ``speedup.png``, ``profile.md``) as soon as
its first rows are measured and again after every further row, each time atomically
(:mod:`agentsd.tools.files`), so a run that is killed or times out leaves every finished row on disk,
with the rows still to measure marked ``pending``.

- The first write claims the names: if another run wrote ``results.md`` into the folder meanwhile,
  this run's set goes to ``results-2.md``, ``results-2.csv``, ... (never mixed, never lost); with
  ``overwrite`` it replaces what is there. Later writes replace the files this run claimed.
- With ``append`` this run's text is added after what the text files already held (its CSV rows
  without a second header), under an exclusive lock on the folder, so two appending runs cannot
  lose each other's rows.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from agentsd.tools.errors import UsageError
from agentsd.tools.files import Data, remove_stale_temporaries, write_unit

# text files whose earlier content an appending run keeps; the CSV's header is written once
APPENDABLE = ("results.md", "results.csv", "profile.md")
CSV_FILE = "results.csv"


def _csv_header() -> str:
    from agentsd.tools.bench.report import CSV_FIELDS

    return ",".join(CSV_FIELDS)


def check_appendable(out: Path, names: Iterable[str]) -> None:
    """Raise :class:`UsageError` unless this run's rows can be appended to the files in ``out``.

    A ``results.csv`` there must have this version's columns (its first line is compared).
    """
    csv_file = out / CSV_FILE
    if CSV_FILE not in names or not csv_file.exists():
        return
    try:
        with open(csv_file, encoding="utf-8", newline="") as f:
            header = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--append: cannot read {csv_file}: {error}") from None
    if header != _csv_header():
        raise UsageError(f"--append: {csv_file} has other columns than this version of agentsd bench writes; "
                         "choose another --out")


class ResultFiles:
    """The result files of one run (see the module notes). Use as a context manager.

    Args:
        out: the results folder (created when needed; removed again if the run wrote nothing into
            a folder it created).
        overwrite: replace files of these names.
        append: add to the text files of these names instead.
    """

    def __init__(self, out: Path, *, overwrite: bool = False, append: bool = False) -> None:
        self.out = out
        self.overwrite = overwrite
        self.append = append
        self.paths: dict[str, Path] = {}
        self._prefix: dict[str, str] = {}
        self._lock: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> ResultFiles:
        probe = self.out
        while not probe.exists() and probe.parent != probe:
            self._created.append(probe)
            probe = probe.parent
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--out {str(self.out)!r} cannot be created: {error.strerror or error}"
                             ) from None
        remove_stale_temporaries(self.out)  # left by a run that was killed while writing
        if self.append:
            self._lock_folder()
            for name in APPENDABLE:
                with contextlib.suppress(FileNotFoundError):
                    self._prefix[name] = (self.out / name).read_text(encoding="utf-8")
            check_appendable(self.out, self._prefix)  # again, now that the folder is ours
        return self

    def _lock_folder(self) -> None:
        import fcntl

        fd = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"another agentsd bench --append is writing into {self.out}; wait for it to "
                             "finish or choose another --out") from None
        self._lock = fd

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None
        if not self.paths:  # nothing written: leave no empty folder behind
            for made in self._created:
                try:
                    made.rmdir()
                except OSError:
                    break

    def _content(self, name: str, data: Data) -> Data:
        prefix = self._prefix.get(name)
        if not prefix or not isinstance(data, str):
            return data
        if name == CSV_FILE:
            return prefix + data.split("\n", 1)[1]  # the header is already there
        return prefix.rstrip("\n") + "\n\n" + data

    def write(self, files: Mapping[str, Data]) -> dict[str, Path]:
        """Write ``files`` (name -> content) as one unit; returns name -> path for every file so far.

        The first call claims the names (see the module notes) and must name every file the run
        writes; later calls replace this run's files.
        """
        if self.append:
            new = {name: self.out / name for name in files if name not in self.paths}
            self.paths.update(new)
            write_unit([(self.paths[name], self._content(name, data)) for name, data in files.items()],
                       overwrite=True)
            return dict(self.paths)
        if not self.paths:
            from agentsd.tools.bench.report import publish

            self.paths = publish(self.out, dict(files), self.overwrite)
            return dict(self.paths)
        unclaimed = sorted(set(files) - set(self.paths))
        if unclaimed:
            raise RuntimeError(f"{unclaimed[0]} was not written by the first write of this run")
        write_unit([(self.paths[name], data) for name, data in files.items()], overwrite=True)
        return dict(self.paths)
