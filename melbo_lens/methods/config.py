"""Method configs are frozen dataclasses that round-trip through plain JSON.

`config_to_dict` and `config_from_dict` do that for any of them: hook sites become
`{"layer", "point"}` dicts, tuples become lists and back, and unknown keys are refused
so a config saved by another version or method fails loudly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from typing import Any, TypeVar

from melbo_lens.core.checks import is_int, is_positive
from melbo_lens.core.sites import HookSite
from melbo_lens.methods.training.objective import OBJECTIVES

__all__ = [
    "AUTO_SLOT_STEPS",
    "AUTO_SLOT_TOL",
    "AUTO_STARTS",
    "AUTO_STEPS",
    "LoopConfig",
    "CONFIGS",
    "config_from_dict",
    "objective_settings",
    "register_config",
    "config_to_dict",
    "is_int",
    "is_positive",
]

T = TypeVar("T")


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass."""
    data = asdict(config)
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, HookSite):
            data[f.name] = value.to_dict()
        elif isinstance(value, tuple):
            data[f.name] = list(value)
    return data


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Inverse of `config_to_dict`; fails on keys the config does not have."""
    known = {f.name: str(f.type) for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    data = dict(data)
    for name, annotation in known.items():
        if name not in data:
            continue
        if annotation.startswith("HookSite") and isinstance(data[name], dict):
            data[name] = HookSite.from_dict(data[name])
        elif annotation.startswith("tuple") and isinstance(data[name], list):
            data[name] = tuple(data[name])
    return cls(**data)


C = TypeVar("C", bound="LoopConfig")

# method name recorded in an artifact -> the config class that trained it (filled by
# `register_config` where each trainable config is defined); keyed by type, as SAELens's
# `get_sae_class`, so a saved config is read back by its own class
CONFIGS: dict[str, type] = {}
# the objective's exponents for an artifact not trained by a registered method (a random
# or supervised vector): MELBO's defaults, which is what its objective means elsewhere
DEFAULT_POWER, DEFAULT_Q = 2.0, 1.0


def register_config(method: str) -> Any:
    """Class decorator: artifacts with `method` were trained with this config class."""

    def wrap(cls: type[T]) -> type[T]:
        CONFIGS[method] = cls
        return cls

    return wrap


def objective_settings(method: str, config: dict[str, Any] | None) -> tuple[float, float]:
    """(power, q) of the objective an artifact was trained with, read by its config
    class; MELBO's defaults for an artifact no registered method trained.

    Examples:
        >>> objective_settings("random", {})
        (2.0, 1.0)
    """
    cls = CONFIGS.get(method)
    if cls is None or not config:
        return DEFAULT_POWER, DEFAULT_Q
    parsed = cls.from_dict(config)  # type: ignore[attr-defined]
    return float(parsed.power), float(parsed.q)


# What steps="auto" and slot_steps="auto" stand for, per solver (see docs/concepts/speed.md,
# benchmark: the power step reaches AMSGrad's 300-step objective in a few steps).
AUTO_STARTS = 8  # starts per sequential vector (starts_per_vector="auto")
AUTO_STEPS = {"amsgrad": 300, "power": 40}
AUTO_SLOT_STEPS = {"amsgrad": 60, "power": 10}
# What slot_tol="auto" stands for: a window slot ends once its best candidate's objective
# rose by at most this fraction over 2 steps (`training.spec.plateaued`). The power step
# converges in a few steps (bench (d)); AMSGrad's small steps would read as a plateau.
AUTO_SLOT_TOL = {"amsgrad": 0.0, "power": 1e-3}


class LoopConfig:
    """What every config the trainer runs shares (a mixin for frozen dataclasses with the
    fields radius, power, q, steps, lr, orthogonal, solver, betas, soft_on, amsgrad): the
    JSON round trip, the checks of those fields, and the optimiser rule."""

    lr_bound = "the radius"  # what bounds an absolute lr, in words (see `lr_max`)

    @property
    def starts(self) -> int:
        """Candidate starts per sequential slot (1: one start per member)."""
        return 1

    @property
    def windowed(self) -> bool:
        """Sequential slots filled from a window of candidate starts."""
        c: Any = self
        return c.orthogonal == "sequential" and self.starts > 1

    def loop_solver(self) -> str:
        """The solver `solver="auto"` stands for: the safeguarded power step when a window
        of starts fills sequential slots (each slot is a greedy maximisation, where the
        power step's speed is the point and the window supplies the multi-start),
        AMSGrad otherwise (its slow path keeps independent starts apart)."""
        c: Any = self
        if c.solver != "auto":
            return c.solver
        return "power" if self.windowed else "amsgrad"

    def loop_steps(self) -> int:
        """The steps `steps="auto"` stands for: `AUTO_STEPS[solver]`."""
        c: Any = self
        return AUTO_STEPS[self.loop_solver()] if c.steps == "auto" else int(c.steps)

    def loop_slot_steps(self) -> int:
        """The steps between later slots of a window (`slot_steps="auto"`: `AUTO_SLOT_STEPS`
        of the solver, at most `steps`)."""
        c: Any = self
        value = getattr(c, "slot_steps", "auto")
        if value != "auto":
            return int(value)
        return min(AUTO_SLOT_STEPS[self.loop_solver()], self.loop_steps())

    def loop_slot_tol(self) -> float:
        """The relative tolerance that ends a window's slot early (`slot_tol="auto"`:
        `AUTO_SLOT_TOL` of the solver; 0 without a window)."""
        c: Any = self
        value = getattr(c, "slot_tol", "auto")
        if not self.windowed:
            return 0.0
        return AUTO_SLOT_TOL[self.loop_solver()] if value == "auto" else float(value)

    def lr_max(self) -> float:
        """The largest absolute lr that is not a jump across the constraint set: the
        radius for a vector on the sphere of radius R."""
        radius = getattr(self, "radius", 1.0)
        return float(radius) if is_positive(radius) else math.inf

    def loop_problems(self) -> list[str]:
        """Every problem with the shared fields, each naming the field and the value."""
        return _loop_problems(self)  # the dataclass mixing this in declares the fields

    def window_problems(self, field: str) -> list[str]:
        """Problems with the candidate window's fields (`field`: its per-method name)."""
        c: Any = self
        problems = []
        value = getattr(c, field)
        if value == "auto":
            pass
        elif not is_int(value, 1):
            problems.append(f"{field} must be 'auto' or an int >= 1, got {value!r}")
        elif getattr(c, field) > 1 and c.orthogonal != "sequential":
            problems.append(
                f"{field}={getattr(c, field)} needs orthogonal='sequential' (the window fills "
                f"sequential slots), got orthogonal={c.orthogonal!r}; use {field}=1"
            )
        if not (c.slot_steps == "auto" or is_int(c.slot_steps, 1)):
            problems.append(f"slot_steps must be 'auto' or an int >= 1, got {c.slot_steps!r}")
        tol = c.slot_tol
        if not (
            tol == "auto"
            or (is_positive(tol) and tol < 1)
            or (tol == 0 and not isinstance(tol, bool))
        ):
            problems.append(
                f"slot_tol must be 'auto' or a number in [0, 1) (0: every slot runs its "
                f"steps), got {tol!r}"
            )
        elif tol not in ("auto", 0) and not self.windowed:
            problems.append(
                f"slot_tol={tol!r} ends a window's slot early, and this run has no window "
                f"({field}={value!r}, orthogonal={c.orthogonal!r}); use slot_tol='auto' or a "
                f"window ({field} > 1 with orthogonal='sequential')"
            )
        return problems

    @property
    def uses_amsgrad(self) -> bool:
        """AMSGrad (the source's choice) unless `simultaneous`, where plain Adam is used.

        Under simultaneous Gram–Schmidt, member k first climbs towards directions that
        earlier members later claim; AMSGrad's running max of squared gradients then keeps
        its step tiny for the rest of the run, while Adam's β₂ = 0.98 forgets in ~50 steps.
        """
        c: Any = self
        return c.orthogonal != "simultaneous" if c.amsgrad is None else bool(c.amsgrad)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        return config_from_dict(cls, data)


