"""Finished units of a long run (a radius of a sweep, a cell of a grid) saved one by one.

A unit is its vectors (`NAME.safetensors`) and a JSON record (`NAME.json`), each written
atomically, the record last: a unit counts as finished only when both exist, so a run
killed mid-save redoes that unit and nothing else.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from melbo_lens.core.io import ArtifactError, atomic_write_text
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = ["json_safe", "load_unit", "save_unit"]


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float as None, so `json.dumps` writes valid JSON
    (a bare NaN is not JSON; pandas and json.loads read null back as missing)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def save_unit(
    directory: str | os.PathLike[str], name: str, vectors: SteeringVectors, record: Any
) -> None:
    """Save a finished unit: the vectors, then the record (which marks it finished)."""
    vectors.save(Path(directory) / f"{name}.safetensors")
    text = json.dumps(json_safe(record), allow_nan=False)
    atomic_write_text(Path(directory) / f"{name}.json", text)


def load_unit(directory: str | os.PathLike[str], name: str) -> tuple[Any, SteeringVectors] | None:
    """(record, vectors) of a finished unit, or None when it is not (fully) there."""
    record, vectors = Path(directory) / f"{name}.json", Path(directory) / f"{name}.safetensors"
    if not (record.is_file() and vectors.is_file()):
        return None
    redo = f"delete {record.name} and {vectors.name} in {record.parent} to redo it"
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{record} is not a saved record ({err}); {redo}") from None
    try:
        return data, SteeringVectors.load(vectors)
    except (ArtifactError, ValueError, OSError) as err:
        raise ValueError(f"{vectors} is damaged ({err}); {redo}") from None
