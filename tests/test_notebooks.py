"""The lessons in notebooks/ run top to bottom, offline, in a fresh kernel of this environment's Python.

The notebooks are stored without outputs, and these tests execute them: an executed notebook would carry
timings of one machine, the head view's page (hundreds of kB per view) and PNGs in base64, all of which
change on every run and would go stale without anyone noticing; stored bare, their diffs are the lessons'
text and code, and a lesson that no longer runs fails here. One test per notebook (parallel under
`pytest -n 2`), each in its own kernel started from sys.executable with one thread, as the rest of the suite.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbclient  # the test extra (pyproject.toml): a missing one fails here, loudly, rather than skipping
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
LESSONS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT = 180  # seconds; a whole lesson takes a few tens of seconds on two busy cores


def test_every_lesson_is_there_and_stored_without_outputs():
    assert [p.stem for p in LESSONS] == ["01_whiteboard", "02_cost_of_heads", "03_heads_of_a_real_model",
                                         "04_which_heads_matter", "05_kv_cache_and_latent_attention"]
    for path in LESSONS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert code and all(c.outputs == [] and c.execution_count is None for c in code), path.name
        assert "../" not in path.read_text(), path.name  # no relative path out of the repository


def kernel(tmp_path: Path) -> KernelManager:
    """A kernel manager whose one kernel spec runs ipykernel in sys.executable (the venv's python), not
    whatever 'python3' a user's or the system's Jupyter folders name."""
    spec = tmp_path / "kernels" / "multihead-test"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "multihead tests", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="multihead-test", kernel_spec_manager=specs)


def outputs(nb, kind: str) -> list[str]:
    """Every output of the executed notebook with the MIME type `kind`, as text."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if kind in data:
                found.append("".join(data[kind]) if isinstance(data[kind], list) else data[kind])
    return found


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "IPYTHONDIR": str(tmp_path / "ipython"),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    client = nbclient.NotebookClient(nb, km=kernel(tmp_path), timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError, naming the cell, when one fails
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert errors == []
    html = outputs(nb, "text/html")
    assert not any("<script src=" in page or "src=&quot;http" in page for page in html)  # nothing fetched
    if path.stem == "03_heads_of_a_real_model":  # the head view, inline: its page and script in the iframe
        views = [page for page in html if 'class="multihead-head-view"' in page]
        assert views and all("srcdoc=" in v and "&lt;script&gt;" in v for v in views)
    if path.stem == "04_which_heads_matter":  # the layer x head picture is drawn in the notebook
        assert outputs(nb, "image/png")
