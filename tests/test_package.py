"""The package's public surface: every name in __all__ resolves, and importing
melbo_lens loads none of the heavy optional stacks (views, SAEs, the model zoo)."""

from __future__ import annotations

import subprocess
import sys

import melbo_lens


def test_every_public_name_resolves():
    missing = [name for name in melbo_lens.__all__ if getattr(melbo_lens, name, None) is None]
    assert not missing
    assert len(set(melbo_lens.__all__)) == len(melbo_lens.__all__), "duplicate names"


def test_import_has_no_heavy_side_effects():
    code = (
        "import sys, melbo_lens; "
        "print(sorted(m for m in ('plotly', 'circuitsvis', 'sae_lens', 'melbo_lens.views', "
        "'melbo_lens.workflows.planted', 'melbo_lens.models.zoo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
