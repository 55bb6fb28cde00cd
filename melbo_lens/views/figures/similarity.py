"""Heatmaps of cosine similarity (`CosineMatrix`): of vectors, or of their target deltas."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from melbo_lens.analysis.similarity import CosineMatrix
from melbo_lens.views.figures.common import (
    DIVERGING,
    TEMPLATE,
    esc_hover,
    finite_or_none,
    unique_labels,
)

__all__ = ["similarity_heatmap"]


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
    rows = unique_labels(row_labels if row_labels is not None else [f"{i}" for i in range(n_a)])
    cols = unique_labels(col_labels if col_labels is not None else [f"{j}" for j in range(n_b)])
    if len(rows) != n_a or len(cols) != n_b:
        raise ValueError(f"labels ({len(rows)} rows, {len(cols)} columns) for a {n_a}×{n_b} matrix")
    a, b = esc_hover(matrix.a_label), esc_hover(matrix.b_label)
    fig = go.Figure(
        go.Heatmap(
            z=[[finite_or_none(x) for x in row] for row in values.tolist()],
            x=cols,
            y=rows,
            colorscale=DIVERGING,
            zmin=-1.0,
            zmax=1.0,
            zmid=0.0,
            colorbar={"title": "cos"},
            hovertemplate=f"{a} %{{y}}<br>{b} %{{x}}<br>cos %{{z:.3f}}<extra></extra>",
        )
    )
    s = matrix.summary()
    default = (
        f"Cosine similarity of {esc_hover(matrix.kind)}: {a} vs {b} "
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
        template=TEMPLATE,
    )
    if matrix.same:
        fig.update_layout(yaxis_scaleanchor="x")
    return fig
