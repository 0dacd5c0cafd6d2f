"""The CFRG network: frozen teacher, student + adapters, recovery (OCBE + reverse decoder), U-Net head.

Written from the module descriptions in ``../shared/reference/cfrg.md`` (section 3). Modules that the
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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from threecad.backbones import FeatureExtractor, create_backbone
from threecad.errors import ThreecadError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Teacher taps: the ends of the stride-4/8/16 stages (WRN layer1-3; EfficientNet blocks 2, 4, 10).
TEACHER_LAYERS = ("stride4", "stride8", "stride16")
#: Student taps among EfficientNet-B0's 16 MBConv blocks (24, 40, 112 channels at strides 4, 8, 16).
STUDENT_BLOCKS = (2, 4, 10)
PAPER_TEACHER = "wide_resnet50_2"
OFFLINE_TEACHER = "efficientnet_lite0"


def channel_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel cosine similarity over channels, (B, C, H, W) x2 -> (B, 1, H, W)."""
    return F.cosine_similarity(a, b, dim=1, eps=1e-8).unsqueeze(1)


# --------------------------------------------------------------------------------------------- teacher
class Teacher(nn.Module):
    """Frozen pretrained backbone returning its three tap features as ordinary (autograd-usable) tensors."""

    def __init__(self, name: str = PAPER_TEACHER, weights: str | None = "default",
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.extractor = FeatureExtractor(name, layers=TEACHER_LAYERS, weights=weights, device=device)
        self.name = self.extractor.name
        self.channels = tuple(self.extractor.out_channels)
        # ResNet taps follow a ReLU (>= 0); EfficientNet taps end in a linear projection + BN (signed).
        self.signed = self.name.startswith("efficientnet")

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen BN statistics, always

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.extractor(images)
        # The extractor runs under inference_mode; a clone turns its outputs into normal tensors
        # that later autograd-recorded ops (the gated U-Net inputs) may save for backward.
        return [feats[layer].clone() for layer in TEACHER_LAYERS]


def build_teacher(name: str, weights: str | None = "default") -> Teacher:
    """The teacher; a missing WideResNet weight file falls back to the offline Lite0 with a warning."""
    try:
        return Teacher(name, weights)
    except ThreecadError as exc:
        key = name.strip().lower().replace("-", "_")
        if key not in (PAPER_TEACHER, "wide_resnet50") or weights not in ("default", "pretrained", "imagenet"):
            raise
        log.warning("%s; falling back to the pretrained %s teacher (adapters, bottleneck and decoder are "
                    "sized from its channels). Place the file to get the paper configuration.", exc, OFFLINE_TEACHER)
        return Teacher(OFFLINE_TEACHER, "default")


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


# --------------------------------------------------------------------------------------------- recovery
def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3) with an explicit width and output width."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class UpBottleneck(nn.Module):
    """Decoder bottleneck; with ``upsample`` its middle conv and shortcut are 2x2 stride-2 transposed convs."""

    def __init__(self, c_in: int, width: int, c_out: int, upsample: bool = False, relu_out: bool = True):
        super().__init__()
        self.relu_out = relu_out
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = (nn.ConvTranspose2d(width, width, 2, 2, bias=False) if upsample
                      else nn.Conv2d(width, width, 3, 1, 1, bias=False))
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if upsample:
            self.shortcut = nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 2, 2, bias=False), nn.BatchNorm2d(c_out))
        elif c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity) if self.relu_out else out + identity


class OCBE(nn.Module):
    """One-class bottleneck embedding: fuse three teacher levels at stride 16, compress to stride 32."""

    def __init__(self, channels: Sequence[int], blocks: int = 3):
        super().__init__()
        c1, c2, c3 = channels
        self.level1 = nn.Sequential(_conv_bn_relu(c1, c2, 2), _conv_bn_relu(c2, c3, 2))
        self.level2 = _conv_bn_relu(c2, c3, 2)
        layers = [Bottleneck(3 * c3, c3, 2 * c3, stride=2)]
        layers += [Bottleneck(2 * c3, c3, 2 * c3) for _ in range(1, blocks)]
        self.blocks = nn.Sequential(*layers)
        self.out_channels = 2 * c3

    def fuse(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.level1(feats[0]), self.level2(feats[1]), feats[2]], dim=1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.blocks(self.fuse(feats))


class Decoder(nn.Module):
    """Reverse ResNet: stride 32 -> features shaped like the teacher's three levels (returned fine to coarse)."""

    def __init__(self, channels: Sequence[int], c_in: int, blocks: Sequence[int] = (3, 4, 6),
                 signed: bool = False):
        super().__init__()
        stages = []
        for c_out, n in zip(reversed(tuple(channels)), blocks):
            width = c_out // 2
            layer = [UpBottleneck(c_in, width, c_out, upsample=True)]
            layer += [UpBottleneck(c_out, width, c_out) for _ in range(1, n)]
            layer[-1].relu_out = not signed  # each stage's output must be able to match the teacher's range
            stages.append(nn.Sequential(*layer))
            c_in = c_out
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out[::-1]


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
class CFRGNet(nn.Module):
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

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything except the frozen teacher (rebuilt from its weight file)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise ThreecadError(f"CFRG weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                                "was the run trained with another teacher?")

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


def count_parameters(module: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)
