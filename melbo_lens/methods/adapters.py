"""Unsupervised steering adapters: low-rank MLP weight edits trained like MELBO vectors.

A steering adapter perturbs the output weights of block L's MLP by a rank-r matrix,

    W' = W + R · Ω_B Ω_Aᵀ        (Ω_A: d_mlp × r, Ω_B: d_model × r, unit-norm columns)

(W_out' = W_out + R · Ω_A Ω_Bᵀ in TransformerLens's [d_mlp, d_model] layout). Unlike a
steering vector, which adds the same θ at every position, the adapter's push depends on
the token: R · (h Ω_A) Ω_Bᵀ for the MLP hidden activation h. It is trained on the same
MELBO objective as vectors,

    Σ_i ( Σ_{t ∈ I_i} || Z_t^(i)(Ω) − Z_t^(i)(0) ||₂^p )^(1/q)   at the target site,

with every column of Ω_A and Ω_B kept on its unit sphere: each column's gradient is
projected onto that sphere's tangent space and the column is renormalised after the
step, so R alone sets the scale (there is no LoRA alpha/r factor).

The adapter is applied by hooks (`melbo_lens.perturbations.adapters`), never by editing weights. A
`Segment` whose source is `HookSite(L, "mlp_out")` caches the residual entering block L
once; each step runs blocks L .. target for K adapters × n prompts rows, adapter k on
rows k·n .. k·n+n-1, so K adapters share one forward and one backward pass.

Orthogonality (`orthogonal=`):
  * `none` (default) - independent adapters, trained together on the batch axis.
  * `sequential` - adapter k trains after adapters 0..k-1 are final, and the columns of
    its Ω_B stay orthogonal to the span of their Ω_B columns (at init, on the gradient,
    after the step). Adapters then write into mutually orthogonal subspaces of the
    residual stream, whatever the input, and their weight edits are orthogonal in the
    Frobenius inner product (⟨ΔW_j, ΔW_k⟩ = tr(Ω_A^j Ω_B^jᵀ Ω_B^k Ω_A^kᵀ) = 0). Ω_A is
    left free: adapters may read the same hidden features.

Learning rate: Adam moves every coordinate by about lr per step whatever the gradient's
scale, so a unit-norm column of dimension d moves by about lr·√d per step. `lr="auto"`
uses lr = 0.011/√d for each factor (d = d_mlp for Ω_A, d = d_model for Ω_B): every
column then moves by the same relative step, 0.011 of its norm, as a MELBO vector under
its default 0.011·R/√d_model. R does not enter (the columns have norm 1 whatever R is).

Why one module over ~400 lines: about a third of it is the public docstrings
(`AdapterConfig` and the trainer entry point document every field and parameter for
the API reference); the code is one concept, about 300 lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.host import Host, d_model_of
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment, run_to_site
from melbo_lens.core.sites import HookSite, as_site, check_order, mlp_hidden_name
from melbo_lens.methods.config import LoopConfig, is_int, is_positive, register_config
from melbo_lens.methods.constraints import tangent_project, to_sphere
from melbo_lens.methods.defaults import default_positions
from melbo_lens.methods.melbo import LR_SCALE
from melbo_lens.methods.training import FamilyBase, check_prompts_and_sites, train
from melbo_lens.methods.training.objective import ObjectiveName
from melbo_lens.perturbations.adapter_norms import NORMALIZATIONS, normalized_factors
from melbo_lens.perturbations.adapters import SteeringAdapters, adapter_hooks, check_adapter_host

__all__ = [
    "AdapterConfig",
    "AdapterTrainingState",
    "adapter_lr",
    "train_steering_adapters",
]

AdapterOrthogonal = Literal["none", "sequential", "simultaneous", "soft"]


def adapter_lr(dim: int) -> float:
    """Scale-aware lr for a unit-norm column of dimension `dim`: 0.011/√dim.

    Args:
        dim: The column's dimension.

    Returns:
        The learning rate.

    Examples:
        >>> round(adapter_lr(576), 6)        # SmolLM2-135M's d_model
        0.000458
    """
    return LR_SCALE / math.sqrt(dim)


@register_config("melbo_adapters")
@dataclass(frozen=True)
class AdapterConfig(LoopConfig):
    """Everything that defines a steering-adapter run (frozen, validated, JSON-able).

    The adapters edit block `source_layer`'s MLP output weights; the objective is
    measured at `target`, which must come after `blocks.{source_layer}.hook_mlp_out`.
    `lr="auto"` uses `adapter_lr(d_mlp)` for Ω_A and `adapter_lr(d_model)` for Ω_B; a
    float is an absolute lr for both. `adapters_per_batch` caps how many adapters share
    a forward pass (memory; only for `orthogonal="none"`). `normalization` fixes the
    edit's size: "columns" (unit columns of Ω_A and Ω_B, the write-up's), "frobenius" or
    "spectral" (||ΔW|| = R in that norm; Ω_A keeps unit columns and Ω_B lives on the
    unit Frobenius sphere, so the rank-1 parts can differ in weight).
    `position_quantile=q` makes the adapters sparse in position: each component acts
    only where its read-out |h·Ω_A[:, j]| exceeds its q-quantile over the training
    prompts' tokens (recomputed every step, stored as `SteeringAdapters.thresholds`), so
    it writes at about a (1 - q) share of the tokens, the ones it reads most strongly.

    Args:
        source_layer: the block whose MLP output weights the adapters edit.
        target: where the change is read (after `blocks.{source_layer}.hook_mlp_out`).
        n_adapters: how many adapters.
        rank: the rank r of each edit ΔW = R·Ω_A Ω_Bᵀ.
        radius: R, the edit's scale.
        power: p, the per-position change ||Δ||^p.
        q: the per-prompt sum to the power 1/q.
        steps: training steps per adapter.
        lr: the learning rate ("auto": scaled to d_mlp and d_model).
        orthogonal: "sequential", "simultaneous", "soft" or "none" (on the Ω_B columns;
            default "none").
        solver: "amsgrad" or "power".
        betas: the Adam betas.
        soft_weight: the weight of the soft orthogonality penalty.
        soft_on: what the soft penalty compares: "vectors" or their "deltas".
        adapters_per_batch: cap on the adapters sharing a forward pass.
        amsgrad: keep the max of second moments (None: as for vectors).
        seed: adapter k starts from the generator (seed, k).
        objective: as `MelboConfig.objective`.
        consistency_weight: the consistency term's weight in "melbo+consistency".
        normalization: "columns", "frobenius" or "spectral" (see above).
        position_quantile: act only above this quantile of each read-out (None: off).

    Raises:
        ValueError: any invalid field, all named in one message.

    Examples:
        >>> cfg = AdapterConfig(7, HookSite(22, "resid_pre"), n_adapters=4, rank=2)
        >>> AdapterConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> cfg.source.name
        'blocks.7.hook_mlp_out'
    """

    source_layer: int
    target: HookSite
    n_adapters: int = 8
    rank: int = 1
    radius: float = 4.0
    power: float = 2.0
    q: float = 1.0
    steps: int | Literal["auto"] = 300
    lr: float | Literal["auto"] = "auto"
    orthogonal: AdapterOrthogonal = "none"
    solver: Literal["amsgrad", "power"] = "amsgrad"
    betas: tuple[float, float] = (0.9, 0.98)
    soft_weight: float = 1.0
    soft_on: Literal["vectors", "deltas"] = "vectors"
    adapters_per_batch: int | None = None
    amsgrad: bool | None = None
    seed: int = 0
    objective: ObjectiveName = "melbo"
    consistency_weight: float = 1.0
    normalization: Literal["columns", "frobenius", "spectral"] = "columns"
    position_quantile: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", as_site(self.target))
        object.__setattr__(self, "betas", tuple(self.betas))
        problems = []

        layer_ok = is_int(self.source_layer, 0)
        if not layer_ok:
            problems.append(f"source_layer must be an int >= 0, got {self.source_layer!r}")
        if not is_int(self.n_adapters, 1):
            problems.append(f"n_adapters must be an int >= 1, got {self.n_adapters!r}")
        if not is_int(self.rank, 1):
            problems.append(f"rank must be an int >= 1, got {self.rank!r}")
        problems += self.loop_problems()
        if self.normalization not in NORMALIZATIONS:
            problems.append(
                f"normalization must be one of {list(NORMALIZATIONS)}, got {self.normalization!r}"
            )
        q = self.position_quantile
        if q is not None and not (is_positive(q) and q < 1):
            problems.append(
                f"position_quantile must be None or a number in (0, 1) (the share of tokens "
                f"where an adapter does not act), got {q!r}"
            )
        if self.adapters_per_batch is not None:
            if not is_int(self.adapters_per_batch, 1):
                problems.append(
                    f"adapters_per_batch must be an int >= 1, got {self.adapters_per_batch!r}"
                )
            elif self.orthogonal != "none":
                problems.append(
                    "adapters_per_batch applies to orthogonal='none' only; sequential "
                    "adapters already train one at a time and simultaneous / soft ones "
                    "are coupled"
                )
        if layer_ok:
            try:
                check_order(self.source, self.target)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("invalid AdapterConfig: " + "; ".join(problems))

    lr_bound = "the columns' unit norm"

    def lr_max(self) -> float:
        """Ω_A and Ω_B have unit-norm columns: an absolute lr above 1 jumps across them."""
        return 1.0

    @property
    def source(self) -> HookSite:
        """Where the adapters write: `blocks.{source_layer}.hook_mlp_out`."""
        return HookSite(self.source_layer, "mlp_out")

    def resolved_lrs(self, d_mlp: int, d_model: int) -> tuple[float, float]:
        """(lr for Ω_A, lr for Ω_B)."""
        if self.lr == "auto":
            return adapter_lr(d_mlp), adapter_lr(d_model)
        return float(self.lr), float(self.lr)


@dataclass
class AdapterTrainingState:
    """What a per-step callback sees. Return False from the callback to stop early.

    Attributes:
        step: The step within the current phase.
        indices: The adapters being trained.
        objective: Their objectives at this step.
        omega_a: [k, d_mlp, r] their input factors.
        omega_b: [k, d_model, r] their output factors.
    """

    step: int
    indices: list[int]  # which adapters are training now
    objective: Float[Tensor, " k"]  # objective of each before this step's update
    omega_a: Float[Tensor, "k d_mlp r"]
    omega_b: Float[Tensor, "k d_model r"]


AdapterCallback = Callable[[AdapterTrainingState], bool | None]


# ---------------------------------------------------------------------- column constraints
def _unit_columns(omega: Float[Tensor, "k d r"]) -> Float[Tensor, "k d r"]:
    return torch.nn.functional.normalize(omega, dim=-2)


def _tangent_columns(
    grad: Float[Tensor, "k d r"], omega: Float[Tensor, "k d r"]
) -> Float[Tensor, "k d r"]:
    """Each gradient column projected onto the tangent space of its column's sphere."""
    return tangent_project(grad.transpose(-1, -2), omega.transpose(-1, -2)).transpose(-1, -2)


