"""The one path check: every name that comes from outside (an archive member, an annotation's
``file_name``, a category or defect-type folder) goes through here before it becomes a path.

Why a module of its own: the download extractor, the submission unpacker and preprocess all turn
foreign strings into paths under a folder the user named, and a rule that differs between them
is a hole in the weakest. The textual check (:func:`check_relative`) refuses what can never be
right; :func:`inside` then resolves the final path on disk (links included) and proves it lies
under the target, which also catches a link that an earlier step left in the tree.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from threecad.errors import ThreecadError

_DRIVE = re.compile(r"^[A-Za-z]:")
#: Longest single path component we accept; most file systems stop at 255 bytes.
MAX_COMPONENT_BYTES = 255


def unsafe_reason(name: str) -> str | None:
    """Why ``name`` cannot be a relative path below a target folder, or None when it can.

    Refused: empty names, NUL, backslashes (a Windows separator that POSIX keeps as a character),
    absolute paths and drive letters, ``..``, empty or ``.`` components (``a//b``, ``./a``, which
    make one file reachable under two names), and components over 255 bytes.
    """
    if not isinstance(name, str) or not name:
        return "empty name"
    if "\x00" in name:
        return "NUL character in name"
    if "\\" in name:
        return "backslash in path (use / separators)"
    if name.startswith("/") or _DRIVE.match(name):
        return "absolute path"
    parts = name.rstrip("/").split("/")  # a trailing slash marks a folder in archives
    if any(part == ".." for part in parts):
        return "'..' in path"
    if any(part in ("", ".") for part in parts):
        return "empty or '.' path component"
    try:  # surrogateescape: undecodable bytes of a real file name (os.listdir, tarfile) are kept
        sizes = [len(part.encode("utf-8", "surrogateescape")) for part in parts]
    except UnicodeEncodeError:  # a lone surrogate from JSON ("\ud800"): no file can have that name
        return "not valid Unicode text (lone surrogate)"
    if any(size > MAX_COMPONENT_BYTES for size in sizes):
        return f"a path component is longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def check_relative(name: str, what: str = "path", source: str | Path | None = None) -> PurePosixPath:
    """``name`` as a safe relative POSIX path, or a :class:`ThreecadError` naming ``source``."""
    why = unsafe_reason(name)
    if why:
        raise ThreecadError(f"{what} {name!r} is refused: {why}", source)
    return PurePosixPath(name.rstrip("/"))


def check_component(name: str, what: str = "name", source: str | Path | None = None) -> str:
    """``name`` as one safe path component (a folder or file name: no separator at all)."""
    if isinstance(name, str) and "/" in name:
        raise ThreecadError(f"{what} {name!r} is refused: it contains a path separator", source)
    check_relative(name, what, source)
    if name.startswith("."):
        raise ThreecadError(f"{what} {name!r} is refused: hidden names (starting with '.') are not allowed", source)
    return name


def inside(root: str | Path, path: str | Path, source: str | Path | None = None) -> Path:
    """``path`` resolved on disk, proven to lie under ``root`` (resolved too); else an error.

    ``os.path.realpath`` follows every link that already exists, so a link planted earlier in
    the tree cannot carry a later write outside ``root``.
    """
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real != real_root and real_root not in real.parents:
        raise ThreecadError(f"refusing to write {path}: it resolves to {real}, outside {real_root}", source)
    return real


def safe_join(root: str | Path, name: str, what: str = "path", source: str | Path | None = None) -> Path:
    """``root / name`` for a foreign ``name``: the textual check, then :func:`inside`."""
    rel = check_relative(name, what, source)
    target = Path(root) / rel
    inside(root, target, source)
    return target
