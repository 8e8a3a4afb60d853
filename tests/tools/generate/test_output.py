"""agentsd.tools.generate.output: numbered result files that never overwrite, comparison grids."""

import os

import pytest
from PIL import Image

from agentsd.tools import files
from agentsd.tools.generate import output


def test_numbers_continue_and_nothing_is_overwritten(tmp_path):
    (tmp_path / "00007-3-old.png").write_bytes(b"old")
    folder = output.OutputFolder(tmp_path)
    assert folder.new_stem("4-cat") == "00008-4-cat"
    image = Image.new("RGB", (8, 8), "red")
    assert folder.save_new_group("4-cat", lambda stem: [(".png", files.png_writer(image))]) == "00008-4-cat"
    with pytest.raises(FileExistsError):
        files.save_png(tmp_path / "00007-3-old.png", Image.new("RGB", (8, 8), "blue"))
    assert (tmp_path / "00007-3-old.png").read_bytes() == b"old"
    with Image.open(tmp_path / "00008-4-cat.png") as saved:
        assert saved.getpixel((0, 0)) == (255, 0, 0)
    # a number taken by any file counts, whatever its name
    (tmp_path / "00009-5-dog.json").write_text("{}")
    assert folder.new_stem("6-cow") == "00010-6-cow"
    assert sorted(os.listdir(tmp_path)) == ["00007-3-old.png", "00008-4-cat.png", "00009-5-dog.json"]


def test_interrupted_write_leaves_nothing(tmp_path):
    folder = output.OutputFolder(tmp_path)

    class Interrupted:
        def save(self, *args, **kwargs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        folder.save_new_group("0-x", lambda stem: [(".png", files.png_writer(Interrupted()))])
    assert os.listdir(tmp_path) == []


def test_slug_and_grid():
    assert output.slug("A photo, of a corgi!") == "a-photo-of-a-corgi"
    assert output.slug("!!!") == "image"
    assert len(output.slug("word " * 40)) <= 40
    left, right = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "blue")
    grid = output.labelled_grid([left, right], ["original  2.00 s", "AgentSD  1.00 s"])
    assert grid.width >= 128 and grid.height > 48
    # the images sit under the label strip, in order
    assert grid.getpixel((grid.width // 4, grid.height - 1)) == (255, 0, 0)
    assert grid.getpixel((3 * grid.width // 4, grid.height - 1)) == (0, 0, 255)
