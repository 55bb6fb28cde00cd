"""A *family* is what differs between trainable perturbations; the loop does the rest.

A family says how to initialise a member, retract it onto its constraint set (the
sphere of radius R, unit columns), project a gradient onto that set's tangent space,
which *directions* hard orthogonality keeps apart (a vector itself; an adapter's Ω_B
columns), how to run the segment with the parameters applied, and how to build, load
and describe its artifact. SAELens's architectures differ the same way: in their
forward pass, not in their training loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.core.sites import HookSite, check_sites

__all__ = [
    "Callback",
    "Family",
    "FamilyBase",
    "Params",
    "check_prompt_set",
    "check_prompts_and_sites",
]

Params = dict[str, Tensor]
Callback = Callable[[Any], "bool | None"]


class TrainedArtifact(Protocol):
    """What the loop does with an artifact: record metadata and save it."""

    metadata: dict[str, Any]

    def save(self, path: str | os.PathLike[str]) -> Any: ...


A = TypeVar("A", bound=TrainedArtifact)  # the artifact a family builds (SteeringVectors, ...)


class Family(Protocol[A]):
    """What differs between trainable perturbations. Tensors have the member axis first.
    `Family[A]` builds artifacts of type A, which is what `train` returns for it."""

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

    def load(self, path: str) -> A:
        """An artifact of this family from a file (to resume from)."""
        ...

    def params_of(self, artifact: A) -> Params:
        """The parameters stored in an artifact of this family."""
        ...

    def artifact(self, params: Params, record: dict[str, Any], metadata: dict[str, Any]) -> A:
        """The artifact for `params` of all members with the training record."""
        ...

    def state(self, step: int, indices: list[int], objective: Tensor, params: Params) -> Any:
        """What a per-step callback sees."""
        ...

    def metadata(self) -> dict[str, Any]:
        """What the artifact records about the run's settings (lr used and its rule)."""
        ...


class FamilyBase:
    """What every family shares: its config, the prompts and model name it records, and
    the provenance fields of the artifact it builds."""

    def __init__(self, config: Any, model: Host, prompts: PromptSet) -> None:
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
    model: Host, prompts: PromptSet, source: HookSite, target: HookSite
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
