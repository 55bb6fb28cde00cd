"""The documentation: a short README whose links all resolve, and a docs site whose
configuration names pages that exist (the strict build itself runs in `.ci/run`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= 8000, f"README.md has {len(text)} characters; the guide is 8,000"
    links = re.findall(r"\]\(([^)#]+)\)", text)
    local = [link for link in links if not link.startswith("http")]
    assert len(local) >= 15  # the site's sections
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_every_page_in_the_site_nav_exists_and_every_page_is_in_it():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = config[config.index("nav:") :]
    pages = re.findall(r":\s+(\S+\.(?:md|ipynb))\s*$", nav, flags=re.M)
    docs = ROOT / "docs"
    assert [p for p in pages if not (docs / p).exists()] == []
    on_disk = {str(p.relative_to(docs)) for p in [*docs.rglob("*.md"), *docs.rglob("*.ipynb")]}
    assert on_disk - set(pages) == set(), "pages the site's navigation does not reach"


def test_the_cli_reference_page_is_generated_from_the_parser():
    from melbo_lens.cli.reference import cli_reference

    page = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    assert page == cli_reference(), (
        "regenerate: python -m melbo_lens.cli.reference > docs/reference/cli.md"
    )


def _cells(notebook: dict) -> list[tuple[str, str]]:
    return [(c["cell_type"], "".join(c["source"])) for c in notebook["cells"]]


def test_the_tutorial_pages_are_the_notebooks_executed():
    """docs/tutorials/*.ipynb are what scripts/execute_notebooks.py wrote: the committed
    notebook's cells, with outputs and no errors; a changed notebook fails here until the
    script is rerun."""
    sources = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert sources
    for src in sources:
        page = ROOT / "docs" / "tutorials" / src.name
        assert page.exists(), f"run: python scripts/execute_notebooks.py --only {src.stem}"
        want, got = json.loads(src.read_text()), json.loads(page.read_text())
        assert _cells(got) == _cells(want), (
            f"{page.relative_to(ROOT)} is stale; run: "
            f"python scripts/execute_notebooks.py --only {src.stem}"
        )
        code = [c for c in got["cells"] if c["cell_type"] == "code"]
        assert all(c["execution_count"] is not None for c in code), f"{page.name}: not executed"
        outputs = [o for c in code for o in c["outputs"]]
        assert outputs and not [o for o in outputs if o["output_type"] == "error"]
        run = got["metadata"]["melbo_lens_execution"]
        assert run["command"].startswith("python scripts/execute_notebooks.py")


def test_the_readme_says_nothing_the_site_does_not():
    """README.md is its install commands and example, which the site includes as they
    stand (pymdownx.snippets sections), plus the title and the list of the site's pages."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    sections = re.findall(r"<!-- --8<-- \[start:(\w+)\] -->", text)
    assert sections == ["install", "example"]
    site = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md"))
    for name in sections:
        assert f'--8<-- "README.md:{name}"' in site, f"no docs page includes README.md:{name}"
    rest = re.sub(
        r"<!-- --8<-- \[start:(\w+)\] -->.*?<!-- --8<-- \[end:\1\] -->", "", text, flags=re.S
    )
    rest = rest[: rest.index("## Documentation")]
    assert [line for line in rest.splitlines() if line.strip() not in ("", "---")] == [
        "# melbo_lens"
    ]
