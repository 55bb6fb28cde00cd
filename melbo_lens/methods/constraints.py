"""Constraints on steering vectors: the sphere ||θ|| = R and mutual orthogonality.

MELBO keeps each vector on a sphere of radius R: its gradient is projected onto the
sphere's tangent space before the optimiser step and the vector is rescaled to R after
it. Hard orthogonality keeps vector k orthogonal to vectors 0..k-1: at initialisation,
on the gradient, and after the step. Applied to all K vectors at once in a fixed order,
this is Gram–Schmidt, which for a linear map behaves like sequential deflation.
All functions are pure and act on rows.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "to_sphere",
    "tangent_project",
    "project_out",
    "gram_schmidt",
    "project_out_earlier",
    "gram_schmidt_members",
]


def to_sphere(vectors: Float[Tensor, "*k d"], radius: float) -> Float[Tensor, "*k d"]:
    """Rescale each row to norm `radius`.

    Args:
        vectors: rows to rescale (any leading dims).
        radius: the norm each row gets.

    Returns:
        The rows, each of norm `radius`.

    Examples:
        >>> to_sphere(torch.tensor([[3.0, 4.0]]), 10.0)
        tensor([[6., 8.]])
    """
    return radius * torch.nn.functional.normalize(vectors, dim=-1)


def tangent_project(
    grad: Float[Tensor, "*k d"], vectors: Float[Tensor, "*k d"]
) -> Float[Tensor, "*k d"]:
    """Remove from each gradient row its component along the matching vector row.

    Args:
        grad: gradient rows.
        vectors: the matching points on the sphere (any norm).

    Returns:
        The gradient in each sphere's tangent space at its vector.

    Examples:
        >>> tangent_project(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]]))
        tensor([[0., 1.]])
    """
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    return grad - (grad * unit).sum(-1, keepdim=True) * unit


def project_out(
    vectors: Float[Tensor, "k d"], basis: Float[Tensor, "m d"] | None
) -> Float[Tensor, "k d"]:
    """Remove from every row its components along the orthonormal rows of `basis`."""
    if basis is None or basis.shape[0] == 0:
        return vectors
    return vectors - (vectors @ basis.T) @ basis


def gram_schmidt(vectors: Float[Tensor, "k d"]) -> Float[Tensor, "k d"]:
    """Orthonormalise rows in order (row k keeps its direction within span of rows ≤ k).

    Done as a QR factorisation with the signs fixed so that row k has a positive
    component along the input row k; no host synchronisation.

    Args:
        vectors: k rows of dimension d, k <= d.

    Returns:
        k orthonormal rows spanning the same nested subspaces.

    Raises:
        ValueError: more rows than dimensions.

    Examples:
        >>> gram_schmidt(torch.tensor([[2.0, 0.0], [1.0, 1.0]])).abs()
        tensor([[1., 0.],
                [0., 1.]])
    """
    if vectors.shape[0] > vectors.shape[1]:
        raise ValueError(
            f"cannot make {vectors.shape[0]} vectors of dimension {vectors.shape[1]} "
            "orthogonal; ask for at most d_model vectors"
        )
    q, r = torch.linalg.qr(vectors.T.double())
    sign = torch.sign(torch.diagonal(r))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (q * sign).T.to(vectors.dtype)


def project_out_earlier(
    grad: Float[Tensor, "k d"], unit_vectors: Float[Tensor, "k d"], group: int = 1
) -> Float[Tensor, "k d"]:
    """Row k of `grad` minus its components along unit rows 0..k-1 (orthonormal rows).

    With `group=m`, rows come in members of m consecutive rows and a row loses its
    components along every row of the *earlier members* (not its own member's rows).

    Examples:
        >>> project_out_earlier(torch.ones(2, 2), torch.eye(2))
        tensor([[1., 1.],
                [0., 1.]])
        >>> project_out_earlier(torch.ones(3, 3), torch.eye(3), group=2)[2].tolist()
        [0.0, 0.0, 1.0]
    """
    coeff = grad @ unit_vectors.T  # [k, k]: coeff[k, j] = g_k · u_j
    if group == 1:
        coeff = torch.tril(coeff, diagonal=-1)  # keep j < k
    else:
        member = torch.arange(grad.shape[0], device=grad.device) // group
        coeff = coeff * (member[:, None] > member[None, :])
    return grad - coeff @ unit_vectors


def gram_schmidt_members(
    directions: Float[Tensor, "k m d"], *, normalise: bool = False
) -> Float[Tensor, "k m d"]:
    """Member k's rows made orthogonal to every row of members 0..k-1, in order.

    With one row per member this is Gram–Schmidt up to each row's length (the caller
    retracts onto its sphere); with m rows per member (an adapter's Ω_B columns) a
    member's rows stay free among themselves. `normalise=True` returns instead the
    orthonormal rows (QR of all rows in order) that span members 0..k.

    Examples:
        >>> d = torch.tensor([[[2.0, 0.0]], [[1.0, 1.0]]])
        >>> gram_schmidt_members(d).tolist()
        [[[2.0, 0.0]], [[0.0, 1.0]]]
    """
    k, m, d = directions.shape
    flat = directions.reshape(k * m, d)
    q = gram_schmidt(flat)
    if normalise:
        return q.reshape(k, m, d)
    member = torch.arange(k * m, device=flat.device) // m
    coeff = (flat @ q.T) * (member[:, None] > member[None, :])
    return (flat - coeff @ q).reshape(k, m, d)
