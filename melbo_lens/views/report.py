"""The report: one self-contained HTML page per run, readable with no network at all.

A report renders a `RunAnalysis` (`melbo_lens.workflows.run_analysis`) and computes
nothing of its own; it is drawn on a `views.html_page.Page`.
Its sections: the run's config and provenance; a table of the vectors (objective
against random vectors of the same norm, top SAE features, a completion snippet) where
clicking a row opens that vector's details (its card: where its direction is present in
the corpus, its effect on next-token predictions, the latents it turns on and off, its
behaviour; completions against the unsteered ones, the token views, its SAE decomposition
and the attribution of its target-layer change); similarity of the vectors and of their
deltas; the random baseline; the feature dashboards (every latent number in the page
links to its dashboard, which opens in place); notes on any part that was skipped.

Offline by construction: plotly.js and the circuitsvis bundle are inlined once per page
(not per figure), every figure is a JSON spec drawn by a small script (figures in a
closed panel are drawn when it first opens, so they get its real width), the shared
plotly template is stored once, floats are rounded to 4 significant digits, and the page
refers to no URL but its own `#anchors`.

Why one module over ~400 lines: one function per section of one page; the page plumbing
is in `views.html_page`.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from melbo_lens.core.io import atomic_write_text
from melbo_lens.methods.defaults import describe_defaults
from melbo_lens.views.dashboards import card_html, dashboard_html, latent_anchor
from melbo_lens.views.figures import (
    attribution_bars,
    feature_heatmap,
    objective_vs_random,
    similarity_heatmap,
    token_delta_heatmap,
    training_curves,
)
from melbo_lens.views.html_page import (
    Page,
    esc_html,
    fmt_number,
    html_document,
    html_table,
    pre_block,
    round_floats,
)
from melbo_lens.views.tokens import (
    feature_activation_view,
    token_delta_view,
)
from melbo_lens.workflows.run_analysis import RunAnalysis

__all__ = ["render_report", "write_report"]

_SNIPPET = 90  # characters of completion shown in the vectors table


def render_report(run: RunAnalysis, *, title: str | None = None) -> str:
    """The report of `run` as one HTML string (no external resources).

    Examples:
        >>> html_text = render_report(RunAnalysis.load("demo_out"))   # doctest: +SKIP
    """
    page = Page()
    model = run.info.get("model") or run.vectors.model_name or "model"
    title = title or f"melbo-lens report: {len(run)} {run.vectors.method} vectors on {model}"
    body = [
        f"<header><h1>{esc_html(title)}</h1>"
        f"<p class='sub'>{esc_html(_setup_line(run))}</p>{_nav()}</header>",
        _config_section(run),
        _overview_section(run, page),
        _vectors_section(run, page),
        similarity_section(run, page),
        _baseline_section(run, page),
        _dashboards_section(run),
        _notes_section(run),
    ]
    return html_document(title, "\n".join(body), page)


def write_report(
    run: RunAnalysis, path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Render `run` and write it to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, render_report(run, title=title))


def _nav() -> str:
    links = [
        ("config", "Config"),
        ("overview", "Training"),
        ("vectors", "Vectors"),
        ("similarity", "Similarity"),
        ("baselines", "Baselines"),
        ("dashboards", "Dashboards"),
        ("notes", "Notes"),
    ]
    return "<nav>" + " · ".join(f'<a href="#{a}">{t}</a>' for a, t in links) + "</nav>"


# ---------------------------------------------------------------------- sections
def _setup_line(run: RunAnalysis) -> str:
    i = run.info
    parts = [f"{i.get('site', run.vectors.site.name)} → {i.get('target', '?')}"]
    if "radius" in i:
        parts.append(f"R = {float(i['radius']):.4g}")
    if "power" in i:
        parts.append(f"p = {float(i['power']):g}, q = {float(i.get('q', 1.0)):g}")
    parts.append(f"{i.get('n_prompts', '?')} prompts")
    if i.get("created"):
        parts.append(f"analysed {i['created']}")
    return "; ".join(parts)


def _kv(d: dict[str, Any]) -> str:
    rows = []
    for k, v in d.items():
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        if len(text) > 400:
            text = text[:400] + " …"
        rows.append((f"<code>{esc_html(k)}</code>", esc_html(text)))
    return html_table(rows, ["key", "value"], "kv")


def _config_section(run: RunAnalysis) -> str:
    v = run.vectors
    prov = {
        "method": v.method,
        "model": run.info.get("model") or v.model_name,
        "site": v.site.name,
        "target": None if v.target is None else v.target.name,
        "n_vectors": len(v),
        "d_model": v.d_model,
        "norms": [round(float(x), 4) for x in v.norms],
        "SAE": run.sae_name or "none",
    }
    if run.info.get("nearest_tokens"):  # soft prompts: each token's nearest vocabulary tokens
        prov["nearest tokens"] = [
            [" / ".join(f"{t!r} {c:.2f}" for t, c in row[:3]) for row in member]
            for member in run.info["nearest_tokens"]
        ]
    meta = v.metadata or {}
    if "solver" in meta:  # what the trainer ran ("auto" config values resolved)
        window = f"{meta['starts']} starts per vector, " if "starts" in meta else ""
        later = f" + {meta['slot_steps']} per later vector" if "slot_steps" in meta else ""
        prov["training"] = f"{window}{meta['solver']} solver, {meta['steps']} steps{later}"
    prov.update(describe_defaults(meta))  # sites, positions and R chosen by the defaults
    prompts = run.info.get("prompts") or []
    plist = "".join(f"<li>{pre_block(p)}</li>" for p in prompts)
    seconds = run.info.get("seconds") or {}
    timing = ", ".join(f"{k} {float(s):.1f} s" for k, s in seconds.items())
    return (
        '<section id="config"><h2>Run config and provenance</h2>'
        + _kv(prov)
        + "<details><summary>training config</summary>"
        + _kv(v.config or {})
        + "</details><details><summary>artifact metadata</summary>"
        + _kv(v.metadata or {})
        + f"</details><details><summary>prompts ({len(prompts)})</summary><ol>{plist}</ol>"
        + "</details>"
        + (f"<p class='small'>analysis time: {esc_html(timing)}</p>" if timing else "")
        + f"<p class='small'>melbo_lens {esc_html(run.info.get('melbo_lens', ''))}</p></section>"
    )


def _overview_section(run: RunAnalysis, page: Page) -> str:
    parts = ['<section id="overview"><h2>Training</h2>']
    if run.vectors.losses is not None and run.vectors.losses.numel():
        parts.append(page.figure(training_curves(run.vectors, labels=run.labels)))
    else:
        parts.append("<p class='note'>No training curves: these vectors record no losses.</p>")
    return "".join(parts) + "</section>"


def _top_features(run: RunAnalysis, k: int, n: int = 3) -> str:
    if run.decompositions is None:
        return "–"
    dec = run.decompositions[k]
    out = []
    for f, c in list(zip(dec.features, dec.coefficients, strict=True))[:n]:
        toks = (run.feature_tokens or {}).get(f) or []
        tip = f' title="{esc_html(", ".join(t for t, _ in toks[:5]))}"' if toks else ""
        tok = f" <span class='tok'>{esc_html(toks[0][0])}</span>" if toks else ""
        name = _latent_link(run, run.vectors.site.name, f, f"f{f}")
        out.append(f"<span class='feat'{tip}>{name} ({c:+.2f}){tok}</span>")
    return "<br>".join(out) or "–"


def _snippet(text: str) -> str:
    text = text.replace("\n", "⏎ ")
    return esc_html(text if len(text) <= _SNIPPET else text[: _SNIPPET - 1] + "…")


def _vectors_section(run: RunAnalysis, page: Page) -> str:
    gens = run.generations
    ratios = run.random_ratio()
    rows = []
    for k, label in enumerate(run.labels):
        snippet = "–"
        if gens is not None and k in gens.indices:
            snippet = _snippet(gens.for_vector(k)[0])
        cells = [
            str(k),
            esc_html(label),
            fmt_number(run.objective[k]),
            fmt_number(ratios[k], 3) + "×" if ratios else "–",
            _top_features(run, k),
            f"<span class='snip'>{snippet}</span>",
        ]
        rows.append(
            f'<tr class="ml-row" data-vector="{k}" tabindex="0" aria-controls="vector-{k}">'
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    head = ["#", "vector", "objective", "vs random mean", "top SAE features", "completion"]
    if gens is not None and gens.unsteered:
        snip = _snippet(gens.unsteered[0])
        unsteered = f"<p class='small'>unsteered: <span class='snip'>{snip}</span></p>"
    else:
        unsteered = ""
    table = (
        '<table class="vectors"><thead><tr>'
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )
    details = "".join(_detail_panel(run, k, page) for k in range(len(run)))
    return (
        '<section id="vectors"><h2>Vectors</h2>'
        "<p class='small'>Click a row to see that vector's completions, token views, SAE "
        "decomposition and attribution. Completions are on the first prompt.</p>"
        f"{unsteered}{table}"
        '<p id="ml-hint" class="note">No vector selected.</p>'
        f"{details}</section>"
    )


def _detail_panel(run: RunAnalysis, k: int, page: Page) -> str:
    label = run.labels[k]
    v = run.vectors
    parts = [
        f'<div class="ml-detail" id="vector-{k}" data-vector="{k}" hidden>',
        f"<h3>{esc_html(label)} <span class='small'>(vector {k}) · "
        "<a href='#vectors'>back to the table</a></span></h3>",
        f"<p>norm {fmt_number(float(v.norms[k]))}, objective {fmt_number(run.objective[k])}",
    ]
    below = run.random_rank()
    if below:
        parts.append(f", above {below[k]:.0%} of {len(run.random_objective)} random vectors")
    parts.append("</p>")
    if run.cards is not None:
        parts.append(card_html(run.cards[k], link=lambda hook, f: _latent_href(run, hook, f)))
    parts.append(_completions(run, k))
    parts.append("<h4>Token views</h4>")
    if run.token_deltas is not None:
        td = run.token_deltas[k]
        # colour scale without position 0: a BOS / attention-sink token often changes by
        # orders of magnitude more than the rest and would leave everything else white
        top = max(td.norms[1:], default=0.0) or None
        view = token_delta_view(replace(td, norms=round_floats(td.norms)), max_value=top)
        parts.append(page.view(view))
    else:
        parts.append("<p class='note'>No token view: there are no completions.</p>")
    acts = run.feature_activations[k] if run.feature_activations is not None else None
    if acts is not None:
        acts = replace(
            acts, steered=round_floats(acts.steered), unsteered=round_floats(acts.unsteered)
        )
        parts.append(page.view(feature_activation_view(acts)))
    parts.append(_sae_part(run, k, page))
    parts.append(_attribution_part(run, k, page))
    parts.append("</div>")
    return "".join(parts)


def _completions(run: RunAnalysis, k: int) -> str:
    gens = run.generations
    if gens is None or k not in gens.indices:
        return "<h4>Completions</h4><p class='note'>No completions for this vector.</p>"
    steered = gens.for_vector(k)
    rows = []
    for i, prompt in enumerate(gens.prompts):
        un = gens.unsteered[i] if gens.unsteered is not None else ""
        rows.append(
            (
                pre_block(prompt, "prompt"),
                pre_block(un, "unsteered"),
                pre_block(steered[i], "steered"),
            )
        )
    return "<h4>Completions</h4>" + html_table(
        rows, ["prompt", "unsteered", f"steered ({run.labels[k]})"], "completions"
    )


def _sae_part(run: RunAnalysis, k: int, page: Page) -> str:
    if run.decompositions is None:
        return "<h4>SAE decomposition</h4><p class='note'>No SAE decomposition (see Notes).</p>"
    dec = run.decompositions[k]
    toks = run.feature_tokens or {}
    coef = "cosine" if dec.method == "cosine" else "coefficient"
    rows = []
    for j, f in enumerate(dec.features):
        top = ", ".join(f"{t} ({a:.2g})" for t, a in (toks.get(f) or [])[:5])
        rows.append(
            (
                str(j + 1),
                _latent_link(run, run.vectors.site.name, f, f"f{f}"),
                fmt_number(dec.coefficients[j], 3),
                fmt_number(dec.cosines[j], 3) if j < len(dec.cosines) else "–",
                fmt_number(dec.explained_curve[j], 3) if j < len(dec.explained_curve) else "–",
                f"<span class='tok'>{esc_html(top)}</span>",
            )
        )
    table = html_table(rows, ["rank", "feature", coef, "cos", "explained", "top tokens"], "sae")
    fig = page.figure(
        feature_heatmap([dec], top=len(dec.features), feature_tokens=toks or None),
        css="height:260px",
    )
    return (
        f"<h4>SAE decomposition ({esc_html(run.sae_name or '')}, {esc_html(dec.method)})</h4>"
        f"<p class='small'>{len(dec.features)} features explain {dec.explained:.1%} of the "
        f"vector's norm².</p>{fig}<details><summary>feature table</summary>{table}</details>"
    )


def _attribution_part(run: RunAnalysis, k: int, page: Page) -> str:
    if run.attributions is None:
        return "<h4>Attribution</h4><p class='note'>No attribution.</p>"
    att = run.attributions[k]
    out = ["<h4>Attribution of the target-layer change</h4>"]
    out.append(page.figure(attribution_bars(replace(att, nodes=[]), top=12)))
    if att.nodes:
        out.append(page.figure(attribution_bars(att, top=12)))
        corr = "n/a" if att.correlation is None else f"{att.correlation:.3f}"
        out.append(
            f"<p class='small'>{esc_html(att.method)} of {esc_html(att.metric)}: m(steered) = "
            f"{fmt_number(att.metric_steered)}, m(unsteered) = {fmt_number(att.metric_unsteered)}; "
            f"{len(att.verified)} nodes verified by patching ({esc_html(att.patch_direction)}), "
            f"Pearson r = {corr}.</p>"
        )
    return "".join(out)


ORTHOGONAL_TOL = 1e-3  # |cos| below which the report calls vectors orthogonal


def similarity_section(run: RunAnalysis, page: Page) -> str:
    parts = ['<section id="similarity"><h2>Similarity</h2><div class="grid">']
    labels = run.labels
    note = ""
    shown = [(run.delta_similarity, "target deltas")]
    vec = run.vector_similarity
    if vec is not None:
        max_abs = vec.summary()["max_abs"]
        # orthogonal vectors give the identity: nothing to see, so say it instead
        if max_abs <= ORTHOGONAL_TOL:  # False for nan (a single vector)
            note = (
                f"<p class='note'>The vectors are mutually orthogonal (every |cos| ≤ "
                f"{ORTHOGONAL_TOL:g}), so their cosine matrix is the identity and is not "
                "drawn; the target deltas above show how alike their effects are.</p>"
            )
        else:
            shown.append((vec, "vectors"))
    for m, name in shown:
        if m is not None:
            fig = similarity_heatmap(
                m, title=f"cosine similarity of {name}", row_labels=labels, col_labels=labels
            )
            parts.append(page.figure(fig))
    parts.append("</div>" + note)
    if run.token_deltas is not None:
        parts.append(page.figure(token_delta_heatmap(run.token_deltas)))
    if run.decompositions is not None:
        fig = feature_heatmap(run.decompositions, top=5, feature_tokens=run.feature_tokens)
        parts.append(page.figure(fig))
    return "".join(parts) + "</section>"


def _baseline_section(run: RunAnalysis, page: Page) -> str:
    parts = ['<section id="baselines"><h2>Baselines</h2>']
    if not run.random_objective:
        return "".join(parts) + "<p class='note'>No random baseline.</p></section>"
    s = run.random_summary()
    kind = (
        "vectors of the same norm"
        if hasattr(run.vectors, "vectors")
        else ("adapters of the same layer, rank and radius")
    )
    parts.append(
        f"<p>{int(s['n'])} random {kind} at {esc_html(run.vectors.site.name)} "
        f"(seed {esc_html(run.info.get('random_seed', '?'))}), same objective and prompts: mean "
        f"{fmt_number(s['mean'])}, std {fmt_number(s['std'])}, max {fmt_number(s['max'])}.</p>"
    )
    parts.append(
        page.figure(
            objective_vs_random(run.scored_vectors, run.random_objective, labels=run.labels)
        )
    )
    return "".join(parts) + "</section>"


def _latent_href(run: RunAnalysis, hook: str | None, latent: int) -> str | None:
    """`#anchor` of a latent's dashboard in this report, or None when it has none."""
    dash = (run.dashboards or {}).get(hook or "")
    return "#" + latent_anchor(hook, latent) if dash is not None and latent in dash else None


