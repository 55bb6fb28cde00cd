"""Steering is adding a vector to the residual stream at one site, at every position.

`steer()` is a context manager: inside it, every forward pass of the model adds
`scale * vector` to the activation at the site. A single vector applies to every batch
row; a `[rows, d_model]` matrix applies one vector per row, which is how melbo_lens runs
many vectors in one batch. The hook is removed on exit, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .sites import HookSite, as_site, require_hook

__all__ = ["steer", "steering_hook"]


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
                raise ValueError(
                    f"{v.shape[0]} per-row steering vectors for a batch of {act.shape[0]} rows; "
                    "pass one vector per batch row, or a single [d_model] vector"
                )
            v = v.view(v.shape[0], *([1] * (act.ndim - 2)), v.shape[1])
        return act + v

    return hook


@contextmanager
def steer(
    model: Any,
    site: HookSite | str | int,
    vectors: Float[Tensor, "*rows d_model"],
    *,
    scale: float = 1.0,
) -> Iterator[Any]:
    """Add `scale * vectors` at `site` during forward passes inside the block.

    Examples:
        >>> with steer(model, HookSite(3), torch.randn(model.cfg.d_model)):  # doctest: +SKIP
        ...     logits = model("Hello")
    """
    site = require_hook(model, as_site(site))
    if not torch.isfinite(vectors).all():
        raise ValueError("steering vectors contain NaN or inf")
    with model.hooks(fwd_hooks=[(site.name, steering_hook(vectors, scale))]):
        yield model
