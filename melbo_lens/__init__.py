"""melbo_lens: find, train and explain steering vectors on TransformerLens models.

The public API is listed in `__all__`; importing the package has no side effects and
does not import sae-lens, plotly or circuitsvis.
"""

from .adapting import adapt
from .analysis.attribution import (
    DeltaAttribution,
    DeltaDecomposition,
    FeatureChange,
    attribute_target_delta,
    decompose_target_delta,
    feature_change_attribution,
    logit_diff_metric,
)
from .analysis.behaviors import BehaviorReport, BehaviorRule, classify_completions
from .analysis.diversity import Diversity, completion_diversity, fluency, repetition_score
from .analysis.similarity import (
    compare_vectors,
    cosine_matrix,
    delta_similarity,
    nearest_matches,
    principal_angles,
)
from .analysis.tokens import (
    TokenActivations,
    TokenDeltas,
    feature_token_activations,
    token_delta_norms,
    top_activating_tokens,
)
from .artifacts import ArtifactError, SteeringAdapters, SteeringVectors, load_artifact
from .generation import SteeredGenerations, generate_steered, generate_with_adapters
from .interventions import (
    ScaleSweep,
    ablate_direction,
    add_vectors,
    clamp_direction,
    mean_projection,
    orthogonalize_weights,
    scale_sweep,
    subtract_vectors,
)
from .methods.adapters import (
    AdapterConfig,
    AdapterTrainingState,
    adapter_lr,
    train_steering_adapters,
)
from .methods.baselines import hessian_vectors, jacobian_vectors, random_vectors
from .methods.constraints import gram_schmidt, tangent_project, to_sphere
from .methods.melbo import (
    MelboConfig,
    TrainingError,
    TrainingState,
    scaled_lr,
    train_steering_vectors,
)
from .methods.objectives import cosine_penalty, melbo_objective, melbo_objective_per_prompt
from .methods.radius import RadiusSweep, recommend_radius, select_radius
from .methods.supervised import (
    mean_difference_vectors,
    pca_vectors,
    probe_vectors,
    stability_curve,
)
from .prompts import PromptSet
from .runs import RunAnalysis, RunAnalysisError, analyze_run
from .segment import Segment
from .sites import HookSite
from .steering import steer

__version__ = "0.1.0"


# sae-lens is imported only when one of its names is asked for (analysis/sae.py).
_SAE_NAMES = {
    "FeatureComparison",
    "FeatureEffects",
    "SaeDecomposition",
    "clamp_feature",
    "compare_with_features",
    "decompose_onto_sae",
    "feature_effects",
    "feature_vectors",
    "load_sae",
    "sae_site",
}


def __getattr__(name: str):
    # The model zoo imports transformers; load it only when asked for.
    if name in ("load_model", "PACKAGED_MODELS"):
        from .models import zoo

        return getattr(zoo, name)
    if name in ("evaluate_planted", "PlantedReport"):
        # the benchmark loads the planted toy model (models/toy.py); import it on demand
        from . import evaluate

        return getattr(evaluate, name)
    if name in _SAE_NAMES:
        from .analysis import sae

        return getattr(sae, name)
    raise AttributeError(f"module 'melbo_lens' has no attribute {name!r}")


__all__ = [
    *sorted(_SAE_NAMES),
    "PlantedReport",
    "evaluate_planted",
    "DeltaAttribution",
    "DeltaDecomposition",
    "FeatureChange",
    "attribute_target_delta",
    "decompose_target_delta",
    "feature_change_attribution",
    "logit_diff_metric",
    "BehaviorReport",
    "BehaviorRule",
    "Diversity",
    "RadiusSweep",
    "classify_completions",
    "completion_diversity",
    "fluency",
    "recommend_radius",
    "repetition_score",
    "select_radius",
    "AdapterConfig",
    "AdapterTrainingState",
    "ArtifactError",
    "ScaleSweep",
    "SteeringAdapters",
    "ablate_direction",
    "adapt",
    "adapter_lr",
    "add_vectors",
    "clamp_direction",
    "compare_vectors",
    "TokenActivations",
    "TokenDeltas",
    "feature_token_activations",
    "token_delta_norms",
    "top_activating_tokens",
    "cosine_matrix",
    "delta_similarity",
    "generate_with_adapters",
    "hessian_vectors",
    "jacobian_vectors",
    "load_artifact",
    "mean_difference_vectors",
    "mean_projection",
    "nearest_matches",
    "orthogonalize_weights",
    "pca_vectors",
    "principal_angles",
    "probe_vectors",
    "random_vectors",
    "scale_sweep",
    "stability_curve",
    "subtract_vectors",
    "train_steering_adapters",
    "HookSite",
    "MelboConfig",
    "PACKAGED_MODELS",
    "PromptSet",
    "RunAnalysis",
    "RunAnalysisError",
    "analyze_run",
    "Segment",
    "SteeredGenerations",
    "SteeringVectors",
    "TrainingError",
    "TrainingState",
    "cosine_penalty",
    "generate_steered",
    "gram_schmidt",
    "load_model",
    "melbo_objective",
    "melbo_objective_per_prompt",
    "scaled_lr",
    "steer",
    "tangent_project",
    "to_sphere",
    "train_steering_vectors",
]
