"""Patch features from several backbone stages, and the map post-processing shared by the methods.

PatchCore describes each feature-map position by its local neighbourhood: features are averaged over
a ``k x k`` window (stride 1, so the resolution is kept), which adds context without the blur of a
deeper layer. Deeper stages are upsampled (bilinear) to the finest stage's grid and concatenated.
Anomaly maps are upsampled to the input resolution and smoothed with a Gaussian (sigma 4 pixels),
as both papers do. An image's score is its map's maximum (both papers) or, with ``topk``, the mean
of the map's highest ``topk`` fraction of pixels: one extreme pixel of a normal image (a rare but
normal structure) then weighs less than a defect that raises a whole region.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``round(truncate * sigma)`` (scipy.ndimage's convention)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, mirror borders (scipy ``mode="mirror"``)."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps.device)
    radius = kernel.numel() // 2
    x = maps[:, None].float()
    for dim in (2, 3):
        n = x.shape[dim]
        pad = min(radius, n - 1)
        if pad < radius:  # tiny maps: reflect padding cannot exceed the size, so replicate the rest
            x = F.pad(x, (0, 0, pad, pad) if dim == 2 else (pad, pad, 0, 0), mode="reflect") if pad else x
            extra = radius - pad
            x = F.pad(x, (0, 0, extra, extra) if dim == 2 else (extra, extra, 0, 0), mode="replicate")
        else:
            x = F.pad(x, (0, 0, radius, radius) if dim == 2 else (radius, radius, 0, 0), mode="reflect")
        weight = kernel.view(1, 1, -1, 1) if dim == 2 else kernel.view(1, 1, 1, -1)
        x = F.conv2d(x, weight)
    return x[:, 0]


def upsample_maps(patch_maps: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """(B, h, w) patch scores -> (B, H, W) at ``size`` (bilinear), then Gaussian-smoothed."""
    maps = F.interpolate(patch_maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(maps, sigma)


def top_fraction_mean(maps: torch.Tensor, topk: float = 0.0) -> torch.Tensor:
    """Image scores (B,) of (B, H, W) maps: the maximum (``topk`` <= 0), else the mean of the top
    ``max(1, round(topk * H * W))`` pixels of each map."""
    flat = maps.flatten(1)
    if topk <= 0:
        return flat.amax(1)
    if topk > 1:
        raise ValueError(f"topk is a fraction of the map's pixels in [0, 1], got {topk}")
    k = max(1, int(round(topk * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)
