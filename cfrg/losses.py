"""CFRG's three training losses, as the official CFRG code defines them.

* ``distillation_loss`` (L_dis): per level, the per-pixel distance ``1 - cos(T, S)`` upsampled
  (bilinear, ``align_corners=False``) to the mask grid; normal pixels pull the distance to 0,
  synthetic-anomaly pixels push it to 2 (cosine to -1); mean over pixels, mean over levels.
* ``recovery_loss`` (L_rec): per level and sample, ``1 - cos`` between the *flattened* clean-image
  teacher features and the recovery features; mean over the batch, **sum** over levels.
* ``segmentation_loss`` (L_seg): binary cross-entropy on the logits against the full-size mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cfrg.model import channel_cosine


def distillation_loss(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    size = mask.shape[-2:]
    terms = []
    for t, s in zip(teacher, student):
        distance = F.interpolate(1 - channel_cosine(t, s), size=size, mode="bilinear", align_corners=False)
        terms.append((mask * (1 - distance) + (1 - mask) * distance).mean())
    return torch.stack(terms).mean()


def recovery_loss(teacher_clean: Sequence[torch.Tensor], recovery: Sequence[torch.Tensor]) -> torch.Tensor:
    total = teacher_clean[0].new_zeros(())
    for t, r in zip(teacher_clean, recovery):
        total = total + (1 - F.cosine_similarity(t.flatten(1), r.flatten(1), dim=1)).mean()
    return total


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, mask)


def cfrg_losses(outputs: dict, mask: torch.Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0)) -> dict:
    """``{"loss", "dis", "rec", "seg"}`` from :class:`cfrg.model.CFRGNet` training outputs (float32 maths)."""
    mask = mask.float()
    dis = distillation_loss([t.float() for t in outputs["teacher"]], [s.float() for s in outputs["student"]], mask)
    rec = recovery_loss([t.float() for t in outputs["teacher_clean"]], [r.float() for r in outputs["recovery"]])
    seg = segmentation_loss(outputs["logits"].float(), mask)
    w_dis, w_rec, w_seg = weights
    return {"loss": w_dis * dis + w_rec * rec + w_seg * seg, "dis": dis, "rec": rec, "seg": seg}
