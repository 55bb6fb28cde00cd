"""The constraint set a group's members live on: the family's (sphere of radius R, unit
columns), intersected with the orthogonal complement of a `basis` (the members finished
before, under `sequential`) and, when `joint` (`simultaneous`), Gram–Schmidt between
the members in order. Solvers move parameters through it (`apply`, `tangent`)."""

from __future__ import annotations

from torch import Tensor

from melbo_lens.methods.constraints import gram_schmidt_members, project_out, project_out_earlier
from melbo_lens.methods.training.family import Family, Params

__all__ = ["Constraints"]


class Constraints:
    """The constraint set of a group's members (see the module docstring)."""

    def __init__(self, family: Family, basis: Tensor | None, joint: bool) -> None:
        self.family, self.basis, self.joint = family, basis, joint

    def retract(self, params: Params) -> Params:
        """Onto the family's constraint set only (norms)."""
        return self.family.retract(params)

    def off_basis(self, params: Params) -> Params:
        """Direction rows projected off the basis (unchanged without one)."""
        if self.basis is None:
            return params
        dirs = self.family.directions(params)
        return self.family.with_directions(params, project_out(dirs, self.basis))

    def apply(self, params: Params) -> Params:
        """Onto the whole constraint set: off the basis, Gram–Schmidt if joint, retracted."""
        params = self.off_basis(params)
        if self.joint:
            dirs = gram_schmidt_members(self.family.directions(params))
            params = self.family.with_directions(params, dirs)
        return self.family.retract(params)

    def earlier_removed(self, grads: Params, params: Params) -> Params:
        """Member k's rows of `grads` off the directions of members 0..k-1."""
        dirs = self.family.directions(params)
        k, m, d = dirs.shape
        unit = gram_schmidt_members(dirs, normalise=True).reshape(k * m, d)
        g = self.family.directions(grads).reshape(k * m, d)
        return self.family.with_directions(
            grads, project_out_earlier(g, unit, group=m).reshape(k, m, d)
        )

    def tangent(self, grads: Params, params: Params) -> Params:
        """Gradients on the tangent space of the whole constraint set at `params`."""
        grads = self.off_basis(self.family.tangent(grads, params))
        if self.joint:
            grads = self.earlier_removed(grads, params)
        return grads
