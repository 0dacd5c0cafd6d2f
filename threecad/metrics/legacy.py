"""The ``3cad-paper`` protocol: what the official 3CAD evaluation computes (legacy; for comparison only).

Implemented from the protocol's description (``docs/metrics.md``), not from its code:

* maps and masks are squashed to 256x256 (maps bilinear unless already 256x256, masks nearest
  neighbour then binarised); maps are smoothed with a Gaussian, sigma 4 (scipy defaults: truncate 4,
  reflect border), in float64;
* image score = max of the smoothed map; the image label is "the resized mask has a defect pixel";
* P-AUROC and AP pool every 256x256 pixel (computed exactly by the streaming engine);
* PRO is per defective image: 200 thresholds ``arange(min, max, (max - min) / 200)`` of that image's
  map, a pixel counts when its score is ``> threshold``, PRO = mean over that image's 8-connected
  regions, FPR over that image's normal pixels; points with FPR < 0.3 are kept, FPR is divided by the
  largest kept FPR and the trapezoid area is taken; the reported value is the mean over images.

Where the official code would crash or produce NaN (empty resized mask, constant map, fewer than
two kept points, largest kept FPR of 0) the image is left out of the mean and a warning says so.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image
from scipy import ndimage

log = logging.getLogger(__name__)

SIZE = 256
SIGMA = 4.0
THRESHOLDS = 200
FPR_LIMIT = 0.3
_EIGHT = np.ones((3, 3), dtype=bool)


def squash_mask(mask: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to size x size (PIL, as the official loader)."""
    if mask.shape == (size, size):
        return mask.astype(bool)
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((size, size), Image.NEAREST)) > 127


def squash_map(anomaly_map: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Bilinear resize of a float map to size x size (a no-op for maps already at that size)."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
    if anomaly_map.shape == (size, size):
        return anomaly_map
    image = Image.fromarray(anomaly_map.astype(np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float64)


def smooth(anomaly_map: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(np.asarray(anomaly_map, dtype=np.float64), sigma=SIGMA)


def image_pro(anomaly_map: np.ndarray, mask: np.ndarray, name: str = "image") -> float | None:
    """The per-image PRO of the protocol (``None`` where the official code crashes or gives NaN)."""
    mask = np.asarray(mask, dtype=bool)
    values = np.asarray(anomaly_map, dtype=np.float64)
    labels, regions = ndimage.label(mask, structure=_EIGHT)
    if regions == 0:
        log.warning("3cad-paper PRO: %s has an empty mask after resizing; left out of the mean", name)
        return None
    low, high = float(values.min()), float(values.max())
    if high == low:
        log.warning("3cad-paper PRO: %s has a constant map; left out of the mean", name)
        return None
    thresholds = np.arange(low, high, (high - low) / THRESHOLDS)
    # Pixel p is above thresholds[i] (strictly) exactly for i < below[p] = #{thresholds < s_p}.
    below = np.searchsorted(thresholds, values, side="left")
    levels = thresholds.size + 1
    # above[r, i]: pixels of region r (0 = normal) scoring > thresholds[i].
    table = np.bincount((labels * levels + below).ravel(), minlength=(regions + 1) * levels)
    table = table.reshape(regions + 1, levels)
    above = np.cumsum(table[:, ::-1], axis=1)[:, ::-1][:, 1:]
    sizes = table.sum(axis=1)
    n_normal = sizes[0]
    if n_normal == 0:
        log.warning("3cad-paper PRO: %s has no normal pixels; left out of the mean", name)
        return None
    pro = (above[1:] / sizes[1:, None]).mean(axis=0)
    fpr = above[0] / n_normal
    keep = fpr < FPR_LIMIT
    if keep.sum() < 2 or fpr[keep].max() == 0:
        log.warning("3cad-paper PRO: %s keeps fewer than two usable curve points; left out of the mean", name)
        return None
    x = fpr[keep] / fpr[keep].max()
    y = pro[keep]
    # x falls as the threshold rises; integrate in increasing x.
    return float(np.trapezoid(y[::-1], x[::-1]))
