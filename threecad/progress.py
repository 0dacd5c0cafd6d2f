"""Progress bars and logging set-up shared by the library and the CLI.

Bars are on only when stderr is a terminal and the user did not ask for quiet output, so logs
captured by CI or redirected to a file are not flooded with carriage returns.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_state = {"enabled": None}  # None: decide from the terminal


def set_progress(enabled: bool | None) -> None:
    """Force progress bars on or off (``None`` restores the terminal-based default)."""
    _state["enabled"] = enabled


def progress_enabled() -> bool:
    if _state["enabled"] is not None:
        return bool(_state["enabled"])
    return sys.stderr.isatty() and logging.getLogger("threecad").getEffectiveLevel() <= logging.INFO


def progress(iterable: Iterable[T], desc: str | None = None, total: int | None = None, **kwargs) -> Iterator[T]:
    """Wrap a long loop in a tqdm bar (silent when progress is disabled)."""
    return tqdm(iterable, desc=desc, total=total, disable=not progress_enabled(), leave=False, **kwargs)


def configure_logging(verbosity: int = 0) -> None:
    """-1 quiet (warnings only), 0 info, 1 debug. Idempotent."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    for name in ("threecad", "baselines", "cfrg", "leaderboard"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.propagate = False
