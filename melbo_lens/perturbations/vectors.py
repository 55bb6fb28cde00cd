# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""Steering vectors: one vector per member, added to the residual stream at one site.

`steer()` is a context manager: inside it, every forward pass of the model adds
`scale * vector` to the activation at the site, at every position. A single vector
applies to every batch row; a `[rows, d_model]` matrix applies one vector per row (or per
block of rows), which is how melbo_lens runs many vectors in one batch. The hook is
removed on exit, also when the body raises.

`SteeringVectors` holds n such vectors for one source site together with where and how
they were made (see `melbo_lens.perturbations.artifact`). It is a `Perturbation`: it can
apply itself (`with vectors.apply(model, 3): ...`), give per-row hooks to any consumer,
be indexed and sliced like a list, and be saved to one safetensors file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.io import ArtifactError, read_artifact
from melbo_lens.core.sites import HookSite, as_site, require_hook
from melbo_lens.perturbations.artifact import ArtifactRows, loaded_fields, register_format
from melbo_lens.perturbations.base import Hook, Rows, apply, pick_members, row_members

__all__ = ["FORMAT", "SteeringVectors", "steer", "steering_hook"]

FORMAT = "melbo_lens.steering_vectors/1"


def steering_hook(vectors: Float[Tensor, "*rows d_model"], scale: float = 1.0):
    """A TransformerLens hook function adding `scale * vectors` (per row if 2-D)."""
    if vectors.ndim not in (1, 2):
        raise ValueError(
            f"steering vectors must be [d_model] or [rows, d_model], got {tuple(vectors.shape)}"
        )

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        if act.shape[-1] != vectors.shape[-1]:
            raise ValueError(
                f"steering vector has d_model={vectors.shape[-1]} but the activation at "
                f"{getattr(hook, 'name', 'the site')} has {act.shape[-1]}"
            )
        v = vectors.to(device=act.device, dtype=act.dtype) * scale
        if v.ndim == 2:
            if v.shape[0] != act.shape[0]:
                if act.shape[0] % v.shape[0]:
                    raise ValueError(
                        f"{v.shape[0]} per-row steering vectors for a batch of "
                        f"{act.shape[0]} rows; pass one vector per batch row (or per block "
                        "of rows), or a single [d_model] vector"
                    )
                v = v.repeat_interleave(act.shape[0] // v.shape[0], dim=0)
            v = v.view(v.shape[0], *([1] * (act.ndim - 2)), v.shape[1])
        return act + v

    return hook


@contextmanager
def steer(
    model: Host,
    site: HookSite | str | int,
    vectors: Float[Tensor, "*rows d_model"],
    *,
    scale: float = 1.0,
) -> Generator[Any, None, None]:
    """Add `scale * vectors` at `site` during forward passes inside the block.

    Args:
        model: the model to steer inside the block.
        site: where the vectors are added (a `HookSite`, hook name or layer).
        vectors: one vector [d_model], or one per batch row [batch, d_model].
        scale: multiplies the vectors.

    Yields:
        The model, with the steering hook attached (removed on exit, also on error).

    Raises:
        ValueError: vectors holding NaN or inf.

    Examples:
        >>> with steer(model, HookSite(3), torch.randn(model.cfg.d_model)):
        ...     logits = model("Hello")
    """
    site = require_hook(model, as_site(site))
    if not torch.isfinite(vectors).all():
        raise ValueError("steering vectors contain NaN or inf")
    with model.hooks(fwd_hooks=[(site.name, steering_hook(vectors, scale))]):
        yield model


@register_format(FORMAT)
@dataclass
class SteeringVectors(ArtifactRows):
    """n steering vectors at one site, with provenance.

    Args:
        vectors: [n, d_model] the vectors.
        site: Where they are added.
        target: The site the training objective read.
        method: How they were made (`"melbo"`, `"random"`, `"mean_difference"`, ...).
        config: The training settings.
        model_name: The model they were made for.
        prompts: The training prompts and target positions.
        losses: [n, steps] the training curves.
        objective: [n] the final objectives.
        steps_done: [n] steps each vector trained for.
        metadata: Free-form provenance.
        resume_state: Optimiser state for resuming an unfinished run.
        subspace: [d_model, k] a basis the vectors were kept in (None: unrestricted).

    Examples:
        >>> sv = SteeringVectors(torch.eye(3)[:2] * 4.0, HookSite(1), method="random")
        >>> len(sv), sv[1].vectors.tolist()
        (2, [[0.0, 4.0, 0.0]])
    """

    vectors: Float[Tensor, "n d_model"]
    site: HookSite
    target: HookSite | None = None
    method: str = "melbo"
    config: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    prompts: dict[str, Any] | None = None
    losses: Float[Tensor, "n steps"] | None = None
    objective: Float[Tensor, " n"] | None = None
    steps_done: Int[Tensor, " n"] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    resume_state: dict[str, Tensor] = field(default_factory=dict, repr=False)
    subspace: Float[Tensor, "d_model k"] | None = field(default=None, repr=False)

    _ITEMS = ("vectors",)
    _NOUN = "vector"

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be [n, d_model], got {tuple(self.vectors.shape)}")
        if self.subspace is not None and (
            self.subspace.ndim != 2 or self.subspace.shape[0] != self.vectors.shape[1]
        ):
            raise ValueError(
                f"subspace must be [d_model={self.vectors.shape[1]}, k], got "
                f"{tuple(self.subspace.shape)}"
            )
        self._check_rows()

    def __iter__(self) -> Iterator[Float[Tensor, " d_model"]]:
        return iter(self.vectors)

    @property
    def d_model(self) -> int:
        return self.vectors.shape[1]

    @property
    def radius(self) -> Float[Tensor, " n"]:
        return self.vectors.norm(dim=-1)

    @property
    def norms(self) -> Float[Tensor, " n"]:
        """Size of each member (the vector norm), as every artifact reports it."""
        return self.radius

    # ------------------------------------------------------------------ use
    @contextmanager
    def apply(
        self, model: Host, index: int | Sequence[int] = 0, *, scale: float = 1.0
    ) -> Generator[Any, None, None]:
        """Steer `model` with vector `index` (or one vector per batch row for a list).

        Examples:
            >>> with vectors.apply(model, 3):
            ...     logits = model("Hello")
        """
        with apply(model, self, index, scale=scale) as m:
            yield m

    def hooks(self, model: Host, rows: Rows, scale: float = 1.0) -> list[Hook]:
        """The steering hook adding member `rows[i]` to batch row i (see `base`).

        Examples:
            >>> sv = SteeringVectors(torch.eye(3)[:2], HookSite(1))
            >>> [name for name, _ in sv.hooks(model, [0, None, 1])]
            ['blocks.1.hook_resid_post']
        """
        site = require_hook(model, self.site)
        members = row_members(rows, len(self), "vector")
        vecs = self.vectors.float()
        if not torch.isfinite(vecs).all():
            raise ValueError("steering vectors contain NaN or inf")
        if isinstance(rows, int):
            return [(site.name, steering_hook(vecs[members[0]], scale))]
        return [(site.name, steering_hook(pick_members(vecs, members), scale))]

    # ------------------------------------------------------------------ files
    def _tensors(self) -> dict[str, Tensor]:
        tensors = super()._tensors()
        if self.subspace is not None:
            tensors["subspace"] = self.subspace
        return tensors

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one safetensors file (tensors) with JSON metadata; atomic."""
        return self._save(path, FORMAT, {"site": self.site.to_dict()})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringVectors:
        """Read an artifact written by `save`. Never unpickles."""
        tensors, meta = read_artifact(path, FORMAT)
        info = json.loads(meta["json"])
        if "vectors" not in tensors:
            raise ArtifactError(f"{path} has no 'vectors' tensor; the file is incomplete")
        try:
            site = HookSite.from_dict(info["site"])
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{path} has corrupt site metadata: {err!r}") from err
        fields = loaded_fields(path, info, tensors, "melbo")
        _check_consistent(path, site, tensors["vectors"], fields["method"], fields["config"])
        return cls(
            vectors=tensors["vectors"], site=site, subspace=tensors.get("subspace"), **fields
        )

    def __repr__(self) -> str:
        target = f" -> {self.target.name}" if self.target is not None else ""
        return (
            f"SteeringVectors(n={len(self)}, d_model={self.d_model}, site={self.site.name}"
            f"{target}, method={self.method!r}, model={self.model_name!r})"
        )


def _check_consistent(
    path: Any, site: HookSite, vectors: Tensor, method: str, config: dict[str, Any]
) -> None:
    """A file whose metadata contradicts itself (edited by hand, or stitched from two runs)
    is refused: the config's source must be the site the vectors are added at, and MELBO or
    random vectors, which lie on the sphere of radius R by construction, must have norm R
    (or be zero: not started yet in a checkpoint)
    (rtol 1e-2: far above float and bf16 rounding, far below any other radius)."""
    source = config.get("source")
    if isinstance(source, dict):
        try:
            configured = HookSite.from_dict(source)
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{path} has corrupt config.source: {err!r}") from err
        if configured != site:
            raise ArtifactError(
                f"{path}: its site is {site.name} but its config.source is {configured.name}; "
                "the metadata contradicts itself (was the file edited or stitched together?)"
            )
    radius = config.get("radius")
    if method in ("melbo", "random") and isinstance(radius, int | float) and vectors.numel():
        norms = vectors.float().norm(dim=-1)
        norms = norms[norms > 0]  # members a checkpoint has not started yet are zero
        if norms.numel() and not torch.allclose(
            norms, torch.full_like(norms, float(radius)), rtol=1e-2, atol=0
        ):
            raise ArtifactError(
                f"{path}: config.radius is {radius:g} but the vectors' norms are "
                f"{norms.min():.4g}..{norms.max():.4g}; the metadata contradicts the vectors "
                "(was the file edited or stitched together?)"
            )
