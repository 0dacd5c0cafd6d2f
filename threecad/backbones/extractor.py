"""Frozen multi-scale feature extraction from a pretrained backbone.

Callers pass RGB images in [0, 1] (``AnomalyDataset`` items); the extractor applies the backbone's
own normalisation (ImageNet mean/std, or ``(x - 127) / 128`` for EfficientNet-Lite), runs the network
only as far as the deepest requested layer, and returns the tapped feature maps by name.

Layer names (see ``docs/backbones.md``):

* every backbone: ``stride4``, ``stride8``, ``stride16``, ``stride32`` = the end of the stage at that
  output stride, so methods can ask for "strides 8 and 16" without knowing the architecture;
* ResNets: ``stem`` (after max-pool), ``layer1`` .. ``layer4``;
* EfficientNets: ``stem``, ``blocks.0`` .. ``blocks.N-1``, ``head`` (plus ``stride2`` = ``blocks.0``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch
from torch import nn

from threecad.backbones.registry import DEFAULT_BACKBONE, create_backbone, weight_spec
from threecad.device import resolve_device
from threecad.errors import ThreecadError


class BackboneTaps(nn.Module):
    """Trainable multi-scale view of a backbone: ``x -> {layer: features}``, stopping at the deepest tap.

    No normalisation, no freezing: the building block for students trained from scratch (CFRG's
    EfficientNet-B0) and the engine of :class:`FeatureExtractor`. The stages share the backbone's
    parameters; stages after the deepest tap are not kept.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        super().__init__()
        if isinstance(layers, str):
            layers = (layers,)
        if not layers:
            raise ThreecadError("a feature extractor needs at least one layer name")
        self.name = getattr(model, "backbone_name", type(model).__name__)
        stages = model.feature_stages()
        order = {stage[0]: i for i, stage in enumerate(stages)}
        aliases = model.stage_aliases()
        self.layers = list(layers)
        targets = {}
        for layer in self.layers:
            target = aliases.get(layer, layer)
            if target not in order:
                known = sorted(aliases) + [s[0] for s in stages]
                raise ThreecadError(f"backbone {self.name!r} has no layer {layer!r}; known: {', '.join(known)}")
            targets[layer] = target
        self._targets = targets
        depth = max(order[t] for t in targets.values()) + 1
        self.channels = {layer: stages[order[t]][2] for layer, t in targets.items()}
        self.strides = {layer: stages[order[t]][3] for layer, t in targets.items()}
        # Keep only the stages that run: drops e.g. WRN50's layer4 + fc (~44M parameters) from memory.
        self._names = [s[0] for s in stages[:depth]]
        self.body = nn.ModuleList([s[1] for s in stages[:depth]])
        self._wanted: dict[str, list[str]] = {}
        for layer, target in targets.items():
            self._wanted.setdefault(target, []).append(layer)

    @property
    def out_channels(self) -> list[int]:
        return [self.channels[layer] for layer in self.layers]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for stage_name, stage in zip(self._names, self.body):
            x = stage(x)
            for layer in self._wanted.get(stage_name, ()):
                out[layer] = x
        return {layer: out[layer] for layer in self.layers}


class FeatureExtractor(BackboneTaps):
    """Callable ``images (B,3,H,W) in [0,1] -> {layer: features (B,C,H/s,W/s)}``, frozen and in eval mode.

    ``channels`` and ``strides`` give, per requested layer (in request order), the channel count
    and the output stride. Features come back on ``device`` as contiguous float32 tensors (or in
    ``dtype`` under autocast when given, e.g. ``torch.bfloat16`` on a GPU). Calling it never builds
    an autograd graph.

    Speed: the network runs in channels-last layout, and on CPU a batch is processed in
    ``micro_batch``-sized pieces (default 4; ``None`` = whole batch, the default on GPUs). Large CPU
    batches otherwise spend more time faulting in fresh activation memory than computing: measured
    on Lite0 at 256 px, batch 16, one thread, 151 ms/image whole vs 39 ms/image in pieces of 4.
    """

    def __init__(self, name: str = DEFAULT_BACKBONE, layers: Sequence[str] = ("stride8", "stride16"),
                 weights: str | os.PathLike | None = "default", device: str | torch.device = "auto",
                 dtype: torch.dtype | None = None, micro_batch: int | None | str = "auto", **backbone_kwargs):
        target = resolve_device(device)
        super().__init__(create_backbone(name, weights=weights, **backbone_kwargs), layers)
        spec = weight_spec(self.name)
        for p in self.body.parameters():
            p.requires_grad_(False)
        self.dtype = dtype
        self.micro_batch = micro_batch
        self.body.to(target, memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(spec.mean, device=target).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, device=target).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always stays in eval mode: BN statistics and dropout of a frozen backbone never change."""
        return super().train(False)

    @property
    def micro_batch(self) -> int | None:
        """Piece size of a batch: ``"auto"`` is 4 while the weights are on the CPU and whole batches
        (``None``) on any other device, decided where the extractor is now (it follows ``.to()``),
        so a network built on the CPU and moved to a GPU takes whole batches there."""
        if self._micro_batch == "auto":
            return 4 if self.device.type == "cpu" else None
        return self._micro_batch

    @micro_batch.setter
    def micro_batch(self, value: int | None | str) -> None:
        """A piece size, ``None`` (whole batches: what a graph export with a dynamic batch needs) or ``"auto"``."""
        if value != "auto" and value is not None and (not isinstance(value, int) or value < 1):
            raise ThreecadError(f"micro_batch must be a positive integer, None or 'auto', got {value!r}")
        self._micro_batch = value

    @property
    def device(self) -> torch.device:
        """Where the weights live (follows ``.to()``); inputs are moved here."""
        return self.mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB (or uint8) images -> the normalised input the backbone was trained on."""
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ThreecadError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        images = images.to(self.mean.device, self.mean.dtype, non_blocking=True)
        return ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.dtype is None:
            return super().forward(x)
        with torch.autocast(self.device.type, dtype=self.dtype):
            return super().forward(x)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.normalize(images)
        step = self.micro_batch or x.shape[0]
        if step >= x.shape[0]:
            return {k: v.contiguous() for k, v in self._run(x).items()}
        parts = [self._run(x[i:i + step]) for i in range(0, x.shape[0], step)]
        return {k: torch.cat([p[k].contiguous() for p in parts]) for k in self.layers}

    def extra_repr(self) -> str:
        taps = ", ".join(f"{k}: {self.channels[k]}ch/{self.strides[k]}" for k in self.layers)
        return f"{self.name}, {taps}, device={self.device}"


def benchmark_forward(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 1,
                      warmup: int = 2, repeats: int = 5) -> float:
    """Images per second of the bare backbone forward (normalise + run to the deepest tap).

    The reference figure method benchmarks divide by: everything a method adds on top of this
    is its own overhead. Synchronises CUDA so GPU timings are real.
    """
    if images.shape[0] < batch_size:
        reps = -(-batch_size // images.shape[0])
        images = images.repeat(reps, 1, 1, 1)
    batch = images[:batch_size].to(extractor.device)

    def sync() -> None:
        if extractor.device.type == "cuda":
            torch.cuda.synchronize(extractor.device)

    for _ in range(warmup):
        extractor(batch)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        extractor(batch)
    sync()
    return batch_size * repeats / (time.perf_counter() - start)
