"""Anomaly maps on disk: the submission layout ``<Category>/test/<defect>/<stem>.tiff``.

One single-channel float map per test image. TIFF (float16 or float32) is the interchange format
of MVTec AD's evaluation; ``.npy`` is accepted on reading for convenience. ``predict`` writes this
layout, ``evaluate`` and the leaderboard read it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import tifffile

from threecad.errors import ThreecadError
from threecad.io import write_bytes

MAP_SUFFIXES = (".tiff", ".tif", ".npy")


def map_relpath(category: str, defect: str, stem: str, suffix: str = ".tiff") -> str:
    return f"{category}/test/{defect}/{stem}{suffix}"


def find_map(predictions: str | Path, category: str, defect: str, stem: str) -> Path | None:
    base = Path(predictions) / category / "test" / defect
    for suffix in MAP_SUFFIXES:
        candidate = base / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def write_map(path: str | Path, anomaly_map: np.ndarray, dtype: str = "float32") -> None:
    """Write a 2-D map atomically as TIFF (float16 or float32)."""
    if dtype not in ("float16", "float32"):
        raise ThreecadError(f"map dtype must be float16 or float32, not {dtype}")
    array = np.asarray(anomaly_map)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ThreecadError(f"anomaly map must be 2-D, got shape {array.shape}", path)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.ascontiguousarray(array.astype(dtype)))
    write_bytes(path, buffer.getvalue())


def read_map(path: str | Path) -> np.ndarray:
    """Read one map; the result is 2-D float (float16 kept as float16 to preserve exactness)."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False) if path.suffix == ".npy" else tifffile.imread(path)
    except FileNotFoundError:
        raise ThreecadError("map file not found", path) from None
    except Exception as exc:
        raise ThreecadError(f"unreadable map ({exc.__class__.__name__}: {exc})", path) from None
    array = np.asarray(array)
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    if array.ndim != 2:
        raise ThreecadError(f"map must be single-channel 2-D, got shape {array.shape}", path)
    if not np.issubdtype(array.dtype, np.floating):
        raise ThreecadError(f"map must be float16/float32/float64, got {array.dtype}", path)
    if not np.isfinite(array).all():
        raise ThreecadError("map contains NaN or inf", path)
    return array


#: Optional per-image scores beside the maps: ``category,path,score`` with ``path`` the image's
#: path below its category (``test/<defect>/<file name>``), one row per test image.
SCORES_FILE = "scores.csv"
ScoreKey = tuple[str, str]


def read_scores(path: str | Path) -> dict[ScoreKey, float]:
    """Read a ``scores.csv``; any malformed row is an error naming the file and line."""
    path = Path(path)
    scores: dict[ScoreKey, float] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"category", "path", "score"} - set(reader.fieldnames or ())
            if missing:
                raise ThreecadError(f"missing column(s) {', '.join(sorted(missing))}; expected category,path,score", path)
            for line, row in enumerate(reader, start=2):
                key = (row["category"], row["path"])
                try:
                    value = float(row["score"])
                except (TypeError, ValueError):
                    raise ThreecadError(f"line {line}: score {row['score']!r} is not a number", path) from None
                if not np.isfinite(value):
                    raise ThreecadError(f"line {line}: score is {value}; scores must be finite", path)
                if key in scores:
                    raise ThreecadError(f"line {line}: second score for {key[0]}/{key[1]}", path)
                scores[key] = value
    except FileNotFoundError:
        raise ThreecadError("scores file not found", path) from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ThreecadError(f"unreadable scores file ({exc})", path) from None
    return scores


def write_scores(path: str | Path, scores: dict[ScoreKey, float], merge: bool = True) -> None:
    """Write ``scores.csv`` sorted and atomically; ``merge`` keeps rows of other images already there."""
    path = Path(path)
    merged = read_scores(path) if merge and path.is_file() else {}
    merged.update(scores)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["category", "path", "score"])
    for (category, rel), score in sorted(merged.items()):
        writer.writerow([category, rel, repr(float(score))])
    write_bytes(path, buffer.getvalue().encode())
