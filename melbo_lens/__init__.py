"""melbo_lens: find, train and explain steering vectors on TransformerLens models.

The public API is listed in `__all__`; importing the package has no side effects and
does not import sae-lens, plotly or circuitsvis.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("melbo-lens")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from melbo_lens.analysis.attribution import (
    DeltaAttribution,
    DeltaDecomposition,
    FeatureChange,
    attribute_target_delta,
    decompose_target_delta,
    feature_change_attribution,
    logit_diff_metric,
)
from melbo_lens.analysis.behaviors import BehaviorReport, BehaviorRule, classify_completions
from melbo_lens.analysis.cards import PerturbationCard, vector_cards
from melbo_lens.analysis.corpus import Corpus, load_corpus
from melbo_lens.analysis.deltas import perturbation_objectives, perturbation_targets
from melbo_lens.analysis.diversity import (
    Diversity,
    completion_diversity,
    fluency,
    repetition_score,
)
from melbo_lens.analysis.similarity import (
    compare_vectors,
    cosine_matrix,
    delta_similarity,
    nearest_matches,
    principal_angles,
)
from melbo_lens.analysis.tokens import (
    TokenActivations,
    TokenDeltas,
    feature_token_activations,
    token_delta_norms,
    top_activating_tokens,
)
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.core.sites import HookSite
from melbo_lens.generation import (
    SteeredGenerations,
    generate,
    generate_steered,
    generate_with_adapters,
)
from melbo_lens.methods.adapters import (
    AdapterConfig,
    AdapterTrainingState,
    adapter_lr,
    train_steering_adapters,
)
from melbo_lens.methods.baselines import (
    hessian_vectors,
    jacobian_vectors,
    random_adapters,
    random_vectors,
)
from melbo_lens.methods.constraints import gram_schmidt, tangent_project, to_sphere
from melbo_lens.methods.defaults import default_sites
from melbo_lens.methods.melbo import (
    MelboConfig,
    TrainingError,
    TrainingState,
    scaled_lr,
    train_steering_vectors,
)
from melbo_lens.methods.objectives import (
    cosine_penalty,
    melbo_objective,
    melbo_objective_per_prompt,
)
from melbo_lens.methods.radius import RadiusChoice, recommend_radius
from melbo_lens.methods.supervised import (
    mean_difference_vectors,
    pca_vectors,
    probe_vectors,
    stability_curve,
)
from melbo_lens.perturbations.adapters import SteeringAdapters, adapt
from melbo_lens.perturbations.arithmetic import (
    ScaleSweep,
    add_vectors,
    scale_sweep,
    subtract_vectors,
)
from melbo_lens.perturbations.artifact import ArtifactError, load_artifact
from melbo_lens.perturbations.base import Perturbation, apply
from melbo_lens.perturbations.directional import (
    DirectionEdit,
    ablate_direction,
    clamp_direction,
    mean_projection,
)
from melbo_lens.perturbations.interop import (
    export_control_vector,
    from_steering_vector,
    import_control_vector,
    to_steering_vector,
)
from melbo_lens.perturbations.layer_vectors import LayerVectors
from melbo_lens.perturbations.orthogonalize import orthogonalize_weights
from melbo_lens.perturbations.vectors import SteeringVectors, steer
from melbo_lens.workflows.radius import RadiusSweep, select_radius
from melbo_lens.workflows.runs import RunAnalysis, RunAnalysisError, analyze_run

if TYPE_CHECKING:
    # The lazily loaded names below (`__getattr__`), seen statically: by type checkers and
    # by the API reference (mkdocstrings reads the source, not the running module).
    # (`name as name` marks a re-export: ruff cannot read the computed __all__ below.)
    from melbo_lens.analysis.corpus_build import (
        build_corpus as build_corpus,
    )
    from melbo_lens.analysis.sae.clamps import (
        FeatureClamp as FeatureClamp,
    )
    from melbo_lens.analysis.sae.clamps import (
        clamp_feature as clamp_feature,
    )
    from melbo_lens.analysis.sae.comparison import (
        FeatureComparison as FeatureComparison,
    )
    from melbo_lens.analysis.sae.comparison import (
        compare_with_features as compare_with_features,
    )
    from melbo_lens.analysis.sae.dashboard_finish import (
        logit_effects as logit_effects,
    )
    from melbo_lens.analysis.sae.dashboard_result import (
        FeatureDashboards as FeatureDashboards,
    )
    from melbo_lens.analysis.sae.dashboards import (
        feature_dashboards as feature_dashboards,
    )
    from melbo_lens.analysis.sae.decompose import (
        SaeDecomposition as SaeDecomposition,
    )
    from melbo_lens.analysis.sae.decompose import (
        decompose_onto_sae as decompose_onto_sae,
    )
    from melbo_lens.analysis.sae.features import (
        FeatureEffects as FeatureEffects,
    )
    from melbo_lens.analysis.sae.features import (
        feature_effects as feature_effects,
    )
    from melbo_lens.analysis.sae.features import (
        feature_vectors as feature_vectors,
    )
    from melbo_lens.analysis.sae.loading import (
        load_sae as load_sae,
    )
    from melbo_lens.analysis.sae.loading import (
        packaged_sae_dir as packaged_sae_dir,
    )
    from melbo_lens.analysis.sae.loading import (
        sae_site as sae_site,
    )
    from melbo_lens.models.zoo import (
        PACKAGED_MODELS as PACKAGED_MODELS,
    )
    from melbo_lens.models.zoo import (
        load_model as load_model,
    )
    from melbo_lens.workflows.dashboards import (
        sharded_dashboards as sharded_dashboards,
    )
    from melbo_lens.workflows.planted import (
        PlantedReport as PlantedReport,
    )
    from melbo_lens.workflows.planted import (
        evaluate_planted as evaluate_planted,
    )

__version__ = "0.1.0"
"""The package version (the docs site shows it in its title)."""


# sae-lens is imported only when one of its names is asked for (analysis/sae.py).
_SAE_NAMES = {
    "FeatureClamp",
    "FeatureComparison",
    "FeatureEffects",
    "SaeDecomposition",
    "clamp_feature",
    "compare_with_features",
    "decompose_onto_sae",
    "feature_effects",
    "feature_vectors",
    "load_sae",
    "packaged_sae_dir",
    "sae_site",
    "FeatureDashboards",
    "feature_dashboards",
    "logit_effects",
}


def __getattr__(name: str):
    # The model zoo imports transformers; load it only when asked for.
    if name in ("load_model", "PACKAGED_MODELS"):
        from melbo_lens.models import zoo

        return getattr(zoo, name)
    if name in ("evaluate_planted", "PlantedReport"):
        # the benchmark loads the planted toy model (models/toy.py); import it on demand
        from melbo_lens.workflows import planted as evaluate

        return getattr(evaluate, name)
    if name in _SAE_NAMES:
        from melbo_lens.analysis import sae
        from melbo_lens.analysis.sae import dashboard_result, dashboards

        for module in (sae, dashboards, dashboard_result):
            if hasattr(module, name):
                return getattr(module, name)
    if name in ("build_corpus", "sharded_dashboards"):
        from melbo_lens.analysis import corpus_build
        from melbo_lens.workflows import dashboards as sharded

        return getattr(corpus_build if name == "build_corpus" else sharded, name)
    raise AttributeError(f"module 'melbo_lens' has no attribute {name!r}")


__all__ = [
    "LayerVectors",
    "export_control_vector",
    "from_steering_vector",
    "import_control_vector",
    "to_steering_vector",
    "__version__",
    "Perturbation",
    "apply",
    "generate",
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
    "Corpus",
    "PerturbationCard",
    "build_corpus",
    "load_corpus",
    "sharded_dashboards",
    "vector_cards",
    "Diversity",
    "RadiusSweep",
    "classify_completions",
    "completion_diversity",
    "fluency",
    "recommend_radius",
    "RadiusChoice",
    "default_sites",
    "repetition_score",
    "select_radius",
    "AdapterConfig",
    "AdapterTrainingState",
    "ArtifactError",
    "ScaleSweep",
    "SteeringAdapters",
    "DirectionEdit",
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
    "random_adapters",
    "perturbation_objectives",
    "perturbation_targets",
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
