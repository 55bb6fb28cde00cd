"""The loop: every trainable perturbation trains here, over a `Family`.

Groups of members share a forward pass (`spec.groups_of`): `sequential` (one member at
a time, orthogonal to the finished ones, each the best of a `Window` of candidate
starts), `simultaneous` (all, Gram–Schmidt in a fixed order each step), `soft` (all,
penalised pairwise cosines) or `none`. Each step: gradients (`step.backward`), a solver
step (`Group.update`), one health check (`health`), the record, the callback and the
checkpoint (`resume`). Ctrl-C (or a callback returning False) returns the partial
result, which `resume=` continues bit-exactly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from melbo_lens.core.checks import is_int
from melbo_lens.core.host import Host, frozen
from melbo_lens.core.io import OutputExists, exclusive_lock
from melbo_lens.core.memory import pass_memory, rows_per_pass
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.methods.training.family import A, Callback, Family
from melbo_lens.methods.training.group import Group
from melbo_lens.methods.training.health import (
    check_finite,
)
from melbo_lens.methods.training.phase import Phase, close_phase, open_group
from melbo_lens.methods.training.resume import check_resumable, finished, start_record
from melbo_lens.methods.training.spec import LoopSpec, groups_of, phases
from melbo_lens.methods.training.window import Window
from melbo_lens.perturbations.artifact import describe_artifact

__all__ = ["train"]


def train(
    model: Host,
    prompts: PromptSet,
    family: Family[A],
    *,
    resume: A | str | None = None,
    progress: bool = True,
    callback: Callback | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 50,
    compile: bool = False,
    overwrite: bool = False,
    max_rows_per_pass: int | str | None = None,
) -> A:
    """Run the loop over `family`; returns `family.artifact(...)` of all members.

    `resume` (an artifact of this family or its path) continues an earlier run of the
    same config: its parameters, training record and the state of the group in flight.
    Every step checks (one reduction) that each member's objective, gradient and
    parameters are finite and its parameters non-zero, and raises `TrainingError`
    naming the step and member otherwise, so a checkpoint never holds NaN.

    `max_rows_per_pass` splits each step's rows (members × prompts) into passes of at
    most that many rows, accumulating gradients (same result to float rounding, less
    activation memory); `"auto"` picks it from the free memory. Before the first step
    the activation memory of a pass is estimated (`core.memory`) and a pass that cannot
    fit raises MemoryError saying how much it needs and which knob lowers it.

    `checkpoint` is locked while training (a second run writing it fails, naming this
    one); a checkpoint that already holds a result is only replaced with
    `overwrite=True` (or continued with `resume=checkpoint`).
    """
    if not is_int(checkpoint_every, 1):
        raise ValueError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    if not (max_rows_per_pass in (None, "auto") or is_int(max_rows_per_pass, 1)):
        raise ValueError(
            f"max_rows_per_pass must be None, 'auto' or an int >= 1, got {max_rows_per_pass!r}"
        )
    run = _Run(progress, callback, None, checkpoint_every, compile, max_rows_per_pass)
    if checkpoint is None:
        return _run(model, prompts, family, resume, run)
    run.checkpoint = str(checkpoint)
    if resume is None and not overwrite and Path(run.checkpoint).exists():
        raise OutputExists(run.checkpoint, *describe_artifact(run.checkpoint))
    with exclusive_lock(run.checkpoint):
        return _run(model, prompts, family, resume, run)


@dataclass
class _Run:
    """How `train` runs the loop (nothing here changes the result)."""

    progress: bool
    callback: Callback | None
    checkpoint: str | None
    checkpoint_every: int
    compile: bool
    max_rows_per_pass: int | str | None


def _run(
    model: Host, prompts: PromptSet, family: Family[A], resume: A | str | None, run: _Run
) -> A:
    """A resumed run that finished already, as saved; else the loop (`_loop`)."""
    prior = family.load(resume) if isinstance(resume, str) else resume  # read once
    if prior is not None:
        check_resumable(family, prior)
        if finished(prior):
            return prior  # matches this run (checked); returned as saved, not rewritten
    return _loop(model, prompts, family, prior, run)


def _metadata(
    family: Family, spec: LoopSpec, segment: Segment, model: Host, rows: int
) -> dict[str, Any]:
    """What the artifact records about how the loop ran."""
    return {
        **family.metadata(),
        "segment_blocks": segment.n_blocks,
        "layer_slicing": segment.layer_slicing,
        "compiled": segment.compile,
        "host": type(model).__name__,
        "rows_per_pass": rows,
        "steps": spec.steps,
        "solver": spec.solver,
        "objective": spec.objective.name,
        **(
            {"starts": spec.starts, "slot_steps": spec.slot_steps, "slot_tol": spec.slot_tol}
            if spec.windowed
            else {}
        ),
        **({"auto": family.auto} if family.auto else {}),
    }


def _loop(model: Host, prompts: PromptSet, family: Family[A], prior: Any | None, run: _Run) -> A:
    """The loop itself (see `train`)."""
    device = prompts.tokens.device
    spec = LoopSpec.of(family.config, n=family.n, per_batch=family.per_batch)
    spec.objective.check(model, prompts, spec.target)
    plan = phases(spec)
    store = family.empty(device)
    steps = max(n_steps for _, n_steps in plan) if spec.n else spec.steps
    record, resume_state, elapsed = start_record(family, spec.n, steps, device, store, prior)
    objective, steps_done = record["objective"], record["steps_done"]
    segment = Segment(model, spec.source, spec.target, prompts, compile=run.compile)
    rows = (spec.starts if spec.windowed else max(len(g) for g in groups_of(spec))) * len(prompts)
    memory = pass_memory(model, segment.n_blocks, prompts.tokens.shape[1])
    max_rows = rows_per_pass(memory, rows, run.max_rows_per_pass, device)
    meta = _metadata(family, spec, segment, model, max_rows or rows)

    def artifact(state: dict[str, Tensor], seconds: float) -> A:
        return family.artifact(
            {n: v.detach().cpu().clone() for n, v in store.items()},
            {
                **{name: value.cpu().clone() for name, value in record.items()},
                "resume_state": {k: v.detach().cpu() for k, v in state.items()},
            },
            {**meta, "train_seconds": seconds},
        )

    total = sum(len(i) * n for i, n in plan)
    bar = tqdm(total=total, disable=not run.progress, desc=f"{family.noun}s", unit="step")
    bar.update(  # a finished phase counts in full (a window's slot may have stopped early)
        sum(
            len(i) * n if bool((~torch.isnan(objective[i])).all()) else int(steps_done[i].sum())
            for i, n in plan
        )
    )
    start_time = time.perf_counter()
    window = Window(family, spec, device) if spec.windowed else None
    group: Group | None = None
    indices: list[int] = []
    interrupted = False

    def group_state() -> dict[str, Tensor]:
        assert group is not None
        return window.state(group) if window is not None else group.state_dict()

    def save(state: dict[str, Tensor]) -> None:
        assert run.checkpoint is not None
        artifact(state, elapsed + time.perf_counter() - start_time).save(run.checkpoint)

    phase = Phase(family, spec, segment, store, record, run, bar, max_rows, window)
    with frozen(model):  # only the perturbation gets gradients; flags restored on exit
        try:
            for indices, n_steps in plan:
                if bool((~torch.isnan(objective[indices])).all()):  # phase finished
                    continue
                if group is None or window is None:
                    first = int(steps_done[indices[0]])
                    group = open_group(family, spec, store, indices, window, resume_state, first)
                    resume_state = {}
                phase.run(group, indices, n_steps, lambda: save(group_state()))
                objective[indices] = close_phase(segment, spec, group, window, store, indices)
                if window is not None:
                    meta["starts_used"] = window.next
                check_finite(objective[:, None], indices, 1, 0, family.noun)
                if window is None:
                    group = None
                if run.checkpoint:
                    save(group_state() if group is not None else {})
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
    elapsed += time.perf_counter() - start_time
    state = group_state() if (interrupted and group is not None) else {}
    if interrupted and group is not None and window is None:
        for n, p in group.params.items():
            store[n][indices] = p.detach()
    result = artifact(state, elapsed)
    result.metadata["interrupted"] = interrupted
    if run.checkpoint:
        result.save(run.checkpoint)
    return result
