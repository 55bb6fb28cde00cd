"""Solvers move a group's parameters on its constraint set, one step at a time.

* `AMSGrad`: the MELBO source's optimiser (AdamW without weight decay; AMSGrad unless
  told otherwise) on the manifold: the gradient projected onto the tangent space, a
  step, then the retraction. Under joint (Gram–Schmidt) constraints the momentum along
  earlier members is dropped each step.
* `PowerStep`: a safeguarded power step, θ ← retract(∇) (exactly power iteration for a
  linear map), per member: a point whose objective dropped is not accepted and the step
  from the last accepted point is halved.

A solver owns its state (`state_dict` / `load_state_dict`, the keys a checkpoint holds)
and restarts rows when the schedule refills them (`restart`); the loop never looks at
which solver runs.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from melbo_lens.methods.training.constraint_set import Constraints
from melbo_lens.methods.training.family import Params

__all__ = ["AMSGrad", "PowerStep", "Solver", "make_solver"]

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class Solver(Protocol):
    """What the group asks of a solver."""

    def step(self, grads: Params, objective: Tensor, constraints: Constraints) -> None:
        """Move the parameters (in place) from their gradients."""
        ...

    def result(self, constraints: Constraints) -> Params:
        """The parameters to keep when the group's phase ends."""
        ...

    def restart(self, rows: list[int], params: Params, constraints: Constraints) -> None:
        """Rows `rows` start afresh at `params` (already written); the others' state
        moves onto the new constraint set."""
        ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


def make_solver(
    name: str, params: Params, lrs: dict[str, float], betas: tuple[float, float], amsgrad: bool
) -> Solver:
    """The solver called `name` ("amsgrad" or "power") over `params`."""
    if name == "amsgrad":
        return AMSGrad(params, lrs, betas, amsgrad)
    if name == "power":
        return PowerStep(params)
    raise ValueError(f"solver must be 'amsgrad' or 'power', got {name!r}")


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A per-member value broadcast over a parameter's trailing axes."""
    return mask.view(-1, *([1] * (like.ndim - 1)))


def _detached(params: Params) -> Params:
    return {n: p.detach() for n, p in params.items()}


class AMSGrad:
    """Riemannian AMSGrad (see the module docstring)."""

    def __init__(
        self, params: Params, lrs: dict[str, float], betas: tuple[float, float], amsgrad: bool
    ) -> None:
        self.params = params
        self.opt = torch.optim.AdamW(
            [{"params": [p], "lr": lrs[name]} for name, p in params.items()],
            betas=betas,
            weight_decay=0.0,
            amsgrad=amsgrad,
        )

    def _momentum(self) -> Params:
        return {
            n: self.opt.state[p]["exp_avg"]
            for n, p in self.params.items()
            if "exp_avg" in self.opt.state.get(p, {})
        }

    @torch.no_grad()
    def step(self, grads: Params, objective: Tensor, constraints: Constraints) -> None:
        projected = constraints.tangent(grads, _detached(self.params))
        for n, p in self.params.items():
            p.grad = projected[n]
        self.opt.step()
        new = constraints.apply(_detached(self.params))
        for n, p in self.params.items():
            p.copy_(new[n])
        if constraints.joint:
            # Momentum along earlier members would keep pushing member k into
            # directions Gram–Schmidt removes each step; drop it (member 0 unaffected).
            momentum = self._momentum()
            cleaned = constraints.earlier_removed(momentum, _detached(self.params))
            for n in momentum:
                momentum[n].copy_(cleaned[n])

    def result(self, constraints: Constraints) -> Params:
        return {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def restart(self, rows: list[int], params: Params, constraints: Constraints) -> None:
        for p in self.params.values():
            state = self.opt.state.get(p, {})
            for key in _MOMENTS:
                if key in state:
                    state[key][rows] = 0.0
        momentum = self._momentum()
        if len(momentum) == len(self.params):
            cleaned = constraints.off_basis(momentum)
            for name in momentum:
                momentum[name].copy_(cleaned[name])

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for n, p in self.params.items():
            state = self.opt.state.get(p, {})
            for key in ("step", *_MOMENTS):
                if key in state:
                    out[f"opt.{n}.{key}"] = torch.as_tensor(state[key]).detach().clone()
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for n, p in self.params.items():
            prefix = f"opt.{n}."
            opt_state = {
                k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)
            }
            if opt_state:
                if "step" in opt_state:
                    opt_state["step"] = opt_state["step"].float()
                self.opt.state[p] = opt_state


