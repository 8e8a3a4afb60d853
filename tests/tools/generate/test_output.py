"""agentsd.tools.generate.output: numbered result files that never overwrite, comparison grids."""

import os

import pytest
from PIL import Image

from agentsd.tools.generate import output


def test_numbers_continue_and_nothing_is_overwritten(tmp_path):
    (tmp_path / "00007-old.png").write_bytes(b"old")
    folder = output.OutputFolder(tmp_path)
    stem = folder.new_stem("cat")
    assert stem == "00008-cat"
    image = Image.new("RGB", (8, 8), "red")
    folder.save_image(image, stem + ".png")
    folder.save_json({"prompt": "cat"}, stem + ".json")
    with pytest.raises(FileExistsError):
        folder.save_image(Image.new("RGB", (8, 8), "blue"), "00007-old.png")
    assert (tmp_path / "00007-old.png").read_bytes() == b"old"
    with Image.open(tmp_path / "00008-cat.png") as saved:
        assert saved.getpixel((0, 0)) == (255, 0, 0)
    # a name taken by any file of the group is skipped
    (tmp_path / "00009-dog.json").write_text("{}")
    assert folder.new_stem("dog") == "00010-dog"
    assert sorted(os.listdir(tmp_path)) == [
        "00007-old.png", "00008-cat.json", "00008-cat.png", "00009-dog.json"
    ]


def test_interrupted_write_leaves_nothing(tmp_path):
    folder = output.OutputFolder(tmp_path)

    class Interrupted:
        def save(self, *args, **kwargs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        folder.save_image(Interrupted(), "00001-x.png")
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
