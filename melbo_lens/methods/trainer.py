"""The trainer: one loop for every trainable perturbation, over a small *family* interface.

MELBO trains perturbations (vectors, adapters, ...) of fixed size to maximise the change
they cause at a target site. What differs between kinds is small and lives in a
`Family`: how to initialise a member, how to retract onto the constraint set (sphere of
radius R, unit columns), how to project a gradient onto its tangent space, which
*directions* hard orthogonality acts on (a vector itself; an adapter's Ω_B columns), and
how to run the segment with the parameters applied. Everything else is here, once:

* groups of members that share a forward pass (`sequential`: one member at a time,
  orthogonal to the finished ones, each the best of a window of candidate starts trained
  together (`_Window`); `simultaneous`: all, Gram–Schmidt in a fixed order each step;
  `soft`: all, penalised pairwise cosines of directions or target deltas; `none`);
* the solvers: AMSGrad on the manifold (gradient projected on the tangent space, then
  retraction) and a safeguarded power step (θ ← retract(∇), halving on a drop);
* checkpoint/resume (bit-exact), per-step callbacks, NaN/inf errors that name the step and
  the member, Ctrl-C returning the partial result, progress bars.

A new method is a new family, never a new loop, as SAELens's architectures differ only
in their forward pass.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from melbo_lens.core.checks import is_int
from melbo_lens.core.host import frozen
from melbo_lens.core.io import OutputExists, exclusive_lock
from melbo_lens.core.memory import pass_memory, rows_per_pass
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.core.sites import HookSite, check_sites
from melbo_lens.methods.constraints import gram_schmidt_members, project_out, project_out_earlier
from melbo_lens.methods.objectives import cosine_penalty, melbo_objective_per_prompt
from melbo_lens.perturbations.artifact import describe_artifact

__all__ = [
    "Family",
    "LoopSpec",
    "ResumeMismatch",
    "TrainingError",
    "check_finite",
    "check_prompt_set",
    "config_differences",
    "train",
]

Params = dict[str, Tensor]


class TrainingError(RuntimeError):
    """Training produced NaN/inf or otherwise cannot continue."""


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
    power: float
    q: float
    source: HookSite
    target: HookSite
    starts: int = 1  # candidate starts per slot (orthogonal="sequential" only)
    slot_steps: int = 0  # steps between acceptances after the first (starts > 1)

    @property
    def windowed(self) -> bool:
        """Sequential slots filled from a window of `starts` candidates (see `_Window`)."""
        return self.orthogonal == "sequential" and self.starts > 1

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
            power=config.power,
            q=config.q,
            source=config.source,
            target=config.target,
            starts=config.starts,
            slot_steps=config.loop_slot_steps(),
        )


class Family(Protocol):
    """What differs between trainable perturbations. Tensors have the member axis first."""

    noun: str  # "vector", "adapter": used in messages and progress bars
    prompts: PromptSet  # what the run trains on (a resumed run must match them)
    model_name: str | None

    def init(self, indices: list[int], device: torch.device) -> Params:
        """Unconstrained starting parameters of the given members (deterministic per index)."""
        ...

    def retract(self, params: Params) -> Params:
        """Onto the constraint set (norms only; orthogonality is the loop's job)."""
        ...

    def tangent(self, grads: Params, params: Params) -> Params:
        """Gradients projected onto the tangent space of the constraint set at `params`."""
        ...

    def directions(self, params: Params) -> Tensor:
        """[k, m, d] rows that hard orthogonality keeps apart between members."""
        ...

    def with_directions(self, params: Params, directions: Tensor) -> Params:
        """`params` with its direction rows replaced (inverse of `directions`)."""
        ...

    def target(self, segment: Segment, params: Params) -> Tensor:
        """Target activations [k, n, pos, d_model] with member j applied to copy j."""
        ...

    def lrs(self) -> dict[str, float]:
        """Learning rate of each parameter (AMSGrad)."""
        ...

    # ------------------------------------------------------------------ to-artifact
    config: Any  # the method config (a LoopConfig dataclass)
    n: int  # members to train
    per_batch: int | None  # at most this many members per forward pass (orthogonal="none")
    auto: dict[str, Any]  # what the method's defaults chose (sites, positions, R), or {}

    def empty(self, device: torch.device) -> Params:
        """Zero parameters of all n members (the store the loop fills)."""
        ...

    def load(self, path: str) -> Any:
        """An artifact of this family from a file (to resume from)."""
        ...

    def params_of(self, artifact: Any) -> Params:
        """The parameters stored in an artifact of this family."""
        ...

    def artifact(self, params: Params, record: dict[str, Any], metadata: dict[str, Any]) -> Any:
        """The artifact for `params` of all members with the training record."""
        ...

    def state(self, step: int, indices: list[int], objective: Tensor, params: Params) -> Any:
        """What a per-step callback sees."""
        ...

    def metadata(self) -> dict[str, Any]:
        """What the artifact records about the run's settings (lr used and its rule)."""
        ...


Callback = Callable[[Any], "bool | None"]


class FamilyBase:
    """What every family shares: its config, the prompts and model name it records, and
    the provenance fields of the artifact it builds."""

    def __init__(self, config: Any, model: Any, prompts: PromptSet) -> None:
        self.config, self.prompts = config, prompts
        self.model_name = getattr(model.cfg, "model_name", None)
        self.auto: dict[str, Any] = {}  # what `methods.defaults` chose for this run

    def provenance(self, record: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
        """Artifact fields other than the parameters and the method name."""
        return {
            "target": self.config.target,
            "config": self.config.to_dict(),
            "model_name": self.model_name,
            "prompts": self.prompts.to_dict(),
            "metadata": metadata,
            **record,
        }


def check_prompts_and_sites(
    model: Any, prompts: PromptSet, source: HookSite, target: HookSite
) -> None:
    """The checks every `train_*` entry point makes before anything runs."""
    check_prompt_set(prompts)
    check_sites(model, source, target)


def check_prompt_set(prompts: Any) -> None:
    """Training takes a `PromptSet` (coerce texts with `PromptSet.from_texts`)."""
    if not isinstance(prompts, PromptSet):
        raise TypeError(
            f"prompts must be a PromptSet, got {type(prompts).__name__}; "
            "build one with PromptSet.from_texts(model, texts)"
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
            + _ADVICE
        )


_ADVICE = (
    "try a smaller radius or lr, a float32 model, or check the prompts for overflow "
    "(the last checkpoint, if one was given, holds only finite values)"
)
_PROBLEMS = (
    "objective is NaN/inf or zero (zero: no change reaches the target)",
    "gradient is NaN/inf or zero",
    "parameters are NaN/inf or zero",
)


def _member_problems(objective: Tensor, grads: Params, directions: Tensor) -> Tensor:
    """Per member, one bit per entry of `_PROBLEMS` (0 = healthy), without a host sync:
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


def _raise_problems(codes: Tensor, labels: list[str], step: int) -> None:
    row = int(torch.nonzero(codes)[0])
    what = [p for bit, p in enumerate(_PROBLEMS) if int(codes[row]) >> bit & 1]
    raise TrainingError(f"at step {step} for {labels[row]}: {'; '.join(what)}; " + _ADVICE)


class ResumeMismatch(ValueError):
    """A run cannot resume from a checkpoint written with other settings.

    `differing` maps each config field that differs to (saved value, this run's value).
    """

    def __init__(self, differing: dict[str, tuple[Any, Any]], config_name: str) -> None:
        self.differing = differing
        listed = ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in differing.items())
        super().__init__(
            f"cannot resume: the saved run's config differs in {listed}; continue it with "
            f"{config_name}.from_dict(saved.config), or start a new run elsewhere"
        )


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ between two config dicts (missing = None)."""
    keys = list(now) + [k for k in saved if k not in now]
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def _shown(prompts: dict[str, Any]) -> Any:
    return prompts.get("texts") or f"{len(prompts.get('tokens') or [])} token lists"


def prompt_differences(saved: dict[str, Any] | None, prompts: PromptSet) -> dict[str, tuple]:
    """What differs between the prompts a run was saved with and this run's: their text
    (or tokens), else their target positions (after the automatic outlier rule)."""
    if not saved:
        return {}
    now = prompts.to_dict()
    if saved.get("tokens") != now["tokens"]:
        return {"prompts": (_shown(saved), _shown(now))}
    if saved.get("targets") != now["targets"]:
        return {"target_positions": (saved.get("targets"), now["targets"])}
    return {}


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


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A per-member boolean broadcast over a parameter's trailing axes."""
    return mask.view(-1, *([1] * (like.ndim - 1)))


class _Group:
    """The optimisation state of members that train together."""

    def __init__(self, family: Family, spec: LoopSpec, raw: Params, basis: Tensor | None) -> None:
        self.family, self.spec, self.basis = family, spec, basis
        self.joint = spec.orthogonal == "simultaneous"  # Gram–Schmidt between members
        self.params: Params = {k: torch.nn.Parameter(v) for k, v in self.constrain(raw).items()}
        lrs = family.lrs()
        self.opt = torch.optim.AdamW(
            [{"params": [p], "lr": lrs[name]} for name, p in self.params.items()],
            betas=spec.betas,
            weight_decay=0.0,
            amsgrad=spec.amsgrad,
        )
        k = next(iter(raw.values())).shape[0]
        device = next(iter(raw.values())).device
        # power-solver safeguard state
        self.accepted = {n: p.detach().clone() for n, p in self.params.items()}
        self.accepted_obj = torch.full((k,), -math.inf, device=device)
        self.accepted_grad = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.beta = torch.ones(k, device=device)

    # ------------------------------------------------------------------ constraints
    def _project_basis(self, params: Params) -> Params:
        if self.basis is None:
            return params
        dirs = self.family.directions(params)
        return self.family.with_directions(params, project_out(dirs, self.basis))

    def constrain(self, params: Params) -> Params:
        params = self._project_basis(params)
        if self.joint:
            dirs = gram_schmidt_members(self.family.directions(params))
            params = self.family.with_directions(params, dirs)
        return self.family.retract(params)

    def _earlier_removed(self, grads: Params, params: Params) -> Params:
        """Member k's rows of `grads` off the directions of members 0..k-1."""
        dirs = self.family.directions(params)
        k, m, d = dirs.shape
        unit = gram_schmidt_members(dirs, normalise=True).reshape(k * m, d)
        g = self.family.directions(grads).reshape(k * m, d)
        return self.family.with_directions(
            grads, project_out_earlier(g, unit, group=m).reshape(k, m, d)
        )

    def project_grad(self, grads: Params, params: Params) -> Params:
        grads = self._project_basis(self.family.tangent(grads, params))
        if self.joint:
            grads = self._earlier_removed(grads, params)
        return grads

    # ------------------------------------------------------------------ steps
    def detached(self) -> Params:
        return {n: p.detach() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, objective: Tensor) -> None:
        params = self.detached()
        grads = {n: p.grad for n, p in self.params.items()}
        if any(g is None for g in grads.values()):
            raise TrainingError("a parameter received no gradient; the hooks did not apply it")
        if self.spec.solver == "amsgrad":
            projected = self.project_grad(grads, params)  # type: ignore[arg-type]
            for n, p in self.params.items():
                p.grad = projected[n]
            self.opt.step()
            new = self.constrain(self.detached())
            for n, p in self.params.items():
                p.copy_(new[n])
            if self.joint:
                # Momentum along earlier members would keep pushing member k into
                # directions Gram–Schmidt removes each step; drop it (member 0 unaffected).
                momentum = {n: self.opt.state[p]["exp_avg"] for n, p in self.params.items()}
                cleaned = self._earlier_removed(momentum, self.detached())
                for n in momentum:
                    momentum[n].copy_(cleaned[n])
            return
        # Safeguarded power step on the constraint set: accept the point if its objective
        # did not drop, else halve the step from the last accepted point. Per member.
        ascent = {n: -g for n, g in grads.items()}  # type: ignore[operator]
        ok = objective >= self.accepted_obj
        if self.joint:
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
        target = self.family.retract(self._project_basis(self.accepted_grad))
        stepped = {
            n: self.accepted[n] + _rows(self.beta, target[n]) * (target[n] - self.accepted[n])
            for n in params
        }
        new = self.constrain(stepped)
        for n, p in self.params.items():
            p.copy_(new[n])

    def result(self) -> Params:
        """Final parameters: current, or for the power solver the last accepted point."""
        if self.spec.solver == "power" and bool(self.accepted_obj.isfinite().all()):
            return self.constrain({n: a.clone() for n, a in self.accepted.items()})
        return {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def refill(self, rows: list[int], fresh: Params, basis: Tensor) -> None:
        """Members `rows` restart from `fresh`; every member moves off the new `basis`,
        with its momentum. The others keep their optimiser state, except the power
        solver's last accepted objective, stale now that the constraint set moved."""
        self.basis = basis
        params = self.detached()
        for name, value in params.items():
            value[rows] = fresh[name].to(value.dtype)
        new = self.constrain(params)
        for name, p in self.params.items():
            p.copy_(new[name])
            state = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    state[key][rows] = 0.0
        momentum = {
            n: self.opt.state[p]["exp_avg"]
            for n, p in self.params.items()
            if "exp_avg" in self.opt.state.get(p, {})
        }
        if len(momentum) == len(self.params):
            cleaned = self._project_basis(momentum)
            for name in momentum:
                momentum[name].copy_(cleaned[name])
        for name in self.params:
            self.accepted[name] = new[name].clone()
            self.accepted_grad[name][rows] = 0.0
        self.accepted_obj.fill_(-math.inf)
        self.beta[rows] = 1.0

    # ------------------------------------------------------------------ resume state
    def state_tensors(self) -> dict[str, Tensor]:
        out = {n: p.detach().clone() for n, p in self.params.items()}
        for n, p in self.params.items():
            state = self.opt.state.get(p, {})
            for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    out[f"opt.{n}.{key}"] = torch.as_tensor(state[key]).detach().clone()
        if self.spec.solver == "power":
            for n in self.params:
                out[f"accepted.{n}"] = self.accepted[n]
                out[f"accepted_grad.{n}"] = self.accepted_grad[n]
            out["accepted_obj"], out["beta"] = self.accepted_obj, self.beta
        return out

    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        missing = [n for n in self.params if n not in state]
        if missing:
            raise ValueError(
                f"the checkpoint's resume state has no {missing}; it was written by another "
                "version or method and cannot continue this run"
            )
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state[n])
        for n, p in self.params.items():
            prefix = f"opt.{n}."
            opt_state = {
                k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)
            }
            if opt_state:
                if "step" in opt_state:
                    opt_state["step"] = opt_state["step"].float()
                self.opt.state[p] = opt_state
        if self.spec.solver == "power":
            for n in self.params:
                self.accepted[n] = state[f"accepted.{n}"].clone()
                self.accepted_grad[n] = state[f"accepted_grad.{n}"].clone()
            self.accepted_obj = state["accepted_obj"].clone()
            self.beta = state["beta"].clone()


def _objective(segment: Segment, z: Tensor, spec: LoopSpec) -> Tensor:
    """MELBO's objective of each member from its target activations z [k, n, pos, d]."""
    # on a model split over devices z comes from the target block's device
    mask = segment.prompts.target_mask.to(z.device).expand(z.shape[:-1])
    per_prompt = melbo_objective_per_prompt(
        z, segment.unsteered.to(z.device).expand_as(z), mask, power=spec.power, q=spec.q
    )
    return per_prompt.sum(-1)


def _loss(segment: Segment, group: _Group, spec: LoopSpec) -> tuple[Tensor, Tensor]:
    z = group.family.target(segment, group.params)
    objective = _objective(segment, z, spec)
    loss = -objective.sum()
    if spec.orthogonal == "soft" and objective.shape[0] > 1:
        if spec.soft_on == "vectors":
            penalty = cosine_penalty(group.family.directions(group.params).flatten(1))
        else:
            m = segment.prompts.target_mask[None, :, :, None]
            penalty = cosine_penalty(((z - segment.unsteered) * m).flatten(1))
        loss = loss + spec.soft_weight * objective.detach().mean() * penalty
    return loss, objective.detach()


def _pieces(k: int, n: int, max_rows: int | None) -> list[tuple[slice, Tensor | None]]:
    """(members, prompts or None for all) pieces that cover k × n rows, each at most
    `max_rows` rows: whole members while a member's n rows fit, else prompt blocks."""
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


def _backward(segment: Segment, group: _Group, spec: LoopSpec, max_rows: int | None) -> Tensor:
    """Gradients of the step's loss in `group`'s parameters, in passes of at most
    `max_rows` rows (gradient accumulation: the objective is a sum over members and
    prompts, so the pieces add up to one pass); returns each member's objective."""
    k = next(iter(group.params.values())).shape[0]
    pieces = _pieces(k, len(segment.prompts), max_rows)
    if len(pieces) == 1:
        loss, objective = _loss(segment, group, spec)
        loss.backward()
        return objective
    if spec.orthogonal == "soft" and spec.soft_on == "deltas":
        raise ValueError(
            "soft_on='deltas' compares every member's target deltas, so a step cannot be "
            "split into passes; use soft_on='vectors', or a larger max_rows_per_pass"
        )
    objective = torch.zeros(k, device=segment.unsteered.device)
    for members, prompt_index in pieces:
        part = segment if prompt_index is None else segment.subset(prompt_index)
        params = {name: p[members] for name, p in group.params.items()}
        obj = _objective(part, group.family.target(part, params), spec)
        (-obj.sum()).backward()
        objective[members] += obj.detach()
    if spec.orthogonal == "soft" and k > 1:
        penalty = cosine_penalty(group.family.directions(group.params).flatten(1))
        (spec.soft_weight * objective.mean() * penalty).backward()
    return objective


def _member_basis(directions: Tensor) -> Tensor | None:
    """Orthonormal rows spanning all direction rows of the given members (rank-revealing)."""
    rows = directions.reshape(-1, directions.shape[-1]).double()
    if rows.shape[0] == 0:
        return None
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    keep = s > 1e-6 * s.max()
    return vh[keep].to(directions.dtype)


def _start(
    family: Family, spec: LoopSpec, device: torch.device, store: Params, prior: Any | None
) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """A fresh training record, or the record, group state and elapsed seconds of the
    resumed run `prior` (checked by `_check_resumable`; its parameters go into `store`)."""
    n = spec.n
    steps = max(n_steps for _, n_steps in _phases(spec)) if n else spec.steps
    record = {
        "losses": torch.full((n, steps), float("nan"), dtype=torch.float32, device=device),
        "objective": torch.full((n,), float("nan"), dtype=torch.float32, device=device),
        "steps_done": torch.zeros(n, dtype=torch.long),
    }
    if prior is None:
        return record, {}, 0.0
    for name, value in family.params_of(prior).items():
        store[name].copy_(value)
    for name in record:
        if getattr(prior, name) is not None:
            record[name].copy_(getattr(prior, name))
    return record, dict(prior.resume_state), float(prior.metadata.get("train_seconds", 0.0))


def _check_resumable(family: Family, prior: Any) -> None:
    """Refuse to continue a run saved with another config, prompts or model."""
    differing = config_differences(prior.config, family.config.to_dict())
    differing.update(prompt_differences(prior.prompts, family.prompts))
    if prior.model_name and family.model_name and prior.model_name != family.model_name:
        differing["model"] = (prior.model_name, family.model_name)
    if differing:
        raise ResumeMismatch(differing, type(family.config).__name__)


def _finished(prior: Any) -> bool:
    """Whether the run being resumed already finished (nothing to redo)."""
    done = prior.objective is not None and bool(torch.isfinite(prior.objective).all())
    return done and not prior.metadata.get("interrupted")


def train(
    model: Any,
    prompts: PromptSet,
    family: Family,
    *,
    resume: Any | None = None,
    progress: bool = True,
    callback: Callback | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 50,
    compile: bool = False,
    overwrite: bool = False,
    max_rows_per_pass: int | str | None = None,
) -> Any:
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


def _phases(spec: LoopSpec) -> list[tuple[list[int], int]]:
    """(members a phase finishes, its steps), in order. Without a window a phase is a
    group of `groups_of`; with one, phase k fills slot k (`steps`, then `slot_steps`)."""
    if spec.windowed:
        return [([k], spec.steps if k == 0 else spec.slot_steps) for k in range(spec.n)]
    return [(indices, spec.steps) for indices in groups_of(spec)]


class _Window:
    """Sequential slots filled from a window of candidate starts trained together.

    `starts` candidates (start j initialised as member j of a one-start run would be)
    train independently on the batch axis, each orthogonal to the accepted members.
    Slot 0 takes the best candidate after `steps` steps, every later slot the best after
    `slot_steps` more. The accepted candidate's row restarts fresh; the others stay
    warm: projected off the new member (their momentum too), keeping their progress. A
    candidate that loses most of its length to that projection (below `_COLLAPSED`) was
    converging onto the accepted direction and restarts fresh too.

    Why this design: vector k stays orthogonal to 0..k-1 and is the best direction
    found, as in one-start `sequential`; the batch axis now carries `starts` candidates
    per pass; and each slot is the best of several local optima, not the one a single
    start falls into. Candidates are independent rather than mutually orthogonal (as in
    `simultaneous`): under Gram–Schmidt the first candidate is free and the others are
    fenced off it, so the window would reproduce a single start's optimum (measured on a
    planted model: the same misses as one start).
    """

    def __init__(self, family: Family, spec: LoopSpec, device: torch.device) -> None:
        self.family, self.spec, self.device = family, spec, device
        self.ids = list(range(spec.starts))
        self.next = spec.starts

    def group(self, basis: Tensor | None) -> _Group:
        return _Group(self.family, self.spec, self.family.init(self.ids, self.device), basis)

    def labels(self, slot: int) -> list[str]:
        return [f"{self.family.noun} {slot} (start {j})" for j in self.ids]

    def state(self, group: _Group) -> dict[str, Tensor]:
        ids = torch.tensor(self.ids + [self.next], dtype=torch.long)
        return {**group.state_tensors(), "window.ids": ids}

    def load(self, group: _Group, state: dict[str, Tensor]) -> None:
        if "window.ids" not in state:
            raise ValueError("the checkpoint's resume state has no candidate window")
        *ids, self.next = (int(i) for i in state["window.ids"])
        self.ids = ids
        group.load_state_tensors(state)

    @torch.no_grad()
    def accept(
        self, segment: Segment, group: _Group, store: Params, slot: int, last: bool
    ) -> Tensor:
        """Write the best candidate into `store[slot]` and refill the window (unless
        `last`); returns the accepted objective."""
        family = self.family
        candidates = group.result()
        objective = _objective(segment, family.target(segment, candidates), self.spec)
        best = int(torch.argmax(torch.where(objective.isfinite(), objective, -math.inf)))
        for name, value in candidates.items():
            store[name][slot] = value[best]
        if last:
            return objective[best]
        basis = _member_basis(family.directions({n: v[: slot + 1] for n, v in store.items()}))
        assert basis is not None
        dirs = family.directions(group.detached()).flatten(1)
        kept = project_out(dirs.reshape(-1, basis.shape[1]), basis).reshape(dirs.shape)
        # a candidate that loses most of its length was converging onto the accepted
        # direction: it restarts fresh rather than from its noisy remainder
        collapsed = kept.norm(dim=-1) < _COLLAPSED * dirs.norm(dim=-1)
        rows = [best] + [j for j in range(len(self.ids)) if j != best and bool(collapsed[j])]
        for j in rows:
            self.ids[j], self.next = self.next, self.next + 1
        group.refill(rows, family.init([self.ids[j] for j in rows], self.device), basis)
        return objective[best]


_COLLAPSED = 0.1  # relative length left after projection below which a candidate restarts


def _open_group(
    family: Family,
    spec: LoopSpec,
    store: Params,
    indices: list[int],
    window: _Window | None,
    resume_state: dict[str, Tensor],
    first: int,
) -> _Group:
    """The group that trains `indices` (a window's candidates for slot indices[0]),
    orthogonal to the members before it under `sequential`, with the resumed state."""
    device = next(iter(store.values())).device
    basis = None
    if spec.orthogonal == "sequential" and indices[0] > 0:
        basis = _member_basis(family.directions({n: v[: indices[0]] for n, v in store.items()}))
    if window is not None:
        group = window.group(basis)
    else:
        group = _Group(family, spec, family.init(indices, device), basis)
    if resume_state:
        state = {k: v.to(device) for k, v in resume_state.items()}
        if window is not None:
            window.load(group, state)
        elif first > 0:
            group.load_state_tensors(state)
    return group


def _close_phase(
    segment: Segment,
    spec: LoopSpec,
    group: _Group,
    window: _Window | None,
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
        return _objective(segment, group.family.target(segment, final), spec)


def _run(model: Any, prompts: PromptSet, family: Family, resume: Any | None, run: _Run) -> Any:
    """A resumed run that finished already, as saved; else the loop (`_loop`)."""
    prior = family.load(resume) if isinstance(resume, str) else resume  # read once
    if prior is not None:
        _check_resumable(family, prior)
        if _finished(prior):
            return prior  # matches this run (checked); returned as saved, not rewritten
    return _loop(model, prompts, family, prior, run)


def _loop(model: Any, prompts: PromptSet, family: Family, prior: Any | None, run: _Run) -> Any:
    """The loop itself (see `train`)."""
    progress, callback, checkpoint = run.progress, run.callback, run.checkpoint
    checkpoint_every, compile = run.checkpoint_every, run.compile
    device = prompts.tokens.device
    spec = LoopSpec.of(family.config, n=family.n, per_batch=family.per_batch)
    store = family.empty(device)
    record, resume_state, elapsed = _start(family, spec, device, store, prior)
    losses, objective, steps_done = record["losses"], record["objective"], record["steps_done"]
    segment = Segment(model, spec.source, spec.target, prompts, compile=compile)
    rows = (spec.starts if spec.windowed else max(len(g) for g in groups_of(spec))) * len(prompts)
    memory = pass_memory(model, segment.n_blocks, prompts.tokens.shape[1])
    max_rows = rows_per_pass(memory, rows, run.max_rows_per_pass, device)
    meta = {
        **family.metadata(),
        "segment_blocks": segment.n_blocks,
        "layer_slicing": segment.layer_slicing,
        "compiled": segment.compile,
        "host": type(model).__name__,
        "rows_per_pass": max_rows or rows,
        "steps": spec.steps,
        "solver": spec.solver,
        **({"starts": spec.starts, "slot_steps": spec.slot_steps} if spec.windowed else {}),
        **({"auto": family.auto} if family.auto else {}),
    }

    def artifact(state: dict[str, Tensor], seconds: float) -> Any:
        return family.artifact(
            {n: v.detach().cpu().clone() for n, v in store.items()},
            {
                "losses": losses.cpu().clone(),
                "objective": objective.cpu().clone(),
                "steps_done": steps_done.clone(),
                "resume_state": {k: v.detach().cpu() for k, v in state.items()},  # type: ignore[dict-item]
            },
            {**meta, "train_seconds": seconds},
        )

    phases = _phases(spec)
    bar = tqdm(
        total=sum(len(i) * n for i, n in phases),
        disable=not progress,
        desc=f"{family.noun}s",
        unit="step",
    )
    bar.update(sum(int(steps_done[i].sum()) for i, _ in phases))
    start_time = time.perf_counter()
    window = _Window(family, spec, device) if spec.windowed else None
    group: _Group | None = None
    indices: list[int] = []
    interrupted = False

    def group_state() -> dict[str, Tensor]:
        assert group is not None
        return window.state(group) if window is not None else group.state_tensors()

    with frozen(model):  # only the perturbation gets gradients; flags restored on exit
        try:
            for indices, n_steps in phases:
                done = ~torch.isnan(objective)  # a final objective is written when a phase ends
                if bool(done[indices].all()):
                    continue
                if group is None or window is None:
                    first = int(steps_done[indices[0]])
                    group = _open_group(family, spec, store, indices, window, resume_state, first)
                    resume_state = {}
                labels = (
                    window.labels(indices[0]) if window else [f"{family.noun} {i}" for i in indices]
                )
                for step in range(int(steps_done[indices[0]]), n_steps):
                    group.opt.zero_grad(set_to_none=True)
                    obj = _backward(segment, group, spec, max_rows)
                    grads = {n: p.grad for n, p in group.params.items() if p.grad is not None}
                    group.update(obj)
                    codes = _member_problems(obj, grads, family.directions(group.detached()))
                    if bool(codes.any()):  # the one host sync of the check
                        _raise_problems(codes, labels, step)
                    # a window records its best candidate (the slot's value so far)
                    kept = [int(torch.argmax(obj))] if window else slice(None)
                    losses[indices, step] = obj[kept]
                    steps_done[indices] = step + 1
                    for n, p in group.params.items():
                        store[n][indices] = p.detach()[kept]
                    bar.update(len(indices))
                    if progress and ((step + 1) % 10 == 0 or step + 1 == n_steps):
                        bar.set_postfix(objective=f"{float(obj.mean()):.4g}")
                    if callback is not None:
                        if callback(family.state(step, indices, obj, group.detached())) is False:
                            raise KeyboardInterrupt
                    if checkpoint and (step + 1) % checkpoint_every == 0 and step + 1 < n_steps:
                        seconds = elapsed + time.perf_counter() - start_time
                        artifact(group_state(), seconds).save(checkpoint)
                objective[indices] = _close_phase(segment, spec, group, window, store, indices)
                if window is not None:
                    meta["starts_used"] = window.next
                check_finite(objective[:, None], indices, 1, 0, family.noun)
                if window is None:
                    group = None
                if checkpoint:
                    state = group_state() if group is not None else {}
                    artifact(state, elapsed + time.perf_counter() - start_time).save(checkpoint)
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
    if checkpoint:
        result.save(checkpoint)
    return result
