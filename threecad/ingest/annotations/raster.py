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
#: 5-bit groups allowed per run in a compressed RLE string: 8 (40 bits; a 400 M pixel image needs 29).
_MAX_GROUPS = 8


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


def rle_size(rle: object) -> tuple[int, int]:
    """``(height, width)`` of a COCO RLE dict; ``ValueError`` naming what is wrong otherwise."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("an RLE needs 'size' and 'counts'")
    size = rle["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_count(v) for v in size):
        raise ValueError(f"RLE size must be [height, width] with non-negative integers, got {str(size)[:80]}")
    return int(size[0]), int(size[1])


def _count(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


def _string_counts(text: str | bytes) -> np.ndarray:
    """Run lengths of a compressed COCO ``counts`` string (pycocotools' text format).

    Each run is written in 5-bit groups, least significant first, as characters ``48 + group``;
    bit 0x20 of a character means "another group follows" and bit 0x10 of a run's last character
    is its sign. From the fourth run on, the number stored is the difference to the run two places
    earlier. Decoded here with numpy so that a malformed string is refused instead of reaching C
    code that does not check it (pycocotools fills a short string's missing pixels from
    uninitialised memory). At most :data:`_MAX_GROUPS` groups per run (40 bits).
    """
    data = np.frombuffer(text.encode("ascii") if isinstance(text, str) else bytes(text), dtype=np.uint8)
    groups = data.astype(np.int64) - 48
    if not len(groups):
        return groups
    if (groups < 0).any() or (groups > 63).any():
        raise ValueError("RLE counts string has characters outside '0'..'o'")
    last = (groups & 0x20) == 0  # the last group of each run
    if not last[-1]:
        raise ValueError("RLE counts string ends in the middle of a run")
    run = np.concatenate([[0], np.cumsum(last[:-1])])  # run number of every character
    first = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    position = np.arange(len(groups)) - first[run]  # group number within its run
    if position.max() >= _MAX_GROUPS:
        raise ValueError(f"RLE counts string has a run of more than {_MAX_GROUPS} groups")
    values = np.zeros(len(first), dtype=np.int64)
    np.add.at(values, run, (groups & 0x1F) << (5 * position))
    ends = np.flatnonzero(last)
    negative = (groups[ends] & 0x10) != 0
    values[negative] -= np.int64(1) << (5 * (position[ends][negative] + 1))
    values[1::2] = np.cumsum(values[1::2])  # undo the differences to the run two places earlier
    values[2::2] = np.cumsum(values[2::2])
    return values


def rle_counts(rle: object) -> tuple[int, int, np.ndarray]:
    """``(height, width, run lengths)`` of a COCO RLE, validated: ``ValueError`` with the reason.

    Runs alternate background/foreground starting with background, are non-negative integers and
    must add up to exactly ``height * width``; ``counts`` is a list (uncompressed) or a string.
    """
    height, width = rle_size(rle)
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(_count(c) for c in counts):
            raise ValueError("uncompressed RLE counts must be non-negative integers")
        runs = np.asarray(counts, dtype=np.int64)
    elif isinstance(counts, (str, bytes)):
        try:
            runs = _string_counts(counts)
        except UnicodeEncodeError:
            raise ValueError("RLE counts string is not ASCII") from None
    else:
        raise ValueError(f"RLE counts must be a list or a string, got {type(counts).__name__}")
    if (runs < 0).any():
        raise ValueError("RLE counts string decodes to a negative run")
    if int(runs.sum()) != height * width:
        raise ValueError(f"RLE runs cover {int(runs.sum()):,} pixels, the size {height}x{width} has {height * width:,}")
    return height, width, runs


def rle_decode(rle: dict) -> np.ndarray:
    """A bool (H, W) mask from COCO RLE, compressed (string counts) or uncompressed (list counts).

    Validated by :func:`rle_counts` first (``ValueError`` for a malformed RLE); runs are laid out
    in column-major order, as COCO stores them.
    """
    height, width, runs = rle_counts(rle)
    values = (np.arange(len(runs)) % 2).astype(bool)
    return np.repeat(values, runs).reshape((height, width), order="F")
