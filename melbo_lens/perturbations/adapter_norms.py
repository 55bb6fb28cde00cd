# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""What fixes a steering adapter's size: unit columns of its factors ("columns", the
MELBO write-up's), or the Frobenius or spectral norm of its weight edit Ω_A Ω_Bᵀ.

The norms come from r x r matrices: Ω_A Ω_Bᵀ = Q_A (R_A R_Bᵀ) Q_Bᵀ (thin QR) has the
singular values of R_A R_Bᵀ, and ||Ω_A Ω_Bᵀ||_F² = tr((Ω_AᵀΩ_A)(Ω_BᵀΩ_B)); both are
differentiable, so training can divide by them.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["NORMALIZATIONS", "edit_norm", "normalized_factors"]

NORMALIZATIONS = ("columns", "frobenius", "spectral")


def edit_norm(
    omega_a: Float[Tensor, "*g d_mlp r"], omega_b: Float[Tensor, "*g d_model r"], normalization: str
) -> Float[Tensor, "*g"]:
    """||Ω_A Ω_Bᵀ|| in the norm `normalization` names (1 for "columns": the factors' unit
    columns fix the scale), from r x r matrices; differentiable.

    Examples:
        >>> a, b = torch.eye(4)[:, :2] * 3.0, torch.eye(3)[:, :2] * 2.0
        >>> [round(float(edit_norm(a, b, n)), 4) for n in ("frobenius", "spectral")]
        [8.4853, 6.0]
    """
    if normalization == "columns":
        return torch.ones(omega_a.shape[:-2], dtype=omega_a.dtype, device=omega_a.device)
    if normalization == "frobenius":  # tr((AᵀA)(BᵀB)) = ||A Bᵀ||_F²
        gram_a = omega_a.transpose(-1, -2) @ omega_a
        gram_b = omega_b.transpose(-1, -2) @ omega_b
        return (gram_a * gram_b).sum((-1, -2)).clamp_min(0).sqrt()
    if normalization == "spectral":
        r_a = torch.linalg.qr(omega_a)[1]
        r_b = torch.linalg.qr(omega_b)[1]
        return torch.linalg.matrix_norm(r_a @ r_b.transpose(-1, -2), ord=2)
    raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}")


def normalized_factors(
    omega_a: Float[Tensor, "*g d_mlp r"], omega_b: Float[Tensor, "*g d_model r"], normalization: str
) -> tuple[Tensor, Tensor]:
    """(Ω_A, Ω_B / ||Ω_A Ω_Bᵀ||): factors whose product has norm 1 in `normalization`
    (unchanged for "columns")."""
    if normalization == "columns":
        return omega_a, omega_b
    return omega_a, omega_b / edit_norm(omega_a, omega_b, normalization)[..., None, None]
