"""Anomaly maps and image scores from CFRG outputs (as the official CFRG code computes them).

Official combination (the default, ``terms=("recovery", "segmentation")``): the sum over the three
levels of ``1 - cos(T, R)`` upsampled bilinearly (``align_corners=True``) to the input size, plus
``sigmoid(logits)``; then a Gaussian with sigma 4 (scipy defaults: truncate 4, reflect border;
:func:`threecad.maps.postprocess.gaussian_blur`, equal to scipy's to float32 rounding); the image score
is the map's maximum. Options: add the teacher-student term (``"distillation"``), use
one term alone, a different sigma (0 = none) or the mean of the top ``topk`` fraction as the score.
The official code handles batch size 1 only; this works on any batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from threecad.errors import ThreecadError
from threecad.maps.postprocess import gaussian_blur, top_fraction_mean
from threecad.methods.blocks import cosine_distance_map

TERMS = ("recovery", "segmentation", "distillation")
OFFICIAL_TERMS = ("recovery", "segmentation")


def raw_map(outputs: dict, size: tuple[int, int], terms: Sequence[str] = OFFICIAL_TERMS) -> torch.Tensor:
    """(B, H, W) unsmoothed map from the model's outputs."""
    unknown = [t for t in terms if t not in TERMS]
    if unknown or not terms:
        raise ThreecadError(f"unknown anomaly-map term(s) {unknown or terms}; choose from {', '.join(TERMS)}")
    total = 0
    if "recovery" in terms:
        total = total + cosine_distance_map(outputs["teacher"], outputs["recovery"], size)[:, None]
    if "distillation" in terms:
        total = total + cosine_distance_map(outputs["teacher"], outputs["student"], size)[:, None]
    if "segmentation" in terms:
        seg = torch.sigmoid(outputs["logits"].float())
        if seg.shape[-2:] != tuple(size):
            seg = F.interpolate(seg, size=size, mode="bilinear", align_corners=True)
        total = total + seg
    return total[:, 0]


def anomaly_maps(outputs: dict, size: tuple[int, int], terms: Sequence[str] = OFFICIAL_TERMS,
                 sigma: float = 4.0, topk: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B,), maps (B, H, W)) as float32 tensors (on the outputs' device)."""
    maps = gaussian_blur(raw_map(outputs, size, terms).detach(), sigma)
    return top_fraction_mean(maps, topk).float(), maps.float()
