"""Value checks used at every public boundary (one place for each)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["is_int", "is_positive"]


def is_int(value: Any, low: int) -> bool:
    """An int (not a bool) >= `low`.

    Examples:
        >>> is_int(3, 1), is_int(True, 0), is_int(2.0, 0)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_positive(value: Any) -> bool:
    """A finite real number (not a bool) > 0.

    Examples:
        >>> is_positive(0.5), is_positive(float("inf")), is_positive(0)
        (True, False, False)
    """
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf
