"""The MELBO objective: how much a perturbation moves the target activations.

For prompts i with target positions I_i, exponents p (`power`) and q:

    Σ_i ( Σ_{t ∈ I_i} || Z_t^(i)(θ) − Z_t^(i)(0) ||₂^p )^(1/q)

The norm is per token over d_model. The functions here are pure: tensors in, tensors out.
Padding and non-target positions are excluded *before* any power is taken, so they
contribute neither value nor (NaN) gradient.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from melbo_lens.core.segment import Segment

__all__ = [
    "consistency_per_member",
    "cosine_penalty",
    "melbo_objective",
    "melbo_objective_per_prompt",
]


def melbo_objective_per_prompt(
    steered: Float[Tensor, "*batch pos d_model"],
    unsteered: Float[Tensor, "*batch pos d_model"],
    mask: Bool[Tensor, "*batch pos"],
    *,
    power: float = 2.0,
    q: float = 1.0,
) -> Float[Tensor, "*batch"]:
    """(Σ_t mask·||steered − unsteered||₂^power)^(1/q) for each prompt (leading dims kept).

    Args:
        steered: target activations with the perturbation (any leading dims).
        unsteered: the same without it.
        mask: the target positions.
        power: p, the per-position change ||Δ||^p.
        q: the per-prompt sum to the power 1/q.

    Returns:
        One value per prompt (the leading dims kept).

    Examples:
        >>> s = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]]); u = torch.zeros_like(s)
        >>> melbo_objective_per_prompt(s, u, torch.tensor([[True, False]]))
        tensor([25.])
    """
    if power <= 0 or q <= 0:
        raise ValueError(f"power and q must be > 0, got {power=} {q=}")
    if steered.shape != unsteered.shape:
        raise ValueError(
            f"steered {tuple(steered.shape)} and unsteered {tuple(unsteered.shape)} differ"
        )
    if mask.shape != steered.shape[:-1]:
        raise ValueError(
            f"mask must be [*batch, pos] = {tuple(steered.shape[:-1])}, got {tuple(mask.shape)}"
        )
    if steered.dtype in (torch.float16, torch.bfloat16):
        steered = steered.float()  # subtract and accumulate low-precision activations in fp32
    delta = steered - unsteered.to(steered.dtype)
    sq = delta.pow(2).sum(-1)  # ||Δ_t||² per token
    safe = torch.where(mask, sq, torch.ones_like(sq))  # no pow() of 0 off the mask
    per_token = torch.where(mask, safe.pow(power / 2), torch.zeros_like(sq))
    total = per_token.sum(-1)
    return total if q == 1.0 else total.pow(1.0 / q)


def melbo_objective(
    steered: Float[Tensor, "batch pos d_model"],
    unsteered: Float[Tensor, "batch pos d_model"],
    mask: Bool[Tensor, "batch pos"],
    *,
    power: float = 2.0,
    q: float = 1.0,
) -> Float[Tensor, ""]:
    """Σ_i (Σ_t mask[i,t]·||steered[i,t] − unsteered[i,t]||₂^power)^(1/q).

    Args:
        steered: target activations with the perturbation.
        unsteered: the same without it.
        mask: the target positions (True where the change counts).
        power: p, the per-position change ||Δ||^p.
        q: the per-prompt sum to the power 1/q.

    Returns:
        The objective, summed over prompts (a scalar).

    Examples:
        >>> s = torch.ones(2, 3, 4); u = torch.zeros(2, 3, 4)
        >>> m = torch.tensor([[True, True, False], [True, False, False]])
        >>> float(melbo_objective(s, u, m, power=2.0, q=1.0))   # 3 tokens x ||1||²=4
        12.0
    """
    return melbo_objective_per_prompt(steered, unsteered, mask, power=power, q=q).sum()


def consistency_per_member(
    steered: Float[Tensor, "*members n pos d_model"],
    unsteered: Float[Tensor, "*members n pos d_model"],
    mask: Bool[Tensor, "*members n pos"],
) -> Float[Tensor, "*members"]:
    """How alike a perturbation's effect is across prompts: the mean pairwise cosine
    between the prompts' mean target deltas d_i = mean_{t ∈ I_i} (Z_t(θ) − Z_t(0)),

        C = 1/(n(n−1)) Σ_{i≠j} cos(d_i, d_j)   ∈ [−1, 1],

    1 when every prompt's target moves the same way (the cross-prompt term of NoiseCLR-
    style objectives), about 0 when the moves are unrelated. Needs n >= 2 prompts; a
    prompt whose delta is zero counts as cosine 0 with every other.

    Examples:
        >>> u = torch.zeros(2, 1, 2)                      # 2 prompts, 1 position, d=2
        >>> m = torch.ones(2, 1, dtype=torch.bool)
        >>> same = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]]])
        >>> opposite = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]])
        >>> float(consistency_per_member(same, u, m)), float(consistency_per_member(opposite, u, m))
        (1.0, -1.0)
    """
    n = steered.shape[-3]
    if n < 2:
        raise ValueError(
            f"the consistency objective compares prompts with each other and needs at least 2, "
            f"got {n}; add prompts or use objective='melbo'"
        )
    if steered.dtype in (torch.float16, torch.bfloat16):
        steered = steered.float()
    m = mask[..., None].to(steered.dtype)
    delta = (steered - unsteered.to(steered.dtype)) * m
    mean = delta.sum(-2) / m.sum(-2).clamp_min(1.0)  # [*members, n, d]
    unit = torch.nn.functional.normalize(mean, dim=-1)
    gram = unit @ unit.transpose(-1, -2)
    off = gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off / (n * (n - 1))


def cosine_penalty(vectors: Float[Tensor, "k d"]) -> Float[Tensor, ""]:
    """Σ_{j<k} cos²(v_j, v_k): zero exactly when the rows are pairwise orthogonal.

    Args:
        vectors: k rows (flattened after the first dim).

    Returns:
        The sum of squared pairwise cosines (a scalar).

    Examples:
        >>> float(cosine_penalty(torch.eye(3)))
        0.0
        >>> round(float(cosine_penalty(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))), 6)
        0.5
    """
    unit = torch.nn.functional.normalize(vectors.float().flatten(1), dim=-1)
    gram = unit @ unit.T
    return torch.triu(gram, diagonal=1).pow(2).sum()


@torch.no_grad()
def segment_objectives(
    segment: Segment,
    vectors: Float[Tensor, "k d_model"],
    *,
    power: float = 2.0,
    q: float = 1.0,
    chunk: int = 8,
) -> Float[Tensor, " k"]:
    """MELBO's objective of each vector over a `Segment`'s prompts, without gradients,
    `chunk` vectors per forward pass."""
    out = []
    for part in vectors.split(chunk):
        z = segment.run(part.to(segment.unsteered))
        mask = segment.prompts.target_mask.to(z.device).expand(z.shape[:-1])
        per = melbo_objective_per_prompt(z, segment.unsteered.expand_as(z), mask, power=power, q=q)
        out.append(per.sum(-1))
    return torch.cat(out)
