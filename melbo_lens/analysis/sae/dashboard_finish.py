"""Finishing a dashboard pass: from the merged state to `FeatureDashboards`: context
windows from the token stream, logit effects of each latent's decoder direction (through
the final norm's weight and the unembedding), and correlated latents on the hash sample."""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from melbo_lens.analysis.sae.dashboard_result import FeatureDashboards, sae_digest, windows_of
from melbo_lens.analysis.sae.dashboard_state import DashboardState
from melbo_lens.analysis.sae.loading import decoder_directions, hook_name
from melbo_lens.core.host import Host

__all__ = ["finish_dashboards", "logit_effects"]


def logit_effects(
    model: Host, directions: Float[Tensor, "n d_model"]
) -> Float[Tensor, "n d_vocab"]:
    """Each direction's direct effect on the logits: through the final norm's affine part
    and the unembedding, ``(center(d) * w_ln) @ W_U``.

    `center` subtracts the mean over d_model when the final norm is a LayerNorm (which
    centres its input); `w_ln` is the final norm's weight when it is not folded into
    `W_U` (TransformerLens folds it by default, and then this is ``d @ W_U``). The norm's
    1/RMS factor depends on the token, not the direction, and is positive, so it is left
    out: effects are per unit of direction at the final residual, before that factor.

    Args:
        model: A HookedTransformer (its final norm and unembedding are used).
        directions: [n, d_model] directions at the final residual stream.

    Returns:
        [n, d_vocab] direct logit effect per unit of each direction.

    Examples:
        >>> logit_effects(model, torch.eye(32)[:2]).shape
        torch.Size([2, 50])
    """
    d = directions.to(model.W_U.device, model.W_U.dtype)
    norm = getattr(model.cfg, "normalization_type", None)
    if norm in ("LN", "LNPre"):
        d = d - d.mean(-1, keepdim=True)
    w = getattr(getattr(model, "ln_final", None), "w", None)
    if isinstance(w, Tensor):
        d = d * w
    return (d @ model.W_U).float()


def finish_dashboards(
    model: Host,
    sae: SAE,
    state: DashboardState,
    rows: Tensor,
    settings: Any,
    *,
    n_correlated: int = 5,
    n_logits: int = 10,
    left: int = 10,
    right: int = 5,
) -> FeatureDashboards:
    """Turn a (merged) pass state into dashboards: context windows, logit effects, correlations."""
    d_sae = int(sae.cfg.d_sae)
    latents = list(settings.latents) if settings.latents is not None else list(range(d_sae))
    sc = state.scores
    stream = rows.flatten()
    order = sc.sample_order()
    sample_values = sc.sample_values.gather(1, order)
    sample_locs = sc.sample_locations.gather(1, order)
    top, bot, logit_hist, logit_range = _logit_summaries(model, sae, latents, n_logits)
    corr_ids, corr_vals = _correlations(state, d_sae, latents, n_correlated)
    windows_top = windows_of(stream, sc.top_locations, left, right)
    windows_sample = windows_of(stream, sample_locs, left, right)
    used = torch.cat(
        [windows_top.flatten(), windows_sample.flatten(), top[0].flatten(), bot[0].flatten()]
    )
    ids = sorted(int(i) for i in torch.unique(used) if i >= 0)
    tok = model.tokenizer
    strings = {i: tok.decode([i]) for i in ids}
    return FeatureDashboards(
        latents=latents,
        n_tokens=sc.n_tokens,
        top_values=sc.top_values,
        top_locations=sc.top_locations,
        top_windows=windows_top,
        sample_values=sample_values,
        sample_locations=sample_locs,
        sample_windows=windows_sample,
        hist=sc.hist,
        active=sc.active,
        total=sc.total,
        logit_top_ids=top[0],
        logit_top=top[1],
        logit_bottom_ids=bot[0],
        logit_bottom=bot[1],
        logit_hist=logit_hist,
        logit_range=logit_range,
        corr_ids=corr_ids,
        corr_values=corr_vals,
        token_strings=strings,
        left=left,
        right=right,
        info={
            "model": getattr(model.cfg, "model_name", None),
            "sae_hook": hook_name(sae),
            "sae_sha": sae_digest(sae),
            "d_sae": d_sae,
            "settings": dict(settings.__dict__),
            "corr_tokens": len(state.corr_rows),
        },
    )


