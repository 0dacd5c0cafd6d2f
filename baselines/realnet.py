"""RealNet with texture synthesis (``realnet-texture``): Zhang, Xu & Zhou, "RealNet: A Feature Selection
Network with Realistic Synthetic Anomaly for Anomaly Detection", CVPR 2024, without its diffusion model.

A frozen pretrained encoder (official: WideResNet-50-2 layer1-4) sees an image with a synthetic
anomaly and its clean original. Three parts are RealNet's:

* **AFS** (anomaly-aware feature selection): before training, per tap the ``keep`` channels whose
  min-max-normalised squared difference between the synthetic and the clean image's features best
  matches the anomaly mask (smallest summed MSE over ``afs_batches`` synthetic-only batches), in
  channel order, stored as ``long`` buffers in the saved weights (:func:`afs_errors`);
* **reconstruction**: one U-Net per tap (guided-diffusion blocks without time embedding: GroupNorm
  with 32 groups, SiLU, 2x2 average-pool down-sampling and 4x4 stride-2 transposed-conv
  up-sampling residual blocks, 64-channel attention heads at 1/2 and 1/4 resolution and in the
  middle, zero-initialised output conv) maps the selected features of the synthetic image to those
  of the clean one; the residual is ``(x - x_hat)^2``;
* **RRS** (reconstruction residual selection): every residual bilinearly (``align_corners=True``)
  to the finest tap's grid (stride 4 officially), concatenated, ranked through a parameter-free BatchNorm (momentum 0.9); per
  image the top-``k`` channels by spatial maximum and the top-``k`` by spatial mean of the *ranked*
  residual are gathered from the *raw* one (:func:`rrs_select`) and a small decoder segments them
  into two logits at the input size.

Loss: cross-entropy against the mask + the sum over taps of the reconstruction MSE (both weight 1);
map: the anomaly-class softmax at the input size; image score: the maximum of its 16x16
average-pooled version. Official configuration (asserted in ``tests/test_realnet.py``): U-Nets of
51,846,144 + 207,271,936 + 207,271,936 + 51,846,144 parameters for the kept 256/512/512/256
channels, RRS 5,872,662.

What is not RealNet's (hence the name, in every table and run record): its SDAS anomalies come from
a 553 M-parameter diffusion model fine-tuned from an ImageNet checkpoint that is not available
offline; here the anomaly source is the shared Perlin/texture synthesis
(:mod:`threecad.synth.anomalies`) with RealNet's own DTD-branch parameters: half the samples clean,
Perlin masks at lattice exponents 0-5 rotated by up to 90 degrees, the texture weight U(0.2, 1)
(an image weight U(0, 0.8)), three of the ten texture augmenters; whole-image foreground (no
per-class foreground rules exist for 3CAD). See ``docs/method-uniad-crad-realnet.md`` for the other
departures (fixed schedule, no test-set checkpoint selection, no AUROC flipping).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from threecad.backbones.registry import canonical_name
from threecad.device import resolve_device
from threecad.errors import ThreecadError
from threecad.maps.postprocess import pooled_max
from threecad.methods import Method, Option, register
from threecad.methods.batching import train_subset
from threecad.methods.blocks import FrozenPartNet, Teacher, build_teacher, count_parameters
from threecad.methods.method import NetInference
from threecad.methods.training import TrainSettings, seeded
from threecad.methods.training import fit as engine_fit
from threecad.progress import progress
from threecad.synth.anomalies import SynthesisParams, SyntheticAnomalyDataset, TextureBank, collate

log = logging.getLogger(__name__)

PAPER_ENCODER = "wide_resnet50_2"
#: WRN50 layer1-4 (EfficientNet: blocks 2/4/10/15).
LAYERS = ("stride4", "stride8", "stride16", "stride32")
STRIDES = {"stride2": 2, "stride4": 4, "stride8": 8, "stride16": 16, "stride32": 32}
#: Channels AFS keeps per tap in the official configuration (WRN50: 256/512/1024/2048 available);
#: a tap with fewer channels keeps them all.
PAPER_KEEP = {"stride2": 256, "stride4": 256, "stride8": 512, "stride16": 512, "stride32": 256}
#: The official RRS: top-256 by maximum + top-256 by mean of 1536 channels.
PAPER_RRS_TOPK = 256
#: RRS top-k below ``RRS_SMALL_TOTAL`` concatenated channels (the reference's Lite0 adaptation).
SMALL_RRS_TOPK, RRS_SMALL_TOTAL = 64, 1024
GROUPS, HEAD_CHANNELS = 32, 64
CHANNEL_MULT = (1, 2, 4)
#: Down-sampling levels where the U-Nets attend (1/2 and 1/4 resolution), besides the middle block.
ATTENTION_LEVELS = (1, 2)
#: RealNet's DTD-branch synthesis: the shared convention weights the *image* by beta inside the mask,
#: so RealNet's texture weight U(0.2, 1) is an image weight U(0, 0.8).
REALNET_SYNTHESIS = SynthesisParams(clean_probability=0.5, beta=(0.0, 0.8), texture_augmenters=3)


# --------------------------------------------------------------------------------------------- U-Net
def check_width(width: int, what: str = "U-Net width") -> None:
    """GroupNorm with 32 groups needs every width to be a multiple of 32 (one-line error otherwise)."""
    if width < GROUPS or width % GROUPS:
        raise ThreecadError(f"realnet-texture: {what} {width} is not a multiple of {GROUPS} (GroupNorm has "
                            f"{GROUPS} groups); choose 32, 64, 96, ...")


def _norm(channels: int) -> nn.GroupNorm:
    check_width(channels, "GroupNorm width")
    return nn.GroupNorm(GROUPS, channels)


class ResBlock(nn.Module):
    """GN -> SiLU -> (resample) -> 3x3 conv, plus the input (a 1x1 conv when the width changes): the
    official reconstruction block has one conv and no time embedding. ``resample`` ``"down"``: 2x2
    average pooling on both paths; ``"up"``: a 4x4 stride-2 transposed conv on each path."""

    def __init__(self, c_in: int, c_out: int, resample: str | None = None):
        super().__init__()
        self.norm = _norm(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)
        self.resample = resample
        if resample == "up":
            self.up_h = nn.ConvTranspose2d(c_in, c_in, 4, 2, 1)
            self.up_x = nn.ConvTranspose2d(c_in, c_in, 4, 2, 1)

    def _resample(self, t: torch.Tensor, which: str) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(t, 2)
        if self.resample == "up":
            return getattr(self, f"up_{which}")(t)
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self._resample(F.silu(self.norm(x)), "h"))
        return self.skip(self._resample(x, "x")) + h


class Attention(nn.Module):
    """Spatial self-attention: GN, 1x1 qkv, heads of 64 channels, zero-initialised 1x1 projection, residual."""

    def __init__(self, channels: int):
        super().__init__()
        if channels % HEAD_CHANNELS:
            raise ThreecadError(f"realnet-texture: attention width {channels} is not a multiple of {HEAD_CHANNELS}")
        self.heads = channels // HEAD_CHANNELS
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))  # (B, 3C, N)
        q, k, v = qkv.reshape(b, 3, self.heads, HEAD_CHANNELS, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, 64)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h * w)).reshape(b, c, h, w)


class UNet(nn.Module):
    """``(B, C, h, w) -> (B, C, h, w)``: width ``model_channels`` x (1, 2, 4), two residual blocks per
    level (three on the way up, each fed the matching skip), attention at levels 1 and 2 and in the
    middle, a residual down/up-sampling block between levels. ``h`` and ``w`` must be multiples of 4.
    The output conv is zero-initialised, so the reconstruction starts at 0."""

    def __init__(self, channels: int, model_channels: int, res_blocks: int = 2):
        super().__init__()
        check_width(model_channels)
        self.channels, self.model_channels = int(channels), int(model_channels)
        self.inp = nn.Conv2d(channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [model_channels], model_channels
        for level, mult in enumerate(CHANNEL_MULT):
            for _ in range(res_blocks):
                layers = [ResBlock(ch, mult * model_channels)]
                ch = mult * model_channels
                if level in ATTENTION_LEVELS:
                    layers.append(Attention(ch))
                self.down.append(nn.Sequential(*layers))
                skips.append(ch)
            if level < len(CHANNEL_MULT) - 1:
                self.down.append(ResBlock(ch, ch, "down"))
                skips.append(ch)
        self.middle = nn.Sequential(ResBlock(ch, ch), Attention(ch), ResBlock(ch, ch))
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(CHANNEL_MULT))):
            for i in range(res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mult * model_channels)]
                ch = mult * model_channels
                if level in ATTENTION_LEVELS:
                    layers.append(Attention(ch))
                if level and i == res_blocks:
                    layers.append(ResBlock(ch, ch, "up"))
                self.up.append(nn.Sequential(*layers))
        self.out_norm = _norm(ch)
        self.out = nn.Conv2d(ch, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        skips = [h]
        for block in self.down:
            h = block(h)
            skips.append(h)
        h = self.middle(h)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1))
        return self.out(F.silu(self.out_norm(h)))


def default_model_channels(channels: int) -> int:
    """Half the kept channels (the official rule), rounded up to a multiple of 32 for GroupNorm."""
    return GROUPS * max(1, math.ceil(channels / (2 * GROUPS)))


# --------------------------------------------------------------------------------------------- AFS
def afs_errors(synthetic: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(C,)``: AFS's per-channel error on one batch. ``d = (synthetic - clean)^2`` per channel,
    min-max normalised over the batch's ``B*h*w`` positions (``+ 1e-4`` in the denominator), against the mask resized (nearest) to
    ``h x w``: the mean squared difference. Channels with the smallest summed error are kept."""
    d = (synthetic.float() - clean.float()).pow(2).transpose(0, 1).flatten(1)  # (C, B*h*w)
    lo, hi = d.amin(1, keepdim=True), d.amax(1, keepdim=True)
    d = (d - lo) / (hi - lo + 1e-4)  # the official epsilon
    m = F.interpolate(mask.float(), size=tuple(synthetic.shape[-2:]), mode="nearest")
    return (d - m.transpose(0, 1).flatten(1)).pow(2).mean(1)


