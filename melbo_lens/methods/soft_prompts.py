"""Soft prompts as a trainer family: m input embeddings, each on a sphere, trained by the
same loop and objectives as vectors and adapters.

Member k is m embeddings e_k1..e_km (`perturbations.soft_prompts`), each kept at norm R
(`radius="auto"`: the median norm of the model's token embeddings, so a soft token is
as large as a real one). The prompts carry m placeholder tokens at the start of the user
turn (`soft_prompt_set`); in training the segment starts at the input of block 0 and the
family adds e_kj − e_pl at the j-th placeholder of each row, which is exactly replacing
that token's embedding (the artifact's hook does the replacement at `hook_embed`; a test
checks that the two agree). The objective is any of the loop's (`objective=`):
`"logprob"` with continuations asks how little input it takes to make an answer likely
(the fine-tuning shortform's "fragility": the number of soft tokens needed), `"melbo"`
what m free tokens can change downstream. With `objective="melbo"` the target positions
are the real tokens after the placeholders (the positions a soft token can change).

Hard orthogonality keeps members' embeddings apart (every token row of member k
orthogonal to those of members 0..k-1), as for an adapter's Ω_B columns.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.host import Host, d_model_of, n_layers_of
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.core.sites import HookSite, as_site, check_order
from melbo_lens.methods.config import LoopConfig, is_int, register_config
from melbo_lens.methods.constraints import tangent_project, to_sphere
from melbo_lens.methods.defaults import default_sites
from melbo_lens.methods.melbo import init_vectors, scaled_lr
from melbo_lens.methods.training import FamilyBase, check_prompt_set, check_prompts_and_sites, train
from melbo_lens.methods.training.objective import ObjectiveName, reads_logits
from melbo_lens.perturbations.soft_prompts import (
    SoftPrompts,
    default_placeholder,
    placeholder_embedding,
)

__all__ = ["SoftPromptConfig", "SoftPromptState", "soft_prompt_set", "train_soft_prompts"]


@register_config("soft_prompt")
@dataclass(frozen=True)
class SoftPromptConfig(LoopConfig):
    """Everything that defines a soft-prompt run (frozen, validated, JSON-able).

    `radius` is each soft token's norm ("auto": the median norm of the model's token
    embeddings); `target=None` is the last block's output for a log-probability
    objective and the default target site otherwise. `placeholder=None` takes
    `default_placeholder(model)`. The solver defaults to the power step (it reaches a
    planted answer's log-probability in a few steps where AMSGrad's scale-aware lr needs
    hundreds; `scripts/backdoor_smollm2.py --reach`).

    Examples:
        >>> cfg = SoftPromptConfig(n_prompts=2, n_tokens=3, objective="logprob")
        >>> SoftPromptConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    target: HookSite | None = None
    n_prompts: int = 4
    n_tokens: int = 1
    radius: float | Literal["auto"] = "auto"
    power: float = 2.0
    q: float = 1.0
    steps: int | Literal["auto"] = 40
    lr: float | Literal["auto"] = "auto"
    orthogonal: Literal["sequential", "simultaneous", "soft", "none"] = "none"
    solver: Literal["auto", "amsgrad", "power"] = "power"
    betas: tuple[float, float] = (0.9, 0.98)
    soft_weight: float = 1.0
    soft_on: Literal["vectors", "deltas"] = "vectors"
    amsgrad: bool | None = None
    seed: int = 0
    objective: ObjectiveName = "melbo"
    consistency_weight: float = 1.0
    placeholder: int | None = None

    auto_radius = True

    def __post_init__(self) -> None:
        if self.target is not None:
            object.__setattr__(self, "target", as_site(self.target))
        object.__setattr__(self, "betas", tuple(self.betas))
        problems = []
        if not is_int(self.n_prompts, 1):
            problems.append(f"n_prompts must be an int >= 1, got {self.n_prompts!r}")
        if not is_int(self.n_tokens, 1):
            problems.append(f"n_tokens must be an int >= 1, got {self.n_tokens!r}")
        if self.placeholder is not None and not is_int(self.placeholder, 0):
            problems.append(
                f"placeholder must be None or a token id >= 0, got {self.placeholder!r}"
            )
        problems += self.loop_problems()
        if self.target is not None:
            try:
                check_order(self.source, self.target)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("invalid SoftPromptConfig: " + "; ".join(problems))

    @property
    def source(self) -> HookSite:
        """Where soft tokens enter: the input of block 0."""
        return HookSite(0, "resid_pre")

    def radius_value(self) -> float:
        if self.radius == "auto":
            raise ValueError("radius='auto' is chosen by train_soft_prompts before training")
        return float(self.radius)


