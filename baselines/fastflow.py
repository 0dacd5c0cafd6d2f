"""FastFlow (Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing
Flows", arXiv 2111.07677, 2021), in the configuration anomalib runs it (the 3CAD paper's baseline).

A frozen pretrained encoder is tapped at strides 4, 8 and 16; each level goes through a trainable
LayerNorm over its whole ``(C, H, W)`` tensor and a 2-D normalising flow of coupling blocks whose
subnets are convolutions (kernels alternating 3x3 and 1x1), trained by maximum likelihood to map
normal features onto a standard normal. A feature far from what the flow learned gets a large
``z``; the map is ``-exp(-0.5 mean_c z^2)`` per level, upsampled and averaged over the levels.

The coupling block is FrEIA 0.2's ``AllInOneBlock`` (the PyPI package, pinned: later versions
changed the clamping and the permutation): affine coupling of the second channel half conditioned
on the first, the whole subnet output scaled by 0.1, ``s = clamp * tanh(.)`` with clamp 2, a
per-channel global affine (softplus scale starting at 1) and a fixed random hard permutation.

Official configuration, kept: ResNet-18 layer1-3 at 256 px (3,510,528 trainable parameters: flows
2,593,024 + LayerNorms 917,504), 8 flow steps, hidden ratio 1.0, alternating kernels (anomalib v1
and later), the loss ``sum over levels of mean over the batch of 0.5 sum z^2 - log|det J|``, Adam
lr 1e-3 weight decay 1e-5, batch 32, no augmentation, image score = map maximum, no smoothing.
Departures (``docs/method-fastflow-simplenet.md``): a fixed epoch count instead of early stopping
on the test set; torchvision ResNet-18 weights (anomalib loads timm's); EfficientNet-Lite0 when the
ResNet-18 file is absent; the frozen features cached once (:mod:`threecad.methods.feature_cache`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn

from threecad.errors import ThreecadError
from threecad.maps.postprocess import gaussian_blur, upsample_maps
from threecad.methods import Option, register
from threecad.methods.blocks import TEACHER_LAYERS, FrozenPartNet, Teacher, build_teacher, count_parameters
from threecad.methods.feature_cache import (
    DEFAULT_MEMORY_GB,
    FROZEN_ENCODER_OPTIONS,
    FrozenEncoderMethod,
    batch_features,
)
from threecad.methods.method import NetInference
from threecad.methods.training import TrainSettings, seeded

log = logging.getLogger(__name__)

#: anomalib's FastFlow backbone for the paper's runs.
PAPER_ENCODER = "resnet18"


# --------------------------------------------------------------------------------------------- network
class Subnet(nn.Sequential):
    """A coupling block's subnet: ``k x k`` conv (bias, "same" zero padding) to ``int(c_in * ratio)``
    channels, ReLU, ``k x k`` conv to ``c_out``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, hidden_ratio: float):
        hidden = int(c_in * hidden_ratio)
        super().__init__(nn.Conv2d(c_in, hidden, kernel, padding="same"), nn.ReLU(),
                         nn.Conv2d(hidden, c_out, kernel, padding="same"))


def build_flow(shape: Sequence[int], steps: int = 8, hidden_ratio: float = 1.0, conv3x3_only: bool = False,
               clamp: float = 2.0) -> SequenceINN:
    """One level's flow over ``(C, H, W)`` features: ``steps`` FrEIA-0.2 ``AllInOneBlock``s with hard
    permutations, subnet kernels 3 on even steps and 1 on odd ones (3 everywhere with ``conv3x3_only``)."""
    flow = SequenceINN(*shape)
    for step in range(steps):
        kernel = 3 if step % 2 == 0 or conv3x3_only else 1
        flow.append(AllInOneBlock, subnet_constructor=lambda c_in, c_out, k=kernel: Subnet(c_in, c_out, k, hidden_ratio),
                    affine_clamping=clamp, permute_soft=False)
    return flow


