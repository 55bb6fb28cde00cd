"""Checkpoint and resume: a run continues from an artifact of the same config, prompts
and model, bit-exactly (the parameters, the training record and the state of the group
in flight); a finished run is returned as saved; anything else is refused, naming what
differs."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

import torch
from torch import Tensor

from melbo_lens.core.prompts import PromptSet
from melbo_lens.methods.training.family import Family, Params

__all__ = [
    "ResumeMismatch",
    "check_resumable",
    "config_differences",
    "finished",
    "prompt_differences",
    "start_record",
]


class ResumeMismatch(ValueError):
    """A run cannot resume from a checkpoint written with other settings.

    `differing` maps each config field that differs to (saved value, this run's value).
    """

    def __init__(self, differing: dict[str, tuple[Any, Any]], config_name: str) -> None:
        self.differing = differing
        listed = ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in differing.items())
        super().__init__(
            f"cannot resume: the saved run's config differs in {listed}; continue it with "
            f"{config_name}.from_dict(saved.config), or start a new run elsewhere"
        )


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ between two config dicts (missing = None).

    Examples:
        >>> config_differences({"radius": 4.0, "seed": 0}, {"radius": 8.0, "seed": 0})
        {'radius': (4.0, 8.0)}
    """
    keys = list(now) + [k for k in saved if k not in now]
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def _shown(prompts: dict[str, Any]) -> Any:
    return prompts.get("texts") or f"{len(prompts.get('tokens') or [])} token lists"


def prompt_differences(saved: dict[str, Any] | None, prompts: PromptSet) -> dict[str, tuple]:
    """What differs between the prompts a run was saved with and this run's: their text
    (or tokens), else their target positions (after the automatic outlier rule)."""
    if not saved:
        return {}
    now = prompts.to_dict()
    if saved.get("tokens") != now["tokens"]:
        return {"prompts": (_shown(saved), _shown(now))}
    if saved.get("targets") != now["targets"]:
        return {"target_positions": (saved.get("targets"), now["targets"])}
    return {}


def check_resumable(family: Family, prior: Any) -> None:
    """Refuse to continue a run saved with another config, prompts or model. A field the
    saved config lacks (added to the config since) counts as its default."""
    config = family.config
    defaults = {
        f.name: getattr(config, f.name)
        for f in fields(config)
        if f.default is not MISSING and getattr(config, f.name) == f.default
    }
    saved = {**{k: v for k, v in defaults.items() if k not in prior.config}, **prior.config}
    differing = config_differences(saved, config.to_dict())
    differing.update(prompt_differences(prior.prompts, family.prompts))
    if prior.model_name and family.model_name and prior.model_name != family.model_name:
        differing["model"] = (prior.model_name, family.model_name)
    if differing:
        raise ResumeMismatch(differing, type(family.config).__name__)


def finished(prior: Any) -> bool:
    """Whether the run being resumed already finished (nothing to redo)."""
    done = prior.objective is not None and bool(torch.isfinite(prior.objective).all())
    return done and not prior.metadata.get("interrupted")


def start_record(
    family: Family, n: int, steps: int, device: torch.device, store: Params, prior: Any | None
) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """A fresh training record (`steps` columns), or the record, group state and elapsed
    seconds of the resumed run `prior` (checked by `check_resumable`; its parameters go
    into `store`)."""
    record = {
        "losses": torch.full((n, steps), float("nan"), dtype=torch.float32, device=device),
        "objective": torch.full((n,), float("nan"), dtype=torch.float32, device=device),
        "steps_done": torch.zeros(n, dtype=torch.long),
    }
    if prior is None:
        return record, {}, 0.0
    for name, value in family.params_of(prior).items():
        store[name].copy_(value)
    for name in record:
        if getattr(prior, name) is not None:
            record[name].copy_(getattr(prior, name))
    return record, dict(prior.resume_state), float(prior.metadata.get("train_seconds", 0.0))