@dataclass
class SoftPromptState:
    """What a per-step callback sees. Return False from the callback to stop early."""

    step: int
    indices: list[int]
    objective: Float[Tensor, " k"]
    embeddings: Float[Tensor, "k m d_model"]


def soft_prompt_set(
    model: Host,
    prompts: str | Sequence[Any],
    n_tokens: int,
    *,
    continuations: str | Sequence[str] | None = None,
    chat: bool = True,
    placeholder: int | None = None,
) -> PromptSet:
    """Prompts for soft-prompt training: `n_tokens` placeholders at the start of each user
    turn, followed by `continuations` when given (then the target positions are those
    that predict them, for `objective="logprob"`), else targets after the placeholders.

    Examples:
        >>> ps = soft_prompt_set(model, ["hi", "ok"], 2, chat=False)
        >>> ps.token_lists()[0], ps.target_lists()[0]
        ([0, 0, 15, 16], [2, 3])
    """
    pid = default_placeholder(model) if placeholder is None else placeholder
    shell = SoftPrompts(torch.zeros(1, n_tokens, d_model_of(model)), placeholder=pid)
    marked = shell.prepare(model, prompts, chat=chat)
    if continuations is not None:
        return PromptSet.with_continuations(model, marked, continuations, chat=chat)
    rows = marked.token_lists()
    after = [list(range(_last_placeholder(row, pid) + 1, len(row))) for row in rows]
    if any(not positions for positions in after):
        raise ValueError("every prompt needs a token after its placeholders to measure a change")
    return PromptSet.from_tokens(model, rows, target_positions=after, labels=marked.labels)


def _last_placeholder(row: list[int], pid: int) -> int:
    return max(i for i, t in enumerate(row) if t == pid)


class SoftPromptFamily(FamilyBase):
    """Soft prompts for the trainer: every token row on the sphere of radius R."""

    noun = "soft prompt"

    config: SoftPromptConfig

    def __init__(self, config: SoftPromptConfig, model: Host, prompts: PromptSet) -> None:
        super().__init__(config, model, prompts)
        self.d_model = d_model_of(model)
        self.radius = config.radius_value()
        self.placeholder = int(config.placeholder)  # type: ignore[arg-type]  (resolved)
        self.reference = placeholder_embedding(model, self.placeholder).float()
        self.lr = scaled_lr(self.radius, self.d_model) if config.lr == "auto" else float(config.lr)
        self.n = config.n_prompts
        self.per_batch: int | None = None

    def init(self, indices: list[int], device: torch.device) -> dict[str, Tensor]:
        m, d = self.config.n_tokens, self.d_model
        flat = init_vectors(
            [k * m + j for k in indices for j in range(m)],
            d,
            self.config.seed,
            device,
            torch.float32,
        )
        return {"embeddings": flat.view(len(indices), m, d)}

    def retract(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"embeddings": to_sphere(params["embeddings"], self.radius)}

    def tangent(self, grads: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"embeddings": tangent_project(grads["embeddings"], params["embeddings"])}

    def directions(self, params: dict[str, Tensor]) -> Tensor:
        return params["embeddings"]

    def with_directions(self, params: dict[str, Tensor], directions: Tensor) -> dict[str, Tensor]:
        return {"embeddings": directions}

    def target(self, segment: Segment, params: dict[str, Tensor]) -> Tensor:
        emb = params["embeddings"]  # [k, m, d]
        k, m, d = emb.shape
        tokens = segment.prompts.tokens.to(emb.device)
        found = tokens == self.placeholder  # [n, pos]
        slot = (found.cumsum(-1) - 1).clamp(0, m - 1)
        diff = emb - self.reference.to(emb.device)  # [k, m, d]
        per_pos = diff[:, slot]  # [k, n, pos, d]
        delta = torch.where(found[None, :, :, None], per_pos, torch.zeros_like(per_pos))
        rows = delta.reshape(k * tokens.shape[0], tokens.shape[1], d)

        def add(act: Tensor, hook: Any = None) -> Tensor:
            return act + rows.to(act.dtype)

        return segment.run_hooked(k, [(self.config.source.name, add)])

    def lrs(self) -> dict[str, float]:
        return {"embeddings": self.lr}

    def empty(self, device: torch.device) -> dict[str, Tensor]:
        shape = (self.n, self.config.n_tokens, self.d_model)
        return {"embeddings": torch.zeros(shape, dtype=torch.float32, device=device)}

    def load(self, path: str) -> SoftPrompts:
        return SoftPrompts.load(path)

    def params_of(self, artifact: SoftPrompts) -> dict[str, Tensor]:
        return {"embeddings": artifact.embeddings}

    def artifact(
        self, params: dict[str, Tensor], record: dict[str, Any], metadata: dict[str, Any]
    ) -> SoftPrompts:
        return SoftPrompts(
            params["embeddings"],
            placeholder=self.placeholder,
            method="soft_prompt",
            **self.provenance(record, metadata),
        )

    def state(
        self, step: int, indices: list[int], objective: Tensor, params: dict[str, Tensor]
    ) -> SoftPromptState:
        return SoftPromptState(step, indices, objective, params["embeddings"])

    def metadata(self) -> dict[str, Any]:
        rule = "0.011*R/sqrt(d_model)" if self.config.lr == "auto" else "absolute"
        return {"lr_used": self.lr, "lr_rule": rule}


