"""Similarity of two sets of steering vectors: directions, subspaces and effects.

Vectors found by different methods (MELBO, supervised contrasts, random or Jacobian
baselines, or two MELBO runs with different seeds) can be compared in three ways:

* **As directions**: the cosine-similarity matrix between the two sets, and for each
  vector of A its nearest vector of B by |cos| (the sign says whether it points the
  same way; a steering direction and its negative are usually different behaviours).
* **As subspaces**: the principal angles between span(A) and span(B). 0 means a shared
  direction, π/2 a direction of one set orthogonal to all of the other. Two sets can
  span nearly the same subspace while no single pair of vectors matches.
* **By effect**: the cosine between their target-layer deltas Z(θ) − Z(0) on prompts,
  flattened over the target positions. Learned vectors whose directions are nearly
  orthogonal often move the target layer in similar ways (the MELBO source notes their
  deltas are far more similar than the vectors), so compare both.

Every function takes `SteeringVectors` or plain `[n, d]` tensors and returns a small
dataclass with `to_dict()` and a readable `str()`.

Why one module over ~400 lines: comparing two sets of vectors (cosines, subspace angles,
target-delta similarity) is one question with one result type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.analysis.deltas import perturbation_deltas
from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.core.sites import HookSite, as_site
from melbo_lens.perturbations.base import Perturbation
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = [
    "CosineMatrix",
    "NearestMatches",
    "PrincipalAngles",
    "VectorComparison",
    "compare_vectors",
    "cosine_matrix",
    "delta_similarity",
    "nearest_matches",
    "principal_angles",
]

VectorSet = SteeringVectors | Perturbation | Float[Tensor, "*n d"]
_MAX_SHOWN = 12  # rows / columns printed by __str__


def _matrix(x: VectorSet) -> Float[Tensor, "n d"]:
    m = x.vectors if isinstance(x, SteeringVectors) else torch.as_tensor(x)
    m = m.detach().to("cpu", torch.float64)
    if m.ndim == 1:
        m = m[None]
    if m.ndim != 2 or m.shape[0] == 0:
        raise ValueError(f"expected vectors [n, d] or one vector [d], got {tuple(m.shape)}")
    return m


def _label(x: VectorSet, default: str) -> str:
    return x.method if isinstance(x, SteeringVectors) else default


def _cos(a: Tensor, b: Tensor) -> Tensor:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"the two sets have different widths ({a.shape[-1]} and {b.shape[-1]}); "
            "vectors from different models or sites of different width cannot be compared"
        )
    return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T


# ---------------------------------------------------------------------- cosine matrices
@dataclass
class CosineMatrix:
    """`values[i, j]` = cos(A_i, B_j); `kind` is "vectors" or "deltas".

    `same` marks a set compared with itself; its summary then skips the diagonal.
    """

    values: Float[Tensor, "n_a n_b"]
    a_label: str = "A"
    b_label: str = "B"
    kind: str = "vectors"
    dim: int = 0
    same: bool = False

    def _pairs(self) -> Tensor:
        v = self.values.abs()
        if self.same:
            if v.shape[0] < 2:
                return v.new_zeros(0)
            return v[~torch.eye(v.shape[0], dtype=torch.bool)]
        return v.flatten()

    def summary(self) -> dict[str, float]:
        """Mean and max |cos| over pairs, and what random directions would give."""
        pairs = self._pairs()
        out = {
            "mean_abs": float(pairs.mean()) if pairs.numel() else float("nan"),
            "max_abs": float(pairs.max()) if pairs.numel() else float("nan"),
        }
        if self.dim:
            out["random_mean_abs"] = math.sqrt(2 / (math.pi * self.dim))  # E|cos| for d >> 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": self.values.tolist(),
            "a_label": self.a_label,
            "b_label": self.b_label,
            "kind": self.kind,
            "dim": self.dim,
            "same": self.same,
            "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CosineMatrix:
        """Inverse of `to_dict` (the summary is recomputed, not read)."""
        return cls(
            values=torch.tensor(d["values"], dtype=torch.float64),
            a_label=d["a_label"],
            b_label=d["b_label"],
            kind=d["kind"],
            dim=int(d["dim"]),
            same=bool(d["same"]),
        )

    def table(self, limit: int | None = None) -> str:
        """The matrix, rows = A, columns = B (at most `limit` of each)."""
        v = self.values
        rows, cols = v.shape
        r, c = (rows, cols) if limit is None else (min(rows, limit), min(cols, limit))
        lines = [
            f"{self.a_label[:8]:>8}\\{self.b_label[:8]:<8}" + "".join(f"{j:>7}" for j in range(c))
        ]
        lines += [f"{i:>17}" + "".join(f"{float(x):7.2f}" for x in v[i, :c]) for i in range(r)]
        if r < rows or c < cols:
            lines.append(f"{'':>17} ... ({rows} x {cols}; showing {r} x {c})")
        return "\n".join(lines)

    def __str__(self) -> str:
        s = self.summary()
        what = "off-diagonal" if self.same else "all"
        head = (
            f"cosine similarity of {self.kind}: {self.a_label} ({self.values.shape[0]}) vs "
            f"{self.b_label} ({self.values.shape[1]}); {what} pairs: mean |cos| "
            f"{s['mean_abs']:.3f}, max |cos| {s['max_abs']:.3f}"
        )
        if "random_mean_abs" in s:
            head += f" (random directions in d={self.dim}: mean |cos| ≈ {s['random_mean_abs']:.3f})"
        return head + "\n" + self.table(_MAX_SHOWN)


def cosine_matrix(a: VectorSet, b: VectorSet | None = None) -> CosineMatrix:
    """Cosine similarity between every vector of `a` and every vector of `b` (default a).

    Args:
        a: vectors (a `SteeringVectors` or a [n, d] tensor).
        b: other vectors of the same width (default: `a` itself).

    Returns:
        `CosineMatrix` with `values[i, j]` = cos(a_i, b_j).

    Examples:
        >>> cm = cosine_matrix(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        >>> [[round(x, 4) for x in row] for row in cm.values.tolist()]
        [[1.0, 0.7071], [0.7071, 1.0]]
    """
    ma = _matrix(a)
    mb = ma if b is None else _matrix(b)
    return CosineMatrix(
        values=_cos(ma, mb),
        a_label=_label(a, "A"),
        b_label=_label(a, "A") if b is None else _label(b, "B"),
        kind="vectors",
        dim=ma.shape[-1],
        same=b is None,
    )


def _deltas(
    model: Host, vectors: VectorSet, prompts: PromptSet, target: HookSite, site: HookSite | None
) -> Float[Tensor, "n flat"]:
    """Target-layer deltas of each vector, at the prompts' target positions, flattened."""
    if isinstance(vectors, Perturbation) and not isinstance(vectors, SteeringVectors):
        return perturbation_deltas(model, vectors, prompts, target)  # adapters, edits, ...
    if isinstance(vectors, SteeringVectors):
        source = vectors.site
    elif site is None:
        raise ValueError("plain tensors need site=HookSite(...) saying where they are added")
    else:
        source = site
    v = torch.as_tensor(vectors.vectors if isinstance(vectors, SteeringVectors) else vectors)
    v = v[None] if v.ndim == 1 else v
    segment = Segment(model, source, target, prompts)
    mask = prompts.target_mask.to(segment.unsteered.device)
    out = []
    with torch.no_grad():
        for chunk in v.split(8):
            z = segment.run(chunk.to(segment.unsteered))
            out.append((z - segment.unsteered)[:, mask].flatten(1).to("cpu", torch.float64))
    return torch.cat(out)


def delta_similarity(
    model: Host,
    prompts: PromptSet,
    a: VectorSet,
    b: VectorSet | None = None,
    *,
    target: HookSite | str | int | None = None,
    site: HookSite | str | int | None = None,
) -> CosineMatrix:
    """Cosine similarity of the target-layer deltas Z(θ) − Z(0) of two vector sets.

    Each set is added at its own site (`SteeringVectors.site`; `site=` for plain
    tensors) and both are read at the same `target` (default: the artifacts' target).
    Deltas are taken at the prompts' target positions and flattened, so two vectors
    match when they move those positions the same way.

    Args:
        model: The model.
        prompts: The prompts the deltas are taken on.
        a: Steering vectors, or a [k, d_model] tensor with `site`.
        b: The second set (None: `a` with itself).
        target: Where deltas are read (default: the artifacts' target).
        site: Where plain tensors are added.

    Returns:
        The cosine matrix of the flattened deltas.

    Raises:
        ValueError: No target or site is given or known.

    Examples:
        >>> dm = delta_similarity(model, prompts, melbo, supervised)
        >>> dm.summary()["mean_abs"] <= 1.0
        True
    """
    targets: set[HookSite] = set()
    for x in (a, b):
        recorded = getattr(x, "target", None)
        if isinstance(recorded, HookSite):
            targets.add(recorded)
    if target is not None:
        tgt = as_site(target)
    elif len(targets) == 1:
        tgt = targets.pop()
    else:
        raise ValueError(
            "pass target=HookSite(...): "
            + ("the two artifacts have different targets" if targets else "no target is recorded")
        )
    src = None if site is None else as_site(site)
    da = _deltas(model, a, prompts, tgt, src)
    db = da if b is None else _deltas(model, b, prompts, tgt, src)
    return CosineMatrix(
        values=_cos(da, db),
        a_label=_label(a, "A"),
        b_label=_label(a, "A") if b is None else _label(b, "B"),
        kind=f"deltas at {tgt.name}",
        dim=0,
        same=b is None,
    )


# ---------------------------------------------------------------------- subspaces
def _basis(m: Tensor, rtol: float) -> Tensor:
    """Orthonormal columns spanning the rows of m, dropping directions below rtol·σ_max."""
    u, s, _ = torch.linalg.svd(m.T, full_matrices=False)
    rank = int((s > rtol * s[0]).sum()) if s[0] > 0 else 0
    if rank == 0:
        raise ValueError("a vector set is all zeros; it spans no subspace")
    return u[:, :rank]


@dataclass
class PrincipalAngles:
    """Principal angles (radians, ascending) between span(A) and span(B).

    There are min(rank_a, rank_b) of them; `dim` is the ambient width.
    """

    angles: Float[Tensor, " k"]
    rank_a: int
    rank_b: int
    dim: int

    @property
    def degrees(self) -> Tensor:
        return torch.rad2deg(self.angles)

    @property
    def cosines(self) -> Tensor:
        return torch.cos(self.angles)

    def to_dict(self) -> dict[str, Any]:
        return {
            "angles": self.angles.tolist(),
            "degrees": self.degrees.tolist(),
            "rank_a": self.rank_a,
            "rank_b": self.rank_b,
            "dim": self.dim,
        }

    def __str__(self) -> str:
        shown = " ".join(f"{float(x):.1f}" for x in self.degrees[: 4 * _MAX_SHOWN])
        more = " ..." if len(self.angles) > 4 * _MAX_SHOWN else ""
        return (
            f"principal angles between span(A) (rank {self.rank_a}) and span(B) "
            f"(rank {self.rank_b}) in d={self.dim}, degrees: {shown}{more}"
        )


def principal_angles(a: VectorSet, b: VectorSet, *, rtol: float = 1e-10) -> PrincipalAngles:
    """Principal angles between the spans of two vector sets.

    With orthonormal bases Q_a, Q_b, the cosines are the singular values of Q_aᵀQ_b and
    the sines those of the smaller basis minus its projection on the larger one; the
    angle is atan2(sin, cos), accurate for small and for right angles alike (arccos of
    the cosine alone loses small angles to rounding). Computed in float64.

    Args:
        a: Steering vectors or a [k, d_model] tensor.
        b: Likewise.
        rtol: Singular values below `rtol × the largest` count as rank-deficient.

    Returns:
        The angles (radians and degrees), smallest first.

    Examples:
        >>> pa = principal_angles(torch.eye(3)[:2], torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]]))
        >>> [round(x, 4) for x in pa.degrees.tolist()]
        [0.0, 45.0]
    """
    ma, mb = _matrix(a), _matrix(b)
    if ma.shape[-1] != mb.shape[-1]:
        raise ValueError(f"widths differ: {ma.shape[-1]} and {mb.shape[-1]}")
    qa, qb = _basis(ma, rtol), _basis(mb, rtol)
    small, large = (qa, qb) if qa.shape[1] <= qb.shape[1] else (qb, qa)
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(0, 1)  # descending
    sin = torch.linalg.svdvals(small - large @ (large.T @ small)).clamp(0, 1).flip(0)  # ascending
    return PrincipalAngles(
        angles=torch.atan2(sin, cos), rank_a=qa.shape[1], rank_b=qb.shape[1], dim=ma.shape[-1]
    )


# ---------------------------------------------------------------------- nearest matches
@dataclass
class NearestMatches:
    """For each vector i of A: `index[i]`, the vector of B with the largest |cos|, and
    `cosine[i]`, that (signed) cosine."""

    index: list[int]
    cosine: list[float]
    a_label: str = "A"
    b_label: str = "B"

    @property
    def sign(self) -> list[int]:
        return [1 if c >= 0 else -1 for c in self.cosine]

    @property
    def one_to_one(self) -> bool:
        """True when no vector of B is the best match of two vectors of A."""
        return len(set(self.index)) == len(self.index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "cosine": self.cosine,
            "sign": self.sign,
            "one_to_one": self.one_to_one,
            "a_label": self.a_label,
            "b_label": self.b_label,
        }

    def table(self) -> str:
        head = f"{self.a_label[:10]:>10}  {'best ' + self.b_label[:10]:>15}  {'cos':>7}  sign"
        rows = [
            f"{i:>10}  {j:>15}  {c:7.3f}  {'+' if c >= 0 else '-'}"
            for i, (j, c) in enumerate(zip(self.index, self.cosine, strict=True))
        ]
        return "\n".join([head, *rows])

    def __str__(self) -> str:
        note = "" if self.one_to_one else " (not one-to-one: some vectors share a best match)"
        return f"nearest match in {self.b_label} for each vector of {self.a_label}{note}\n" + (
            self.table()
        )


def nearest_matches(a: VectorSet, b: VectorSet) -> NearestMatches:
    """For each vector of `a`, the vector of `b` with the largest |cos|, and its sign.

    Args:
        a: Steering vectors or a [k, d_model] tensor.
        b: The set searched, likewise.

    Returns:
        Per vector of `a`: the index of its match in `b`, the |cos| and the sign.

    Examples:
        >>> nm = nearest_matches(torch.eye(2), torch.tensor([[0.0, -1.0], [2.0, 0.0]]))
        >>> nm.index, nm.sign
        ([1, 0], [1, -1])
    """
    values = cosine_matrix(a, b).values
    best = values.abs().argmax(dim=1)
    return NearestMatches(
        index=best.tolist(),
        cosine=values.gather(1, best[:, None])[:, 0].tolist(),
        a_label=_label(a, "A"),
        b_label=_label(b, "B"),
    )


# ---------------------------------------------------------------------- all together
@dataclass
class VectorComparison:
    """Cosines, nearest matches, principal angles and (optionally) delta cosines of A vs B."""

    cosines: CosineMatrix
    nearest: NearestMatches
    angles: PrincipalAngles
    deltas: CosineMatrix | None = None
    delta_nearest: NearestMatches | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "cosines": self.cosines.to_dict(),
            "nearest": self.nearest.to_dict(),
            "angles": self.angles.to_dict(),
            "deltas": None if self.deltas is None else self.deltas.to_dict(),
            "delta_nearest": None if self.delta_nearest is None else self.delta_nearest.to_dict(),
        }

    def __str__(self) -> str:
        parts = [str(self.cosines), str(self.nearest), str(self.angles)]
        if self.deltas is not None:
            parts.append(str(self.deltas))
        if self.delta_nearest is not None:
            parts.append(str(self.delta_nearest))
        return "\n\n".join(parts)