def afs_indices(errors: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` channels of smallest error, in increasing index order (``long``)."""
    return torch.topk(errors.double(), keep, largest=False).indices.sort().values


# --------------------------------------------------------------------------------------------- RRS
def rrs_select(residuals: torch.Tensor, ranked: torch.Tensor, topk: int) -> torch.Tensor:
    """``(B, 2k, H, W)``: per image, the ``k`` channels of largest spatial maximum of ``ranked``,
    then the ``k`` of largest spatial mean, gathered from the raw ``residuals`` (same shape as
    ``ranked``). The two sets may overlap; each is in decreasing order of its statistic."""
    b, c, h, w = residuals.shape
    flat = ranked.flatten(2)
    by_max = flat.amax(2).topk(topk, dim=1).indices
    by_mean = flat.mean(2).topk(topk, dim=1).indices
    index = torch.cat([by_max, by_mean], dim=1)  # (B, 2k)
    return torch.gather(residuals, 1, index[:, :, None, None].expand(-1, -1, h, w))


def _conv_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True))


class ResidualUnit(nn.Module):
    """ReLU -> 3x3 conv -> ReLU -> 1x1 conv (no biases), plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class RRS(nn.Module):
    """Residual selection and segmentation: ``(B, total, H4, W4)`` residuals -> ``(B, 2, H, W)`` logits."""

    def __init__(self, total: int, topk: int):
        super().__init__()
        if not 1 <= topk <= total:
            raise ThreecadError(f"realnet-texture: rrs_topk {topk} must be in 1..{total} (the concatenated residual "
                                "channels)")
        self.total, self.topk = int(total), int(topk)
        self.rank_norm = nn.BatchNorm2d(total, affine=False, momentum=0.9)
        width = 2 * topk
        self.body = nn.Sequential(ResidualUnit(width), ResidualUnit(width), nn.ReLU(inplace=True),
                                  nn.Conv2d(width, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
                                  _conv_relu(128, 32), _conv_relu(32, 8))
        self.head = nn.Sequential(_conv_relu(8, 4), nn.Conv2d(4, 2, 3, padding=1))

    def forward(self, residuals: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        with torch.no_grad():
            ranked = self.rank_norm(residuals.detach())
        x = self.body(rrs_select(residuals, ranked, self.topk))
        x = F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=True)
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=True)


# --------------------------------------------------------------------------------------------- network
class RealNetNet(FrozenPartNet):
    """Frozen teacher, AFS indices (buffers ``afs_<i>``), one U-Net per tap and the RRS.

    ``forward(images, target=None)`` returns ``logits`` (B, 2, H, W), per tap ``selected`` (the kept
    features of ``images``) and ``rec``, and, with ``target``, ``target_selected`` (the kept features
    of ``target``, the clean image, no gradient).
    """

    def __init__(self, teacher: Teacher, keep: Sequence[int], model_channels: Sequence[int], rrs_topk: int):
        super().__init__()
        self.teacher = teacher
        self.strides = [STRIDES[layer] for layer in teacher.layers]
        for i, (k, c) in enumerate(zip(keep, teacher.channels)):
            if not 1 <= k <= c:
                raise ThreecadError(f"realnet-texture: keep {k} channels of tap {teacher.layers[i]}, which has {c}")
            self.register_buffer(f"afs_{i}", torch.arange(k))
        self.keep = [int(k) for k in keep]
        self.unets = nn.ModuleList(UNet(k, m) for k, m in zip(self.keep, model_channels))
        self.rrs = RRS(sum(self.keep), rrs_topk)

    def indices(self) -> list[torch.Tensor]:
        return [getattr(self, f"afs_{i}") for i in range(len(self.keep))]

    def select(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [f.index_select(1, idx) for f, idx in zip(feats, self.indices())]

    def forward(self, images: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, Any]:
        size = tuple(images.shape[-2:])
        selected = self.select(self.teacher(images))
        rec = [unet(f.float()) for unet, f in zip(self.unets, selected)]
        grid = (size[0] // min(self.strides), size[1] // min(self.strides))
        residuals = torch.cat([F.interpolate((f - r).pow(2), size=grid, mode="bilinear", align_corners=True)
                               for f, r in zip(selected, rec)], dim=1)
        out: dict[str, Any] = {"logits": self.rrs(residuals, size), "selected": selected, "rec": rec}
        if target is not None:
            out["target_selected"] = self.select(self.teacher(target))
        return out


def realnet_losses(out: dict, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy of the logits against the mask + the sum over taps of MSE(reconstruction, the
    clean image's kept features); both weight 1, as the official criterion."""
    ce = F.cross_entropy(out["logits"].float(), (mask[:, 0] > 0.5).long())
    mse = sum(F.mse_loss(r.float(), t.float()) for r, t in zip(out["rec"], out["target_selected"]))
    return {"loss": ce + mse, "ce": ce, "mse": mse}


# --------------------------------------------------------------------------------------------- method
@register
class RealNetTexture(Method):
    """RealNet (CVPR 2024) with the shared Perlin/texture synthesis in place of its diffusion anomalies.

    Parameters
    ----------
    epochs, batch_size, lr:
        Adam (lr 1e-4, betas 0.9/0.999, no weight decay), batch 16 (official). A fixed schedule,
        the last epoch kept: 100 epochs (ADer's benchmark schedule; the official 1000 keep the best
        *test* epoch, which this project never does).
    layers:
        Encoder taps, one U-Net each (official: strides 4/8/16/32 = WRN50 layer1-4). On CPU the
        reference's budget is strides 8 and 16 only.
    keep:
        Channels AFS keeps per tap (``None``: the official 256/512/512/256 by stride, all of a tap
        that has fewer; Lite0 keeps all 24/40/112 and 256 of its 320 stride-32 channels).
    model_channels:
        Base width of each U-Net (``None``: half the kept channels rounded up to a multiple of 32;
        each must be a multiple of 32, GroupNorm's group count).
    rrs_topk:
        Channels RRS takes by maximum and again by mean (``None``: the official 256 from 1024
        concatenated channels up, 64 below, capped at the total).
    afs_batches:
        Synthetic-only batches AFS ranks the channels on (official 64).
    encoder, encoder_weights:
        The frozen encoder: WideResNet-50-2 with torchvision's ImageNet file from the hub cache;
        without it the offline EfficientNet-Lite0 (with a warning), recorded in the saved
        configuration. ``"random"``: timing and tests only.
    textures:
        A texture folder (DTD's ``images``, RealNet's DTD branch); ``None``: procedural textures and
        other training images.
    pool_size:
        Image score = the maximum of the ``pool_size`` average-pooled map (16 official).
    seed, device, amp, workers, resume, train_images:
        Seed (100 official), device, float16 autocast on CUDA, DataLoader workers, continue an
        interrupted fit, 0 = all training images else a seeded subset.
    """

    name = "realnet-texture"
    OPTIONS = {
        "epochs": Option(int, low=1),
        "batch_size": Option(int, low=1),
        "lr": Option(float, low=0, open_low=True),
        "layers": Option(str, choices=tuple(STRIDES), many=True, unique=True),
        "keep": Option(int, low=1, many=True, null=True),
        "model_channels": Option(int, low=32, multiple=32, many=True, null=True),
        "rrs_topk": Option(int, low=1, null=True),
        "afs_batches": Option(int, low=1),
        "encoder": Option(str),
        "encoder_weights": Option(str, null=True),
        "textures": Option(str, null=True),
        "pool_size": Option(int, low=1, high=512, predict=True),
        "seed": Option(int, low=0),
        "device": Option(str, predict=True),
        "amp": Option(bool),
        "workers": Option(int, low=0),
        "resume": Option(bool),
        "train_images": Option(int, low=0),
    }
    DEFAULT_INPUTS = {"size": 256}

    def __init__(
        self,
        epochs: int = 100,
        batch_size: int = 16,
        lr: float = 1e-4,
        layers: Sequence[str] = LAYERS,
        keep: Sequence[int] | None = None,
        model_channels: Sequence[int] | None = None,
        rrs_topk: int | None = None,
        afs_batches: int = 64,
        encoder: str = PAPER_ENCODER,
        encoder_weights: str | None = "default",
        textures: str | None = None,
        pool_size: int = 16,
        seed: int = 100,
        device: str = "auto",
        amp: bool = True,
        workers: int = 0,
        resume: bool = False,
        train_images: int = 0,
    ):
        layers = [str(v) for v in layers]
        for key, value in (("keep", keep), ("model_channels", model_channels)):
            if value is not None and len(value) != len(layers):
                raise ThreecadError(f"realnet-texture: {key} needs one value per tap ({len(layers)}: "
                                    f"{', '.join(layers)}), got {list(value)}")
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.layers = layers
        self.keep = None if keep is None else [int(v) for v in keep]
        self.model_channels = None if model_channels is None else [int(v) for v in model_channels]
        self.rrs_topk = rrs_topk
        self.afs_batches = int(afs_batches)
        self.encoder = str(encoder)
        self.encoder_weights = encoder_weights
        self.textures = None if textures in (None, "") else str(textures)
        self.pool_size = int(pool_size)
        self.seed = int(seed)
        self.device = str(device)
        self.amp = bool(amp)
        self.workers = int(workers)
        self.resume = bool(resume)
        self.train_images = int(train_images)
        self.net: RealNetNet | None = None
        self.history_: list[dict] = []
        self._encoder_used: str | None = None

    # ------------------------------------------------------------------ network
    def _device(self) -> torch.device:
        return resolve_device(self.device)

    def resolved_config(self) -> dict[str, Any]:
        return {"encoder": self._encoder_used} if self._encoder_used is not None else {}

    def _widths(self, channels: Sequence[int]) -> tuple[list[int], list[int], int]:
        keep = self.keep or [min(c, PAPER_KEEP[layer]) for c, layer in zip(channels, self.layers)]
        model = self.model_channels or [default_model_channels(k) for k in keep]
        total = sum(keep)
        topk = self.rrs_topk or min(total, PAPER_RRS_TOPK if total >= RRS_SMALL_TOTAL else SMALL_RRS_TOPK)
        return keep, model, topk

    def _build(self) -> RealNetNet:
        if self.net is None:
            with seeded(self.seed):  # the initial weights come from the seed alone
                teacher = build_teacher(self.encoder, self.encoder_weights, layers=self.layers)
                self._encoder_used = teacher.name
                self.net = RealNetNet(teacher, *self._widths(teacher.channels))
            self.net.to(self._device())
            log.info("realnet-texture: encoder %s (taps %s, channels %s), keeps %s, U-Nets %s, RRS top-%d: %.2f M "
                     "trainable parameters", teacher.name, list(self.layers), list(teacher.channels), self.net.keep,
                     [u.model_channels for u in self.net.unets], self.net.rrs.topk,
                     count_parameters(self.net) / 1e6)
        return self.net

    def _check_size(self, shape: Sequence[int]) -> None:
        multiple = 4 * max(STRIDES[layer] for layer in self.layers)
        if shape[0] % multiple or shape[1] % multiple:
            raise ThreecadError(f"realnet-texture with taps {', '.join(self.layers)} needs image sides divisible by "
                                f"{multiple} (each U-Net halves its grid twice), got {shape[1]}x{shape[0]}; use "
                                "--resize squash --size 256 (or a multiple of it)")

    # ------------------------------------------------------------------ engine hooks
    def trainable_module(self) -> RealNetNet:
        return self._build()

    def configure_optimizers(self, module: RealNetNet):
        params = [p for p in module.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), weight_decay=0.0), None

    def training_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        return realnet_losses(module(batch["augmented"], batch["image"]), batch["mask"])

    def validation_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        return self.training_step(module, batch)

    def checkpoint_state(self, module: RealNetNet) -> dict[str, torch.Tensor]:
        return module.trainable_state_dict()

    def load_checkpoint_state(self, module: RealNetNet, state: dict[str, torch.Tensor]) -> None:
        module.load_trainable_state_dict(state)

    # ------------------------------------------------------------------ AFS
    @torch.no_grad()
    def select_features(self, data: torch.utils.data.Dataset) -> list[torch.Tensor]:
        """Set the AFS indices from ``afs_batches`` batches of ``data`` (synthetic anomalies only),
        drawn in a seeded order with replacement across passes; returns the per-tap errors."""
        net = self._build()
        device = self._device()
        rng = np.random.default_rng([self.seed, 7])
        totals: list[torch.Tensor] | None = None
        for _ in progress(range(self.afs_batches), desc="realnet-texture AFS"):
            batch = collate([data[int(i)] for i in rng.integers(len(data), size=min(self.batch_size, len(data)))])
            synthetic = net.teacher(batch["augmented"].to(device))
            clean = net.teacher(batch["image"].to(device))
            errors = [afs_errors(s, c, batch["mask"].to(device)) for s, c in zip(synthetic, clean)]
            totals = errors if totals is None else [t + e for t, e in zip(totals, errors)]
        for i, (total, k) in enumerate(zip(totals, net.keep)):
            getattr(net, f"afs_{i}").copy_(afs_indices(total, k))
        return totals

    # ------------------------------------------------------------------ fit
    def fit(self, train_set: torch.utils.data.Dataset,
            val_set: torch.utils.data.Dataset | None = None) -> RealNetTexture:
        if len(train_set) == 0:
            raise ThreecadError("realnet-texture.fit got no training images")
        shape = tuple(int(v) for v in train_set[0]["image"].shape[-2:])
        self._check_size(shape)
        net = self._build()
        base = train_subset(train_set, self.train_images, self.seed)
        bank = TextureBank(self.textures, images=base)
        afs_data = SyntheticAnomalyDataset(base, bank, seed=self.seed + 1, params=REALNET_SYNTHESIS,
                                           clean_probability=0.0)
        self.select_features(afs_data)
        data = SyntheticAnomalyDataset(base, bank, seed=self.seed, params=REALNET_SYNTHESIS)
        validation = None
        if val_set is not None and len(val_set):
            validation = SyntheticAnomalyDataset(val_set, bank, seed=self.seed + 2, params=REALNET_SYNTHESIS)
        settings = TrainSettings(epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, amp=self.amp,
                                 num_workers=self.workers)
        fingerprint = {"method": self.name, "encoder": self._encoder_used, "layers": list(self.layers),
                       "keep": net.keep, "model_channels": [u.model_channels for u in net.unets],
                       "rrs_topk": net.rrs.topk, "afs_batches": self.afs_batches, "lr": self.lr,
                       "textures": self.textures, "input_shape": list(shape), "train_images": len(base)}
        log.info("realnet-texture: %d training images at %dx%d, %d epochs, textures: %s", len(base), shape[1],
                 shape[0], self.epochs, bank.source)
        self.history_ = engine_fit(self, data, settings, self._device(), work_dir=self.work_dir, resume=self.resume,
                                   val_data=validation, collate=collate, desc="realnet-texture",
                                   fingerprint=fingerprint)
        net.eval()
        return self

    # ------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.net is None:
            raise ThreecadError("realnet-texture is not fitted: call fit() or load a saved run")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ThreecadError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        self._check_size(tuple(images.shape[-2:]))
        return self.run_inference(images.to(self._device()))

    def inference_module(self) -> NetInference:
        """The encoder, AFS, U-Nets, RRS and the map (:meth:`_infer`) as one module."""
        return self.net_inference()

    def _infer(self, net: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map = the anomaly class's softmax at the input size; score = max of its ``pool_size`` average pool."""
        maps = torch.softmax(net(images)["logits"].float(), dim=1)[:, 1]
        return pooled_max(maps, self.pool_size), maps

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.net is None:
            raise ThreecadError("realnet-texture is not fitted: nothing to save")
        return {k: v.detach().cpu() for k, v in self.net.trainable_state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        net = self._build()
        if self._encoder_used != canonical_name(self.encoder):
            raise ThreecadError(f"this run was trained with the encoder {self.encoder}, which cannot be built here "
                                f"(got {self._encoder_used}): place its weight file (docs/backbones.md)")
        net.load_trainable_state_dict(state)
        net.eval()
