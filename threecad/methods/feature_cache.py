"""Frozen-backbone features of a training set, computed once, for methods that train only a head.

FastFlow and SimpleNet (and any later method on a frozen, un-augmented encoder) spend most of an
epoch in the backbone although its output for a given image never changes. :class:`FeatureCache`
runs the encoder once over every image of a dataset, in fixed consecutive chunks of
:data:`CHUNK` images in index order, and serves the stored features as dataset items, so every
epoch after that costs only the trainable part.

* **Bounded.** At most ``memory_gb`` GiB (default :data:`DEFAULT_MEMORY_GB`) in memory; a larger
  cache goes to a memory-mapped, already-unlinked temporary file (in ``spill_dir``, else the system
  temporary folder) when that file system has the room plus :data:`DISK_MARGIN` to spare, and
  otherwise there is no cache: items carry the image and the method recomputes the features in
  each step (:func:`batch_features`), as without a cache. ``mode`` says which (``"memory"``,
  ``"disk"``, ``"off"``); memory and disk hold the same values.
* **A pure function of the images and the encoder.** The chunks do not depend on the training
  order or batch size, so a cache rebuilt in a resumed process holds the very same bits and the
  training engine's exact resume stays exact. Features equal a fresh encoder call on the same
  chunk bit for bit; against other batchings they agree to float rounding (a convolution library
  may pick another kernel for another batch size).
* One cache per input resolution: every image of the dataset must have the same shape (a
  training set at one ``--size`` with ``--resize squash``).

Under ``torchrun`` each process builds the whole cache (its batches change every epoch), so the
bound holds per process. DataLoader workers share it through ``fork``.

:func:`fit_on_features` runs the training engine on cached features; :class:`threecad.methods.blocks.FrozenPartNet`
and :class:`FrozenEncoderMethod` hold the plumbing every method on a frozen encoder shares
(saving only the trainable parts, the encoder actually built, the engine's checkpoint hooks).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from threecad.backbones.registry import canonical_name
from threecad.device import resolve_device
from threecad.errors import ThreecadError
from threecad.methods.blocks import FrozenPartNet
from threecad.methods.method import Method, Option
from threecad.progress import progress

log = logging.getLogger(__name__)

#: In-memory bound of one cache, GiB: a 3CAD category at 256 px holds up to 2,233 images, i.e.
#: 1.4 GiB of Lite0 stride-4/8/16 features or 3.8 GiB of ResNet-18 layer1-3 features.
DEFAULT_MEMORY_GB = 4.0
#: Images per encoder call while filling (fixed: the stored values must not depend on anything else).
CHUNK = 16
#: Free space a spill file leaves on its file system.
DISK_MARGIN = 1 << 30
MODES = ("memory", "disk", "off")

Encoder = Callable[[torch.Tensor], Sequence[torch.Tensor]]


def batch_features(batch: dict, encoder: Encoder) -> list[torch.Tensor]:
    """The frozen features of a batch: the cached ones, or the encoder run on its images."""
    if "features" in batch:
        return list(batch["features"])
    return list(encoder(batch["image"]))


def collate(items: list[dict]) -> dict:
    """Stack the items of a :class:`FeatureCache` (features level by level, or images)."""
    if "features" in items[0]:
        return {"features": [torch.stack(level) for level in zip(*(item["features"] for item in items))]}
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) > 1:
        raise ThreecadError(f"training batches need one image size, got {sorted(shapes)}: use --resize squash")
    return {"image": torch.stack([item["image"].float() for item in items])}


class FeatureCache(torch.utils.data.Dataset):
    """Items ``{"features": [level tensors]}`` (or ``{"image"}`` when ``mode`` is ``"off"``) of ``data``.

    ``encoder``: a frozen callable ``images (B, 3, H, W) -> list of (B, C, h, w)`` feature maps
    (e.g. :class:`threecad.methods.blocks.Teacher`). ``enabled=False`` builds no cache. The encoder
    runs when the cache is constructed; the cache keeps no reference to it.
    """

    def __init__(self, data: torch.utils.data.Dataset, encoder: Encoder, memory_gb: float = DEFAULT_MEMORY_GB,
                 spill_dir: str | Path | None = None, enabled: bool = True, desc: str = "features"):
        self.data = data
        self.memory_bytes = int(max(0.0, float(memory_gb)) * 2**30)
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.mode = "off"
        self.nbytes = 0
        self.shapes: list[tuple[int, ...]] = []
        self._levels: list[torch.Tensor] | None = None
        self._file = None
        if enabled and len(data):
            self._fill(encoder, desc)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        if self._levels is None:
            return {"image": self.data[index]["image"]}
        return {"features": [level[index] for level in self._levels]}

    # ------------------------------------------------------------------ filling
    def _allocate(self, per_image: list[tuple[int, ...]]) -> bool:
        """Room for every image's features, in memory or in a spill file; False if neither fits."""
        n = len(self.data)
        sizes = [n * math.prod(shape) for shape in per_image]
        self.nbytes = 4 * sum(sizes)
        if self.nbytes <= self.memory_bytes:
            self._levels = [torch.empty((n, *shape), dtype=torch.float32) for shape in per_image]
            self.mode = "memory"
            return True
        folder = self.spill_dir if self.spill_dir is not None and self.spill_dir.is_dir() else Path(
            tempfile.gettempdir())
        free = shutil.disk_usage(folder).free
        if self.nbytes + DISK_MARGIN > free:
            log.warning("feature cache: %.2f GiB exceed the memory bound (%.2f GiB) and the free space in %s "
                        "(%.2f GiB): features are recomputed every epoch", self.nbytes / 2**30,
                        self.memory_bytes / 2**30, folder, free / 2**30)
            self.nbytes = 0
            return False
        self._file = tempfile.TemporaryFile(dir=folder)  # unlinked at once: nothing is left behind
        flat = np.memmap(self._file, dtype=np.float32, mode="w+", shape=(sum(sizes),))
        offsets = np.cumsum([0, *sizes])
        self._levels = [torch.from_numpy(flat[a:b]).view(n, *shape)
                        for a, b, shape in zip(offsets[:-1], offsets[1:], per_image)]
        self.mode = "disk"
        return True

    def _fill(self, encoder: Encoder, desc: str) -> None:
        start = time.perf_counter()
        n = len(self.data)
        first_shape = None
        for begin in progress(range(0, n, CHUNK), desc=f"{desc} (caching)", total=math.ceil(n / CHUNK)):
            images = [self.data[i]["image"] for i in range(begin, min(begin + CHUNK, n))]
            for image in images:
                first_shape = first_shape or tuple(image.shape)
                if tuple(image.shape) != first_shape:
                    self.close()
                    raise ThreecadError(f"the feature cache needs one image size, got {first_shape} and "
                                        f"{tuple(image.shape)}: use --resize squash")
            with torch.no_grad():
                feats = [f.detach().float().cpu() for f in encoder(torch.stack(images).float())]
            if self._levels is None:
                self.shapes = [tuple(f.shape[1:]) for f in feats]
                if not self._allocate(self.shapes):
                    return
            for level, f in zip(self._levels, feats):
                level[begin:begin + len(images)] = f
        log.info("%s: cached the features of %d images (%.2f GiB %s, bound %.2f GiB in memory) in %.1f s", desc,
                 n, self.nbytes / 2**30, "in memory" if self.mode == "memory" else "in a memory-mapped file",
                 self.memory_bytes / 2**30, time.perf_counter() - start)

    def close(self) -> None:
        """Release the stored features (and the spill file); items then carry images again."""
        self._levels = None
        self.mode = "off"
        if self._file is not None:
            self._file.close()
            self._file = None


