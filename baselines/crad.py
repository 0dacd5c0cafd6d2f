"""CRAD (Lee, Kim, Park, Woo, Ko, "Continuous Memory Representation for Anomaly Detection", ECCV 2024;
arXiv 2402.18293, first titled "GRAD").

A frozen pretrained encoder is tapped at strides 8 and 16; the stride-16 map is resized bilinearly
(``align_corners=True``) to the stride-8 grid and concatenated (UniAD's MFCN neck): ``x`` with ``C``
channels. The reconstruction never sees ``x`` itself, only *coordinates* predicted from it, so it
cannot copy an anomaly through an identity shortcut:

* a **global** coordinate ``(u, v)`` per image (average-pooled ``x``, Linear C -> C, tanh, Linear
  C -> 2, tanh) samples a continuous memory grid of ``C * h * w`` channels on a ``4 x 4`` lattice
  (bilinear ``grid_sample``): one whole ``C x h x w`` feature map per image;
* a **local** coordinate map (1x1 conv C -> C, tanh, 1x1 conv C -> 2, tanh; in training, with
  probability 0.5 per batch, plus N(0, 0.05^2) noise) samples a ``C``-channel grid on an ``8 x 8``
  lattice at every position;
* the two samples (``2 C`` channels) go through MobileNetV3 bottlenecks (1x1 to the expansion
  width, BN, h-swish, 3x3 depthwise, BN, squeeze-excite with h-sigmoid, h-swish, 1x1 back, BN,
  residual) and a 1x1 conv to ``C``: the reconstruction ``x_hat``.

**Refinement** (training and test): ``e = mean_c (x_hat - x)^2``, the gate ``m = 1 -
round(clamp(mse_coef * e, 0, 1))`` (1 where ``e < 0.5 / mse_coef``), ``c`` the channel cosine of
``x_hat`` and ``x``, ``s = 0.3 m + 0.7 c`` and ``x_tilde = s x + (1 - s) x_hat``. The loss is
``MSE(x_tilde, x)``; the map is ``||x_tilde - x||_2`` over channels, upsampled bilinearly
(``align_corners=True``) to the input, then a 21x21 mean filter (zero padding counted, as the
official evaluation); the image score is the maximum of its 32x32 average pooling.

Official configuration, kept: 224 px, EfficientNet-B4 taps 56 + 160 = 216 channels at 28x28,
11 bottlenecks of width 432 and expansion 864 (15,361,492 trainable parameters: memory grids
2,723,328, bottlenecks 12,450,240, coordinate heads 2 x 47,306, output conv 93,312), AdamW with
the network at lr 1e-3 and the grids at lr 0.1 (weight decay 0.01 for both, PyTorch's default),
StepLR 40 epochs gamma 0.1, 50 epochs, gradient-norm clip 0.1, no augmentation.
Departures (``docs/method-uniad-crad-realnet.md``): the grids' learning rate is assigned to the
parameters themselves (the official rule matches their DDP name only, so a single-process run
silently trains them at the network lr); widths follow the encoder (``2 C`` and ``4 C``, the
official 432 and 864 with B4) rather than being hard-coded; the last epoch is kept (the official
loop keeps the best *test* epoch) and AUROC is never flipped; torchvision B4 weights from the hub
cache (the official code loads lukemelas' TF port), EfficientNet-Lite0 when the file is absent,
with the gate threshold ``mse_coef`` recalibrated for Lite0's feature scale
(:data:`LITE_MSE_COEF`); the frozen features are cached once (:mod:`threecad.methods.feature_cache`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines.aggregation import resize_concat
from threecad.errors import ThreecadError
from threecad.maps.postprocess import gaussian_blur, mean_filter, pooled_max, upsample_maps
from threecad.methods import Option, register
from threecad.methods.blocks import FrozenPartNet, Teacher, build_teacher, count_parameters
from threecad.methods.feature_cache import (
    DEFAULT_MEMORY_GB,
    FROZEN_ENCODER_OPTIONS,
    FrozenEncoderMethod,
    batch_features,
)
from threecad.methods.training import TrainSettings, seeded

log = logging.getLogger(__name__)

#: Encoder taps: B4 stages 3 and 5 (lukemelas blocks 9 and 21), Lite0 blocks 4 and 10.
LAYERS = ("stride8", "stride16")
#: The official encoder (torchvision's B4 file from the hub cache; Lite0 without it).
PAPER_ENCODER = "efficientnet_b4"
#: The gate's coefficient: the official 0.05 (``e < 10``) with B4 features; 0.02 (``e < 25``) with Lite0,
#: whose features are larger: a trained Lite0 CRAD's normal positions have e < 20 at 99.4% and a 99.9th
#: percentile of 27 (magnetic-tile training images; ``docs/method-uniad-crad-realnet.md``).
PAPER_MSE_COEF, LITE_MSE_COEF = 0.05, 0.02
#: Probability per training batch that the local coordinates get noise (official).
NOISE_PROBABILITY = 0.5
#: Squeeze-excite reduction of the bottlenecks (official 4).
SE_REDUCTION = 4


# --------------------------------------------------------------------------------------------- blocks
class SqueezeExcite(nn.Module):
    """Channel gates: global average, Linear c -> c / 4 (no bias), ReLU, Linear back (no bias), h-sigmoid."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction, bias=False)
        self.fc2 = nn.Linear(channels // reduction, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.hardsigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * gate[:, :, None, None]


class MobileBottleneck(nn.Module):
    """MobileNetV3 bottleneck, 3x3, stride 1, SE, h-swish, residual (``width`` in and out)."""

    def __init__(self, width: int, expansion: int):
        super().__init__()
        self.expand = nn.Conv2d(width, expansion, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(expansion)
        self.depthwise = nn.Conv2d(expansion, expansion, 3, padding=1, groups=expansion, bias=False)
        self.bn2 = nn.BatchNorm2d(expansion)
        self.se = SqueezeExcite(expansion)
        self.project = nn.Conv2d(expansion, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.hardswish(self.bn1(self.expand(x)))
        out = F.hardswish(self.se(self.bn2(self.depthwise(out))))
        return x + self.bn3(self.project(out))


class CRADHead(nn.Module):
    """Coordinates, continuous memories and decoder on fused features ``(B, C, h, w)`` -> ``x_hat``.

    The global grid has ``C * h * w`` channels, so the head is fixed to one feature size
    (``feature_size``). ``expansion`` ``None``: ``4 C`` (the official 864 at ``C`` = 216).
    """

    def __init__(self, channels: int, feature_size: Sequence[int], blocks: int = 11, expansion: int | None = None,
                 local_grid: int = 8, global_grid: int = 4, noise_std: float = 0.05):
        super().__init__()
        c = int(channels)
        h, w = (int(v) for v in feature_size)
        self.channels, self.feature_size, self.noise_std = c, (h, w), float(noise_std)
        self.local_memory = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, c, local_grid, local_grid)))
        self.global_memory = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, c * h * w, global_grid, global_grid)))
        self.global_coord = nn.Sequential(nn.Linear(c, c), nn.Tanh(), nn.Linear(c, 2), nn.Tanh())
        self.local_coord = nn.Sequential(nn.Conv2d(c, c, 1), nn.Tanh(), nn.Conv2d(c, 2, 1), nn.Tanh())
        self.decoder = nn.Sequential(*(MobileBottleneck(2 * c, expansion or 4 * c) for _ in range(blocks)))
        self.recover = nn.Conv2d(2 * c, c, 1, bias=False)

    def memories(self) -> list[nn.Parameter]:
        """The two memory grids (the optimiser gives them their own learning rate)."""
        return [self.local_memory, self.global_memory]

    def coordinates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ``(B, 2)`` and local ``(B, 2, h, w)`` coordinates in [-1, 1] (noise added when training)."""
        glob = self.global_coord(x.mean((2, 3)))
        local = self.local_coord(x)
        if self.training and self.noise_std > 0 and float(torch.rand(())) < NOISE_PROBABILITY:
            local = local + self.noise_std * torch.randn_like(local)
        return glob, local

    def sample(self, glob: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """``(B, 2 C, h, w)``: the global grid at each image's point, reshaped to ``C x h x w``, then
        the local grid at every position (bilinear, ``align_corners=False``, zero padding)."""
        b = glob.shape[0]
        c, (h, w) = self.channels, self.feature_size
        points = glob.view(1, b, 1, 2).to(self.global_memory.dtype)
        whole = F.grid_sample(self.global_memory, points, align_corners=False)  # (1, C h w, B, 1)
        whole = whole[0, :, :, 0].t().reshape(b, c, h, w)
        grid = self.local_memory.expand(b, -1, -1, -1)
        per_position = F.grid_sample(grid, local.permute(0, 2, 3, 1).to(grid.dtype), align_corners=False)
        return torch.cat([whole, per_position], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.feature_size or x.shape[1] != self.channels:
            raise ThreecadError(f"crad's memory grids were built for features {self.channels}x{self.feature_size[0]}x"
                                f"{self.feature_size[1]}, got {tuple(x.shape[1:])}: predict at the run's --size")
        return self.recover(self.decoder(self.sample(*self.coordinates(x))))


def refine(x_hat: torch.Tensor, x: torch.Tensor, mse_coef: float,
           gate_weight: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_tilde, gate)``: the reconstruction blended toward the input, ``s x + (1 - s) x_hat`` with
    ``s = gate_weight * m + (1 - gate_weight) * cos(x_hat, x)`` and the hard gate ``m = 1 -
    round(clamp(mse_coef * mean_c (x_hat - x)^2, 0, 1))`` (``(B, 1, h, w)``; no gradient through it)."""
    error = (x_hat - x).pow(2).mean(1, keepdim=True)
    gate = 1.0 - torch.round((mse_coef * error).clamp(0, 1))
    cosine = F.cosine_similarity(x_hat, x, dim=1).unsqueeze(1)
    s = gate_weight * gate + (1.0 - gate_weight) * cosine
    return s * x + (1.0 - s) * x_hat, gate


