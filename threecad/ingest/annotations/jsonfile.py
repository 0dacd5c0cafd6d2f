"""The one bounded reader for annotation files (LabelMe, COCO, JSON label maps).

Annotation files come from annotation tools, other teams and downloads, so they are foreign
input: a 10 GB file or ``[[[[...]]]]`` nested 100,000 deep must end in a one-line error naming
the file, not in a memory blow-up or a bare ``RecursionError``. Limits:

* :data:`MAX_JSON_BYTES` = 256 MiB per file (checked on the file size before reading; the full
  3CAD annotation set is far smaller, and parsing costs about ten times the file size in memory);
* :data:`MAX_JSON_DEPTH` = 32 levels of nested lists/objects (COCO and LabelMe need 5).

Python's own limits are reported the same way: nesting past the interpreter's recursion limit and
integers of more than 4,300 digits both become the error naming the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from threecad.errors import ThreecadError

#: Largest annotation file read, in bytes (256 MiB).
MAX_JSON_BYTES = 256 * 2**20
#: Deepest nesting of lists and objects accepted (32 levels).
MAX_JSON_DEPTH = 32


def read_text_bounded(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path``, refused above :data:`MAX_JSON_BYTES` before anything is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ThreecadError(f"{what} is {size:,} bytes, over the {MAX_JSON_BYTES:,}-byte limit", path)
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ThreecadError(f"cannot read {what} ({exc.strerror or exc})", path) from None
    except UnicodeDecodeError as exc:
        raise ThreecadError(f"unreadable {what} (not UTF-8: {exc.reason} at byte {exc.start})", path) from None


def check_depth(value: Any, path: str | Path, what: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse ``value`` when its lists/dicts nest deeper than ``limit`` (iterative: no recursion).

    Each container is visited once (by identity), so YAML aliases that share one list many
    times cannot make the walk itself exponential.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    seen: set[int] = set()
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (list, dict)) or id(node) in seen:
            continue
        if depth > limit:
            raise ThreecadError(f"{what} nests deeper than {limit} levels", path)
        seen.add(id(node))
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))


def read_json(path: str | Path, what: str = "annotation JSON") -> Any:
    """Parse one annotation file within the size and depth limits; a :class:`ThreecadError` names it."""
    path = Path(path)
    text = read_text_bounded(path, what)
    try:
        data = json.loads(text)
    except RecursionError:
        raise ThreecadError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels", path) from None
    except ValueError as exc:  # JSONDecodeError, and integers over Python's 4,300-digit limit
        raise ThreecadError(f"unreadable {what} ({exc.__class__.__name__}: {exc})", path) from None
    check_depth(data, path, what)
    return data


def json_int(value: Any) -> int | None:
    """A JSON number as an int (a size field), or None for anything else (bools, NaN, strings, lists)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value)


def json_id(value: Any) -> int | str | None:
    """A COCO id (an int, or a string as some tools write), or None for lists, dicts, floats, bools."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return value
