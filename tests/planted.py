"""The planted-direction model of `melbo_lens.models.planted`, under the tests' old name."""

from __future__ import annotations

from melbo_lens.models.planted import planted_direction_model as planted_model

__all__ = ["planted_model"]
