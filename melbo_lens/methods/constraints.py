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
]


def to_sphere(vectors: Float[Tensor, "*k d"], radius: float) -> Float[Tensor, "*k d"]:
    """Rescale each row to norm `radius`.

    Examples:
        >>> to_sphere(torch.tensor([[3.0, 4.0]]), 10.0)
        tensor([[6., 8.]])
    """
    return radius * torch.nn.functional.normalize(vectors, dim=-1)


def tangent_project(
    grad: Float[Tensor, "*k d"], vectors: Float[Tensor, "*k d"]
) -> Float[Tensor, "*k d"]:
    """Remove from each gradient row its component along the matching vector row.

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
    grad: Float[Tensor, "k d"], unit_vectors: Float[Tensor, "k d"]
) -> Float[Tensor, "k d"]:
    """Row k of `grad` minus its components along unit rows 0..k-1 (orthonormal rows).

    Examples:
        >>> project_out_earlier(torch.ones(2, 2), torch.eye(2))
        tensor([[1., 1.],
                [0., 1.]])
    """
    coeff = grad @ unit_vectors.T  # [k, k]: coeff[k, j] = g_k · u_j
    coeff = torch.tril(coeff, diagonal=-1)  # keep j < k
    return grad - coeff @ unit_vectors
