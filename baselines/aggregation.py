"""Patch features from several backbone stages.

PatchCore describes each feature-map position by its local neighbourhood: features are averaged over
a ``k x k`` window (stride 1, so the resolution is kept), which adds context without the blur of a
deeper layer. Deeper stages are upsampled (bilinear) to the finest stage's grid and concatenated.

The map post-processing (upsampling to the input, Gaussian smoothing with sigma 4 pixels as both
papers do, the image score: the map's maximum or the mean of its top ``topk`` fraction) is shared by
every method and lives in :mod:`threecad.postprocess`; its names are re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from threecad.postprocess import gaussian_blur, gaussian_kernel1d, top_fraction_mean, upsample_maps

__all__ = ["combine_stages", "gaussian_blur", "gaussian_kernel1d", "local_aggregate", "top_fraction_mean",
           "upsample_maps"]


def local_aggregate(feature: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """Mean over each position's ``kernel x kernel`` neighbourhood (B, C, H, W) -> same shape.

    Border positions average only the neighbours that exist (zero padding is not counted).
    """
    if kernel <= 1:
        return feature
    return F.avg_pool2d(feature, kernel, stride=1, padding=kernel // 2, count_include_pad=False)


def combine_stages(features: list[torch.Tensor], kernel: int = 3, balance: bool = False) -> torch.Tensor:
    """Aggregate each stage, upsample all to the first (finest) stage's grid, concatenate channels.

    With ``balance``, each stage is scaled by ``1 / sqrt(channels)`` so that every stage adds the mean
    (not the sum) of its squared channel differences to a Euclidean distance. The PatchCore paper gets
    the same weighting by pooling every layer to one common dimension before stacking them; without
    it the widest stage (usually the deepest, coarsest one) dominates the distance.
    """
    size = features[0].shape[-2:]
    out = []
    for feature in features:
        feature = local_aggregate(feature, kernel)
        if balance:
            feature = feature / feature.shape[1] ** 0.5
        if feature.shape[-2:] != size:
            feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
        out.append(feature)
    return torch.cat(out, 1)
