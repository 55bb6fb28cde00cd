"""The state of a dashboard pass: what one streamed pass (or one shard of it) keeps, and
how shard states merge into the state of one pass (exactly: `TopScores.merge` for the
per-latent statistics; the correlation samples are unions put in one canonical order)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from melbo_lens.analysis.streaming import TopScores

__all__ = ["DashboardState", "merge_dashboard_states"]


@dataclass
class DashboardState:
    """What one streamed pass (or one shard) keeps: per-latent `TopScores` plus the
    sparse activations of the correlation sample, and the rows it covered."""

    scores: TopScores
    corr_rows: Tensor  # [m] global token locations of the sampled tokens
    corr_index: Tensor  # [nnz, 2] (row in corr_rows, latent)
    corr_values: Tensor  # [nnz]
    rows_done: list[tuple[int, int]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Tensor]:
        out = self.scores.state_dict("scores.")
        out.update(
            corr_rows=self.corr_rows, corr_index=self.corr_index, corr_values=self.corr_values
        )
        return out

    @classmethod
    def from_state_dict(
        cls, t: dict[str, Tensor], rows_done: list[tuple[int, int]]
    ) -> DashboardState:
        return cls(
            TopScores.from_state_dict(t, "scores."),
            t["corr_rows"].clone(),
            t["corr_index"].clone(),
            t["corr_values"].clone(),
            [tuple(r) for r in rows_done],  # type: ignore[misc]
        )


def merge_dashboard_states(states: Sequence[DashboardState]) -> DashboardState:
    """Shard states of one stream as the state of one pass (exact; see `TopScores.merge`)."""
    if not states:
        raise ValueError("no states to merge")
    first = states[0]
    out = DashboardState(
        TopScores.from_state_dict(first.scores.state_dict()),
        first.corr_rows,
        first.corr_index,
        first.corr_values,
        list(first.rows_done),
    )
    for s in states[1:]:
        out.scores.merge(s.scores)
        offset = len(out.corr_rows)
        out.corr_rows = torch.cat([out.corr_rows, s.corr_rows])
        out.corr_index = torch.cat([out.corr_index, s.corr_index + torch.tensor([offset, 0])])
        out.corr_values = torch.cat([out.corr_values, s.corr_values])
        out.rows_done += s.rows_done
    # one canonical order of the correlation sample: by location
    order = torch.argsort(out.corr_rows)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    out.corr_rows = out.corr_rows[order]
    out.corr_index = out.corr_index.clone()
    out.corr_index[:, 0] = inverse[out.corr_index[:, 0]] if len(order) else out.corr_index[:, 0]
    by = torch.argsort(out.corr_index[:, 0] * (1 << 32) + out.corr_index[:, 1])
    out.corr_index, out.corr_values = out.corr_index[by], out.corr_values[by]
    out.rows_done.sort()
    return out
