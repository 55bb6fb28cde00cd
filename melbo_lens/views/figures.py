"""Plotly figures of melbo_lens results: each a function from result objects to a Figure.

A figure here renders numbers that analysis code already computed; it computes nothing
beyond picking, ordering and formatting them (the largest features, a mean line). Every
figure has a title, axis titles and hover text that names what is under the cursor, so
it can be read without the code that made it:

* `training_curves`: the MELBO objective per step, one line per vector;
* `objective_vs_random`: each vector's objective against random vectors of the same norm;
* `radius_sweep`: objective (and diversity / fluency) against the radius R;
* `feature_heatmap`: vectors × SAE features, with each feature's top-activating tokens;
* `similarity_heatmap`: a `CosineMatrix` (of vectors or of their target deltas);
* `attribution_bars`: attribution estimates against patched effects, per node;
* `token_delta_heatmap`: ‖Δ_t‖ per vector and token, prompt / completion boundary marked.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from melbo_lens.analysis.attribution import DeltaAttribution
from melbo_lens.analysis.similarity import CosineMatrix
from melbo_lens.analysis.tokens import TokenDeltas
from melbo_lens.perturbations.adapters import SteeringAdapters
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = [
    "attribution_bars",
    "feature_heatmap",
    "objective_vs_random",
    "planted_benchmark",
    "radius_sweep",
    "similarity_heatmap",
    "token_delta_heatmap",
    "training_curves",
]

_DIVERGING = "RdBu_r"  # negative blue, zero white, positive red
_TEMPLATE = "plotly_white"


def _num(x: Any) -> float | None:
    """A finite float, or None (a gap in plotly) for None / NaN / inf."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _esc(text: Any) -> str:
    """Text safe inside plotly hover labels (which render a subset of HTML)."""
    return html.escape(str(text)).replace("\n", "⏎")


