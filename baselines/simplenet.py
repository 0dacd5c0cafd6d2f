"""SimpleNet (Liu et al., "SimpleNet: A Simple Network for Image Anomaly Detection and Localization",
CVPR 2023).

A frozen pretrained encoder is tapped at strides 8 and 16; each position is described by a local
embedding of its 3x3 neighbourhood on both levels (PatchCore's), a trainable linear *adaptor* moves
these features into a target domain, and a small *discriminator* learns to tell adapted normal
features from the same features plus Gaussian noise (synthetic anomalies in feature space), with a
truncated L1 loss. At test time the discriminator's negated output is the patch anomaly score.

The local embedding, as the official code computes it: each level unfolded into 3x3 neighbourhoods
(zero padding; ``C * 9`` values per position, channel-major), each neighbourhood vector average-
pooled (adaptive, 1-D) to ``feature_dim`` values, the stride-16 level resized bilinearly to the
stride-8 grid (:func:`baselines.aggregation.combine_stages`, which also concatenates), and the
concatenation pooled again to ``feature_dim``. Pooling and resizing act on different axes, so
pooling before the resize gives the official resize-then-pool result.

Official configuration, kept: WideResNet-50-2 layer2 + layer3, width 1536 (adaptor 2,360,832 +
discriminator 1,576,960 = 3,937,792 trainable parameters), adaptor Linear(d, d) with bias,
discriminator Linear(d, 1024) - BatchNorm1d - LeakyReLU(0.2) - Linear(1024, 1, no bias), xavier-
normal weights, noise N(0, 0.015^2), margin 0.5, adaptor AdamW lr 1e-4 (weight decay 0.01),
discriminator Adam lr 2e-4 (weight decay 1e-5), batch 8, 40 x 4 = 160 passes, image score = the
maximum raw patch score, map = bilinear upsampling + Gaussian sigma 4. Fixed (see
``docs/method-fastflow-simplenet.md``): the last epoch is kept (the official loop keeps the best
*test* epoch), the whole image is scored (no centre crop of non-square images), the trained weights
are what predicts (the official test script never loads them).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines.aggregation import combine_stages
from threecad.errors import ThreecadError
from threecad.maps.postprocess import upsample_maps
from threecad.methods import Option, register
from threecad.methods.blocks import PAPER_TEACHER, FrozenPartNet, Teacher, build_teacher, count_parameters
from threecad.methods.feature_cache import (
    DEFAULT_MEMORY_GB,
    FROZEN_ENCODER_OPTIONS,
    FrozenEncoderMethod,
    batch_features,
)
from threecad.methods.method import NetInference
from threecad.methods.training import TrainSettings, seeded

log = logging.getLogger(__name__)

#: Encoder taps (WRN50 layer2 and layer3).
LAYERS = ("stride8", "stride16")
#: The official width with WideResNet-50-2, and the width used with any narrower encoder: Lite0's
#: neighbourhood vectors have 360 and 1008 values, so 1536 would only repeat them.
PAPER_DIM, NARROW_DIM = 1536, 384
#: Feature-space noise: the official 0.015 with WRN50's features; with another encoder the value
#: chosen on magnetic-tile validation data (``docs/results/magnetic-tile.md``). Lite0's embedding has a
#: per-dimension std of about 2, and 0.015 collapses the discriminator to D = 0.
PAPER_NOISE, NARROW_NOISE = 0.015, 3.0
#: Weight decay of the adaptor's AdamW (its default) and of the discriminator's Adam (official).
ADAPTOR_WEIGHT_DECAY, DSC_WEIGHT_DECAY = 0.01, 1e-5


# --------------------------------------------------------------------------------------------- embedding
def _pool_last(x: torch.Tensor, width: int) -> torch.Tensor:
    """Adaptive 1-D average pooling of the last axis of ``x`` to ``width`` values."""
    shape = x.shape
    return F.adaptive_avg_pool1d(x.reshape(-1, 1, shape[-1]), width).view(*shape[:-1], width)


def _row_means(f: torch.Tensor) -> torch.Tensor:
    """``(B, 3 C, h, w)``: for each channel the means of the three rows of each zero-padded 3x3
    neighbourhood, in the unfolded vector's order (channel, then row)."""
    b, c, h, w = f.shape
    padded = F.pad(f, (1, 1, 1, 1))
    across = (padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]) / 3  # (B, C, h + 2, w)
    return torch.stack([across[:, :, ky:ky + h] for ky in range(3)], dim=2).view(b, 3 * c, h, w)


def _pooled_neighbourhoods(f: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, width, h, w)``: each 3x3 neighbourhood vector (``C * 9`` values) adaptive-average-pooled
    to ``width``.

    The pooling is linear with fixed weights, so the 9x unfolded tensor (memory-bound copies that
    cost as much as the matmuls of the head with WRN50) is only needed when the pooling bins do not
    line up with the rows of the neighbourhoods. When ``3 C`` is a multiple of ``width`` each bin
    averages ``3 C / width`` whole rows of three taps (WRN50: layer 2 one row, layer 3 two rows), so
    the rows' means, pooled over channels, are the same numbers.
    """
    b, c, h, w = f.shape
    if (3 * c) % width == 0:
        rows = _row_means(f)
        return rows if 3 * c == width else rows.view(b, width, 3 * c // width, h, w).mean(dim=2)
    neighbourhoods = F.unfold(f, kernel_size=3, padding=1)  # (B, C * 9, h * w)
    vectors = _pool_last(neighbourhoods.transpose(1, 2), width)  # (B, h * w, width)
    return vectors.transpose(1, 2).reshape(b, width, h, w)


def local_embedding(features: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """``(B, h, w, width)`` patch features on the first level's grid (see the module docstring)."""
    pooled = [_pooled_neighbourhoods(f.float(), width) for f in features]
    fused = combine_stages(pooled, kernel=1)  # resized to the first grid and concatenated
    b, _, h, w = fused.shape
    # len(features) * width values pooled to width: each bin is the mean of len(features) neighbours
    return fused.view(b, width, len(features), h, w).mean(dim=2).permute(0, 2, 3, 1)


def truncated_l1_loss(true_scores: torch.Tensor, fake_scores: torch.Tensor,
                      margin: float = 0.5) -> dict[str, torch.Tensor]:
    """``mean(max(0, margin - D(q))) + mean(max(0, margin + D(q + noise)))``, plus the fractions of
    normal rows scored ``>= margin`` (``p_true``) and of noisy rows scored ``< -margin`` (``p_fake``)."""
    true_scores, fake_scores = true_scores.float(), fake_scores.float()
    loss = (margin - true_scores).clamp_min(0).mean() + (margin + fake_scores).clamp_min(0).mean()
    with torch.no_grad():
        p_true = (true_scores >= margin).float().mean()
        p_fake = (fake_scores < -margin).float().mean()
    return {"loss": loss, "p_true": p_true, "p_fake": p_fake}


# --------------------------------------------------------------------------------------------- network
class SimpleNetNet(FrozenPartNet):
    """Frozen encoder, local embedding, adaptor and discriminator.

    ``forward(batch, noise_std)`` takes ``{"image"}`` or cached ``{"features"}``. With
    ``noise_std > 0`` (training) it returns the discriminator's outputs on the adapted features
    (``true``) and on the same plus i.i.d. Gaussian noise (``fake``), both in one BatchNorm batch;
    with 0, ``scores`` ``(B, h, w)`` = minus the discriminator's output (higher = more anomalous).
    """

    frozen = "encoder"

    def __init__(self, encoder: Teacher, feature_dim: int, dsc_hidden: int):
        super().__init__()
        self.encoder = encoder
        self.feature_dim = int(feature_dim)
        self.adaptor = nn.Linear(feature_dim, feature_dim)
        self.discriminator = nn.Sequential(nn.Linear(feature_dim, dsc_hidden), nn.BatchNorm1d(dsc_hidden),
                                           nn.LeakyReLU(0.2), nn.Linear(dsc_hidden, 1, bias=False))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)

    def forward(self, batch: dict, noise_std: float = 0.0) -> dict[str, torch.Tensor]:
        embedding = local_embedding(batch_features(batch, self.encoder), self.feature_dim)
        b, h, w, d = embedding.shape
        adapted = self.adaptor(embedding.reshape(-1, d))
        if noise_std <= 0:
            return {"scores": -self.discriminator(adapted)[:, 0].float().view(b, h, w)}
        fake = adapted + noise_std * torch.randn_like(adapted)  # anomalies only in the fake branch
        scores = self.discriminator(torch.cat([adapted, fake]))[:, 0]
        return {"true": scores[:len(adapted)], "fake": scores[len(adapted):]}


def two_rule_adam(adaptor: nn.Module, discriminator: nn.Module, adaptor_lr: float, dsc_lr: float):
    """The official pair (AdamW on the adaptor, Adam with L2 weight decay on the discriminator) as
    one optimiser for the engine: Adam's state is per parameter, and its per-group
    ``decoupled_weight_decay`` flag turns a group into AdamW."""
    if "decoupled_weight_decay" not in inspect.signature(torch.optim.Adam).parameters:
        raise ThreecadError(f"simplenet needs a torch whose Adam takes decoupled_weight_decay (torch {torch.__version__} "
                            "does not): upgrade torch")
    return torch.optim.Adam([
        {"params": list(adaptor.parameters()), "lr": adaptor_lr, "weight_decay": ADAPTOR_WEIGHT_DECAY,
         "decoupled_weight_decay": True},
        {"params": list(discriminator.parameters()), "lr": dsc_lr, "weight_decay": DSC_WEIGHT_DECAY,
         "decoupled_weight_decay": False},
    ], lr=dsc_lr)


# --------------------------------------------------------------------------------------------- method
@register
class SimpleNet(FrozenEncoderMethod):
    """SimpleNet: a feature adaptor and a discriminator of noised features on a frozen encoder.

    Parameters
    ----------
    epochs, batch_size:
        160 passes (the official 40 meta-epochs x 4), batch 8; the last epoch is kept.
    adaptor_lr, dsc_lr:
        AdamW learning rate of the adaptor (1e-4, weight decay 0.01) and Adam learning rate of the
        discriminator (2e-4, weight decay 1e-5); constant (the official cosine schedule is off).
    noise_std, margin:
        Standard deviation of the feature-space noise (``None``: the official 0.015 with
        WideResNet-50-2, whose feature scale it is tied to, and :data:`NARROW_NOISE`, chosen on
        validation data, with another encoder; ``3cad tune`` re-chooses it on a dataset's
        validation split) and the truncated-L1 margin (0.5). The saved configuration records the
        value used.
    feature_dim, dsc_hidden:
        Width of the embedding and adaptor (``None``: 1536 with WideResNet-50-2, 384 with another
        encoder) and of the discriminator's hidden layer (``None``: two thirds of the width, 1024
        at 1536). The saved configuration records the values used.
    encoder, encoder_weights:
        The frozen encoder tapped at strides 8 and 16: WideResNet-50-2 with its ImageNet file (the
        hub cache). Without the file it falls back, with a warning, to the offline
        EfficientNet-Lite0. ``"random"`` weights: tests only.
    sigma:
        Gaussian smoothing of the map (official 4). The image score is the maximum raw patch score.
    seed, device, amp, workers, resume:
        Seed (official 0), device, float16 autocast on CUDA, DataLoader workers, continue an
        interrupted fit from its checkpoint in the run's work folder.
    feature_cache, cache_gb:
        Compute each training image's encoder features once (:mod:`threecad.methods.feature_cache`),
        at most ``cache_gb`` GiB in memory, then a memory-mapped temporary file.
    """

    name = "simplenet"
    OPTIONS = {
        "epochs": Option(int, low=1),
        "batch_size": Option(int, low=1),
        "adaptor_lr": Option(float, low=0, open_low=True),
        "dsc_lr": Option(float, low=0, open_low=True),
        "noise_std": Option(float, low=0, open_low=True, null=True),
        "margin": Option(float, low=0, open_low=True),
        "feature_dim": Option(int, low=1, null=True),
        "dsc_hidden": Option(int, low=1, null=True),
        "amp": Option(bool),
        **FROZEN_ENCODER_OPTIONS,
    }
    #: ``3cad tune``: the official noise level is tied to WRN50's feature scale; Lite0's embedding has a
    #: per-dimension std of about 2 and needs a far larger one (0.015 collapses to D = 0 in short runs).
    TUNE_GRID = {"noise_std": (0.015, 0.3, 1.0, 3.0)}

    def __init__(
        self,
        epochs: int = 160,
        batch_size: int = 8,
        adaptor_lr: float = 1e-4,
        dsc_lr: float = 2e-4,
        noise_std: float | None = None,
        margin: float = 0.5,
        feature_dim: int | None = None,
        dsc_hidden: int | None = None,
        encoder: str = PAPER_TEACHER,
        encoder_weights: str | None = "default",
        sigma: float = 4.0,
        seed: int = 0,
        device: str = "auto",
        amp: bool = True,
        workers: int = 0,
        resume: bool = False,
        feature_cache: bool = True,
        cache_gb: float = DEFAULT_MEMORY_GB,
    ):
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.adaptor_lr = float(adaptor_lr)
        self.dsc_lr = float(dsc_lr)
        self.noise_std = None if noise_std is None else float(noise_std)
        self.margin = float(margin)
        self.feature_dim = feature_dim
        self.dsc_hidden = dsc_hidden
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
        self.net: SimpleNetNet | None = None
        self.history_: list[dict] = []
        self._encoder_used: str | None = None

    # ------------------------------------------------------------------ network
    def _widths(self, encoder: str) -> tuple[int, int]:
        """(feature_dim, dsc_hidden) as built: the options, or their encoder-dependent defaults."""
        dim = self.feature_dim or (PAPER_DIM if encoder == PAPER_TEACHER else NARROW_DIM)
        return dim, self.dsc_hidden or round(2 * dim / 3)

    def _noise(self, encoder: str) -> float:
        """The noise level as trained: the option, or its encoder-dependent default."""
        if self.noise_std is not None:
            return self.noise_std
        return PAPER_NOISE if encoder == PAPER_TEACHER else NARROW_NOISE

    def _build(self) -> SimpleNetNet:
        if self.net is None:
            device = self._device()
            with seeded(self.seed):
                teacher = build_teacher(self.encoder, self.encoder_weights, layers=LAYERS)
                self._encoder_used = teacher.name
                self.net = SimpleNetNet(teacher, *self._widths(teacher.name)).to(device)
            log.info("simplenet: encoder %s (taps %s), width %d, %.2f M trainable parameters", teacher.name,
                     teacher.channels, self.net.feature_dim, count_parameters(self.net) / 1e6)
        return self.net

    def resolved_config(self) -> dict[str, Any]:
        """The encoder and widths actually built, so that loading the run rebuilds the same network."""
        if self._encoder_used is None:
            return {}
        dim, hidden = self._widths(self._encoder_used)
        return {**super().resolved_config(), "feature_dim": dim, "dsc_hidden": hidden,
                "noise_std": self._noise(self._encoder_used)}

    # ------------------------------------------------------------------ engine hooks
    def trainable_module(self) -> SimpleNetNet:
        return self._build()

    def configure_optimizers(self, module: SimpleNetNet):
        return two_rule_adam(module.adaptor, module.discriminator, self.adaptor_lr, self.dsc_lr), None

    def training_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        out = module(batch, noise_std=self._noise(self._encoder_used))
        return truncated_l1_loss(out["true"], out["fake"], self.margin)

    # ------------------------------------------------------------------ fit / predict
    def fit(self, train_set: torch.utils.data.Dataset, val_set: torch.utils.data.Dataset | None = None) -> SimpleNet:
        if len(train_set) == 0:
            raise ThreecadError("simplenet.fit got no training images")
        self._build()
        shape = tuple(int(v) for v in train_set[0]["image"].shape[-2:])
        settings = TrainSettings(epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, amp=self.amp,
                                 num_workers=self.workers)
        fingerprint = {"method": self.name, **self.resolved_config(), "adaptor_lr": self.adaptor_lr,
                       "dsc_lr": self.dsc_lr, "margin": self.margin,
                       "input_shape": list(shape)}
        log.info("simplenet: %d training images at %dx%d, %d epochs", len(train_set), shape[1], shape[0], self.epochs)
        self._fit_on_features(train_set, val_set, settings, fingerprint)
        return self

    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self.run_inference(self._model_input(images))

    def inference_module(self) -> NetInference:
        """The encoder, the adaptor and the discriminator with the map (:meth:`_infer`) as one module."""
        return self.net_inference()

    def _infer(self, net: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps: the discriminator's patch scores upsampled and smoothed."""
        patches = net({"image": images})["scores"]
        scores = patches.flatten(1).amax(1)  # the raw patch scores' maximum (official), not the map's
        return scores, upsample_maps(patches, tuple(images.shape[-2:]), sigma=self.sigma, align_corners=False)

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._build()
        self._load_trained(state)
