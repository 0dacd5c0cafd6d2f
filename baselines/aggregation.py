"""Patch features from several backbone stages.

PatchCore describes each feature-map position by its local neighbourhood: features are averaged over
a ``k x k`` window (stride 1, so the resolution is kept), which adds context without the blur of a
deeper layer. Deeper stages are upsampled (bilinear) to the finest stage's grid and concatenated.

The map post-processing (upsampling to the input, Gaussian smoothing with sigma 4 pixels as both
papers do, the image score: the map's maximum or the mean of its top ``topk`` fraction) is shared by
every method and lives in :mod:`threecad.maps.postprocess`; its names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from threecad.maps.postprocess import gaussian_blur, gaussian_kernel1d, top_fraction_mean, upsample_maps

__all__ = ["combine_stages", "gaussian_blur", "gaussian_kernel1d", "local_aggregate", "local_brightness",
           "top_fraction_mean", "upsample_maps", "with_brightness"]


def local_aggregate(feature: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """Mean over each position's ``kernel x kernel`` neighbourhood (B, C, H, W) -> same shape.

    Border positions average only the neighbours that exist (zero padding is not counted).
    """
    if kernel <= 1:
        return feature
    return F.avg_pool2d(feature, kernel, stride=1, padding=kernel // 2, count_include_pad=False)


def resize_concat(features: Sequence[torch.Tensor], grid: int = 0, align_corners: bool = False) -> torch.Tensor:
    """Every level resized bilinearly to level ``grid``'s size (0: the finest, -1: the coarsest),
    concatenated over channels. ``align_corners=True`` is the UniAD/CRAD neck (MFCN, torch's
    ``UpsamplingBilinear2d``); shrinking point-samples either way (no antialiasing)."""
    size = features[grid].shape[-2:]
    return torch.cat([f if f.shape[-2:] == size else
                      F.interpolate(f, size=size, mode="bilinear", align_corners=align_corners) for f in features], 1)


def combine_stages(features: list[torch.Tensor], kernel: int = 3) -> torch.Tensor:
    """Aggregate each stage, upsample all to the first (finest) stage's grid, concatenate channels."""
    return resize_concat([local_aggregate(feature, kernel) for feature in features])


def local_brightness(images: torch.Tensor, grid: tuple[int, int], kernel: int = 3) -> torch.Tensor:
    """(B, 1, h, w) mean grey level of ``images`` (B, 3, H, W) over each cell of an ``h x w`` grid,
    then over the same ``kernel x kernel`` neighbourhood as the deep features (:func:`local_aggregate`)."""
    grey = F.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), grid)
    return local_aggregate(grey, kernel)


def with_brightness(features: torch.Tensor, images: torch.Tensor, weight: float, kernel: int = 3) -> torch.Tensor:
    """Patch features (B, C, h, w) with one more channel, ``weight`` times :func:`local_brightness`.

    Deep features barely change under a gentle change of brightness, so the inside of a large,
    faint defect (uneven grinding, a worn area, a stain) looks normal and only its rim stands out;
    with this channel a patch's nearest normal patch must match both texture and brightness.
    ``weight`` sets how much a grey-level difference counts against a feature distance.
    """
    grey = local_brightness(images, tuple(features.shape[-2:]), kernel).to(features.device, features.dtype)
    return torch.cat([features, weight * grey], dim=1)
