"""A group is the members that train together: their parameters, the constraint set
they live on (`constraint_set.Constraints`) and the solver that moves them (`solvers`).
The multi-start window drives a group only through `refill`, `result` and its state."""

from __future__ import annotations

import torch
from torch import Tensor

from melbo_lens.methods.training.constraint_set import Constraints
from melbo_lens.methods.training.family import Family, Params
from melbo_lens.methods.training.health import TrainingError
from melbo_lens.methods.training.solvers import Solver, make_solver

__all__ = ["Group"]


class Group:
    """The optimisation state of members that train together."""

    def __init__(
        self,
        family: Family,
        solver: str,
        betas: tuple[float, float],
        amsgrad: bool,
        raw: Params,
        basis: Tensor | None,
        joint: bool,
    ) -> None:
        self.family = family
        self.constraints = Constraints(family, basis, joint)
        self.params: Params = {
            k: torch.nn.Parameter(v) for k, v in self.constraints.apply(raw).items()
        }
        self.solver: Solver = make_solver(solver, self.params, family.lrs(), betas, amsgrad)

    def detached(self) -> Params:
        """The current parameters, without autograd."""
        return {n: p.detach() for n, p in self.params.items()}

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def update(self, objective: Tensor) -> None:
        """One solver step from the gradients in `params` (`objective`: each member's)."""
        grads = {n: p.grad for n, p in self.params.items()}
        if any(g is None for g in grads.values()):
            raise TrainingError("a parameter received no gradient; the hooks did not apply it")
        self.solver.step(grads, objective, self.constraints)  # type: ignore[arg-type]

    def result(self) -> Params:
        """Final parameters: the solver's answer (current, or its last accepted point)."""
        return self.solver.result(self.constraints)

    @torch.no_grad()
    def refill(self, rows: list[int], fresh: Params, basis: Tensor) -> None:
        """Members `rows` restart from `fresh`; every member moves off the new `basis`.
        The solver restarts those rows and moves its state off the basis too."""
        self.constraints.basis = basis
        params = self.detached()
        for name, value in params.items():
            value[rows] = fresh[name].to(value.dtype)
        new = self.constraints.apply(params)
        for name, p in self.params.items():
            p.copy_(new[name])
        self.solver.restart(rows, new, self.constraints)

    def state_dict(self) -> dict[str, Tensor]:
        """The parameters and the solver's state (what a checkpoint continues from)."""
        return {
            **{n: p.detach().clone() for n, p in self.params.items()},
            **self.solver.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = [n for n in self.params if n not in state]
        if missing:
            raise ValueError(
                f"the checkpoint's resume state has no {missing}; it was written by another "
                "version or method and cannot continue this run"
            )
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state[n])
        self.solver.load_state_dict(state)
