"""The docs site in a real browser (headless Chromium over the DevTools protocol, as the
report's test): built with `mkdocs build --strict`, served locally; the home page shows
the package and its version, the API page shows `train_steering_vectors` with its
parameter table, a tutorial shows its executed outputs, and search finds "radius".
Nothing is fetched from outside the host."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_report_browser import CHROMIUM, Browser  # the same driver and skip rule

import melbo_lens

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not __import__("os").environ.get("CI"),
    reason="chromium is not installed",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists():
        pytest.fail("mkdocs is not installed; pip install -e '.[dev]'")
    out = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT, check=True, timeout=600,
    )  # fmt: skip
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    try:
        yield b
    finally:
        b.close()


def _open(browser: Browser, url: str) -> None:
    browser.call("Page.navigate", session=True, url=url)
    browser.poll("document.readyState === 'complete'")


def _remote(browser: Browser, base: str) -> list[str]:
    return [
        ev["params"]["request"]["url"]
        for ev in browser.events
        if ev["method"] == "Network.requestWillBeSent"
        and not ev["params"]["request"]["url"].startswith((base, "data:", "blob:", "about:"))
    ]


def test_the_home_page_api_page_and_search(site, browser):
    _open(browser, site + "/")
    title = browser.poll("document.title")
    assert f"melbo_lens {melbo_lens.__version__}" in title
    assert "TransformerLens" in browser.js("document.querySelector('article').innerText")

    _open(browser, site + "/reference/api/")
    assert browser.poll("!!document.getElementById('melbo_lens.train_steering_vectors')")
    table = browser.poll(
        "[...document.querySelectorAll('table')].map(t => t.innerText)"
        ".find(t => t.includes('checkpoint_every') && t.includes('max_rows_per_pass'))"
    )
    assert "resume" in table
    # a name loaded lazily at run time (sae-lens) is in the reference with its parameters
    assert browser.poll("!!document.getElementById('melbo_lens.decompose_onto_sae')")

    _open(browser, site + "/tutorials/01_quickstart/")
    outputs = browser.poll(
        "[...document.querySelectorAll('.jp-OutputArea-output')].map(o => o.innerText)"
        ".filter(t => t.trim()).length"
    )
    assert outputs >= 3, "the quickstart tutorial should show its executed outputs"
    # its figure is drawn by the site's own copy of plotly.js (docs/hooks.py)
    assert browser.poll("document.querySelectorAll('.js-plotly-plot .main-svg').length", 60)

    _open(browser, site + "/")
    browser.js(
        "(() => { const i = document.querySelector('.md-search__input'); i.focus();"
        " i.value = 'radius'; i.dispatchEvent(new Event('input', {bubbles: true})); })()"
    )
    hits = browser.poll("document.querySelectorAll('.md-search-result__item').length", 60)
    assert hits > 0
    assert _remote(browser, site) == []
    errors, _ = browser.problems()
    assert errors == []
