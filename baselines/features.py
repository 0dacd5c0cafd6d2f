"""The frozen backbone feature extractor shared by PatchCore and PaDiM.

Layers are named by the backbone (``layer2``, ``blocks.4``) or by output stride (``stride8``,
``stride16``), which selects comparable depths whatever the backbone: "stride 8 and 16" is
WRN50's layer2 + layer3 and the matching EfficientNet-Lite stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def build_extractor(backbone: str, layers: Sequence[str], weights: str | None, device: torch.device):
    """A frozen, eval-mode :class:`threecad.backbones.FeatureExtractor` on ``device``."""
    from threecad.backbones import FeatureExtractor

    return FeatureExtractor(backbone, layers=tuple(layers), weights=weights, device=device)


def extract(extractor, images: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
    """Feature maps of ``images`` (B, 3, H, W) in [0, 1], in the order of ``layers``."""
    with torch.inference_mode():
        out = extractor(images)
    if isinstance(out, dict):
        return [out[name] for name in layers]
    return list(out)
