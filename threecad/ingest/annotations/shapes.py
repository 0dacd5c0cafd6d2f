"""One annotation to one valid shapely geometry, with every problem found and the action taken.

Coordinates follow LabelMe and COCO: continuous pixel coordinates, ``(0, 0)`` is the top-left
corner of the top-left pixel and pixel ``(row i, column j)`` is the unit square
``[j, j+1) x [i, i+1)``. A vertex is outside the image when ``x < 0``, ``y < 0``, ``x > width`` or
``y > height`` (the border itself is inside).

Repairs never lose area that the annotator drew: self-intersecting rings go through
``shapely.make_valid`` and *every* polygonal part is kept (the bow-tie keeps both lobes; the
legacy ``buffer(0)`` drops one). What cannot be repaired (fewer than three distinct points, no
area, non-finite coordinates, nothing inside the image) is dropped and reported.

**Bounded work per shape.** GEOS's repair grows much faster than the number of self-intersections
(a random 400-vertex polygon, ~18,000 crossings: 30 s; 100k vertices: 12 GB, then ``bad_alloc``),
and annotation files are foreign input, so every shape passes three bounds, each reported as
``too_complex`` / ``dropped`` for that shape only:

* :data:`MAX_VERTICES` = 10,000 vertices per annotation (all its rings together), refused before
  any geometry is built;
* :data:`MAX_CROSSINGS` = 1,000 pairs of crossing or touching non-adjacent edges, counted cheaply
  (an STR-tree of the edges, stopping at the limit) before any repair or stroke; below it the
  worst repair measured takes ~0.4 s;
* :data:`REPAIR_SECONDS` = 10 s of wall time: with a :class:`GeometryWorker`, every shape that is
  not trivially small is built in a child process that is killed when the budget runs out (or
  that dies of memory exhaustion) without taking the caller with it.

The first two are deterministic (same input, same report on every machine); the time budget is a
last resort for what they do not foresee (e.g. a 10,000-vertex zigzag line whose stroke overlaps
itself without crossing takes ~3 s), so it is set far above anything the caps let through.
"""

from __future__ import annotations

import math
import multiprocessing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box
from shapely.validation import explain_validity

from threecad.errors import shorten

#: Most vertices in one annotation (all rings together): 10,000.
MAX_VERTICES = 10_000
#: Most crossing (or touching) pairs of non-adjacent edges repaired or stroked: 1,000.
MAX_CROSSINGS = 1_000
#: Wall-clock budget, in seconds, for building one shape in a :class:`GeometryWorker`: 10.
REPAIR_SECONDS = 10.0
#: Shapes at most this small are built in-process even with a worker (a repair of <= 16
#: crossings in <= 64 vertices took at most ~2 ms measured): 64 vertices, 16 crossings.
INLINE_VERTICES, INLINE_CROSSINGS = 64, 16
#: Longest ``detail`` kept in a report row (labels and names can be megabytes long): 300 characters.
MAX_DETAIL_CHARS = 300

#: Problems (``problem`` column of the report) and the actions taken for them.
TOO_FEW_POINTS = "too_few_points"
NON_FINITE = "non_finite_coordinates"
MALFORMED = "malformed_points"
UNSUPPORTED = "unsupported_shape"
DUPLICATE_VERTICES = "duplicate_vertices"
SELF_INTERSECTION = "self_intersection"
INVALID_GEOMETRY = "invalid_geometry"
ZERO_AREA = "zero_area"
OUTSIDE_IMAGE = "outside_image"
TOO_COMPLEX = "too_complex"
MALFORMED_RLE = "malformed_rle"
UNKNOWN_LABEL = "unknown_label"
IGNORED_LABEL = "ignored_label"
SUB_PIXEL = "sub_pixel"
DROPPED, REPAIRED, CLIPPED, ONE_PIXEL = "dropped", "repaired", "clipped", "marked_one_pixel"

#: Shape types understood (LabelMe names; ``polygons`` and ``rle`` come from COCO).
SHAPE_TYPES = ("polygon", "rectangle", "circle", "linestrip", "line", "polygons", "rle")


@dataclass(frozen=True)
class Issue:
    """One row of the preprocessing report."""

    file: str
    annotation: int | None  # index in the file's shape list; None for file-level problems
    problem: str
    action: str
    detail: str = ""

    def as_row(self) -> dict:
        return {
            "file": self.file,
            "annotation": -1 if self.annotation is None else self.annotation,
            "problem": self.problem,
            "action": self.action,
            "detail": shorten(self.detail, MAX_DETAIL_CHARS),
        }


