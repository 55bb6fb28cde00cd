"""The multi-start window: sequential slots filled from candidate starts trained together.

`starts` candidates (start j initialised as member j of a one-start run would be)
train independently on the batch axis, each orthogonal to the accepted members. Slot 0
takes the best candidate after `steps` steps, every later slot the best after
`slot_steps` more. The accepted candidate's row restarts fresh; the others stay warm:
projected off the new member (their solver state too), keeping their progress. A
candidate that loses most of its length to that projection (below `COLLAPSED`) was
converging onto the accepted direction and restarts fresh too.

Why this design: vector k stays orthogonal to 0..k-1 and is the best direction found,
as in one-start `sequential`; the batch axis now carries `starts` candidates per pass;
and each slot is the best of several local optima, not the one a single start falls
into. Candidates are independent rather than mutually orthogonal (as in
`simultaneous`): under Gram–Schmidt the first candidate is free and the others are
fenced off it, so the window would reproduce a single start's optimum (measured on a
planted model: the same misses as one start).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.segment import Segment
from melbo_lens.methods.constraints import project_out
from melbo_lens.methods.training.family import Family, Params
from melbo_lens.methods.training.group import Group
from melbo_lens.methods.training.spec import LoopSpec
from melbo_lens.methods.training.step import objective_of

__all__ = ["COLLAPSED", "Window", "member_basis", "new_group"]

COLLAPSED = 0.1  # relative length left after projection below which a candidate restarts


def member_basis(directions: Float[Tensor, "k m d"]) -> Float[Tensor, "r d"] | None:
    """Orthonormal rows spanning all direction rows of the given members (rank-revealing)."""
    rows = directions.reshape(-1, directions.shape[-1]).double()
    if rows.shape[0] == 0:
        return None
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    keep = s > 1e-6 * s.max()
    return vh[keep].to(directions.dtype)


def new_group(family: Family, spec: LoopSpec, raw: Params, basis: Tensor | None) -> Group:
    """A group of `spec`'s solver over the members `raw`, off `basis`."""
    return Group(family, spec.solver, spec.betas, spec.amsgrad, raw, basis, spec.joint)


class Window:
    """The candidate window of a sequential run (see the module docstring)."""

    def __init__(self, family: Family, spec: LoopSpec, device: torch.device) -> None:
        self.family, self.spec, self.device = family, spec, device
        self.ids = list(range(spec.starts))
        self.next = spec.starts

    def group(self, basis: Tensor | None) -> Group:
        """The group of the current candidates."""
        return new_group(self.family, self.spec, self.family.init(self.ids, self.device), basis)

    def labels(self, slot: int) -> list[str]:
        return [f"{self.family.noun} {slot} (start {j})" for j in self.ids]

    def state(self, group: Group) -> dict[str, Tensor]:
        ids = torch.tensor(self.ids + [self.next], dtype=torch.long)
        return {**group.state_dict(), "window.ids": ids}

    def load(self, group: Group, state: dict[str, Tensor]) -> None:
        if "window.ids" not in state:
            raise ValueError("the checkpoint's resume state has no candidate window")
        *ids, self.next = (int(i) for i in state["window.ids"])
        self.ids = ids
        group.load_state_dict(state)

    @torch.no_grad()
    def accept(
        self, segment: Segment, group: Group, store: Params, slot: int, last: bool
    ) -> Tensor:
        """Write the best candidate into `store[slot]` and refill the window (unless
        `last`); returns the accepted objective."""
        family = self.family
        candidates = group.result()
        objective = objective_of(segment, family.target(segment, candidates), self.spec)
        best = int(torch.argmax(torch.where(objective.isfinite(), objective, -math.inf)))
        for name, value in candidates.items():
            store[name][slot] = value[best]
        if last:
            return objective[best]
        basis = member_basis(family.directions({n: v[: slot + 1] for n, v in store.items()}))
        assert basis is not None
        dirs = family.directions(group.detached()).flatten(1)
        kept = project_out(dirs.reshape(-1, basis.shape[1]), basis).reshape(dirs.shape)
        # a candidate that loses most of its length was converging onto the accepted
        # direction: it restarts fresh rather than from its noisy remainder
        collapsed = kept.norm(dim=-1) < COLLAPSED * dirs.norm(dim=-1)
        rows = [best] + [j for j in range(len(self.ids)) if j != best and bool(collapsed[j])]
        for j in rows:
            self.ids[j], self.next = self.next, self.next + 1
        group.refill(rows, family.init([self.ids[j] for j in rows], self.device), basis)
        return objective[best]
