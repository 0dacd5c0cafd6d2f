"""UniAD (You et al., "A Unified Model for Multi-class Anomaly Detection", NeurIPS 2022).

A frozen EfficientNet-B4 is tapped at strides 2, 4, 8 and 16; each map is resized bilinearly
(``align_corners=True``, as the official neck) to the stride-16 grid and the four are concatenated
(24 + 32 + 56 + 160 = 272 channels, 14x14 at 224 px). A transformer reconstructs these tokens and the
anomaly map is the channel-wise L2 norm of the reconstruction error. Three devices keep it from
learning the identity:

* **feature jittering**: while training, every token gets Gaussian noise proportional to its norm
  before the input projection (the target stays the clean feature);
* **neighbour-masked attention**: in every attention (encoder self-attention, both decoder
  attentions) a query may not look at the ``n x n`` window of keys around its own position
  (itself included), so a token must be predicted from farther context;
* **layer-wise learned queries**: each decoder layer owns a learned query per position; its first
  attention is *cross*-attention from those queries to the encoder output (the official code calls
  it ``self_attn``), its second attends to the previous decoder layer's output (the encoder output
  for the first layer).

Official configuration, kept (``docs/method-uniad-crad-realnet.md``): 224 px, hidden width 256,
8 heads, 4 post-norm encoder and 4 decoder layers with a final LayerNorm, FFN 1024 (ReLU, dropout
0.1), learned row/column position embeddings (uniform init, added to queries and keys only),
xavier-uniform ``Linear`` weights, a 7x7 mask in all three attentions, jitter scale 20 with
probability 1, MSE loss, AdamW (lr 1e-4, weight decay 1e-4), StepLR (gamma 0.1), gradient-norm clip
0.1, batch 8, seed 133; map = L2 of the error upsampled bilinearly (``align_corners=True``); image
score = the maximum of the 16x16 average-pooled map. 7,717,392 trainable parameters (the
reconstruction transformer; the frozen backbone is not counted).

Departures: a fixed schedule (default 100 epochs, the LR step at 80% of it; the official 1000
epochs keep the checkpoint with the best *test* pixel AUROC); torchvision's B4 file (the official
code loads the lukemelas TF port) and the offline EfficientNet-Lite0 when it is absent (taps
16 + 24 + 40 + 112 = 192 channels at the same strides); the jitter scaled by the channel count so
its ratio to the features' RMS is the official one at any width; no AUROC flipping; no CUDA calls;
the mask built once per network, not per forward; the backbone features cached once.

One model for all categories (the paper's "unified" setting) is the runner's job: with
``unified=True`` (default) ``3cad train --category all`` fits one model on the union of the
categories' ``train/good`` images and writes it into every category's run folder
(:func:`threecad.methods.runner.train`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines.aggregation import resize_concat
from threecad.errors import ThreecadError
from threecad.maps.postprocess import pooled_max, upsample_maps
from threecad.methods import Option, register
from threecad.methods.blocks import FrozenPartNet, Teacher, build_teacher, count_parameters
from threecad.methods.feature_cache import (
    DEFAULT_MEMORY_GB,
    FROZEN_ENCODER_OPTIONS,
    FrozenEncoderMethod,
    batch_features,
)
from threecad.methods.method import NetInference
from threecad.methods.training import TrainSettings, seeded

log = logging.getLogger(__name__)

#: The official backbone and its taps (lukemelas blocks 1/5/9/21 = torchvision ``features`` 1/2/3/5;
#: on Lite0 ``blocks`` 0/2/4/10).
PAPER_ENCODER = "efficientnet_b4"
LAYERS = ("stride2", "stride4", "stride8", "stride16")
#: The official token width (B4's 24 + 32 + 56 + 160): the jitter scale is given at this width.
PAPER_WIDTH = 272
#: Trainable parameters of the official configuration (B4 at 224 px: 14x14 tokens of 272 channels).
PAPER_PARAMETERS = 7_717_392


# --------------------------------------------------------------------------------------------- pieces
def neighbour_mask(height: int, width: int, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(HW, HW)`` bool, True where query ``(i, j)`` may **not** attend key ``(k, l)``:
    ``|i - k| <= size // 2`` and ``|j - l| <= size // 2`` (its own ``size x size`` window, clipped at
    the borders). ``size`` must be odd: the official code silently widens an even size by one."""
    if size < 1 or size % 2 == 0:
        raise ThreecadError(f"uniad's neighbour mask needs an odd size >= 1 (the window is centred on the "
                            f"query), got {size}")
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    half = size // 2
    return ((rows[:, None] - rows[None, :]).abs() <= half) & ((cols[:, None] - cols[None, :]).abs() <= half)