class CRADNet(FrozenPartNet):
    """Frozen encoder, MFCN neck and :class:`CRADHead`.

    ``forward(batch)`` takes ``{"image"}`` or cached ``{"features"}`` and returns the fused features
    ``x``, the refined reconstruction ``x_tilde`` and the gate (float32). The input shape is a buffer so
    that saved weights rebuild the same network (the global grid depends on it).
    """

    frozen = "encoder"

    def __init__(self, encoder: Teacher, input_shape: Sequence[int], blocks: int = 11, expansion: int | None = None,
                 local_grid: int = 8, global_grid: int = 4, noise_std: float = 0.05, mse_coef: float = PAPER_MSE_COEF,
                 gate_weight: float = 0.3):
        super().__init__()
        self.encoder = encoder
        probe = torch.zeros(1, 3, *input_shape, device=encoder.extractor.device)
        fused = resize_concat(encoder(probe), align_corners=True)
        self.head = CRADHead(fused.shape[1], fused.shape[-2:], blocks, expansion, local_grid, global_grid, noise_std)
        self.mse_coef, self.gate_weight = float(mse_coef), float(gate_weight)
        self.register_buffer("input_shape", torch.tensor([int(v) for v in input_shape]))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = resize_concat([f.float() for f in batch_features(batch, self.encoder)], align_corners=True)
        x_hat = self.head(x).float()
        x_tilde, gate = refine(x_hat, x, self.mse_coef, self.gate_weight)
        return {"x": x, "x_tilde": x_tilde, "gate": gate}


