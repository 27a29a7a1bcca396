"""The notebooks in notebooks/: committed with their outputs (fast checks), and run top to bottom.

The fast tests read the committed files only: valid nbformat, run top to bottom in one kernel
with the full settings (not CI's quick mode), every cell that prints or draws has its output,
figures are inline PNGs, and no cell shows an error or a warning.

The slow tests execute each notebook with nbclient in quick mode (``MTLOPT_NOTEBOOK_QUICK=1``:
less data, fewer steps and seeds), from an in-memory copy, so the committed outputs are never
overwritten; any cell error fails the test. The executed copy is written to ``tmp_path`` for
inspection. CI runs them in its slow step::

    python -m pytest -q -m slow tests/test_notebooks.py
"""

import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ("quickstart.ipynb", "cagrad_toy.ipynb", "loss_scales.ipynb")
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
QUICK_ENV = "MTLOPT_NOTEBOOK_QUICK"

# A code cell whose source matches this writes output when it runs (a print, a figure, a
# display call or a progress bar), so its committed outputs must not be empty.
_OUTPUTS_SOMETHING = re.compile(r"\bprint\(|plt\.show\(\)|\bdisplay\(|\btqdm\(")


def _read(path):
    return nbformat.read(path, as_version=4)


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_the_notebooks_are_there():
    assert set(EXPECTED) <= {p.name for p in NOTEBOOKS}, sorted(p.name for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_with_outputs(path):
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    cells = _code_cells(nb)
    assert cells, "no code cells"

    # Run top to bottom, in one kernel session: execution counts 1, 2, ..., n.
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), f"execution counts {counts}"

    # The first code cell reads the quick-mode switch; the committed outputs are the full run.
    assert QUICK_ENV in cells[0].source, f"the first code cell does not read {QUICK_ENV}"
    first_output = "".join(o.get("text", "") for o in cells[0].outputs)
    assert "quick mode: False" in first_output, first_output

    images = 0
    for i, cell in enumerate(cells, start=1):
        kinds = [o.output_type for o in cell.outputs]
        where = f"code cell {i} ({cell.source.splitlines()[0]!r})"
        assert "error" not in kinds, f"{where} shows an error"
        for out in cell.outputs:
            if out.output_type == "stream":
                assert out.name == "stdout", f"{where} writes to stderr: {out.text[:300]!r}"
            if out.output_type in ("display_data", "execute_result"):
                images += "image/png" in out.data
        if _OUTPUTS_SOMETHING.search(cell.source):
            assert cell.outputs, f"{where} prints or draws, but no output is committed"
    assert images >= 1, "no inline PNG figure"


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_runs_top_to_bottom_in_quick_mode(name, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = _read(NOTEBOOK_DIR / name)
    monkeypatch.setenv(QUICK_ENV, "1")
    # The "python3" kernel runs `python`: make that this interpreter.
    bin_dir = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ.get("PATH", ""))
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        # The kernel starts in notebooks/ (the notebooks import examples/ and benchmarks/ from
        # the checkout); nothing is written there: the executed copy goes to tmp_path.
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError on the first cell that fails
    nbformat.write(nb, tmp_path / name)
    first_output = "".join(o.get("text", "") for o in _code_cells(nb)[0].outputs)
    assert "quick mode: True" in first_output, first_output
