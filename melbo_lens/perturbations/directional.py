# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""An intervention edits what a model computes along a direction of its residual stream.

A direction r in the residual stream (a steering vector, a refusal direction, a probe
direction) can be removed, pinned to a value, or added at several strengths:

* **Directional ablation** (Arditi et al. 2024, *Refusal in language models is mediated
  by a single direction*) projects r out of the residual stream everywhere,
  x <- x - (x·r̂) r̂, at every block's `resid_pre`, `resid_mid` and `resid_post`, so no
  attention layer, MLP, norm or unembedding ever reads a stream that contains r.
  `ablate_direction` does it with hooks; several directions ablate their whole span.
* **Weight orthogonalisation** bakes the same edit into the weights: every matrix that
  writes into the stream (W_E, W_pos, each W_O and b_O, each W_out and b_out) has its
  output projected off r, so nothing writes r in the first place.
  `orthogonalize_weights` (in `melbo_lens.perturbations.orthogonalize`) returns an
  edited copy of the model.
* **Clamping** sets the projection x·r̂ to a fixed value at chosen sites (for example its
  mean over reference prompts, from `mean_projection`) instead of removing it.
* **Arithmetic** adds and subtracts steering vectors, and `scale_sweep` measures how the
  next-token distribution moves as a vector's strength grows.

`orthogonalize_weights` (the weight version) lives in `perturbations.orthogonalize`.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import run_to_site
from melbo_lens.core.sites import HookSite, as_site, require_hook, residual_stream_sites
from melbo_lens.perturbations.base import Hook, Rows, apply, pick_members, row_members
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = [
    "Directions",
    "DirectionEdit",
    "ablate_direction",
    "clamp_direction",
    "direction_basis",
    "mean_projection",
]

Directions = Float[Tensor, "*k d_model"] | SteeringVectors
SiteLike = HookSite | str | int


# ---------------------------------------------------------------------- directions
def direction_basis(direction: Directions, d_model: int) -> Float[Tensor, "d_model k"]:
    """Orthonormal basis (float64 columns) of the span of one or more directions.

    Examples:
        >>> direction_basis(torch.tensor([3.0, 0.0, 4.0]), 3).abs().T
        tensor([[0.6000, 0.0000, 0.8000]], dtype=torch.float64)
    """
    m = direction.vectors if isinstance(direction, SteeringVectors) else torch.as_tensor(direction)
    m = m.detach().to(torch.float64)
    if m.ndim == 1:
        m = m[None]
    if m.ndim != 2 or m.shape[-1] != d_model or m.shape[0] == 0:
        raise ValueError(
            f"a direction must be [d_model={d_model}] or [k, d_model], got {tuple(m.shape)}"
        )
    if not torch.isfinite(m).all():
        raise ValueError("the direction contains NaN or inf")
    q, r = torch.linalg.qr(m.T)
    largest = m.norm(dim=-1).max()
    if largest == 0 or (r.diagonal().abs() <= 1e-6 * largest).any():
        raise ValueError(
            f"the {m.shape[0]} direction(s) are zero or linearly dependent; pass a nonzero "
            "vector, or independent rows (e.g. orthogonalise them first)"
        )
    return q


def _unit(direction: Directions, d_model: int) -> Float[Tensor, " d_model"]:
    m = direction.vectors if isinstance(direction, SteeringVectors) else torch.as_tensor(direction)
    if m.ndim == 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 1:
        raise ValueError(
            f"expected one direction [d_model={d_model}], got {tuple(m.shape)}; "
            "pick one, e.g. vectors[i]"
        )
    direction_basis(m, d_model)  # shape and nonzero checks
    m = m.detach().to(torch.float64)
    return m / m.norm()


def _sites(model: Host, sites: SiteLike | Sequence[SiteLike]) -> list[HookSite]:
    items = [sites] if isinstance(sites, HookSite | str | int) else list(sites)
    if not items:
        raise ValueError("no sites given; pass at least one HookSite, hook name or layer")
    return [require_hook(model, as_site(s)) for s in items]


