# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""Outlier-norm positions: tokens whose residual norm dwarfs the rest of their prompt.

Llama-style models park a huge activation on the first token (the "attention sink"):
SmolLM2-135M's `<|im_start|>` has ~8x the median residual norm of the other tokens at
layer 7 and ~80x at layer 22. Any change measured there (MELBO's ||Δ_t||^p) dwarfs every
other position, so an objective that includes it is spent on that one token. The rule
here finds such positions from the unsteered activations alone:

    position t of prompt i is an outlier when ||Z_t^(i)|| > factor · median_t' ||Z_t'^(i)||

over the prompt's real tokens. The median is robust: one sink does not move it. It is
the midpoint of the middle two for an even count, except for a two-token prompt, where
the midpoint would be half the sink's own norm and hide it (`--no-chat --prompt "Hi
there"` on SmolLM2: 24,082 and 242 at layer 22); there the lower median (the smaller
norm) is used. We considered comparing with norms over a reference corpus instead, but
that needs a pass over the corpus per model and site, and a prompt's ordinary tokens
are already the right scale.
`OUTLIER_FACTOR` = 5 sits between the sinks measured on the shipped models (>= 6x at
every block-boundary layer where they occur) and ordinary tokens (at most ~2.5x).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import run_to_site
from melbo_lens.core.sites import HookSite

__all__ = ["OUTLIER_FACTOR", "norm_outliers", "residual_norms", "without_norm_outliers"]

OUTLIER_FACTOR = 5.0


@torch.no_grad()
def residual_norms(model: Host, prompts: PromptSet, site: HookSite) -> Float[Tensor, "n pos"]:
    """Per-token L2 norm of the unsteered activation at `site` (0 on padding)."""
    z = run_to_site(model, prompts.tokens, prompts.attention_mask, site.name)
    return z.float().norm(dim=-1) * prompts.attention_mask.to(z.device)


def norm_outliers(
    norms: Float[Tensor, "n pos"], mask: Bool[Tensor, "n pos"], factor: float = OUTLIER_FACTOR
) -> Bool[Tensor, "n pos"]:
    """Positions (within `mask`) whose norm exceeds `factor` x their row's median (the
    lower median for a two-token row; see the module's docstring).

    Examples:
        >>> norms = torch.tensor([[800.0, 90.0, 100.0, 110.0]])
        >>> norm_outliers(norms, torch.ones(1, 4, dtype=torch.bool)).tolist()
        [[True, False, False, False]]
        >>> norm_outliers(torch.tensor([[900.0, 9.0]]), torch.ones(1, 2, dtype=torch.bool)).tolist()
        [[True, False]]
    """
    out = torch.zeros_like(mask)
    for i in range(norms.shape[0]):
        real = norms[i][mask[i]].float()
        if real.numel() == 0:
            continue
        median = real.min() if real.numel() == 2 else real.quantile(0.5)
        out[i] = mask[i] & (norms[i] > factor * median)
    return out


def without_norm_outliers(
    model: Host, prompts: PromptSet, site: HookSite, factor: float = OUTLIER_FACTOR
) -> tuple[PromptSet, list[list[int]]]:
    """`prompts` with the outlier-norm positions at `site` left out of the target mask,
    and the positions left out per prompt. A prompt keeps at least its non-outliers (the
    median token is never an outlier), so every prompt keeps a target position. The
    result's `target_spec` is its positions, explicit now, so a later call on it (a
    radius probe, a resumed run) keeps them without another forward pass."""
    norms = residual_norms(model, prompts, site)
    mask = prompts.target_mask
    outliers = norm_outliers(norms, mask.to(norms.device), factor).to(mask.device)
    excluded = [torch.nonzero(row).flatten().tolist() for row in outliers]
    kept = mask & ~outliers
    positions = [torch.nonzero(row).flatten().tolist() for row in kept]
    return replace(prompts, target_mask=kept, target_spec=positions), excluded