def compare_vectors(
    a: VectorSet,
    b: VectorSet,
    *,
    model: Host | None = None,
    prompts: PromptSet | None = None,
    target: HookSite | str | int | None = None,
    labels: tuple[str, str] | None = None,
) -> VectorComparison:
    """Everything above for two sets; delta similarity too when a model and prompts are given.

    `labels` names the two sets in the printout (default: their methods, or "A" / "B").

    Args:
        a: the first set (a `SteeringVectors` or a [n, d] tensor).
        b: the second set, of the same width.
        model: with `prompts`, also compare the vectors' target-layer deltas.
        prompts: the prompts the deltas are measured on.
        target: where the deltas are read (default: the vectors' own target).
        labels: the two sets' names in the printout.

    Returns:
        `VectorComparison`: cosines, nearest matches, principal angles and, with a
        model, the delta similarity.

    Raises:
        ValueError: only one of `model` and `prompts` given, or widths that differ.

    Examples:
        >>> cmp = compare_vectors(vectors[:2], vectors[2:], model=model, prompts=prompts)
        >>> "cos" in str(cmp)
        True

        Files compare the same way, `compare_vectors(SteeringVectors.load("a.safetensors"),
        SteeringVectors.load("b.safetensors"))`, and `melbo-lens compare A B` prints it.
    """
    if (model is None) != (prompts is None):
        raise ValueError("delta similarity needs both model= and prompts=")
    la, lb = labels if labels is not None else (_label(a, "A"), _label(b, "B"))
    deltas = delta_nearest = None
    if model is not None and prompts is not None:
        deltas = delta_similarity(model, prompts, a, b, target=target)
        best = deltas.values.abs().argmax(dim=1)
        delta_nearest = NearestMatches(
            index=best.tolist(),
            cosine=deltas.values.gather(1, best[:, None])[:, 0].tolist(),
            a_label=f"{la} deltas",
            b_label=f"{lb} deltas",
        )
        deltas = replace(deltas, a_label=la, b_label=lb)
    return VectorComparison(
        cosines=replace(cosine_matrix(a, b), a_label=la, b_label=lb),
        nearest=replace(nearest_matches(a, b), a_label=la, b_label=lb),
        angles=principal_angles(a, b),
        deltas=deltas,
        delta_nearest=delta_nearest,
    )
