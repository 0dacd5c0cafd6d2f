"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2021).

Every feature-map position gets its own multivariate Gaussian, fitted on the normal training images;
a test patch scores its Mahalanobis distance to the Gaussian of its position. Features of several
stages are upsampled to the finest grid and concatenated, then a seeded random subset of channels is
kept (the paper shows random selection works as well as PCA, at no cost).

Because the model is per position, every image must have the same size: use ``resize="squash"``.
Covariances are accumulated as running sums in float64 (one pass, no stored embeddings) and
regularised with ``eps * I`` so that they are invertible even with few training images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from baselines import features as _features
from baselines.aggregation import combine_stages
from threecad.device import resolve_device
from threecad.errors import ThreecadError
from threecad.maps.postprocess import top_fraction_mean, upsample_maps
from threecad.methods import Method, Option, iter_batches, register

log = logging.getLogger(__name__)


def covariance_bytes(positions: int, channels: int) -> int:
    """Memory of fitting: float64 running sums (P x C x C) plus the float32 inverses."""
    return positions * channels * channels * (8 + 4) + positions * channels * 8


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """sqrt((x - mu)^T S^-1 (x - mu)) for x (B, P, C), mean (P, C), inv_cov (P, C, C) -> (B, P)."""
    delta = (x - mean[None]).transpose(0, 1)  # (P, B, C)
    # One batched matmul per position instead of a three-operand einsum: the same sum, and
    # torch.export (3cad export) traces it in seconds where it spent a minute planning the einsum.
    squared = (torch.bmm(delta, inv_cov) * delta).sum(-1).transpose(0, 1)
    return squared.clamp_min(0.0).sqrt()


