"""Health checks: a step whose objective, gradient or parameters are NaN/inf or zero is
an error that names the step and the member, raised before anything is saved, so a
checkpoint never holds NaN. The per-step check is one reduction and one host sync."""

from __future__ import annotations

import torch
from torch import Tensor

from melbo_lens.methods.training.family import Params

__all__ = ["TrainingError", "check_finite", "member_problems", "raise_problems"]


class TrainingError(RuntimeError):
    """Training produced NaN/inf or otherwise cannot continue."""


ADVICE = (
    "try a smaller radius or lr, a float32 model, or check the prompts for overflow "
    "(the last checkpoint, if one was given, holds only finite values)"
)
PROBLEMS = (
    "objective is NaN/inf or zero (zero: no change reaches the target)",
    "gradient is NaN/inf or zero",
    "parameters are NaN/inf or zero",
)


def check_finite(
    losses: Tensor, indices: list[int], upto: int, first_step: int, noun: str = "vector"
) -> None:
    """Raise TrainingError naming the first step and row whose objective is NaN/inf."""
    bad = ~torch.isfinite(losses[indices, first_step:upto])
    if bad.any():
        row, col = (int(x) for x in torch.nonzero(bad)[0])
        raise TrainingError(
            f"objective became NaN/inf at step {first_step + col} for {noun} {indices[row]}; "
            + ADVICE
        )


def member_problems(objective: Tensor, grads: Params, directions: Tensor) -> Tensor:
    """Per member, one bit per entry of `PROBLEMS` (0 = healthy), without a host sync:
    a zero objective or gradient means the perturbation does not reach the target."""
    k = objective.shape[0]
    obj_bad = ~torch.isfinite(objective) | (objective == 0)
    finite = torch.ones(k, dtype=torch.bool, device=objective.device)
    zero = torch.ones_like(finite)
    for g in grads.values():
        flat = g.reshape(k, -1)
        finite &= torch.isfinite(flat).all(1)
        zero &= (flat == 0).all(1)
    norms = directions.reshape(k, directions.shape[1], -1).norm(dim=-1)
    param_bad = ~(torch.isfinite(norms) & (norms > 0)).all(1)
    return obj_bad.int() | (~finite | zero).int() << 1 | param_bad.int() << 2


def raise_problems(codes: Tensor, labels: list[str], step: int) -> None:
    """Raise TrainingError for the first member with a non-zero code."""
    row = int(torch.nonzero(codes)[0])
    what = [p for bit, p in enumerate(PROBLEMS) if int(codes[row]) >> bit & 1]
    raise TrainingError(f"at step {step} for {labels[row]}: {'; '.join(what)}; " + ADVICE)
