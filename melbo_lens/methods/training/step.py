"""One step's objective and gradients: MELBO's objective of each member, the soft
orthogonality penalty, and gradient accumulation over passes of at most `max_rows`
rows (the objective is a sum over members and prompts, so the pieces add up to one
pass)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.segment import Segment
from melbo_lens.methods.objectives import cosine_penalty
from melbo_lens.methods.training.group import Group
from melbo_lens.methods.training.spec import LoopSpec

__all__ = ["backward", "objective_of", "pieces"]


def objective_of(
    segment: Segment, z: Float[Tensor, "k n pos d_model"], spec: LoopSpec
) -> Float[Tensor, " k"]:
    """The run's objective (`spec.objective`) of each member from its target
    activations z [k, n, pos, d]."""
    return spec.objective(segment, z)


def _loss(segment: Segment, group: Group, spec: LoopSpec) -> tuple[Tensor, Tensor]:
    z = group.family.target(segment, group.params)
    objective = objective_of(segment, z, spec)
    loss = -objective.sum()
    if spec.orthogonal == "soft" and objective.shape[0] > 1:
        if spec.soft_on == "vectors":
            penalty = cosine_penalty(group.family.directions(group.params).flatten(1))
        else:
            m = segment.prompts.target_mask[None, :, :, None]
            penalty = cosine_penalty(((z - segment.unsteered) * m).flatten(1))
        loss = loss + spec.soft_weight * objective.detach().mean() * penalty
    return loss, objective.detach()


def pieces(k: int, n: int, max_rows: int | None) -> list[tuple[slice, Tensor | None]]:
    """(members, prompts or None for all) pieces that cover k × n rows, each at most
    `max_rows` rows: whole members while a member's n rows fit, else prompt blocks.

    Examples:
        >>> [(p.start, p.stop) for p, _ in pieces(4, 3, 6)]
        [(0, 2), (2, 4)]
        >>> [(m.start, i.tolist()) for m, i in pieces(1, 5, 2)]
        [(0, [0, 1]), (0, [2, 3]), (0, [4])]
    """
    if max_rows is None or k * n <= max_rows:
        return [(slice(0, k), None)]
    if n <= max_rows:
        m = max_rows // n
        return [(slice(lo, min(lo + m, k)), None) for lo in range(0, k, m)]
    return [
        (slice(j, j + 1), torch.arange(lo, min(lo + max_rows, n)))
        for j in range(k)
        for lo in range(0, n, max_rows)
    ]


def backward(segment: Segment, group: Group, spec: LoopSpec, max_rows: int | None) -> Tensor:
    """Gradients of the step's loss in `group`'s parameters, in passes of at most
    `max_rows` rows; returns each member's objective."""
    k = next(iter(group.params.values())).shape[0]
    parts = pieces(k, len(segment.prompts), max_rows)
    if len(parts) == 1:
        loss, objective = _loss(segment, group, spec)
        loss.backward()
        return objective
    if spec.orthogonal == "soft" and spec.soft_on == "deltas":
        raise ValueError(
            "soft_on='deltas' compares every member's target deltas, so a step cannot be "
            "split into passes; use soft_on='vectors', or a larger max_rows_per_pass"
        )
    if spec.objective.couples_prompts and any(index is not None for _, index in parts):
        raise ValueError(
            f"objective={spec.objective.name!r} compares a member's effect across all its "
            f"prompts, so one member's prompts cannot be split into passes; use a "
            f"max_rows_per_pass of at least {len(segment.prompts)} (the prompts), or "
            "objective='melbo'"
        )
    objective = torch.zeros(k, device=segment.unsteered.device)
    for members, prompt_index in parts:
        part = segment if prompt_index is None else segment.subset(prompt_index)
        params = {name: p[members] for name, p in group.params.items()}
        obj = objective_of(part, group.family.target(part, params), spec)
        (-obj.sum()).backward()
        objective[members] += obj.detach()
    if spec.orthogonal == "soft" and k > 1:
        penalty = cosine_penalty(group.family.directions(group.params).flatten(1))
        (spec.soft_weight * objective.mean() * penalty).backward()
    return objective