def _vector_labels(
    vectors: SteeringVectors | SteeringAdapters, labels: Sequence[str] | None
) -> list[str]:
    n = len(vectors)
    if labels is None:
        meta = vectors.metadata.get("labels") if isinstance(vectors.metadata, dict) else None
        if isinstance(meta, list | tuple) and len(meta) == n:
            labels = meta
        else:
            return [f"{vectors.method}[{k}]" for k in range(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} vectors; pass one label per vector")
    return [str(x) for x in labels]


def _unique(labels: Sequence[str]) -> list[str]:
    """Row labels made unique (plotly merges equal category labels into one row)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _setup(vectors: SteeringVectors | SteeringAdapters) -> str:
    """One line saying where and how the vectors were made."""
    cfg = vectors.config or {}
    parts = [vectors.site.name + (f" → {vectors.target.name}" if vectors.target else "")]
    if "radius" in cfg:
        parts.append(f"R={float(cfg['radius']):g}")
    if "power" in cfg:
        parts.append(f"p={float(cfg['power']):g}")
    if "q" in cfg:
        parts.append(f"q={float(cfg['q']):g}")
    return ", ".join(parts)


# ---------------------------------------------------------------------- training
def training_curves(
    vectors: SteeringVectors | SteeringAdapters,
    *,
    log_y: bool = False,
    labels: Sequence[str] | None = None,
) -> go.Figure:
    """The objective per training step (`vectors.losses`), one line per vector.

    Steps not run (NaN, e.g. an interrupted run) are left as gaps.

    Examples:
        >>> fig = training_curves(SteeringVectors.load("run/vectors.safetensors"))  # doctest: +SKIP
        >>> fig.write_html("curves.html")                                          # doctest: +SKIP
    """
    if vectors.losses is None:
        raise ValueError(
            "the vectors carry no training record (losses is None); training_curves needs "
            "vectors made by a trainer such as train_steering_vectors"
        )
    names = _vector_labels(vectors, labels)
    losses = vectors.losses.detach().double().cpu()
    steps = list(range(1, losses.shape[1] + 1))
    fig = go.Figure()
    for k, name in enumerate(names):
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[_num(v) for v in losses[k].tolist()],
                mode="lines",
                name=name,
                hovertemplate=f"{_esc(name)}<br>step %{{x}}<br>objective %{{y:.4g}}<extra></extra>",
            )
        )
    fig.update_layout(
        title=f"Training curves: objective per step<br><sup>{_esc(_setup(vectors))}</sup>",
        xaxis_title="step",
        yaxis_title="objective",
        yaxis_type="log" if log_y else "linear",
        template=_TEMPLATE,
        hovermode="closest",
    )
    return fig


def objective_vs_random(
    vectors: SteeringVectors | SteeringAdapters,
    random_objectives: Sequence[float],
    *,
    labels: Sequence[str] | None = None,
) -> go.Figure:
    """Each vector's final objective (bars) against random vectors of the same norm
    (box with every point, and a dashed line at their mean).

    Hover on a bar gives the objective and its ratio to the random mean.

    Examples:
        >>> rand = random_vectors(model, vectors.site, n=32, radius=4.0)          # doctest: +SKIP
        >>> objective_vs_random(vectors, random_objs)                              # doctest: +SKIP
    """
    if vectors.objective is None:
        raise ValueError(
            "the vectors carry no final objective (objective is None); train them with "
            "train_steering_vectors or compute the objective first"
        )
    rand = [float(x) for x in random_objectives]
    if not rand:
        raise ValueError("random_objectives is empty; pass the objectives of random vectors")
    names = _unique(_vector_labels(vectors, labels))
    objective = [float(x) for x in vectors.objective.detach().double().cpu().tolist()]
    mean = sum(rand) / len(rand)
    ratio = [x / mean if mean else float("nan") for x in objective]
    random_name = f"random (n={len(rand)})"
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=names,
            y=objective,
            name="learned vectors",
            customdata=ratio,
            hovertemplate=(
                "%{x}<br>objective %{y:.4g}<br>%{customdata:.2f} × random mean<extra></extra>"
            ),
        )
    )
    fig.add_trace(
        go.Box(
            x=[random_name] * len(rand),
            y=rand,
            name=random_name,
            boxpoints="all",
            jitter=0.4,
            pointpos=0,
            hovertemplate="random vector<br>objective %{y:.4g}<extra></extra>",
        )
    )
    fig.add_hline(
        y=mean,
        line_dash="dash",
        line_color="gray",
        annotation_text=f"random mean {mean:.4g}",
        annotation_position="top left",
    )
    fig.update_layout(
        title=(
            "Objective reached vs random vectors of the same norm"
            f"<br><sup>{_esc(_setup(vectors))}</sup>"
        ),
        xaxis_title="vector",
        yaxis_title="objective",
        xaxis_type="category",
        template=_TEMPLATE,
        showlegend=True,
    )
    return fig


def radius_sweep(sweep: Any) -> go.Figure:
    """Objective, diversity and fluency against the radius R, one panel each (shared log x).

    `sweep` has `radii` and `objective` (lists of equal length) and may have `diversity`,
    `fluency` (lists or None; fluency = median perplexity, drawn on a log axis) and
    `recommended` (a radius, or None), drawn as a dashed vertical line through every panel.
    Separate panels because the three live on unrelated scales (objective ~1e5-1e8,
    diversity in [0, 2], perplexity from ~2 to hundreds).

    Examples:
        >>> radius_sweep(select_radius(model, prompts, config, [4, 8, 16]))  # doctest: +SKIP
    """
    radii = [float(r) for r in sweep.radii]
    panels = {"objective": [_num(x) for x in sweep.objective]}
    for name in ("diversity", "fluency"):
        values = getattr(sweep, name, None)
        if values is not None:
            panels[name] = [_num(x) for x in values]
    for name, values in panels.items():
        if len(values) != len(radii):
            raise ValueError(f"{len(radii)} radii but {len(values)} {name} values")
    titles = {
        "objective": "objective",
        "diversity": "diversity",
        "fluency": "median perplexity",
    }
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.06)
    for row, (name, values) in enumerate(panels.items(), start=1):
        fig.add_trace(
            go.Scatter(
                x=radii,
                y=values,
                mode="lines+markers",
                name=name,
                hovertemplate=f"R %{{x:.4g}}<br>{titles[name]} %{{y:.4g}}<extra></extra>",
            ),
            row=row,
            col=1,
        )
        fig.update_yaxes(title_text=titles[name], row=row, col=1)
    if "fluency" in panels:
        fig.update_yaxes(type="log", row=list(panels).index("fluency") + 1, col=1)
    recommended = getattr(sweep, "recommended", None)
    if recommended is not None:
        r = float(recommended)
        finite = [y for y in panels["objective"] if y is not None] or [0.0]
        fig.add_trace(
            go.Scatter(
                x=[r, r],
                y=[min(0.0, min(finite)), max(finite)],
                mode="lines",
                name=f"recommended R = {r:.4g}",
                line={"dash": "dash", "color": "black"},
                hovertemplate=f"recommended R = {r:.4g}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        for row in range(2, len(panels) + 1):
            fig.add_vline(x=r, line_dash="dash", line_color="black", row=row, col=1)  # pyright: ignore[reportArgumentType]
    log_x = bool(radii) and all(r > 0 for r in radii)
    fig.update_xaxes(type="log" if log_x else "linear")
    fig.update_xaxes(title_text="radius R", row=len(panels), col=1)
    fig.update_layout(
        title="Objective, diversity and fluency against radius R",
        template=_TEMPLATE,
        height=260 + 170 * len(panels),
    )
    return fig


def planted_benchmark(report: Any) -> go.Figure:
    """Planted-behaviour benchmark: per method and behaviour, the fraction of seeds in
    which at least one of the K vectors elicits the phrase (full bars) or one of its words
    (partial, hatched), from `PlantedReport.summary()`.

    Hover shows the mean number of eliciting vectors per seed and how often an eliciting
    vector's phrase recurs on held-out prompts.

    Examples:
        >>> planted_benchmark(evaluate_planted(model))  # doctest: +SKIP
    """
    summary = report.summary()
    methods = list(summary)
    behaviours = list(report.behaviours)
    if not methods or not behaviours:
        raise ValueError("the report has no runs; run evaluate_planted first")
    k = report.settings.get("n_vectors", "?")
    fig = go.Figure()
    for b in behaviours:
        for kind, pattern in (("full", ""), ("partial", "/")):
            stats = [summary[m][b] for m in methods]
            hover = [
                f"{_esc(m)}, {_esc(b)} ({kind})<br>seeds with a hit: {s[f'seeds_{kind}']:.2f}"
                f"<br>eliciting vectors per seed: {s[f'vectors_{kind}']:.2f} of {k}"
                + (
                    ""
                    if kind == "partial" or _num(s["recurrence"]) is None
                    else f"<br>recurs on held-out prompts: {s['recurrence']:.2f}"
                )
                for m, s in zip(methods, stats, strict=True)
            ]
            fig.add_trace(
                go.Bar(
                    x=methods,
                    y=[s[f"seeds_{kind}"] for s in stats],
                    name=f"{b} ({kind})",
                    marker_pattern_shape=pattern,
                    hovertext=hover,
                    hoverinfo="text",
                )
            )
    settings = report.settings
    fig.update_layout(
        barmode="group",
        template=_TEMPLATE,
        title=(
            f"Planted behaviours elicited: {len(report.seeds())} seeds, K={k}, "
            f"R={settings.get('radius')}"
        ),
        xaxis_title="method",
        yaxis_title="fraction of seeds with a hit",
        yaxis_range=[0, 1.05],
    )
    return fig


# ---------------------------------------------------------------------- features
def _token_hover(tokens: Sequence[tuple[str, float]] | None, limit: int = 5) -> str:
    if not tokens:
        return "top tokens: (none known)"
    rows = [f"{_esc(t)} ({float(v):.3g})" for t, v in list(tokens)[:limit]]
    return "top tokens:<br>  " + "<br>  ".join(rows)


def feature_heatmap(
    decompositions: Sequence[Any],
    *,
    top: int = 10,
    value: Literal["cosine", "coefficient"] = "cosine",
    feature_tokens: Mapping[int, Sequence[tuple[str, float]]] | None = None,
) -> go.Figure:
    """Vectors (rows, `decomposition.label`) × SAE features (columns).

    Columns are the union of each decomposition's `top` first features, in order of
    first appearance; a cell is the feature's cosine with the vector or its coefficient
    (`value`), blank where the feature is not among that vector's features. Hover shows
    the feature id, the value and, from `feature_tokens` (see `top_activating_tokens`),
    the tokens it fires on most.

    Examples:
        >>> decs = [decompose_onto_sae(vectors, sae, index=i)
        ...         for i in range(len(vectors))]                          # doctest: +SKIP
        >>> feats = sorted({f for d in decs for f in d.features[:10]})     # doctest: +SKIP
        >>> feature_heatmap(decs, feature_tokens=top_activating_tokens(
        ...     model, sae, texts, feats))                                 # doctest: +SKIP
    """
    if value not in ("cosine", "coefficient"):
        raise ValueError(f"value must be 'cosine' or 'coefficient', got {value!r}")
    if not decompositions:
        raise ValueError("no decompositions given; pass one SaeDecomposition per vector")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    columns: list[int] = []
    for dec in decompositions:
        for f in dec.features[:top]:
            if f not in columns:
                columns.append(int(f))
    rows = _unique([str(d.label) for d in decompositions])
    feature_tokens = feature_tokens or {}
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    for row, dec in zip(rows, decompositions, strict=True):
        values = dec.cosines if value == "cosine" else dec.coefficients
        lookup = dict(zip(dec.features, values, strict=False))
        z.append([_num(lookup.get(f)) for f in columns])
        text.append(
            [
                f"{_esc(row)}<br>feature {f}<br>"
                + (f"{value} {lookup[f]:.4g}" if f in lookup else f"{value}: not in its features")
                + "<br>"
                + _token_hover(feature_tokens.get(f))
                for f in columns
            ]
        )
    bound = max((abs(v) for r in z for v in r if v is not None), default=1.0) or 1.0
    if value == "cosine":
        bound = min(bound, 1.0)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(f) for f in columns],
            y=rows,
            text=text,
            hovertemplate="%{text}<extra></extra>",
            colorscale=_DIVERGING,
            zmin=-bound,
            zmax=bound,
            zmid=0,
            colorbar={"title": value},
            hoverongaps=False,
        )
    )
    method = {d.method for d in decompositions}
    fig.update_layout(
        title=f"SAE features of each vector ({value}, {'/'.join(sorted(method))} decomposition)",
        xaxis_title="SAE feature",
        yaxis_title="vector",
        xaxis_type="category",
        yaxis_type="category",
        yaxis_autorange="reversed",
        template=_TEMPLATE,
    )
    return fig


# ---------------------------------------------------------------------- similarity
def similarity_heatmap(
    matrix: CosineMatrix,
    *,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> go.Figure:
    """`matrix.values[i, j]` as a heatmap, rows A, columns B, colour scale fixed to [-1, 1].

    Works for vector cosines (`cosine_matrix`) and target-delta cosines
    (`delta_similarity`) alike; `matrix.kind` goes into the default title.

    Examples:
        >>> similarity_heatmap(cosine_matrix(vectors))  # doctest: +SKIP
    """
    values = matrix.values.detach().double().cpu()
    n_a, n_b = values.shape
    rows = _unique(row_labels if row_labels is not None else [f"{i}" for i in range(n_a)])
    cols = _unique(col_labels if col_labels is not None else [f"{j}" for j in range(n_b)])
    if len(rows) != n_a or len(cols) != n_b:
        raise ValueError(f"labels ({len(rows)} rows, {len(cols)} columns) for a {n_a}×{n_b} matrix")
    a, b = _esc(matrix.a_label), _esc(matrix.b_label)
    fig = go.Figure(
        go.Heatmap(
            z=[[_num(x) for x in row] for row in values.tolist()],
            x=cols,
            y=rows,
            colorscale=_DIVERGING,
            zmin=-1.0,
            zmax=1.0,
            zmid=0.0,
            colorbar={"title": "cos"},
            hovertemplate=f"{a} %{{y}}<br>{b} %{{x}}<br>cos %{{z:.3f}}<extra></extra>",
        )
    )
    s = matrix.summary()
    default = (
        f"Cosine similarity of {_esc(matrix.kind)}: {a} vs {b} "
        f"(mean |cos| {s['mean_abs']:.3f}"
        + (f", random ≈ {s['random_mean_abs']:.3f}" if "random_mean_abs" in s else "")
        + ")"
    )
    fig.update_layout(
        title=title if title is not None else default,
        xaxis_title=b,
        yaxis_title=a,
        xaxis_type="category",
        yaxis_type="category",
        yaxis_autorange="reversed",
        template=_TEMPLATE,
    )
    if matrix.same:
        fig.update_layout(yaxis_scaleanchor="x")
    return fig


# ---------------------------------------------------------------------- attribution
def attribution_bars(attribution: DeltaAttribution, *, top: int = 20) -> go.Figure:
    """The `top` nodes by |estimate|: estimated effect beside the patched (actual) one.

    With no nodes (method "exact"), the components of the exact decomposition instead:
    each one's share ⟨c, Δ⟩ / Σ_t ||Δ_t||² of the target change.

    Examples:
        >>> att = attribute_target_delta(model, prompts, vectors, 0,
        ...                              method="integrated_gradients")   # doctest: +SKIP
        >>> attribution_bars(att, top=15)                                  # doctest: +SKIP
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    fig = go.Figure()
    if attribution.nodes:
        nodes = sorted(attribution.nodes, key=lambda n: -abs(n.estimate))[:top]
        names = _unique([n.name for n in nodes])
        kinds = [n.kind for n in nodes]
        fig.add_trace(
            go.Bar(
                y=names,
                x=[_num(n.estimate) for n in nodes],
                orientation="h",
                name=f"estimate ({attribution.method})",
                customdata=kinds,
                hovertemplate="%{y} (%{customdata})<br>estimate %{x:.4g}<extra></extra>",
            )
        )
        fig.add_trace(
            go.Bar(
                y=names,
                x=[_num(n.actual) for n in nodes],
                orientation="h",
                name="patched (actual)",
                customdata=kinds,
                hovertemplate="%{y} (%{customdata})<br>patched effect %{x:.4g}<extra></extra>",
            )
        )
        corr = attribution.correlation
        note = f", r = {corr:.3f}" if corr is not None and math.isfinite(corr) else ""
        title = f"Attribution of {_esc(attribution.metric)}: estimate vs patching{note}"
        x_title = f"effect on {attribution.metric} (steered − node set to unsteered)"
    else:
        dec = attribution.decomposition
        contrib = dec.contributions().double().cpu()
        total = float(contrib.sum())
        order = contrib.abs().argsort(descending=True)[:top].tolist()
        names = _unique([dec.names[i] for i in order])
        share = [float(contrib[i]) / total if total else None for i in order]
        fig.add_trace(
            go.Bar(
                y=names,
                x=share,
                orientation="h",
                name="share of Σ‖Δ‖²",
                customdata=[[dec.kinds[i], float(contrib[i])] for i in order],
                hovertemplate=(
                    "%{y} (%{customdata[0]})<br>share %{x:.1%}<br>⟨c, Δ⟩ %{customdata[1]:.4g}"
                    "<extra></extra>"
                ),
            )
        )
        title = (
            f"Exact decomposition of Δ {dec.source.name} → {dec.target.name} "
            f"(Σ‖Δ_t‖² = {total:.4g})"
        )
        x_title = "share of Σ_t ‖Δ_t‖²"
    fig.update_layout(
        title=title,
        xaxis_title=x_title,
        yaxis_title="node",
        yaxis_type="category",
        yaxis_autorange="reversed",
        barmode="group",
        template=_TEMPLATE,
        height=max(350, 28 * len(names) + 150),
    )
    return fig


# ---------------------------------------------------------------------- tokens
def token_delta_heatmap(deltas: Sequence[TokenDeltas]) -> go.Figure:
    """‖Δ_t‖ per vector (rows) and token position (columns).

    Shorter sequences are padded with blanks. A column's tick label is its token when
    every row has that token there (the shared prompt), else its position; hover shows
    each row's own token. A black bar marks where each row's completion starts.

    Examples:
        >>> token_delta_heatmap(token_delta_norms(model, vectors, gens))  # doctest: +SKIP
    """
    if not deltas:
        raise ValueError("no TokenDeltas given; pass the list token_delta_norms returns")
    width = max(len(d.tokens) for d in deltas)
    rows = _unique([d.label for d in deltas])
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    for row, d in zip(rows, deltas, strict=True):
        pad = width - len(d.tokens)
        z.append([_num(x) for x in d.norms] + [None] * pad)
        text.append(
            [
                f"{_esc(row)}<br>position {t} ({'prompt' if t < d.n_prompt else 'completion'}"
                f"{'' if d.steered[t] else ', not steered'})<br>token {_esc(repr(d.tokens[t]))}"
                f"<br>‖Δ‖ {d.norms[t]:.4g}"
                for t in range(len(d.tokens))
            ]
            + [""] * pad
        )
    ticks = []
    for t in range(width):
        here = {d.tokens[t] if t < len(d.tokens) else None for d in deltas}
        shared = len(here) == 1 and None not in here
        ticks.append(_esc(here.pop()) if shared else str(t))
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(width)),
            y=rows,
            text=text,
            hovertemplate="%{text}<extra></extra>",
            colorscale="Viridis",
            zmin=0,
            colorbar={"title": "‖Δ_t‖"},
            hoverongaps=False,
        )
    )
    for i, d in enumerate(deltas):
        if 0 < d.n_prompt < len(d.tokens):
            fig.add_shape(
                type="line",
                x0=d.n_prompt - 0.5,
                x1=d.n_prompt - 0.5,
                y0=i - 0.5,
                y1=i + 0.5,
                line={"color": "black", "width": 3},
            )
    sites = {d.site for d in deltas}
    fig.update_layout(
        title=(
            f"Per-token change ‖Δ_t‖ at {_esc(', '.join(sorted(sites)))} "
            "(bar: start of the completion)"
        ),
        xaxis={
            "title": "token",
            "tickmode": "array",
            "tickvals": list(range(width)),
            "ticktext": ticks,
            "tickangle": -60,
        },
        yaxis_title="vector",
        yaxis_type="category",
        yaxis_autorange="reversed",
        template=_TEMPLATE,
    )
    return fig
