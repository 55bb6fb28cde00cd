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
  `orthogonalize_weights` returns an edited copy of the model.
* **Clamping** sets the projection x·r̂ to a fixed value at chosen sites (for example its
  mean over reference prompts, from `mean_projection`) instead of removing it.
* **Arithmetic** adds and subtracts steering vectors, and `scale_sweep` measures how the
  next-token distribution moves as a vector's strength grows.

Why the hook and weight versions agree. Write P = I - r̂r̂ᵀ. With hooks, block 0 reads
P·embed; a block's write a is added and the sum projected, resid_mid = P(x + a) = x + Pa
since Px = x. With orthogonalised weights the block reads the same x and writes Pa
directly. By induction every residual value, and so every norm input (LayerNorm,
RMSNorm, the centring-only LNPre of folded models) and the logits, is the same up to
float rounding: norms only read the stream. What differs is what the *writes* look
like: `hook_embed`, `hook_attn_out` and `hook_mlp_out` carry r under the hooks and not
under the weights. The weights cannot express the edit when a norm sits between a
sublayer and its residual add (Gemma 2/3 `ln*_post`, OLMo 2 post-norm: the write
w ⊙ y / rms(y) has an r component whatever W_O is), nor for mixture-of-experts MLPs;
`orthogonalize_weights` refuses those models, and `ablate_direction` stays exact on them.
Folded models (`center_writing_weights`) lose the zero-mean property of their writes
unless r itself has zero mean; LNPre centres its input anyway, so outputs are unaffected.
"""

from __future__ import annotations

import copy
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from melbo_lens.core.host import Host, post_norm
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import run_to_site
from melbo_lens.core.sites import HookSite, as_site, require_hook, residual_stream_sites
from melbo_lens.perturbations.base import Hook, Rows, apply, pick_members, row_members
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = [
    "DirectionEdit",
    "ablate_direction",
    "clamp_direction",
    "direction_basis",
    "mean_projection",
    "orthogonalize_weights",
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


def _residual_writers(model: Host) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every weight whose output is added to the stream."""
    cfg = model.cfg
    if post_norm(model):
        raise NotImplementedError(
            "this model normalises each sublayer's output before adding it to the residual "
            "stream (Gemma 2/3, OLMo 2), so no weight edit removes the direction from what "
            "is written; use ablate_direction(model, direction), which is exact here"
        )
    if getattr(cfg, "num_experts", None):
        raise NotImplementedError(
            "mixture-of-experts MLPs are not handled by orthogonalize_weights; "
            "use ablate_direction(model, direction)"
        )
    hooked: Any = model  # its modules: a HookedTransformer (checked by the caller)
    writers: list[tuple[nn.Module, str]] = [(hooked.embed, "W_E")]
    if cfg.positional_embedding_type == "standard":  # shortformer W_pos never enters the stream
        writers.append((hooked.pos_embed, "W_pos"))
    for block in hooked.blocks:
        writers += [(block.attn, "W_O"), (block.attn, "b_O")]
        if not cfg.attn_only:
            writers += [(block.mlp, "W_out"), (block.mlp, "b_out")]
    for module, name in writers:
        param = getattr(module, name, None)
        if not isinstance(param, nn.Parameter) or param.shape[-1] != cfg.d_model:
            raise NotImplementedError(
                f"expected a parameter {name} [..., d_model={cfg.d_model}] on "
                f"{type(module).__name__}, found {type(param).__name__}; this architecture "
                "is not supported by orthogonalize_weights, use ablate_direction instead"
            )
    return writers


def orthogonalize_weights(model: Host, direction: Directions) -> Any:
    """A copy of `model` whose residual-stream writes are projected off `direction`.

    The same function as running under `ablate_direction(model, direction)` (see the
    module docstring for why, and for the architectures it refuses). The original model
    is not touched. HookedTransformer only.

    Examples:
        >>> edited = orthogonalize_weights(model, refusal_dir)   # doctest: +SKIP
        >>> torch.allclose(edited(tokens), logits_under_ablation, atol=1e-4)  # doctest: +SKIP
        True
    """
    from transformer_lens import HookedTransformer

    if not isinstance(model, HookedTransformer):
        raise TypeError(
            f"orthogonalize_weights edits HookedTransformer weights, got {type(model).__name__}; "
            "for other hosts use ablate_direction(model, direction)"
        )
    basis = direction_basis(direction, int(model.cfg.d_model))
    _residual_writers(model)  # refuse before paying for the copy
    new = copy.deepcopy(model)
    # A copy made inside a `model.hooks(...)` block carries its temporary hooks; the copy
    # has no context that would remove them.
    new.reset_hooks(including_permanent=False)
    for module, name in _residual_writers(new):
        param = getattr(module, name)
        w = param.detach().to(torch.float64)
        q = basis.to(w.device)
        edited = (w - (w @ q) @ q.T).to(param.dtype)
        # A fresh Parameter also unties anything that shared this tensor.
        setattr(module, name, nn.Parameter(edited, requires_grad=param.requires_grad))
    return new


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

    Examples:
        >>> mean_projection(model, reference, r, HookSite(5))    # doctest: +SKIP
        3.21
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
