"""Writing result files so that nothing is half-written, overwritten by accident or left as debris.

One writer, :func:`write_atomic`, serves text, bytes, PNG images, JSON, CSV and plots: the data go
to a hidden temporary file in the target folder (``.<name>.<pid>-<random>.tmp``), are flushed to
disk, get the usual file mode (``0666`` minus the umask, e.g. ``0644``) and are then published in
one step, either replacing the target (``overwrite=True``) or failing with ``FileExistsError``
if it exists (``overwrite=False``, by a hard link, so two processes cannot both win).

:func:`write_unit` publishes several files as one unit (an image and its JSON sidecar): all are
written first, then published with SIGINT/SIGTERM held, the last file last, so a reader that
sees the last file (the PNG) knows the others are complete. An interrupt leaves all or none.

Errors from the file system (full disk, read-only, permissions) become one-line
:class:`~agentsd.tools.errors.UsageError`\\ s naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from agentsd.tools.errors import UsageError, signals_deferred

Writer = Callable[[BinaryIO], None]
Data = bytes | str | Writer

_TEMPORARY = re.compile(r"^\..+\.(\d+)-[^.]+\.tmp$")


def file_mode() -> int:
    """The mode a newly created file gets from this process's umask (``0644`` under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _environment_error(path: Path, error: OSError) -> UsageError:
    return UsageError(f"cannot write {str(path)!r}: {error.strerror or error}")


def _as_writer(data: Data) -> Writer:
    if callable(data):
        return data
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    return lambda f: f.write(payload)


def _write_temporary(path: Path, data: Data) -> str:
    """Write ``data`` to a new temporary file beside ``path``; returns its name. Removes it on failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _as_writer(data)(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600 files
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _publish(tmp: str, path: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``path``; without ``overwrite``, ``FileExistsError`` if ``path`` exists."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: never replaces a file
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system: check, then rename
        if path.exists():
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_unit(files: Sequence[tuple[str | os.PathLike, Data]], *, overwrite: bool = False) -> list[Path]:
    """Write several files as one unit: all or none of them appear, in the given order.

    Args:
        files: ``(path, data)`` pairs; ``data`` is ``bytes``, ``str`` (UTF-8) or a callable that
            writes to a binary file object (e.g. ``lambda f: image.save(f, format="PNG")``). Put
            the file readers check for (the PNG) last.
        overwrite: replace existing files (recommended for results that are rewritten, such as a
            report); ``False`` (recommended for images) raises ``FileExistsError`` if any path
            exists, after removing the files of this unit already published.

    Returns:
        The paths written.

    Raises:
        FileExistsError: without ``overwrite``, one of the paths exists; nothing of the unit stays.
        UsageError: the file system refused (full disk, read-only, no permission), naming the file.
    """
    paths = [Path(p) for p, _ in files]
    temporaries: list[str] = []
    current = paths[0]
    try:
        for path, (_, data) in zip(paths, files, strict=True):
            current = path
            temporaries.append(_write_temporary(path, data))
        published: list[Path] = []
        with signals_deferred():
            try:
                for tmp, path in zip(temporaries, paths, strict=True):
                    current = path
                    _publish(tmp, path, overwrite)
                    published.append(path)
            except BaseException:
                for path in published:  # all or none
                    with contextlib.suppress(OSError):
                        path.unlink()
                raise
    except FileExistsError:
        raise
    except OSError as error:
        if error.errno is None:  # not the file system's doing (e.g. an encoder's error)
            raise
        raise _environment_error(current, error) from error
    finally:
        for tmp in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return paths


def write_atomic(path: str | os.PathLike, data: Data, *, overwrite: bool = True) -> Path:
    """Write one file atomically (see :func:`write_unit` for ``data``, ``overwrite`` and errors)."""
    return write_unit([(path, data)], overwrite=overwrite)[0]


def png_writer(image) -> Writer:
    """A writer that saves a PIL image as PNG."""
    return lambda f: image.save(f, format="PNG")


def json_text(data: object) -> str:
    """``data`` as indented UTF-8 JSON with a final newline (non-JSON values via ``str``)."""
    return json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"


def save_png(path: str | os.PathLike, image, *, overwrite: bool = False) -> Path:
    """Save a PIL image as a PNG file atomically; by default never replaces an existing file."""
    return write_atomic(path, png_writer(image), overwrite=overwrite)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files left in ``folder`` by writers that were killed (their process is gone).

    Temporary files of running processes are left alone. Returns the files removed.
    """
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for name in os.listdir(folder):
            match = _TEMPORARY.match(name)
            if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(Path(folder) / name)
                    removed.append(Path(folder) / name)
    return removed


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` (``~`` expanded) if it is an existing file, else a :class:`UsageError` saying what it is.

    Args:
        path: the file the user named.
        what: how the message names it, e.g. ``"prompt file"`` or ``"init image"``.
    """
    found = Path(path).expanduser()
    if not found.exists():
        raise UsageError(f"{what} {str(path)!r} does not exist")
    if not found.is_file():
        device = found.is_char_device() or found.is_block_device()
        kind = "a folder" if found.is_dir() else "a device" if device else "a pipe or a socket"
        raise UsageError(f"{what} {str(path)!r} is {kind}, not a regular file")
    return found


def check_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> None:
    """Raise :class:`UsageError` unless ``folder`` exists as a writable folder or can be created.

    Nothing is created: the nearest existing ancestor is probed with a temporary file (which also
    catches read-only file systems, where permission bits alone would say yes to root).
    """
    path = Path(folder).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        if probe == path:
            raise UsageError(f"{what} {str(folder)!r} is a file, not a folder")
        raise UsageError(f"{what} {str(folder)!r} cannot be created: {str(probe)!r} is a file")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        raise UsageError(f"{what} {str(folder)!r} is not writable: {error.strerror or error}") from None


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the existing ``folder`` for the block (others wait): runs writing into
    one folder hold it to pick a number or merge results. ``flock`` on the folder itself leaves no lock
    file, and the kernel releases it when a holder dies; without ``fcntl`` (Windows) it holds nothing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


@contextlib.contextmanager
def folder_for_results(folder: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Create ``folder`` (and missing parents) for the block; if the block fails, remove the folders
    this call created as long as they are still empty, so a failed run leaves no empty folder."""
    path = Path(folder).expanduser()
    created = []
    probe = path
    while not probe.exists() and probe.parent != probe:
        created.append(probe)
        probe = probe.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{what} {str(folder)!r} cannot be created: {error.strerror or error}") from None
    try:
        yield path
    except BaseException:
        for made in created:  # innermost first
            try:
                made.rmdir()  # only if empty
            except OSError:
                break
        raise
