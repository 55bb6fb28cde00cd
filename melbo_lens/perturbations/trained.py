# pyright: strict
"""`Trained`: the artifacts the trainer makes (one per family), which the analyses, the
report and the views take as a whole (vectors, adapters, soft prompts)."""

from __future__ import annotations

from typing import TypeAlias

from melbo_lens.perturbations.adapters import SteeringAdapters
from melbo_lens.perturbations.soft_prompts import SoftPrompts
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = ["Trained"]

Trained: TypeAlias = SteeringVectors | SteeringAdapters | SoftPrompts