def fit_on_features(trainable, encoder: Encoder, train_set: torch.utils.data.Dataset,
                    val_set: torch.utils.data.Dataset | None, settings, device: torch.device, *,
                    cache: bool = True, memory_gb: float = DEFAULT_MEMORY_GB, work_dir: str | Path | None = None,
                    resume: bool = False, fingerprint: dict | None = None, desc: str = "train") -> list[dict]:
    """:func:`threecad.methods.training.fit` on cached features of ``train_set`` (and ``val_set``).

    The validation cache gets what the training cache left of the memory bound. Whether the
    features were cached or recomputed per step joins the resume ``fingerprint`` (the two agree
    only to float rounding); memory and disk caches hold the same bits, so either may resume
    the other. The caches are released when training ends.
    """
    from threecad.methods.training import fit

    train = FeatureCache(train_set, encoder, memory_gb, work_dir, enabled=cache, desc=desc)
    left = memory_gb - (train.nbytes / 2**30 if train.mode == "memory" else 0.0)
    val = (FeatureCache(val_set, encoder, left, work_dir, enabled=cache, desc=f"{desc} validation")
           if val_set is not None and len(val_set) else None)
    fingerprint = {**(fingerprint or {}), "features": "recomputed" if train.mode == "off" else "cached"}
    try:
        return fit(trainable, train, settings, device, work_dir=work_dir, resume=resume, val_data=val,
                   collate=collate, desc=desc, fingerprint=fingerprint)
    finally:
        train.close()
        if val is not None:
            val.close()


