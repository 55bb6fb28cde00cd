# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""An artifact is a perturbation together with everything needed to trust and reuse it.

Steering vectors and adapters are lists of members (one row per vector or adapter) that
carry where and how they were made: the target site, the method and its config, the
model name, the prompts, the objective per training step and at the end, and the state
needed to resume training. `ArtifactRows` gives them list-like indexing and slicing and the
shared save/load of that provenance; each class writes one safetensors file whose
metadata carries the rest as JSON, tagged with a format name. `load_artifact` reads any
of them by looking the format up in a registry (never by parsing error text), and never
unpickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from melbo_lens.core.io import ArtifactError, atomic_save_tensors, read_metadata
from melbo_lens.core.sites import HookSite

__all__ = ["ArtifactError", "describe_artifact", "load_artifact", "register_format"]

_RESUME = "resume."


_TRAINING = ("losses", "objective", "steps_done")


class ArtifactRows:
    """List-like behaviour shared by artifacts with one row per item.

    `_ITEMS` names the tensors whose first axis is the item axis; the training record
    (`losses`, `objective`, `steps_done`) and resume state ride along.
    """

    _ITEMS: tuple[str, ...] = ()
    _NOUN = "item"

    def _check_rows(self) -> None:
        n = len(self)
        for name in (*self._ITEMS, *_TRAINING):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(
                    f"{name} has {value.shape[0]} rows but there are {n} {self._NOUN}s"
                )

    def __len__(self) -> int:
        return getattr(self, self._ITEMS[0]).shape[0]

    def __getitem__(self, index: int | slice | Sequence[int]) -> Any:
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(
                    f"{self._NOUN} index {index} out of range for {len(self)} {self._NOUN}s"
                )
            index = [index]
        idx = torch.arange(len(self))[index]
        picked = {
            name: getattr(self, name)[idx]
            for name in (*self._ITEMS, *_TRAINING)
            if getattr(self, name) is not None
        }
        return replace(self, **picked, resume_state={})  # type: ignore[type-var]

    def record(self, name: str) -> Tensor:
        """The training record `name` (`losses`, `objective` or `steps_done`); a clear
        error for an artifact that was not trained (random, supervised, hand-made).

        Examples:
            >>> SteeringVectors(torch.eye(2), HookSite(0)).record("objective")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: this artifact has no objective record ...
        """
        value = getattr(self, name, None)
        if name not in _TRAINING:
            raise ValueError(f"no training record {name!r}; choose one of {_TRAINING}")
        if value is None:
            raise ValueError(
                f"this artifact has no {name} record (method {getattr(self, 'method', '?')!r} "
                "was not trained here); train it with train_steering_vectors / "
                "train_steering_adapters"
            )
        return value

    @property
    def complete(self) -> bool:
        """False when training was interrupted before every item finished.

        The trainer writes a member's final objective when its phase ends, at its step
        limit or, in a window with `slot_tol` > 0, when its slot plateaus (then fewer
        steps are a finished member)."""
        metadata = getattr(self, "metadata", None) or {}
        if metadata.get("interrupted"):
            return False
        objective = getattr(self, "objective", None)
        if objective is not None and not bool(torch.isfinite(objective).all()):
            return False
        steps_done = getattr(self, "steps_done", None)
        if steps_done is None or metadata.get("slot_tol"):
            return True
        return bool((steps_done >= _required_steps(self, len(steps_done))).all())

    def _tensors(self) -> dict[str, Tensor]:
        """Everything `save` writes as tensors."""
        tensors = {
            name: getattr(self, name)
            for name in (*self._ITEMS, *_TRAINING)
            if getattr(self, name) is not None
        }
        for key, value in getattr(self, "resume_state", {}).items():
            tensors[_RESUME + key] = value
        return tensors

    def _save(self, path: str | os.PathLike[str], fmt: str, info: dict[str, Any]) -> Path:
        """Atomic safetensors file: the tensors, and `info` + provenance as JSON."""
        info = {
            **info,
            "target": None if self.target is None else self.target.to_dict(),  # type: ignore[attr-defined]
            **{k: getattr(self, k) for k in _PROVENANCE},
        }
        meta = {"format": fmt, "json": json.dumps(info, default=_jsonable)}
        return atomic_save_tensors(self._tensors(), path, meta)


_PROVENANCE = ("method", "config", "model_name", "prompts", "metadata")


