"""An SAE view of a steering vector: which dictionary features it is made of, and moves.

A sparse autoencoder (SAE) trained on a model's activations at one hook site holds a
dictionary of feature directions: row f of its decoder `W_dec` [d_sae, d_in] is what
feature f writes into the activation when it fires with strength 1. A steering vector
living at the same site can be read in that dictionary in three ways:

* **Cosine** (`decompose_onto_sae(..., method="cosine")`): cos(θ, W_dec[f]) for every
  feature; the top-k by |cos|. `explained` is the fraction of ||θ||² inside the span of
  those k decoder rows (least squares onto them), so near-duplicate features do not
  count twice.
* **Sparse coding** (`method="sparse"`): orthogonal matching pursuit (OMP) on the
  dictionary. Each step picks the unit decoder direction most correlated with the
  residual, then refits θ by least squares on all picked rows (non-negative least
  squares with `nonnegative=True`), so θ ≈ Σ_j coefficients[j] · W_dec[features[j]],
  coefficients in feature-activation units. `explained` = 1 − ||residual||² / ||θ||².
* **Effect** (`feature_effects`): the SAE's feature activations at its site over real
  prompts, with and without the vector added at the vector's site (the same site or any
  later one, e.g. the MELBO target). The features whose activations change most are
  what the vector *does* in the SAE's terms, which can differ from what it *is*.

Feature steering makes the comparison the other way round: `feature_vectors` turns
decoder rows into `SteeringVectors` at the SAE's site (at a chosen norm), and
`clamp_feature` sets one feature's activation through the SAE while keeping the SAE's
error term, x' = x + decode(f') − decode(f), so only that feature's contribution changes.

Comparing a vector with its features fairly (equal norm, same prompts, same positions):
steering vectors are added at every position, and so are feature vectors, so give them
the vector's norm and run both through the same prompts and target positions:

    dec = decompose_onto_sae(vectors, sae, index=2, method="sparse", top_k=5)
    feats = feature_vectors(sae, dec.features, radius=float(vectors.radius[2]),
                            target=vectors.target)       # same norm, same site
    delta_similarity(model, prompts, vectors[2], feats)  # cos of their target deltas
    seg = Segment(model, vectors.site, vectors.target, prompts)  # same prompts, positions
    z = seg.run(torch.cat([vectors[2].vectors, feats.vectors]))
    mask = prompts.target_mask.expand(z.shape[:-1])
    melbo_objective_per_prompt(z, seg.unsteered.expand_as(z), mask).sum(-1)  # per vector

and `generate_steered(model, feats, prompts)` for completions. `compare_with_features`
does the objective and delta part in one call.

sae-lens is imported here and nowhere outside `melbo_lens.analysis`.
"""

from __future__ import annotations

from melbo_lens.analysis.sae.clamps import FeatureClamp, clamp_feature
from melbo_lens.analysis.sae.comparison import FeatureComparison, compare_with_features
from melbo_lens.analysis.sae.decompose import SaeDecomposition, decompose_onto_sae
from melbo_lens.analysis.sae.features import FeatureEffects, feature_effects, feature_vectors
from melbo_lens.analysis.sae.loading import (
    PACKAGED_SAES,
    decoder_directions,
    load_sae,
    packaged_sae_dir,
    packaged_sae_for,
    sae_site,
)

__all__ = [
    "FeatureClamp",
    "FeatureComparison",
    "FeatureEffects",
    "PACKAGED_SAES",
    "SaeDecomposition",
    "clamp_feature",
    "compare_with_features",
    "decoder_directions",
    "decompose_onto_sae",
    "feature_effects",
    "feature_vectors",
    "load_sae",
    "packaged_sae_dir",
    "packaged_sae_for",
    "sae_site",
]
