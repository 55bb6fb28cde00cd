"""MELBO: unsupervised steering vectors that maximise the change they cause downstream.

A MELBO vector θ of fixed norm R is added to the residual stream at a source site (every
position). It is trained to maximise

    Σ_i ( Σ_{t ∈ I_i} || Z_t^(i)(θ) − Z_t^(i)(0) ||₂^p )^(1/q)

at a later target site: the directions along which a small push has a large downstream
effect. Many vectors are learned; "hard" orthogonality keeps each new one orthogonal to
the earlier ones, "soft" penalises their pairwise cosine similarity.

`train_steering_vectors` trains K vectors at once on the batch axis of a `Segment` (the
prefix runs once; each step runs only the blocks from source to target). The source's
optimiser is AMSGrad (AdamW, betas (0.9, 0.98), no weight decay) with the gradient
projected onto the sphere's tangent space and θ renormalised after each step.
`solver="power"` is a safeguarded power-iteration step θ ← R·∇/||∇|| (exactly power
iteration for a linear map) that reaches AMSGrad's 300-step objective in a few steps;
it is what `solver="auto"` runs for the default window of starts.

Orthogonality modes:
  * `sequential` (default) - the source's semantics: vector k is the best direction
    found orthogonal to vectors 0..k-1 (at init, on the gradient, after the step). By
    default each vector is the best of a *window* of `starts_per_vector` = 8 candidate
    starts trained together on the batch axis: slot 0 is the best candidate after `steps`
    steps, every later slot the best after `slot_steps` more; the accepted candidate is
    replaced by a fresh start and the others stay warm, projected off it (see the
    trainer's `_Window`). With a window, `solver="auto"` is the power step and
    `steps="auto"` / `slot_steps="auto"` are 40 / 10. `starts_per_vector=1` is the
    source's one start per vector (AMSGrad, 300 steps).
  * `simultaneous` - all K train together; Gram–Schmidt in a fixed order each step.
  * `soft` - all K together; penalty `soft_weight · mean objective · Σ_{j<k} cos²` on
    vectors (`soft_on="vectors"`) or on their target deltas (`soft_on="deltas"`).
  * `none` - independent vectors, trained together.

Why one module over ~400 lines: about a third of it is the public docstrings
(`MelboConfig` and the trainer entry point document every field and parameter for
the API reference); the code is one concept, about 300 lines.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.host import Host, d_model_of
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.core.sites import HookSite, as_site, check_order
from melbo_lens.methods.config import AUTO_STARTS, LoopConfig, is_int, register_config
from melbo_lens.methods.constraints import tangent_project, to_sphere
from melbo_lens.methods.defaults import resolve_defaults
from melbo_lens.methods.manifold import activation_subspace, project_to_subspace
from melbo_lens.methods.training import (
    FamilyBase,
    TrainingError,
    check_prompt_set,
    check_prompts_and_sites,
    train,
)
from melbo_lens.methods.training.objective import ObjectiveName
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = ["MelboConfig", "TrainingState", "TrainingError", "train_steering_vectors", "scaled_lr"]

Orthogonal = Literal["sequential", "simultaneous", "soft", "none"]
Solver = Literal["amsgrad", "power"]

# The source's lr (1e-3) at its setting (Qwen-1.8B, d_model 2048, R 4) is 0.011·R/√d_model.
LR_SCALE = 0.011


def scaled_lr(radius: float, d_model: int) -> float:
    """Scale-aware learning rate 0.011·R/√d_model (≈1e-3 at the source's setting).

    Args:
        radius: R.
        d_model: The residual width.

    Returns:
        The learning rate.

    Examples:
        >>> round(scaled_lr(4.0, 2048), 5)
        0.00097
    """
    return LR_SCALE * radius / math.sqrt(d_model)


@register_config("melbo")
@dataclass(frozen=True)
class MelboConfig(LoopConfig):
    """Everything that defines a MELBO run (frozen, validated, JSON-serialisable).

    `lr="auto"` (default) uses `scaled_lr(radius, d_model)`; a float is an absolute lr.
    `starts_per_vector`, `solver`, `steps`, `slot_steps` and `slot_tol` default to
    "auto": a window of 8 starts per sequential vector with the power solver, at most 40
    steps for vector 0 and 10 for each later one, a slot ending early once its best
    candidate's objective rises by less than 1e-3 of itself over 2 steps (`starts`,
    `loop_solver()`, `loop_steps()`, `loop_slot_steps()`, `loop_slot_tol()` give the
    values run; the artifact's metadata records them).
    `vectors_per_batch` caps how many vectors share a forward pass (memory).
    `on_manifold=k` keeps every vector in the span of the top-k right singular vectors
    of the prompts' source activations (`methods.manifold`).

    Args:
        source: where θ is added (None: the default site, a quarter of the depth in).
        target: where the change is read (None: three quarters in; the last block's
            output for the logprob objectives).
        n_vectors: how many vectors.
        radius: R, each vector's norm ("auto": searched before training).
        power: p, the per-position change ||Δ||^p.
        q: the per-prompt sum to the power 1/q.
        steps: steps of the first vector (or of every vector without a window).
        lr: the learning rate ("auto": scaled to R and d_model).
        orthogonal: "sequential", "simultaneous", "soft" or "none".
        solver: "amsgrad" or "power" ("auto": power with a window, else amsgrad).
        betas: the Adam betas.
        soft_weight: the weight of the soft orthogonality penalty.
        soft_on: what the soft penalty compares: "vectors" or their "deltas".
        vectors_per_batch: cap on the vectors sharing a forward pass.
        amsgrad: keep the max of second moments (None: unless orthogonal is
            "simultaneous").
        seed: vector k starts from the generator (seed, k).
        starts_per_vector: candidate starts per sequential vector ("auto": 8).
        slot_steps: steps between later slots of a window ("auto": per solver).
        slot_tol: relative rise below which a slot ends early ("auto": per solver).
        objective: "melbo", "consistency", "melbo+consistency", "logprob" or
            "neg-logprob" (`methods.training.objective`).
        consistency_weight: the consistency term's weight in "melbo+consistency".
        on_manifold: keep the vectors in the top-k activation subspace (None: off).

    Raises:
        ValueError: any invalid field, all named in one message.

    Examples:
        >>> cfg = MelboConfig(HookSite(7), HookSite(22, "resid_pre"), n_vectors=4, radius=4.0)
        >>> MelboConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    source: HookSite | None = None
    target: HookSite | None = None
    n_vectors: int = 8
    radius: float | Literal["auto"] = "auto"
    power: float = 2.0
    q: float = 1.0
    steps: int | Literal["auto"] = "auto"
    lr: float | Literal["auto"] = "auto"
    orthogonal: Orthogonal = "sequential"
    solver: Solver | Literal["auto"] = "auto"
    betas: tuple[float, float] = (0.9, 0.98)
    soft_weight: float = 1.0
    soft_on: Literal["vectors", "deltas"] = "vectors"
    vectors_per_batch: int | None = None
    amsgrad: bool | None = None
    seed: int = 0
    starts_per_vector: int | Literal["auto"] = "auto"
    slot_steps: int | Literal["auto"] = "auto"
    slot_tol: float | Literal["auto"] = "auto"
    objective: ObjectiveName = "melbo"
    consistency_weight: float = 1.0
    on_manifold: int | None = None

    @property
    def starts(self) -> int:
        """`starts_per_vector` as run: "auto" is `AUTO_STARTS` for sequential, else 1."""
        if self.starts_per_vector == "auto":
            return AUTO_STARTS if self.orthogonal == "sequential" else 1
        return int(self.starts_per_vector)

    def __post_init__(self) -> None:
        for name in ("source", "target"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, as_site(getattr(self, name)))
        object.__setattr__(self, "betas", tuple(self.betas))
        problems = []
        if not is_int(self.n_vectors, 1):
            problems.append(f"n_vectors must be an int >= 1, got {self.n_vectors!r}")
        problems += self.loop_problems()
        problems += self.window_problems("starts_per_vector")
        if self.vectors_per_batch is not None and not is_int(self.vectors_per_batch, 1):
            problems.append(
                f"vectors_per_batch must be an int >= 1, got {self.vectors_per_batch!r}"
            )
        if self.on_manifold is not None:
            if not is_int(self.on_manifold, 1):
                problems.append(
                    f"on_manifold must be None or an int >= 1 (the subspace's dimension k), "
                    f"got {self.on_manifold!r}"
                )
            elif self.orthogonal in ("sequential", "simultaneous") and (
                is_int(self.n_vectors, 1) and self.n_vectors > self.on_manifold
            ):
                problems.append(
                    f"{self.orthogonal} orthogonality inside a {self.on_manifold}-dimensional "
                    f"subspace (on_manifold) fits at most {self.on_manifold} vectors, got "
                    f"n_vectors={self.n_vectors}; raise on_manifold or lower n_vectors"
                )
        if self.source is not None and self.target is not None:
            try:
                check_order(self.source, self.target)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("invalid MelboConfig: " + "; ".join(problems))

    auto_radius = True  # radius="auto" is a valid value (see `LoopConfig.loop_problems`)

    def sites(self) -> tuple[HookSite, HookSite]:
        """(source, target) of a config whose sites are set (`train_steering_vectors`
        sets the defaults of `methods.defaults` first)."""
        if self.source is None or self.target is None:
            raise ValueError("source/target are None (auto); train_steering_vectors sets them")
        return self.source, self.target

    def radius_value(self) -> float:
        """R of a config whose radius is set (not "auto")."""
        if self.radius == "auto":
            raise ValueError("radius='auto' is chosen by train_steering_vectors before training")
        return float(self.radius)

    def resolved_lr(self, d_model: int) -> float:
        return scaled_lr(self.radius_value(), d_model) if self.lr == "auto" else float(self.lr)


@dataclass
class TrainingState:
    """What a per-step callback sees. Return False from the callback to stop early.

    With a window of starts (the default), `indices` is `[k]`, the vector being filled,
    and `objective` / `vectors` have one row per candidate start; `step` counts from 0
    in each vector's phase.

    Attributes:
        step: The step within the current phase.
        indices: The vectors being trained.
        objective: Their objectives at this step.
        vectors: Their current values.
    """

    step: int
    indices: list[int]  # which vectors are training now
    objective: Float[Tensor, " k"]  # objective of each before this step's update
    vectors: Float[Tensor, "k d_model"]


Callback = Callable[[TrainingState], bool | None]


def init_vectors(indices: list[int], d_model: int, seed: int, device, dtype) -> Tensor:
    """Gaussian directions, one generator per vector index so runs compose exactly."""
    rows = []
    for k in indices:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        rows.append(torch.randn(d_model, generator=gen, dtype=torch.float64))
    return torch.stack(rows).to(device=device, dtype=dtype)


class VectorFamily(FamilyBase):
    """MELBO vectors for the trainer: θ on the sphere of radius R, added at the source."""

    noun = "vector"

    config: MelboConfig

    def __init__(
        self,
        config: MelboConfig,
        model: Host,
        prompts: PromptSet,
        subspace: Tensor | None = None,
    ) -> None:
        super().__init__(config, model, prompts)
        self.subspace = subspace  # [d_model, k] orthonormal (on_manifold), or None
        self.d_model = d_model_of(model)
        self.lr = config.resolved_lr(self.d_model)
        self.radius, (self.source, _) = config.radius_value(), config.sites()
        self.n, self.per_batch = config.n_vectors, config.vectors_per_batch

    def init(self, indices: list[int], device: torch.device) -> dict[str, Tensor]:
        return {
            "theta": init_vectors(indices, self.d_model, self.config.seed, device, torch.float32)
        }

    def _inside(self, x: Tensor) -> Tensor:
        return x if self.subspace is None else project_to_subspace(x, self.subspace)

    def retract(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"theta": to_sphere(self._inside(params["theta"]), self.radius)}

    def tangent(self, grads: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"theta": tangent_project(self._inside(grads["theta"]), params["theta"])}

    def directions(self, params: dict[str, Tensor]) -> Tensor:
        return params["theta"][:, None, :]

    def with_directions(self, params: dict[str, Tensor], directions: Tensor) -> dict[str, Tensor]:
        return {"theta": directions[:, 0, :]}

    def target(self, segment: Segment, params: dict[str, Tensor]) -> Tensor:
        return segment.run(params["theta"])

    def lrs(self) -> dict[str, float]:
        return {"theta": self.lr}

    def empty(self, device: torch.device) -> dict[str, Tensor]:
        return {"theta": torch.zeros(self.n, self.d_model, dtype=torch.float32, device=device)}

    def load(self, path: str) -> SteeringVectors:
        return SteeringVectors.load(path)

    def params_of(self, artifact: SteeringVectors) -> dict[str, Tensor]:
        return {"theta": artifact.vectors}

    def artifact(
        self, params: dict[str, Tensor], record: dict[str, Any], metadata: dict[str, Any]
    ) -> SteeringVectors:
        return SteeringVectors(
            params["theta"],
            self.source,
            method="melbo",
            subspace=self.subspace,
            **self.provenance(record, metadata),
        )

    def state(
        self, step: int, indices: list[int], objective: Tensor, params: dict[str, Tensor]
    ) -> TrainingState:
        return TrainingState(step, indices, objective, params["theta"])

    def metadata(self) -> dict[str, Any]:
        rule = "0.011*R/sqrt(d_model)" if self.config.lr == "auto" else "absolute"
        return {"lr_used": self.lr, "lr_rule": rule}


def _subspace(
    model: Host, prompts: PromptSet, config: MelboConfig, prior: SteeringVectors | None
) -> Tensor | None:
    """The on-manifold basis of a run (a resumed run continues in its recorded one)."""
    if config.on_manifold is None:
        return None
    if prior is not None and prior.subspace is not None:
        return prior.subspace
    k = config.on_manifold
    if k > d_model_of(model):
        raise ValueError(f"on_manifold={k} exceeds d_model={d_model_of(model)}")
    return activation_subspace(model, prompts, config.sites()[0], k)


def train_steering_vectors(
    model: Host,
    prompts: PromptSet,
    config: MelboConfig,
    *,
    progress: bool = True,
    callback: Callback | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 50,
    resume: SteeringVectors | str | os.PathLike[str] | None = None,
    compile: bool = False,
    overwrite: bool = False,
    max_rows_per_pass: int | str | None = None,
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

    Args:
        model: the HookedTransformer (or host) to steer; its weights are not changed.
        prompts: the prompts and their target positions (`PromptSet`); prompts built
            without `target_positions` get the default positions.
        config: what to train (`MelboConfig`): sites, number of vectors, radius R
            ("auto" searches it), objective, solver and orthogonality.
        progress: show a progress bar (and the defaults' choices) on stderr.
        callback: called after every step with the loop's state; returning False
            stops the run, which returns what exists so far.
        checkpoint: a path where the partial artifact is saved every
            `checkpoint_every` steps, atomically (finite values only).
        checkpoint_every: steps between checkpoints.
        resume: a saved artifact (or its path) of the same settings to continue exactly.
        compile: run the segment's blocks through torch.compile.
        overwrite: allow `checkpoint` to replace a finished run at that path.
        max_rows_per_pass: split each step's rows (members x prompts) into passes of
            at most this many rows; "auto" sizes them to the device's free memory.

    Returns:
        The trained `SteeringVectors`, with their objective, losses per step, the
        settings run and the defaults' choices in `metadata["auto"]`.

    Raises:
        ValueError: prompts or sites that do not fit the model, or more mutually
            orthogonal vectors than d_model.
        TrainingError: a NaN/inf or zero objective at some step (checked every step).
        MemoryError: a pass that cannot fit the device, naming the knob that lowers it.

    Examples:
        >>> cfg = MelboConfig(HookSite(1), HookSite(3), n_vectors=4, steps=50)
        >>> prompts = PromptSet.from_texts(model, "hi there")
        >>> vectors = train_steering_vectors(model, prompts, cfg, progress=False)
        >>> vectors.vectors.shape, bool((vectors.objective > vectors.losses[:, 0]).all())
        (torch.Size([4, 32]), True)
    """
    check_prompt_set(prompts)
    prior = SteeringVectors.load(str(resume)) if isinstance(resume, str | os.PathLike) else resume
    config, prompts, auto = resolve_defaults(
        model, prompts, config, train_steering_vectors, prior=prior, progress=progress
    )
    check_prompts_and_sites(model, prompts, *config.sites())
    d_model = d_model_of(model)
    if config.orthogonal in ("sequential", "simultaneous") and config.n_vectors > d_model:
        raise ValueError(
            f"cannot train {config.n_vectors} mutually orthogonal vectors in d_model={d_model}"
        )
    family = VectorFamily(config, model, prompts, _subspace(model, prompts, config, prior))
    family.auto = auto
    return train(
        model,
        prompts,
        family,
        resume=prior,
        progress=progress,
        callback=callback,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        compile=compile,
        overwrite=overwrite,
        max_rows_per_pass=max_rows_per_pass,
    )
