"""Anomaly maps on disk: the submission layout, and the one reader and checker of it.

A predictions folder (what ``3cad predict`` writes, what ``3cad evaluate`` reads, and what a
leaderboard submission holds) is ``<Category>/test/<defect>/<stem>.tiff``: one single-channel
float16 or float32 TIFF per test image, plus an optional ``scores.csv`` and, in a submission,
``meta.json``. ``evaluate`` (:mod:`threecad.metrics.predictions`) and the leaderboard validator
(:mod:`leaderboard.validate`) both check it with the functions here, so a folder ``evaluate``
scores is a folder the leaderboard accepts, and the other way round.

Where the two used to differ, the stricter rule is the one kept:

* maps are named ``<stem>.tiff``: ``.tif`` and ``.npy`` files are unexpected files, not maps;
* a map is a one-page TIFF holding float16 or float32 (float64 and integers are refused), of
  shape (H, W), (1, H, W) or (H, W, 1), at most :data:`MAX_MAP_PIXELS` pixels, finite;
* a map has the size of its test image (or the declared evaluation size): a map at another
  resolution is an error, never silently resized;
* every test image has exactly one map, and every other file is unexpected (``scores.csv`` and
  ``meta.json`` at the top excepted);
* every row of ``scores.csv`` is a finite number for a test image, once: a row for an image the
  dataset lacks is an error, as are a missing score, a repeated row and a non-numeric value.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from threecad.errors import ThreecadError
from threecad.io import write_bytes

MAP_SUFFIX = ".tiff"
MAP_DTYPES = ("float16", "float32")
#: Largest map accepted, in pixels (64 Mi; 3CAD images are at most 1024 x 1024). Checked on the
#: TIFF header, before any pixel is decoded, so a file declaring a huge size costs nothing.
MAX_MAP_PIXELS = 64 * 2**20
#: Optional per-image scores beside the maps: ``category,path,score`` with ``path`` the image's
#: path below its category (``test/<defect>/<file name>``), one row per test image.
SCORES_FILE = "scores.csv"
SCORE_COLUMNS = ("category", "path", "score")
#: A submission's description of the method (see :mod:`leaderboard.validate`).
META_FILE = "meta.json"
ScoreKey = tuple[str, str]


def map_relpath(category: str, defect: str, stem: str) -> str:
    """Where the map of test image ``<defect>/<stem>.*`` of ``category`` lies in a predictions folder."""
    return f"{category}/test/{defect}/{stem}{MAP_SUFFIX}"


def find_map(predictions: str | Path, category: str, defect: str, stem: str) -> Path | None:
    """The map file of one test image, or None when the folder lacks it."""
    path = Path(predictions) / map_relpath(category, defect, stem)
    return path if path.is_file() else None


def write_map(path: str | Path, anomaly_map: np.ndarray, dtype: str = "float32") -> None:
    """Write a 2-D map atomically as TIFF (float16 or float32)."""
    if dtype not in MAP_DTYPES:
        raise ThreecadError(f"map dtype must be float16 or float32, not {dtype}")
    array = np.asarray(anomaly_map)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ThreecadError(f"anomaly map must be 2-D, got shape {array.shape}", path)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.ascontiguousarray(array.astype(dtype)))
    write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------- maps
def _load(path: Path, expected: tuple[int, int] | None, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    """(map, None) or (None, why the file is not an acceptable map); the header is checked first."""
    if not path.is_file():
        return None, "map file not found"
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.series) != 1 or len(tif.pages) != 1:
                return None, f"holds {len(tif.pages)} pages; one single-channel map per file"
            series = tif.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype)
            if dtype.name not in MAP_DTYPES:
                return None, f"dtype {dtype.name}; maps must be float16 or float32"
            squeezed = shape
            if len(shape) == 3 and 1 in (shape[0], shape[-1]):
                squeezed = shape[1:] if shape[0] == 1 else shape[:-1]
            if len(squeezed) != 2:
                return None, f"shape {shape} is not a single-channel 2-D map"
            if math.prod(squeezed) > max_pixels:
                return None, f"{squeezed[1]}x{squeezed[0]} pixels is over the limit of {max_pixels:,}"
            if expected is not None and squeezed != (expected[1], expected[0]):
                return None, (f"size {squeezed[1]}x{squeezed[0]} (WxH) but expected {expected[0]}x{expected[1]} "
                              f"(the image's native size, or the declared evaluation size)")
            data = series.asarray().reshape(squeezed)
    except Exception as exc:  # tifffile raises many types for corrupt files
        return None, f"not a readable TIFF ({exc.__class__.__name__}: {exc})"
    if not np.isfinite(data).all():
        return None, f"{int((~np.isfinite(data)).sum())} NaN/inf value(s)"
    return data, None


def map_problem(path: str | Path, expected: tuple[int, int] | None = None,
                max_pixels: int = MAX_MAP_PIXELS) -> str | None:
    """Why ``path`` is not an acceptable map (see the module docstring), or None.

    ``expected`` is the (width, height) the map must have.
    """
    return _load(Path(path), expected, max_pixels)[1]


def read_map(path: str | Path, expected: tuple[int, int] | None = None,
             max_pixels: int = MAX_MAP_PIXELS) -> np.ndarray:
    """One map as a 2-D float16/float32 array (float16 kept: exact), checked like :func:`map_problem`."""
    data, problem = _load(Path(path), expected, max_pixels)
    if problem is not None:
        raise ThreecadError(problem, path)
    return data


def check_map_files(root: str | Path, expected: Collection[str], categories: Collection[str],
                    within: Collection[str] | None = None) -> tuple[list[str], list[str]]:
    """(missing, unexpected): expected map paths absent from ``root``, and files that are no map.

    ``expected`` holds :func:`map_relpath` paths; ``categories`` are the chosen ones (a hint names
    files of other folders). ``within`` limits the look to those category folders (``evaluate``
    with explicit categories ignores the rest of the folder); ``None`` looks at every file, where
    only ``scores.csv`` and ``meta.json`` may sit beside the maps. Unexpected paths carry a hint.
    """
    root = Path(root)
    bases = [root] if within is None else [root / c for c in within if (root / c).is_dir()]
    present = {p.relative_to(root).as_posix() for base in bases for p in base.rglob("*") if p.is_file()}
    expected = set(expected)
    missing = sorted(expected - present)
    unexpected = []
    for rel in sorted(present - expected - {SCORES_FILE, META_FILE}):
        hint = ""
        if rel.rsplit(".", 1)[0] + MAP_SUFFIX in expected:
            hint = f" (maps must be named <stem>{MAP_SUFFIX})"
        elif rel.split("/", 1)[0] not in categories:
            hint = " (not a chosen category of the dataset)"
        unexpected.append(rel + hint)
    return missing, unexpected


# ---------------------------------------------------------------------------------------------- scores
@dataclass
class ScoresTable:
    """The rows of a ``scores.csv``: scores, the line each came from, and every problem found."""

    scores: dict[ScoreKey, float] = field(default_factory=dict)
    lines: dict[ScoreKey, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def parse_scores(path: str | Path) -> ScoresTable:
    """Read a ``scores.csv``, collecting every problem (each naming its line) instead of stopping.

    A row whose score is not a finite number, or a second row for an image, is a problem and is
    left out; so is a missing column or an unreadable file (then there are no rows at all).
    """
    path = Path(path)
    table = ScoresTable()
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = set(SCORE_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                table.problems.append(f"missing column(s) {', '.join(sorted(missing))}; "
                                      f"expected the header {','.join(SCORE_COLUMNS)}")
                return table
            for line, row in enumerate(reader, start=2):
                key = (str(row["category"]), str(row["path"]))
                try:
                    value = float(row["score"])
                except (TypeError, ValueError):
                    table.problems.append(f"line {line}: score {row['score']!r} is not a number")
                    continue
                if not math.isfinite(value):
                    table.problems.append(f"line {line}: score is {value}; scores must be finite")
                elif key in table.scores:
                    table.problems.append(f"line {line}: second score for {key[0]}/{key[1]} "
                                          f"(first on line {table.lines[key]})")
                else:
                    table.scores[key], table.lines[key] = value, line
    except FileNotFoundError:
        table.problems.append("scores file not found")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        table.problems.append(f"unreadable scores file ({exc})")
    return table


def check_scores(table: ScoresTable, expected: Iterable[ScoreKey], within: Collection[str] | None = None) -> list[str]:
    """Every problem of ``table`` against the test images ``expected``: its own, then each row for
    an image not expected, then the expected images without a score (one line for all of them).

    ``within`` (category names): rows of other categories are left out of ``table`` first, as the
    map folders of categories not evaluated are, instead of counting as unknown images.
    """
    if within is not None:
        table.scores = {key: value for key, value in table.scores.items() if key[0] in within}
    expected = list(expected)
    wanted = set(expected)
    problems = list(table.problems)
    for key in table.scores:
        if key not in wanted:
            where = f"line {table.lines[key]}: " if key in table.lines else ""
            problems.append(f"{where}{key[0]}/{key[1]} is not a test image of the chosen categories")
    absent = [f"{c}/{p}" for (c, p) in expected if (c, p) not in table.scores]
    if absent:
        problems.append(f"no score for {len(absent)} test image(s), e.g. {absent[0]}; give every image a "
                        f"score or remove {SCORES_FILE}")
    return problems


def read_scores(path: str | Path | dict[ScoreKey, float], expected: Iterable[ScoreKey] | None = None,
                within: Collection[str] | None = None) -> dict[ScoreKey, float]:
    """The scores of a ``scores.csv`` (or of a dict of them), checked: the first problem
    (:func:`check_scores` against ``expected`` and ``within`` when ``expected`` is given, else the
    file's own) is an error naming the file."""
    if isinstance(path, dict):
        table, path = ScoresTable(dict(path)), None
    else:
        table = parse_scores(path)
    problems = table.problems if expected is None else check_scores(table, expected, within)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ThreecadError(problems[0] + more, path)
    return table.scores


def write_scores(path: str | Path, scores: dict[ScoreKey, float], merge: bool = True) -> None:
    """Write ``scores.csv`` sorted and atomically; ``merge`` keeps rows of other images already there."""
    path = Path(path)
    merged = read_scores(path) if merge and path.is_file() else {}
    merged.update(scores)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SCORE_COLUMNS)
    for (category, rel), score in sorted(merged.items()):
        writer.writerow([category, rel, repr(float(score))])
    write_bytes(path, buffer.getvalue().encode())
