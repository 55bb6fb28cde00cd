"""SAE features in the forward pass: what a steering vector does to each feature’s
activation (`feature_effects`) and features as steering vectors (`feature_vectors`).
Feature clamps are in `analysis.sae.clamps`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor

from melbo_lens.analysis.sae.decompose import check_fit
from melbo_lens.analysis.sae.loading import decoder_directions, hook_name, sae_site, warn_unfolded
from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import run_to_site
from melbo_lens.core.sites import HookSite, require_hook
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = ["FeatureEffects", "feature_effects", "feature_vectors"]


# ---------------------------------------------------------------------- effects
@dataclass
class FeatureEffects:
    """SAE feature activations at `sae_site` with and without a steering vector.

    Only the `features` with the largest mean |change| (over the counted positions,
    `mask`) are stored, per prompt and token: `before` / `after` [n, pos, top]. Means are
    over the counted positions; `l0_before` / `l0_after` are the mean number of active
    features per counted token, over the whole dictionary.

    Attributes:
        features: The latents kept (largest mean |change| first).
        mean_abs_change: Mean |after − before| per kept latent over counted positions.
        mean_before: Mean activation without the vector.
        mean_after: Mean activation with it.
        before: [n, pos, top] activations without the vector.
        after: [n, pos, top] activations with it.
        mask: [n, pos] the counted positions.
        tokens: [n, pos] the prompts' token ids.
        vector_site: Where the vector was added.
        sae_site: Where the SAE read.
        index: The vector's member index.
        scale: The multiplier the vector was applied with.
        l0_before: Mean active latents per counted token without the vector.
        l0_after: The same with it.
    """

    features: list[int]
    mean_abs_change: list[float]
    mean_before: list[float]
    mean_after: list[float]
    before: Float[Tensor, "n pos top"]
    after: Float[Tensor, "n pos top"]
    mask: Bool[Tensor, "n pos"]
    tokens: Int[Tensor, "n pos"]
    vector_site: HookSite
    sae_site: HookSite
    index: int
    scale: float = 1.0
    l0_before: float = 0.0
    l0_after: float = 0.0

    @property
    def change(self) -> Float[Tensor, "n pos top"]:
        return self.after - self.before

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "mean_abs_change": list(self.mean_abs_change),
            "mean_before": list(self.mean_before),
            "mean_after": list(self.mean_after),
            "before": self.before.tolist(),
            "after": self.after.tolist(),
            "mask": self.mask.tolist(),
            "tokens": self.tokens.tolist(),
            "vector_site": self.vector_site.name,
            "sae_site": self.sae_site.name,
            "index": self.index,
            "scale": self.scale,
            "l0_before": self.l0_before,
            "l0_after": self.l0_after,
        }

    def table(self, limit: int | None = None) -> str:
        lines = [f"{'rank':>4} {'feature':>8} {'mean|Δ|':>9} {'before':>9} {'after':>9}"]
        n = len(self.features) if limit is None else min(limit, len(self.features))
        for j in range(n):
            lines.append(
                f"{j + 1:>4} {self.features[j]:>8} {self.mean_abs_change[j]:>9.4f} "
                f"{self.mean_before[j]:>9.4f} {self.mean_after[j]:>9.4f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return (
            f"vector {self.index} at {self.vector_site.name} (scale {self.scale:g}) seen by the "
            f"SAE at {self.sae_site.name}; L0 {self.l0_before:.1f} -> {self.l0_after:.1f}\n"
            + self.table()
        )


def capture_sae_input(model: Host, prompts: PromptSet, site: HookSite) -> Tensor:
    """The activation at `site` for the prompts; the forward pass stops there."""
    with torch.no_grad():
        return run_to_site(model, prompts.tokens, prompts.attention_mask, site.name)


def feature_effects(
    model: Host,
    sae: SAE,
    vectors: SteeringVectors,
    index: int,
    prompts: PromptSet | str | Sequence[str],
    *,
    top_n: int = 20,
    scale: float = 1.0,
    positions: Literal["all", "target"] = "all",
    chunk_tokens: int = 4096,
) -> FeatureEffects:
    """Which SAE features a steering vector switches on or off, per prompt and token.

    The vector is added at its own site (every position, as `vectors.apply` does); the
    SAE reads its site, which must be the same or later (e.g. an SAE at the MELBO target).
    Features are ranked by mean |activation change| over the real tokens
    (`positions="all"`) or the prompts' target positions (`"target"`).

    Args:
        model: the model the vector steers.
        sae: an SAE at the vector's site or later.
        vectors: `SteeringVectors`.
        index: which vector.
        prompts: the prompts (a `PromptSet`, a text or texts).
        top_n: features kept.
        scale: multiplies the vector.
        positions: rank over "all" real tokens or the "target" positions.
        chunk_tokens: tokens encoded at a time.

    Returns:
        `FeatureEffects`: the top features' activation changes per prompt and token.

    Examples:
        >>> fx = feature_effects(model, sae, vectors, 0, prompts, top_n=5)
        >>> len(fx.features), fx.vector_site.name
        (5, 'blocks.1.hook_resid_post')
    """
    if positions not in ("all", "target"):
        raise ValueError(f"positions must be 'all' or 'target', got {positions!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, PromptSet):
        if len(prompts) == 0:
            raise ValueError("no prompts given; pass a PromptSet or at least one text")
        prompts = PromptSet.from_texts(model, list(prompts))
    ssite = require_hook(model, sae_site(sae))
    vsite = require_hook(model, vectors.site)
    warn_unfolded(sae)
    d_model = int(model.cfg.d_model)
    if vectors.d_model != d_model:
        raise ValueError(
            f"the vectors are {vectors.d_model}-dimensional but the model has d_model="
            f"{d_model}; they come from another model"
        )
    v = vectors.vectors[index]
    check_fit(v, None, sae, True)
    if ssite.position < vsite.position:
        raise ValueError(
            f"the SAE reads {ssite.name}, before the vector's site {vsite.name}; the vector "
            "cannot change anything there. Use an SAE at the vector's site or later"
        )
    before = capture_sae_input(model, prompts, ssite)
    if ssite.position == vsite.position:  # same tensor: read it with the vector added
        after = before + scale * v.to(before.device, before.dtype)
    else:
        with vectors.apply(model, index, scale=scale):
            after = capture_sae_input(model, prompts, ssite)
    mask = prompts.attention_mask if positions == "all" else prompts.target_mask
    flat_b, flat_a = before[mask], after[mask]  # [tokens, d_in]
    n_tok = flat_b.shape[0]
    d_sae = int(sae.cfg.d_sae)
    sums = torch.zeros(3, d_sae, dtype=torch.float64)  # |Δ|, before, after
    l0 = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n_tok, chunk_tokens):
            fb = sae.encode(flat_b[start : start + chunk_tokens]).double().cpu()
            fa = sae.encode(flat_a[start : start + chunk_tokens]).double().cpu()
            sums += torch.stack([(fa - fb).abs().sum(0), fb.sum(0), fa.sum(0)])
            l0 += torch.stack([(fb != 0).sum(), (fa != 0).sum()]).double()
        means = sums / max(n_tok, 1)
        top = torch.topk(means[0], min(top_n, d_sae)).indices
        per_b = _encode_columns(sae, before, top)
        per_a = _encode_columns(sae, after, top)
    zero = torch.zeros((), dtype=per_b.dtype)
    keep = mask[..., None].cpu()
    return FeatureEffects(
        features=[int(f) for f in top],
        mean_abs_change=[float(x) for x in means[0, top]],
        mean_before=[float(x) for x in means[1, top]],
        mean_after=[float(x) for x in means[2, top]],
        before=torch.where(keep, per_b, zero),
        after=torch.where(keep, per_a, zero),
        mask=mask.cpu(),
        tokens=prompts.tokens.cpu(),
        vector_site=vsite,
        sae_site=ssite,
        index=int(index),
        scale=float(scale),
        l0_before=float(l0[0]) / max(n_tok, 1),
        l0_after=float(l0[1]) / max(n_tok, 1),
    )


def _encode_columns(sae: SAE, x: Tensor, cols: Tensor) -> Tensor:
    """sae.encode(x)[..., cols] one prompt at a time (never [n, pos, d_sae] at once)."""
    return torch.stack([sae.encode(row)[..., cols.to(row.device)].float().cpu() for row in x])


# ---------------------------------------------------------------------- feature steering
def feature_vectors(
    sae: SAE,
    features: int | Sequence[int],
    *,
    radius: float | Sequence[float] | Tensor | None = None,
    target: HookSite | None = None,
) -> SteeringVectors:
    """Decoder directions of `features` as steering vectors at the SAE's site.

    `radius=None` keeps the decoder rows as they are (adding one = the feature firing at
    activation 1; `.apply(model, i, scale=a)` adds activation a). A number (or one per
    feature) scales each to that norm, e.g. a learned vector's norm for a fair comparison.
    `target` is recorded so `delta_similarity` and `Segment` know where to measure.

    Args:
        sae: the SAE whose decoder rows are taken.
        features: one latent index or several.
        radius: None (the rows as they are), a norm, or one norm per feature.
        target: recorded as the vectors' target.

    Returns:
        `SteeringVectors` at the SAE's site, one per feature.

    Raises:
        ValueError: no features, latent indices out of range, or radii that are not
            positive or not one per feature.

    Examples:
        >>> feats = feature_vectors(sae, [12, 40], radius=4.0)
        >>> with feats.apply(model, 0):
        ...     logits = model(prompts.tokens)
    """
    feats = [features] if isinstance(features, int) else [int(f) for f in features]
    if not feats:
        raise ValueError("no features given; pass at least one feature index")
    d_sae = int(sae.cfg.d_sae)
    bad = [f for f in feats if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"features {bad} out of range: the SAE has {d_sae} (0..{d_sae - 1})")
    dec = decoder_directions(sae)[feats].float().cpu().clone()
    r: Tensor | None = None
    if radius is not None:
        r = torch.as_tensor(radius, dtype=dec.dtype).flatten()
        if r.numel() not in (1, len(feats)) or not (r > 0).all():
            raise ValueError(
                f"radius must be a positive number or one per feature ({len(feats)}), "
                f"got {radius!r}"
            )
        dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12) * r[:, None]
    meta = getattr(sae.cfg, "metadata", None)
    return SteeringVectors(
        vectors=dec,
        site=sae_site(sae),
        target=target,
        method="sae_feature",
        config={"features": feats, "radius": None if r is None else r.tolist()},
        model_name=getattr(meta, "model_name", None),
        metadata={"sae_hook_name": hook_name(sae), "d_sae": d_sae},
    )
