"""What the loop maximises: an objective is a small object, not a branch in the loop.

Each takes a segment (the prompts, their target mask and the unperturbed target
activations) and the members' target activations z [k, n, pos, d] and returns one
value per member. `couples_prompts` says whether a member's value needs all its
prompts in one pass (then a step cannot be split across prompt blocks):

* `melbo`: Σ_i (Σ_t ||Δ_t||^p)^(1/q), the MELBO objective (a sum over prompts);
* `consistency`: the mean pairwise cosine of the prompts' mean target deltas
  (`methods.objectives.consistency_per_member`): one consistent effect, whatever its
  size (the sphere fixes the size of θ);
* `melbo+consistency`: MELBO's value plus `weight` × (its value, held constant) ×
  consistency, so with weight 1 a perfectly consistent direction counts double.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.segment import Segment
from melbo_lens.methods.objectives import consistency_per_member, melbo_objective_per_prompt

__all__ = ["OBJECTIVES", "Consistency", "Melbo", "Objective", "make_objective"]

OBJECTIVES = ("melbo", "consistency", "melbo+consistency")


class Objective(Protocol):
    """One value per member from its target activations (larger is better)."""

    @property
    def name(self) -> str: ...

    @property
    def couples_prompts(self) -> bool:
        """Whether a member's value needs all its prompts in one pass."""
        ...

    def __call__(
        self, segment: Segment, z: Float[Tensor, "k n pos d_model"]
    ) -> Float[Tensor, " k"]: ...

    def check(self, n_prompts: int) -> None:
        """Refuse, before training, a prompt set this objective cannot use."""
        ...


def _operands(segment: Segment, z: Tensor) -> tuple[Tensor, Tensor]:
    # on a model split over devices z comes from the target block's device
    mask = segment.prompts.target_mask.to(z.device).expand(z.shape[:-1])
    return segment.unsteered.to(z.device).expand_as(z), mask


@dataclass(frozen=True)
class Melbo:
    """MELBO's objective (see the module docstring)."""

    power: float = 2.0
    q: float = 1.0
    name: str = "melbo"
    couples_prompts: bool = False

    def __call__(self, segment: Segment, z: Tensor) -> Tensor:
        unsteered, mask = _operands(segment, z)
        per_prompt = melbo_objective_per_prompt(z, unsteered, mask, power=self.power, q=self.q)
        return per_prompt.sum(-1)

    def check(self, n_prompts: int) -> None:
        return None


@dataclass(frozen=True)
class Consistency:
    """The consistency objective, alone (`weight=None`) or added to MELBO's."""

    weight: float | None = None
    power: float = 2.0
    q: float = 1.0
    name: str = "consistency"
    couples_prompts: bool = True

    def __call__(self, segment: Segment, z: Tensor) -> Tensor:
        unsteered, mask = _operands(segment, z)
        c = consistency_per_member(z, unsteered, mask)
        if self.weight is None:
            return c
        melbo = melbo_objective_per_prompt(z, unsteered, mask, power=self.power, q=self.q).sum(-1)
        return melbo + self.weight * melbo.detach().abs() * c

    def check(self, n_prompts: int) -> None:
        if n_prompts < 2:
            raise ValueError(
                f"objective={self.name!r} compares prompts with each other and needs at least "
                f"2 prompts, got {n_prompts}; add prompts or use objective='melbo'"
            )


def make_objective(name: str, *, power: float, q: float, weight: float) -> Objective:
    """The objective called `name` (one of `OBJECTIVES`)."""
    if name == "melbo":
        return Melbo(power, q)
    if name == "consistency":
        return Consistency(None, power, q)
    if name == "melbo+consistency":
        return Consistency(weight, power, q, name="melbo+consistency")
    raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {name!r}")