# ---------------------------------------------------------------------- the perturbation
@dataclass
class DirectionEdit:
    """Directional ablations or clamps as a `Perturbation`: member k edits the residual
    stream along the orthonormal columns of `bases[k]` at `sites`.

    Ablation (`values=None`): x <- x - (x B)Bᵀ, the span removed. Clamp: x <- x + (v - x·r̂)r̂
    with r̂ = `bases[k][:, 0]` and v = `values[k]` (a number, or one value per position).
    `sites=None` means every `resid_pre`, `resid_mid` and `resid_post` the model has.
    `scale` in `hooks` blends: x + scale·(edited − x) (1 = the full edit). Rows whose
    member is None are untouched. Computed in at least float32 whatever the model dtype.

    Args:
        bases: [n, d_model, m] orthonormal columns per member.
        sites: Where the edit runs (None: every residual-stream site).
        values: Clamp values per member (None: ablation).
        method: `"ablation"` or `"clamp"`.

    Examples:
        >>> edit = DirectionEdit.ablation(torch.eye(4)[:2], d_model=4)
        >>> len(edit), edit.bases.shape
        (2, torch.Size([2, 4, 1]))
    """

    bases: Float[Tensor, "n d_model m"]
    sites: tuple[HookSite, ...] | None = None
    values: Tensor | None = None
    method: str = "ablation"

    @classmethod
    def ablation(
        cls,
        directions: Directions,
        *,
        d_model: int,
        sites: Sequence[HookSite] | None = None,
        span: bool = False,
    ) -> DirectionEdit:
        """One member per direction row (`span=True`: one member removing their span)."""
        m = directions.vectors if isinstance(directions, SteeringVectors) else directions
        rows = torch.as_tensor(m)
        rows = rows[None] if rows.ndim == 1 else rows
        if span:
            bases = direction_basis(rows, d_model)[None]
        else:
            bases = torch.stack([direction_basis(r, d_model) for r in rows])
        return cls(bases, None if sites is None else tuple(sites))

    @classmethod
    def clamp(
        cls,
        direction: Directions,
        value: float | Tensor,
        *,
        d_model: int,
        sites: Sequence[HookSite],
    ) -> DirectionEdit:
        """One member setting the projection on `direction` to `value`."""
        unit = _unit(direction, d_model)
        values = torch.as_tensor(value, dtype=torch.float64)[None]
        return cls(unit[None, :, None], tuple(sites), values, method="clamp")

    @property
    def site(self) -> HookSite:
        return self.sites[0] if self.sites else HookSite(0, "resid_pre")

    def __len__(self) -> int:
        return self.bases.shape[0]

    def __getitem__(self, index: int | slice | Sequence[int]) -> DirectionEdit:
        idx = torch.arange(len(self))[[index] if isinstance(index, int) else index]
        values = None if self.values is None else self.values[idx]
        return DirectionEdit(self.bases[idx], self.sites, values, self.method)

    def hooks(self, model: Host, rows: Rows, scale: float = 1.0) -> list[Hook]:
        members = row_members(rows, len(self), self.method)
        sites = residual_stream_sites(model) if self.sites is None else _sites(model, self.sites)
        if isinstance(rows, int):
            k = int(members[0])
            basis, on = self.bases[k][None], torch.ones(1, dtype=torch.float64)
            value = None if self.values is None else self.values[k][None]
        else:
            basis = pick_members(self.bases, members)  # zero basis: nothing removed
            on = pick_members(torch.ones(len(self), dtype=torch.float64), members)
            value = None if self.values is None else pick_members(self.values, members)
            if value is not None and value.ndim == 1:
                value = value[:, None]  # one value per row -> broadcast over positions
        hook = _edit_hook(basis, on, value, scale, per_row=not isinstance(rows, int))
        return [(s.name, hook) for s in sites]


