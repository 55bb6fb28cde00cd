"""What the loop runs: the resolved settings of a method's config (`LoopSpec`) and the
schedule they imply (which members train together, in which phases, for how many
steps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.sites import HookSite
from melbo_lens.methods.training.objective import Melbo, Objective, make_objective

__all__ = ["LoopSpec", "groups_of", "phases", "plateaued"]


@dataclass(frozen=True)
class LoopSpec:
    """What the loop needs of a method's config (built by each `train_*` wrapper)."""

    n: int
    steps: int
    orthogonal: str  # "sequential" | "simultaneous" | "soft" | "none"
    solver: str  # "amsgrad" | "power"
    betas: tuple[float, float]
    amsgrad: bool
    soft_weight: float
    soft_on: str  # "vectors" (directions) | "deltas"
    per_batch: int | None
    source: HookSite
    target: HookSite
    starts: int = 1  # candidate starts per slot (orthogonal="sequential" only)
    slot_steps: int = 0  # steps between acceptances after the first (starts > 1)
    slot_tol: float = 0.0  # a window's slot ends when its best stops improving (`plateaued`)
    objective: Objective = Melbo()  # what each member maximises (`training.objective`)

    @property
    def windowed(self) -> bool:
        """Sequential slots filled from a window of `starts` candidates (see `Window`)."""
        return self.orthogonal == "sequential" and self.starts > 1

    @property
    def joint(self) -> bool:
        """Members kept apart by Gram–Schmidt in a fixed order each step."""
        return self.orthogonal == "simultaneous"

    @classmethod
    def of(cls, config: Any, *, n: int, per_batch: int | None) -> LoopSpec:
        """The loop settings of a method config (`MelboConfig`, `AdapterConfig`), which
        share these field names; `n` and `per_batch` are named differently per method."""
        return cls(
            n=n,
            steps=config.loop_steps(),
            orthogonal=config.orthogonal,
            solver=config.loop_solver(),
            betas=config.betas,
            amsgrad=config.uses_amsgrad,
            soft_weight=config.soft_weight,
            soft_on=config.soft_on,
            per_batch=per_batch,
            source=config.source,
            target=config.target,
            starts=config.starts,
            slot_steps=config.loop_slot_steps(),
            slot_tol=config.loop_slot_tol(),
            objective=make_objective(
                getattr(config, "objective", "melbo"),
                power=config.power,
                q=config.q,
                weight=getattr(config, "consistency_weight", 1.0),
            ),
        )


def groups_of(spec: LoopSpec) -> list[list[int]]:
    """Members that train together, in order."""
    if spec.orthogonal == "sequential":
        return [[k] for k in range(spec.n)]
    if spec.orthogonal in ("simultaneous", "soft"):
        if spec.per_batch is not None and spec.per_batch < spec.n:
            raise ValueError(
                f"orthogonal={spec.orthogonal!r} couples all members, so they must train in "
                f"one batch; got a per-batch limit of {spec.per_batch} < {spec.n}. Use "
                "orthogonal='sequential' to limit memory"
            )
        return [list(range(spec.n))]
    size = spec.per_batch or spec.n
    return [list(range(i, min(i + size, spec.n))) for i in range(0, spec.n, size)]


def phases(spec: LoopSpec) -> list[tuple[list[int], int]]:
    """(members a phase finishes, its steps), in order. Without a window a phase is a
    group of `groups_of`; with one, phase k fills slot k (`steps`, then `slot_steps`)."""
    if spec.windowed:
        return [([k], spec.steps if k == 0 else spec.slot_steps) for k in range(spec.n)]
    return [(indices, spec.steps) for indices in groups_of(spec)]


def plateaued(curve: Float[Tensor, " steps"], tol: float, span: int = 2) -> bool:
    """Whether a slot's best objective so far (`curve`: the best candidate's objective at
    each step of the phase) rose by at most `tol` of its value over the last `span`
    steps. `tol=0` never stops early. The rule reads only the record, so a resumed run
    stops where the uninterrupted one would.

    Examples:
        >>> plateaued(torch.tensor([1.0, 2.0, 2.0005, 2.001]), tol=1e-3)
        True
        >>> plateaued(torch.tensor([1.0, 2.0, 2.1]), tol=1e-3)
        False
        >>> plateaued(torch.tensor([2.0, 2.0, 2.0]), tol=0.0)
        False
    """
    if tol <= 0 or curve.shape[0] <= span:
        return False
    best = torch.cummax(curve.double(), 0).values
    return bool(best[-1] - best[-1 - span] <= tol * best[-1].abs())
