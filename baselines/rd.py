"""RD (Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022)
and RD++ (Tien et al., "Revisiting Reverse Distillation for Anomaly Detection", CVPR 2023).

A frozen pretrained encoder is tapped at strides 4, 8 and 16; a trainable one-class bottleneck
(OCBE) fuses the three levels and compresses them to stride 32, and a reverse decoder rebuilds the
three levels from it. Trained on normal images only, the decoder reproduces normal features; where
it fails, the encoder's and decoder's features disagree. RD++ inserts trainable projection layers
between encoder and OCBE, trained to map features of images with a synthetic noise patch onto those
of the clean image. The blocks are :mod:`threecad.methods.blocks` (shared with CFRG), the map
post-processing :mod:`threecad.maps.postprocess`, the training loop :mod:`threecad.methods.training`.

Official configuration, kept: WideResNet-50-2 (ImageNet V1 weights) tapped at layer1-3, OCBE +
decoder at the official widths (58,885,120 + 24,917,504 parameters; RD++ projections 15,486,912),
the loss summed over levels of ``1 - cos`` between whole flattened feature maps, Adam lr 0.005
betas (0.5, 0.999) over OCBE + decoder, batch 16, 200 epochs, 256 px, the map = the sum over levels
of the per-pixel ``1 - cos`` over channels, upsampled (bilinear, ``align_corners=True``) to the
input and smoothed with a Gaussian of sigma 4, the image score = its maximum. See
``docs/methods.md`` for RD++'s specifics and for what departs from the official code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from threecad.backbones.registry import canonical_name
from threecad.backbones.resnet import init_like_torchvision
from threecad.device import resolve_device
from threecad.errors import ThreecadError
from threecad.maps.postprocess import gaussian_blur, top_fraction_mean
from threecad.methods import Method, Option, register
from threecad.methods.batching import train_subset
from threecad.methods.blocks import (
    OCBE,
    PAPER_TEACHER,
    Decoder,
    FrozenPartNet,
    Teacher,
    build_teacher,
    cosine_distance_map,
    flattened_cosine_loss,
)
from threecad.methods.method import NetInference
from threecad.methods.training import TrainSettings, seeded
from threecad.methods.training import fit as engine_fit

log = logging.getLogger(__name__)

#: Adam betas of the official code (both RD and RD++).
BETAS = (0.5, 0.999)
#: RD++: narrowest inner width of a projection layer. The official ``c/2, c/4`` widths are kept for
#: WRN50 (128..512); Lite0's 24/40/112-channel taps would give 6-56-channel layers.
PROJ_MIN_WIDTH = 32
#: RD++'s projection-loss weights (official ``Revisit_RDLoss``): reconstruction, contrast, the
#: normaliser 1.11 = 1 + 0.01 + 0.1 (the optimal-transport term's weight 1 is kept in it, see
#: ``docs/methods.md``), and the contrast margin.
RECON_WEIGHT, CONTRAST_WEIGHT, PROJ_NORM, CONTRAST_MARGIN = 0.01, 0.1, 1.11, 0.5
#: ``bottleneck="wide"``: floors on the OCE inner width, the embedding width and the decoder stages
#: inner widths (coarse to fine). WRN50 is above all of them (official widths); Lite0 gets the
#: reference's suggested 128 / 320 / (128, 64, 64) instead of the literal 112 / 224 / (56, 20, 12).
WIDE_FLOORS = (128, 320, (128, 64, 64))
BOTTLENECKS = ("scaled", "wide")
#: RD++ noise law at 256 px: patch sides uniform in [10, 31], i.e. [10 s/256, s/8 - 1] at side s.
NOISE_MIN_SIDE, NOISE_REFERENCE = 10, 256


# --------------------------------------------------------------------------------------------- network
class ProjectionLayer(nn.Sequential):
    """RD++ projection of one level: four 3x3 convs (with bias) ``c -> c/2 -> c/4 -> c/2 -> c``, each
    followed by InstanceNorm (no affine, no running statistics) and LeakyReLU(0.01); inner widths at
    least :data:`PROJ_MIN_WIDTH`."""

    def __init__(self, channels: int, min_width: int = PROJ_MIN_WIDTH):
        half, quarter = max(channels // 2, min_width), max(channels // 4, min_width)
        widths = (channels, half, quarter, half, channels)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.InstanceNorm2d(c_out), nn.LeakyReLU(0.01)]
        super().__init__(*layers)


class RDNet(FrozenPartNet):
    """Frozen encoder, optional RD++ projections, OCBE and reverse decoder.

    ``forward(images)`` returns ``encoder`` (the three tap features) and ``decoded`` (the decoder's
    three outputs, same shapes); with projections also ``projected``; ``forward(images, noisy)``
    adds ``encoder_noisy`` and ``projected_noisy`` (RD++ training). ``chunk``: OCBE and decoder run
    on consecutive pieces of that many samples, so BatchNorm sees the official per-step batch when
    RD++ accumulates gradients over several of them (the encoder and the instance-normalised
    projections do not depend on how a batch is cut).
    """

    def __init__(self, teacher: Teacher, projection: bool = False, bottleneck: str = "scaled"):
        super().__init__()
        self.teacher = teacher
        channels = teacher.channels
        self.projection = nn.ModuleList(ProjectionLayer(c) for c in channels) if projection else None
        if bottleneck not in BOTTLENECKS:
            raise ThreecadError(f"unknown bottleneck {bottleneck!r}; choose from {', '.join(BOTTLENECKS)}")
        width = embedding = widths = None  # "scaled": the official rule on the encoder's channels
        if bottleneck == "wide":
            oce_floor, embedding_floor, decoder_floors = WIDE_FLOORS
            width, embedding = max(channels[2], oce_floor), max(2 * channels[2], embedding_floor)
            widths = [max(c // 2, f) for c, f in zip(reversed(channels), decoder_floors)]
        self.ocbe = OCBE(channels, width=width, out_channels=embedding)
        self.decoder = Decoder(channels, self.ocbe.out_channels, signed=teacher.signed, widths=widths)
        init_like_torchvision(self.ocbe)
        init_like_torchvision(self.decoder)

    def trainable_modules(self) -> dict[str, nn.Module]:
        modules = {"ocbe": self.ocbe, "decoder": self.decoder}
        if self.projection is not None:
            modules["projection"] = self.projection
        return modules

    def _project(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p(f) for p, f in zip(self.projection, feats)]

    def forward(self, images: torch.Tensor, noisy: torch.Tensor | None = None,
                chunk: int | None = None) -> dict[str, list[torch.Tensor]]:
        b = images.shape[0]
        both = self.teacher(images if noisy is None else torch.cat([images, noisy]))
        encoder = [f[:b] for f in both]
        out: dict[str, list[torch.Tensor]] = {"encoder": encoder}
        bottleneck_in = encoder
        if self.projection is not None:
            projected = self._project(both)  # instance norm: per sample, so one pass over both halves
            out["projected"] = bottleneck_in = [p[:b] for p in projected]
            if noisy is not None:
                out["encoder_noisy"] = [f[b:] for f in both]
                out["projected_noisy"] = [p[b:] for p in projected]
        if chunk is None:  # one pass: no loop over the batch size, which 3cad export keeps a dynamic axis
            out["decoded"] = self.decoder(self.ocbe(bottleneck_in))
            return out
        pieces = [self.decoder(self.ocbe([f[i:i + chunk] for f in bottleneck_in])) for i in range(0, b, chunk)]
        out["decoded"] = pieces[0] if len(pieces) == 1 else [torch.cat(level) for level in zip(*pieces)]
        return out


# --------------------------------------------------------------------------------------------- losses
def rd_loss(out: dict) -> dict[str, torch.Tensor]:
    """RD: ``{"loss"}``, the flattened-vector cosine loss between encoder and decoder, summed over levels."""
    return {"loss": flattened_cosine_loss(out["encoder"], out["decoded"])}


def contrast_loss(noisy: Sequence[torch.Tensor], projected: Sequence[torch.Tensor],
                  margin: float = CONTRAST_MARGIN) -> torch.Tensor:
    """RD++'s ``CosineEmbeddingLoss(margin, target -1)`` summed over levels: the batch mean of
    ``max(0, cos - margin)`` between the flattened raw encoder features of the noisy image and the
    flattened projection of the clean one."""
    total = noisy[0].new_zeros((), dtype=torch.float32)
    for a, p in zip(noisy, projected):
        cos = F.cosine_similarity(a.float().flatten(1), p.float().flatten(1), dim=1)
        total = total + (cos - margin).clamp_min(0).mean()
    return total


def reconstruction_loss(projected_noisy: Sequence[torch.Tensor], projected: Sequence[torch.Tensor]) -> torch.Tensor:
    """RD++: per level the mean over (B, H, W) of ``1 - cos`` over channels between the projections
    of the noisy and the clean image, summed over levels."""
    total = projected[0].new_zeros((), dtype=torch.float32)
    for a, p in zip(projected_noisy, projected):
        total = total + (1 - F.cosine_similarity(a.float(), p.float(), dim=1)).mean()
    return total


def rdpp_losses(out: dict, proj_weight: float = 0.2) -> dict[str, torch.Tensor]:
    """RD++: ``loss = distill + proj_weight * (0.01 recon + 0.1 contrast) / 1.11`` (the official
    optimal-transport term is identically zero, see ``docs/methods.md``), with every term logged."""
    distill = flattened_cosine_loss(out["encoder"], out["decoded"])
    recon = reconstruction_loss(out["projected_noisy"], out["projected"])
    contrast = contrast_loss(out["encoder_noisy"], out["projected"])
    proj = (RECON_WEIGHT * recon + CONTRAST_WEIGHT * contrast) / PROJ_NORM
    return {"loss": distill + proj_weight * proj, "distill": distill, "proj": proj, "recon": recon,
            "contrast": contrast}


# --------------------------------------------------------------------------------------------- RD++ noise
def _perlin3(z: np.ndarray, y: np.ndarray, x: np.ndarray, perm: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Classic 3-D gradient noise (quintic fade) at the points ``(z, y, x)``, 256-entry lattice hash."""
    cells = [np.floor(c).astype(np.int64) for c in (z, y, x)]
    frac = [c - f for c, f in zip((z, y, x), cells)]
    fade = [t * t * t * (t * (t * 6 - 15) + 10) for t in frac]
    total = np.zeros_like(z)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                h = perm[(perm[(perm[(cells[2] + dx) % 256] + cells[1] + dy) % 256] + cells[0] + dz) % 256]
                g = grads[h]
                dot = g[..., 0] * (frac[0] - dz) + g[..., 1] * (frac[1] - dy) + g[..., 2] * (frac[2] - dx)
                weight = ((fade[0] if dz else 1 - fade[0]) * (fade[1] if dy else 1 - fade[1])
                          * (fade[2] if dx else 1 - fade[2]))
                total += weight * dot
    return total


