"""The quick-start notebook runs top to bottom against the tiny local pipeline (so it cannot rot).

It is executed with nbclient in a real ``python3`` kernel, as Jupyter would, after two changes:
cells tagged ``skip-execution`` (the ``%pip install``) are dropped, and a cell after the one tagged
``parameters`` points MODEL / STEPS / SIZE at the tiny model (the papermill convention).
"""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def _outputs_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "strip the notebook's outputs"


def test_notebook_runs_on_the_tiny_pipeline(tiny_sd_dir, tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cells = [c for c in notebook.cells if "skip-execution" not in c.metadata.get("tags", [])]
    index = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    overrides = nbformat.v4.new_code_cell(f"MODEL = {str(tiny_sd_dir)!r}\nSTEPS = 3\nSIZE = 32")
    notebook.cells = [*cells[: index + 1], overrides, *cells[index + 1 :]]

    # the kernel imports this checkout, offline, on one thread (the tiny model is faster so)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figure
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    text = "\n".join(_outputs_text(c) for c in notebook.cells if c.cell_type == "code")
    assert "original: " in text
    assert "AgentSD: " in text and "x the speed of the original" in text
    assert "{'agent': 2, 'tome': 1, 'full': 0}" in text  # 3 steps: the patch really ran
    assert "identical to the original: True" in text  # remove_patch restores the exact image
    figures = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(figures) == 1  # the side-by-side comparison

