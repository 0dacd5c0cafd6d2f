"""Sliding windows over large frames, as the 3CAD authors cut their line-scan images.

Windows come from ``sahi.slicing.get_slice_bboxes`` (row-major, step ``tile - int(overlap * tile)``,
the last row/column shifted back to end at the border, so it overlaps more than ``overlap``).

**Which windows are kept: the side rule.** The 3CAD supplement says images "with dimensions less
than 20 % of the window size were discarded", and the smallest images in its Table 1 are 288 px
(28 % of a 1024 window), so the rule is on *sides*, not area: a window, or a frame no larger than
the tile (which stays whole, one window), is kept when its **shorter side** is at least
``min_fraction * tile`` (``min(w, h) >= min_fraction * tile``); a window with either side shorter
is discarded. With the defaults (1024, 0.2) the threshold is 204.8 px: a 150 x 150 frame is
discarded, a 288 x 288 frame is kept whole. Because SAHI shifts border windows back inside the
image, windows are only ever shorter than the tile along a side where the frame itself is: a
4096 x 150 scan gives 1024 x 150 windows and is discarded whole, a 4096 x 300 scan is kept.
"""

from __future__ import annotations

from sahi.slicing import get_slice_bboxes

from threecad.errors import ThreecadError

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)


def check_tiling(tile: int, overlap: float, min_fraction: float) -> None:
    """Refuse tile sizes under 16 px, overlaps outside [0, 1) and side fractions outside [0, 1]."""
    if tile < 16:
        raise ThreecadError(f"--tile must be at least 16 pixels, got {tile}")
    if not 0.0 <= overlap < 1.0:
        raise ThreecadError(f"--overlap must be in [0, 1), got {overlap}")
    if not 0.0 <= min_fraction <= 1.0:
        raise ThreecadError(f"--min-fraction must be in [0, 1], got {min_fraction}")


def tile_windows(width: int, height: int, tile: int = 1024, overlap: float = 0.2, min_fraction: float = 0.2) -> list[Box]:
    """The kept windows of a ``width x height`` image, row-major (side rule: module docstring)."""
    check_tiling(tile, overlap, min_fraction)
    if width <= tile and height <= tile:
        return [(0, 0, width, height)] if min(width, height) >= min_fraction * tile else []
    boxes = get_slice_bboxes(
        image_height=height,
        image_width=width,
        slice_height=tile,
        slice_width=tile,
        overlap_height_ratio=overlap,
        overlap_width_ratio=overlap,
        auto_slice_resolution=False,
    )
    kept = []
    for x0, y0, x1, y1 in boxes:
        if min(x1 - x0, y1 - y0) >= min_fraction * tile:
            kept.append((int(x0), int(y0), int(x1), int(y1)))
    return list(dict.fromkeys(kept))  # SAHI can repeat a window on tiny images; keep the first
