"""agentsd.tools.files: atomic writes, units of files, modes, stale temporaries, folders left clean."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from agentsd.tools import files
from agentsd.tools.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_text_bytes_and_png_are_written_with_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        text = files.write_atomic(tmp_path / "a.txt", "héllo\n")
        data = files.write_atomic(tmp_path / "b.bin", b"\x00\x01")
        png = files.save_png(tmp_path / "c.png", Image.new("RGB", (4, 4), "red"))
    finally:
        os.umask(old)
    assert text.read_text(encoding="utf-8") == "héllo\n" and data.read_bytes() == b"\x00\x01"
    assert Image.open(png).getpixel((0, 0)) == (255, 0, 0)
    assert {oct(p.stat().st_mode & 0o777) for p in (text, data, png)} == {"0o644"}
    assert _listing(tmp_path) == ["a.txt", "b.bin", "c.png"]


def test_no_overwrite_keeps_the_existing_file(tmp_path):
    files.write_atomic(tmp_path / "r.txt", "first")
    with pytest.raises(FileExistsError):
        files.write_atomic(tmp_path / "r.txt", "second", overwrite=False)
    files.write_atomic(tmp_path / "r.txt", "third")  # overwrite=True replaces
    assert (tmp_path / "r.txt").read_text() == "third" and _listing(tmp_path) == ["r.txt"]


def test_png_and_sidecar_are_one_unit(tmp_path):
    files.write_atomic(tmp_path / "x.png", b"taken")  # the PNG's name is taken: the sidecar must not stay
    image = files.png_writer(Image.new("RGB", (2, 2)))
    with pytest.raises(FileExistsError):
        files.write_unit([(tmp_path / "x.json", files.json_text({"seed": 1})), (tmp_path / "x.png", image)])
    assert _listing(tmp_path) == ["x.png"]

    sidecar, png = files.write_unit([(tmp_path / "y.json", files.json_text({"seed": 1})),
                                     (tmp_path / "y.png", image)])
    assert png.exists() and '"seed": 1' in sidecar.read_text()


def test_a_failing_writer_leaves_nothing(tmp_path):
    def broken(f):
        f.write(b"half")
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError):
        files.write_unit([(tmp_path / "a.json", "{}"), (tmp_path / "a.png", broken)])
    assert _listing(tmp_path) == []


def test_full_disk_is_one_line_naming_the_file_and_leaves_no_debris(tmp_path):
    def full(f):
        f.write(b"some")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UsageError, match=r"cannot write .*out\.png.*No space left on device"):
        files.write_atomic(tmp_path / "out.png", full)
    assert _listing(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f".00001-a.png.{dead.stdout.strip()}-abc123.tmp"
    live = tmp_path / f".00002-b.png.{os.getppid()}-def456.tmp"  # a running process's: kept
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    (tmp_path / "keep.tmp").write_bytes(b"x")  # not ours
    assert files.remove_stale_temporaries(tmp_path) == [stale]
    assert _listing(tmp_path) == sorted([live.name, "keep.tmp"])


def test_sigterm_while_writing_removes_the_temporary(tmp_path):
    code = (
        "import os, signal, sys\n"
        "from agentsd.tools import files\n"
        "from agentsd.tools.errors import Terminated, terminate_gracefully\n"
        "def writer(f):\n"
        "    f.write(b'part')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    f.write(b'rest')\n"
        "try:\n"
        "    with terminate_gracefully():\n"
        f"        files.write_atomic({str(tmp_path / 'a.png')!r}, writer)\n"
        "except Terminated:\n"
        "    sys.exit(143)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            check=False)
    assert result.returncode == 143 and _listing(tmp_path) == []


def test_folder_for_results_removes_only_the_empty_folders_it_made(tmp_path):
    (tmp_path / "existing").mkdir()
    with pytest.raises(RuntimeError), files.folder_for_results(tmp_path / "existing" / "a" / "b"):
        raise RuntimeError("failed after loading")
    assert _listing(tmp_path / "existing") == []

    with pytest.raises(RuntimeError), files.folder_for_results(tmp_path / "c") as folder:
        (folder / "image.png").write_bytes(b"x")
        raise RuntimeError("failed after one image")
    assert (tmp_path / "c" / "image.png").exists()  # results are kept


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_check_writable_folder(tmp_path, where):
    (tmp_path / "f").write_text("x")
    target = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"
    with pytest.raises(UsageError, match="is a file"):
        files.check_writable_folder(target)
    files.check_writable_folder(tmp_path / "new" / "deeper")  # creatable: fine, nothing made
    assert not (tmp_path / "new").exists()


def test_existing_file_names_what_is_wrong(tmp_path):
    (tmp_path / "p.txt").write_text("x")
    assert files.existing_file(tmp_path / "p.txt", "prompt file") == tmp_path / "p.txt"
    with pytest.raises(UsageError, match=r"prompt file '.*nope\.txt' does not exist"):
        files.existing_file(tmp_path / "nope.txt", "prompt file")
    with pytest.raises(UsageError, match=r"prompts '.*' is a folder, not a regular file"):
        files.existing_file(tmp_path, "prompts")
    with pytest.raises(UsageError, match=r"^prompts '/dev/null' is a device, not a regular file$"):
        files.existing_file("/dev/null", "prompts")
