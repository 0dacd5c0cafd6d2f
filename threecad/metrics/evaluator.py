"""The streaming evaluator: ``update`` per batch, ``compute`` once, exact results, bounded memory.

``Evaluator(protocol="mvtec")`` is the standard protocol (MVTec AD definitions; maps compared at the
ground-truth resolution). ``Evaluator(protocol="3cad-paper")`` reproduces the official 3CAD
evaluation (see :mod:`threecad.metrics.legacy`); its numbers are comparable with the paper's tables
and with nothing else.

Scores are used raw: no clamping, normalisation or sigmoid, so any strictly increasing transform of
the maps leaves every metric unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from threecad.errors import ThreecadError
from threecad.metrics import legacy
from threecad.metrics.pixels import PixelAccumulator, parse_memory_budget, torch_keys, torch_keys_to_float
from threecad.metrics.pro import region_weights
from threecad.metrics.ranking import (
    RankStats,
    Sweep,
    auroc,
    f1_max,
    float_keys,
    keys_finite,
    keys_to_float,
    stats_from_scores,
)

log = logging.getLogger(__name__)

METRICS = ("i_auroc", "p_auroc", "aupro", "p_ap", "i_f1max", "p_f1max")
PROTOCOLS = ("mvtec", "3cad-paper")
DEFAULT_CATEGORY = "default"
CURVE_POINTS = 512
PRO_FPR_LIMIT = 0.3
# Keys of float32 / float64 maps held in memory, all categories together, before they spill to disk:
# with a batch in flight and the bucketed pass's working memory, an evaluation stays well under 4 GB.
DEFAULT_MEMORY_BUDGET = 2_000_000_000


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


class _Category:
    def __init__(self, backend: str, device, memory_budget: int | None, spill_dir):
        self.pixels = PixelAccumulator(backend, device, memory_budget, spill_dir)
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.image_pros: list[float] = []  # 3cad-paper only
        self.pro_images = 0  # 3cad-paper: defective images seen


class Evaluator:
    """Exact I-AUROC, P-AUROC, AU-PRO, pixel AP and F1-max, per category and as their mean.

    Parameters
    ----------
    protocol:
        ``"mvtec"`` (standard) or ``"3cad-paper"`` (legacy, the official 3CAD code's definitions).
    device:
        ``"cpu"`` or a torch device such as ``"cuda"``. With ``backend="auto"``, CPU work uses numpy
        (lowest memory: keys are sorted in place) and other devices use torch on the device.
    backend:
        ``"auto"``, ``"numpy"`` or ``"torch"`` (torch also runs on the CPU: same results).
    size:
        ``None`` compares maps at the mask's resolution (maps of another size are resized bilinearly,
        half-pixel centres, antialiased when shrinking). ``(width, height)`` evaluates both at that
        declared size instead (masks nearest neighbour). Ignored by ``3cad-paper`` (always 256x256).
    memory_budget:
        Bytes (``2e9``) or a size (``"4GB"``, ``"512MiB"``) that the pixel keys of float32 / float64
        maps may hold in memory, all categories together; beyond it they spill to bucket files and
        ``compute`` reads them back bucket by bucket: same results, exactly. ``None``: unlimited
        (everything in memory). Default 2 GB: the peak is about the budget plus one batch, whatever
        the number of pixels (measured: 1.0-1.2 GB peak for 1.05 G float32 pixels at a 1 GB budget).
        float16 maps need 1.5 MB per category whatever the budget.
    spill_dir:
        Folder in which the temporary spill folder is created (default: the system temporary
        folder, ``$TMPDIR``). The spill folder is removed by ``compute``, ``close`` (or leaving a
        ``with`` block), also after an error; the folder named here is never removed.
    """

    def __init__(
        self,
        protocol: str = "mvtec",
        device: str = "cpu",
        backend: str = "auto",
        size: tuple[int, int] | None = None,
        memory_budget: int | float | str | None = DEFAULT_MEMORY_BUDGET,
        spill_dir: str | Path | None = None,
    ):
        if protocol not in PROTOCOLS:
            raise ThreecadError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
        if backend not in ("auto", "numpy", "torch"):
            raise ThreecadError(f"unknown backend {backend!r}; expected auto, numpy or torch")
        self.protocol = protocol
        self.device = str(device)
        if backend == "auto":
            backend = "numpy" if self.device == "cpu" else "torch"
        if backend == "numpy" and self.device != "cpu":
            raise ThreecadError(f"the numpy backend runs on the CPU only, not on {self.device!r}")
        if backend == "torch" or protocol == "mvtec":
            self._check_device()
        self.backend = backend if protocol == "mvtec" else "numpy"  # the legacy path is CPU-only
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.memory_budget = memory_budget
        self._budget = parse_memory_budget(memory_budget)
        self.spill_dir = spill_dir
        if spill_dir is not None and not Path(spill_dir).is_dir():
            raise ThreecadError("spill folder not found (create it first)", Path(spill_dir))
        self._categories: dict[str, _Category] = {}
        self._warned_scores = False
        self._consumed = False

    def _check_device(self) -> None:
        if self.device == "cpu":
            return
        import torch

        try:
            torch.empty(0, device=self.device)
        except Exception as exc:
            raise ThreecadError(f"device {self.device!r} is not usable here ({exc})") from None

    def reset(self) -> None:
        self.close()
        self._categories.clear()
        self._consumed = False

    def close(self) -> None:
        """Remove spilled keys (if any) now; ``compute`` does it too, and so does garbage collection."""
        for category in self._categories.values():
            if category.pixels.spilled:
                category.pixels.close()
                self._consumed = True

    @property
    def spilled(self) -> bool:
        """Whether some category's keys are on disk now (the memory budget was exceeded)."""
        return any(category.pixels.spilled for category in self._categories.values())

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._consumed:
            raise ThreecadError("this evaluator's spilled pixels were removed by compute() or close(); "
                                "call reset() and update() again")

    def _enforce_budget(self) -> None:
        """Spill every category's keys once all categories together hold more than the budget."""
        if self._budget is None:
            return
        if sum(c.pixels.nbytes for c in self._categories.values()) > self._budget:
            for category in self._categories.values():
                category.pixels.spill()

    # ------------------------------------------------------------------ update
    def update(self, anomaly_maps, gt_masks, image_scores=None, labels=None, categories=None) -> None:
        """Add a batch: maps (B, H, W) or (B, 1, H, W), or a list of 2-D maps of any sizes.

        ``gt_masks`` match the maps (bool, integer > 0, or float > 0.5 is anomalous). ``image_scores``
        default to each map's maximum, ``labels`` (1 = defective) to "the mask has a defect pixel",
        ``categories`` (one name, or one per image) to a single unnamed category.
        """
        if (
            self._is_batch(anomaly_maps)
            and self._is_batch(gt_masks)
            and (categories is None or isinstance(categories, str))
        ):
            # Fast path: one stacked batch of one category needs no splitting and re-stacking.
            count = anomaly_maps.shape[0]
            if gt_masks.shape[0] != count:
                raise ThreecadError(f"{count} anomaly maps but {gt_masks.shape[0]} ground-truth masks")
            maps_batch = anomaly_maps[:, 0] if anomaly_maps.ndim == 4 else anomaly_maps
            masks_batch = gt_masks[:, 0] if gt_masks.ndim == 4 else gt_masks
            self._update_group(
                categories or DEFAULT_CATEGORY,
                self._to_backend(maps_batch),
                masks_batch,
                self._per_image(image_scores, count, "image_scores"),
                self._per_image(labels, count, "labels"),
            )
            return
        maps = self._split(anomaly_maps, "anomaly_maps")
        masks = self._split(gt_masks, "gt_masks")
        count = len(maps)
        if len(masks) != count:
            raise ThreecadError(f"{count} anomaly maps but {len(masks)} ground-truth masks")
        scores = self._per_image(image_scores, count, "image_scores")
        folder_labels = self._per_image(labels, count, "labels")
        if categories is None or isinstance(categories, str):
            names = [categories or DEFAULT_CATEGORY] * count
        else:
            names = [str(name) for name in categories]
            if len(names) != count:
                raise ThreecadError(f"{count} anomaly maps but {len(names)} category names")
        # Group images of one category and one shape so the heavy work runs batched.
        groups: dict[tuple, list[int]] = {}
        for index in range(count):
            groups.setdefault((names[index], tuple(maps[index].shape), tuple(masks[index].shape)), []).append(
                index
            )
        for (name, _, _), indices in groups.items():
            self._update_group(
                name,
                self._stack([maps[i] for i in indices]),
                self._stack([masks[i] for i in indices]),
                None if scores is None else [scores[i] for i in indices],
                None if folder_labels is None else [folder_labels[i] for i in indices],
            )

    def _update_group(self, name: str, maps, masks, scores, labels) -> None:
        self._check_usable()
        category = self._categories.get(name)
        if category is None:
            category = self._categories[name] = _Category(self.backend, self.device, self._budget, self.spill_dir)
        if self.protocol == "mvtec":
            self._update_mvtec(category, maps, masks, scores, labels)
        else:
            self._update_paper(category, name, maps, masks, scores, labels)
        self._enforce_budget()

    @staticmethod
    def _is_batch(batch) -> bool:
        """A stacked (B, H, W) or (B, 1, H, W) numpy array or torch tensor."""
        if not (_is_torch(batch) or isinstance(batch, np.ndarray)):
            return False
        return batch.ndim == 3 or (batch.ndim == 4 and batch.shape[1] == 1)

    @staticmethod
    def _split(batch, what: str) -> list:
        """A batch as a list of 2-D arrays/tensors (channel axes of size 1 dropped)."""
        if isinstance(batch, (list, tuple)):
            items = list(batch)
        else:
            if not (_is_torch(batch) or isinstance(batch, np.ndarray)):
                batch = np.asarray(batch)
            if batch.ndim == 2:
                items = [batch]
            elif batch.ndim == 3:
                items = list(batch)
            elif batch.ndim == 4 and batch.shape[1] == 1:
                items = list(batch[:, 0])
            else:
                raise ThreecadError(
                    f"{what} must be (B, H, W), (B, 1, H, W) or a list of 2-D maps; got shape {tuple(batch.shape)}"
                )
        out = []
        for item in items:
            if not (_is_torch(item) or isinstance(item, np.ndarray)):
                item = np.asarray(item)
            if item.ndim == 3 and item.shape[0] == 1:
                item = item[0]
            if item.ndim != 2:
                raise ThreecadError(f"each of {what} must be 2-D (H, W); got shape {tuple(item.shape)}")
            out.append(item)
        return out

    @staticmethod
    def _per_image(values, count: int, what: str) -> list | None:
        if values is None:
            return None
        if _is_torch(values):
            values = values.detach().cpu().numpy()
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size != count:
            raise ThreecadError(f"{what} has {values.size} entries for {count} images")
        if not np.isfinite(values).all():
            raise ThreecadError(f"{what} contains NaN or inf")
        return values.tolist()

    def _stack(self, items: list):
        """Stack same-shape items on the backend (torch tensors stay on their device)."""
        if self.backend == "torch":
            import torch

            return torch.stack([self._to_backend(t) for t in items])
        return np.stack([self._to_backend(t) for t in items])

    def _to_backend(self, item):
        """A numpy array (numpy backend) or a tensor on the evaluator's device (torch backend)."""
        if self.backend == "torch":
            import torch

            tensor = item if _is_torch(item) else torch.from_numpy(np.ascontiguousarray(item))
            return tensor.detach().to(self.device)
        return item.detach().cpu().numpy() if _is_torch(item) else np.asarray(item)

    # ------------------------------------------------------------------ mvtec
    def _update_mvtec(self, category: _Category, maps, masks, scores, labels) -> None:
        maps = self._as_float(maps)
        keys = self._keys(maps)
        masks_np = self._binarise(masks)
        if self.size is not None:
            masks_np = self._resize_masks(masks_np, self.size)
        height, width = masks_np.shape[1:]
        if scores is None:
            scores = self._max(keys)
        if tuple(maps.shape[1:]) != (height, width):
            maps = self._resize_maps(maps, height, width)
            keys = self._keys(maps)
        weights, regions = region_weights(masks_np)
        if self.backend == "torch":
            import torch

            masks_backend = torch.from_numpy(masks_np).to(maps.device)
        else:
            masks_backend = masks_np
        category.pixels.add_keys(keys, masks_backend, weights, regions)
        category.scores.extend(scores)
        category.labels.extend(
            labels if labels is not None else masks_np.reshape(len(masks_np), -1).any(axis=1)
        )

    def _as_float(self, maps):
        """Maps as float16/32/64 on the backend (integers become float64, bfloat16 float32)."""
        if self.backend == "torch":
            import torch

            if maps.dtype not in (torch.float16, torch.float32, torch.float64):
                maps = maps.to(torch.float32 if maps.is_floating_point() else torch.float64)
            return maps
        if maps.dtype not in (np.float16, np.float32, np.float64):
            maps = maps.astype(np.float64)
        return maps

    def _keys(self, maps):
        """Order-preserving integer keys of the maps; NaN/inf are refused, never silently ranked."""
        keys = float_keys(maps) if self.backend == "numpy" else torch_keys(maps)
        if keys.shape[0] and not keys_finite(int(keys.min()), int(keys.max()), maps.dtype.itemsize):
            raise ThreecadError("anomaly maps contain NaN or inf")
        return keys

    @staticmethod
    def _binarise(masks) -> np.ndarray:
        """Masks to a numpy bool batch (labelling regions runs on the CPU in any case)."""
        if _is_torch(masks):
            masks = masks.detach().cpu().numpy()
        masks = np.asarray(masks)
        if masks.dtype == bool:
            return masks
        if np.issubdtype(masks.dtype, np.floating):
            return masks > 0.5
        return masks > 0

    @staticmethod
    def _resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        from PIL import Image

        if masks.shape[1:] == (size[1], size[0]):
            return masks
        return np.stack(
            [
                np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
                for m in masks
            ]
        )

    def _max(self, keys) -> list[float]:
        """Per-image maximum score, read from the keys (exact, and fast for float16)."""
        if self.backend == "torch":
            top = keys.reshape(keys.shape[0], -1).amax(dim=1)
            return torch_keys_to_float(top).double().cpu().tolist()
        return keys_to_float(keys.reshape(keys.shape[0], -1).max(axis=1)).astype(np.float64).tolist()

    def _resize_maps(self, maps, height: int, width: int):
        """Bilinear, half-pixel centres, antialiased when shrinking; float32 out (float64 kept)."""
        import torch
        import torch.nn.functional as F

        tensor = maps if _is_torch(maps) else torch.from_numpy(np.ascontiguousarray(maps))
        work = tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)
        shrink = height < work.shape[1] or width < work.shape[2]
        out = F.interpolate(
            work[:, None], size=(height, width), mode="bilinear", align_corners=False, antialias=shrink
        )
        out = out[:, 0]
        return out if self.backend == "torch" else out.numpy()

    # ------------------------------------------------------------------ 3cad-paper
    def _update_paper(self, category: _Category, name: str, maps, masks, scores, labels) -> None:
        if scores is not None and not self._warned_scores:
            log.warning(
                "3cad-paper protocol: image scores are the max of the smoothed map; given scores are ignored"
            )
            self._warned_scores = True
        maps = self._as_float(maps)
        self._keys(maps)  # refuses NaN/inf
        masks_np = self._binarise(masks)
        smoothed = np.stack([legacy.smooth(legacy.squash_map(m)) for m in maps])
        squashed = np.stack([legacy.squash_mask(m) for m in masks_np])
        category.pixels.add(smoothed, squashed, None, 0)
        category.scores.extend(smoothed.reshape(len(smoothed), -1).max(axis=1).tolist())
        mask_labels = squashed.reshape(len(squashed), -1).any(axis=1)
        category.labels.extend(mask_labels.astype(int).tolist())
        folder = mask_labels if labels is None else np.asarray(labels) != 0
        for index in np.flatnonzero(folder):
            category.pro_images += 1
            value = legacy.image_pro(
                smoothed[index], squashed[index], name=f"{name} image {category.pro_images}"
            )
            if value is not None:
                category.image_pros.append(value)

    # ------------------------------------------------------------------ compute
    def compute(self, curves: bool = False) -> dict:
        """``{"protocol", "categories": {name: {metric: value}}, "mean": {metric: value}}``.

        Values are floats in [0, 1] or None where a metric is undefined (a warning says why); the
        mean is None for a metric undefined in any category. ``curves=True`` adds, per category,
        the pixel ROC and the PRO curve (FPR up to 0.3) read at 512 evenly spaced FPR values.

        When keys were spilled to disk (``memory_budget``), they are read back bucket by bucket and
        then removed, also after an error: such an evaluator then needs ``reset()`` before reuse.
        """
        self._check_usable()
        if not self._categories:
            raise ThreecadError("nothing to evaluate: call update() with maps and masks first")
        results: dict[str, dict] = {}
        plots: dict[str, dict] = {}
        try:
            for name in sorted(self._categories):
                values, curve = self._compute_category(name, self._categories[name], curves)
                results[name] = values
                if curves:
                    plots[name] = curve
        finally:
            self.close()
        mean = {metric: mean_of([results[name][metric] for name in results]) for metric in METRICS}
        out = {"protocol": self.protocol, "categories": results, "mean": mean}
        if curves:
            out["curves"] = plots
        return out

    def _compute_category(self, name: str, category: _Category, curves: bool) -> tuple[dict, dict]:
        image = stats_from_scores(np.asarray(category.scores), np.asarray(category.labels))
        pixels = category.pixels
        # The pixel metrics stream: slices of distinct scores, highest first, never all at once.
        pixel = Sweep(pixels.n_normal, pixels.n_anomalous, pixels.n_components, PRO_FPR_LIMIT,
                      CURVE_POINTS if curves else 0)
        for part in pixels.slices():
            pixel.add(part)
        values = {
            "i_auroc": auroc(image),
            "p_auroc": pixel.auroc(),
            "aupro": self._aupro(category, pixel),
            "p_ap": pixel.average_precision(),
            "i_f1max": f1_max(image),
            "p_f1max": pixel.f1_max(),
        }
        self._explain(name, values, image, pixel, category)
        values = {k: (None if v is None or not math.isfinite(v) else float(v)) for k, v in values.items()}
        curve = pixel.curves() if curves else {}
        return values, curve

    def _aupro(self, category: _Category, pixel: Sweep) -> float | None:
        if self.protocol == "mvtec":
            return pixel.aupro()
        return float(np.mean(category.image_pros)) if category.image_pros else None

    def _explain(
        self, name: str, values: dict, image: RankStats, pixel: Sweep, category: _Category
    ) -> None:
        """One warning per undefined metric, saying why (never a silent 0.5)."""
        reasons = []
        if image.n_normal == 0 or image.n_anomalous == 0:
            kind = "good" if image.n_normal == 0 else "defective"
            reasons.append(f"i_auroc undefined: no {kind} test images")
        if image.n_anomalous == 0:
            reasons.append("i_f1max undefined: no defective test images")
        if pixel.n_anomalous == 0:
            reasons.append("p_auroc, aupro, p_ap, p_f1max undefined: no anomalous pixels")
        elif pixel.n_normal == 0:
            reasons.append("p_auroc, aupro undefined: no normal pixels")
        if self.protocol == "3cad-paper" and values["aupro"] is None and pixel.n_anomalous:
            reasons.append(
                f"aupro undefined: none of {category.pro_images} defective images has a usable PRO curve"
            )
        for reason in reasons:
            log.warning("category %s: %s", name, reason)


def mean_of(values: Sequence[float | None]) -> float | None:
    """Mean that is None when any value is None (the rule ``compute`` uses across categories)."""
    return None if any(v is None for v in values) else float(np.mean(values))
