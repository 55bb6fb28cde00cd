"""Attribution estimates against patched effects, per node (or the exact split’s shares)."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from melbo_lens.analysis.attribution import DeltaAttribution
from melbo_lens.views.figures.common import TEMPLATE, esc_hover, finite_or_none, unique_labels

__all__ = ["attribution_bars"]


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
        names = unique_labels([n.name for n in nodes])
        kinds = [n.kind for n in nodes]
        fig.add_trace(
            go.Bar(
                y=names,
                x=[finite_or_none(n.estimate) for n in nodes],
                orientation="h",
                name=f"estimate ({attribution.method})",
                customdata=kinds,
                hovertemplate="%{y} (%{customdata})<br>estimate %{x:.4g}<extra></extra>",
            )
        )
        fig.add_trace(
            go.Bar(
                y=names,
                x=[finite_or_none(n.actual) for n in nodes],
                orientation="h",
                name="patched (actual)",
                customdata=kinds,
                hovertemplate="%{y} (%{customdata})<br>patched effect %{x:.4g}<extra></extra>",
            )
        )
        corr = attribution.correlation
        note = f", r = {corr:.3f}" if corr is not None and math.isfinite(corr) else ""
        title = f"Attribution of {esc_hover(attribution.metric)}: estimate vs patching{note}"
        x_title = f"effect on {attribution.metric} (steered − node set to unsteered)"
    else:
        dec = attribution.decomposition
        contrib = dec.contributions().double().cpu()
        total = float(contrib.sum())
        order = contrib.abs().argsort(descending=True)[:top].tolist()
        names = unique_labels([dec.names[i] for i in order])
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
        template=TEMPLATE,
        height=max(350, 28 * len(names) + 150),
    )
    return fig
