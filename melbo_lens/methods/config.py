"""Method configs are frozen dataclasses that round-trip through plain JSON.

`config_to_dict` and `config_from_dict` do that for any of them: hook sites become
`{"layer", "point"}` dicts, tuples become lists and back, and unknown keys are refused
so a config saved by another version or method fails loudly.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, TypeVar

from melbo_lens.core.sites import HookSite

__all__ = ["config_from_dict", "config_to_dict"]

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