class CRADInference(nn.Module):
    """CRAD's predict, images (B, 3, H, W) -> (scores (B,), maps (B, H, W)), as one module: the
    network, the map ``||x_tilde - x||`` upsampled to the input, the mean filter, optional Gaussian
    smoothing, and the maximum of the ``score_pool`` average pooling."""

    def __init__(self, net: CRADNet, window: int, score_pool: int, sigma: float):
        super().__init__()
        self.net, self.window, self.score_pool, self.sigma = net, int(window), int(score_pool), float(sigma)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net({"image": images})
        patches = (out["x_tilde"] - out["x"]).pow(2).sum(1).sqrt()
        maps = upsample_maps(patches, tuple(images.shape[-2:]), sigma=0.0, align_corners=True)
        maps = gaussian_blur(mean_filter(maps, self.window), self.sigma)
        scores = pooled_max(maps, self.score_pool)
        return scores, maps


def memory_adamw(module: CRADNet, lr: float, grid_lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the memory grids in their own group at ``grid_lr``, chosen by identity (the official
    by-name rule only matches under DDP), and every other trainable parameter at ``lr``."""
    grids = module.head.memories()
    ids = {id(p) for p in grids}
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in ids]
    return torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": grids, "lr": grid_lr}], lr=lr,
                             weight_decay=weight_decay)


# --------------------------------------------------------------------------------------------- method
@register
class CRAD(FrozenEncoderMethod):
    """CRAD: reconstruction from continuous memory grids addressed by predicted coordinates.

    Parameters
    ----------
    epochs, batch_size, lr, grid_lr, weight_decay, lr_step, clip_grad_norm:
        Official: 50 epochs, AdamW, network lr 1e-3, grids lr 0.1, weight decay 0.01, StepLR by 0.1
        every ``lr_step`` = 40 epochs, gradient-norm clip 0.1, the effective batch 64 (16 on each of
        4 GPUs). The last epoch is kept (the official run keeps the best *test* epoch).
    blocks, expansion, local_grid, global_grid:
        Decoder bottlenecks (11) and their expansion width (``None``: 4 C, 864 with B4; ``C`` is
        CRAD-S's ratio); memory lattice sides (8 local, 4 global).
    noise_std, mse_coef, gate_weight:
        Local-coordinate noise (0.05); the gate coefficient (``None``: 0.05 with B4, :data:`LITE_MSE_COEF`
        with another encoder; the saved configuration records the value used); weight of the gate in
        ``s`` (0.3; the cosine gets the rest, 0.7).
    mean_filter, score_pool:
        Side of the mean filter applied to the maps (official 21, odd; 1: none) and of the average
        pooling whose maximum is the image score (official 32). Inference only.
    encoder, encoder_weights:
        The frozen encoder tapped at strides 8 and 16: EfficientNet-B4 with torchvision's file (the
        hub cache). Without the file it falls back, with a warning, to the offline EfficientNet-Lite0.
        ``"random"`` weights: tests only.
    sigma:
        Gaussian smoothing after the mean filter (default 0: none, as the official evaluation).
    seed, device, amp, workers, resume, feature_cache, cache_gb:
        As for the other frozen-encoder methods (``docs/training.md``).
    """

    name = "crad"
    OPTIONS = {
        "epochs": Option(int, low=1),
        "batch_size": Option(int, low=1),
        "lr": Option(float, low=0, open_low=True),
        "grid_lr": Option(float, low=0, open_low=True),
        "weight_decay": Option(float, low=0),
        "lr_step": Option(int, low=1),
        "clip_grad_norm": Option(float, low=0, open_low=True, null=True),
        "blocks": Option(int, low=1, high=64),
        "expansion": Option(int, low=1, null=True),
        "local_grid": Option(int, low=2, high=256),
        "global_grid": Option(int, low=2, high=64),
        "noise_std": Option(float, low=0),
        "mse_coef": Option(float, low=0, null=True),
        "gate_weight": Option(float, low=0, high=1),
        "mean_filter": Option(int, low=1, high=255, predict=True),
        "score_pool": Option(int, low=1, high=1024, predict=True),
        "amp": Option(bool),
        **FROZEN_ENCODER_OPTIONS,
    }
    DEFAULT_INPUTS = {"size": 224}

    def __init__(
        self,
        epochs: int = 50,
        batch_size: int = 64,
        lr: float = 1e-3,
        grid_lr: float = 0.1,
        weight_decay: float = 0.01,
        lr_step: int = 40,
        clip_grad_norm: float | None = 0.1,
        blocks: int = 11,
        expansion: int | None = None,
        local_grid: int = 8,
        global_grid: int = 4,
        noise_std: float = 0.05,
        mse_coef: float | None = None,
        gate_weight: float = 0.3,
        mean_filter: int = 21,
        score_pool: int = 32,
        encoder: str = PAPER_ENCODER,
        encoder_weights: str | None = "default",
        sigma: float = 0.0,
        seed: int = 0,
        device: str = "auto",
        amp: bool = False,
        workers: int = 0,
        resume: bool = False,
        feature_cache: bool = True,
        cache_gb: float = DEFAULT_MEMORY_GB,
    ):
        if int(mean_filter) % 2 == 0:
            raise ThreecadError(f"method 'crad' option mean_filter takes an odd whole number (a centred window), "
                                f"got {mean_filter}")
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.grid_lr = float(grid_lr)
        self.weight_decay = float(weight_decay)
        self.lr_step = int(lr_step)
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.blocks = int(blocks)
        self.expansion = expansion
        self.local_grid = int(local_grid)
        self.global_grid = int(global_grid)
        self.noise_std = float(noise_std)
        self.mse_coef = mse_coef
        self.gate_weight = float(gate_weight)
        self.mean_filter = int(mean_filter)
        self.score_pool = int(score_pool)
        self.encoder = str(encoder)
        self.encoder_weights = encoder_weights
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.device = str(device)
        self.amp = bool(amp)
        self.workers = int(workers)
        self.resume = bool(resume)
        self.feature_cache = bool(feature_cache)
        self.cache_gb = float(cache_gb)
        self.net: CRADNet | None = None
        self.history_: list[dict] = []
        self._encoder_used: str | None = None

    # ------------------------------------------------------------------ network
    def _mse_coef(self, encoder: str) -> float:
        """The gate coefficient as trained: the option, or its encoder-dependent default."""
        if self.mse_coef is not None:
            return float(self.mse_coef)
        return PAPER_MSE_COEF if encoder == PAPER_ENCODER else LITE_MSE_COEF

    def _build(self, input_shape: Sequence[int]) -> CRADNet:
        shape = [int(v) for v in input_shape]
        if self.net is not None and self.net.input_shape.tolist() == shape:
            return self.net
        device = self._device()
        with seeded(self.seed):
            teacher = build_teacher(self.encoder, self.encoder_weights, layers=LAYERS).to(device)
            self._encoder_used = teacher.name
            self.net = CRADNet(teacher, shape, self.blocks, self.expansion, self.local_grid, self.global_grid,
                               self.noise_std, self._mse_coef(teacher.name), self.gate_weight).to(device)
        head = self.net.head
        log.info("crad: encoder %s (taps %s), features %dx%dx%d, %.2f M trainable parameters", teacher.name,
                 teacher.channels, head.channels, *head.feature_size, count_parameters(self.net) / 1e6)
        return self.net

    def resolved_config(self) -> dict[str, Any]:
        """The encoder, expansion width and gate coefficient actually used."""
        if self._encoder_used is None or self.net is None:
            return {}
        expansion = self.net.head.decoder[0].expand.out_channels
        return {**super().resolved_config(), "expansion": expansion, "mse_coef": self._mse_coef(self._encoder_used)}

    # ------------------------------------------------------------------ engine hooks
    def trainable_module(self) -> CRADNet:
        if self.net is None:
            raise ThreecadError("crad: the network is built by fit(), which knows the input size")
        return self.net

    def configure_optimizers(self, module: CRADNet):
        optimizer = memory_adamw(module, self.lr, self.grid_lr, self.weight_decay)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.lr_step, gamma=0.1)

    def training_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        out = module(batch)
        return {"loss": F.mse_loss(out["x_tilde"], out["x"]), "gate": out["gate"].mean().detach()}

    # ------------------------------------------------------------------ fit / predict
    def fit(self, train_set: torch.utils.data.Dataset, val_set: torch.utils.data.Dataset | None = None) -> CRAD:
        if len(train_set) == 0:
            raise ThreecadError("crad.fit got no training images")
        shape = tuple(int(v) for v in train_set[0]["image"].shape[-2:])
        self._build(shape)
        settings = TrainSettings(epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, amp=self.amp,
                                 clip_grad_norm=self.clip_grad_norm, num_workers=self.workers)
        fingerprint = {"method": self.name, **self.resolved_config(), "lr": self.lr, "grid_lr": self.grid_lr,
                       "weight_decay": self.weight_decay, "lr_step": self.lr_step, "blocks": self.blocks,
                       "local_grid": self.local_grid, "global_grid": self.global_grid, "noise_std": self.noise_std,
                       "gate_weight": self.gate_weight, "input_shape": list(shape)}
        log.info("crad: %d training images at %dx%d, %d epochs", len(train_set), shape[1], shape[0], self.epochs)
        self._fit_on_features(train_set, val_set, settings, fingerprint)
        return self

    def inference_module(self) -> CRADInference:
        """The fitted network's predict as one module (:class:`CRADInference`)."""
        if self.net is None:
            raise ThreecadError("crad is not fitted: call fit() or load a saved run")
        return CRADInference(self.net.eval(), self.mean_filter, self.score_pool, self.sigma)

    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        images = self._model_input(images)
        size = tuple(int(v) for v in images.shape[-2:])
        trained = tuple(self.net.input_shape.tolist())
        if size != trained:
            raise ThreecadError(f"crad was trained at {trained[1]}x{trained[0]} (its global memory fixes the size), "
                                f"got {size[1]}x{size[0]}: predict with the run's --size and --resize squash")
        return self.run_inference(images)

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "input_shape" not in state:
            raise ThreecadError("these weights are not a crad run's (no input_shape)")
        self._build(state["input_shape"].tolist())
        self._load_trained(state)
