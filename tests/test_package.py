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


def test_core_and_perturbations_are_type_checked_strictly():
    """pyright runs strict on `core/` and `perturbations/` (a file comment, since pyright's
    config cannot relax rules per path). Relaxed there: the Unknown* rules, which torch's
    and safetensors' stubs trip on nearly every call (overloads such as `Tensor.max`),
    and the unnecessary isinstance / comparison rules, since these modules validate user
    input at the public boundary whatever the annotations promise."""
    from pathlib import Path

    root = Path(melbo_lens.__file__).parent
    files = sorted([*root.glob("core/*.py"), *root.glob("perturbations/*.py")])
    assert len(files) > 15
    missing = [
        str(f.relative_to(root)) for f in files if not f.read_text().startswith("# pyright: strict")
    ]
    assert not missing, f"add the strict header to {missing}"
