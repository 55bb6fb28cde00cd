"""The SAE-feature heatmap: vectors × features, with each feature’s top-activating tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import plotly.graph_objects as go

from melbo_lens.views.figures.common import (
    DIVERGING,
    TEMPLATE,
    esc_hover,
    finite_or_none,
    unique_labels,
)

__all__ = ["feature_heatmap"]


# ---------------------------------------------------------------------- features
def _token_hover(tokens: Sequence[tuple[str, float]] | None, limit: int = 5) -> str:
    if not tokens:
        return "top tokens: (none known)"
    rows = [f"{esc_hover(t)} ({float(v):.3g})" for t, v in list(tokens)[:limit]]
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
    rows = unique_labels([str(d.label) for d in decompositions])
    feature_tokens = feature_tokens or {}
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    for row, dec in zip(rows, decompositions, strict=True):
        values = dec.cosines if value == "cosine" else dec.coefficients
        lookup = dict(zip(dec.features, values, strict=False))
        z.append([finite_or_none(lookup.get(f)) for f in columns])
        text.append(
            [
                f"{esc_hover(row)}<br>feature {f}<br>"
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
            colorscale=DIVERGING,
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
        template=TEMPLATE,
    )
    return fig
