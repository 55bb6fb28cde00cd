"""Decomposition of a steering vector onto an SAE’s decoder directions: top features by
cosine, or a sparse fit (orthogonal matching pursuit, optionally non-negative), ranked by
importance, with the share of the vector they explain."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from melbo_lens.analysis.sae.loading import decoder_directions, hook_name, sae_site, site_or_none
from melbo_lens.core.sites import HookSite
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = ["SaeDecomposition", "decompose_onto_sae"]


# ---------------------------------------------------------------------- checks
def _pick_vector(
    vector: SteeringVectors | Tensor, index: int | None, site: HookSite | None
) -> tuple[Tensor, HookSite | None, str]:
    if isinstance(vector, SteeringVectors):
        if index is None:
            if len(vector) != 1:
                raise ValueError(
                    f"the artifact holds {len(vector)} vectors; pass index=i to choose one"
                )
            index = 0
        if site is not None and site != vector.site:
            raise ValueError(
                f"site={site.name} but the vectors live at {vector.site.name}; leave site= "
                "out for SteeringVectors (it is only for plain tensors)"
            )
        return vector.vectors[index], vector.site, f"{vector.method}[{index}]"
    v = torch.as_tensor(vector)
    if v.ndim == 2 and index is not None:
        v = v[index]
    elif v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 1:
        raise ValueError(
            f"expected one vector [d], or [n, d] with index=i, or SteeringVectors; "
            f"got {tuple(v.shape)}"
        )
    return v, site, "vector"


def check_fit(v: Tensor, vsite: HookSite | None, sae: SAE, allow_site_mismatch: bool) -> None:
    d_in = int(sae.cfg.d_in)
    if v.shape[-1] != d_in:
        raise ValueError(
            f"the vector has {v.shape[-1]} dimensions but the SAE reads d_in={d_in}; "
            "the SAE was trained on another model or site width. Use an SAE trained on "
            f"this model's residual stream (d_model={v.shape[-1]})"
        )
    if not torch.isfinite(v).all():
        raise ValueError("the vector contains NaN or inf")
    if vsite is None or allow_site_mismatch or hook_name(sae) is None:
        return
    ssite = sae_site(sae)
    if ssite.position != vsite.position:
        raise ValueError(
            f"the SAE reads {ssite.name} but the vector lives at {vsite.name}; its features "
            "describe another site. Use an SAE trained at the vector's site, or pass "
            "allow_site_mismatch=True if you mean to compare across sites"
        )


# ---------------------------------------------------------------------- decomposition
@dataclass
class SaeDecomposition:
    """A vector read in an SAE's dictionary; features ranked by importance.

    `coefficients`: cosines for `method="cosine"`; for `"sparse"`, the weights in feature
    activation units, θ ≈ Σ_j coefficients[j]·W_dec[features[j]]. `cosines`: cos(θ,
    W_dec[f]) for both. `explained_curve[j]`: fraction of ||θ||² explained by the best
    (least-squares) fit on the first j+1 features; `explained` is its last value.

    Attributes:
        features: Latents ranked by importance.
        coefficients: Their cosines (`"cosine"`) or sparse weights (`"sparse"`).
        explained: Fraction of ||θ||² the least-squares fit on all `features` explains.
        method: `"cosine"` or `"sparse"`.
        cosines: cos(θ, W_dec[f]) per feature.
        explained_curve: Fraction explained by the first j+1 features.
        vector_norm: ||θ||.
        nonnegative: Whether the sparse fit kept coefficients ≥ 0.
        vector_site: Where the vector acts.
        sae_site: Where the SAE reads.
        label: The vector's name in tables.
    """

    features: list[int]
    coefficients: list[float]
    explained: float
    method: str
    cosines: list[float] = field(default_factory=list)
    explained_curve: list[float] = field(default_factory=list)
    vector_norm: float = 0.0
    nonnegative: bool = False
    vector_site: HookSite | None = None
    sae_site: HookSite | None = None
    label: str = "vector"

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "coefficients": list(self.coefficients),
            "explained": self.explained,
            "method": self.method,
            "cosines": list(self.cosines),
            "explained_curve": list(self.explained_curve),
            "vector_norm": self.vector_norm,
            "nonnegative": self.nonnegative,
            "vector_site": None if self.vector_site is None else self.vector_site.name,
            "sae_site": None if self.sae_site is None else self.sae_site.name,
            "label": self.label,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SaeDecomposition:
        """Inverse of `to_dict`."""

        def site(name: str | None) -> HookSite | None:
            return None if name is None else HookSite.parse(name)

        return cls(
            features=[int(f) for f in d["features"]],
            coefficients=[float(c) for c in d["coefficients"]],
            explained=float(d["explained"]),
            method=d["method"],
            cosines=[float(c) for c in d["cosines"]],
            explained_curve=[float(c) for c in d["explained_curve"]],
            vector_norm=float(d["vector_norm"]),
            nonnegative=bool(d["nonnegative"]),
            vector_site=site(d["vector_site"]),
            sae_site=site(d["sae_site"]),
            label=d["label"],
        )

    def table(self, limit: int | None = None) -> str:
        """One row per feature: rank, feature, coefficient, cosine, cumulative explained."""
        coef = "cosine" if self.method == "cosine" else "coef"
        lines = [f"{'rank':>4} {'feature':>8} {coef:>9} {'cos':>7} {'explained':>9}"]
        n = len(self.features) if limit is None else min(limit, len(self.features))
        for j in range(n):
            lines.append(
                f"{j + 1:>4} {self.features[j]:>8} {self.coefficients[j]:>9.4f} "
                f"{self.cosines[j]:>7.3f} {self.explained_curve[j]:>9.3f}"
            )
        if n < len(self.features):
            lines.append(f"... {len(self.features) - n} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        where = f" at {self.vector_site.name}" if self.vector_site else ""
        return (
            f"{self.label}{where} (norm {self.vector_norm:.3g}) on SAE decoder directions "
            f"({self.method}): {len(self.features)} features explain {self.explained:.1%} "
            "of its norm²\n" + self.table()
        )


def decompose_onto_sae(
    vector: SteeringVectors | Float[Tensor, " d"],
    sae: SAE,
    *,
    index: int | None = None,
    top_k: int = 20,
    method: Literal["cosine", "sparse"] = "cosine",
    nonnegative: bool = False,
    allow_site_mismatch: bool = False,
    site: HookSite | None = None,
) -> SaeDecomposition:
    """Decompose one steering vector onto the SAE's decoder directions.

    `vector` is a `SteeringVectors` (choose one with `index`) or a tensor [d] (give its
    `site=` to have it checked). The SAE must read the vector's site (else a clear error,
    unless `allow_site_mismatch=True`) and have d_in = the vector's width. With
    `nonnegative=True` only features pointing along θ are used (cosine: ranked by cos,
    not |cos|; sparse: non-negative least squares).

    Args:
        vector: a `SteeringVectors` (with `index`) or one vector [d].
        sae: a sae-lens SAE reading the vector's site.
        index: which member of a `SteeringVectors`.
        top_k: how many features to keep.
        method: "cosine" (rank decoder directions by cosine) or "sparse" (orthogonal
            matching pursuit, coefficients in activation units).
        nonnegative: only features pointing along the vector.
        allow_site_mismatch: decompose even when the SAE reads another site.
        site: the site of a bare tensor, to have it checked.

    Returns:
        `SaeDecomposition`: the features, their coefficients and cosines, and the
        share of ||θ||² the fit explains.

    Raises:
        ValueError: a bad method or top_k, a width or site that does not fit the SAE.

    Examples:
        >>> dec = decompose_onto_sae(vecs, sae, index=0, method="sparse", top_k=5)
        >>> 1 <= len(dec.features) <= 5, 0.0 <= dec.explained <= 1.0
        (True, True)
    """
    if method not in ("cosine", "sparse"):
        raise ValueError(f"method must be 'cosine' or 'sparse', got {method!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    v, vsite, label = _pick_vector(vector, index, site)
    check_fit(v, vsite, sae, allow_site_mismatch)
    v = v.detach().to("cpu", torch.float64)
    norm = float(v.norm())
    if norm == 0:
        raise ValueError("the vector is all zeros; there is nothing to decompose")
    # The dictionary stays float32 on the SAE's device (d_sae x d_in can be large); the
    # few selected rows are refitted in float64 on the CPU.
    dec = decoder_directions(sae).float()
    dec_norm = dec.norm(dim=-1).clamp_min(1e-12)

    def correlate(x: Tensor) -> Tensor:  # <unit decoder row, x> for every feature
        return ((dec @ x.to(dec.device, torch.float32)) / dec_norm).double().cpu()

    def rows(idx: Tensor) -> Tensor:  # selected unit rows, float64 on the CPU
        sel = idx.to(dec.device)
        return (dec[sel] / dec_norm[sel, None]).double().cpu()

    cos = correlate(v / norm)
    k = min(top_k, dec.shape[0])
    if method == "cosine":
        score = cos if nonnegative else cos.abs()
        chosen = torch.topk(score, k).indices
        if nonnegative:
            chosen = chosen[cos[chosen] > 0]
        coefs = cos[chosen]
    else:
        chosen, weights = _omp(correlate, rows, v, k, nonnegative)
        order = torch.argsort(weights.abs(), descending=True, stable=True)
        chosen, weights = chosen[order], weights[order]
        keep = weights.abs() > 1e-12 * norm
        chosen, weights = chosen[keep], weights[keep]
        # unit-direction weights -> feature-activation units
        coefs = weights / dec_norm[chosen.to(dec.device)].double().cpu()
    curve = _explained_prefixes(rows(chosen), v, nonnegative and method == "sparse")
    return SaeDecomposition(
        features=[int(f) for f in chosen],
        coefficients=[float(c) for c in coefs],
        explained=curve[-1] if curve else 0.0,
        method=method,
        cosines=[float(c) for c in cos[chosen]],
        explained_curve=curve,
        vector_norm=norm,
        nonnegative=nonnegative,
        vector_site=vsite,
        sae_site=site_or_none(sae),
        label=label,
    )


def _omp(
    correlate: Callable[[Tensor], Tensor],
    rows: Callable[[Tensor], Tensor],
    v: Float[Tensor, " d"],
    k: int,
    nonnegative: bool,
) -> tuple[Int[Tensor, " m"], Float[Tensor, " m"]]:
    """Orthogonal matching pursuit on unit-norm atoms; at most k atoms.

    `correlate(r)` gives <atom, r> for every atom, `rows(idx)` the chosen atoms. Each
    step adds the atom most correlated with the residual (most positively when
    `nonnegative`), then refits v on all chosen atoms by (non-negative) least squares.
    """
    chosen: list[int] = []
    weights = v.new_zeros(0)
    residual = v.clone()
    total = float(v.dot(v))
    available: Tensor | None = None
    for _ in range(k):
        if float(residual.dot(residual)) <= 1e-12 * total:
            break
        corr = correlate(residual)
        if available is None:
            available = torch.ones(corr.shape[0], dtype=torch.bool)
        score = corr if nonnegative else corr.abs()
        score = torch.where(available, score, torch.full_like(score, -math.inf))
        best = int(score.argmax())
        if score[best] <= 1e-12 * math.sqrt(total):
            break
        chosen.append(best)
        available[best] = False
        a = rows(torch.tensor(chosen)).T  # [d, m]
        weights = _nnls(a, v) if nonnegative else torch.linalg.lstsq(a, v[:, None]).solution[:, 0]
        residual = v - a @ weights
    return torch.tensor(chosen, dtype=torch.long), weights


def _nnls(a: Float[Tensor, "d m"], b: Float[Tensor, " d"], max_iter: int = 200) -> Tensor:
    """min ||a x − b|| subject to x >= 0 (Lawson–Hanson active set)."""
    m = a.shape[1]
    x = a.new_zeros(m)
    passive = torch.zeros(m, dtype=torch.bool)
    tol = 1e-10 * max(1.0, float(a.abs().max()) * float(b.abs().max()))

    def solve(p: Tensor) -> Tensor:
        s = a.new_zeros(m)
        s[p] = torch.linalg.lstsq(a[:, p], b[:, None]).solution[:, 0]
        return s

    for _ in range(max_iter):
        w = a.T @ (b - a @ x)
        w[passive] = -math.inf
        j = int(w.argmax())
        if w[j] <= tol:
            break
        passive[j] = True
        s = solve(passive)
        while bool((s[passive] <= 0).any()):
            bad = passive & (s <= 0)
            alpha = float((x[bad] / (x[bad] - s[bad])).min())
            x = x + alpha * (s - x)
            passive &= x > tol
            x[~passive] = 0.0
            s = solve(passive)
        x = s
    return x.clamp_min(0.0)


def _explained_prefixes(
    atoms: Float[Tensor, "m d"], v: Float[Tensor, " d"], nonnegative: bool
) -> list[float]:
    """Fraction of ||v||² explained by the best fit on atoms[:j+1], for each j."""
    total = float(v.dot(v))
    out = []
    for j in range(1, atoms.shape[0] + 1):
        a = atoms[:j].T
        w = _nnls(a, v) if nonnegative else torch.linalg.lstsq(a, v[:, None]).solution[:, 0]
        r = v - a @ w
        out.append(max(0.0, 1.0 - float(r.dot(r)) / total))
    return out
