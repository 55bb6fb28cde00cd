"""A vector against its own top SAE features: each feature’s decoder direction as a
steering vector of the same norm, with its objective and the cosine of its target delta
with the vector’s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import SAE

from melbo_lens.analysis.sae.decompose import check_fit
from melbo_lens.analysis.sae.features import feature_vectors
from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.core.sites import HookSite
from melbo_lens.methods.objectives import melbo_objective_per_prompt
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = ["FeatureComparison", "compare_with_features"]


# ---------------------------------------------------------------------- comparison
@dataclass
class FeatureComparison:
    """A vector and its top SAE features as steering vectors of the same norm, same prompts.

    `objective[0]` is the vector's MELBO objective, `objective[j+1]` that of feature
    `features[j]` (its decoder direction at the vector's norm, added at every position
    like the vector); `delta_cosine[j]`: cos of their target deltas with the vector's.

    Attributes:
        features: The SAE latents compared with the vector.
        objective: The vector's MELBO objective first, then each latent's at the same norm.
        delta_cosine: Per latent, cos of its target delta with the vector's.
        radius: The norm both were added at (the vector's).
        target: The site the objective and deltas are read at.
    """

    features: list[int]
    objective: list[float]
    delta_cosine: list[float]
    radius: float
    target: HookSite

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "objective": list(self.objective),
            "delta_cosine": list(self.delta_cosine),
            "radius": self.radius,
            "target": self.target.name,
        }

    def table(self) -> str:
        lines = [f"{'steering by':>14} {'objective':>11} {'cos(Δ)':>8}"]
        lines.append(f"{'vector':>14} {self.objective[0]:>11.4g} {1.0:>8.3f}")
        for f, obj, c in zip(self.features, self.objective[1:], self.delta_cosine, strict=True):
            lines.append(f"{'feature ' + str(f):>14} {obj:>11.4g} {c:>8.3f}")
        return "\n".join(lines)


def compare_with_features(
    model: Host,
    prompts: PromptSet,
    vectors: SteeringVectors,
    index: int,
    sae: SAE,
    features: Sequence[int],
    *,
    target: HookSite | None = None,
) -> FeatureComparison:
    """MELBO objective and target-delta cosine of a vector and of features at its norm.

    All run through one `Segment` (same prompts, same target positions, vectors added at
    every position); power and q come from the vectors' config (default 2 and 1).

    Args:
        model: The model the vectors were trained on.
        prompts: The prompts the objective is measured on.
        vectors: The steering vectors.
        index: The member to compare.
        sae: The SAE whose decoder directions are compared.
        features: The latents to compare (e.g. a decomposition's `features`).
        target: Where the objective is read (default: the vectors' target).

    Returns:
        The objectives and delta cosines, vector first.

    Examples:
        >>> dec = decompose_onto_sae(vecs, sae, index=0, method="sparse", top_k=3)
        >>> cmp = compare_with_features(model, prompts, vecs, 0, sae, dec.features)
        >>> len(cmp.objective) == 1 + len(dec.features), round(cmp.delta_cosine[0], 6)
        (True, 1.0)
    """
    tgt = target if target is not None else vectors.target
    if tgt is None:
        raise ValueError("no target recorded on the vectors; pass target=HookSite(...)")
    v = vectors.vectors[index]
    check_fit(v, vectors.site, sae, False)
    radius = float(v.norm())
    feats = feature_vectors(sae, features, radius=radius)
    seg = Segment(model, vectors.site, tgt, prompts)
    theta = torch.cat([v[None], feats.vectors]).to(seg.unsteered.device, seg.unsteered.dtype)
    with torch.no_grad():
        z = seg.run(theta)
    k = z.shape[0]
    unsteered = seg.unsteered.expand_as(z)
    mask = prompts.target_mask.expand(k, *prompts.target_mask.shape)
    power = float(vectors.config.get("power", 2.0))
    q = float(vectors.config.get("q", 1.0))
    obj = melbo_objective_per_prompt(z, unsteered, mask, power=power, q=q).sum(-1)
    delta = (z - unsteered)[mask].view(k, -1, z.shape[-1]).reshape(k, -1).double()
    cos = torch.nn.functional.normalize(delta, dim=-1)
    return FeatureComparison(
        features=list(feats.config["features"]),
        objective=[float(x) for x in obj],
        delta_cosine=[float(c) for c in (cos[1:] @ cos[0])],
        radius=radius,
        target=tgt,
    )
