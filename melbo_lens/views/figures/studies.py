"""Figures of the studies on the backdoored model, drawn from their JSON results."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from melbo_lens.views.figures.common import TEMPLATE

__all__ = ["fragility_figure"]


def fragility_figure(result: dict[str, Any]) -> go.Figure:
    """Success rate against soft-prompt length m (left) and vector norm R (right), one
    line per model and behaviour (`workflows.fragility_study`).

    Examples:
        >>> r = {"rows": [{"model": "clean", "behaviour": "hate", "kind": "vector", "size": 4,
        ...                "rate": 0.5}], "settings": {"n_heldout": 32}}
        >>> len(fragility_figure(r).data)
        1
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("soft prompt: m tokens", "vector: R"))
    rows = result["rows"]
    for col, kind in ((1, "soft prompt"), (2, "vector")):
        keys = dict.fromkeys((r["model"], r["behaviour"]) for r in rows if r["kind"] == kind)
        for model, behaviour in keys:
            pts = sorted(
                (r["size"], r["rate"])
                for r in rows
                if (r["model"], r["behaviour"], r["kind"]) == (model, behaviour, kind)
            )
            fig.add_trace(
                go.Scatter(
                    x=[p[0] for p in pts],
                    y=[p[1] for p in pts],
                    mode="lines+markers",
                    name=f"{model}: {behaviour}",
                    line={"dash": "solid" if "backdoor" in model else "dot"},
                    legendgroup=f"{model}{behaviour}",
                    showlegend=col == 1,
                    hovertemplate=f"{model}, {behaviour}<br>{kind} %{{x}}: rate %{{y:.2f}}"
                    "<extra></extra>",
                ),
                row=1,
                col=col,
            )
        title = "m" if kind == "soft prompt" else "R"
        fig.update_xaxes(type="log", title_text=title, row=1, col=col)
    fig.update_yaxes(title_text="share of held-out prompts with the phrase", range=[0, 1.05])
    fig.update_layout(
        title="Information needed to induce each planted phrase",
        template=TEMPLATE,
        height=420,
    )
    return fig