def loaded_fields(
    path: Any, info: dict[str, Any], tensors: dict[str, Tensor], default_method: str
) -> dict[str, Any]:
    """The constructor arguments every artifact shares, read back from a file."""
    try:
        target = None if info.get("target") is None else HookSite.from_dict(info["target"])
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{path} has corrupt target metadata: {err!r}") from err
    if not isinstance(info, dict):
        raise ArtifactError(f"{path} has corrupt metadata: expected a JSON object")
    for name, value in tensors.items():
        is_item = name not in _TRAINING and not name.startswith(_RESUME)
        if is_item and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ArtifactError(f"{path} holds NaN/inf in {name!r}; the file cannot be used")
    expected = {
        "method": (str,),
        "config": (dict,),
        "model_name": (str, type(None)),
        "prompts": (dict, type(None)),
        "metadata": (dict,),
    }
    for name, types in expected.items():
        if name in info and not isinstance(info[name], types):
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ArtifactError(
                f"{path} has corrupt metadata: {name!r} must be {kinds}, got "
                f"{type(info[name]).__name__} {info[name]!r:.60}; was the file edited by hand?"
            )
    return {
        "target": target,
        "method": info.get("method", default_method),
        "config": info.get("config", {}),
        "model_name": info.get("model_name"),
        "prompts": info.get("prompts"),
        "metadata": info.get("metadata", {}),
        **{name: tensors.get(name) for name in _TRAINING},
        "resume_state": {k[len(_RESUME) :]: v for k, v in tensors.items() if k.startswith(_RESUME)},
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, HookSite):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, slice):
        return {"slice": [value.start, value.stop, value.step]}
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in artifact metadata")


_FORMATS: dict[str, Any] = {}
T = TypeVar("T")


def register_format(fmt: str) -> Callable[[T], T]:
    """Class decorator: `load_artifact` reads files tagged `fmt` with `cls.load`."""

    def register(cls: T) -> T:
        _FORMATS[fmt] = cls
        return cls

    return register


def file_format(path: str | os.PathLike[str]) -> str | None:
    """The melbo_lens format tag in a safetensors file's metadata (None if absent)."""
    return read_metadata(path).get("format")


def describe_artifact(path: str | os.PathLike[str]) -> tuple[str, bool]:
    """(a one-line description of what `path` holds, whether it is a finished result)."""
    try:
        art = load_artifact(path)
    except (ArtifactError, ValueError, OSError) as err:
        return f"a file that is not a readable melbo_lens artifact ({err})", True
    method = getattr(art, "method", "?")
    noun = getattr(art, "_NOUN", "item")
    steps_done = getattr(art, "steps_done", None)
    if steps_done is None:
        return f"a {method} result ({len(art)} {noun}s)", True
    steps = _steps(art)
    finished = int((steps_done >= _required_steps(art, len(steps_done))).sum())
    if art.complete:
        return f"a finished {method} run ({len(art)} {noun}s x {steps} steps)", True
    return (
        f"an interrupted {method} run ({finished} of {len(art)} {noun}s finished, "
        f"{int(steps_done.sum())} steps done)",
        False,
    )


def _steps(art: Any) -> int:
    """Steps of the first member as run (`steps="auto"` is resolved into metadata)."""
    steps = getattr(art, "metadata", {}).get("steps", getattr(art, "config", {}).get("steps"))
    return int(steps) if isinstance(steps, int | float) else 0


def _required_steps(art: Any, n: int) -> Tensor:
    """Steps each member needs to be finished: `steps`, or with a window of starts
    `steps` for the first and `slot_steps` for the others."""
    steps = torch.full((n,), _steps(art), dtype=torch.long)
    slot_steps = getattr(art, "metadata", {}).get("slot_steps")
    if slot_steps is not None and n > 1:
        steps[1:] = int(slot_steps)
    return steps


def load_artifact(path: str | os.PathLike[str]) -> Any:
    """Load whichever melbo_lens artifact `path` holds (vectors, adapters, ...), chosen by
    the format tag in its metadata. Never unpickles.

    Args:
        path: a `.safetensors` file written by a melbo_lens artifact's `save`.

    Returns:
        The artifact: `SteeringVectors`, `SteeringAdapters`, `SoftPrompts`, ...

    Raises:
        ArtifactError: a file that is not a melbo_lens artifact, or a broken one.

    Examples:
        >>> import os, tempfile
        >>> path = adapters.save(os.path.join(tempfile.mkdtemp(), "adapters.safetensors"))
        >>> isinstance(load_artifact(path), SteeringAdapters)
        True
    """
    import melbo_lens.perturbations  # noqa: F401  # pyright: ignore[reportUnusedImport]  (registers every artifact class)

    fmt = file_format(path)
    if fmt not in _FORMATS:
        raise ArtifactError(
            f"{path} is a safetensors file but not a melbo_lens artifact (format {fmt!r}; "
            f"known: {sorted(_FORMATS)}); was it written by another tool?"
        )
    return _FORMATS[fmt].load(path)