class NeckEncoder(nn.Module):
    """The frozen part: the backbone taps and the parameter-free neck, ``images -> [(B, C, h, w)]``
    (one level, so the feature cache stores the 272-channel grid, not four pyramids)."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.teacher = teacher
        self.name = teacher.name
        self.channels = teacher.channels

    def train(self, mode: bool = True) -> NeckEncoder:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [resize_concat(self.teacher(images), grid=-1, align_corners=True)]  # MFCN to the stride-16 grid


def jitter(tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """``tokens`` (..., C) plus ``N(0, 1) * scale * ||token|| / sqrt(C * 272)``: the official
    ``N(0, 1) * scale * ||token|| / C`` at the official width 272, and at any width the same noise
    std relative to the tokens' RMS (``scale / sqrt(272)``, 1.21 for scale 20)."""
    c = tokens.shape[-1]
    norm = tokens.norm(dim=-1, keepdim=True)
    return tokens + torch.randn_like(tokens) * norm * (scale / math.sqrt(c * PAPER_WIDTH))


class EncoderLayer(nn.Module):
    """Post-norm: masked self-attention (queries and keys + position) -> add & LN -> FFN -> add & LN."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = x + pos
        x = self.norm1(x + self.drop1(self.attn(q, q, x, attn_mask=mask, need_weights=False)[0]))
        return self.norm2(x + self.drop2(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Post-norm, with its own learned query per position: cross-attention from the query to the
    encoder output, attention to the previous layer's output, FFN; add & LN after each."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float, tokens: int):
        super().__init__()
        self.query = nn.Embedding(tokens, dim)  # N(0, 1), PyTorch's default
        self.cross = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, previous: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        q = self.query.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        q = self.norm1(q + self.drop1(self.cross(q + pos, memory + pos, memory, attn_mask=mask,
                                                 need_weights=False)[0]))
        q = self.norm2(q + self.drop2(self.attn(q + pos, previous + pos, previous, attn_mask=mask,
                                                need_weights=False)[0]))
        return self.norm3(q + self.drop3(self.ffn(q)))


class UniADNet(FrozenPartNet):
    """Frozen encoder + neck (:class:`NeckEncoder`) and the reconstruction transformer.

    The token grid follows from ``input_shape`` (kept as a buffer so that saved weights rebuild the
    same network): the position embeddings and queries fix the network to one input size.
    ``forward(batch)`` takes ``{"image"}`` or cached ``{"features"}`` and returns ``{"rec", "align"}``
    (both ``(B, C, h, w)``); in training mode the tokens are jittered first.
    """

    frozen = "encoder"

    def __init__(self, encoder: NeckEncoder, input_shape: Sequence[int], hidden_dim: int = 256, ffn_dim: int = 1024,
                 num_heads: int = 8, enc_layers: int = 4, dec_layers: int = 4, dropout: float = 0.1,
                 neighbor_size: int | None = 7, jitter_scale: float = 20.0, jitter_prob: float = 1.0):
        super().__init__()
        self.encoder = encoder
        device = encoder.teacher.extractor.device
        probe = encoder(torch.zeros(1, 3, *input_shape, device=device))[0]
        self.channels, self.grid = int(probe.shape[1]), (int(probe.shape[2]), int(probe.shape[3]))
        h, w = self.grid
        self.jitter_scale, self.jitter_prob = float(jitter_scale), float(jitter_prob)
        self.input_proj = nn.Linear(self.channels, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, self.channels)
        self.row_embed, self.col_embed = nn.Embedding(h, hidden_dim // 2), nn.Embedding(w, hidden_dim // 2)
        self.encoder_layers = nn.ModuleList(EncoderLayer(hidden_dim, num_heads, ffn_dim, dropout)
                                            for _ in range(enc_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(hidden_dim, num_heads, ffn_dim, dropout, h * w)
                                            for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)
        mask = None
        if neighbor_size is not None:
            mask = neighbour_mask(h, w, neighbor_size, device=device)
            if bool(mask.all(1).any()):
                raise ThreecadError(f"uniad: a {neighbor_size}x{neighbor_size} neighbour mask hides every token of "
                                    f"the {w}x{h} token grid from some query; use a larger --size (the grid is "
                                    f"size/16) or a smaller neighbor_size")
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("input_shape", torch.tensor([int(v) for v in input_shape]))

    def position(self) -> torch.Tensor:
        """``(1, h*w, hidden)``: column embedding then row embedding of each position, row-major."""
        h, w = self.grid
        cols = self.col_embed.weight.unsqueeze(0).expand(h, -1, -1)
        rows = self.row_embed.weight.unsqueeze(1).expand(-1, w, -1)
        return torch.cat([cols, rows], dim=-1).reshape(1, h * w, -1)

    def reconstruct(self, align: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` features -> their reconstruction (jittered first in training mode)."""
        b, c, h, w = align.shape
        tokens = align.flatten(2).transpose(1, 2)  # (B, hw, C)
        if self.training and self.jitter_scale > 0 and (self.jitter_prob >= 1 or
                                                         float(torch.rand(())) < self.jitter_prob):
            tokens = jitter(tokens, self.jitter_scale)
        x = self.input_proj(tokens)
        pos = self.position()
        for layer in self.encoder_layers:
            x = layer(x, pos, self.mask)
        memory, out = x, x
        for layer in self.decoder_layers:
            out = layer(out, memory, pos, self.mask)
        out = self.output_proj(self.decoder_norm(out))
        return out.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        align = batch_features(batch, self.encoder)[0].float()
        return {"rec": self.reconstruct(align), "align": align}


