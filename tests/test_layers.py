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


# ---------------------------------------------------------------------- circles, reach-ins
def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _runtime_imports(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """`imports_of`, less the imports under `if TYPE_CHECKING:` (they never run)."""
    tree = ast.parse(source)
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {n.lineno for b in node.body for n in ast.walk(b) if hasattr(n, "lineno")}
    return [(line, t) for line, t in imports_of(source, module, is_package) if line not in skipped]


def import_graph(sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (top level or inside a function):
    `from a.b import c` is an edge to `a.b.c` when that is a module, else to `a.b`."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        source = (sources or {}).get(name) or path.read_text()
        edges = set()
        for _, target in _runtime_imports(source, name, path.name == "__init__.py"):
            if target in modules and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _packages_of(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without a submodule's edges into its own package's `__init__` (an
    `__init__` re-exporting its submodules, and a submodule reaching a sibling through
    the package, is the package's public face, not a design circle)."""
    modules = _modules()
    packages = {n for n, p in modules.items() if p.name == "__init__.py"}
    return {
        v: {w for w in ws if not (w in packages and v.startswith(w + "."))}
        for v, ws in graph.items()
    }


def test_no_import_circles_even_through_function_level_imports():
    found = cycles(_packages_of(import_graph()))
    assert not found, "import circles (break one arrow; inject instead of importing back):\n" + (
        "\n".join(" <-> ".join(c) for c in found)
    )


def test_a_planted_circle_is_caught():
    """A function-level import back from `core.sites` into `core.segment` closes a circle."""
    path = PACKAGE / "core" / "sites.py"
    planted = path.read_text() + "\n\ndef _f():\n    from melbo_lens.core.segment import Segment\n"
    found = cycles(_packages_of(import_graph({"melbo_lens.core.sites": planted})))
    assert any("melbo_lens.core.sites" in c and "melbo_lens.core.segment" in c for c in found)


def private_imports(path: Path, source: str | None = None) -> list[str]:
    """Imports of another module's `_private` names (module level or in a function)."""
    source = path.read_text() if source is None else source
    me = module_name(path)
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("melbo_lens"):
            if node.module == me:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    rel = path.relative_to(PACKAGE)
                    out.append(f"{rel}:{node.lineno} takes {alias.name} from {node.module}")
    return out


def test_no_module_takes_another_modules_private_names():
    problems = [v for f in sorted(PACKAGE.rglob("*.py")) for v in private_imports(f)]
    assert not problems, "make the name public where it is defined, or move it:\n" + "\n".join(
        problems
    )


def test_a_planted_private_import_is_caught():
    path = PACKAGE / "cli" / "train.py"
    assert not private_imports(path)
    planted = path.read_text() + "\nfrom melbo_lens.methods.melbo import _secret\n"
    assert private_imports(path, planted)
