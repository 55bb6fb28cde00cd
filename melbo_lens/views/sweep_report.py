"""The sweep report: one self-contained HTML page of a grid sweep's table and figure."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from melbo_lens.core.io import atomic_write_text
from melbo_lens.views.figures.sweeps import sweep_grid_figure
from melbo_lens.views.html_page import Page, esc_html, fmt_number, html_document, html_table
from melbo_lens.workflows.sweeps import SweepResult

__all__ = ["render_sweep_report", "write_sweep_report"]


def _section(result: SweepResult, page: Page) -> str:
    head = ["cell", "method", "sites", "prompts", "R", "seed", "objective", "diversity",
            "fluency x base", "behaviours"]  # fmt: skip
    rows: list[list[Any]] = [
        [
            esc_html(r["cell"]),
            esc_html(r["method"] + (f" {json.dumps(r['options'])}" if r.get("options") else "")),
            esc_html(f"{r['source']} → {r['target']}"),
            esc_html(r["prompt_set"]),
            f"{r['radius']:g}",
            r["seed"],
            fmt_number(r["objective_mean"]),
            fmt_number(r["diversity_mean_abs_cos"], 3),
            fmt_number(r["fluency_ratio"], 3),
            esc_html(json.dumps(r.get("behaviors", {}))),
        ]
        for r in result.rows
    ]
    return (
        '<section id="sweep"><h2>Sweep</h2>'
        f"<p>{len(result.rows)} cells in {esc_html(str(result.out_dir))}; artifacts in cells/, the "
        "table in results.csv.</p>"
        + page.figure(sweep_grid_figure(result.rows))
        + html_table(rows, head)
        + "</section>"
    )


def render_sweep_report(result: SweepResult, *, title: str = "melbo-lens sweep") -> str:
    """The sweep's table and figure as one HTML string (no external resources)."""
    page = Page()
    body = f"<header><h1>{esc_html(title)}</h1></header>" + _section(result, page)
    return html_document(title, body, page)


def write_sweep_report(result: SweepResult, path: str | os.PathLike[str] | None = None) -> Path:
    """Write the sweep report atomically (default: OUT/report.html)."""
    path = Path(path) if path is not None else result.out_dir / "report.html"
    return atomic_write_text(path, render_sweep_report(result))
