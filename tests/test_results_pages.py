"""Results pages are written from their JSON by one command (`scripts/results_pages.py`),
and the site shows them as written: a page that differs from what its JSON renders to,
a JSON with no page, or a page the site does not include, fails here."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pages_module():
    spec = importlib.util.spec_from_file_location(
        "results_pages", ROOT / "scripts" / "results_pages.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


PAGES = _pages_module()


def test_every_results_page_is_what_its_json_renders_to():
    assert PAGES.stale() == [], "run: python scripts/results_pages.py"


def test_every_json_under_results_has_a_page_or_a_reason():
    sources = {p.source for p in PAGES.PAGES} | set(PAGES.NO_PAGE)
    found = {str(p.relative_to(ROOT)) for p in (ROOT / "results").rglob("*.json")}
    assert found - sources == set(), "add these to scripts/results_pages.py (PAGES or NO_PAGE)"
    assert {p.source for p in PAGES.PAGES} <= found


def test_the_site_includes_every_results_page():
    included = set()
    for doc in (ROOT / "docs").rglob("*.md"):
        included |= set(re.findall(r'--8<-- "([^"]+)"', doc.read_text(encoding="utf-8")))
    pages = {p.page for p in PAGES.PAGES}
    assert pages - included == set(), "include these in a docs/results page (--8<--)"


def test_the_check_notices_a_changed_page(tmp_path, monkeypatch):
    """The check itself: a page edited by hand is reported stale."""
    page = PAGES.PAGES[0]
    copy = tmp_path / "page.md"
    copy.write_text(PAGES.render(page) + "\nedited by hand\n", encoding="utf-8")
    monkeypatch.setattr(PAGES, "ROOT", ROOT)
    fake = PAGES.Page(page.source, str(copy), page.render)  # an absolute path stays absolute
    assert PAGES.stale([fake]) == [str(copy)]
    copy.write_text(PAGES.render(page), encoding="utf-8")
    assert PAGES.stale([fake]) == []
