"""Per-token delta norms ‖Δ_t‖ per vector, with the prompt / completion boundary marked."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from melbo_lens.analysis.tokens import TokenDeltas
from melbo_lens.views.figures.common import TEMPLATE, esc_hover, finite_or_none, unique_labels

__all__ = ["token_delta_heatmap"]


# ---------------------------------------------------------------------- tokens
def token_delta_heatmap(deltas: Sequence[TokenDeltas]) -> go.Figure:
    """‖Δ_t‖ per vector (rows) and token position (columns).

    Shorter sequences are padded with blanks. Every cell is labelled with its own row's
    token (completions differ between rows); a column's tick label is its token when
    every row has that token there (the shared prompt), else its position. Hover adds
    the position and ‖Δ‖. A black bar marks where each row's completion starts.

    Examples:
        >>> token_delta_heatmap(token_delta_norms(model, vectors, gens))  # doctest: +SKIP
    """
    if not deltas:
        raise ValueError("no TokenDeltas given; pass the list token_delta_norms returns")
    width = max(len(d.tokens) for d in deltas)
    rows = unique_labels([d.label for d in deltas])
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    cell: list[list[str]] = []
    for row, d in zip(rows, deltas, strict=True):
        pad = width - len(d.tokens)
        z.append([finite_or_none(x) for x in d.norms] + [None] * pad)
        cell.append([esc_hover(_short_token(tok)) for tok in d.tokens] + [""] * pad)
        text.append(
            [
                f"{esc_hover(row)}<br>position {t} ({'prompt' if t < d.n_prompt else 'completion'}"
                f"{'' if d.steered[t] else ', not steered'})<br>"
                f"token {esc_hover(repr(d.tokens[t]))}"
                f"<br>‖Δ‖ {d.norms[t]:.4g}"
                for t in range(len(d.tokens))
            ]
            + [""] * pad
        )
    ticks = []
    for t in range(width):
        here = {d.tokens[t] if t < len(d.tokens) else None for d in deltas}
        shared = len(here) == 1 and None not in here
        ticks.append(esc_hover(here.pop()) if shared else str(t))
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(width)),
            y=rows,
            text=text,
            hovertemplate="%{text}<extra></extra>",
            customdata=cell,
            texttemplate="%{customdata}",
            textfont={"size": 9},
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
            f"Per-token change ‖Δ_t‖ at {esc_hover(', '.join(sorted(sites)))} "
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
        template=TEMPLATE,
    )
    return fig


def _short_token(token: str, width: int = 8) -> str:
    """A token as a cell label: visible whitespace, at most `width` characters."""
    shown = token.replace("\n", "⏎").replace(" ", "·") or "∅"
    return shown if len(shown) <= width else shown[: width - 1] + "…"
