"""MELBO: unsupervised steering vectors that maximise the change they cause downstream.

A MELBO vector θ of fixed norm R is added to the residual stream at a source site (every
position). It is trained to maximise

    Σ_i ( Σ_{t ∈ I_i} || Z_t^(i)(θ) − Z_t^(i)(0) ||₂^p )^(1/q)

at a later target site: the directions along which a small push has a large downstream
effect. Many vectors are learned; "hard" orthogonality keeps each new one orthogonal to
the earlier ones, "soft" penalises their pairwise cosine similarity.

`train_steering_vectors` trains K vectors at once on the batch axis of a `Segment` (the
prefix runs once; each step runs only the blocks from source to target). The default
optimiser is the source's AMSGrad (AdamW, betas (0.9, 0.98), no weight decay) with the
gradient projected onto the sphere's tangent space and θ renormalised after each step.
`solver="power"` is a faster alternative: a safeguarded power-iteration step
θ ← R·∇/||∇|| that is exactly power iteration for a linear map.

Orthogonality modes:
  * `sequential` - the source's semantics: vector k trains after vectors 0..k-1 are
    final, orthogonal to them (at init, on the gradient, after the step). Prompts are
    batched, vectors are not.
  * `simultaneous` - all K train together; Gram–Schmidt in a fixed order each step.
  * `soft` - all K together; penalty `soft_weight · mean objective · Σ_{j<k} cos²` on
    vectors (`soft_on="vectors"`) or on their target deltas (`soft_on="deltas"`).
  * `none` - independent vectors, trained together.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..artifacts import SteeringVectors
from ..prompts import PromptSet
from ..segment import Segment, check_sites, d_model_of
from ..sites import HookSite, as_site, check_order
from .config import config_from_dict, config_to_dict
from .constraints import gram_schmidt, project_out, project_out_earlier, tangent_project, to_sphere
from .objectives import cosine_penalty, melbo_objective_per_prompt

__all__ = ["MelboConfig", "TrainingState", "TrainingError", "train_steering_vectors", "scaled_lr"]

Orthogonal = Literal["sequential", "simultaneous", "soft", "none"]
Solver = Literal["amsgrad", "power"]

# The source's lr (1e-3) at its setting (Qwen-1.8B, d_model 2048, R 4) is 0.011·R/√d_model.
LR_SCALE = 0.011


def scaled_lr(radius: float, d_model: int) -> float:
    """Scale-aware learning rate 0.011·R/√d_model (≈1e-3 at the source's setting).

    Examples:
        >>> round(scaled_lr(4.0, 2048), 5)
        0.00097
    """
    return LR_SCALE * radius / math.sqrt(d_model)


class TrainingError(RuntimeError):
    """Training produced NaN/inf or otherwise cannot continue."""


@dataclass(frozen=True)
class MelboConfig:
    """Everything that defines a MELBO run (frozen, validated, JSON-serialisable).

    `lr="auto"` (default) uses `scaled_lr(radius, d_model)`; a float is an absolute lr.
    `vectors_per_batch` caps how many vectors share a forward pass (memory).

    Examples:
        >>> cfg = MelboConfig(HookSite(7), HookSite(22, "resid_pre"), n_vectors=4, radius=4.0)
        >>> MelboConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    source: HookSite
    target: HookSite
    n_vectors: int = 8
    radius: float = 4.0
    power: float = 2.0
    q: float = 1.0
    steps: int = 300
    lr: float | Literal["auto"] = "auto"
    orthogonal: Orthogonal = "sequential"
    solver: Solver = "amsgrad"
    betas: tuple[float, float] = (0.9, 0.98)
    soft_weight: float = 1.0
    soft_on: Literal["vectors", "deltas"] = "vectors"
    vectors_per_batch: int | None = None
    amsgrad: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", as_site(self.source))
        object.__setattr__(self, "target", as_site(self.target))
        object.__setattr__(self, "betas", tuple(self.betas))
        problems = []
        if not (isinstance(self.n_vectors, int) and self.n_vectors >= 1):
            problems.append(f"n_vectors must be an int >= 1, got {self.n_vectors!r}")
        if not (self.radius > 0 and math.isfinite(self.radius)):
            problems.append(f"radius must be a finite number > 0, got {self.radius!r}")
        if not self.power > 0 or not self.q > 0:
            problems.append(f"power and q must be > 0, got power={self.power} q={self.q}")
        if not (isinstance(self.steps, int) and self.steps >= 0):
            problems.append(f"steps must be an int >= 0, got {self.steps!r}")
        if self.lr != "auto" and not (isinstance(self.lr, int | float) and self.lr > 0):
            problems.append(f"lr must be 'auto' or a number > 0, got {self.lr!r}")
        if self.orthogonal not in ("sequential", "simultaneous", "soft", "none"):
            problems.append(
                f"orthogonal must be 'sequential', 'simultaneous', 'soft' or 'none', "
                f"got {self.orthogonal!r}"
            )
        if self.solver not in ("amsgrad", "power"):
            problems.append(f"solver must be 'amsgrad' or 'power', got {self.solver!r}")
        if self.soft_on not in ("vectors", "deltas"):
            problems.append(f"soft_on must be 'vectors' or 'deltas', got {self.soft_on!r}")
        if self.vectors_per_batch is not None and self.vectors_per_batch < 1:
            problems.append(f"vectors_per_batch must be >= 1, got {self.vectors_per_batch}")
        try:
            check_order(self.source, self.target)
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise ValueError("invalid MelboConfig: " + "; ".join(problems))

    @property
    def uses_amsgrad(self) -> bool:
        """AMSGrad (the source's choice) unless `simultaneous`, where plain Adam is used.

        Under simultaneous Gram–Schmidt, vector k first climbs towards directions that
        earlier vectors later claim; AMSGrad's running max of squared gradients then keeps
        its step tiny for the rest of the run, while Adam's β₂ = 0.98 forgets in ~50 steps.
        """
        return self.orthogonal != "simultaneous" if self.amsgrad is None else self.amsgrad

    def resolved_lr(self, d_model: int) -> float:
        return scaled_lr(self.radius, d_model) if self.lr == "auto" else float(self.lr)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MelboConfig:
        return config_from_dict(cls, data)


@dataclass
class TrainingState:
    """What a per-step callback sees. Return False from the callback to stop early."""

    step: int
    indices: list[int]  # which vectors are training now
    objective: Float[Tensor, " k"]  # objective of each before this step's update
    vectors: Float[Tensor, "k d_model"]


Callback = Callable[[TrainingState], bool | None]


def _init_vectors(indices: list[int], d_model: int, seed: int, device, dtype) -> Tensor:
    """Gaussian directions, one generator per vector index so runs compose exactly."""
    rows = []
    for k in indices:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        rows.append(torch.randn(d_model, generator=gen, dtype=torch.float64))
    return torch.stack(rows).to(device=device, dtype=dtype)


class _Group:
    """The optimisation state of vectors that train together."""

    def __init__(self, theta: Tensor, cfg: MelboConfig, lr: float, basis: Tensor | None):
        self.cfg = cfg
        self.basis = basis  # orthonormal rows the group must stay orthogonal to
        self.theta = torch.nn.Parameter(self._constrain(theta))
        self.opt = torch.optim.AdamW(
            [self.theta], lr=lr, betas=cfg.betas, weight_decay=0.0, amsgrad=cfg.uses_amsgrad
        )
        k = theta.shape[0]
        # power-solver safeguard state
        self.accepted = self.theta.detach().clone()
        self.accepted_obj = torch.full((k,), -math.inf, device=theta.device)
        self.accepted_grad = torch.zeros_like(self.accepted)
        self.beta = torch.ones(k, device=theta.device)

    def _constrain(self, theta: Tensor) -> Tensor:
        theta = project_out(theta, self.basis)
        if self.cfg.orthogonal == "simultaneous":
            theta = gram_schmidt(theta)
        return to_sphere(theta, self.cfg.radius)

    def _project_grad(self, grad: Tensor, theta: Tensor) -> Tensor:
        grad = tangent_project(grad, theta)
        grad = project_out(grad, self.basis)
        if self.cfg.orthogonal == "simultaneous":
            grad = project_out_earlier(grad, torch.nn.functional.normalize(theta, dim=-1))
        return grad

    @torch.no_grad()
    def update(self, objective: Tensor) -> None:
        theta = self.theta
        if self.cfg.solver == "amsgrad":
            # minimising -objective: the optimiser sees the projected gradient of the loss
            theta.grad = self._project_grad(theta.grad, theta)
            self.opt.step()
            theta.copy_(self._constrain(theta))
            if self.cfg.orthogonal == "simultaneous":
                # Momentum pointing along earlier vectors would keep pushing row k into
                # directions Gram–Schmidt removes each step; drop it (row 0 unaffected).
                state = self.opt.state[theta]
                unit = torch.nn.functional.normalize(theta, dim=-1)
                state["exp_avg"].copy_(project_out_earlier(state["exp_avg"], unit))
            return
        # Safeguarded power step on the sphere: accept θ if its objective did not drop,
        # else halve the step from the last accepted point. All per vector, on device.
        ascent = -theta.grad
        ok = objective >= self.accepted_obj
        if self.cfg.orthogonal == "simultaneous":
            # When an earlier vector moved, row k's constraint set moved with it and its
            # last accepted objective is stale: accept row k's new point unconditionally.
            cos = torch.nn.functional.cosine_similarity(theta, self.accepted, dim=-1)
            moved = (ok & (cos < 1 - 1e-6)).to(torch.int32)
            earlier_moved = (torch.cumsum(moved, 0) - moved) > 0
            ok = ok | earlier_moved
        self.accepted = torch.where(ok[:, None], theta, self.accepted)
        self.accepted_grad = torch.where(ok[:, None], ascent, self.accepted_grad)
        self.accepted_obj = torch.where(ok, objective, self.accepted_obj)
        self.beta = torch.where(ok, (self.beta * 2).clamp(max=1.0), self.beta / 2)
        g = project_out(self.accepted_grad, self.basis)
        target = to_sphere(g, self.cfg.radius)
        step = self.beta[:, None] * (target - self.accepted)
        theta.copy_(self._constrain(self.accepted + step))

    def result(self) -> Tensor:
        """Final vectors: the current θ, or for the power solver the last accepted θ."""
        if self.cfg.solver == "power" and bool(self.accepted_obj.isfinite().all()):
            return self._constrain(self.accepted.clone())
        return self.theta.detach().clone()

    def state_tensors(self) -> dict[str, Tensor]:
        state = self.opt.state.get(self.theta, {})
        out = {"theta": self.theta.detach().clone()}
        for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state:
                out[f"opt.{key}"] = torch.as_tensor(state[key]).detach().clone()
        if self.cfg.solver == "power":
            out.update(
                accepted=self.accepted,
                accepted_obj=self.accepted_obj,
                accepted_grad=self.accepted_grad,
                beta=self.beta,
            )
        return out

    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        opt_state = {k[4:]: v.clone() for k, v in state.items() if k.startswith("opt.")}
        if opt_state:
            if "step" in opt_state:
                opt_state["step"] = opt_state["step"].float()
            self.opt.state[self.theta] = opt_state
        if self.cfg.solver == "power":
            self.accepted = state["accepted"].clone()
            self.accepted_obj = state["accepted_obj"].clone()
            self.accepted_grad = state["accepted_grad"].clone()
            self.beta = state["beta"].clone()


def _objectives(
    segment: Segment, theta: Tensor, cfg: MelboConfig
) -> tuple[Float[Tensor, " k"], Float[Tensor, "k n pos d_model"]]:
    z = segment.run(theta)
    mask = segment.prompts.target_mask
    per_prompt = melbo_objective_per_prompt(
        z, segment.unsteered.expand_as(z), mask.expand(z.shape[:-1]), power=cfg.power, q=cfg.q
    )
    return per_prompt.sum(-1), z


def _loss(segment: Segment, group: _Group, cfg: MelboConfig) -> tuple[Tensor, Tensor]:
    objective, z = _objectives(segment, group.theta, cfg)
    loss = -objective.sum()
    if cfg.orthogonal == "soft" and group.theta.shape[0] > 1:
        if cfg.soft_on == "vectors":
            penalty = cosine_penalty(group.theta)
        else:
            mask = segment.prompts.target_mask[None, :, :, None]
            penalty = cosine_penalty(((z - segment.unsteered) * mask).flatten(1))
        loss = loss + cfg.soft_weight * objective.detach().mean() * penalty
    return loss, objective.detach()


def check_finite(
    losses: Tensor, indices: list[int], upto: int, first_step: int, noun: str = "vector"
) -> None:
    """Raise TrainingError naming the first step and row whose objective is NaN/inf."""
    bad = ~torch.isfinite(losses[indices, first_step:upto])
    if bad.any():
        row, col = (int(x) for x in torch.nonzero(bad)[0])
        raise TrainingError(
            f"objective became NaN/inf at step {first_step + col} for {noun} {indices[row]}; "
            "try a smaller radius or lr, a float32 model, or check the prompts for "
            "overflow (partial results are kept in the checkpoint if one was given)"
        )


def _groups(cfg: MelboConfig) -> list[list[int]]:
    if cfg.orthogonal == "sequential":
        return [[k] for k in range(cfg.n_vectors)]
    if cfg.orthogonal in ("simultaneous", "soft"):
        if cfg.vectors_per_batch is not None and cfg.vectors_per_batch < cfg.n_vectors:
            raise ValueError(
                f"orthogonal={cfg.orthogonal!r} couples all vectors, so they must train in "
                f"one batch; got vectors_per_batch={cfg.vectors_per_batch} < n_vectors="
                f"{cfg.n_vectors}. Use orthogonal='sequential' to limit memory"
            )
        return [list(range(cfg.n_vectors))]
    size = cfg.vectors_per_batch or cfg.n_vectors
    return [list(range(i, min(i + size, cfg.n_vectors))) for i in range(0, cfg.n_vectors, size)]


@contextmanager
def frozen(model: Any) -> Iterator[None]:
    """No weight gradients inside (only θ is trained); restores each flag on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def train_steering_vectors(
    model: Any,
    prompts: PromptSet,
    config: MelboConfig,
    *,
    progress: bool = True,
    callback: Callback | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 50,
    resume: SteeringVectors | str | None = None,
    check_every: int = 10,
    compile: bool = False,
) -> SteeringVectors:
    """Train MELBO steering vectors; returns a `SteeringVectors` artifact.

    Ctrl-C (KeyboardInterrupt) stops training and returns what exists so far:
    finished vectors, plus the in-progress ones with `steps_done` telling how far they
    got; with `checkpoint=path` that state is also saved, and
    `train_steering_vectors(..., resume=path)` continues the run exactly.

    `compile=True` runs the segment's blocks through torch.compile (HookedTransformer,
    block-boundary sites): about 1.3x faster per step after a one-off compile of about a
    minute, so it pays off for long runs (it does not change the results beyond float
    rounding).

    Examples:
        >>> cfg = MelboConfig(HookSite(1), HookSite(3), n_vectors=4, steps=50)
        >>> prompts = PromptSet.from_texts(model, "Hi")  # doctest: +SKIP
        >>> vectors = train_steering_vectors(model, prompts, cfg)  # doctest: +SKIP
        >>> vectors.objective  # final objective of each vector  # doctest: +SKIP
    """
    if not isinstance(prompts, PromptSet):
        raise TypeError(
            f"prompts must be a PromptSet, got {type(prompts).__name__}; "
            "build one with PromptSet.from_texts(model, texts)"
        )
    check_sites(model, config.source, config.target)
    d_model = d_model_of(model)
    if config.orthogonal in ("sequential", "simultaneous") and config.n_vectors > d_model:
        raise ValueError(
            f"cannot train {config.n_vectors} mutually orthogonal vectors in d_model={d_model}"
        )
    lr = config.resolved_lr(d_model)
    dtype = torch.float32
    device = prompts.tokens.device

    n, steps = config.n_vectors, config.steps
    vectors = torch.zeros(n, d_model, dtype=dtype, device=device)
    losses = torch.full((n, steps), float("nan"), dtype=torch.float32, device=device)
    objective = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    steps_done = torch.zeros(n, dtype=torch.long)
    group_state: dict[str, Tensor] = {}
    elapsed = 0.0
    if resume is not None:
        prior = SteeringVectors.load(resume) if isinstance(resume, str) else resume
        if prior.config != config.to_dict():
            raise ValueError(
                "cannot resume: the saved run's config differs from this one; pass "
                "MelboConfig.from_dict(saved.config) to continue it"
            )
        vectors.copy_(prior.vectors)
        if prior.losses is not None:
            losses.copy_(prior.losses)
        if prior.objective is not None:
            objective.copy_(prior.objective)
        if prior.steps_done is not None:
            steps_done.copy_(prior.steps_done)
        group_state = dict(prior.resume_state)
        elapsed = float(prior.metadata.get("train_seconds", 0.0))

    segment = Segment(model, config.source, config.target, prompts, compile=compile)
    meta = {
        "lr_used": lr,
        "lr_rule": "0.011*R/sqrt(d_model)" if config.lr == "auto" else "absolute",
        "segment_blocks": segment.n_blocks,
        "layer_slicing": segment.layer_slicing,
        "compiled": segment.compile,
        "host": type(model).__name__,
    }

    def artifact(state: dict[str, Tensor], seconds: float) -> SteeringVectors:
        return SteeringVectors(
            vectors=vectors.detach().cpu().clone(),
            site=config.source,
            target=config.target,
            method="melbo",
            config=config.to_dict(),
            model_name=getattr(model.cfg, "model_name", None),
            prompts=prompts.to_dict(),
            losses=losses.cpu().clone(),
            objective=objective.cpu().clone(),
            steps_done=steps_done.clone(),
            metadata={**meta, "train_seconds": seconds},
            resume_state={k: v.detach().cpu() for k, v in state.items()},
        )

    groups = _groups(config)
    bar = tqdm(total=n * steps, disable=not progress, desc="melbo", unit="vec-step")
    bar.update(int(steps_done.sum()))
    start_time = time.perf_counter()
    group: _Group | None = None
    indices: list[int] = []
    interrupted = False
    with frozen(model):  # only θ gets gradients; the model's flags are restored
        try:
            for indices in groups:
                done = ~torch.isnan(objective)  # a final objective is written when a group ends
                if bool(done[indices].all()):
                    continue
                finished = [k for k in range(indices[0]) if done[k]]
                basis = None
                if config.orthogonal == "sequential" and finished:
                    basis = torch.nn.functional.normalize(vectors[finished], dim=-1)
                init = _init_vectors(indices, d_model, config.seed, device, dtype)
                group = _Group(init, config, lr, basis)
                first = int(steps_done[indices[0]])
                if first > 0 and group_state:
                    group.load_state_tensors({k: v.to(device) for k, v in group_state.items()})
                group_state = {}
                for step in range(first, steps):
                    group.opt.zero_grad(set_to_none=True)
                    loss, obj = _loss(segment, group, config)
                    loss.backward()
                    losses[indices, step] = obj
                    group.update(obj)
                    steps_done[indices] = step + 1
                    vectors[indices] = group.theta.detach()
                    bar.update(len(indices))
                    if (step + 1) % check_every == 0 or step + 1 == steps:
                        check_finite(losses, indices, step + 1, max(first, step + 1 - check_every))
                        bar.set_postfix(objective=f"{float(obj.mean()):.4g}")
                    if callback is not None:
                        state = TrainingState(step, indices, obj, group.theta.detach())
                        if callback(state) is False:
                            raise KeyboardInterrupt
                    if checkpoint and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                        seconds = elapsed + time.perf_counter() - start_time
                        artifact(group.state_tensors(), seconds).save(checkpoint)
                vectors[indices] = group.result()
                with torch.no_grad():
                    final, _ = _objectives(segment, vectors[indices], config)
                objective[indices] = final
                check_finite(objective[:, None], indices, 1, 0)
                group = None
                if checkpoint:
                    artifact({}, elapsed + time.perf_counter() - start_time).save(checkpoint)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
    elapsed += time.perf_counter() - start_time
    state = group.state_tensors() if (interrupted and group is not None) else {}
    if interrupted and group is not None:
        vectors[indices] = group.theta.detach()
    result = artifact(state, elapsed)
    result.metadata["interrupted"] = interrupted
    if checkpoint:
        result.save(checkpoint)
    return result
