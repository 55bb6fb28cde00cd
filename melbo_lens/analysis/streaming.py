"""Streaming statistics of many scores over a token stream, mergeable exactly.

A *score* is any number per (token, column): an SAE latent's activation, a steering
vector's projection at the source. Explanations need, per column, its highest tokens, a
fair sample of where it is active, and its distribution, over a corpus too large to keep
all scores of. `TopScores` keeps exactly that in bounded memory, chunk by chunk:

* the `k` highest positive scores and their token locations (ties: the earlier
  location; a column with fewer than `k` positive scores keeps -inf / -1 slots; with
  `positive_only=False` the `k` highest of any sign);
* a uniform sample of `n_sample` active tokens (score > 0), chosen by a hash of the
  (location, column) pair: the `n_sample` smallest hashes win, so the sample of a stream
  does not depend on how the stream was chunked or sharded;
* a histogram of active scores on fixed log-spaced bins, the active count and the sum.

Locations are global token indices in the stream, so shards of one stream merge into
exactly the state of one pass (`merge`); states save to safetensors (`state_dict`).

Examples:
    >>> acc = TopScores(n_columns=2, k=2, n_sample=2)
    >>> acc.update(torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 0.5]]), torch.arange(3))
    >>> acc.top_values.tolist(), acc.top_locations.tolist()
    ([[3.0, 2.0], [2.0, 0.5]], [[1, 2], [1, 2]])
    >>> acc.active.tolist(), acc.n_tokens
    ([3, 2], 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["HIST_EDGES", "Context", "TopScores", "hash_priority", "windows_of"]

# log-spaced histogram bins for active (> 0) scores: 10 a decade from 1e-3 to 1e4, plus
# one below and one above
HIST_EDGES = torch.logspace(-3, 4, 71, dtype=torch.float64)
_P = 2_147_483_647  # 2^31 - 1, prime


def hash_priority(locations: Int[Tensor, " n"], columns: Int[Tensor, " n"]) -> Int[Tensor, " n"]:
    """A pseudo-random int in [0, 2^31-1) for each (location, column), the same on every
    machine and in every chunking (two rounds of a multiplicative hash mod a prime).

    Examples:
        >>> hash_priority(torch.tensor([5, 5]), torch.tensor([0, 1])).tolist() != [0, 0]
        True
    """
    x = (locations.long() % _P * 1_103_515_245 + columns.long() % _P * 12_345 + 7) % _P
    x = (x * 1_664_525 + 1_013_904_223) % _P
    return (x * 22_695_477 + 1) % _P


class TopScores:
    """Per-column top-k, hash sample and histogram of a stream of scores (module docstring)."""

    def __init__(
        self, n_columns: int, *, k: int = 20, n_sample: int = 32, positive_only: bool = True
    ) -> None:
        if n_columns < 1 or k < 1 or n_sample < 0:
            raise ValueError(
                f"need n_columns >= 1, k >= 1, n_sample >= 0; got {n_columns}, {k}, {n_sample}"
            )
        self.n_columns, self.k, self.n_sample = n_columns, k, n_sample
        self.positive_only = positive_only
        self.n_tokens = 0
        self.top_values = torch.full((n_columns, k), -math.inf)
        self.top_locations = torch.full((n_columns, k), -1, dtype=torch.long)
        self.sample_priority = torch.full((n_columns, n_sample), _P, dtype=torch.long)
        self.sample_values = torch.zeros(n_columns, n_sample)
        self.sample_locations = torch.full((n_columns, n_sample), -1, dtype=torch.long)
        self.hist = torch.zeros(n_columns, len(HIST_EDGES) + 1, dtype=torch.long)
        self.active = torch.zeros(n_columns, dtype=torch.long)
        self.total = torch.zeros(n_columns, dtype=torch.float64)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(
        self, scores: Float[Tensor, "tokens columns"], locations: Int[Tensor, " tokens"]
    ) -> None:
        """Add a chunk: `scores[t, c]` of the token at global index `locations[t]`."""
        scores = scores.detach().float().cpu()
        locations = locations.long().cpu()
        if scores.shape != (len(locations), self.n_columns):
            raise ValueError(
                f"scores must be [tokens, {self.n_columns}] with one location per token, "
                f"got {tuple(scores.shape)} and {len(locations)} locations"
            )
        self.n_tokens += len(locations)
        t, c = torch.nonzero(scores > 0, as_tuple=True)  # token-major: t ascending
        vals = scores[t, c]
        if self.positive_only:  # only active tokens rank: the sparse entries suffice
            self._merge_top(*self._chunk_top_sparse(t, c, vals, locations))
        else:
            self._merge_top(*self._chunk_top_dense(scores, locations))
        if len(t) == 0:
            return
        self.active += torch.bincount(c, minlength=self.n_columns)
        self.total += torch.zeros(self.n_columns, dtype=torch.float64).index_add_(
            0, c, vals.double()
        )
        bins = torch.bucketize(vals.double(), HIST_EDGES)
        flat = c * self.hist.shape[1] + bins
        self.hist += torch.bincount(flat, minlength=self.hist.numel()).view_as(self.hist)
        if self.n_sample:
            locs = locations[t]
            self._merge_sample(c, hash_priority(locs, c), vals, locs)

    def _chunk_top_sparse(
        self, t: Tensor, c: Tensor, vals: Tensor, locations: Tensor
    ) -> tuple[Tensor, Tensor]:
        """[C, k] top values and locations of a chunk from its positive entries only
        (a TopK SAE has k of d_sae active per token, so this is ~d_sae/k times less work
        than a dense top-k). Order within a column: value descending, then the earlier
        token, the same set the dense path keeps."""
        n, k = self.n_columns, self.k
        by_value = torch.argsort(-vals, stable=True)  # ties keep token order
        order = by_value[torch.argsort(c[by_value], stable=True)]
        cols = c[order]
        rank = torch.arange(len(order)) - torch.searchsorted(cols, torch.arange(n))[cols]
        keep = rank < k
        slot = cols[keep] * k + rank[keep]
        values = torch.full((n * k,), -math.inf).scatter_(0, slot, vals[order][keep])
        locs = torch.full((n * k,), -1, dtype=torch.long)
        locs = locs.scatter_(0, slot, locations[t[order][keep]])
        return values.view(n, k), locs.view(n, k)

    def _chunk_top_dense(self, scores: Tensor, locations: Tensor) -> tuple[Tensor, Tensor]:
        """[C, kk] top values and locations of a chunk where every entry ranks."""
        kk = min(self.k, len(locations))
        values, index = torch.topk(scores, kk, dim=0)  # [kk, C]
        # topk picks among equal values arbitrarily; where a tie straddles the k-th place,
        # take the earliest tokens (a stable sort), so every chunking keeps the same set
        kth = values[-1]
        tied = ((scores >= kth).sum(0) > kk) & torch.isfinite(kth)
        if tied.any():
            cols = torch.nonzero(tied)[:, 0]
            exact = torch.sort(scores[:, cols], dim=0, descending=True, stable=True)
            values[:, cols], index[:, cols] = exact.values[:kk], exact.indices[:kk]
        return values.T, locations[index].T

    def _merge_top(self, values: Tensor, locations: Tensor) -> None:
        vals = torch.cat([self.top_values, values], 1)
        locs = torch.cat([self.top_locations, locations], 1)
        # ties: the earlier location first (a stable order, whatever the chunking)
        order = torch.argsort(locs.masked_fill(locs < 0, torch.iinfo(torch.long).max), dim=1)
        vals, locs = vals.gather(1, order), locs.gather(1, order)
        top = torch.sort(vals, dim=1, descending=True, stable=True)
        self.top_values = top.values[:, : self.k].contiguous()
        self.top_locations = locs.gather(1, top.indices)[:, : self.k].contiguous()

    def _merge_sample(self, cols: Tensor, pri: Tensor, vals: Tensor, locs: Tensor) -> None:
        n, s = self.n_columns, self.n_sample
        all_cols = torch.cat([torch.arange(n).repeat_interleave(s), cols])
        all_pri = torch.cat([self.sample_priority.flatten(), pri])
        all_vals = torch.cat([self.sample_values.flatten(), vals])
        all_locs = torch.cat([self.sample_locations.flatten(), locs])
        # sort by (column, priority, location); keep the first s of each column
        by_loc = torch.argsort(
            all_locs.masked_fill(all_locs < 0, torch.iinfo(torch.long).max), stable=True
        )
        key = all_cols[by_loc] * (_P + 1) + all_pri[by_loc]
        order = by_loc[torch.argsort(key, stable=True)]
        all_cols = all_cols[order]
        start = torch.searchsorted(all_cols, torch.arange(n))
        rank = torch.arange(len(order)) - start[all_cols]
        keep = rank < s
        slot = all_cols[keep] * s + rank[keep]
        self.sample_priority = (
            all_pri[order][keep].new_empty(n * s).scatter_(0, slot, all_pri[order][keep]).view(n, s)
        )
        self.sample_values = (
            all_vals.new_empty(n * s).scatter_(0, slot, all_vals[order][keep]).view(n, s)
        )
        self.sample_locations = (
            all_locs.new_empty(n * s).scatter_(0, slot, all_locs[order][keep]).view(n, s)
        )

    # ------------------------------------------------------------------ merge / save
    def merge(self, other: TopScores) -> TopScores:
        """This state and `other`'s (disjoint token locations) as one, in place."""
        if (other.n_columns, other.k, other.n_sample) != (self.n_columns, self.k, self.n_sample):
            raise ValueError("can only merge states of the same columns, k and n_sample")
        self.n_tokens += other.n_tokens
        self._merge_top(other.top_values, other.top_locations)
        real = other.sample_locations.flatten() >= 0
        cols = torch.arange(other.n_columns).repeat_interleave(other.n_sample)[real]
        self._merge_sample(
            cols,
            other.sample_priority.flatten()[real],
            other.sample_values.flatten()[real],
            other.sample_locations.flatten()[real],
        )
        self.hist += other.hist
        self.active += other.active
        self.total += other.total
        return self

    _TENSORS = (
        "top_values",
        "top_locations",
        "sample_priority",
        "sample_values",
        "sample_locations",
        "hist",
        "active",
        "total",
    )

    def state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        out = {prefix + name: getattr(self, name) for name in self._TENSORS}
        out[prefix + "n_tokens"] = torch.tensor([self.n_tokens])
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor], prefix: str = "") -> TopScores:
        top = tensors[prefix + "top_values"]
        acc = cls(top.shape[0], k=top.shape[1], n_sample=tensors[prefix + "sample_values"].shape[1])
        for name in cls._TENSORS:
            setattr(acc, name, tensors[prefix + name].clone())
        acc.n_tokens = int(tensors[prefix + "n_tokens"][0])
        return acc

    def equals(self, other: Any) -> bool:
        """Exact equality of the states (what sharded and one-pass runs must give)."""
        return isinstance(other, TopScores) and all(
            torch.equal(a, b)
            for a, b in zip(self.state_dict().values(), other.state_dict().values(), strict=True)
        )

    def sample_order(self) -> Tensor:
        """Indices that sort each column's sample by value, highest first (empty slots last)."""
        vals = self.sample_values.masked_fill(self.sample_locations < 0, -math.inf)
        return torch.argsort(vals, dim=1, descending=True, stable=True)


def windows_of(stream: Tensor, locations: Tensor, left: int, right: int) -> Tensor:
    """Token ids around each location, [..., left + 1 + right]; -1 outside the stream or
    for empty slots (location -1).

    Examples:
        >>> windows_of(torch.arange(10, 15), torch.tensor([[0, 4, -1]]), 1, 1).tolist()
        [[[-1, 10, 11], [13, 14, -1], [-1, -1, -1]]]
    """
    offs = torch.arange(-left, right + 1)
    idx = locations[..., None] + offs
    ok = (idx >= 0) & (idx < len(stream)) & (locations[..., None] >= 0)
    return torch.where(ok, stream[idx.clamp(0, len(stream) - 1)], torch.full_like(idx, -1))


@dataclass
class Context:
    """One corpus token where a latent (or direction) fired, with its context."""

    left: list[str]
    token: str
    right: list[str]
    value: float

    def text(self) -> str:
        """``…left|token|right…`` in one line (newlines shown as ⏎)."""

        def show(s: str) -> str:
            return s.replace("\n", "⏎")

        return f"{show(''.join(self.left))}|{show(self.token)}|{show(''.join(self.right))}"
