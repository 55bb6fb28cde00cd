"""Figures of training runs and the studies built on them: objective per step, objective
against random vectors, the radius sweep and the planted-behaviour benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from melbo_lens.perturbations.trained import Trained
from melbo_lens.views.figures.common import (
    TEMPLATE,
    esc_hover,
    finite_or_none,
    setup_line,
    unique_labels,
    vector_labels,
)

__all__ = ["objective_vs_random", "planted_benchmark", "radius_sweep", "training_curves"]


# ---------------------------------------------------------------------- training
def training_curves(
    vectors: Trained,
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
    names = vector_labels(vectors, labels)
    losses = vectors.losses.detach().double().cpu()
    steps = list(range(1, losses.shape[1] + 1))
    fig = go.Figure()
    for k, name in enumerate(names):
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[finite_or_none(v) for v in losses[k].tolist()],
                mode="lines",
                name=name,
                hovertemplate=f"{esc_hover(name)}<br>step %{{x}}<br>"
                "objective %{y:.4g}<extra></extra>",
            )
        )
    fig.update_layout(
        title=f"Training curves: objective per step<br><sup>{esc_hover(setup_line(vectors))}</sup>",
        xaxis_title="step",
        yaxis_title="objective",
        yaxis_type="log" if log_y else "linear",
        template=TEMPLATE,
        hovermode="closest",
    )
    return fig


def objective_vs_random(
    vectors: Trained,
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
    names = unique_labels(vector_labels(vectors, labels))
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
        annotation_position="top right",  # over the random box, clear of the first bar
    )
    fig.update_layout(
        title=(
            "Objective reached vs random vectors of the same norm"
            f"<br><sup>{esc_hover(setup_line(vectors))}</sup>"
        ),
        xaxis_title="vector",
        yaxis_title="objective",
        xaxis_type="category",
        template=TEMPLATE,
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
    panels = {"objective": [finite_or_none(x) for x in sweep.objective]}
    for name in ("diversity", "fluency"):
        values = getattr(sweep, name, None)
        if values is not None:
            panels[name] = [finite_or_none(x) for x in values]
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
        template=TEMPLATE,
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
                f"{esc_hover(m)}, {esc_hover(b)} ({kind})<br>"
                f"seeds with a hit: {s[f'seeds_{kind}']:.2f}"
                f"<br>eliciting vectors per seed: {s[f'vectors_{kind}']:.2f} of {k}"
                + (
                    ""
                    if kind == "partial" or finite_or_none(s["recurrence"]) is None
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
        template=TEMPLATE,
        title=(
            f"Planted behaviours elicited: {len(report.seeds())} seeds, K={k}, "
            f"R={settings.get('radius')}"
        ),
        xaxis_title="method",
        yaxis_title="fraction of seeds with a hit",
        yaxis_range=[0, 1.05],
    )
    return fig
