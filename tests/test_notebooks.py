"""The notebooks in notebooks/: every *.ipynb there is checked, whoever added it.

Two levels (decided so that the default test run stays fast):

* not slow (default run, < 1 s): each notebook is valid nbformat, is stored *executed*
  (every code cell has run, in order) with no error outputs, and reads SKYMODEL_QUICK so
  the tests can run it in quick mode;
* slow (`pytest -m slow tests/test_notebooks.py`): each notebook is executed top to bottom
  by nbclient with SKYMODEL_QUICK=1 and must finish without error within
  NOTEBOOK_TIMEOUT_S (each notebook's quick mode is meant to take < 3 minutes on a
  laptop CPU; the limit leaves room for a loaded machine). Notebooks whose metadata has
  {"skymodel": {"requires_data": true}} are skipped without $SKYMODEL_DATA.

Executing a notebook compiles its models (minutes on a CPU), which is why the execution
test is slow-marked: the whole default suite must stay within ~12 minutes on 2 cores.
To refresh the stored outputs after a change, execute in quick mode and save, e.g.
`SKYMODEL_QUICK=1 jupyter nbconvert --to notebook --execute --inplace notebooks/NAME.ipynb`.
"""

from __future__ import annotations

import os
import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
NOTEBOOK_TIMEOUT_S = 600


def _ids():
    return [p.stem for p in NOTEBOOKS]


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    for required in ("01_quickstart.ipynb", "02_fermi_fiducial.ipynb", "03_custom_component.ipynb"):
        assert required in names, f"notebooks/{required} is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids())
def test_notebook_is_stored_executed_without_errors(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert code, f"{path.name} has no code cells"
    counts = [c.get("execution_count") for c in code]
    assert all(isinstance(n, int) for n in counts), (
        f"{path.name} is not stored executed (cells without execution count): run it in quick mode and save"
    )
    assert counts == sorted(counts), f"{path.name}: cells were executed out of order {counts}"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} has error outputs: {[e.get('ename') for e in errors]}"
    source = "\n".join(c.source for c in code)
    assert "SKYMODEL_QUICK" in source, f"{path.name} does not read SKYMODEL_QUICK (no quick mode for CI)"


def _requires_data(nb) -> bool:
    return bool(nb.metadata.get("skymodel", {}).get("requires_data", False))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids())
def test_notebook_runs_in_quick_mode(path, monkeypatch, tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    data = os.environ.get("SKYMODEL_DATA")
    if _requires_data(nb) and not (data and pathlib.Path(data).is_dir()):
        pytest.skip(f"{path.name} needs the Fermi data: set SKYMODEL_DATA")
    monkeypatch.setenv("SKYMODEL_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        nb, timeout=NOTEBOOK_TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # notebooks write (if at all) into tmp
    )
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    assert elapsed < NOTEBOOK_TIMEOUT_S, f"{path.name} took {elapsed:.0f} s in quick mode"
