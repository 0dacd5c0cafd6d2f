"""One annotation to one valid shapely geometry, with every problem found and the action taken.

Coordinates follow LabelMe and COCO: continuous pixel coordinates, ``(0, 0)`` is the top-left
corner of the top-left pixel and pixel ``(row i, column j)`` is the unit square
``[j, j+1) x [i, i+1)``. A vertex is outside the image when ``x < 0``, ``y < 0``, ``x > width`` or
``y > height`` (the border itself is inside).

Repairs never lose area that the annotator drew: self-intersecting rings go through
``shapely.make_valid`` and *every* polygonal part is kept (the bow-tie keeps both lobes; the
legacy ``buffer(0)`` drops one). What cannot be repaired (fewer than three distinct points, no
area, non-finite coordinates, nothing inside the image) is dropped and reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box
from shapely.validation import explain_validity

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
            "detail": self.detail,
        }


@dataclass
class RawAnnotation:
    """An annotation as read from a file, before any validation."""

    index: int
    label: str
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


def to_geometry(
    ann: RawAnnotation, width: int, height: int, line_width: float = 3.0
) -> tuple[Polygon | MultiPolygon | None, list[tuple[str, str, str]]]:
    """A valid polygonal geometry clipped to the image (or None), and ``(problem, action, detail)`` rows.

    ``line_width`` is the stroke width in pixels given to ``linestrip``/``line`` shapes, which
    LabelMe stores without one. ``rle`` annotations are masks, not geometries: use
    :func:`threecad.annotations.raster.rle_decode` for them.
    """
    issues: list[tuple[str, str, str]] = []
    kind = ann.shape_type
    if kind not in SHAPE_TYPES or kind == "rle":
        issues.append((UNSUPPORTED, DROPPED, f"shape_type {kind!r}"))
        return None, issues
    rings = [ann.points] if kind != "polygons" else []
    if kind == "polygons":
        if not isinstance(ann.points, list):
            issues.append((MALFORMED, DROPPED, "segmentation is not a list of polygons"))
            return None, issues
        for flat in ann.points:
            ok = isinstance(flat, (list, tuple)) and len(flat) % 2 == 0
            rings.append(_points_array(np.asarray(flat, dtype=object).reshape(-1, 2)) if ok else None)
    arrays = [r if isinstance(r, np.ndarray) else _points_array(r) for r in rings]
    if any(a is None or len(a) == 0 for a in arrays):
        issues.append((MALFORMED, DROPPED, "points are not a list of [x, y] pairs"))
        return None, issues
    if not all(np.isfinite(a).all() for a in arrays):
        issues.append((NON_FINITE, DROPPED, "NaN or infinite coordinate"))
        return None, issues
    pts = np.concatenate(arrays)
    geom = _build(kind, arrays, line_width, issues)
    if geom is None:
        return None, issues
    frame = box(0, 0, width, height)
    bounds = geom.bounds
    outside = bool((pts[:, 0] < 0).any() or (pts[:, 1] < 0).any() or (pts[:, 0] > width).any() or (pts[:, 1] > height).any())
    outside = outside or bounds[0] < 0 or bounds[1] < 0 or bounds[2] > width or bounds[3] > height
    if outside:
        clipped = _polygonal(geom.intersection(frame))
        if clipped.is_empty:
            issues.append((OUTSIDE_IMAGE, DROPPED, "nothing inside the image"))
            return None, issues
        issues.append((OUTSIDE_IMAGE, CLIPPED, f"kept {clipped.area / geom.area:.1%} of the area"))
        geom = clipped
    return geom, issues


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
SKIPPED, USED_IMAGE_SIZE = "skipped", "used_image_size"
