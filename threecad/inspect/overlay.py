"""Heat-map overlays and the regions above the pixel threshold.

The overlay is the frame (8-bit RGB; grey frames replicated) blended with the anomaly map through matplotlib's
``inferno`` colour map, the blend weight rising with the map value (half at the top of the
scale) so that quiet areas still show the part. The colour scale runs from the frame's lowest
map value to its highest, or to the pixel threshold when that is higher, so a normal frame
below the threshold never looks saturated. Regions above the pixel threshold are outlined in
cyan, the line about 1/1000 of the frame's long side thick (at least 1 pixel), so it shows at
full size on a 4096-pixel line-scan frame.

Regions are the 8-connected components of ``map > pixel_threshold`` (strictly above, as the
image decision).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from scipy import ndimage

from threecad.io import to_uint8

OUTLINE = np.array([0, 255, 255], dtype=np.uint8)
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Regions:
    """The connected regions above the pixel threshold: the mask, their count, the largest one's box and area."""

    mask: np.ndarray
    count: int
    box: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (x1, y1 exclusive) of the largest region
    area: int  # pixels of the largest region; 0 when there is none


def find_regions(amap: np.ndarray, pixel_threshold: float) -> Regions:
    """Components of ``amap > pixel_threshold`` (8-connected) and the largest one (ties: the first in scan order)."""
    mask = np.asarray(amap) > pixel_threshold
    labels, count = ndimage.label(mask, structure=_EIGHT)
    if count == 0:
        return Regions(mask, 0, None, 0)
    areas = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(areas))
    rows, cols = ndimage.find_objects(labels)[largest]
    return Regions(mask, int(count), (int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)),
                   int(areas[largest]))


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
    """The frame as 8-bit RGB (16 bits scaled by bit depth, grey replicated): colour frames stay in colour."""
    image = to_uint8(np.asarray(image))
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def _outline(regions: np.ndarray, width: int) -> np.ndarray:
    """The border pixels of ``regions``, ``width`` pixels thick, computed on the regions' bounding box only
    (a 4096-pixel frame with a few small defects costs milliseconds, not a whole-frame morphology)."""
    edge = np.zeros_like(regions)
    rows, cols = np.nonzero(regions.any(axis=1))[0], np.nonzero(regions.any(axis=0))[0]
    pad = width + 1
    y0, y1 = max(0, rows[0] - pad), min(regions.shape[0], rows[-1] + 1 + pad)
    x0, x1 = max(0, cols[0] - pad), min(regions.shape[1], cols[-1] + 1 + pad)
    part = regions[y0:y1, x0:x1]
    border = part & ~ndimage.binary_erosion(part, structure=_EIGHT, border_value=0)
    if width > 1:
        border = ndimage.binary_dilation(border, structure=_EIGHT, iterations=width - 1)
    edge[y0:y1, x0:x1] = border
    return edge


def overlay(image: np.ndarray, amap: np.ndarray, regions: np.ndarray | None = None,
            pixel_threshold: float | None = None) -> np.ndarray:
    """The frame with the map blended over it and ``regions`` (a boolean mask) outlined: uint8 HxWx3."""
    frame = _rgb_uint8(image)
    amap = np.asarray(amap, dtype=np.float32)
    low = float(amap.min())
    high = float(amap.max()) if pixel_threshold is None else max(float(amap.max()), float(pixel_threshold))
    scale = 255.0 / (high - low) if high > low else 0.0
    index = np.clip((amap - low) * scale + 0.5, 0, 255).astype(np.uint8)  # the colour-map level, 0..255
    # Integer blend per channel through 256-entry tables (a float RGB frame of 4096 x 1024 costs ~10x more):
    # weight w = 128 * level / 255 of 256 (half at the top), out = (frame * (256 - w) + colour * w) >> 8.
    weight = (np.arange(256, dtype=np.uint32) * 128 + 127) // 255
    colours = np.round(colormaps["inferno"](np.arange(256) / 255.0)[:, :3] * 255).astype(np.uint32)
    w = weight.astype(np.uint16)[index]
    keep = 256 - w
    out = np.empty((*amap.shape, 3), dtype=np.uint8)
    for c in range(3):
        tinted = (colours[:, c] * weight).astype(np.uint16)[index]  # <= 255 * 128: fits 16 bits
        out[..., c] = ((frame[..., c] * keep + tinted) >> 8).astype(np.uint8)
    if regions is not None and regions.any():
        out[_outline(regions, max(1, round(max(amap.shape) / 1000)))] = OUTLINE
    return out
