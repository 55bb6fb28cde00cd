"""A phase of the loop: the members it trains (a group, or a window's slot), opened
with its resumed state, stepped until its step limit or its slot's plateau, and closed
by writing the members it finished."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from melbo_lens.core.segment import Segment
from melbo_lens.methods.training.family import Family, Params
from melbo_lens.methods.training.group import Group
from melbo_lens.methods.training.health import member_problems, raise_problems
from melbo_lens.methods.training.spec import LoopSpec, plateaued
from melbo_lens.methods.training.step import backward, objective_of
from melbo_lens.methods.training.window import Window, member_basis, new_group

__all__ = ["Phase", "close_phase", "open_group"]


def open_group(
    family: Family,
    spec: LoopSpec,
    store: Params,
    indices: list[int],
    window: Window | None,
    resume_state: dict[str, Tensor],
    first: int,
) -> Group:
    """The group that trains `indices` (a window's candidates for slot indices[0]),
    orthogonal to the members before it under `sequential`, with the resumed state."""
    device = next(iter(store.values())).device
    basis = None
    if spec.orthogonal == "sequential" and indices[0] > 0:
        basis = member_basis(family.directions({n: v[: indices[0]] for n, v in store.items()}))
    if window is not None:
        group = window.group(basis)
    else:
        group = new_group(family, spec, family.init(indices, device), basis)
    if resume_state:
        state = {k: v.to(device) for k, v in resume_state.items()}
        if window is not None:
            window.load(group, state)
        elif first > 0:
            group.load_state_dict(state)
    return group


def close_phase(
    segment: Segment,
    spec: LoopSpec,
    group: Group,
    window: Window | None,
    store: Params,
    indices: list[int],
) -> Tensor:
    """Write the phase's members into `store` (a window: its best candidate, then refill);
    returns their objective."""
    if window is not None:
        return window.accept(segment, group, store, indices[0], indices[0] == spec.n - 1)
    final = group.result()
    for n, v in final.items():
        store[n][indices] = v
    with torch.no_grad():
        return objective_of(segment, group.family.target(segment, final), spec)


@dataclass
class Phase:
    """The steps of one phase: members `indices` (a window's slot) for up to `n_steps`."""

    family: Family
    spec: LoopSpec
    segment: Segment
    store: Params
    record: dict[str, Tensor]
    how: Any  # the loop's run settings (progress, callback, checkpoint)
    bar: Any
    max_rows: int | None
    window: Window | None

    def run_step(self, group: Group, indices: list[int], step: int, labels: list[str]) -> Tensor:
        """One step: gradients, the solver's update, the health check and the record."""
        group.zero_grad()
        obj = backward(self.segment, group, self.spec, self.max_rows)
        grads = {n: p.grad for n, p in group.params.items() if p.grad is not None}
        group.update(obj)
        codes = member_problems(obj, grads, self.family.directions(group.detached()))
        if bool(codes.any()):  # the one host sync of the check
            raise_problems(codes, labels, step)
        # a window records its best candidate (the slot's value so far)
        kept = [int(torch.argmax(obj))] if self.window else slice(None)
        self.record["losses"][indices, step] = obj[kept]
        self.record["steps_done"][indices] = step + 1
        for n, p in group.params.items():
            self.store[n][indices] = p.detach()[kept]
        return obj

    def run(self, group: Group, indices: list[int], n_steps: int, save: Callable[[], None]) -> None:
        """Steps from where the record stands to `n_steps`, or until the window's slot
        stops improving (`plateaued`)."""
        family, run, window = self.family, self.how, self.window
        labels = window.labels(indices[0]) if window else [f"{family.noun} {i}" for i in indices]
        first = int(self.record["steps_done"][indices[0]])
        # a run interrupted on the step where its slot plateaued resumes into the close
        if window is not None and plateaued(
            self.record["losses"][indices[0], :first], self.spec.slot_tol
        ):
            self.bar.update(n_steps - first)
            return
        for step in range(first, n_steps):
            obj = self.run_step(group, indices, step, labels)
            self.bar.update(len(indices))
            if run.progress and ((step + 1) % 10 == 0 or step + 1 == n_steps):
                self.bar.set_postfix(objective=f"{float(obj.mean()):.4g}")
            if run.callback is not None:
                if run.callback(family.state(step, indices, obj, group.detached())) is False:
                    raise KeyboardInterrupt
            curve = self.record["losses"][indices[0], : step + 1]
            if window is not None and plateaued(curve, self.spec.slot_tol):
                self.bar.update(n_steps - step - 1)
                return
            if run.checkpoint and (step + 1) % run.checkpoint_every == 0 and step + 1 < n_steps:
                save()