def fused_channels(extractor, images: torch.Tensor, layers: Sequence[str]) -> torch.Tensor:
    """All fused channels (B, C, h, w) of images (B, 3, H, W), before the channel selection."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ThreecadError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    return combine_stages([m.float() for m in _features.extract(extractor, images, layers)], kernel=1)


class PaDiMInference(torch.nn.Module):
    """PaDiM's predict, images (B, 3, H, W) -> (scores (B,), maps (B, H, W)), as one module: backbone,
    channel selection, Mahalanobis distance per position (means and inverse covariances are constants)."""

    def __init__(self, method: PaDiM):
        super().__init__()
        self.extractor = method._get_extractor()
        self.register_buffer("mean", method.mean)
        self.register_buffer("inv_cov", method.inv_cov)
        self.register_buffer("channel_index", method.channel_index.to(method.mean.device))
        self.layers, self.grid = list(method.layers), tuple(method.grid)
        self.sigma, self.topk = method.sigma, method.topk

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused = fused_channels(self.extractor, images, self.layers)
        b, c, h, w = fused.shape
        if (h, w) != self.grid:
            raise ThreecadError(
                f"PaDiM was fitted on a {self.grid[0]}x{self.grid[1]} feature grid, got {h}x{w}: "
                "predict at the training image size"
            )
        x = fused[:, self.channel_index].flatten(2).transpose(1, 2)  # (B, P, k)
        scores = mahalanobis(x, self.mean, self.inv_cov).reshape(b, h, w)
        maps = upsample_maps(scores, tuple(images.shape[-2:]), self.sigma)
        return top_fraction_mean(maps, self.topk).float(), maps.float()


@register
class PaDiM(Method):
    """Per-position Gaussian anomaly detector.

    Parameters
    ----------
    backbone, layers, weights:
        Feature extractor (:mod:`threecad.backbones`); layers by name or output stride.
    n_features:
        Channels kept by the seeded random selection (``None`` or >= total: all).
    eps:
        Ridge added to every covariance diagonal (0.01 in the paper).
    sigma:
        Gaussian smoothing of the full-resolution maps.
    topk:
        Image score: the map's maximum (0, the paper) or the mean of its top ``topk`` fraction.
    batch_size, device, seed:
        Run-time settings and the channel-selection seed.
    """

    name = "padim"
    #: Chosen by ``3cad tune`` on magnetic-tile validation data (all training images, all five
    #: anomaly kinds): +1.2 points over ``raw`` (``docs/results/magnetic-tile.md``).
    DEFAULT_INPUTS = {"exposure": "mean"}
    #: ``3cad tune``: one Gaussian per position needs one input shape (no aspect resize); the
    #: exposure normalisation and the image score are what a dataset may call for.
    TUNE_GRID = {"exposure": ("mean", "raw"), "topk": (0.0, 0.03)}
    #: The Gaussians depend on everything but the map smoothing, the image score and run-time settings.
    OPTIONS = {
        "backbone": Option(str),
        "layers": Option(str, many=True),
        "weights": Option(str, null=True),
        "n_features": Option(int, low=1, null=True),
        "eps": Option(float, low=0),
        "sigma": Option(float, low=0, predict=True),
        "topk": Option(float, low=0, high=1, predict=True),
        "batch_size": Option(int, low=1),
        "device": Option(str, predict=True),
        "seed": Option(int, low=0),
    }

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] = ("stride4", "stride8", "stride16"),
        weights: str | None = "default",
        n_features: int | None = 100,
        eps: float = 0.01,
        sigma: float = 4.0,
        topk: float = 0.0,
        batch_size: int = 16,
        device: str = "auto",
        seed: int = 0,
    ):
        self.backbone = backbone
        self.layers = list(layers)
        self.weights = weights
        self.n_features = n_features
        self.eps = float(eps)
        self.sigma = float(sigma)
        self.topk = float(topk)
        self.batch_size = int(batch_size)
        self.device = device
        self.seed = int(seed)
        self.mean: torch.Tensor | None = None
        self.inv_cov: torch.Tensor | None = None
        self.channel_index: torch.Tensor | None = None
        self.grid: tuple[int, int] | None = None
        self._extractor = None

    def _device(self) -> torch.device:
        return resolve_device(self.device)

    def _get_extractor(self):
        if self._extractor is None:
            self._extractor = _features.build_extractor(self.backbone, self.layers, self.weights, self._device())
        return self._extractor

    def _select(self, channels: int) -> torch.Tensor:
        if self.n_features is None or self.n_features >= channels:
            return torch.arange(channels)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(channels, generator=generator)[: int(self.n_features)].sort().values

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """All fused channels (B, C, h, w) before the channel selection."""
        return fused_channels(self._get_extractor(), images.to(self._device()), self.layers)

    def fit(self, train_set, val_set=None) -> PaDiM:
        device = self._device()
        sums = outer = None
        count = 0
        for images, items in iter_batches(train_set, self.batch_size, desc="padim features"):
            fused = self.embed(images)
            b, c, h, w = fused.shape
            if sums is None:
                self.grid = (h, w)
                self.channel_index = self._select(c)
                k = len(self.channel_index)
                need = covariance_bytes(h * w, k)
                log.info("padim: %d positions x %d channels: %.1f MB for the covariances", h * w, k, need / 2**20)
                sums = torch.zeros(h * w, k, dtype=torch.float64, device=device)
                outer = torch.zeros(h * w, k, k, dtype=torch.float64, device=device)
            elif (h, w) != self.grid:
                raise ThreecadError(
                    f"PaDiM models each position, so all images need one size; got feature grids {self.grid} "
                    f"and {(h, w)} (at {items[0]['path']}): train with resize 'squash'"
                )
            x = fused[:, self.channel_index.to(device)].flatten(2).permute(2, 0, 1).double()  # (P, B, k)
            sums += x.sum(1)
            outer += x.transpose(1, 2) @ x
            count += b
        if sums is None:
            raise ThreecadError("PaDiM.fit got no training images")
        if count < 2:
            raise ThreecadError("PaDiM needs at least 2 training images to estimate covariances")
        mean = sums / count
        cov = (outer - count * mean[:, :, None] * mean[:, None, :]) / (count - 1)
        del outer
        cov += self.eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=device)
        self.mean = mean.float()
        self.inv_cov = torch.linalg.inv(cov).float()
        return self

    def inference_module(self) -> PaDiMInference:
        """The fitted Gaussians' predict as one module (:class:`PaDiMInference`)."""
        if self.mean is None or self.inv_cov is None or self.channel_index is None:
            raise ThreecadError("PaDiM is not fitted: call fit() or load a saved run")
        device = self._device()
        if self.mean.device != device:
            self.mean, self.inv_cov = self.mean.to(device), self.inv_cov.to(device)
        return PaDiMInference(self)

    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ThreecadError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        return self.run_inference(images.to(self._device()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.mean is None:
            raise ThreecadError("PaDiM is not fitted: nothing to save")
        return {
            "mean": self.mean.cpu(),
            "inv_cov": self.inv_cov.cpu(),
            "channel_index": self.channel_index.cpu(),
            "grid": torch.tensor(self.grid, dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = {"mean", "inv_cov", "channel_index", "grid"} - set(state)
        if missing:
            raise ThreecadError(f"PaDiM weights lack {', '.join(sorted(missing))}")
        self.mean = state["mean"].float()
        self.inv_cov = state["inv_cov"].float()
        self.channel_index = state["channel_index"].long()
        self.grid = tuple(int(v) for v in state["grid"])