# ------------------------------------------------------------------------------------------- method plumbing
#: The options every :class:`FrozenEncoderMethod` declares (each method adds its own defaults).
FROZEN_ENCODER_OPTIONS = {
    "encoder": Option(str),
    "encoder_weights": Option(str, null=True),
    "sigma": Option(float, low=0, predict=True),
    "seed": Option(int, low=0),
    "device": Option(str, predict=True),
    "workers": Option(int, low=0),
    "resume": Option(bool),
    "feature_cache": Option(bool),
    "cache_gb": Option(float, low=0),
}


class FrozenEncoderMethod(Method):
    """What methods training a head on a frozen encoder share: the device, the encoder actually
    built (saved in the configuration), the engine's checkpoint hooks, saving and loading the head,
    and :meth:`_fit_on_features` (the engine on cached features).

    A subclass sets ``self.net`` (a :class:`threecad.methods.blocks.FrozenPartNet`) and ``self._encoder_used`` when it
    builds its network, and has the options ``encoder``, ``device``, ``resume``,
    ``feature_cache`` and ``cache_gb``.
    """

    net: FrozenPartNet | None = None
    _encoder_used: str | None = None

    def _device(self) -> torch.device:
        return resolve_device(self.device)

    def resolved_config(self) -> dict[str, Any]:
        """The encoder actually built (after a fallback), so that loading the run rebuilds the network its weights fit."""
        return {"encoder": self._encoder_used} if self._encoder_used is not None else {}

    def validation_step(self, module, batch: dict) -> dict[str, torch.Tensor]:
        return self.training_step(module, batch)

    def checkpoint_state(self, module: FrozenPartNet) -> dict[str, torch.Tensor]:
        return module.trainable_state_dict()

    def load_checkpoint_state(self, module: FrozenPartNet, state: dict[str, torch.Tensor]) -> None:
        module.load_trainable_state_dict(state)

    def _fit_on_features(self, train_set: torch.utils.data.Dataset, val_set: torch.utils.data.Dataset | None,
                         settings, fingerprint: dict) -> None:
        self.history_ = fit_on_features(self, self.net.encoder, train_set, val_set, settings, self._device(),
                                        cache=self.feature_cache, memory_gb=self.cache_gb, work_dir=self.work_dir,
                                        resume=self.resume, fingerprint=fingerprint, desc=self.name)
        self.net.eval()

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` checked and moved to the device, for :meth:`predict_batch`."""
        if self.net is None:
            raise ThreecadError(f"{self.name} is not fitted: call fit() or load a saved run")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ThreecadError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        return images.to(self._device()).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.net is None:
            raise ThreecadError(f"{self.name} is not fitted: nothing to save")
        return {k: v.detach().cpu() for k, v in self.net.trainable_state_dict().items()}

    def _load_trained(self, state: dict[str, torch.Tensor]) -> None:
        """Load a saved head into ``self.net`` (already built), refusing another encoder than the run's."""
        if self._encoder_used != canonical_name(self.encoder):
            raise ThreecadError(f"this run was trained with the encoder {self.encoder}, which cannot be built here "
                                f"(got {self._encoder_used}): place its weight file (docs/backbones.md)")
        self.net.load_trainable_state_dict(state)
        self.net.eval()
