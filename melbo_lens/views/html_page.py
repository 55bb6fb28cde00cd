"""The page a report is drawn on: one self-contained HTML document with its figures.

`Page` collects plotly figure specs (the shared template stored once, floats rounded to
`DIGITS` significant digits) and circuitsvis token views; `html_document` inlines
plotly.js, the circuitsvis bundle (once per page), the styles and the small script that
draws each figure when its panel first opens, and refers to no URL. The run report and
the sweep report are both drawn on it.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from melbo_lens.views.dashboards import CSS as _DASH_CSS
from melbo_lens.views.tokens import bundle_script, html_fragment

__all__ = [
    "DIGITS",
    "Page",
    "esc_html",
    "fmt_number",
    "html_document",
    "html_table",
    "json_for_script",
    "pre_block",
    "round_floats",
]

DIGITS = 4  # significant digits kept in figure data


class Page:
    """Collects figure specs (template stored once) and token views for one page."""

    def __init__(self) -> None:
        self.figs: dict[str, Any] = {}
        self.template: Any = None
        self.n_views = 0

    def figure(self, fig: go.Figure, *, css: str = "") -> str:
        spec = json.loads(fig.to_json() or "{}")
        layout = spec.setdefault("layout", {})
        template = layout.pop("template", None)
        if template is not None:
            if self.template is None:
                self.template = template
            if template == self.template:
                spec["shared_template"] = True
            else:
                layout["template"] = template
        layout.pop("width", None)
        layout["autosize"] = True
        fid = f"fig-{len(self.figs)}"
        self.figs[fid] = round_floats(spec)
        style = f' style="{css}"' if css else ""
        return f'<div class="ml-fig" id="{fid}"{style}></div>'

    def view(self, view: Any) -> str:
        self.n_views += 1
        frag = html_fragment(view, bundle=False, div_id=f"ml-view-{self.n_views}")
        return f'<div class="ml-view">{frag}</div>'


def round_floats(x: Any) -> Any:
    if isinstance(x, float):
        if not math.isfinite(x) or x == 0:
            return x if math.isfinite(x) else None
        return float(f"{x:.{DIGITS}g}")
    if isinstance(x, list):
        return [round_floats(v) for v in x]
    if isinstance(x, dict):
        return {k: round_floats(v) for k, v in x.items()}
    return x


def json_for_script(data: Any) -> str:
    """JSON that cannot end or confuse the <script> it sits in."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def esc_html(x: Any) -> str:
    return html.escape(str(x), quote=True)


def pre_block(text: str, cls: str = "") -> str:
    # HTML drops one newline right after <pre>; give it one to drop, keep the text's own
    return f"<pre class='{cls}'>\n{esc_html(text)}</pre>"


def fmt_number(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}"


def html_document(title: str, body: str, page: Page) -> str:
    plotly_js = get_plotlyjs().replace("</script", "<\\/script")
    data = {"template": page.template, "figs": page.figs}
    cv = bundle_script() if page.n_views else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc_html(title)}</title>
<style>{_CSS}</style>
<script type="text/javascript">{plotly_js}</script>
</head>
<body>
{body}
<script type="application/json" id="ml-figures">{json_for_script(data)}</script>
{cv}
<script type="text/javascript">{_JS}</script>
</body>
</html>
"""


def html_table(rows: Sequence[Sequence[Any]], head: Sequence[str], cls: str = "") -> str:
    h = "".join(f"<th>{esc_html(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>'


_CSS = (
    """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;
