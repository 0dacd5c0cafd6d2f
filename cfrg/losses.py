"""CFRG's three training losses, as the official CFRG code defines them.

* ``distillation_loss`` (L_dis): per level, the per-pixel distance ``1 - cos(T, S)`` upsampled
  (bilinear, ``align_corners=False``) to the mask grid; normal pixels pull the distance to 0,
  synthetic-anomaly pixels push it to 2 (cosine to -1); mean over pixels, mean over levels.
* L_rec (:func:`threecad.methods.blocks.flattened_cosine_loss`, shared with RD): per level and sample, ``1 - cos`` between the *flattened* clean-image
  teacher features and the recovery features; mean over the batch, **sum** over levels.
* ``segmentation_loss`` (L_seg): binary cross-entropy on the logits against the full-size mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cfrg.model import channel_cosine
from threecad.methods.blocks import flattened_cosine_loss


def distillation_loss(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    size = mask.shape[-2:]
    terms = []
    for t, s in zip(teacher, student):
        distance = F.interpolate(1 - channel_cosine(t, s), size=size, mode="bilinear", align_corners=False)
        terms.append((mask * (1 - distance) + (1 - mask) * distance).mean())
    return torch.stack(terms).mean()


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, mask)


def cfrg_losses(outputs: dict, mask: torch.Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0)) -> dict:
    """``{"loss", "dis", "rec", "seg"}`` from :class:`cfrg.model.CFRGNet` training outputs (float32 maths)."""
    mask = mask.float()
    dis = distillation_loss([t.float() for t in outputs["teacher"]], [s.float() for s in outputs["student"]], mask)
    rec = flattened_cosine_loss(outputs["teacher_clean"], outputs["recovery"])
    seg = segmentation_loss(outputs["logits"].float(), mask)
    w_dis, w_rec, w_seg = weights
    return {"loss": w_dis * dis + w_rec * rec + w_seg * seg, "dis": dis, "rec": rec, "seg": seg}
