# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""Value checks used at every public boundary (one place for each)."""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["is_int", "is_positive", "one_line"]


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


def one_line(err: BaseException) -> str:
    """An error as one readable line: its type and message, whitespace collapsed and
    terminal colour codes removed (as Ray adds to errors from workers).

    Examples:
        >>> one_line(ValueError("bad\\n  radius \\x1b[31mR\\x1b[0m"))
        'ValueError: bad radius R'
    """
    text = " ".join(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(err)).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
