"""Plotly figures of melbo_lens results: each a function from result objects to a Figure.

A figure here renders numbers that analysis code already computed; it computes nothing
beyond picking, ordering and formatting them (the largest features, a mean line). Every
figure has a title, axis titles and hover text that names what is under the cursor, so
it can be read without the code that made it:

* `training_curves`: the MELBO objective per step, one line per vector;
* `objective_vs_random`: each vector's objective against random vectors of the same norm;
* `radius_sweep`: objective (and diversity / fluency) against the radius R;
* `feature_heatmap`: vectors × SAE features, with each feature's top-activating tokens;
* `similarity_heatmap`: a `CosineMatrix` (of vectors or of their target deltas);
* `attribution_bars`: attribution estimates against patched effects, per node;
* `token_delta_heatmap`: ‖Δ_t‖ per vector and token, prompt / completion boundary marked;
* `fragility_figure`: a planted phrase's success rate against soft-prompt length / R.
"""

from __future__ import annotations

from melbo_lens.views.figures.attribution import attribution_bars
from melbo_lens.views.figures.features import feature_heatmap
from melbo_lens.views.figures.runs import (
    objective_vs_random,
    planted_benchmark,
    radius_sweep,
    training_curves,
)
from melbo_lens.views.figures.similarity import similarity_heatmap
from melbo_lens.views.figures.studies import fragility_figure
from melbo_lens.views.figures.tokens import token_delta_heatmap

__all__ = [
    "fragility_figure",
    "attribution_bars",
    "feature_heatmap",
    "objective_vs_random",
    "planted_benchmark",
    "radius_sweep",
    "similarity_heatmap",
    "token_delta_heatmap",
    "training_curves",
]
