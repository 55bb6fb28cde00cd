# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""Layer vectors: one steering vector per layer, added to each layer's output together.

This is what other steering libraries hold: a repeng `ControlVector` or llama.cpp
control vector (`direction.{layer}`) and a steering-vectors `SteeringVector`
(`layer_activations`) add a vector to the output of several decoder blocks at once,
which TransformerLens calls `blocks.{layer}.hook_resid_post`. A `LayerVectors` has n
members, each a stack of one vector per layer; it is a perturbation like any other
(`hooks` per batch row), so `apply`, `generate` and the deltas of `analysis.deltas`
take it. `at(layer)` is the slice at one layer as `SteeringVectors`.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.sites import HookSite, require_hook
from melbo_lens.perturbations.base import Hook, Rows, apply, pick_members, row_members
from melbo_lens.perturbations.vectors import SteeringVectors, steering_hook

__all__ = ["LayerVectors"]


@dataclass
class LayerVectors:
    """n members, each one vector per layer in `layers`, added to the layers' outputs.

    Args:
        vectors: [n, layers, d_model]; member k adds `vectors[k, j]` to the output of
            block `layers[j]` (its `resid_post`).
        layers: The blocks the vectors are added at, one per entry of dim 1.
        method: Where the vectors came from (`"imported"`, `"steering-vectors"`, ...).
        model_name: The model they were made for, when known.
        metadata: Free-form provenance (a GGUF file's model hint, for one), saved with them.

    Examples:
        >>> lv = LayerVectors(torch.ones(1, 2, 32), layers=(1, 2))
        >>> [s.name for s in lv.sites], len(lv)
        (['blocks.1.hook_resid_post', 'blocks.2.hook_resid_post'], 1)
        >>> with lv.apply(model):
        ...     logits = model(torch.tensor([[1, 2, 3]]))
        >>> lv.at(2).site.name
        'blocks.2.hook_resid_post'
    """

    vectors: Float[Tensor, "n layers d_model"]
    layers: tuple[int, ...]
    method: str = "imported"
    model_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)
        if self.vectors.ndim != 3 or self.vectors.shape[1] != len(self.layers):
            raise ValueError(
                f"vectors must be [n, {len(self.layers)} layers, d_model] for layers "
                f"{list(self.layers)}, got {tuple(self.vectors.shape)}"
            )
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise ValueError(
                f"layers must be distinct block indices >= 0 in increasing order, got "
                f"{list(self.layers)}"
            )
        if not torch.isfinite(self.vectors).all():
            raise ValueError("layer vectors contain NaN or inf")

    @property
    def sites(self) -> list[HookSite]:
        return [HookSite(layer, "resid_post") for layer in self.layers]

    @property
    def site(self) -> HookSite:
        """The earliest site: where the perturbation starts acting."""
        return self.sites[0]

    @property
    def norms(self) -> Float[Tensor, " n"]:
        """Size of each member: the norm of all its layers' vectors together."""
        return self.vectors.flatten(1).norm(dim=-1)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def __getitem__(self, index: int | slice | Sequence[int]) -> LayerVectors:
        picked = self.vectors[[index] if isinstance(index, int) else index]
        return LayerVectors(picked, self.layers, self.method, self.model_name, dict(self.metadata))

    def at(self, layer: int) -> SteeringVectors:
        """The members' vectors at one layer, as `SteeringVectors` at its output."""
        if layer not in self.layers:
            raise ValueError(f"no vector at layer {layer}; the layers are {list(self.layers)}")
        i = self.layers.index(layer)
        return SteeringVectors(
            self.vectors[:, i].clone(),
            HookSite(layer, "resid_post"),
            method=self.method,
            model_name=self.model_name,
        )

    def hooks(self, model: Host, rows: Rows, scale: float = 1.0) -> list[Hook]:
        """One steering hook per layer adding member `rows[i]`'s vector to batch row i."""
        members = row_members(rows, len(self), "member")
        out = []
        for i, site in enumerate(self.sites):
            require_hook(model, site)
            vecs = self.vectors[:, i].float()
            if isinstance(rows, int):
                out.append((site.name, steering_hook(vecs[members[0]], scale)))
            else:
                out.append((site.name, steering_hook(pick_members(vecs, members), scale)))
        return out

    @contextmanager
    def apply(
        self, model: Host, index: Rows = 0, *, scale: float = 1.0
    ) -> Generator[Any, None, None]:
        """Steer `model` with member `index` at every layer; hooks removed on exit."""
        with apply(model, self, index, scale=scale) as m:
            yield m
