"""Network blocks shared by the reverse-distillation family: RD, RD++ and CFRG.

Written from the module descriptions of the official code (RD4AD ``resnet.py``/``de_resnet.py``,
which RD++ and CFRG reuse unchanged); every width derives from the encoder's three tap widths
``(c1, c2, c3)``, so the paper configuration (WideResNet-50-2: 256, 512, 1024) and the offline one
(EfficientNet-Lite0: 24, 40, 112) share one implementation:

* :class:`Teacher`: a frozen pretrained encoder tapped at strides 4, 8 and 16 (WRN50 layer1-3,
  Lite0 blocks 2/4/10), always in eval mode, parameters ``requires_grad=False``, run no deeper
  than its last tap; :func:`build_teacher` resolves it offline (a missing WideResNet file falls
  back to Lite0 with a warning);
* :class:`OCBE` (one-class bottleneck embedding): ``c1 -> c2 -> c3`` and ``c2 -> c3`` stride-2
  convs, concatenated with level 3 (``3 c3``), then three bottlenecks (width ``c3``, output
  ``2 c3``, the first with stride 2). The official ``conv4``/``bn4``, built but never used, is not
  built. WRN50: 58,885,120 parameters;
* :class:`Decoder`: three up-sampling bottleneck stages (3, 4, 6 blocks) to ``c3, c2, c1``, width
  half the output, the first block of each a 2x2 stride-2 transposed conv. WRN50: 24,917,504.
  ``signed=True`` drops the final ReLU of each stage, for encoders whose taps are signed
  (EfficientNet taps end in a linear projection + BN: a ReLU output could never match them);
* :func:`flattened_cosine_loss` and :func:`cosine_distance_map`: the family's training loss and
  anomaly map.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from threecad.backbones import FeatureExtractor
from threecad.errors import ThreecadError

log = logging.getLogger(__name__)

#: Encoder taps: the ends of the stride-4/8/16 stages (WRN layer1-3; EfficientNet blocks 2, 4, 10).
TEACHER_LAYERS = ("stride4", "stride8", "stride16")
PAPER_TEACHER = "wide_resnet50_2"
OFFLINE_TEACHER = "efficientnet_lite0"


# --------------------------------------------------------------------------------------------- encoder
class Teacher(nn.Module):
    """Frozen pretrained backbone returning its three tap features as ordinary (autograd-usable) tensors."""

    def __init__(self, name: str = PAPER_TEACHER, weights: str | None = "default",
                 device: str | torch.device = "cpu", layers: Sequence[str] = TEACHER_LAYERS):
        super().__init__()
        self.layers = tuple(layers)  # other taps for other methods (SimpleNet: strides 8 and 16)
        self.extractor = FeatureExtractor(name, layers=self.layers, weights=weights, device=device)
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
        # that later autograd-recorded ops may save for backward.
        return [feats[layer].clone() for layer in self.layers]


class FrozenPartNet(nn.Module):
    """Base of a network made of one frozen pretrained part (attribute :attr:`frozen`, e.g. the
    teacher) and trainable parts: its saved state is the trainable parts only, since the frozen
    part is rebuilt from its weight file. Used by CFRG, RD/RD++, DeSTSeg, FastFlow and SimpleNet."""

    #: Attribute name of the frozen part.
    frozen: str = "teacher"

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything except the frozen part."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(f"{self.frozen}.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ThreecadError(f"the weights do not fit the network ({str(exc).splitlines()[-1].strip()}); "
                                "was the run trained with another encoder or other widths?") from None
        missing = [k for k in missing if not k.startswith(f"{self.frozen}.")]
        if missing or unexpected:
            raise ThreecadError(f"the weights do not fit the network (missing {missing[:3]}, unexpected "
                                f"{unexpected[:3]}); was the run trained with another encoder or method?")


#: Paper encoders whose torchvision file a user may lack: without it they fall back to Lite0.
FALLBACK_TEACHERS = (PAPER_TEACHER, "wide_resnet50", "resnet18", "efficientnet_b4")


def build_teacher(name: str, weights: str | None = "default", layers: Sequence[str] = TEACHER_LAYERS) -> Teacher:
    """The teacher; a missing WideResNet (or ResNet-18) weight file falls back to the offline Lite0 with a warning."""
    try:
        return Teacher(name, weights, layers=layers)
    except ThreecadError as exc:
        key = name.strip().lower().replace("-", "_")
        if key not in FALLBACK_TEACHERS or weights not in ("default", "pretrained", "imagenet"):
            raise
        log.warning("%s; falling back to the pretrained %s teacher (the networks trained on it are sized from "
                    "its channels). Place the file to get the paper configuration.", exc, OFFLINE_TEACHER)
        return Teacher(OFFLINE_TEACHER, "default", layers=layers)


# --------------------------------------------------------------------------------------------- OCBE + decoder
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
    """One-class bottleneck embedding: fuse three teacher levels at stride 16, compress to stride 32.

    ``width`` / ``out_channels``: the bottlenecks' inner and output widths (default ``c3`` and
    ``2 c3``, the official rule).
    """

    def __init__(self, channels: Sequence[int], blocks: int = 3, width: int | None = None,
                 out_channels: int | None = None):
        super().__init__()
        c1, c2, c3 = channels
        width = width or c3
        out = out_channels or 2 * c3
        self.level1 = nn.Sequential(_conv_bn_relu(c1, c2, 2), _conv_bn_relu(c2, c3, 2))
        self.level2 = _conv_bn_relu(c2, c3, 2)
        layers = [Bottleneck(3 * c3, width, out, stride=2)]
        layers += [Bottleneck(out, width, out) for _ in range(1, blocks)]
        self.blocks = nn.Sequential(*layers)
        self.out_channels = out

    def fuse(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.level1(feats[0]), self.level2(feats[1]), feats[2]], dim=1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.blocks(self.fuse(feats))


class Decoder(nn.Module):
    """Reverse ResNet: stride 32 -> features shaped like the teacher's three levels (returned fine to coarse).

    ``widths``: the inner width of each stage, coarse to fine (default half its output, the
    official rule).
    """

    def __init__(self, channels: Sequence[int], c_in: int, blocks: Sequence[int] = (3, 4, 6),
                 signed: bool = False, widths: Sequence[int] | None = None):
        super().__init__()
        stages = []
        outs = tuple(reversed(tuple(channels)))
        widths = tuple(widths) if widths is not None else tuple(c // 2 for c in outs)
        for c_out, n, width in zip(outs, blocks, widths):
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


# --------------------------------------------------------------------------------------------- loss and map
def flattened_cosine_loss(targets: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """RD's distillation loss: per level and sample, ``1 - cos`` of the whole flattened ``C*H*W``
    feature vectors; mean over the batch, **sum** over the levels (float32 maths)."""
    total = targets[0].new_zeros((), dtype=torch.float32)
    for t, o in zip(targets, outputs):
        total = total + (1 - F.cosine_similarity(t.float().flatten(1), o.float().flatten(1), dim=1)).mean()
    return total


def cosine_distance_map(targets: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                        size: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)``: the sum over levels of the per-pixel ``1 - cos`` over channels, each level
    upsampled bilinearly (``align_corners=True``, as the official code) to ``size``. Unsmoothed."""
    total = None
    for t, o in zip(targets, outputs):
        distance = 1 - F.cosine_similarity(t.float(), o.float(), dim=1, eps=1e-8).unsqueeze(1)
        distance = F.interpolate(distance, size=tuple(size), mode="bilinear", align_corners=True)
        total = distance if total is None else total + distance
    return total[:, 0]


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float, smooth: float = 0.0) -> torch.Tensor:
    """Mean over pixels of ``-(1 - p_t)^gamma log(p_t)``, ``p_t`` the probability of the true class.

    ``probs`` (B, C, H, W) class probabilities, ``target`` (B, 1, H, W) class indices (a {0, 1}
    mask for two classes). ``smooth`` > 0 is DRAEM's label smoothing: the one-hot target clamped to
    ``[smooth / (C - 1), 1 - smooth]`` and ``smooth`` added to ``p_t`` before the log. The log is
    bounded below by -100 (as binary cross-entropy is, DeSTSeg's formulation). No class weights.
    """
    classes = probs.shape[1]
    onehot = F.one_hot(target[:, 0].long(), classes).permute(0, 3, 1, 2).to(probs.dtype)
    if smooth > 0:
        onehot = onehot.clamp(smooth / (classes - 1), 1.0 - smooth)
    pt = (onehot * probs).sum(1) + smooth
    return (-(1.0 - pt) ** gamma * torch.log(pt).clamp_min(-100.0)).mean()


def count_parameters(module: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)
