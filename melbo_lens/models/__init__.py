"""Models to run melbo_lens on: real models that load offline, and toy models."""

from melbo_lens.models.zoo import PACKAGED_MODELS, load_model

__all__ = ["PACKAGED_MODELS", "load_model"]
