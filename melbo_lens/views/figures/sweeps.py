"""The grid-sweep figure: objective and diversity against R, a line per setting."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from melbo_lens.views.figures.common import TEMPLATE, esc_hover, finite_or_none

__all__ = ["sweep_grid_figure"]


def _setting(row: dict[str, Any]) -> str:
    options = ",".join(f"{k}={v}" for k, v in sorted(row.get("options", {}).items()))
    method = row["method"] + (f"({options})" if options else "")
    return f"{method} · {row['source']}→{row['target']} · {row['prompt_set']} · seed {row['seed']}"


def sweep_grid_figure(rows: Sequence[dict[str, Any]]) -> go.Figure:
    """Mean objective (log scale) and mean |cos| of target deltas against R, one line per
    (method, sites, prompt set, seed) of a sweep's result rows.

    Examples:
        >>> fig = sweep_grid_figure(run_sweep("grid.yaml", "out").rows)  # doctest: +SKIP
    """
    if not rows:
        raise ValueError("no sweep rows; run_sweep has finished no cell yet")
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("mean objective", "mean |cos| of target deltas (lower: more diverse)"),
    )
    settings: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        settings.setdefault(_setting(row), []).append(row)
    for name, group in settings.items():
        group = sorted(group, key=lambda r: r["radius"])
        x = [r["radius"] for r in group]
        hover = [
            f"{esc_hover(name)}<br>R {r['radius']:g}<br>fluency x base {r['fluency_ratio']:.3g}"
            f"<br>behaviours {esc_hover(json.dumps(r.get('behaviors', {})))}"
            for r in group
        ]
        for col, key in ((1, "objective_mean"), (2, "diversity_mean_abs_cos")):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[finite_or_none(r[key]) for r in group],
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    text=hover,
                    hovertemplate="%{text}<br>%{y:.4g}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(title_text="radius R", type="log")
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(title="Sweep over the grid", template=TEMPLATE, height=420)
    return fig
