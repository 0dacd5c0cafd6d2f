"""Rasterisation with one pixel convention, and COCO RLE helpers.

**Convention (pixel centres).** Pixel ``(row i, column j)`` is the unit square
``[j, j+1) x [i, i+1)``; it belongs to a shape when its centre ``(j + 0.5, i + 0.5)`` lies inside.
Rings are filled with the even-odd rule, so holes stay holes and a valid multipolygon needs no
special case. A centre exactly on an edge follows the half-open rule (left/top edges in,
right/bottom edges out), so two shapes that share an edge never share a pixel and the square
``(10, 10)-(110, 110)`` covers exactly 100 x 100 = 10,000 pixels, as pycocotools counts it.

A shape with positive area can be too thin to contain any pixel centre (a pinhole of a third of
a pixel); :func:`rasterize` then marks the pixel under its representative point, so no annotated
defect ever disappears (``min_one_pixel``).

The fill is a vectorised scanline: for each row centre, every edge crossing toggles the parity of
all pixels to its right (a cumulative sum), which costs O(rows x edges) in the shape's bounding
box only.
"""

from __future__ import annotations

import math

import numpy as np
import shapely
from pycocotools import mask as coco_mask
from shapely.geometry import MultiPolygon, Polygon

#: Rows filled per block, bounded so that the (rows x edges) work arrays stay small.
_BLOCK_CELLS = 4_000_000


def _rings(geom: Polygon | MultiPolygon) -> list[np.ndarray]:
    rings = []
    for poly in shapely.get_parts(geom):
        if poly.is_empty:
            continue
        rings.append(np.asarray(poly.exterior.coords, dtype=np.float64))
        rings.extend(np.asarray(r.coords, dtype=np.float64) for r in poly.interiors)
    return rings


def fill_rings(rings: list[np.ndarray], height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """Even-odd fill of closed rings (each (N, 2) x, y; first vertex repeated or not) into a bool mask."""
    mask = np.zeros((height, width), dtype=bool) if out is None else out
    if not rings:
        return mask
    starts = np.concatenate([r for r in rings])
    ends = np.concatenate([np.roll(r, -1, axis=0) for r in rings])
    x0, y0, x1, y1 = starts[:, 0], starts[:, 1], ends[:, 0], ends[:, 1]
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    edge = hi > lo  # horizontal edges never cross a row centre
    x0, y0, x1, y1, lo, hi = x0[edge], y0[edge], x1[edge], y1[edge], lo[edge], hi[edge]
    if not len(x0):
        return mask
    slope = (x1 - x0) / (y1 - y0)
    # Rows whose centre r + 0.5 lies in [min y, max y): r in [ceil(min y - 0.5), ceil(max y - 0.5)).
    r_start = max(0, math.ceil(lo.min() - 0.5))
    r_stop = min(height, math.ceil(hi.max() - 0.5))
    c_start = max(0, math.floor(min(x0.min(), x1.min())))
    c_stop = min(width, math.ceil(max(x0.max(), x1.max())) + 1)
    if r_stop <= r_start or c_stop <= c_start:
        return mask
    span = c_stop - c_start
    block = max(1, _BLOCK_CELLS // max(len(x0), span))
    for b0 in range(r_start, r_stop, block):
        rows = np.arange(b0, min(r_stop, b0 + block))
        yc = rows[:, None] + 0.5
        crosses = (lo[None, :] <= yc) & (yc < hi[None, :])
        ri, ei = np.nonzero(crosses)
        xs = x0[ei] + (rows[ri] + 0.5 - y0[ei]) * slope[ei]
        # Pixel j is right of a crossing at x when its centre j + 0.5 >= x, i.e. j >= ceil(x - 0.5).
        cols = np.clip(np.ceil(xs - 0.5).astype(np.int64) - c_start, 0, span)
        counts = np.bincount(ri * (span + 1) + cols, minlength=len(rows) * (span + 1))
        parity = np.cumsum(counts.reshape(len(rows), span + 1), axis=1)[:, :span] & 1
        mask[rows[0] : rows[-1] + 1, c_start:c_stop] ^= parity.astype(bool)
    return mask


def rasterize(
    geom: Polygon | MultiPolygon | None, height: int, width: int, min_one_pixel: bool = True
) -> np.ndarray:
    """A bool (H, W) mask of a polygonal geometry under the pixel-centre convention."""
    mask = np.zeros((height, width), dtype=bool)
    if geom is None or geom.is_empty:
        return mask
    fill_rings(_rings(geom), height, width, out=mask)
    if min_one_pixel and not mask.any() and geom.area > 0:
        point = geom.representative_point()
        col = min(width - 1, max(0, math.floor(point.x)))
        row = min(height - 1, max(0, math.floor(point.y)))
        mask[row, col] = True
    return mask


def rle_encode(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a bool mask, with ``counts`` as an ASCII string (JSON-ready)."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: dict) -> np.ndarray:
    """A bool (H, W) mask from COCO RLE, compressed (string counts) or uncompressed (list counts)."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    else:
        rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.decode(rle).astype(bool)
