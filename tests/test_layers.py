"""The one-way import rule of DESIGN.md, read from the source (AST), not from the running
interpreter: core < models < perturbations < methods < generation < analysis < workflows <
views < cli. sae-lens only in the SAE module; plotly and circuitsvis only in views/; ray
only in the sweep executor."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "melbo_lens"

LAYERS = [
    "core",
    "models",
    "perturbations",
    "methods",
    "generation",
    "analysis",
    "workflows",
    "views",
    "cli",
]
# third-party packages that only one place may import
CONFINED = {
    "sae_lens": ("analysis/sae",),
    "plotly": ("views/",),
    "circuitsvis": ("views/",),
    "ray": ("workflows/sweeps",),
}


def layer_of(module: str) -> int | None:
    """Layer index of a melbo_lens module name (`melbo_lens.core.sites` -> 0)."""
    parts = module.split(".")
    if parts[0] != "melbo_lens" or len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `source`, relative ones resolved."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # `from melbo_lens import x` / `from melbo_lens.analysis import sae`
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return out


def violations(path: Path, source: str | None = None) -> list[str]:
    source = path.read_text() if source is None else source
    module = module_name(path)
    rel = str(path.relative_to(PACKAGE))
    mine = layer_of(module)
    problems = []
    for line, target in imports_of(source, module, path.name == "__init__.py"):
        top = target.split(".")[0]
        if top in CONFINED and not any(rel.startswith(p) for p in CONFINED[top]):
            problems.append(f"{rel}:{line} imports {top}, allowed only in {CONFINED[top]}")
        theirs = layer_of(target)
        if mine is not None and theirs is not None and theirs > mine:
            problems.append(
                f"{rel}:{line} ({LAYERS[mine]}) imports {target} ({LAYERS[theirs]}): "
                "imports must point down the stack"
            )
    return problems


def test_no_import_points_up_the_stack():
    files = sorted(p for p in PACKAGE.rglob("*.py"))
    assert len(files) > 30
    problems = [v for f in files for v in violations(f)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "path,line",
    [
        ("core/segment.py", "from melbo_lens.methods.objectives import melbo_objective"),
        ("core/segment.py", "from ..methods import objectives"),
        ("methods/melbo.py", "from melbo_lens.workflows.radius import select_radius"),
        ("workflows/runs.py", "from melbo_lens import cli"),
        ("models/toy.py", "from melbo_lens.generation import generate"),
        ("generation.py", "from .analysis.diversity import fluency"),
        ("methods/training/loop.py", "import plotly.graph_objects as go"),
        ("workflows/runs.py", "import sae_lens"),
    ],
)
def test_a_planted_upward_import_is_caught(path, line):
    """Each of the upward arrows main had before the reshaping, planted back in."""
    file = PACKAGE / path
    assert not violations(file)
    assert violations(file, file.read_text() + "\n" + line + "\n")
