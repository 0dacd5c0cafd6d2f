"""The one exception type for user errors.

The CLI turns a :class:`ThreecadError` into a single line on stderr and exit code 1, so every
message must name the file (or option) and the problem, and ideally what to do about it.
Programming errors stay ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations

from pathlib import Path


class ThreecadError(Exception):
    """A problem with the user's input, reported without a traceback."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)