class FastFlowNet(FrozenPartNet):
    """Frozen encoder, one trainable ``(C, H, W)`` LayerNorm and one flow per tap.

    The feature shapes follow from ``input_shape`` (the LayerNorms fix the network to one input
    size), kept as a buffer so that saved weights rebuild the same network; the saved state is the
    LayerNorms, the flows (with their fixed permutations) and that shape. ``forward(batch)``
    takes ``{"image"}`` or cached ``{"features"}`` and returns ``z`` and ``logdet`` per level.
    """

    frozen = "encoder"

    def __init__(self, encoder: Teacher, input_shape: Sequence[int], steps: int = 8, hidden_ratio: float = 1.0,
                 conv3x3_only: bool = False, clamp: float = 2.0):
        super().__init__()
        self.encoder = encoder
        probe = torch.zeros(1, 3, *input_shape, device=encoder.extractor.device)
        self.shapes = [tuple(f.shape[1:]) for f in encoder(probe)]
        self.norms = nn.ModuleList(nn.LayerNorm(list(shape), elementwise_affine=True) for shape in self.shapes)
        self.flows = nn.ModuleList(build_flow(shape, steps, hidden_ratio, conv3x3_only, clamp) for shape in self.shapes)
        self.register_buffer("input_shape", torch.tensor([int(v) for v in input_shape]))

    def forward(self, batch: dict) -> dict[str, list[torch.Tensor]]:
        feats = batch_features(batch, self.encoder)
        zs, logdets = [], []
        for norm, flow, f in zip(self.norms, self.flows, feats):
            z, logdet = flow(norm(f.float()))
            zs.append(z)
            logdets.append(logdet)
        return {"z": zs, "logdet": logdets}

    def reverse(self, zs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The normalised features whose flows give ``zs`` (the flows' inverses)."""
        return [flow(z, rev=True)[0] for flow, z in zip(self.flows, zs)]


# --------------------------------------------------------------------------------------------- loss and map
def fastflow_loss(zs: Sequence[torch.Tensor], logdets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Negative log-likelihood without its constant: per level, the batch mean of
    ``0.5 * sum_{c,h,w} z^2 - log|det J|``, summed over the levels (float32)."""
    total = zs[0].new_zeros((), dtype=torch.float32)
    for z, logdet in zip(zs, logdets):
        total = total + (0.5 * z.float().pow(2).flatten(1).sum(1) - logdet.float()).mean()
    return total


def fastflow_map(zs: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)``: the mean over levels of ``-exp(-0.5 * mean_c z^2)``, each level upsampled
    bilinearly (``align_corners=False``) to ``size``; values in [-1, 0), higher = more anomalous."""
    levels = [upsample_maps(-torch.exp(-0.5 * z.float().pow(2).mean(1)), size, sigma=0.0) for z in zs]
    return torch.stack(levels).mean(0)


# --------------------------------------------------------------------------------------------- method
@register
class FastFlow(FrozenEncoderMethod):
    """FastFlow: per-level 2-D normalising flows on a frozen encoder.

    Parameters
    ----------
    epochs, batch_size, lr, weight_decay:
        Adam with lr 1e-3 and weight decay 1e-5, batch 32 (official). The official runs stop early on
        the *test* set's pixel AUROC (anomalib, patience 3, at most 500 epochs); here a fixed number
        of epochs, the last kept: 20 by default (choose it on held-out normals, e.g. the logged
        validation loss, never on test).
    flow_steps, hidden_ratio, conv3x3_only, clamp:
        Coupling blocks per level (8), subnet width / input width (1.0), 3x3 kernels in every
        block instead of alternating 3x3 / 1x1 (default True, chosen on magnetic-tile validation
        data, ``docs/results/magnetic-tile.md``, as anomalib v0 ran ResNet-18; False: anomalib v1
        and later), the coupling clamp (2.0).
    encoder, encoder_weights:
        The frozen encoder tapped at strides 4/8/16: ResNet-18 with its ImageNet file (the hub
        cache). Without the file it falls back, with a warning, to the offline EfficientNet-Lite0;
        the saved configuration records the encoder used. ``"random"`` weights: tests only.
    sigma:
        Gaussian smoothing of the map (default 4, chosen on validation data; 0: none, as anomalib).
    seed, device, workers, resume:
        Seed of the initial weights, the flows' permutations and the data order; device; DataLoader
        workers; continue an interrupted fit from its checkpoint in the run's work folder.
    feature_cache, cache_gb:
        Compute each training image's encoder features once (:mod:`threecad.methods.feature_cache`),
        at most ``cache_gb`` GiB in memory, then a memory-mapped temporary file.
    """

    name = "fastflow"
    OPTIONS = {
        "epochs": Option(int, low=1),
        "batch_size": Option(int, low=1),
        "lr": Option(float, low=0, open_low=True),
        "weight_decay": Option(float, low=0),
        "flow_steps": Option(int, low=1, high=64),
        "hidden_ratio": Option(float, low=0, open_low=True, high=16),
        "conv3x3_only": Option(bool),
        "clamp": Option(float, low=0, open_low=True, high=10),
        **FROZEN_ENCODER_OPTIONS,
    }
    #: ``3cad tune``: which kernel pattern the 3CAD paper ran is not known (anomalib v0: 3x3 only for
    #: ResNet-18; v1 and later: alternating); smoothing for the 3CAD legacy protocol.
    TUNE_GRID = {"conv3x3_only": (True, False), "sigma": (4.0, 0.0)}

    def __init__(
        self,
        epochs: int = 20,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        flow_steps: int = 8,
        hidden_ratio: float = 1.0,
        conv3x3_only: bool = True,
        clamp: float = 2.0,
        encoder: str = PAPER_ENCODER,
        encoder_weights: str | None = "default",
        sigma: float = 4.0,
        seed: int = 42,
        device: str = "auto",
        workers: int = 0,
        resume: bool = False,
        feature_cache: bool = True,
        cache_gb: float = DEFAULT_MEMORY_GB,
    ):
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.flow_steps = int(flow_steps)
        self.hidden_ratio = float(hidden_ratio)
        self.conv3x3_only = bool(conv3x3_only)
        self.clamp = float(clamp)
        self.encoder = str(encoder)
        self.encoder_weights = encoder_weights
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.device = str(device)
        self.workers = int(workers)
        self.resume = bool(resume)
        self.feature_cache = bool(feature_cache)
        self.cache_gb = float(cache_gb)
        self.net: FastFlowNet | None = None
        self.history_: list[dict] = []
        self._encoder_used: str | None = None

    # ------------------------------------------------------------------ network
    def _build(self, input_shape: Sequence[int]) -> FastFlowNet:
        shape = [int(v) for v in input_shape]
        if self.net is not None and self.net.input_shape.tolist() == shape:
            return self.net
        device = self._device()
        with seeded(self.seed):
            teacher = build_teacher(self.encoder, self.encoder_weights, layers=TEACHER_LAYERS)
            teacher.to(device)
            self._encoder_used = teacher.name
            self.net = FastFlowNet(teacher, shape, self.flow_steps, self.hidden_ratio, self.conv3x3_only,
                                   self.clamp).to(device)
        log.info("fastflow: encoder %s (taps %s), %.2f M trainable parameters", teacher.name, teacher.channels,
                 count_parameters(self.net) / 1e6)
        return self.net

    # ------------------------------------------------------------------ engine hooks
    def trainable_module(self) -> FastFlowNet:
        if self.net is None:
            raise ThreecadError("fastflow: the network is built by fit(), which knows the input size")
        return self.net

    def configure_optimizers(self, module: FastFlowNet):
        params = [p for p in module.parameters() if p.requires_grad]  # not the encoder nor the permutations
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay), None

    def training_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        out = module(batch)
        return {"loss": fastflow_loss(out["z"], out["logdet"])}

    # ------------------------------------------------------------------ fit / predict
    def fit(self, train_set: torch.utils.data.Dataset, val_set: torch.utils.data.Dataset | None = None) -> FastFlow:
        if len(train_set) == 0:
            raise ThreecadError("fastflow.fit got no training images")
        shape = tuple(int(v) for v in train_set[0]["image"].shape[-2:])
        self._build(shape)
        settings = TrainSettings(epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, amp=False,
                                 num_workers=self.workers)
        fingerprint = {"method": self.name, "encoder": self._encoder_used, "lr": self.lr,
                       "weight_decay": self.weight_decay, "flow_steps": self.flow_steps,
                       "hidden_ratio": self.hidden_ratio, "conv3x3_only": self.conv3x3_only, "clamp": self.clamp,
                       "input_shape": list(shape)}
        log.info("fastflow: %d training images at %dx%d, %d epochs", len(train_set), shape[1], shape[0], self.epochs)
        self._fit_on_features(train_set, val_set, settings, fingerprint)
        return self

    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        images = self._model_input(images)
        size = tuple(int(v) for v in images.shape[-2:])
        trained = tuple(self.net.input_shape.tolist())
        if size != trained:
            raise ThreecadError(f"fastflow was trained at {trained[1]}x{trained[0]} (its LayerNorms fix the size), "
                                f"got {size[1]}x{size[0]}: predict with the run's --size and --resize squash")
        return self.run_inference(images)

    def inference_module(self) -> NetInference:
        """The encoder, the flows and the map (:meth:`_infer`) as one module."""
        return self.net_inference()

    def _infer(self, net: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps: the flows' likelihood map, smoothed; the score its maximum."""
        maps = gaussian_blur(fastflow_map(net({"image": images})["z"], tuple(images.shape[-2:])), self.sigma)
        return maps.flatten(1).amax(1), maps

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "input_shape" not in state:
            raise ThreecadError("these weights are not a fastflow run's (no input_shape)")
        self._build(state["input_shape"].tolist())
        self._load_trained(state)
