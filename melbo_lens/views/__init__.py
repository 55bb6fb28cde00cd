"""Views render melbo_lens results; they compute nothing of their own.

`figures` turns result objects (`SteeringVectors`, `CosineMatrix`, `SaeDecomposition`,
`DeltaAttribution`, `TokenDeltas`) into Plotly figures; `tokens` shows per-token data
(`TokenDeltas`, `TokenActivations`) as circuitsvis token views that work offline and
many to a page. plotly and circuitsvis are imported here and nowhere else in melbo_lens,
so `import melbo_lens` never loads them; `import melbo_lens.views` does.
"""

from melbo_lens.views.figures import (
    attribution_bars,
    feature_heatmap,
    objective_vs_random,
    planted_benchmark,
    radius_sweep,
    similarity_heatmap,
    token_delta_heatmap,
    training_curves,
)
from melbo_lens.views.tokens import (
    TokenView,
    bundle_script,
    feature_activation_view,
    html_fragment,
    strip_bundle,
    token_delta_view,
)

__all__ = [
    "TokenView",
    "attribution_bars",
    "bundle_script",
    "feature_activation_view",
    "feature_heatmap",
    "html_fragment",
    "objective_vs_random",
    "planted_benchmark",
    "radius_sweep",
    "similarity_heatmap",
    "strip_bundle",
    "token_delta_heatmap",
    "token_delta_view",
    "training_curves",
]
