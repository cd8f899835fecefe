"""Every notebook in notebooks/ executes top to bottom (nbclient, the venv's ipykernel), so one that breaks
fails CI. One test per notebook: `pytest -n 2` runs them in parallel with the rest of the suite.

  .venv/bin/python -m pytest -q tests/test_notebooks.py
  WINA_NOTEBOOK_TIMEOUT=1800 .venv/bin/python -m pytest -q tests/test_notebooks.py -k quickstart
"""

import glob
import os
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
# Seconds one cell may run: generous for a loaded 2-core CI machine (each notebook takes ~1-3 min idle).
CELL_TIMEOUT = int(os.environ.get("WINA_NOTEBOOK_TIMEOUT", "900"))


def test_notebooks_exist():
  assert NOTEBOOKS, "no notebooks found under notebooks/"


def test_notebooks_are_stored_without_outputs():
  import nbformat

  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    dirty = [
      i
      for i, c in enumerate(nb.cells)
      if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, (
      f"{os.path.basename(path)} has outputs in cells {dirty}; clear them before committing "
      "(Jupyter: Edit > Clear Outputs of All Cells)"
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
  import nbformat
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError

  # The kernel inherits this environment: the repo on its path, a headless plotting backend.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(path, as_version=4)
  # kernel 'python3' is ipykernel's own spec; jupyter_client starts it with this interpreter (the venv).
  client = NotebookClient(
    nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}
  )
  start = time.time()
  try:
    client.execute()
  except CellExecutionError as e:
    pytest.fail(f"{os.path.basename(path)} failed after {time.time() - start:.0f}s:\n{e}")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  print(f"{os.path.basename(path)} executed in {time.time() - start:.0f}s")