def _logit_summaries(
    model: Host, sae: SAE, latents: list[int], n: int, block: int = 256
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Tensor, Tensor]:
    """Top and bottom `n` logit effects (ids, values), a 20-bin histogram of all of them and
    its (min, max), per latent; `block` latents at a time (a [d_sae, d_vocab] matrix of
    effects would not fit: 8192 x 49152 floats is 1.6 GB)."""
    parts: list[tuple[Tensor, ...]] = []
    dirs = decoder_directions(sae)
    for start in range(0, len(latents), block):
        cols = torch.tensor(latents[start : start + block])
        with torch.no_grad():
            eff = logit_effects(model, dirs[cols]).cpu()
        k = min(n, eff.shape[1])
        top, bot = torch.topk(eff, k, dim=1), torch.topk(eff, k, dim=1, largest=False)
        lo, hi = eff.min(1).values, eff.max(1).values
        scaled = ((eff - lo[:, None]) / (hi - lo).clamp_min(1e-12)[:, None] * 20).clamp(0, 19.5)
        hist = torch.stack([torch.bincount(r.long(), minlength=20)[:20] for r in scaled])
        parts.append(
            (top.indices, top.values, bot.indices, bot.values, hist, torch.stack([lo, hi], 1))
        )
    cat = [torch.cat([p[i] for p in parts]) for i in range(6)]
    return (cat[0], cat[1]), (cat[2], cat[3]), cat[4], cat[5]


def _correlations(
    state: DashboardState, d_sae: int, latents: list[int], n: int, block: int = 256
) -> tuple[Tensor, Tensor]:
    """Top-`n` Pearson correlations of each latent with the others, on the sampled tokens.

    Computed sparsely, in float64: cov_ij = (XᵀX)_ij - m μ_i μ_j with X the [m, d_sae]
    activations of the m sampled tokens (k of d_sae active per token), so the cost is
    nnz(X) x d_sae rather than m x d_sae² for a dense centred product (1 TFLOP for 8,192
    latents over 15k tokens)."""
    m = len(state.corr_rows)
    n = min(n, d_sae - 1)
    if m < 2 or n < 1:
        return torch.full((len(latents), max(n, 0)), -1, dtype=torch.long), torch.zeros(
            len(latents), max(n, 0)
        )
    r, c = state.corr_index[:, 0], state.corr_index[:, 1]
    v = state.corr_values.double()
    xt = torch.sparse_coo_tensor(
        torch.stack([c, r]), v, (d_sae, m), check_invariants=True
    ).coalesce()
    mean = torch.zeros(d_sae, dtype=torch.float64).index_add_(0, c, v) / m
    square = torch.zeros(d_sae, dtype=torch.float64).index_add_(0, c, v * v)
    std = (square - m * mean**2).clamp_min(0).sqrt()  # the centred column's norm
    dead = std <= 1e-12 * std.max().clamp_min(1e-300)
    ids, vals = [], []
    for start in range(0, len(latents), block):
        cols = torch.tensor(latents[start : start + block])
        where = torch.full((d_sae,), -1, dtype=torch.long)
        where[cols] = torch.arange(len(cols))
        pick = where[c] >= 0
        dense = torch.zeros(m, len(cols), dtype=torch.float64)
        dense[r[pick], where[c[pick]]] = v[pick]
        gram = torch.sparse.mm(xt, dense).T  # [cols, d_sae] = X[:, cols]ᵀ X
        cov = gram - m * mean[cols, None] * mean[None]
        corr = (cov / (std[cols, None] * std[None]).clamp_min(1e-300)).float()
        corr[torch.arange(len(cols)), cols] = -math.inf  # not itself
        corr[:, dead] = -math.inf
        t = torch.topk(corr, n, dim=1)
        ids.append(t.indices.masked_fill(t.values == -math.inf, -1))
        vals.append(t.values.masked_fill(t.values == -math.inf, math.nan))
    return torch.cat(ids), torch.cat(vals)
