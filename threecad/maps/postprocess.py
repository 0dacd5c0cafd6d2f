"""Anomaly-map post-processing shared by every method: upsampling, Gaussian smoothing, image scores.

One implementation for all methods (PatchCore, PaDiM, RD, RD++, CFRG), in PyTorch so that it runs
on the device the maps were computed on.

Smoothing follows ``scipy.ndimage.gaussian_filter`` with its defaults, which is what the official
RD, RD++ and CFRG code calls on their maps: a separable Gaussian of radius ``int(truncate * sigma +
0.5)`` (``truncate`` 4, so 33 taps at sigma 4) and the ``"reflect"`` border, which extends a map by
its mirror image *including* the edge pixel (``d c b a | a b c d | d c b a``). That border mode was
chosen over ``"mirror"`` (``d c b | a b c d | c b a``, which PatchCore and PaDiM used here before)
because it is the reference code's: RD/CFRG numbers are reproduced to float rounding. The two
modes differ only within ``radius`` pixels of the border, by a small fraction of the local map
range (measured in ``docs/methods.md``). The extension is periodic with period ``2 n``, so maps
smaller than the kernel are handled exactly as scipy handles them. The arithmetic is float32: 3.6x
faster than float64 on a CPU core (4.9 against 17.6 ms per 256 x 256 map, one thread), and within
3e-7 of scipy's float64 result on maps in [0, 1] (tested to 1e-6), far below any score difference
that changes a ranking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gaussian_blur", "gaussian_kernel1d", "mean_filter", "reflect_indices", "top_fraction_mean",
           "upsample_maps"]


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(truncate * sigma + 0.5)`` (scipy.ndimage's convention)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def reflect_indices(n: int, radius: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Source index of each position ``-radius .. n - 1 + radius`` of a length-``n`` line extended by
    scipy's ``"reflect"`` rule (half-sample symmetric, period ``2 n``)."""
    index = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(index >= n, 2 * n - 1 - index, index)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian smoothing of ``(B, H, W)`` maps; equals ``scipy.ndimage.gaussian_filter(m, sigma)``
    (``mode="reflect"``, ``truncate`` 4) on each map. ``sigma <= 0``: the maps as float32."""
    if sigma <= 0:
        return maps.float()
    if maps.ndim != 3:
        raise ValueError(f"gaussian_blur takes (B, H, W) maps, got shape {tuple(maps.shape)}")
    dtype = torch.float32
    kernel = gaussian_kernel1d(sigma, truncate, dtype).to(maps.device)
    radius = kernel.numel() // 2
    x = maps[:, None].to(dtype)
    h, w = x.shape[-2:]
    x = x.index_select(2, reflect_indices(h, radius, x.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = x.index_select(3, reflect_indices(w, radius, x.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x[:, 0].float()


def mean_filter(maps: torch.Tensor, window: int) -> torch.Tensor:
    """``window`` x ``window`` moving average (stride 1, odd ``window``) of ``(B, H, W)`` maps, same
    size, float32: the zero padding of ``window // 2`` is counted in every mean, as the official
    UniAD/CRAD/DRAEM evaluations filter maps (borders are attenuated). ``window`` 1: unchanged."""
    if maps.ndim != 3:
        raise ValueError(f"mean_filter takes (B, H, W) maps, got shape {tuple(maps.shape)}")
    window = int(window)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"mean_filter needs an odd window >= 1 (a centred window), got {window}")
    x = maps[:, None].float()
    if window > 1:
        x = F.avg_pool2d(x, window, stride=1, padding=window // 2, count_include_pad=True)
    return x[:, 0]


def pooled_max(maps: torch.Tensor, pool: int) -> torch.Tensor:
    """``(B,)``: the maximum of the ``pool x pool`` average-pooled maps (stride 1, no padding; the
    window shrinks to the map where it is smaller)."""
    k = (min(pool, maps.shape[-2]), min(pool, maps.shape[-1]))
    return F.avg_pool2d(maps[:, None], k, stride=1).flatten(1).amax(1)


def upsample_maps(patch_maps: torch.Tensor, size: tuple[int, int], sigma: float = 4.0,
                  align_corners: bool = False) -> torch.Tensor:
    """``(B, h, w)`` patch scores -> ``(B, H, W)`` float32 at ``size`` (bilinear), then
    :func:`gaussian_blur` (``sigma`` 0: none). ``align_corners=True`` is the RD/RD++/CFRG
    official resize, ``False`` (half-pixel centres) PatchCore's and PaDiM's."""
    maps = patch_maps[:, None].float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=align_corners)
    return gaussian_blur(maps[:, 0], sigma)


def top_fraction_mean(maps: torch.Tensor, topk: float = 0.0) -> torch.Tensor:
    """Image scores (B,) of (B, H, W) maps: the maximum (``topk`` <= 0, every paper's score), else
    the mean of the top ``max(1, round(topk * H * W))`` pixels of each map.

    One extreme pixel of a normal image (a rare but normal structure) then weighs less than a
    defect that raises a whole region.
    """
    flat = maps.flatten(1)
    if topk <= 0:
        return flat.amax(1)
    if topk > 1:
        raise ValueError(f"topk is a fraction of the map's pixels in [0, 1], got {topk}")
    k = max(1, int(round(topk * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)
