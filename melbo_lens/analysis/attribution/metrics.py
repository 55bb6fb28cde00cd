"""Scalar metrics of the target activations that attributions explain: the squared norm
of the delta (MELBO objective for p = 2), its projection on a direction, or a logit
difference read from the target on."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from melbo_lens.analysis.attribution.results import Metric
from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import (
    HookSite,
    as_site,
)

__all__ = ["logit_diff_metric"]


# ---------------------------------------------------------------------- metrics
def _delta_norm_metric(unsteered: Tensor, mask: Tensor) -> Metric:
    def delta_sq_norm(z: Tensor) -> Tensor:
        return ((z - unsteered).pow(2).sum(-1) * mask).sum()

    return delta_sq_norm


def _projection_metric(direction: Tensor, unsteered: Tensor, mask: Tensor) -> Metric:
    if direction.ndim != 1 or direction.shape[0] != unsteered.shape[-1]:
        raise ValueError(
            f"a metric direction must be [d_model={unsteered.shape[-1]}], got "
            f"{tuple(direction.shape)}"
        )
    unit = torch.nn.functional.normalize(direction.to(unsteered), dim=0)

    def delta_projection(z: Tensor) -> Tensor:
        return (((z - unsteered) @ unit) * mask).sum()

    return delta_projection


def logit_diff_metric(
    model: Host, prompts: PromptSet, target: HookSite | str | int, good: int, bad: int
) -> Metric:
    """m(Z_target) = Σ_prompts logit[good] − logit[bad] at each prompt's last real token.

    The rest of the model runs from the target (a `resid_pre` / `resid_post` site of a
    HookedTransformer) to the logits.

    Args:
        model: A HookedTransformer.
        prompts: The prompts; each one's last real token is read.
        target: The site the metric starts from.
        good: The token id whose logit counts positively.
        bad: The token id whose logit counts negatively.

    Returns:
        A metric `m(Z_target) -> scalar` for `attribute_target_delta`.

    Raises:
        ValueError: `target` is not a `resid_pre` / `resid_post` site.

    Examples:
        >>> m = logit_diff_metric(model, prompts, HookSite(3, "resid_pre"), good=7, bad=9)
        >>> res = attribute_target_delta(model, prompts, vectors, 0, metric=m,
        ...                              target=HookSite(3, "resid_pre"), top_n=2)
        >>> res.metric_steered != res.metric_unsteered
        True
    """
    target = as_site(target)
    if not target.is_block_boundary:
        raise ValueError(
            f"logit_diff_metric runs the model on from the target, which must be a "
            f"resid_pre / resid_post site; got {target.name}"
        )
    start = target.next_block
    last = prompts.lengths - 1
    rows = torch.arange(len(prompts))
    mask = prompts.attention_mask.long()

    def logit_diff(z: Tensor) -> Tensor:
        logits = model(z, start_at_layer=start, attention_mask=mask)
        final = logits[rows, last]
        return (final[:, good] - final[:, bad]).sum()

    return logit_diff


def resolve_metric(metric: Any, unsteered: Tensor, mask: Tensor) -> tuple[str, Metric]:
    if metric is None or (isinstance(metric, str) and metric == "delta_sq_norm"):
        return "delta_sq_norm", _delta_norm_metric(unsteered, mask)
    if isinstance(metric, Tensor):
        return "delta_projection", _projection_metric(metric, unsteered, mask)
    if callable(metric):
        return getattr(metric, "__name__", type(metric).__name__), cast(Metric, metric)
    raise TypeError(
        "metric must be None (Σ_t ||Δ_t||²), a [d_model] direction tensor (Δ projected on "
        f"it), or a callable metric(Z_target) -> scalar; got {metric!r}"
    )
