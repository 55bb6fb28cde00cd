# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""Progress lines: the one path by which long jobs (the defaults' choices, the radius
search, analyses, sweeps) report what they are doing.

A line goes to the `melbo_lens` logger (INFO) and, when the caller's `progress` is on,
to stderr through `tqdm.write`, so it never breaks a progress bar that is drawing.
Training steps use tqdm bars (`methods.training.loop`).

Examples:
    >>> say(False, "quiet: only the logger sees this")
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

__all__ = ["logger", "say"]

logger = logging.getLogger("melbo_lens")


def say(progress: bool, line: str) -> None:
    """Report `line`: to the `melbo_lens` logger, and to stderr when `progress` is on."""
    logger.info(line)
    if progress:
        tqdm.write(line, file=sys.stderr)
        sys.stderr.flush()
