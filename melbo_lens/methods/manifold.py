"""On-manifold vectors: θ kept in the span of the prompts' top activation directions.

The MELBO discussion suggests restricting a steering vector to the top singular subspace
of the prompts' activations at the source (an "SVD of the token x activation matrix"),
so that the steered activations stay near the data manifold. Here that subspace is

    U_k = the top-k right singular vectors of X,   X = [Z_t^(i)] over the prompts' real
                                                        tokens at the source  (N x d)

X is not centred (the seed's "token x activation matrix"; the mean direction is part of
the manifold), and positions with an outlier norm (the attention sink, `core.outliers`)
are left out: one sink token would otherwise be the top direction by itself.

`MelboConfig(on_manifold=k)` trains vectors on the sphere of radius R *within* span(U_k):
the family projects θ and its gradient onto the subspace before the sphere's retraction
and tangent projection, so every solver and orthogonality mode works unchanged (members
orthogonal to each other inside the subspace). The basis is recorded in the artifact
(`SteeringVectors.subspace`).

`subspace_share(vectors, basis)` = ||U_kᵀθ||² / ||θ||² measures any vector against such a
basis: 1 for an on-manifold vector, k/d in expectation for an isotropic random one.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.outliers import norm_outliers
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import run_to_site
from melbo_lens.core.sites import HookSite

__all__ = ["activation_subspace", "project_to_subspace", "subspace_share"]


@torch.no_grad()
def activation_subspace(
    model: Host, prompts: PromptSet, site: HookSite, k: int
) -> Float[Tensor, "d_model k"]:
    """Orthonormal basis [d_model, k] of the top-k right singular vectors of the prompts'
    activations at `site` (real tokens, outlier-norm positions left out; float32).

    Examples:
        >>> basis = activation_subspace(model, prompts, HookSite(1), 4)
        >>> basis.shape, bool(torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5))
        (torch.Size([32, 4]), True)
    """
    z = run_to_site(model, prompts.tokens, prompts.attention_mask, site.name).float()
    mask = prompts.attention_mask.bool().to(z.device)
    keep = mask & ~norm_outliers(z.norm(dim=-1) * mask, mask)
    rows = z[keep]
    if not 1 <= k <= min(rows.shape):
        raise ValueError(
            f"on_manifold must be between 1 and {min(rows.shape)} (the rank bound of "
            f"{rows.shape[0]} tokens x d_model {rows.shape[1]} at {site.name}), got {k}; "
            "use a smaller k or more prompts"
        )
    _, _, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    return vh[:k].T.float().contiguous()


def project_to_subspace(
    x: Float[Tensor, "... d_model"], basis: Float[Tensor, "d_model k"]
) -> Float[Tensor, "... d_model"]:
    """x projected onto span(basis) (orthonormal columns): U Uᵀ x.

    Examples:
        >>> basis = torch.eye(3)[:, :2]
        >>> project_to_subspace(torch.tensor([1.0, 2.0, 3.0]), basis).tolist()
        [1.0, 2.0, 0.0]
    """
    basis = basis.to(device=x.device, dtype=x.dtype)
    return (x @ basis) @ basis.T


def subspace_share(
    vectors: Float[Tensor, "n d_model"], basis: Float[Tensor, "d_model k"]
) -> Float[Tensor, " n"]:
    """Share of each vector's squared norm inside span(basis): ||Uᵀθ||² / ||θ||².

    Examples:
        >>> basis = torch.eye(4)[:, :1]
        >>> subspace_share(torch.tensor([[3.0, 4.0, 0.0, 0.0]]), basis).tolist()
        [0.36000001430511475]
    """
    v = vectors.float()
    inside = (v @ basis.to(device=v.device, dtype=v.dtype)).pow(2).sum(-1)
    return inside / v.pow(2).sum(-1)
