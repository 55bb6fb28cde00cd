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

The adapter is applied by hooks (`melbo_lens.adapting`), never by editing weights. A
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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..adapting import adapter_hooks, check_adapter_host
from ..artifacts import SteeringAdapters
from ..prompts import PromptSet
from ..segment import Segment, check_sites, d_model_of
from ..sites import HookSite, as_site, check_order
from .config import config_from_dict, config_to_dict
from .constraints import project_out, tangent_project
from .melbo import LR_SCALE, check_finite, frozen
from .objectives import melbo_objective_per_prompt

__all__ = [
    "AdapterConfig",
    "AdapterTrainingState",
    "adapter_lr",
    "train_steering_adapters",
]

AdapterOrthogonal = Literal["none", "sequential"]


def adapter_lr(dim: int) -> float:
    """Scale-aware lr for a unit-norm column of dimension `dim`: 0.011/√dim.

    Examples:
        >>> round(adapter_lr(576), 6)        # SmolLM2-135M's d_model
        0.000458
    """
    return LR_SCALE / math.sqrt(dim)


@dataclass(frozen=True)
class AdapterConfig:
    """Everything that defines a steering-adapter run (frozen, validated, JSON-able).

    The adapters edit block `source_layer`'s MLP output weights; the objective is
    measured at `target`, which must come after `blocks.{source_layer}.hook_mlp_out`.
    `lr="auto"` uses `adapter_lr(d_mlp)` for Ω_A and `adapter_lr(d_model)` for Ω_B; a
    float is an absolute lr for both. `adapters_per_batch` caps how many adapters share
    a forward pass (memory; only for `orthogonal="none"`).

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
    steps: int = 300
    lr: float | Literal["auto"] = "auto"
    orthogonal: AdapterOrthogonal = "none"
    betas: tuple[float, float] = (0.9, 0.98)
    adapters_per_batch: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", as_site(self.target))
        object.__setattr__(self, "betas", tuple(self.betas))
        problems = []

        def is_int(value: Any, low: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        layer_ok = is_int(self.source_layer, 0)
        if not layer_ok:
            problems.append(f"source_layer must be an int >= 0, got {self.source_layer!r}")
        if not is_int(self.n_adapters, 1):
            problems.append(f"n_adapters must be an int >= 1, got {self.n_adapters!r}")
        if not is_int(self.rank, 1):
            problems.append(f"rank must be an int >= 1, got {self.rank!r}")
        if not (isinstance(self.radius, int | float) and 0 < self.radius < math.inf):
            problems.append(f"radius must be a finite number > 0, got {self.radius!r}")
        if not (self.power > 0 and self.q > 0):
            problems.append(f"power and q must be > 0, got power={self.power} q={self.q}")
        if not is_int(self.steps, 0):
            problems.append(f"steps must be an int >= 0, got {self.steps!r}")
        if self.lr != "auto" and not (
            isinstance(self.lr, int | float) and not isinstance(self.lr, bool) and self.lr > 0
        ):
            problems.append(f"lr must be 'auto' or a number > 0, got {self.lr!r}")
        if self.orthogonal not in ("none", "sequential"):
            problems.append(
                f"orthogonal must be 'none' or 'sequential' for adapters, got {self.orthogonal!r}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.adapters_per_batch is not None:
            if not is_int(self.adapters_per_batch, 1):
                problems.append(
                    f"adapters_per_batch must be an int >= 1, got {self.adapters_per_batch!r}"
                )
            elif self.orthogonal == "sequential":
                problems.append(
                    "adapters_per_batch applies to orthogonal='none' only; sequential "
                    "adapters already train one at a time"
                )
        if layer_ok:
            try:
                check_order(self.source, self.target)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("invalid AdapterConfig: " + "; ".join(problems))

    @property
    def source(self) -> HookSite:
        """Where the adapters write: `blocks.{source_layer}.hook_mlp_out`."""
        return HookSite(self.source_layer, "mlp_out")

    def resolved_lrs(self, d_mlp: int, d_model: int) -> tuple[float, float]:
        """(lr for Ω_A, lr for Ω_B)."""
        if self.lr == "auto":
            return adapter_lr(d_mlp), adapter_lr(d_model)
        return float(self.lr), float(self.lr)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        return config_from_dict(cls, data)


@dataclass
class AdapterTrainingState:
    """What a per-step callback sees. Return False from the callback to stop early."""

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


def _project_out_columns(omega: Tensor, basis: Tensor | None) -> Tensor:
    """Remove from every column its components along the orthonormal rows of `basis`."""
    if basis is None:
        return omega
    return project_out(omega.transpose(-1, -2), basis).transpose(-1, -2)


def _column_basis(omega_b: Float[Tensor, "m d_model r"]) -> Tensor | None:
    """Orthonormal rows spanning all columns of the given Ω_B (rank-revealing)."""
    cols = omega_b.transpose(-1, -2).reshape(-1, omega_b.shape[1]).double()  # [m·r, d]
    if cols.shape[0] == 0:
        return None
    _, s, vh = torch.linalg.svd(cols, full_matrices=False)
    keep = s > 1e-6 * s.max()
    return vh[keep].to(omega_b.dtype)


def _init_adapters(
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


class _AdapterGroup:
    """The optimisation state of adapters that train together (AMSGrad on the spheres)."""

    def __init__(
        self,
        omega_a: Tensor,
        omega_b: Tensor,
        cfg: AdapterConfig,
        lrs: tuple[float, float],
        basis: Tensor | None,
    ):
        self.basis = basis  # orthonormal rows every Ω_B column must stay orthogonal to
        self.omega_a = torch.nn.Parameter(_unit_columns(omega_a))
        self.omega_b = torch.nn.Parameter(self._constrain_b(omega_b))
        self.opt = torch.optim.AdamW(
            [{"params": [self.omega_a], "lr": lrs[0]}, {"params": [self.omega_b], "lr": lrs[1]}],
            betas=cfg.betas,
            weight_decay=0.0,
            amsgrad=True,
        )

    def _constrain_b(self, omega_b: Tensor) -> Tensor:
        return _unit_columns(_project_out_columns(omega_b, self.basis))

    @torch.no_grad()
    def update(self) -> None:
        a, b = self.omega_a, self.omega_b
        a.grad = _tangent_columns(a.grad, a)
        b.grad = _project_out_columns(_tangent_columns(b.grad, b), self.basis)
        self.opt.step()
        a.copy_(_unit_columns(a))
        b.copy_(self._constrain_b(b))

    def state_tensors(self) -> dict[str, Tensor]:
        out = {"omega_a": self.omega_a.detach().clone(), "omega_b": self.omega_b.detach().clone()}
        for name, param in (("a", self.omega_a), ("b", self.omega_b)):
            state = self.opt.state.get(param, {})
            for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    out[f"opt.{name}.{key}"] = torch.as_tensor(state[key]).detach().clone()
        return out

    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.omega_a.copy_(state["omega_a"])
            self.omega_b.copy_(state["omega_b"])
        for name, param in (("a", self.omega_a), ("b", self.omega_b)):
            prefix = f"opt.{name}."
            opt_state = {
                k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)
            }
            if opt_state:
                if "step" in opt_state:
                    opt_state["step"] = opt_state["step"].float()
                self.opt.state[param] = opt_state


def _objectives(
    segment: Segment, omega_a: Tensor, omega_b: Tensor, cfg: AdapterConfig
) -> Float[Tensor, " k"]:
    """MELBO objective of each of K adapters (one forward for K × n rows)."""
    k = omega_a.shape[0]
    hooks = adapter_hooks(cfg.source_layer, omega_a, omega_b, cfg.radius)
    z = segment.run_hooked(k, hooks)
    mask = segment.prompts.target_mask
    per_prompt = melbo_objective_per_prompt(
        z, segment.unsteered.expand_as(z), mask.expand(z.shape[:-1]), power=cfg.power, q=cfg.q
    )
    return per_prompt.sum(-1)


def _groups(cfg: AdapterConfig) -> list[list[int]]:
    if cfg.orthogonal == "sequential":
        return [[k] for k in range(cfg.n_adapters)]
    size = cfg.adapters_per_batch or cfg.n_adapters
    return [list(range(i, min(i + size, cfg.n_adapters))) for i in range(0, cfg.n_adapters, size)]


# ---------------------------------------------------------------------- training
def train_steering_adapters(
    model: Any,
    prompts: PromptSet,
    config: AdapterConfig,
    *,
    progress: bool = True,
    callback: AdapterCallback | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 50,
    resume: SteeringAdapters | str | None = None,
    check_every: int = 10,
) -> SteeringAdapters:
    """Train MELBO steering adapters; returns a `SteeringAdapters` artifact.

    Ctrl-C (KeyboardInterrupt), or a callback returning False, stops training and
    returns what exists so far: finished adapters, plus the in-progress ones with
    `steps_done` telling how far they got; with `checkpoint=path` that state is also
    saved, and `train_steering_adapters(..., resume=path)` continues the run exactly.
    NaN/inf stops training with a `TrainingError` naming the step and the adapter.

    Examples:
        >>> cfg = AdapterConfig(1, HookSite(3), n_adapters=4, steps=50)  # doctest: +SKIP
        >>> prompts = PromptSet.from_texts(model, "Hi")  # doctest: +SKIP
        >>> adapters = train_steering_adapters(model, prompts, cfg)  # doctest: +SKIP
        >>> adapters.objective  # doctest: +SKIP
        >>> with adapters.apply(model, 2):  # doctest: +SKIP
        ...     logits = model("Hi")  # doctest: +SKIP
    """
    if not isinstance(prompts, PromptSet):
        raise TypeError(
            f"prompts must be a PromptSet, got {type(prompts).__name__}; "
            "build one with PromptSet.from_texts(model, texts)"
        )
    check_sites(model, config.source, config.target)
    check_adapter_host(model, config.source_layer)
    d_model = d_model_of(model)
    if config.orthogonal == "sequential" and config.n_adapters * config.rank > d_model:
        raise ValueError(
            f"sequential orthogonality needs n_adapters × rank <= d_model, got "
            f"{config.n_adapters} × {config.rank} > {d_model}"
        )
    with frozen(model):
        return _train(
            model,
            prompts,
            config,
            progress,
            callback,
            checkpoint,
            checkpoint_every,
            resume,
            check_every,
        )


def _train(
    model, prompts, config, progress, callback, checkpoint, checkpoint_every, resume, check_every
) -> SteeringAdapters:
    d_model, d_mlp = d_model_of(model), int(model.cfg.d_mlp)
    lrs = config.resolved_lrs(d_mlp, d_model)
    dtype, device = torch.float32, prompts.tokens.device
    n, r, steps = config.n_adapters, config.rank, config.steps
    omega_a = torch.zeros(n, d_mlp, r, dtype=dtype, device=device)
    omega_b = torch.zeros(n, d_model, r, dtype=dtype, device=device)
    losses = torch.full((n, steps), float("nan"), dtype=torch.float32, device=device)
    objective = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    steps_done = torch.zeros(n, dtype=torch.long)
    group_state: dict[str, Tensor] = {}
    elapsed = 0.0
    if resume is not None:
        prior = SteeringAdapters.load(resume) if isinstance(resume, str) else resume
        if prior.config != config.to_dict():
            raise ValueError(
                "cannot resume: the saved run's config differs from this one; pass "
                "AdapterConfig.from_dict(saved.config) to continue it"
            )
        omega_a.copy_(prior.omega_a)
        omega_b.copy_(prior.omega_b)
        for mine, theirs in ((losses, prior.losses), (objective, prior.objective)):
            if theirs is not None:
                mine.copy_(theirs)
        if prior.steps_done is not None:
            steps_done.copy_(prior.steps_done)
        group_state = dict(prior.resume_state)
        elapsed = float(prior.metadata.get("train_seconds", 0.0))

    segment = Segment(model, config.source, config.target, prompts)
    auto = config.lr == "auto"
    meta = {
        "lr_used": {"omega_a": lrs[0], "omega_b": lrs[1]},
        "lr_rule": "0.011/sqrt(column dim): d_mlp for omega_a, d_model for omega_b"
        if auto
        else "absolute",
        "segment_blocks": segment.n_blocks,
        "layer_slicing": segment.layer_slicing,
        "host": type(model).__name__,
    }

    def artifact(state: dict[str, Tensor], seconds: float) -> SteeringAdapters:
        return SteeringAdapters(
            omega_a=omega_a.detach().cpu().clone(),
            omega_b=omega_b.detach().cpu().clone(),
            layer=config.source_layer,
            radius=config.radius,
            target=config.target,
            method="melbo_adapters",
            config=config.to_dict(),
            model_name=getattr(model.cfg, "model_name", None),
            prompts=prompts.to_dict(),
            losses=losses.cpu().clone(),
            objective=objective.cpu().clone(),
            steps_done=steps_done.clone(),
            metadata={**meta, "train_seconds": seconds},
            resume_state={k: v.detach().cpu() for k, v in state.items()},
        )

    bar = tqdm(total=n * steps, disable=not progress, desc="adapters", unit="adapter-step")
    bar.update(int(steps_done.sum()))
    start_time = time.perf_counter()
    group: _AdapterGroup | None = None
    indices: list[int] = []
    interrupted = False
    try:
        for indices in _groups(config):
            done = ~torch.isnan(objective)  # a final objective is written when a group ends
            if bool(done[indices].all()):
                continue
            basis = None
            if config.orthogonal == "sequential" and indices[0] > 0:
                basis = _column_basis(omega_b[: indices[0]])
            init_a, init_b = _init_adapters(indices, d_mlp, d_model, r, config.seed, device, dtype)
            group = _AdapterGroup(init_a, init_b, config, lrs, basis)
            first = int(steps_done[indices[0]])
            if first > 0 and group_state:
                group.load_state_tensors({k: v.to(device) for k, v in group_state.items()})
            group_state = {}
            for step in range(first, steps):
                group.opt.zero_grad(set_to_none=True)
                obj = _objectives(segment, group.omega_a, group.omega_b, config)
                (-obj.sum()).backward()
                obj = obj.detach()
                losses[indices, step] = obj
                group.update()
                steps_done[indices] = step + 1
                omega_a[indices] = group.omega_a.detach()
                omega_b[indices] = group.omega_b.detach()
                bar.update(len(indices))
                if (step + 1) % check_every == 0 or step + 1 == steps:
                    check_finite(
                        losses, indices, step + 1, max(first, step + 1 - check_every), "adapter"
                    )
                    bar.set_postfix(objective=f"{float(obj.mean()):.4g}")
                if callback is not None:
                    state = AdapterTrainingState(
                        step, indices, obj, group.omega_a.detach(), group.omega_b.detach()
                    )
                    if callback(state) is False:
                        raise KeyboardInterrupt
                if checkpoint and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                    seconds = elapsed + time.perf_counter() - start_time
                    artifact(group.state_tensors(), seconds).save(checkpoint)
            omega_a[indices] = group.omega_a.detach()
            omega_b[indices] = group.omega_b.detach()
            with torch.no_grad():
                final = _objectives(segment, omega_a[indices], omega_b[indices], config)
            objective[indices] = final
            check_finite(objective[:, None], indices, 1, 0, "adapter")
            group = None
            if checkpoint:
                artifact({}, elapsed + time.perf_counter() - start_time).save(checkpoint)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    elapsed += time.perf_counter() - start_time
    state = group.state_tensors() if (interrupted and group is not None) else {}
    result = artifact(state, elapsed)
    result.metadata["interrupted"] = interrupted
    if checkpoint:
        result.save(checkpoint)
    return result


# ---------------------------------------------------------------------- generation
