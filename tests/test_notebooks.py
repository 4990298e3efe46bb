"""Every notebook in notebooks/ runs top to bottom on the offline default model.

Selected only with `-m notebook` (`.ci/run` does so after the default run): each notebook
takes minutes on a 2-core CPU. A failing cell fails the test with the cell's error.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# Issue 8's bound for one notebook on this CPU; the nbclient timeout is per cell.
LIMIT_SECONDS = 15 * 60


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"hso", "search", "recurrence"}


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    # The kernel imports this checkout's makemost_jax even where the package is not installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(path.parents[1]),
                                                                   os.environ.get("PYTHONPATH")])))
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=LIMIT_SECONDS, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - t0
    print(f"\n{path.name}: {len(notebook.cells)} cells in {seconds:.0f} s")
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert seconds < LIMIT_SECONDS
