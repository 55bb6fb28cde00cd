"""Feature dashboards and vector cards as offline HTML.

A dashboard (`dashboard_html`) is laid out as SAEDashboard / sae_vis lay out a feature:
a header with firing density and activation range, the activation histogram, the logit
effects (promoted and suppressed tokens, with their histogram), correlated latents, then
the top activations and the quantile bands, each a line of corpus tokens with the active
token highlighted in the circuitsvis style (background by activation, value on hover).
A card (`card_html`) asks the same of a perturbation member. Everything is plain HTML
and inline SVG: no script, no network. `dashboards_page` wraps them in one document;
`latent_anchor` is the id each dashboard has, so a report can link to it.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from melbo_lens.analysis.streaming import Context
from melbo_lens.core.io import atomic_write_text

__all__ = [
    "CSS",
    "card_html",
    "dashboard_html",
    "dashboards_page",
    "latent_anchor",
    "write_dashboards_page",
]


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def latent_anchor(hook: str | None, latent: int) -> str:
    """The element id of a latent's dashboard: ``latent-<hook with dashes>-<n>``.

    Examples:
        >>> latent_anchor("blocks.7.hook_resid_post", 12)
        'latent-blocks-7-hook_resid_post-12'
    """
    return f"latent-{(hook or 'sae').replace('.', '-')}-{int(latent)}"


def _tok(s: str) -> str:
    return _e(s.replace("\n", "⏎").replace("\t", "⇥")) or "&nbsp;"


def _context_line(ctx: Any, top: float) -> str:
    """One context (a `Context` or its dict): left tokens, the highlighted token, right
    tokens (circuitsvis style: background by activation, the value on hover)."""
    if isinstance(ctx, dict):
        ctx = Context(**ctx)
    value = float(ctx.value)
    alpha = 0.15 + 0.85 * min(1.0, max(0.0, value / top)) if top > 0 else 0.5
    left, right = _tok("".join(ctx.left)), _tok("".join(ctx.right))
    hit = (
        f"<span class='t hit' style='background:rgba(255,112,0,{alpha:.2f})' "
        f"title='{value:.4g}'>{_tok(ctx.token)}</span>"
    )
    return f"<div class='ctx'><span class='v'>{value:.3g}</span>{left}{hit}{right}</div>"


def _bars(counts: Sequence[int], labels: Sequence[str], color: str, width: int = 280) -> str:
    """A small inline-SVG bar chart: one path for all bars, the bins' range on hover."""
    if not counts or not any(counts):
        return "<p class='small'>no data</p>"
    top = max(counts)
    w = width / len(counts)
    d = "".join(
        f"M{i * w:.0f} 60v{-58 * c / top:.1f}h{max(w - 1, 1):.0f}v{58 * c / top:.1f}z"
        for i, c in enumerate(counts)
        if c
    )
    tip = f"{labels[0].split('–')[0]} … {labels[-1].split('–')[-1]}; max {top}"
    return (
        f"<svg class='hist' width='{width}' height='62' role='img'><title>{_e(tip)}</title>"
        f"<path d='{d}' fill='{color}'/></svg>"
    )


def _token_values(items: Iterable[tuple[str, float]], cls: str) -> str:
    return "".join(
        f"<span class='lt {cls}'><code>{_tok(t)}</code> {v:+.3g}</span>" for t, v in items
    )


def dashboard_html(
    d: Any, hook: str | None = None, *, link: Any = None, n_top: int = 10, per_band: int = 3
) -> str:
    """One latent's dashboard (`FeatureDashboard`) as an HTML fragment with its anchor id:
    `n_top` top activations and `per_band` contexts per quantile band.

    `link(latent) -> str | None` gives hrefs for correlated latents (default: anchors)."""
    link = link or (lambda f: "#" + latent_anchor(hook, f))
    top = d.max_activation
    hist_counts = [c for _, _, c in d.histogram]
    hist_labels = [f"{lo:.3g}–{hi:.3g}" for lo, hi, _ in d.histogram]
    lo, hi, lcounts = d.logit_histogram
    step = (hi - lo) / max(len(lcounts), 1)
    llabels = [f"{lo + i * step:.3g}–{lo + (i + 1) * step:.3g}" for i in range(len(lcounts))]
    corr = ", ".join(
        f"<a href='{_e(link(f))}'>#{f}</a> ({r:.2f})" if link(f) else f"#{f} ({r:.2f})"
        for f, r in d.correlated_features
    )
    tops = (
        "".join(_context_line(c, top) for c in d.top_activations)
        or "<p class='small'>never active</p>"
    )
    bands = "".join(
        f"<h5>{_e(label)}</h5>" + "".join(_context_line(c, top) for c in ctxs[:per_band])
        for label, ctxs in d.quantile_bands
    )
    return (
        f"<details class='dash' id='{latent_anchor(hook, d.latent)}'>"
        f"<summary><b>latent {d.latent}</b> <span class='small'>{_e(hook or '')} · density "
        f"{d.frac_nonzero:.3%} · max {d.max_activation:.3g} · mean when active "
        f"{d.mean_activation:.3g}</span> {_summary_tokens(d)}</summary>"
        "<div class='cols'><div>"
        "<h5>activations (active tokens, log bins)</h5>"
        f"{_bars(hist_counts, hist_labels, '#fb8c00')}"
        f"<h5>logit effects (decoder direction through the unembedding)</h5>"
        f"{_bars(lcounts, llabels, '#5c6bc0')}"
        f"<div class='lts'>{_token_values(d.logits_top, 'pos')}</div>"
        f"<div class='lts'>{_token_values(d.logits_bottom, 'neg')}</div>"
        f"<h5>correlated latents</h5><p class='small'>{corr or 'none'}</p>"
        f"</div><div><h5>top activations</h5>{tops}{bands}</div></div></details>"
    )


