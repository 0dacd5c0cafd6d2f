"""Patch features from several backbone stages.

PatchCore describes each feature-map position by its local neighbourhood: features are averaged over
a ``k x k`` window (stride 1, so the resolution is kept), which adds context without the blur of a
deeper layer. Deeper stages are upsampled (bilinear) to the finest stage's grid and concatenated.

The map post-processing (upsampling to the input, Gaussian smoothing with sigma 4 pixels as both
papers do, the image score: the map's maximum or the mean of its top ``topk`` fraction) is shared by
every method and lives in :mod:`threecad.maps.postprocess`; its names are re-exported here.
"""

from __future__ import annotations

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


def combine_stages(features: list[torch.Tensor], kernel: int = 3) -> torch.Tensor:
    """Aggregate each stage, upsample all to the first (finest) stage's grid, concatenate channels."""
    size = features[0].shape[-2:]
    out = []
    for feature in features:
        feature = local_aggregate(feature, kernel)
        if feature.shape[-2:] != size:
            feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
        out.append(feature)
    return torch.cat(out, 1)


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
