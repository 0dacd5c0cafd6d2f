"""Which files ``3cad inspect`` and ``3cad calibrate`` read, and the name each one's outputs get.

An INPUT is an image file (any suffix: a file named explicitly is always tried, and listed as
unreadable if it is not an image), a folder (every image below it, recursively, by suffix; hidden
files and folders skipped), or a glob pattern (``"line/*.png"``, ``**`` recursive). Frames are
read exactly as ``3cad data preprocess`` reads raw frames (gray 8/16-bit and RGB as stored, other
modes as RGB), so a window of a frame is the same array as the training tile cut from it.

Output names: a file below a folder INPUT keeps its path below that folder (``a/b.png`` ->
``a/b``), a file named directly or matched by a pattern its stem; a name used twice gets ``_2``,
``_3``... Names come from the file system below what the user named, never from file contents.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from threecad.dataset.layout import IMAGE_SUFFIXES
from threecad.errors import ThreecadError


@dataclass(frozen=True)
class Frame:
    """One input file and the name (POSIX, no suffix) its map and overlay are written under."""

    path: Path
    name: str


def _images_below(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return found


def discover_frames(inputs: list[str | Path], exclude: str | Path | None = None) -> list[Frame]:
    """The frames named by ``inputs``, in the order given (folders sorted), each file once.

    ``exclude``: a folder whose files are never taken (the output folder, should it lie inside an
    input folder). No frame at all is a one-line error naming the inputs.
    """
    if not inputs:
        raise ThreecadError("no INPUT given: name image files, folders or glob patterns")
    skip = Path(os.path.realpath(exclude)) if exclude is not None else None
    frames: list[Frame] = []
    seen: set[str] = set()
    names: set[str] = set()
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            pairs = [(p, PurePosixPath(p.relative_to(path).as_posix()).with_suffix("").as_posix())
                     for p in _images_below(path)]
        elif path.is_file():
            pairs = [(path, path.stem)]
        elif glob.has_magic(text):
            matched = sorted(Path(p) for p in glob.glob(text, recursive=True))
            pairs = [(p, p.stem) for p in matched
                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
        else:
            raise ThreecadError("input not found (not a file, a folder or a glob pattern that matches)", path)
        for file, name in pairs:
            real = os.path.realpath(file)
            if real in seen or (skip is not None and (skip == Path(real) or skip in Path(real).parents)):
                continue
            seen.add(real)
            unique, k = name, 1
            while unique in names:
                k += 1
                unique = f"{name}_{k}"
            names.add(unique)
            frames.append(Frame(file, unique))
    if not frames:
        raise ThreecadError(f"no images found in {', '.join(str(i) for i in inputs)} "
                            f"(image suffixes: {' '.join(IMAGE_SUFFIXES)})")
    return frames