def _resolved(model: Host, config: SoftPromptConfig) -> SoftPromptConfig:
    """The config with its target, radius and placeholder filled in."""
    changes: dict[str, Any] = {}
    if config.target is None:
        last = HookSite(n_layers_of(model) - 1, "resid_post")
        changes["target"] = (
            last if reads_logits(config.objective) else default_sites(n_layers_of(model))[1]
        )
    if config.radius == "auto":
        w_e: Any = getattr(model, "W_E", None)
        if w_e is None:
            raise ValueError("radius='auto' reads the model's token embeddings W_E; give a radius")
        changes["radius"] = round(float(w_e.detach().float().norm(dim=-1).median()), 4)
    if config.placeholder is None:
        changes["placeholder"] = default_placeholder(model)
    return replace(config, **changes) if changes else config


def train_soft_prompts(
    model: Host,
    prompts: PromptSet,
    config: SoftPromptConfig,
    *,
    progress: bool = True,
    callback: Callable[[SoftPromptState], bool | None] | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 50,
    resume: SoftPrompts | str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    max_rows_per_pass: int | str | None = None,
) -> SoftPrompts:
    """Train soft prompts; returns a `SoftPrompts` artifact (the loop of
    `train_steering_vectors`: checkpoints, exact resume, Ctrl-C, NaN checks).

    `prompts` hold `config.n_tokens` placeholders per row (`soft_prompt_set`).

    Examples:
        >>> ps = soft_prompt_set(model, ["hello", "a cat"], 1, continuations="ok", chat=False)
        >>> cfg = SoftPromptConfig(n_prompts=2, objective="logprob", steps=5)
        >>> sp = train_soft_prompts(model, ps, cfg, progress=False)
        >>> len(sp), sp.n_tokens, bool((sp.objective >= sp.losses[:, 0]).all())
        (2, 1, True)
    """
    check_prompt_set(prompts)
    config = _resolved(model, config)
    assert config.target is not None
    check_prompts_and_sites(model, prompts, config.source, config.target)
    pid = int(config.placeholder)  # type: ignore[arg-type]
    counts = {sum(t == pid for t in row) for row in prompts.token_lists()}
    if counts != {config.n_tokens}:
        raise ValueError(
            f"n_tokens={config.n_tokens} soft tokens need that many placeholder tokens (id "
            f"{pid}) in every prompt, found {sorted(counts)}; build the prompts with "
            "soft_prompt_set(model, texts, n_tokens)"
        )
    hard = config.orthogonal in ("sequential", "simultaneous")
    if hard and config.n_prompts * config.n_tokens > d_model_of(model):
        raise ValueError(
            f"{config.orthogonal} orthogonality needs n_prompts × n_tokens <= d_model, got "
            f"{config.n_prompts} × {config.n_tokens} > {d_model_of(model)}"
        )
    family = SoftPromptFamily(config, model, prompts)
    prior = SoftPrompts.load(str(resume)) if isinstance(resume, str | os.PathLike) else resume
    return train(
        model,
        prompts,
        family,
        resume=prior,
        progress=progress,
        callback=callback,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        overwrite=overwrite,
        max_rows_per_pass=max_rows_per_pass,
    )