def init_adapters(
    indices: list[int], d_mlp: int, d_model: int, rank: int, seed: int, device, dtype
) -> tuple[Tensor, Tensor]:
    """Gaussian factors, one generator per adapter index so runs compose exactly."""
    a_rows, b_rows = [], []
    for k in indices:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        a_rows.append(torch.randn(d_mlp, rank, generator=gen, dtype=torch.float64))
        b_rows.append(torch.randn(d_model, rank, generator=gen, dtype=torch.float64))
    to = dict(device=device, dtype=dtype)
    return torch.stack(a_rows).to(**to), torch.stack(b_rows).to(**to)


class AdapterFamily(FamilyBase):
    """Steering adapters for the trainer: unit columns of Ω_A and Ω_B; orthogonality acts
    on the Ω_B columns (what the adapter writes into the residual stream)."""

    noun = "adapter"

    config: AdapterConfig

    def __init__(self, config: AdapterConfig, model: Host, prompts: PromptSet) -> None:
        super().__init__(config, model, prompts)
        self.d_mlp, self.d_model = int(model.cfg.d_mlp), d_model_of(model)
        self.n, self.per_batch = config.n_adapters, config.adapters_per_batch
        self.hidden: Tensor | None = None  # [tokens, d_mlp]: what the adapters read
        if config.position_quantile is not None:
            with torch.no_grad():
                h = run_to_site(
                    model,
                    prompts.tokens,
                    prompts.attention_mask,
                    mlp_hidden_name(config.source_layer),
                )
            self.hidden = h[prompts.attention_mask.bool().to(h.device)].float()

    def thresholds(self, omega_a: Tensor) -> Tensor | None:
        """[k, r] read-out thresholds of the members (sparse positions), or None."""
        if self.hidden is None:
            return None
        q = float(self.config.position_quantile)  # type: ignore[arg-type]
        with torch.no_grad():
            reads = (self.hidden.to(omega_a.device) @ omega_a.detach().float()).abs()  # [k,N,r]
            return torch.quantile(reads, q, dim=1)

    def init(self, indices: list[int], device: torch.device) -> dict[str, Tensor]:
        a, b = init_adapters(
            indices,
            self.d_mlp,
            self.d_model,
            self.config.rank,
            self.config.seed,
            device,
            torch.float32,
        )
        return {"omega_a": a, "omega_b": b}

    def retract(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        a, b = params["omega_a"], params["omega_b"]
        if self.config.normalization == "columns":
            return {"omega_a": _unit_columns(a), "omega_b": _unit_columns(b)}
        return {"omega_a": _unit_columns(a), "omega_b": to_sphere(b.flatten(1), 1.0).view_as(b)}

    def tangent(self, grads: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, Tensor]:
        a, b = params["omega_a"], params["omega_b"]
        tangent_a = _tangent_columns(grads["omega_a"], a)
        if self.config.normalization == "columns":
            return {"omega_a": tangent_a, "omega_b": _tangent_columns(grads["omega_b"], b)}
        flat = tangent_project(grads["omega_b"].flatten(1), b.flatten(1))
        return {"omega_a": tangent_a, "omega_b": flat.view_as(b)}

    def directions(self, params: dict[str, Tensor]) -> Tensor:
        return params["omega_b"].transpose(-1, -2)  # [k, r, d_model]

    def with_directions(self, params: dict[str, Tensor], directions: Tensor) -> dict[str, Tensor]:
        return {**params, "omega_b": directions.transpose(-1, -2)}

    def target(self, segment: Segment, params: dict[str, Tensor]) -> Tensor:
        a, b = normalized_factors(params["omega_a"], params["omega_b"], self.config.normalization)
        tau = self.thresholds(a)
        hooks = adapter_hooks(self.config.source_layer, a, b, self.config.radius, tau)
        return segment.run_hooked(a.shape[0], hooks)

    def lrs(self) -> dict[str, float]:
        lr_a, lr_b = self.config.resolved_lrs(self.d_mlp, self.d_model)
        return {"omega_a": lr_a, "omega_b": lr_b}

    def empty(self, device: torch.device) -> dict[str, Tensor]:
        n, r = self.n, self.config.rank
        return {
            "omega_a": torch.zeros(n, self.d_mlp, r, dtype=torch.float32, device=device),
            "omega_b": torch.zeros(n, self.d_model, r, dtype=torch.float32, device=device),
        }

    def load(self, path: str) -> SteeringAdapters:
        return SteeringAdapters.load(path)

    def params_of(self, artifact: SteeringAdapters) -> dict[str, Tensor]:
        return {"omega_a": artifact.omega_a, "omega_b": artifact.omega_b}

    def artifact(
        self, params: dict[str, Tensor], record: dict[str, Any], metadata: dict[str, Any]
    ) -> SteeringAdapters:
        return SteeringAdapters(
            params["omega_a"],
            params["omega_b"],
            layer=self.config.source_layer,
            radius=self.config.radius,
            method="melbo_adapters",
            normalization=self.config.normalization,
            thresholds=self.thresholds(params["omega_a"]),
            **self.provenance(record, metadata),
        )

    def state(
        self, step: int, indices: list[int], objective: Tensor, params: dict[str, Tensor]
    ) -> AdapterTrainingState:
        return AdapterTrainingState(step, indices, objective, params["omega_a"], params["omega_b"])

    def metadata(self) -> dict[str, Any]:
        lr_a, lr_b = self.config.resolved_lrs(self.d_mlp, self.d_model)
        auto = self.config.lr == "auto"
        return {
            "lr_used": {"omega_a": lr_a, "omega_b": lr_b},
            "lr_rule": "0.011/sqrt(column dim): d_mlp for omega_a, d_model for omega_b"
            if auto
            else "absolute",
        }


# ---------------------------------------------------------------------- training
def train_steering_adapters(
    model: Host,
    prompts: PromptSet,
    config: AdapterConfig,
    *,
    progress: bool = True,
    callback: AdapterCallback | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 50,
    resume: SteeringAdapters | str | None = None,
    compile: bool = False,
    overwrite: bool = False,
    max_rows_per_pass: int | str | None = None,
) -> SteeringAdapters:
    """Train MELBO steering adapters; returns a `SteeringAdapters` artifact.

    The same loop as `train_steering_vectors` (`melbo_lens.methods.trainer`): Ctrl-C
    (KeyboardInterrupt), or a callback returning False, stops training and returns what
    exists so far, with `steps_done` telling how far each adapter got; with
    `checkpoint=path` that state is also saved, and `train_steering_adapters(...,
    resume=path)` continues the run exactly. NaN/inf stops training with a
    `TrainingError` naming the step and the adapter. Orthogonality modes and solvers are
    those of vectors, acting on the Ω_B columns. Prompts built without target positions
    leave out the outlier-norm positions at the target, as for vectors
    (`methods.defaults`).

    Args:
        model: the HookedTransformer (or host) whose MLP the adapters edit (by hooks;
            its weights are not changed).
        prompts: the prompts and their target positions (`PromptSet`).
        config: what to train (`AdapterConfig`): the block, target, number, rank,
            radius, normalisation, solver and orthogonality.
        progress: show a progress bar on stderr.
        callback: called after every step; returning False stops the run.
        checkpoint: a path where the partial artifact is saved every
            `checkpoint_every` steps, atomically.
        checkpoint_every: steps between checkpoints.
        resume: a saved artifact (or its path) of the same settings to continue exactly.
        compile: run the segment's blocks through torch.compile.
        overwrite: allow `checkpoint` to replace a finished run at that path.
        max_rows_per_pass: split each step's rows into passes of at most this many
            rows ("auto": sized to the free memory).

    Returns:
        The trained `SteeringAdapters`.

    Raises:
        ValueError: prompts or sites that do not fit the model.
        TrainingError: a NaN/inf or zero objective at some step.

    Examples:
        >>> cfg = AdapterConfig(1, HookSite(3), n_adapters=2, steps=5)
        >>> adapters = train_steering_adapters(model, prompts, cfg)
        >>> len(adapters), adapters.complete
        (2, True)
    """
    check_prompts_and_sites(model, prompts, config.source, config.target)
    check_adapter_host(model, config.source_layer)
    d_model = d_model_of(model)
    hard = config.orthogonal in ("sequential", "simultaneous")
    if hard and config.n_adapters * config.rank > d_model:
        raise ValueError(
            f"{config.orthogonal} orthogonality needs n_adapters × rank <= d_model, got "
            f"{config.n_adapters} × {config.rank} > {d_model}"
        )
    prompts, positions = default_positions(model, prompts, config.target)
    family = AdapterFamily(config, model, prompts)
    family.auto = {} if positions is None else {"positions": positions}
    return train(
        model,
        prompts,
        family,
        resume=resume,
        progress=progress,
        callback=callback,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        compile=compile,
        overwrite=overwrite,
        max_rows_per_pass=max_rows_per_pass,
    )
