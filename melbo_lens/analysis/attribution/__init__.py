"""Attribution of a steering vector's target-layer change to the parts of the model.

A vector θ added at a source site changes the activations at a later target site by
Δ = Z_target(θ) − Z_target(0). Everything between the two sites writes into the residual
stream additively, so Δ splits *exactly* into

    Δ = (change at the source: θ itself, or an adapter's output)
        + Σ_heads (steered − unsteered head output, z_h · W_O[h])
        + Σ_MLPs  (steered − unsteered MLP output)

per token (the attention bias b_O is written once per layer in both runs and cancels).
That is the decomposition; it needs no approximation.

Which *nodes* matter for a scalar metric m of the target activations (default the MELBO
objective for p = 2: Σ over target positions of ||Δ_t||²) is a causal question. The nodes
are attention heads, MLPs and, for any SAE given at a site, its features plus its error
term (x = decode(encode(x)) + err, the error kept as one node). Every estimate answers
the same question as real activation patching here:

    effect(node) = m(steered) − m(steered run with that node set to its unsteered value)

* attribution patching: gradient × activation change, linearised at the **steered**
  point (at the unsteered point the gradient of ||Δ||² is zero, so that point tells
  nothing about the default metric);
* integrated gradients: the gradient averaged along the straight path from the
  unsteered to the steered activations of one *group* of nodes (the heads of a layer,
  an MLP, an SAE's features and error), with everything downstream recomputed. Its
  completeness: the attributions of a group sum to the effect of patching the whole
  group, up to the quadrature error of `steps` midpoints. For an SAE on the residual
  stream (a cut between source and target) that is the whole change m(steered) −
  m(unsteered).

Verification patches the top-N nodes one at a time (steered run, node ← unsteered) and
reports estimate against actual effect and their Pearson correlation. Attribution
patching is first-order in the node's change; with the quadratic default metric that
leaves an error of ||c||² (c: the node's own share of Δ) at *any* vector size, so use
integrated gradients for ||Δ||² and attribution patching for metrics linear in Δ.

The same machinery explains the difference between two models (`feature_change_attribution`):
a loss on their output difference is backpropagated into SAE features at one site of
model B, and each feature scores gradient × (its activation under B − under A).
"""

from __future__ import annotations

from melbo_lens.analysis.attribution.estimators import attribute_target_delta
from melbo_lens.analysis.attribution.exact import decompose_target_delta
from melbo_lens.analysis.attribution.metrics import logit_diff_metric
from melbo_lens.analysis.attribution.model_difference import (
    FeatureChange,
    feature_change_attribution,
)
from melbo_lens.analysis.attribution.results import (
    DeltaAttribution,
    DeltaDecomposition,
    GroupCompleteness,
    NodeAttribution,
)

__all__ = [
    "DeltaAttribution",
    "DeltaDecomposition",
    "FeatureChange",
    "GroupCompleteness",
    "NodeAttribution",
    "attribute_target_delta",
    "decompose_target_delta",
    "feature_change_attribution",
    "logit_diff_metric",
]
