"""DRAEM (Zavrtanik, Kristan & Skocaj, "DRAEM - A discriminatively trained reconstruction embedding
for surface anomaly detection", ICCV 2021).

No pretrained backbone. A reconstructive U-Net-shaped auto-encoder (no skips) learns to turn an image
with a synthetic anomaly back into its normal version; a discriminative U-Net sees the reconstruction
and the input side by side and segments where they differ. Both train jointly on normal images with
Perlin/texture anomalies (:mod:`threecad.synth.anomalies`, DRAEM's parameters: half the samples clean,
three texture augmenters, the normal image rotated with probability 0.3).

Official configuration, kept (official code ``VitjanZ/DRAEM``): reconstructive network of base width
128 (69,048,579 parameters), discriminative network of base width 64 (28,374,146), convolutions
initialised N(0, 0.02) and BatchNorm weights N(1, 0.02); inputs in [0, 1] without normalisation;
loss = MSE + (1 - SSIM) (window 11, sigma 1.5) on the reconstruction + focal loss (gamma 2) on the
softmax segmentation, not detached between the networks; one Adam, lr 1e-4 for both, batch 8,
700 epochs (the README command), the code's schedule (x0.2 at 80 % and 90 % of the epochs, per
epoch); the last epoch is kept. The pixel map is the softmax's anomaly channel, unsmoothed; the
image score is the maximum of its 21x21 mean filter. See ``docs/method-draem-destseg.md``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from threecad.device import resolve_device
from threecad.errors import ThreecadError
from threecad.maps.postprocess import gaussian_kernel1d, mean_filter
from threecad.methods import Method, Option, register
from threecad.methods.batching import train_subset
from threecad.methods.blocks import focal_loss
from threecad.methods.method import NetInference
from threecad.methods.training import TrainSettings, seeded
from threecad.methods.training import fit as engine_fit
from threecad.synth.anomalies import DRAEM_SYNTHESIS, SyntheticAnomalyDataset, TextureBank, collate

log = logging.getLogger(__name__)

#: Base widths of the official networks: reconstructive 128, discriminative 64 (``width`` divides them).
RECONSTRUCTIVE_BASE, DISCRIMINATIVE_BASE = 128, 64
#: Learning-rate schedules: milestones as fractions of the epochs, and the decay factor. ``code``:
#: the official code (0.8 E, 0.9 E, x0.2); ``paper``: x0.1 at epochs 400 and 600 of 700.
SCHEDULES = {"code": ((0.8, 0.9), 0.2), "paper": ((400 / 700, 600 / 700), 0.1)}
#: Side divisibility: the discriminative encoder pools five times.
STRIDE = 32


# --------------------------------------------------------------------------------------------- networks
def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    """3x3 convolution (with bias, as in the official networks), BatchNorm, ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _double(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(*_conv(c_in, c_mid), *_conv(c_mid, c_out))


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ReconstructiveNet(nn.Module):
    """Encoder of five double-conv blocks (``b, 2b, 4b, 8b, 8b``, max-pool between them) and a decoder
    of four steps without skips: bilinear x2, conv at the same width, then two convs of which the
    second narrows (``8b -> 4b -> 2b -> b -> b``); a last 3x3 conv to 3 channels, no activation."""

    def __init__(self, base: int = RECONSTRUCTIVE_BASE, channels: int = 3):
        super().__init__()
        widths = (base, 2 * base, 4 * base, 8 * base, 8 * base)
        ins = (channels, *widths[:-1])
        self.encoder = nn.ModuleList(_double(c_in, c, c) for c_in, c in zip(ins, widths))
        steps = ((8 * base, 4 * base), (4 * base, 2 * base), (2 * base, base), (base, base))
        self.up = nn.ModuleList(nn.Sequential(*_conv(c, c)) for c, _ in steps)
        self.decoder = nn.ModuleList(_double(c, c, c_out) for c, c_out in steps)
        self.out = nn.Conv2d(base, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if i else x)
        for up, block in zip(self.up, self.decoder):
            x = block(up(_upsample(x, (2 * x.shape[-2], 2 * x.shape[-1]))))
        return self.out(x)


class DiscriminativeNet(nn.Module):
    """U-Net: encoder of six double-conv blocks (``b, 2b, 4b, 8b, 8b, 8b``, five max-pools); five
    decoder steps, each bilinear x2 + conv to the step's width, concatenation with the encoder
    block of that resolution and two convs; a last 3x3 conv to ``classes`` logits."""

    def __init__(self, base: int = DISCRIMINATIVE_BASE, channels: int = 6, classes: int = 2):
        super().__init__()
        widths = (base, 2 * base, 4 * base, 8 * base, 8 * base, 8 * base)
        ins = (channels, *widths[:-1])
        self.encoder = nn.ModuleList(_double(c_in, c, c) for c_in, c in zip(ins, widths))
        skips = widths[-2::-1]  # 8b, 8b, 4b, 2b, b
        outs = (8 * base, 4 * base, 2 * base, base, base)
        ins = (8 * base, *outs[:-1])
        self.up = nn.ModuleList(nn.Sequential(*_conv(c_in, c)) for c_in, c in zip(ins, outs))
        self.decoder = nn.ModuleList(_double(c + skip, c, c) for c, skip in zip(outs, skips))
        self.out = nn.Conv2d(base, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        for up, block, skip in zip(self.up, self.decoder, skips[-2::-1]):
            x = block(torch.cat([up(_upsample(x, tuple(skip.shape[-2:]))), skip], dim=1))
        return self.out(x)


def init_draem(module: nn.Module) -> None:
    """The official initialisation: convolution weights N(0, 0.02) (biases keep PyTorch's default),
    BatchNorm weights N(1, 0.02) and biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DRAEMNet(nn.Module):
    """Both networks; ``forward(images)`` returns ``reconstruction`` (B, 3, H, W) and ``logits``
    (B, 2, H, W) of the discriminative network fed ``[reconstruction, images]``. ``width``: the
    official base widths divided by it (1 = official)."""

    def __init__(self, width: int = 1):
        super().__init__()
        self.reconstructive = ReconstructiveNet(max(1, RECONSTRUCTIVE_BASE // width))
        self.discriminative = DiscriminativeNet(max(1, DISCRIMINATIVE_BASE // width))
        init_draem(self)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        reconstruction = self.reconstructive(images)
        logits = self.discriminative(torch.cat([reconstruction, images], dim=1))
        return {"reconstruction": reconstruction, "logits": logits}


# --------------------------------------------------------------------------------------------- losses
def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
             data_range: float | None = None) -> torch.Tensor:
    """Per-pixel SSIM of (B, C, H, W) images, each channel separately, Gaussian-weighted local
    statistics (``window`` taps, ``sigma``; population variances), zero padding at the borders.

    ``data_range`` None: the official rule read from ``x`` (the reconstruction): 255 if its maximum
    exceeds 128, else 1, plus 1 if its minimum is below -0.5. Computed in float32 outside autocast.
    """
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        if data_range is None:
            low, high = float(x.detach().min()), float(x.detach().max())
            data_range = (255.0 if high > 128 else 1.0) + (1.0 if low < -0.5 else 0.0)
        radius = window // 2
        kernel = gaussian_kernel1d(sigma, truncate=radius / sigma, dtype=torch.float32).to(x.device)
        channels = x.shape[1]
        rows = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
        cols = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)

        def local_mean(t: torch.Tensor) -> torch.Tensor:
            t = F.conv2d(t, rows, padding=(radius, 0), groups=channels)
            return F.conv2d(t, cols, padding=(0, radius), groups=channels)

        mx, my = local_mean(x), local_mean(y)
        vx, vy, cxy = local_mean(x * x) - mx * mx, local_mean(y * y) - my * my, local_mean(x * y) - mx * my
        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


#: DRAEM's focal loss: gamma 2 with label smoothing 1e-5.
FOCAL_GAMMA, FOCAL_SMOOTH = 2.0, 1e-5


def draem_losses(out: dict[str, torch.Tensor], clean: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``loss = mse + ssim + focal`` (weights 1, official), every term logged; ``ssim`` = 1 - mean SSIM."""
    reconstruction = out["reconstruction"].float()
    mse = F.mse_loss(reconstruction, clean.float())
    ssim = 1.0 - ssim_map(reconstruction, clean).mean()
    probs = torch.softmax(out["logits"].float(), dim=1)
    focal = focal_loss(probs, mask.round(), FOCAL_GAMMA, FOCAL_SMOOTH)
    return {"loss": mse + ssim + focal, "mse": mse, "ssim": ssim, "focal": focal}


def window_max(maps: torch.Tensor, window: int) -> torch.Tensor:
    """Image scores (B,): the maximum of the ``window`` x ``window`` mean filter of (B, H, W) maps
    (stride 1, zero padding counted in the mean, as the official evaluation)."""
    return mean_filter(maps, window).flatten(1).amax(1)


def milestones(epochs: int, fractions: tuple[float, ...]) -> list[int]:
    """Scheduler milestones at these fractions of ``epochs``, rounded (at least 1), so short runs decay too."""
    return sorted({max(1, int(round(f * epochs))) for f in fractions})


# --------------------------------------------------------------------------------------------- method
@register
class DRAEM(Method):
    """DRAEM (ICCV 2021): reconstruction + discriminative segmentation, trained on synthetic anomalies.

    Parameters
    ----------
    epochs, batch_size, lr:
        The official 700 epochs (README command), batch 8, Adam learning rate 1e-4 (default betas)
        for both networks; the last epoch is kept.
    schedule:
        ``"code"`` (official code: x0.2 at 80 % and 90 % of the epochs) or ``"paper"`` (x0.1 at
        400/700 and 600/700 of the epochs); stepped per epoch.
    width:
        Base widths 128 (reconstructive) and 64 (discriminative) divided by this (1 = official;
        2, 4, 8 for CPU budgets: parameters and FLOPs fall about as its square).
    size:
        Input side (a multiple of 32); ``None`` = the training images' size (the runner's ``--size``,
        256 by default as in the paper).
    textures:
        A texture folder (DTD's ``images``); ``None`` = procedural textures and other training images.
    score_window:
        Side of the mean filter whose maximum is the image score (official 21).
    seed, device, amp, workers, resume, train_images:
        Seed, device, float16 autocast on CUDA, DataLoader workers, continue an interrupted fit from
        its checkpoint, 0 = all training images else a seeded subset of that many.
    """

    name = "draem"
    OPTIONS = {
        "epochs": Option(int, low=1),
        "batch_size": Option(int, low=1),
        "lr": Option(float, low=0, open_low=True),
        "schedule": Option(str, choices=tuple(SCHEDULES)),
        "width": Option(int, low=1, high=64),
        "size": Option(int, low=STRIDE, multiple=STRIDE, null=True),
        "textures": Option(str, null=True),
        "score_window": Option(int, low=1, predict=True),
        "seed": Option(int, low=0),
        "device": Option(str, predict=True),
        "amp": Option(bool),
        "workers": Option(int, low=0),
        "resume": Option(bool),
        "train_images": Option(int, low=0),
    }

    def __init__(
        self,
        epochs: int = 700,
        batch_size: int = 8,
        lr: float = 1e-4,
        schedule: str = "code",
        width: int = 1,
        size: int | None = None,
        textures: str | None = None,
        score_window: int = 21,
        seed: int = 0,
        device: str = "auto",
        amp: bool = True,
        workers: int = 0,
        resume: bool = False,
        train_images: int = 0,
    ):
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.schedule = str(schedule)
        self.width = int(width)
        self.size = size
        self.textures = None if textures in (None, "") else str(textures)
        self.score_window = int(score_window)
        if self.score_window % 2 == 0:
            raise ThreecadError(f"method 'draem' option score_window takes an odd number (a centred window), got {score_window}")
        self.seed = int(seed)
        self.device = str(device)
        self.amp = bool(amp)
        self.workers = int(workers)
        self.resume = bool(resume)
        self.train_images = int(train_images)
        self.net: DRAEMNet | None = None
        self.history_: list[dict] = []

    def _device(self) -> torch.device:
        return resolve_device(self.device)

    def _build(self) -> DRAEMNet:
        if self.net is None:
            with seeded(self.seed):
                self.net = DRAEMNet(self.width)
            self.net.to(self._device())
            log.info("draem: width 1/%d, %.2f M parameters", self.width,
                     sum(p.numel() for p in self.net.parameters()) / 1e6)
        return self.net

    # ------------------------------------------------------------------ engine hooks (Trainable)
    def trainable_module(self) -> DRAEMNet:
        return self._build()

    def configure_optimizers(self, module: DRAEMNet):
        optimizer = torch.optim.Adam(module.parameters(), lr=self.lr)
        fractions, gamma = SCHEDULES[self.schedule]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones(self.epochs, fractions), gamma=gamma)
        return optimizer, scheduler

    def training_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        return draem_losses(module(batch["augmented"]), batch["image"], batch["mask"])

    def validation_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        return self.training_step(module, batch)

    # ------------------------------------------------------------------ fit
    def _synthetic(self, data: torch.utils.data.Dataset, bank: TextureBank, seed: int) -> SyntheticAnomalyDataset:
        return SyntheticAnomalyDataset(data, bank, seed=seed, params=DRAEM_SYNTHESIS)

    def fit(self, train_set: torch.utils.data.Dataset, val_set: torch.utils.data.Dataset | None = None) -> DRAEM:
        if len(train_set) == 0:
            raise ThreecadError("draem.fit got no training images")
        shape = tuple(int(v) for v in train_set[0]["image"].shape[-2:])
        if shape[0] % STRIDE or shape[1] % STRIDE:
            raise ThreecadError(f"draem needs image sides divisible by {STRIDE}, got {shape[1]}x{shape[0]}; "
                                "use --resize squash --size 256 (or 128, 320 ...)")
        self._build()
        base = train_subset(train_set, self.train_images, self.seed)
        bank = TextureBank(self.textures, images=base)
        data = self._synthetic(base, bank, self.seed)
        validation = self._synthetic(val_set, bank, self.seed + 1) if val_set is not None and len(val_set) else None
        settings = TrainSettings(epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, amp=self.amp,
                                 num_workers=self.workers)
        fingerprint = {"method": self.name, "lr": self.lr, "schedule": self.schedule, "width": self.width,
                       "input_shape": list(shape), "train_images": len(base), "textures": self.textures}
        log.info("draem: %d training images at %dx%d, %d epochs, textures: %s", len(base), shape[1], shape[0],
                 self.epochs, bank.source)
        self.history_ = engine_fit(self, data, settings, self._device(), work_dir=self.work_dir, resume=self.resume,
                                   val_data=validation, collate=collate, desc=self.name, fingerprint=fingerprint)
        self.net.eval()
        return self

    # ------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.net is None:
            raise ThreecadError("draem is not fitted: call fit() or load a saved run")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ThreecadError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % STRIDE or images.shape[-1] % STRIDE:
            raise ThreecadError(f"draem takes image sides divisible by {STRIDE}, got "
                                f"{images.shape[-1]}x{images.shape[-2]}: predict at the input size it was trained with")
        return self.run_inference(images.to(self._device()))

    def inference_module(self) -> NetInference:
        """The network and its map (:meth:`_infer`) as one module."""
        return self.net_inference()

    def _infer(self, net: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps: the anomaly-class probability, the score its windowed maximum."""
        maps = torch.softmax(net(images)["logits"].float(), dim=1)[:, 1]
        return window_max(maps, self.score_window), maps

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.net is None:
            raise ThreecadError("draem is not fitted: nothing to save")
        return {k: v.detach().cpu() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        net = self._build()
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ThreecadError(f"the weights do not fit the network ({str(exc).splitlines()[0].strip()}); "
                                "was the run trained with another width?") from None
        net.eval()
