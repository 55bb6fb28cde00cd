"""What every figure shares: the template, the diverging colour scale, labels for the
members of an artifact and the one-line description of how they were made."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from melbo_lens.perturbations.trained import Trained

__all__ = []


DIVERGING = "RdBu_r"  # negative blue, zero white, positive red


TEMPLATE = "plotly_white"


def finite_or_none(x: Any) -> float | None:
    """A finite float, or None (a gap in plotly) for None / NaN / inf."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def esc_hover(text: Any) -> str:
    """Text safe inside plotly hover labels (which render a subset of HTML)."""
    return html.escape(str(text)).replace("\n", "⏎")


def vector_labels(vectors: Trained, labels: Sequence[str] | None) -> list[str]:
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


def unique_labels(labels: Sequence[str]) -> list[str]:
    """Row labels made unique (plotly merges equal category labels into one row)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def setup_line(vectors: Trained) -> str:
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