@dataclass
class RawAnnotation:
    """An annotation as read from a file, before any validation."""

    index: int
    label: str | None  # None: no usable label (not a string, or an undeclared COCO category)
    shape_type: str
    points: Any = None  # list of [x, y]; for 'polygons' a list of flat COCO lists
    rle: dict | None = None  # COCO RLE for shape_type 'rle'
    extra: dict = field(default_factory=dict)


def _points_array(points: Any) -> np.ndarray | None:
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.ndim != 2 or arr.shape[1] != 2:
        return None
    return arr


def _polygonal(geom) -> Polygon | MultiPolygon:
    """The polygonal parts of any geometry (zero-area parts removed), as one (Multi)Polygon."""
    parts = [g for g in shapely.get_parts(geom) if isinstance(g, (Polygon, MultiPolygon)) and g.area > 0]
    polys: list[Polygon] = []
    for part in parts:
        polys.extend(part.geoms if isinstance(part, MultiPolygon) else [part])
    if not polys:
        return Polygon()
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def _dedupe(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """Remove consecutive duplicate vertices (and a closing vertex equal to the first, silently)."""
    keep = np.ones(len(arr), dtype=bool)
    keep[1:] = np.any(arr[1:] != arr[:-1], axis=1)
    out = arr[keep]
    removed = int((~keep).sum())
    if len(out) > 1 and np.all(out[0] == out[-1]):
        out = out[:-1]  # an explicitly closed ring is a convention, not a problem
    return out, removed


def _ring_polygon(arr: np.ndarray, issues: list[tuple[str, str, str]]) -> Polygon | MultiPolygon | None:
    arr, removed = _dedupe(arr)
    if removed:
        issues.append((DUPLICATE_VERTICES, REPAIRED, f"removed {removed} repeated vertices"))
    if len(np.unique(arr, axis=0)) < 3:
        issues.append((TOO_FEW_POINTS, DROPPED, f"{len(np.unique(arr, axis=0))} distinct points"))
        return None
    poly = Polygon(arr)
    if poly.is_valid:
        return poly if poly.area > 0 else _zero(issues)
    reason = explain_validity(poly)
    fixed = _polygonal(shapely.make_valid(poly))
    if fixed.is_empty:
        return _zero(issues)
    kind = SELF_INTERSECTION if "self-intersection" in reason.lower() else INVALID_GEOMETRY
    issues.append((kind, REPAIRED, f"{reason}; make_valid kept {len(shapely.get_parts(fixed))} part(s)"))
    return fixed


def _zero(issues: list[tuple[str, str, str]]) -> None:
    issues.append((ZERO_AREA, DROPPED, "no area"))
    return None


def _arrays(ann: RawAnnotation, issues: list[tuple[str, str, str]]) -> list[np.ndarray] | None:
    """The annotation's rings/lines as finite (N, 2) float arrays, or None (with the problem noted)."""
    kind = ann.shape_type
    rings = [ann.points] if kind != "polygons" else []
    if kind == "polygons":
        if not isinstance(ann.points, list):
            issues.append((MALFORMED, DROPPED, "segmentation is not a list of polygons"))
            return None
        for flat in ann.points:
            ok = isinstance(flat, (list, tuple)) and len(flat) % 2 == 0
            rings.append(_points_array(np.asarray(flat, dtype=object).reshape(-1, 2)) if ok else None)
    arrays = [r if isinstance(r, np.ndarray) else _points_array(r) for r in rings]
    if not arrays or any(a is None or len(a) == 0 for a in arrays):
        issues.append((MALFORMED, DROPPED, "points are not a list of [x, y] pairs"))
        return None
    if not all(np.isfinite(a).all() for a in arrays):
        issues.append((NON_FINITE, DROPPED, "NaN or infinite coordinate"))
        return None
    return arrays


def count_crossings(arrays: list[np.ndarray], closed: bool, limit: int = MAX_CROSSINGS) -> int:
    """Pairs of non-adjacent edges that cross or touch, over all rings/lines together; stops past ``limit``.

    This is the cheap measure of how much work a repair or a stroke will be: GEOS's cost grows with
    the crossings, not with the vertices. Edges come from an STR-tree queried a block of
    :data:`_CROSSING_BLOCK` edges at a time, so memory stays bounded and a hopeless shape is
    recognised after its first block. Repeated consecutive vertices are skipped first (a zero-length
    edge would count as a touch of its two neighbours). Returns ``limit + 1`` or more when over.
    """
    starts, ends, ring_of, index_of, size_of = [], [], [], [], []
    for r, arr in enumerate(arrays):
        keep = np.ones(len(arr), dtype=bool)
        keep[1:] = np.any(arr[1:] != arr[:-1], axis=1)
        arr = arr[keep]
        if closed and len(arr) > 1 and np.all(arr[0] == arr[-1]):
            arr = arr[:-1]
        n = len(arr) if closed else len(arr) - 1
        if n < 2:
            continue
        starts.append(arr[:n])
        ends.append(np.roll(arr, -1, axis=0)[:n] if closed else arr[1:])
        ring_of.append(np.full(n, r))
        index_of.append(np.arange(n))
        size_of.append(np.full(n, n))
    if not starts:
        return 0
    segments = shapely.linestrings(np.stack([np.concatenate(starts), np.concatenate(ends)], axis=1))
    ring, index, size = np.concatenate(ring_of), np.concatenate(index_of), np.concatenate(size_of)
    tree = shapely.STRtree(segments)
    total = 0
    for b0 in range(0, len(segments), _CROSSING_BLOCK):
        block = np.arange(b0, min(len(segments), b0 + _CROSSING_BLOCK))
        a, b = tree.query(segments[block], predicate="intersects")
        a = block[a]
        later = b > a  # each pair once, no edge with itself
        a, b = a[later], b[later]
        gap = index[b] - index[a]
        neighbours = (ring[a] == ring[b]) & ((gap == 1) | (closed & (gap == size[a] - 1)))
        total += int((~neighbours).sum())
        if total > limit:
            break
    return total


#: Edges queried per block in :func:`count_crossings` (bounds its memory to ~128 x 10,000 pairs): 128.
_CROSSING_BLOCK = 128


def to_geometry(
    ann: RawAnnotation, width: int, height: int, line_width: float = 3.0, worker: GeometryWorker | None = None
) -> tuple[Polygon | MultiPolygon | None, list[tuple[str, str, str]]]:
    """A valid polygonal geometry clipped to the image (or None), and ``(problem, action, detail)`` rows.

    ``line_width`` is the stroke width in pixels given to ``linestrip``/``line`` shapes, which
    LabelMe stores without one. ``rle`` annotations are masks, not geometries: use
    :func:`threecad.ingest.annotations.raster.rle_decode` for them. The vertex and crossing caps always
    apply; with a ``worker`` the build also runs under its time budget (module docstring).
    """
    issues: list[tuple[str, str, str]] = []
    kind = ann.shape_type
    if kind not in SHAPE_TYPES or kind == "rle":
        issues.append((UNSUPPORTED, DROPPED, f"shape_type {kind!r}"))
        return None, issues
    arrays = _arrays(ann, issues)
    if arrays is None:
        return None, issues
    vertices = sum(len(a) for a in arrays)
    if vertices > MAX_VERTICES:
        issues.append((TOO_COMPLEX, DROPPED, f"{vertices:,} vertices (limit {MAX_VERTICES:,}); simplify the annotation"))
        return None, issues
    crossings = count_crossings(arrays, kind in ("polygon", "polygons")) if kind not in ("rectangle", "circle") else 0
    if crossings > MAX_CROSSINGS:
        detail = f"more than {MAX_CROSSINGS:,} self-intersections in {vertices:,} vertices: not repaired; redraw the outline"
        issues.append((TOO_COMPLEX, DROPPED, detail))
        return None, issues
    if worker is None or (vertices <= INLINE_VERTICES and crossings <= INLINE_CROSSINGS):
        geom, found = _construct(kind, arrays, line_width, width, height)
    else:
        geom, found = worker.construct(kind, arrays, line_width, width, height)
    return geom, issues + found


def _construct(
    kind: str, arrays: list[np.ndarray], line_width: float, width: int, height: int
) -> tuple[Polygon | MultiPolygon | None, list[tuple[str, str, str]]]:
    """The costly part of :func:`to_geometry` (repair, stroke, union, clip); run by :class:`GeometryWorker`."""
    issues: list[tuple[str, str, str]] = []
    try:
        geom = _build(kind, arrays, line_width, issues)
        if geom is None:
            return None, issues
        return _clip(geom, np.concatenate(arrays), width, height, issues), issues
    except shapely.errors.GEOSException as exc:
        issues.append((INVALID_GEOMETRY, DROPPED, f"GEOS could not process it: {exc}"))
        return None, issues


def _clip(geom, pts: np.ndarray, width: int, height: int, issues: list) -> Polygon | MultiPolygon | None:
    frame = box(0, 0, width, height)
    bounds = geom.bounds
    outside = bool((pts[:, 0] < 0).any() or (pts[:, 1] < 0).any() or (pts[:, 0] > width).any() or (pts[:, 1] > height).any())
    outside = outside or bounds[0] < 0 or bounds[1] < 0 or bounds[2] > width or bounds[3] > height
    if not outside:
        return geom
    clipped = _polygonal(geom.intersection(frame))
    if clipped.is_empty:
        issues.append((OUTSIDE_IMAGE, DROPPED, "nothing inside the image"))
        return None
    issues.append((OUTSIDE_IMAGE, CLIPPED, f"kept {clipped.area / geom.area:.1%} of the area"))
    return clipped


def _serve(conn) -> None:
    """The child of a :class:`GeometryWorker`: build shapes until told to stop or the parent is gone."""
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        try:
            result = _construct(*job)
        except Exception as exc:  # noqa: BLE001 - the isolation boundary: report, never crash the parent
            result = (None, [(INVALID_GEOMETRY, DROPPED, f"{exc.__class__.__name__}: {exc}")])
        conn.send(result)


class GeometryWorker:
    """A child process that builds shapes under a wall-clock budget; abandoned (killed) on overrun.

    Why a process: GEOS runs in C and cannot be interrupted from Python, and a repair that runs out
    of memory ends in ``std::bad_alloc``, which aborts the whole interpreter. In a child both cost
    only that shape (reported ``too_complex``); the next shape gets a fresh child. One child serves
    every shape in turn (started on first use), so the cost is a pipe round trip, not a fork, per
    shape. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, seconds: float = REPAIR_SECONDS):
        if not seconds > 0:
            raise ValueError(f"the time budget must be positive, got {seconds}")
        self.seconds = seconds
        self._process = None
        self._conn = None

    def __enter__(self) -> GeometryWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        parent, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), daemon=True, name="threecad-geometry")
        self._process.start()
        child.close()
        self._conn = parent

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
            self._conn.close()
        self._process = self._conn = None

    def construct(
        self, kind: str, arrays: list[np.ndarray], line_width: float, width: int, height: int
    ) -> tuple[Polygon | MultiPolygon | None, list[tuple[str, str, str]]]:
        """:func:`_construct` in the child; ``too_complex`` when it overruns the budget or dies."""
        if self._process is None or not self._process.is_alive():
            self._stop()
            self._start()
        try:
            self._conn.send((kind, arrays, line_width, width, height))
            if self._conn.poll(self.seconds):
                return self._conn.recv()
            why = f"building it took over the {self.seconds:g} s budget"
        except (EOFError, OSError):
            why = "the process building it died (out of memory?)"
        self._stop()
        return None, [(TOO_COMPLEX, DROPPED, f"{why}; simplify the annotation")]

    def close(self) -> None:
        """Stop the child (politely when idle)."""
        if self._process is not None and self._process.is_alive():
            try:
                self._conn.send(None)
                self._process.join(1.0)
            except OSError:
                pass
        self._stop()


def _build(kind: str, arrays: list[np.ndarray], line_width: float, issues: list) -> Polygon | MultiPolygon | None:
    arr = arrays[0]
    if kind == "polygon":
        return _ring_polygon(arr, issues)
    if kind == "polygons":
        parts = [p for p in (_ring_polygon(a, issues) for a in arrays) if p is not None]
        return _polygonal(shapely.union_all(parts)) if parts else None
    if kind == "rectangle":
        if len(arr) < 2:
            issues.append((TOO_FEW_POINTS, DROPPED, "a rectangle needs two corners"))
            return None
        (x0, y0), (x1, y1) = arr.min(axis=0), arr.max(axis=0)
        return box(x0, y0, x1, y1) if x1 > x0 and y1 > y0 else _zero(issues)
    if kind == "circle":
        if len(arr) < 2:
            issues.append((TOO_FEW_POINTS, DROPPED, "a circle needs its centre and a point on it"))
            return None
        radius = math.dist(arr[0], arr[1])
        return Point(arr[0]).buffer(radius, quad_segs=32) if radius > 0 else _zero(issues)
    # linestrip / line: a stroke of line_width pixels with round ends.
    line, removed = _dedupe(arr)
    if removed:
        issues.append((DUPLICATE_VERTICES, REPAIRED, f"removed {removed} repeated vertices"))
    if len(line) < 2:
        issues.append((TOO_FEW_POINTS, DROPPED, "a line needs two distinct points"))
        return None
    if line_width <= 0:
        return _zero(issues)
    return _polygonal(LineString(line).buffer(line_width / 2.0, quad_segs=8))


#: File-level problems (the ``annotation`` column is empty) and their actions.
IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"
IMAGE_TOO_LARGE = "image_too_large"
SIZE_MISMATCH = "size_mismatch"
JSON_UNREADABLE = "json_unreadable"
NO_VALID_ANNOTATIONS = "no_valid_annotations"
DUPLICATE_STEM = "duplicate_stem"
NO_TILES = "no_tiles"
UNSAFE_NAME = "unsafe_name"  # a file name, imagePath or category that cannot become a path
MALFORMED_ENTRY = "malformed_entry"  # a COCO image/category/annotation entry that cannot be used
SKIPPED, USED_IMAGE_SIZE = "skipped", "used_image_size"