# --------------------------------------------------------------------------------------------- map
def uniad_map(rec: torch.Tensor, align: torch.Tensor, size: tuple[int, int], sigma: float = 0.0) -> torch.Tensor:
    """``(B, H, W)``: the L2 norm over channels of ``rec - align``, upsampled bilinearly
    (``align_corners=True``) to ``size``, then Gaussian-smoothed when ``sigma`` > 0."""
    error = (rec.float() - align.float()).pow(2).sum(1).sqrt()
    return upsample_maps(error, size, sigma=sigma, align_corners=True)


# --------------------------------------------------------------------------------------------- method
@register
class UniAD(FrozenEncoderMethod):
    """UniAD: a neighbour-masked transformer reconstructing frozen multi-scale features.

    Parameters
    ----------
    epochs, batch_size, lr, weight_decay, lr_step, clip_grad:
        AdamW (lr 1e-4, weight decay 1e-4, official), batch 8, StepLR (gamma 0.1) every ``lr_step``
        epochs (``None``: at 80% of ``epochs``, the official 800 of 1000), gradient-norm clip 0.1
        (``None``: none). The official run trains 1000 epochs and keeps the best *test* epoch; here
        a fixed 100 epochs (ADer's shorter benchmark schedule), the last kept.
    hidden_dim, ffn_dim, num_heads, enc_layers, dec_layers, dropout:
        The transformer (256, 1024, 8, 4, 4, 0.1 official).
    neighbor_size:
        Side of the masked window around each query (odd; 7 official; ``None``: no mask).
    jitter_scale, jitter_prob:
        Feature jittering while training: noise std ``jitter_scale / sqrt(272)`` times the token's RMS
        (the official ``N(0,1) * 20 * ||f|| / C`` at the official 272 channels, recalibrated for
        another width), applied to a batch with probability ``jitter_prob`` (1 official).
    pool_size:
        Image score = maximum of the ``pool_size`` average-pooled map (16 official).
    unified:
        One model for every category given to the runner, fitted on the union of their training
        images (the paper's setting); ``False``: one model per category.
    encoder, encoder_weights:
        The frozen backbone tapped at strides 2/4/8/16: EfficientNet-B4 with torchvision's ImageNet
        file from the hub cache; without it the offline EfficientNet-Lite0 (with a warning), the
        saved configuration recording the encoder used. ``"random"``: timing and tests only.
    sigma:
        Gaussian smoothing of the map (0: none, official).
    seed, device, workers, resume, feature_cache, cache_gb:
        As every frozen-encoder method (``docs/training.md``); seed 133 official.
    """

    name = "uniad"
    OPTIONS = {
        "epochs": Option(int, low=1),
        "batch_size": Option(int, low=1),
        "lr": Option(float, low=0, open_low=True),
        "weight_decay": Option(float, low=0),
        "lr_step": Option(int, low=1, null=True),
        "clip_grad": Option(float, low=0, open_low=True, null=True),
        "hidden_dim": Option(int, low=2, high=4096, multiple=2),
        "ffn_dim": Option(int, low=1, high=16384),
        "num_heads": Option(int, low=1, high=64),
        "enc_layers": Option(int, low=1, high=32),
        "dec_layers": Option(int, low=1, high=32),
        "dropout": Option(float, low=0, high=0.9),
        "neighbor_size": Option(int, low=1, high=63, null=True),
        "jitter_scale": Option(float, low=0, high=1000),
        "jitter_prob": Option(float, low=0, high=1),
        "pool_size": Option(int, low=1, high=512, predict=True),
        "unified": Option(bool),
        **FROZEN_ENCODER_OPTIONS,
    }
    DEFAULT_INPUTS = {"size": 224}

    def __init__(
        self,
        epochs: int = 100,
        batch_size: int = 8,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        lr_step: int | None = None,
        clip_grad: float | None = 0.1,
        hidden_dim: int = 256,
        ffn_dim: int = 1024,
        num_heads: int = 8,
        enc_layers: int = 4,
        dec_layers: int = 4,
        dropout: float = 0.1,
        neighbor_size: int | None = 7,
        jitter_scale: float = 20.0,
        jitter_prob: float = 1.0,
        pool_size: int = 16,
        unified: bool = True,
        encoder: str = PAPER_ENCODER,
        encoder_weights: str | None = "default",
        sigma: float = 0.0,
        seed: int = 133,
        device: str = "auto",
        workers: int = 0,
        resume: bool = False,
        feature_cache: bool = True,
        cache_gb: float = DEFAULT_MEMORY_GB,
    ):
        if hidden_dim % num_heads:
            raise ThreecadError(f"uniad: hidden_dim {hidden_dim} must be a multiple of num_heads {num_heads}")
        if neighbor_size is not None and neighbor_size % 2 == 0:
            raise ThreecadError(f"uniad: neighbor_size must be odd (a window centred on the query), got "
                                f"{neighbor_size}; the official code widens an even size to {neighbor_size + 1}")
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.lr_step = lr_step
        self.clip_grad = clip_grad
        self.hidden_dim = int(hidden_dim)
        self.ffn_dim = int(ffn_dim)
        self.num_heads = int(num_heads)
        self.enc_layers = int(enc_layers)
        self.dec_layers = int(dec_layers)
        self.dropout = float(dropout)
        self.neighbor_size = neighbor_size
        self.jitter_scale = float(jitter_scale)
        self.jitter_prob = float(jitter_prob)
        self.pool_size = int(pool_size)
        self.unified = bool(unified)
        self.encoder = str(encoder)
        self.encoder_weights = encoder_weights
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.device = str(device)
        self.workers = int(workers)
        self.resume = bool(resume)
        self.feature_cache = bool(feature_cache)
        self.cache_gb = float(cache_gb)
        self.net: UniADNet | None = None
        self.history_: list[dict] = []
        self._encoder_used: str | None = None

    # ------------------------------------------------------------------ network
    def _build(self, input_shape: Sequence[int]) -> UniADNet:
        shape = [int(v) for v in input_shape]
        if self.net is not None and self.net.input_shape.tolist() == shape:
            return self.net
        device = self._device()
        with seeded(self.seed):  # the initial weights come from the seed alone
            teacher = build_teacher(self.encoder, self.encoder_weights, layers=LAYERS)
            teacher.to(device)
            self._encoder_used = teacher.name
            self.net = UniADNet(NeckEncoder(teacher), shape, self.hidden_dim, self.ffn_dim, self.num_heads,
                                self.enc_layers, self.dec_layers, self.dropout, self.neighbor_size,
                                self.jitter_scale, self.jitter_prob).to(device)
        log.info("uniad: encoder %s (taps %s -> %d channels on a %dx%d grid), %.2f M trainable parameters",
                 teacher.name, teacher.channels, self.net.channels, self.net.grid[1], self.net.grid[0],
                 count_parameters(self.net) / 1e6)
        return self.net

    def _lr_step(self) -> int:
        return self.lr_step if self.lr_step is not None else max(1, int(round(0.8 * self.epochs)))

    # ------------------------------------------------------------------ engine hooks
    def trainable_module(self) -> UniADNet:
        if self.net is None:
            raise ThreecadError("uniad: the network is built by fit(), which knows the input size")
        return self.net

    def configure_optimizers(self, module: UniADNet):
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=(0.9, 0.999), weight_decay=self.weight_decay)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=self._lr_step(), gamma=0.1)

    def training_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        out = module(batch)
        return {"loss": F.mse_loss(out["rec"], out["align"])}

    # ------------------------------------------------------------------ fit / predict
    def fit(self, train_set: torch.utils.data.Dataset, val_set: torch.utils.data.Dataset | None = None) -> UniAD:
        if len(train_set) == 0:
            raise ThreecadError("uniad.fit got no training images")
        shape = tuple(int(v) for v in train_set[0]["image"].shape[-2:])
        self._build(shape)
        settings = TrainSettings(epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, amp=False,
                                 clip_grad_norm=self.clip_grad, num_workers=self.workers)
        fingerprint = {"method": self.name, "encoder": self._encoder_used, "lr": self.lr,
                       "weight_decay": self.weight_decay, "lr_step": self._lr_step(), "hidden_dim": self.hidden_dim,
                       "ffn_dim": self.ffn_dim, "num_heads": self.num_heads, "enc_layers": self.enc_layers,
                       "dec_layers": self.dec_layers, "dropout": self.dropout, "neighbor_size": self.neighbor_size,
                       "jitter_scale": self.jitter_scale, "jitter_prob": self.jitter_prob,
                       "input_shape": list(shape), "train_images": len(train_set)}
        log.info("uniad: %d training images at %dx%d, %d epochs", len(train_set), shape[1], shape[0], self.epochs)
        self._fit_on_features(train_set, val_set, settings, fingerprint)
        return self

    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        images = self._model_input(images)
        size = tuple(int(v) for v in images.shape[-2:])
        trained = tuple(self.net.input_shape.tolist())
        if size != trained:
            raise ThreecadError(f"uniad was trained at {trained[1]}x{trained[0]} (its position embeddings and "
                                f"queries fix the size), got {size[1]}x{size[0]}: predict with the run's --size "
                                "and --resize squash")
        return self.run_inference(images)

    def inference_module(self) -> NetInference:
        """The encoder, the neck, the transformer and the map (:meth:`_infer`) as one module."""
        return self.net_inference()

    def _infer(self, net: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps: the reconstruction error's L2 map (smoothed when ``sigma`` > 0); the
        score the maximum of its ``pool_size`` average-pooled version."""
        out = net({"image": images})
        maps = uniad_map(out["rec"], out["align"], tuple(images.shape[-2:]), self.sigma)
        return pooled_max(maps, self.pool_size), maps

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "input_shape" not in state:
            raise ThreecadError("these weights are not a uniad run's (no input_shape)")
        self._build(state["input_shape"].tolist())
        self._load_trained(state)
