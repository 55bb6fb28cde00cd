"""melbo_lens: find, train and explain steering vectors on TransformerLens models.

The public API is listed in `__all__`; importing the package has no side effects and
does not import sae-lens, plotly or circuitsvis.
"""

from .artifacts import ArtifactError, SteeringVectors
from .generation import SteeredGenerations, generate_steered
from .methods.constraints import gram_schmidt, tangent_project, to_sphere
from .methods.melbo import (
    MelboConfig,
    TrainingError,
    TrainingState,
    scaled_lr,
    train_steering_vectors,
)
from .methods.objectives import cosine_penalty, melbo_objective, melbo_objective_per_prompt
from .prompts import PromptSet
from .segment import Segment
from .sites import HookSite
from .steering import steer

__version__ = "0.1.0"


def __getattr__(name: str):
    # The model zoo imports transformers; load it only when asked for.
    if name in ("load_model", "PACKAGED_MODELS"):
        from .models import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module 'melbo_lens' has no attribute {name!r}")


__all__ = [
    "ArtifactError",
    "HookSite",
    "MelboConfig",
    "PACKAGED_MODELS",
    "PromptSet",
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
