"""The trainer, by concern: one loop (`loop`) for every trainable perturbation.

A method supplies a `Family` (`family`); the loop runs groups of its members
(`group`: parameters, constraints and a solver from `solvers`) on a schedule
(`schedule`: which members train together, for how many steps, and the multi-start
window), computes each step's objective and gradients (`step`), checks each step's
health (`health`) and writes and continues checkpoints (`resume`).
"""

from melbo_lens.methods.training.family import (
    Callback,
    Family,
    FamilyBase,
    Params,
    check_prompt_set,
    check_prompts_and_sites,
)
from melbo_lens.methods.training.health import TrainingError, check_finite
from melbo_lens.methods.training.loop import train
from melbo_lens.methods.training.resume import ResumeMismatch, config_differences
from melbo_lens.methods.training.spec import LoopSpec

__all__ = [
    "Callback",
    "Family",
    "FamilyBase",
    "LoopSpec",
    "Params",
    "ResumeMismatch",
    "TrainingError",
    "check_finite",
    "check_prompt_set",
    "check_prompts_and_sites",
    "config_differences",
    "train",
]