padding:0 18px 60px;color:#1f2328}
header{border-bottom:1px solid #d0d7de;margin-bottom:12px}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #eee}
h3{font-size:16px}h4{font-size:14px;margin:18px 0 6px}
nav a{color:#0969da;text-decoration:none}.sub{color:#57606a;margin:0 0 6px}
table{border-collapse:collapse;margin:6px 0;width:100%}
td,th{border:1px solid #d0d7de;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f6f8fa}.kv td:first-child{width:22%}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12px/1.4 ui-monospace,monospace}
.vectors tr.ml-row{cursor:pointer}.vectors tr.ml-row:hover{background:#f3f8ff}
.vectors tr.ml-row[aria-selected=true]{background:#ddf4ff}
.small{color:#57606a;font-size:12px}.note{color:#9a6700}
.snip{font:12px ui-monospace,monospace}.tok{font:12px ui-monospace,monospace;color:#57606a}
.feat{white-space:nowrap}.ml-detail{border:1px solid #d0d7de;border-radius:6px;padding:4px 14px;
margin-top:14px;background:#fff}.ml-fig{min-height:300px;width:100%}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:10px}
.completions pre.steered{color:#0a3069}.melbo-caption{font-size:12px;color:#57606a;margin:4px 0}
"""
    + _DASH_CSS
)

_JS = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("ml-figures").textContent);
  var CONFIG = {displaylogo: false, responsive: true, showLink: false, showSendToCloud: false};
  function visible(el) {
    return !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  }
  function draw(div) {
    if (div.dataset.drawn) { Plotly.Plots.resize(div); return; }
    var spec = DATA.figs[div.id];
    if (!spec) { return; }
    var layout = Object.assign({}, spec.layout || {});
    if (spec.shared_template && DATA.template) { layout.template = DATA.template; }
    div.dataset.drawn = "1";
    Plotly.newPlot(div, spec.data || [], layout, CONFIG);
  }
  function drawVisible(root) {
    var divs = (root || document).querySelectorAll(".ml-fig");
    for (var i = 0; i < divs.length; i++) { if (visible(divs[i])) { draw(divs[i]); } }
  }
  function show(k) {
    var panels = document.querySelectorAll(".ml-detail");
    for (var i = 0; i < panels.length; i++) {
      panels[i].hidden = panels[i].dataset.vector !== String(k);
    }
    var rows = document.querySelectorAll("tr.ml-row");
    for (var j = 0; j < rows.length; j++) {
      var on = rows[j].dataset.vector === String(k);
      rows[j].setAttribute("aria-selected", on ? "true" : "false");
    }
    var hint = document.getElementById("ml-hint");
    if (hint) { hint.hidden = true; }
    var panel = document.getElementById("vector-" + k);
    if (!panel) { return; }
    drawVisible(panel);
    var top = panel.getBoundingClientRect().top;
    if (top < 0 || top > window.innerHeight * 0.6) { panel.scrollIntoView({block: "start"}); }
    if (window.history && history.replaceState) { history.replaceState(null, "", "#vector-" + k); }
  }
  window.melboShowVector = show;
  function openLatent(id) {
    var d = document.getElementById(id);
    if (!d) { return false; }
    d.open = true;
    d.scrollIntoView({block: "start"});
    return true;
  }
  document.addEventListener("click", function (ev) {
    var a = ev.target.closest ? ev.target.closest("a.latent-link") : null;
    if (a) {
      ev.preventDefault();
      ev.stopPropagation();
      var id = a.getAttribute("href").slice(1);
      if (openLatent(id) && window.history && history.replaceState) {
        history.replaceState(null, "", "#" + id);
      }
      return;
    }
    var row = ev.target.closest ? ev.target.closest("tr.ml-row") : null;
    if (row) { show(row.dataset.vector); }
  });
  document.addEventListener("keydown", function (ev) {
    var row = ev.target.closest ? ev.target.closest("tr.ml-row") : null;
    if (row && (ev.key === "Enter" || ev.key === " ")) {
      ev.preventDefault();
      show(row.dataset.vector);
    }
  });
  document.addEventListener("toggle", function (ev) { drawVisible(ev.target); }, true);
  drawVisible(document);
  var m = /^#vector-(\d+)$/.exec(window.location.hash);
  if (m) { show(m[1]); }
  if (/^#latent-/.test(window.location.hash)) { openLatent(window.location.hash.slice(1)); }
})();
"""