def _loop_problems(config: Any) -> list[str]:
    """See `LoopConfig.loop_problems`."""
    problems = []
    r = config.radius
    if getattr(config, "auto_radius", False):
        if not (r == "auto" or is_positive(r)):
            problems.append(f"radius must be 'auto' or a finite number > 0, got {r!r}")
    elif not is_positive(r):
        problems.append(f"radius must be a finite number > 0, got {r!r}")
    for name in ("power", "q"):
        if not is_positive(getattr(config, name)):
            problems.append(f"{name} must be a finite number > 0, got {getattr(config, name)!r}")
    if not (config.steps == "auto" or is_int(config.steps, 0)):
        problems.append(f"steps must be 'auto' or an int >= 0, got {config.steps!r}")
    lr, lr_max = config.lr, config.lr_max()
    if lr != "auto" and not (is_positive(lr) and lr <= lr_max):
        problems.append(
            f"lr must be 'auto' or a number in (0, {lr_max:g}], got {lr!r}: AMSGrad moves every "
            f"coordinate by about lr per step, so an lr above {lr_max:g} ({config.lr_bound}) "
            "jumps across the whole constraint set"
        )
    seed = getattr(config, "seed", 0)
    if not (is_int(seed, 0) and seed < 2**32):
        problems.append(f"seed must be an int in [0, 2**32), got {seed!r}")
    if config.orthogonal not in ("sequential", "simultaneous", "soft", "none"):
        problems.append(
            f"orthogonal must be 'sequential', 'simultaneous', 'soft' or 'none', "
            f"got {config.orthogonal!r}"
        )
    if config.solver not in ("auto", "amsgrad", "power"):
        problems.append(f"solver must be 'auto', 'amsgrad' or 'power', got {config.solver!r}")
    objective = getattr(config, "objective", "melbo")
    if objective not in OBJECTIVES:
        problems.append(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    weight = getattr(config, "consistency_weight", 1.0)
    if not is_positive(weight):
        problems.append(f"consistency_weight must be a finite number > 0, got {weight!r}")
    if config.soft_on not in ("vectors", "deltas"):
        problems.append(f"soft_on must be 'vectors' or 'deltas', got {config.soft_on!r}")
    if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
        problems.append(f"betas must be two numbers in [0, 1), got {config.betas!r}")
    return problems
