"""The API reference: every name in `melbo_lens.__all__` is documented the way the site's
generated reference (mkdocstrings, which reads the source through griffe) will show it.

griffe is what mkdocstrings uses, so a name griffe cannot resolve (a lazily imported name
missing from the `TYPE_CHECKING` block) is a name missing from the site.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import melbo_lens

griffe = pytest.importorskip("griffe")

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = {"parameters", "attributes", "other parameters"}


@pytest.fixture(scope="module")
def package():
    return griffe.load("melbo_lens", search_paths=[str(ROOT)], docstring_parser="google")


def documentation(package, name: str) -> tuple[object, set[str], set[str]]:
    """(griffe object, section kinds, names documented in Args/Attributes) of `name`."""
    obj = package[name]
    if obj.is_alias:
        obj = obj.final_target
    assert obj.docstring is not None and obj.docstring.value.strip(), f"{name} has no docstring"
    kinds, names = set(), set()
    for section in obj.docstring.parse("google"):
        kinds.add(section.kind.value)
        if section.kind.value in DOCUMENTED:
            names |= {item.name.lstrip("*") for item in section.value}
    return obj, kinds, names


def parameters(obj) -> list[str]:
    """The parameters a caller passes (self and cls left out)."""
    if not (obj.is_function or obj.is_class):
        return []
    return [p.name for p in (obj.parameters or []) if p.name not in ("self", "cls")]


def test_every_public_name_resolves_for_the_reference(package):
    unresolved = [n for n in melbo_lens.__all__ if n not in package.all_members]
    assert not unresolved, (
        f"{unresolved} are in __all__ but not visible to the API reference; import them "
        "under `if TYPE_CHECKING:` in melbo_lens/__init__.py"
    )


@pytest.mark.parametrize("name", melbo_lens.__all__)
def test_every_public_name_has_a_docstring_with_its_parameters(package, name):
    obj, kinds, names = documentation(package, name)
    params = parameters(obj)
    if not params:
        return  # constants, protocols and exceptions: the docstring is the check
    assert kinds & DOCUMENTED, f"{name}: add an Args: (or, for a result class, Attributes:) section"
    missing = [p for p in params if p not in names]
    assert not missing, f"{name}: Args does not describe {missing}"
    unknown = sorted(names - set(params))
    assert not unknown, f"{name}: Args names {unknown}, which are not parameters"


def test_the_check_catches_an_undocumented_parameter():
    """The rule itself, on a function written to break it."""
    module = griffe.visit(
        "m",
        filepath=Path("m.py"),
        code='def f(a, b):\n    """Do it.\n\n    Args:\n        a: The first.\n    """\n',
        docstring_parser=griffe.Parser.google,
    )
    _, kinds, names = documentation(module, "f")
    assert "parameters" in kinds and names == {"a"}
    assert [p for p in parameters(module["f"]) if p not in names] == ["b"]


@pytest.mark.parametrize("name", melbo_lens.__all__)
def test_public_examples_run_unless_a_reason_is_given(package, name):
    """The doctest plugin runs every example; a public name may skip one only where the
    docstring says why (`not run here: ...`, e.g. it needs the Hugging Face hub)."""
    obj, _, _ = documentation(package, name)
    text = obj.docstring.value
    if "+SKIP" in text:
        assert "not run here:" in text, f"{name}: make its example run, or say why it cannot"