class PowerStep:
    """The safeguarded power step (see the module docstring)."""

    def __init__(self, params: Params) -> None:
        self.params = params
        first = next(iter(params.values()))
        k, device = first.shape[0], first.device
        self.accepted = {n: p.detach().clone() for n, p in params.items()}
        self.accepted_obj = torch.full((k,), -math.inf, device=device)
        self.accepted_grad = {n: torch.zeros_like(p) for n, p in params.items()}
        self.beta = torch.ones(k, device=device)

    @torch.no_grad()
    def step(self, grads: Params, objective: Tensor, constraints: Constraints) -> None:
        # Accept the point if its objective did not drop, else halve the step from the
        # last accepted point. Per member.
        params = _detached(self.params)
        ascent = {n: -g for n, g in grads.items()}
        ok = objective >= self.accepted_obj
        if constraints.joint:
            # When an earlier member moved, member k's constraint set moved with it and its
            # last accepted objective is stale: accept member k's new point unconditionally.
            flat = torch.cat([p.flatten(1) for p in params.values()], 1)
            old = torch.cat([p.flatten(1) for p in self.accepted.values()], 1)
            cos = torch.nn.functional.cosine_similarity(flat, old, dim=-1)
            moved = (ok & (cos < 1 - 1e-6)).to(torch.int32)
            ok = ok | ((torch.cumsum(moved, 0) - moved) > 0)
        for n in params:
            self.accepted[n] = torch.where(_rows(ok, params[n]), params[n], self.accepted[n])
            self.accepted_grad[n] = torch.where(
                _rows(ok, ascent[n]), ascent[n], self.accepted_grad[n]
            )
        self.accepted_obj = torch.where(ok, objective, self.accepted_obj)
        self.beta = torch.where(ok, (self.beta * 2).clamp(max=1.0), self.beta / 2)
        target = constraints.retract(constraints.off_basis(self.accepted_grad))
        stepped = {
            n: self.accepted[n] + _rows(self.beta, target[n]) * (target[n] - self.accepted[n])
            for n in params
        }
        new = constraints.apply(stepped)
        for n, p in self.params.items():
            p.copy_(new[n])

    def result(self, constraints: Constraints) -> Params:
        """The last accepted point (the current one before any was accepted)."""
        if bool(self.accepted_obj.isfinite().all()):
            return constraints.apply({n: a.clone() for n, a in self.accepted.items()})
        return {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def restart(self, rows: list[int], params: Params, constraints: Constraints) -> None:
        # every member's last accepted objective is stale: the constraint set moved
        for name in self.params:
            self.accepted[name] = params[name].clone()
            self.accepted_grad[name][rows] = 0.0
        self.accepted_obj.fill_(-math.inf)
        self.beta[rows] = 1.0

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for n in self.params:
            out[f"accepted.{n}"] = self.accepted[n]
            out[f"accepted_grad.{n}"] = self.accepted_grad[n]
        out["accepted_obj"], out["beta"] = self.accepted_obj, self.beta
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for n in self.params:
            self.accepted[n] = state[f"accepted.{n}"].clone()
            self.accepted_grad[n] = state[f"accepted_grad.{n}"].clone()
        self.accepted_obj = state["accepted_obj"].clone()
        self.beta = state["beta"].clone()