def _latent_link(run: RunAnalysis, hook: str, latent: int, text: str) -> str:
    href = _latent_href(run, hook, latent)
    return f"<a class='latent-link' href='{href}'>{esc_html(text)}</a>" if href else esc_html(text)


def _dashboards_section(run: RunAnalysis) -> str:
    parts = ['<section id="dashboards"><h2>Feature dashboards</h2>']
    if not run.dashboards:
        parts.append("<p class='note'>No dashboards (no SAE or no tokenizer; see Notes).</p>")
    for hook, dash in (run.dashboards or {}).items():
        parts.append(
            f"<h3>{esc_html(hook)}</h3><p class='small'>{len(dash)} latents over "
            f"{dash.n_tokens:,} tokens of {esc_html(dash.info.get('corpus', '?'))}; click a latent "
            "number anywhere in the report to open its dashboard.</p>"
        )
        parts.extend(
            dashboard_html(dash[f], hook, link=lambda f, h=hook: _latent_href(run, h, f))
            for f in dash.latents
        )
    return "".join(parts) + "</section>"


def _notes_section(run: RunAnalysis) -> str:
    notes = "".join(f"<li>{esc_html(n)}</li>" for n in run.notes) or "<li>none</li>"
    return f'<section id="notes"><h2>Notes</h2><ul>{notes}</ul></section>'