def noise_field(shape: tuple[int, int, int], seed: int, octaves: int = 6, persistence: float = 0.6,
                divisor: float = 32.0) -> np.ndarray:
    """RD++'s fixed noise pattern, ``shape`` = (3, h, w) float32 with peak ``|value|`` 1.

    Fractal 3-D gradient noise over the grid (channel, row, column), with the official octave law:
    ``octaves`` octaves, the first sampled at coordinates / ``divisor``, the divisor halving and the
    amplitude multiplied by ``persistence`` at each octave. Each octave is shifted by a seeded
    random offset, so the finest octave (divisor 1) is not sampled on lattice points, where
    gradient noise is 0. A gradient-noise stand-in for the official OpenSimplex noise.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(256)
    grads = rng.normal(size=(256, 3))
    grads /= np.linalg.norm(grads, axis=1, keepdims=True)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    total = np.zeros(shape)
    amplitude = 1.0
    for _ in range(octaves):
        offset = rng.random(3) * 256
        total += amplitude * _perlin3(z / divisor + offset[0], y / divisor + offset[1], x / divisor + offset[2],
                                      perm, grads)
        divisor /= 2
        amplitude *= persistence
    return (total / max(float(np.abs(total).max()), 1e-12)).astype(np.float32)


def noise_sides(side: int) -> tuple[int, int]:
    """``[low, high)`` of a noise patch's side on an image side ``side``: [10, 32) at 256, scaled."""
    high = max(2, side // 8)
    low = min(max(1, round(NOISE_MIN_SIDE * side / NOISE_REFERENCE)), high - 1)
    return low, high


class NoisyImages(torch.utils.data.Dataset):
    """Items ``{"image", "noisy"}``: ``noisy`` is the image plus ``amplitude`` times a crop of one
    fixed noise pattern inside one rectangle (RD++'s pseudo-anomaly), no clipping.

    The rectangle's sides are uniform in :func:`noise_sides` (10-31 px at 256) and its top-left
    corner uniform in ``[1, side - size)``; the crop always starts at the pattern's origin, as in the
    official code. Draws come from a generator seeded by ``(seed, epoch, index)``: the same for any
    number of DataLoader workers, new every epoch (:meth:`set_epoch`).
    """

    def __init__(self, base: torch.utils.data.Dataset, field: np.ndarray, amplitude: float, seed: int):
        self.base = base
        self.field = torch.from_numpy(field)
        self.amplitude = float(amplitude)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        image = self.base[index]["image"].float()
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        height, width = image.shape[-2:]
        (lo_h, hi_h), (lo_w, hi_w) = noise_sides(height), noise_sides(width)
        h = min(int(rng.integers(lo_h, hi_h)), self.field.shape[1], height - 2)
        w = min(int(rng.integers(lo_w, hi_w)), self.field.shape[2], width - 2)
        top, left = int(rng.integers(1, height - h)), int(rng.integers(1, width - w))
        noisy = image.clone()
        noisy[:, top:top + h, left:left + w] += self.amplitude * self.field[:, :h, :w]
        return {"image": image, "noisy": noisy}


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack ``image`` (and ``noisy``) of equally sized items."""
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) > 1:
        raise ThreecadError(f"RD trains on batches of one image size, got {sorted(shapes)}: use --resize squash")
    return {key: torch.stack([item[key].float() for item in items]) for key in ("image", "noisy") if key in items[0]}


# --------------------------------------------------------------------------------------------- methods
_COMMON_OPTIONS = {
    "epochs": Option(int, low=1),
    "batch_size": Option(int, low=1),
    "lr": Option(float, low=0, open_low=True),
    "size": Option(int, low=32, multiple=32, null=True),
    "encoder": Option(str),
    "encoder_weights": Option(str, null=True),
    "sigma": Option(float, low=0, predict=True),
    "topk": Option(float, low=0, high=1, predict=True),
    "seed": Option(int, low=0),
    "device": Option(str, predict=True),
    "amp": Option(bool),
    "workers": Option(int, low=0),
    "resume": Option(bool),
    "train_images": Option(int, low=0),
    "bottleneck": Option(str, choices=BOTTLENECKS),
}


@register
class RD(Method):
    """Reverse distillation (RD, CVPR 2022).

    Parameters
    ----------
    epochs, batch_size, lr:
        The official 200 epochs, batch 16 and Adam learning rate 0.005 (betas 0.5, 0.999, no
        schedule); the last epoch is kept.
    size:
        Input side (a multiple of 32: the bottleneck is at stride 32); ``None`` = the size of the
        training images (the runner's ``--size``, 256 by default as in the paper).
    encoder, encoder_weights:
        The frozen encoder, WideResNet-50-2 with its ImageNet file by default (the paper). Without
        that file it falls back, with a warning, to the offline EfficientNet-Lite0, with OCBE and
        decoder sized from its channels; the saved configuration records the encoder actually used.
        ``encoder_weights="random"``: a random encoder (tests only).
    sigma, topk:
        Gaussian smoothing of the map (official 4); image score = the mean of the map's top ``topk``
        fraction (default 0.01, chosen on validation data, ``docs/results/magnetic-tile.md``; it
        ties with the official maximum, ``topk=0``).
    seed, device, amp, workers, resume:
        Seed (official 111), device, float16 autocast on CUDA, DataLoader workers, continue an
        interrupted fit from its checkpoint in the run's work folder.
    train_images:
        0 = all training images, else a seeded subset of that many (reduced budgets).
    bottleneck:
        ``"scaled"``: OCBE and decoder widths follow the official rule on the encoder's channels
        (the paper's widths with WRN50). ``"wide"`` (default): at least the widths of
        :data:`WIDE_FLOORS`: the same network with WRN50; with Lite0 a wider one (1.9 M instead of
        0.94 M parameters), whose finest decoder stage is not 12 channels thin. Chosen on
        validation data for RD (+1.1 points); RD++ validated ``"scaled"`` and keeps it.
    """

    name = "rd"
    #: Inference options: smoothing, image score, device. Everything else shaped the fitted network.
    OPTIONS = dict(_COMMON_OPTIONS)
    #: ``3cad tune``: the image score, scored on one trained network (a fit costs the most).
    TUNE_GRID = {"topk": (0.01, 0.0)}
    #: RD++ sets this: projection layers and the noise-patch losses.
    projections = False

    def __init__(
        self,
        epochs: int = 200,
        batch_size: int = 16,
        lr: float = 0.005,
        size: int | None = None,
        encoder: str = PAPER_TEACHER,
        encoder_weights: str | None = "default",
        sigma: float = 4.0,
        topk: float = 0.01,
        seed: int = 111,
        device: str = "auto",
        amp: bool = True,
        workers: int = 0,
        resume: bool = False,
        train_images: int = 0,
        bottleneck: str = "wide",
    ):
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.size = size
        self.encoder = str(encoder)
        self.encoder_weights = encoder_weights
        self.sigma = float(sigma)
        self.topk = float(topk)
        self.seed = int(seed)
        self.device = str(device)
        self.amp = bool(amp)
        self.workers = int(workers)
        self.resume = bool(resume)
        self.train_images = int(train_images)
        self.bottleneck = str(bottleneck)
        self.net: RDNet | None = None
        self.history_: list[dict] = []
        #: The encoder actually built (after a fallback): saved in the config, never written back
        #: into ``encoder`` (see :meth:`resolved_config`).
        self._encoder_used: str | None = None

    # ------------------------------------------------------------------ network
    def _device(self) -> torch.device:
        return resolve_device(self.device)

    def _build(self) -> RDNet:
        if self.net is None:
            with seeded(self.seed):
                teacher = build_teacher(self.encoder, self.encoder_weights)
                self._encoder_used = teacher.name
                self.net = RDNet(teacher, projection=self.projections, bottleneck=self.bottleneck)
            device = self._device()
            self.net.to(device)
            log.info("%s: encoder %s (taps %s), %.2f M trainable parameters", self.name, teacher.name,
                     teacher.channels, sum(p.numel() for p in self.net.parameters() if p.requires_grad) / 1e6)
        return self.net

    def resolved_config(self) -> dict[str, Any]:
        """The encoder actually built, so that loading the run rebuilds the network its weights fit."""
        return {"encoder": self._encoder_used} if self._encoder_used is not None else {}

    # ------------------------------------------------------------------ engine hooks (Trainable)
    def trainable_module(self) -> RDNet:
        return self._build()

    def _parameter_groups(self, module: RDNet) -> list[dict]:
        return [{"params": list(module.ocbe.parameters()) + list(module.decoder.parameters()), "lr": self.lr}]

    def configure_optimizers(self, module: RDNet):
        return torch.optim.Adam(self._parameter_groups(module), lr=self.lr, betas=BETAS), None

    def training_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        return rd_loss(module(batch["image"]))

    def validation_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        return self.training_step(module, batch)

    def checkpoint_state(self, module: RDNet) -> dict[str, torch.Tensor]:
        return module.trainable_state_dict()

    def load_checkpoint_state(self, module: RDNet, state: dict[str, torch.Tensor]) -> None:
        module.load_trainable_state_dict(state)

    # ------------------------------------------------------------------ fit
    def _training_data(self, data: torch.utils.data.Dataset, shape: tuple[int, int], offset: int = 0):
        return data

    def _engine_batch(self) -> int:
        return self.batch_size

    def _fingerprint(self, shape: tuple[int, int], n: int) -> dict[str, Any]:
        """What a resumed checkpoint must have been trained with, besides the engine's settings."""
        return {"method": self.name, "encoder": self._encoder_used, "lr": self.lr, "input_shape": list(shape),
                "train_images": n, "bottleneck": self.bottleneck}

    def fit(self, train_set: torch.utils.data.Dataset, val_set: torch.utils.data.Dataset | None = None) -> RD:
        if len(train_set) == 0:
            raise ThreecadError(f"{self.name}.fit got no training images")
        shape = tuple(int(v) for v in train_set[0]["image"].shape[-2:])
        if shape[0] % 32 or shape[1] % 32:
            raise ThreecadError(f"{self.name} needs image sides divisible by 32 (the bottleneck is at stride 32), got "
                                f"{shape[1]}x{shape[0]}; use --resize squash --size 256 (or 128, 320 ...)")
        net = self._build()
        base = train_subset(train_set, self.train_images, self.seed)
        data = self._training_data(base, shape)
        validation = self._training_data(val_set, shape, offset=1) if val_set is not None and len(val_set) else None
        settings = TrainSettings(epochs=self.epochs, batch_size=self._engine_batch(), seed=self.seed, amp=self.amp,
                                 num_workers=self.workers)
        log.info("%s: %d training images at %dx%d, %d epochs", self.name, len(base), shape[1], shape[0], self.epochs)
        self.history_ = engine_fit(self, data, settings, self._device(), work_dir=self.work_dir, resume=self.resume,
                                   val_data=validation, collate=collate, desc=self.name,
                                   fingerprint=self._fingerprint(shape, len(base)))
        net.eval()
        return self

    # ------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.net is None:
            raise ThreecadError(f"{self.name} is not fitted: call fit() or load a saved run")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ThreecadError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        size = tuple(images.shape[-2:])
        if size[0] % 32 or size[1] % 32:
            raise ThreecadError(f"{self.name} takes image sides divisible by 32, got {size[1]}x{size[0]}: "
                                "predict at the input size the run was trained with")
        return self.run_inference(images.to(self._device()))

    def inference_module(self) -> NetInference:
        """The network and its map (:meth:`_infer`) as one module."""
        return self.net_inference()

    def _infer(self, net: RDNet, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps: the summed ``1 - cos`` of encoder and decoder features, smoothed."""
        out = net(images)
        maps = gaussian_blur(cosine_distance_map(out["encoder"], out["decoded"], tuple(images.shape[-2:])), self.sigma)
        return top_fraction_mean(maps, self.topk), maps

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.net is None:
            raise ThreecadError(f"{self.name} is not fitted: nothing to save")
        return {k: v.detach().cpu() for k, v in self.net.trainable_state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        net = self._build()
        if self._encoder_used != canonical_name(self.encoder):
            raise ThreecadError(f"this run was trained with the encoder {self.encoder}, which cannot be built here "
                                f"(got {self._encoder_used}): place its weight file (docs/backbones.md)")
        net.load_trainable_state_dict(state)
        net.eval()


@register
class RDPP(RD):
    """RD++ (CVPR 2023): RD plus projection layers trained with noise-patch losses.

    Parameters (besides RD's)
    -------------------------
    proj_lr:
        Adam learning rate of the projection layers (official 0.001; OCBE + decoder keep ``lr``).
    proj_weight:
        Weight of the projection loss in the total (official 0.2).
    accumulate:
        Optimiser step every ``accumulate`` batches of ``batch_size`` (official 2: gradients of two
        batches summed, BatchNorm statistics per batch).
    noise_amplitude, noise_seed:
        The pseudo-anomaly: ``noise_amplitude`` times one fixed noise pattern of peak 1, seeded by
        ``noise_seed`` (official: 0.2 times an OpenSimplex pattern of peak about 1.3, i.e. 0.26).
    epochs:
        200 (the official code fixes a number per MVTec class, 10-300, and none for 3CAD).
    topk, bottleneck:
        0 (the map maximum) and ``"scaled"``: RD++'s own validation chose them
        (``docs/results/magnetic-tile.md``), where RD's chose 0.01 and ``"wide"``.
    """

    name = "rdpp"
    TUNE_GRID = {"topk": (0.0, 0.01)}
    OPTIONS = {
        **_COMMON_OPTIONS,
        "proj_lr": Option(float, low=0, open_low=True),
        "proj_weight": Option(float, low=0),
        "accumulate": Option(int, low=1),
        "noise_amplitude": Option(float, low=0),
        "noise_seed": Option(int, low=0),
    }
    projections = True

    def __init__(
        self,
        epochs: int = 200,
        batch_size: int = 16,
        lr: float = 0.005,
        proj_lr: float = 0.001,
        proj_weight: float = 0.2,
        accumulate: int = 2,
        noise_amplitude: float = 0.26,
        noise_seed: int = 0,
        size: int | None = None,
        encoder: str = PAPER_TEACHER,
        encoder_weights: str | None = "default",
        sigma: float = 4.0,
        topk: float = 0.0,
        seed: int = 111,
        device: str = "auto",
        amp: bool = True,
        workers: int = 0,
        resume: bool = False,
        train_images: int = 0,
        bottleneck: str = "scaled",
    ):
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, size=size, encoder=encoder,
                         encoder_weights=encoder_weights, sigma=sigma, topk=topk, seed=seed, device=device, amp=amp,
                         workers=workers, resume=resume, train_images=train_images, bottleneck=bottleneck)
        self.proj_lr = float(proj_lr)
        self.proj_weight = float(proj_weight)
        self.accumulate = int(accumulate)
        self.noise_amplitude = float(noise_amplitude)
        self.noise_seed = int(noise_seed)

    def _parameter_groups(self, module: RDNet) -> list[dict]:
        # One Adam with two groups = the official two Adams (Adam's state is per parameter).
        return super()._parameter_groups(module) + [{"params": list(module.projection.parameters()),
                                                     "lr": self.proj_lr}]

    def _engine_batch(self) -> int:
        return self.batch_size * self.accumulate

    def training_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        return rdpp_losses(module(batch["image"], batch["noisy"], chunk=self.batch_size), self.proj_weight)

    def validation_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        return rdpp_losses(module(batch["image"], batch["noisy"]), self.proj_weight)

    def _training_data(self, data: torch.utils.data.Dataset, shape: tuple[int, int], offset: int = 0):
        field = noise_field((3, noise_sides(shape[0])[1] - 1, noise_sides(shape[1])[1] - 1), self.noise_seed)
        return NoisyImages(data, field, self.noise_amplitude, self.seed + offset)

    def _fingerprint(self, shape: tuple[int, int], n: int) -> dict[str, Any]:
        return {**super()._fingerprint(shape, n), "proj_lr": self.proj_lr, "proj_weight": self.proj_weight,
                "accumulate": self.accumulate, "noise_amplitude": self.noise_amplitude,
                "noise_seed": self.noise_seed}