def _edit_hook(basis: Tensor, on: Tensor, value: Tensor | None, scale: float, per_row: bool):
    """Hook applying the edit of `DirectionEdit.hooks` (bases [g, d, m], g rows or 1)."""

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        dtype = torch.promote_types(act.dtype, torch.float32)
        x = act.to(dtype)
        q = basis.to(device=act.device, dtype=dtype)
        gate = on.to(device=act.device, dtype=dtype)
        v = None if value is None else value.to(device=act.device, dtype=dtype)
        if per_row and q.shape[0] != x.shape[0]:
            if x.shape[0] % q.shape[0]:
                raise ValueError(
                    f"{q.shape[0]} per-row members for a batch of {x.shape[0]} rows; the "
                    "batch must hold a whole number of rows per member"
                )
            reps = x.shape[0] // q.shape[0]
            q, gate = q.repeat_interleave(reps, 0), gate.repeat_interleave(reps, 0)
            v = None if v is None else v.repeat_interleave(reps, 0)
        if not per_row:
            q, gate = q[0], gate[0]
            v = None if v is None else v[0]
            edited = x - (x @ q) @ q.T
            if v is not None:
                edited = edited + v[..., None] * q[:, 0]
        else:
            coeff = torch.einsum("bpd,bdm->bpm", x, q)
            edited = x - torch.einsum("bpm,bdm->bpd", coeff, q)
            if v is not None:
                edited = edited + gate[:, None, None] * v[..., None] * q[:, None, :, 0]
        return (x + scale * (edited - x)).to(act.dtype)

    return hook


# ---------------------------------------------------------------------- ablation
@contextmanager
def ablate_direction(
    model: Host, direction: Directions, *, sites: SiteLike | Sequence[SiteLike] | None = None
) -> Generator[Any, None, None]:
    """Project `direction` (or the span of several) out of the residual stream.

    With `sites=None` the projection runs at every `resid_pre`, `resid_mid` and
    `resid_post` the model has, which makes it equal to `orthogonalize_weights`; pass
    sites to ablate only there. Hooks are removed on exit, also when the body raises.

    Args:
        model: The model the hooks are added to.
        direction: A [d_model] direction or [m, d_model] directions (their span is removed).
        sites: Where to project (None: every residual-stream site).

    Yields:
        The model, with the projection in place.

    Examples:
        >>> with ablate_direction(model, refusal_dir):
        ...     logits = model(tokens)
    """
    chosen = None if sites is None else _sites(model, sites)
    edit = DirectionEdit.ablation(
        direction, d_model=int(model.cfg.d_model), sites=chosen, span=True
    )
    with apply(model, edit, 0):
        yield model


# ---------------------------------------------------------------------- clamping
@contextmanager
def clamp_direction(
    model: Host,
    direction: Directions,
    value: float | Tensor,
    *,
    sites: SiteLike | Sequence[SiteLike],
) -> Generator[Any, None, None]:
    """Set the projection x·r̂ to `value` at `sites`: x <- x + (value - x·r̂) r̂.

    `value` is a number or a tensor broadcasting to [batch, pos]. Hooks are removed on
    exit, also when the body raises.

    Args:
        model: The model the hooks are added to.
        direction: The [d_model] direction r (normalised here).
        value: The projection to set, a number or a tensor broadcasting to [batch, pos].
        sites: Where to clamp.

    Yields:
        The model, with the clamp in place.

    Examples:
        >>> mu = mean_projection(model, reference, r, HookSite(5))
        >>> with clamp_direction(model, r, mu, sites=[HookSite(5)]):
        ...     logits = model(tokens)
    """
    edit = DirectionEdit.clamp(
        direction, value, d_model=int(model.cfg.d_model), sites=_sites(model, sites)
    )
    with apply(model, edit, 0):
        yield model


def mean_projection(
    model: Host,
    prompts: PromptSet,
    direction: Directions,
    site: SiteLike,
    *,
    positions: str = "target",
) -> float:
    """Mean of x·r̂ at `site` over the prompts' target positions (`positions="all"`: all
    real tokens). The model runs only up to the site.

    Args:
        model: The model.
        prompts: The reference prompts.
        direction: The [d_model] direction r (normalised here).
        site: Where x is read.
        positions: `"target"` (the prompts' target positions) or `"all"`.

    Returns:
        The mean of x·r̂.

    Examples:
        >>> mu = mean_projection(model, reference, r, HookSite(1))
        >>> isinstance(mu, float)
        True
    """
    if positions not in ("target", "all"):
        raise ValueError(f"positions must be 'target' or 'all', got {positions!r}")
    unit = _unit(direction, int(model.cfg.d_model))
    (site,) = _sites(model, site)
    with torch.no_grad():
        act = run_to_site(model, prompts.tokens, prompts.attention_mask, site.name)
    mask = prompts.target_mask if positions == "target" else prompts.attention_mask
    x = act[mask.to(act.device)].to(torch.float64)
    return float((x @ unit.to(x.device)).mean())
