"""The CFRG network: frozen teacher, student + adapters, recovery (OCBE + reverse decoder), U-Net head.

Written from the module descriptions of the official CFRG/3CAD code. Modules that the
official code builds but never uses are not built here: teacher layer4/fc, student blocks 11-15 and
head, the OCBE ``conv4``/``bn4``. All widths derive from the teacher's three tap widths
``(c1, c2, c3)``, so the paper configuration (WideResNet-50-2: 256, 512, 1024) and the offline one
(EfficientNet-Lite0: 24, 40, 112) share one implementation:

* adapters map student widths to ``c1, c2, c3``;
* OCBE: ``c1 -> c2 -> c3`` and ``c2 -> c3`` stride-2 convs, concat ``3 c3``, three bottlenecks
  (width ``c3``, output ``2 c3``, the first with stride 2);
* decoder: three up-sampling bottleneck stages to ``c3, c2, c1`` (width half the output);
* adapters and decoder stages end in a ReLU for ResNet teachers (their taps follow a ReLU, as in
  the paper) and without it for EfficientNet teachers, whose taps are signed: a non-negative output
  could never match them, which caps both the distillation and the recovery cosine;
* U-Net: transpose-conv + skip at the two coarse levels, two more x2 up-samplings without skip
  (widths ``c1/2``, ``c1/4``, at least 32 and 16), a 3x3 conv to one logit channel.

The teacher, OCBE and decoder are shared with RD and RD++ and live in
:mod:`threecad.methods.blocks` (imported here under their old names).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from threecad.backbones import create_backbone

# The teacher, OCBE and reverse decoder are shared with RD and RD++ (threecad.methods.blocks).
from threecad.methods.blocks import OCBE, Decoder, FrozenPartNet, Teacher

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Student taps among EfficientNet-B0's 16 MBConv blocks (24, 40, 112 channels at strides 4, 8, 16).
STUDENT_BLOCKS = (2, 4, 10)


def channel_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel cosine similarity over channels, (B, C, H, W) x2 -> (B, 1, H, W)."""
    return F.cosine_similarity(a, b, dim=1, eps=1e-8).unsqueeze(1)


# --------------------------------------------------------------------------------------------- student
class Student(nn.Module):
    """EfficientNet-B0 (random init) truncated after its last tap; returns the three tap features."""

    def __init__(self, taps: Sequence[int] = STUDENT_BLOCKS):
        super().__init__()
        net = create_backbone("efficientnet_b0", weights="random")
        self.taps = tuple(taps)
        self.stem = net._conv_stem
        self.bn0 = net._bn0
        self.act = net.act
        self.blocks = nn.ModuleList(net._blocks[: max(self.taps) + 1])
        self.channels = tuple(self.blocks[i].out_ch for i in self.taps)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self.bn0(self.stem((images - self.mean) / self.std)))
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                out.append(x)
        return out


class Adapter(nn.Sequential):
    """Depthwise 3x3, 1x1, BN-ReLU, full 3x3, 1x1 to ``c_out``, BN-ReLU; no biases, size kept.

    ``final_relu=False`` drops the last ReLU, for teachers whose features are signed.
    """

    def __init__(self, c_in: int, c_out: int, final_relu: bool = True):
        layers = [
            nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_in, c_in, 3, padding=1, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        super().__init__(*layers, *([nn.ReLU(inplace=True)] if final_relu else []))


# Recovery (OCBE + reverse decoder): threecad.methods.blocks.


# --------------------------------------------------------------------------------------------- U-Net head
class _Up(nn.Module):
    """x2 transposed conv (k4 s2 p1), optional skip concat, two conv-BN-ReLU."""

    def __init__(self, c_in: int, c_out: int, skip: int = 0):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 4, 2, 1)
        self.convs = nn.Sequential(
            nn.Conv2d(c_out + skip, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class SegmentationHead(nn.Module):
    """U-Net-like decoder over the gated teacher features; logits at 4x the finest level's size."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        c1, c2, c3 = channels
        u3, u4 = max(c1 // 2, 32), max(c1 // 4, 16)
        self.up1 = _Up(c3, c2, skip=c2)
        self.up2 = _Up(c2, c1, skip=c1)
        self.up3 = _Up(c1, u3)
        self.up4 = _Up(u3, u4)
        self.out = nn.Conv2d(u4, 1, 3, padding=1)

    @staticmethod
    def gate(t: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (1 - channel_cosine(t, s)) * (1 - channel_cosine(t, r)) * t

    def forward(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                recovery: Sequence[torch.Tensor]) -> torch.Tensor:
        x1, x2, x3 = (self.gate(t, s, r) for t, s, r in zip(teacher, student, recovery))
        x = self.up2(self.up1(x3, x2), x1)
        return self.out(self.up4(self.up3(x)))


# --------------------------------------------------------------------------------------------- CFRG
class CFRGNet(FrozenPartNet):
    """Teacher + student/adapters + OCBE/decoder + segmentation head.

    ``forward(images)`` returns a dict with ``teacher``, ``student`` (adapted), ``recovery`` (lists of
    three maps) and ``logits`` (B, 1, H, W). ``forward(images, clean)`` also returns ``teacher_clean``
    (the recovery target), computing both teacher passes as one batch.
    """

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.teacher = teacher
        channels = teacher.channels
        self.student = Student()
        signed = teacher.signed
        self.adapters = nn.ModuleList(Adapter(s, t, final_relu=not signed) for s, t in zip(self.student.channels, channels))
        self.ocbe = OCBE(channels)
        self.decoder = Decoder(channels, self.ocbe.out_channels, signed=signed)
        self.head = SegmentationHead(channels)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "adapters": self.adapters, "ocbe": self.ocbe,
                "decoder": self.decoder, "head": self.head}

    def forward(self, images: torch.Tensor, clean: torch.Tensor | None = None) -> dict:
        if clean is not None:
            both = self.teacher(torch.cat([images, clean]))
            b = images.shape[0]
            teacher, teacher_clean = [t[:b] for t in both], [t[b:] for t in both]
        else:
            teacher, teacher_clean = self.teacher(images), None
        student = [adapter(s) for adapter, s in zip(self.adapters, self.student(images))]
        recovery = self.decoder(self.ocbe(teacher))
        logits = self.head(teacher, student, recovery)
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        out = {"teacher": teacher, "student": student, "recovery": recovery, "logits": logits}
        if teacher_clean is not None:
            out["teacher_clean"] = teacher_clean
        return out
