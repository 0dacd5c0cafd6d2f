"""Ground-truth regions for the per-region overlap (PRO).

PRO at a threshold t is the mean over all K regions of the fraction of each region's pixels scoring
>= t. Writing that mean as a sum over anomalous pixels,

    PRO(t) = (1 / K) * sum over anomalous pixels p with s_p >= t of 1 / |region(p)|,

turns PRO into one more per-score accumulator (like the true-positive count), so it streams.
Regions are 8-connected (a 3x3 structuring element of ones) and belong to one image: a batch is
labelled as a 3-D volume whose structuring element has no links across the batch axis.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


def region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """For a (B, H, W) bool batch: ``1 / |region|`` of every anomalous pixel (row-major order) and K.

    The order is that of ``maps[masks]`` for maps of the same shape, numpy or torch alike.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 2:
        masks = masks[None]
    labels, count = ndimage.label(masks, structure=_STRUCTURE)
    if count == 0:
        return np.zeros(0, dtype=np.float64), 0
    region_of_pixel = labels[masks]
    sizes = np.bincount(region_of_pixel, minlength=count + 1)
    return 1.0 / sizes[region_of_pixel], int(count)
