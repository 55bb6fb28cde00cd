"""Finished units of a long run (a radius of a sweep, a cell of a grid) saved one by one.

A unit is its vectors (`NAME.safetensors`) and a JSON record (`NAME.json`), each written
atomically, the record last: a unit counts as finished only when both exist, so a run
killed mid-save redoes that unit and nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from melbo_lens.core.io import atomic_write_text
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = ["load_unit", "save_unit"]


def save_unit(
    directory: str | os.PathLike[str], name: str, vectors: SteeringVectors, record: Any
) -> None:
    """Save a finished unit: the vectors, then the record (which marks it finished)."""
    vectors.save(Path(directory) / f"{name}.safetensors")
    atomic_write_text(Path(directory) / f"{name}.json", json.dumps(record))


def load_unit(directory: str | os.PathLike[str], name: str) -> tuple[Any, SteeringVectors] | None:
    """(record, vectors) of a finished unit, or None when it is not (fully) there."""
    record, vectors = Path(directory) / f"{name}.json", Path(directory) / f"{name}.safetensors"
    if not (record.is_file() and vectors.is_file()):
        return None
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{record} is not a saved record ({err}); delete it to redo it") from err
    return data, SteeringVectors.load(vectors)
