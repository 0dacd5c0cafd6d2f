"""EfficientNet-B4 with torchvision's module layout, so torchvision's ImageNet file loads strictly.

UniAD and CRAD run a frozen EfficientNet-B4; the official code uses the lukemelas TF port, whose file
threecad does not ship. The file a user is most likely to have is torchvision's
(``efficientnet_b4_rwightman-23ab8bcd.pth`` in the torch hub cache), whose state dict has another
layout than :mod:`threecad.backbones.efficientnet` (``features.<stage>.<block>.block.<i>...``), so
this module rebuilds that layout: the same compound scaling (width 1.4, depth 1.8 over the B0
stages), symmetric ``k // 2`` padding (not TF "same"), SiLU, squeeze-and-excitation to a quarter of
the block *input* width, PyTorch-default BatchNorm (eps 1e-5, momentum 0.1, as torchvision's B0-B4),
row-wise stochastic depth ``0.2 * block / n_blocks`` (training only), a 1x1 head to ``4 x 448 = 1792``
channels and ``Dropout(0.4) + Linear`` as classifier: 19,341,616 parameters, torchvision's figure.

Feature stages for :class:`threecad.backbones.BackboneTaps`: ``features.0`` (the stem) to
``features.8`` (the head), plus ``strideN`` = the last stage whose output has stride ``N``:
``stride2`` = ``features.1`` (24 ch), ``stride4`` = ``features.2`` (32), ``stride8`` = ``features.3``
(56), ``stride16`` = ``features.5`` (160), ``stride32`` = ``features.7`` (448): the taps equal to
UniAD's lukemelas blocks 1/5/9/21 (``features.4``, 112 ch at stride 16, is not a tap there).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from threecad.backbones.efficientnet import _BASE_STAGES, _drop_connect, round_filters, round_repeats

#: (width, depth, dropout) of the torchvision variants built here.
VARIANTS: dict[str, tuple[float, float, float]] = {"efficientnet_b4": (1.4, 1.8, 0.4)}


class ConvNormAct(nn.Sequential):
    """Conv (no bias, padding ``k // 2``) + BatchNorm (+ SiLU): keys ``0.weight``, ``1.*`` as torchvision's."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(c_out)]
        if act:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Global average -> 1x1 conv (``fc1``) -> SiLU -> 1x1 conv (``fc2``) -> sigmoid gate."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> depthwise k x k -> SE -> 1x1 project (no activation), identity
    skip with stochastic depth when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int, drop: float):
        super().__init__()
        mid = c_in * expand  # the scaled widths are multiples of 8, so no rounding
        layers: list[nn.Module] = []
        if mid != c_in:
            layers.append(ConvNormAct(c_in, mid, 1))
        layers += [ConvNormAct(mid, mid, kernel, stride, groups=mid), SqueezeExcite(mid, max(1, c_in // 4)),
                   ConvNormAct(mid, c_out, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out
        self.drop = drop
        self.out_channels = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if not self.residual:
            return out
        if self.training and self.drop > 0:
            out = _drop_connect(out, self.drop)
        return out + x


class TorchvisionEfficientNet(nn.Module):
    """torchvision's ``EfficientNet`` (B0-B4 style) for one ``(width, depth, dropout)`` variant."""

    def __init__(self, width: float, depth: float, dropout: float, stochastic_depth: float = 0.2,
                 num_classes: int = 1000):
        super().__init__()
        stages = [(round_repeats(reps, depth), kernel, stride, expand, round_filters(cin, width),
                   round_filters(cout, width)) for reps, kernel, stride, expand, cin, cout in _BASE_STAGES]
        total = sum(s[0] for s in stages)
        layers: list[nn.Module] = [ConvNormAct(3, stages[0][4], 3, 2)]
        self._strides = [2]
        self._channels = [stages[0][4]]
        stride_now, index = 2, 0
        for reps, kernel, stride, expand, cin, cout in stages:
            blocks = []
            for r in range(reps):
                blocks.append(MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand,
                                     stochastic_depth * index / total))
                index += 1
            layers.append(nn.Sequential(*blocks))
            stride_now *= stride
            self._strides.append(stride_now)
            self._channels.append(cout)
        head = 4 * stages[-1][5]
        layers.append(ConvNormAct(stages[-1][5], head, 1))
        self._strides.append(stride_now)
        self._channels.append(head)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True), nn.Linear(head, num_classes))
        self._init_like_torchvision()

    def _init_like_torchvision(self) -> None:
        """torchvision's initialisation (only the random-weights build uses it): kaiming-normal fan-out
        convolutions with zero bias, unit BatchNorm, uniform(+-1/sqrt(out)) classifier."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def feature_stages(self) -> list[tuple[str, nn.Module, int, int]]:
        """``(features.i, module, out_channels, stride)`` in order (they share this net's weights)."""
        return [(f"features.{i}", m, c, s) for i, (m, c, s) in enumerate(zip(self.features, self._channels,
                                                                             self._strides))]

    def stage_aliases(self) -> dict[str, str]:
        """``strideN`` -> the last MBConv stage whose output has stride ``N`` (the head excluded)."""
        return {f"stride{s}": f"features.{i}" for i, s in enumerate(self._strides[:-1]) if i > 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def tv_efficientnet(name: str) -> TorchvisionEfficientNet:
    width, depth, dropout = VARIANTS[name]
    return TorchvisionEfficientNet(width, depth, dropout)
