"""CFRG as a registered :class:`threecad.methods.Method` (``3cad train --method cfrg``)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cfrg.infer import OFFICIAL_TERMS, TERMS, anomaly_maps
from cfrg.model import CFRGNet
from cfrg.train import TrainConfig, train
from threecad.device import resolve_device
from threecad.errors import ThreecadError
from threecad.methods import Method, Option, register
from threecad.methods.batching import train_subset
from threecad.methods.blocks import PAPER_TEACHER, build_teacher
from threecad.methods.method import NetInference
from threecad.methods.training import seeded
from threecad.synth.anomalies import SyntheticAnomalyDataset, TextureBank

log = logging.getLogger(__name__)


@register
class CFRG(Method):
    """Heterogeneous distillation + recovery guidance + segmentation (3CAD, AAAI 2025).

    Paper configuration: ``teacher="wide_resnet50_2"`` with its ImageNet weight file present (see
    ``docs/backbones.md``); without it the teacher falls back, with a warning, to the pretrained
    EfficientNet-Lite0 shipped offline, and the saved configuration records the teacher actually used.
    ``teacher_weights="random"`` builds a random teacher (tests, shape checks only).

    ``map_terms``: ``"recovery+segmentation"`` (official), or any ``+``-joined subset of
    ``recovery``, ``segmentation``, ``distillation``. ``sigma``: Gaussian smoothing (official 4).
    ``topk``: 0 = image score is the map max (official), else the mean of that top fraction.
    ``train_images``: 0 = all, else a seeded subset of that many training images (reduced budgets).
    ``textures``: a DTD-like folder; ``None`` = procedural textures + other training images.
    ``clean_probability``: share of training samples left without a synthetic anomaly (default 0.5,
    DRAEM's share, chosen on validation data; the official code's is 0). Exposure: ``mean`` by default.
    ``size``: the side the network sees; ``None`` = the size of the training images (the runner's
    ``--size``). Other inputs are resized to it and maps resized back.
    """

    name = "cfrg"
    #: Chosen on validation data with ``clean_probability=0.5`` (``docs/results/``): frames shot at
    #: different exposures are scaled to one mean grey level.
    DEFAULT_INPUTS = {"exposure": "mean"}
    #: ``3cad tune``: inference-only choices, scored on one trained network (a fit costs hours).
    TUNE_GRID = {"map_terms": ("recovery+segmentation", "recovery+segmentation+distillation"), "topk": (0.0, 0.03)}
    #: Inference options: the map terms, their smoothing and the image score (and the device).
    #: Everything else shaped the trained network, or only matters while training.
    OPTIONS = {
        "epochs": Option(int, low=1),
        "batch_size": Option(int, low=1),
        "size": Option(int, low=0, multiple=32, null=True),
        "device": Option(str, predict=True),
        "seed": Option(int, low=0),
        "teacher": Option(str),
        "teacher_weights": Option(str, null=True),
        "lr": Option(float, low=0, open_low=True),
        "weight_decay": Option(float, low=0),
        "dis_weight": Option(float, low=0),
        "rec_weight": Option(float, low=0),
        "seg_weight": Option(float, low=0),
        "resume": Option(bool),
        "clean_probability": Option(float, low=0, high=1),
        "textures": Option(str, null=True),
        "amp": Option(bool),
        "workers": Option(int, low=0),
        "map_terms": Option(str, choices=TERMS, sep="+", predict=True),
        "sigma": Option(float, low=0, predict=True),
        "topk": Option(float, low=0, high=1, predict=True),
        "train_images": Option(int, low=0),
    }

    def __init__(
        self,
        epochs: int = 50,
        batch_size: int = 32,
        size: int | None = None,
        device: str = "auto",
        seed: int = 42,
        teacher: str = PAPER_TEACHER,
        teacher_weights: str = "default",
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        dis_weight: float = 1.0,
        rec_weight: float = 1.0,
        seg_weight: float = 1.0,
        resume: bool = False,
        clean_probability: float = 0.5,
        textures: str | None = None,
        amp: bool = True,
        workers: int = 0,
        map_terms: str = "+".join(OFFICIAL_TERMS),
        sigma: float = 4.0,
        topk: float = 0.0,
        train_images: int = 0,
    ):
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.size = None if size in (None, 0) else int(size)
        self.device = str(device)
        self.seed = int(seed)
        self.teacher = str(teacher)
        self.teacher_weights = str(teacher_weights) if teacher_weights is not None else "random"
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.dis_weight = float(dis_weight)
        self.rec_weight = float(rec_weight)
        self.seg_weight = float(seg_weight)
        self.resume = bool(resume)
        self.clean_probability = float(clean_probability)
        self.textures = None if textures in (None, "") else str(textures)
        self.amp = bool(amp)
        self.workers = int(workers)
        self.map_terms = str(map_terms)
        self.sigma = float(sigma)
        self.topk = float(topk)
        self.train_images = int(train_images)
        self._terms = tuple(t.strip() for t in self.map_terms.split("+"))
        self.net: CFRGNet | None = None
        self.history_: list[dict] = []
        #: What fit settled, never written back into the options (see resolved_config): the teacher
        #: actually built (after a fallback) and the side trained at when ``size`` is None.
        self._teacher_used: str | None = None
        self._fitted_size: int | None = None

    # ------------------------------------------------------------------ model
    def _build(self) -> CFRGNet:
        if self.net is None:
            with seeded(self.seed):
                teacher = build_teacher(self.teacher, self.teacher_weights)
                self._teacher_used = teacher.name  # saved in the config (resolved_config)
                self.net = CFRGNet(teacher)
            self.net.to(resolve_device(self.device))
        return self.net

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay,
                           loss_weights=(self.dis_weight, self.rec_weight, self.seg_weight), amp=self.amp,
                           seed=self.seed, workers=self.workers)

    # ------------------------------------------------------------------ Method API
    def fit(self, train_set: torch.utils.data.Dataset, val_set: torch.utils.data.Dataset | None = None):
        net = self._build()
        device = resolve_device(self.device)
        if self.size is None:  # the size the runner loaded the images at (``3cad train --size``)
            height, width = train_set[0]["image"].shape[-2:]
            if height != width or height % 32:
                raise ThreecadError(f"cfrg trains on square images with a side divisible by 32, got {width}x{height}; "
                                    "use --resize squash and --size 256 (or 128, 320 ...)")
            self._fitted_size = int(height)
        base = train_subset(train_set, self.train_images, self.seed)
        bank = TextureBank(self.textures, images=base)
        data = SyntheticAnomalyDataset(base, bank, self.clean_probability, seed=self.seed)
        validation = None
        if val_set is not None and len(val_set):
            validation = SyntheticAnomalyDataset(val_set, bank, self.clean_probability, seed=self.seed + 1)
        log.info("cfrg: teacher %s, %d training images, textures: %s", self.teacher, len(base), bank.source)
        self.history_ = train(net, data, self.train_config(), device, self.work_dir, self.resume, validation,
                              fingerprint=self._fingerprint())
        return self

    def _fingerprint(self) -> dict[str, Any]:
        """What else a resumed checkpoint must have been trained with (the engine checks the schedule,
        batch, seed and AMP; :meth:`TrainConfig.fingerprint` the optimiser and loss weights)."""
        return {"teacher": self._teacher_used, "size": self.size or self._fitted_size,
                "clean_probability": self.clean_probability, "textures": self.textures,
                "train_images": self.train_images}

    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.net is None:
            raise ThreecadError("cfrg model is not fitted: call fit() or load a saved run")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ThreecadError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        return self.run_inference(images.to(next(self.net.student.parameters()).device))

    def inference_module(self) -> NetInference:
        """The network and its map (:meth:`_infer`) as one module."""
        return self.net_inference()

    def _infer(self, net: CFRGNet, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps (:func:`cfrg.infer.anomaly_maps`) at the trained side, the maps resized to the input's."""
        height, width = images.shape[-2:]
        side = self.size or self._fitted_size or int(height)
        inputs = images
        if (height, width) != (side, side):
            inputs = F.interpolate(images.float(), size=(side, side), mode="bilinear", align_corners=False)
        scores, maps = anomaly_maps(net(inputs.float()), (side, side), self._terms, self.sigma, self.topk)
        if (height, width) != (side, side):
            maps = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        return scores, maps

    def resolved_config(self) -> dict[str, Any]:
        """The teacher actually built (a missing WideResNet file falls back to Lite0) and the side
        trained at, so that loading the saved run builds the network these weights belong to."""
        resolved: dict[str, Any] = {}
        if self._teacher_used is not None:
            resolved["teacher"] = self._teacher_used
        if self.size is None and self._fitted_size is not None:
            resolved["size"] = self._fitted_size
        return resolved

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.net is None:
            raise ThreecadError("cfrg model is not fitted: nothing to save")
        return {k: v.detach().cpu() for k, v in self.net.trainable_state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._build().load_trainable_state_dict(state)
        self.net.eval()
