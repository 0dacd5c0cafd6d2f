"""The one exception type for user errors.

The CLI turns a :class:`ThreecadError` into a single line on stderr and exit code 1, so every
message must name the file (or option) and the problem, and ideally what to do about it.
Programming errors stay ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def shorten(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters with its full length noted: a hostile name or label can
    be megabytes long, and an error or report row must stay one readable line."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class ThreecadError(Exception):
    """A problem with the user's input, reported without a traceback."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


@contextmanager
def located(path: str | Path) -> Iterator[None]:
    """Name ``path`` in a :class:`ThreecadError` raised without one inside the block.

    Methods check their own tensors and options without knowing which run folder or weights file
    they came from; the caller that read the file wraps the call, so the one-line error still
    names it. An error that already names a file keeps it.
    """
    try:
        yield
    except ThreecadError as exc:
        if exc.path is not None:
            raise
        raise ThreecadError(str(exc), path) from None
