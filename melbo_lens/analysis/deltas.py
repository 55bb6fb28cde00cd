"""The target-layer change of any perturbation, member by member.

A perturbation's *delta* at a target site is Z(member) − Z(0): the target activations
with the member applied minus those without. MELBO's objective is a norm of it, the
similarity of two members is the cosine of their deltas. For steering vectors the
`Segment` computes it fastest (cached prefix, only the blocks in between); this module
computes it for *any* `Perturbation` through its per-row hooks, by running the model up
to the target (`run_to_site`) with K copies of the prompts on the batch axis, member j
on copy j. It is exact for every kind (vectors, adapters, ablations, clamps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import run_to_site
from melbo_lens.core.sites import HookSite, as_site, require_hook
from melbo_lens.methods.objectives import melbo_objective_per_prompt
from melbo_lens.perturbations.base import Perturbation

__all__ = ["perturbation_targets", "perturbation_objectives", "perturbation_deltas"]


@torch.no_grad()
def perturbation_targets(
    model: Host,
    perturbation: Perturbation,
    prompts: PromptSet,
    target: HookSite | str | int,
    *,
    members: Sequence[int] | None = None,
    chunk: int = 8,
) -> tuple[Float[Tensor, "k n pos d_model"], Float[Tensor, "n pos d_model"]]:
    """(steered, unsteered) target activations: member `members[j]` on copy j.

    Args:
        model: The model.
        perturbation: Any perturbation.
        prompts: The prompts.
        target: Where Z is read.
        members: The members to run (default: all).
        chunk: Members per forward pass.

    Returns:
        [k, n, pos, d_model] steered and [n, pos, d_model] unsteered activations.

    Examples:
        >>> z, z0 = perturbation_targets(model, adapters, prompts, HookSite(3))
        >>> tuple(z.shape) == (len(adapters), *z0.shape)
        True
    """
    site = require_hook(model, as_site(target))
    chosen = list(range(len(perturbation))) if members is None else [int(m) for m in members]
    mask = prompts.attention_mask
    unsteered = run_to_site(model, prompts.tokens, mask, site.name)
    out = []
    n = len(prompts)
    for start in range(0, len(chosen), chunk):
        part = chosen[start : start + chunk]
        k = len(part)
        hooks = perturbation.hooks(model, part, 1.0)
        z = run_to_site(model, prompts.tokens.repeat(k, 1), mask.repeat(k, 1), site.name, hooks)
        out.append(z.view(k, n, *z.shape[1:]))
    return torch.cat(out), unsteered


def perturbation_objectives(
    model: Host,
    perturbation: Perturbation,
    prompts: PromptSet,
    target: HookSite | str | int,
    *,
    power: float = 2.0,
    q: float = 1.0,
    chunk: int = 8,
) -> Float[Tensor, " k"]:
    """MELBO's objective Σ_i (Σ_t mask·||Z_t(member) − Z_t(0)||^p)^(1/q) of each member.

    Args:
        model: The model.
        perturbation: Any perturbation.
        prompts: The prompts, with their target positions.
        target: Where Z is read.
        power: p.
        q: q.
        chunk: Members per forward pass.

    Returns:
        [k] the objective of each member.

    Examples:
        >>> perturbation_objectives(model, adapters, prompts, HookSite(3)).shape
        torch.Size([2])
    """
    z, z0 = perturbation_targets(model, perturbation, prompts, target, chunk=chunk)
    mask = prompts.target_mask.to(z.device).expand(z.shape[:-1])
    per_prompt = melbo_objective_per_prompt(z, z0.expand_as(z), mask, power=power, q=q)
    return per_prompt.sum(-1)


def perturbation_deltas(
    model: Host,
    perturbation: Perturbation,
    prompts: PromptSet,
    target: HookSite | str | int,
    *,
    chunk: int = 8,
) -> Float[Tensor, "k flat"]:
    """Each member's delta at the prompts' target positions, flattened (float64, CPU)."""
    z, z0 = perturbation_targets(model, perturbation, prompts, target, chunk=chunk)
    mask = prompts.target_mask.to(z.device)
    return (z - z0)[:, mask].flatten(1).to("cpu", torch.float64)