def _summary_tokens(d: Any) -> str:
    if not d.top_activations:
        return ""
    c = d.top_activations[0]
    return f"<span class='tok'>…{_tok(''.join(c.left[-4:]))}<b>{_tok(c.token)}</b></span>"


def card_html(card: Any, *, link: Any = None) -> str:
    """A perturbation member's card (`PerturbationCard`) as an HTML fragment.

    `link(hook, latent) -> str | None` gives each latent's dashboard href."""
    link = link or (lambda hook, f: "#" + latent_anchor(hook, f))
    top = max((float(c["value"]) for c in card.contexts), default=0.0)
    ctxs = "".join(_context_line(c, top) for c in card.contexts) or (
        "<p class='small'>" + _e("; ".join(card.notes) or "no contexts") + "</p>"
    )

    def latents(items: Sequence[tuple[int, float]]) -> str:
        out = []
        for f, v in items:
            href = link(card.sae_hook, f)
            name = f"<a href='{_e(href)}' class='latent-link'>#{f}</a>" if href else f"#{f}"
            out.append(f"<span class='lt'>{name} {v:+.3g}</span>")
        return "".join(out) or "<span class='small'>none</span>"

    comps = "".join(
        f"<tr><td><pre>{_e(p)}</pre></td><td><pre>{_e(t)}</pre></td></tr>"
        for p, t in card.completions
    )
    kl = "" if card.kl is None else f" · mean KL {card.kl:.3g} nats"
    return (
        f"<div class='card' id='card-{card.index}'><h4>Card: {_e(card.label)} "
        f"<span class='small'>({_e(card.site)}{kl})</span></h4>"
        "<div class='cols'><div>"
        "<h5>(b) next-token effect on corpus text (mean Δ log p; ranked by mean Δ p)</h5>"
        f"<div class='lts'>{_token_values([t[:2] for t in card.promoted], 'pos')}</div>"
        f"<div class='lts'>{_token_values([t[:2] for t in card.suppressed], 'neg')}</div>"
        f"<h5>(c) latents at {_e(card.sae_hook or 'no SAE')} switched on / off</h5>"
        f"<div class='lts'>{latents(card.latents_on)}</div>"
        f"<div class='lts'>{latents(card.latents_off)}</div>"
        f"<h5>(d) behaviour: {_e(card.behavior or '–')}</h5>"
        + (f"<table class='completions'>{comps}</table>" if comps else "")
        + f"</div><div><h5>(a) where its direction is present at the source</h5>{ctxs}</div>"
        "</div></div>"
    )


CSS = """
pre{white-space:pre-wrap;word-break:break-word;margin:0}
.dash,.card{border:1px solid #d0d7de;border-radius:6px;padding:4px 10px;margin:6px 0}
.dash summary{cursor:pointer}.cols{display:grid;grid-template-columns:320px 1fr;gap:14px}
.ctx{font:12px/1.7 ui-monospace,monospace;white-space:nowrap;overflow:hidden;
text-overflow:ellipsis}.ctx .v{display:inline-block;width:46px;color:#57606a}
.t{border-radius:2px;padding:0 1px}.t.hit{font-weight:600;outline:1px solid #e65100}
.lt{display:inline-block;margin:1px 6px 1px 0;font-size:12px}.lt.pos code{color:#0a3069}
.lt.neg code{color:#82071e}h5{margin:10px 0 3px;font-size:12px;color:#57606a}
.hist{background:#fafbfc;border:1px solid #eee}
"""


def dashboards_page(
    dashboards: Any = (), cards: Sequence[Any] = (), *, title: str = "melbo-lens dashboards"
) -> str:
    """One offline HTML document: the given cards, then every latent's dashboard."""
    hooks = dashboards if isinstance(dashboards, dict) else {None: dashboards} if dashboards else {}
    body = [f"<h1>{_e(title)}</h1>"]
    if cards:
        body.append("<h2>Cards</h2>" + "".join(card_html(c) for c in cards))
    for hook, dash in hooks.items():
        h = hook or dash.info.get("sae_hook")
        body.append(
            f"<h2>Dashboards: {_e(h)} ({len(dash)} latents, {dash.n_tokens:,} tokens of "
            f"{_e(dash.info.get('corpus', '?'))})</h2>"
        )
        body.extend(dashboard_html(dash[f], h) for f in dash.latents)
    script = (
        "<script>document.addEventListener('click',function(e){var a=e.target.closest&&"
        "e.target.closest('a[href^=\"#latent-\"]');if(!a)return;var d=document.getElementById("
        "a.getAttribute('href').slice(1));if(d){d.open=true;}});"
        "var h=location.hash&&document.getElementById(location.hash.slice(1));"
        "if(h)h.open=true;</script>"
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>body{{font:14px/1.45 system-ui,sans-serif;"
        f"max-width:1200px;margin:0 auto;padding:0 16px}}{CSS}</style></head><body>"
        + "".join(body)
        + script
        + "</body></html>"
    )


def write_dashboards_page(
    path: str | os.PathLike[str], dashboards: Any = (), cards: Sequence[Any] = (), **kw: Any
) -> Path:
    """`dashboards_page(...)` written atomically to `path`."""
    return atomic_write_text(path, dashboards_page(dashboards, cards, **kw))
