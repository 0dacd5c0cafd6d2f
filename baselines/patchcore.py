"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Normal images are described by a memory bank of locally aggregated mid-level patch features; a test
patch is as anomalous as its distance to the nearest bank entry. The pieces live in small modules:
:mod:`baselines.aggregation` (3x3 neighbourhood averaging, stage fusion, map smoothing),
:mod:`baselines.coreset` (greedy k-center subsampling of the bank) and :mod:`baselines.knn`
(nearest-neighbour search in blocks of bounded memory); two steps beyond the paper, the brightness
channel (:func:`baselines.aggregation.with_brightness`) and the positional calibration
(:mod:`baselines.calibration`), are on by default: both were chosen on validation data (held-out
normals with synthetic anomalies, ``docs/results/``), as are the top-3 % image score, exposure
normalisation and the chunked coreset over every training patch. ``PatchCore(**PAPER_SETTINGS)``
is the paper's configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from baselines import features as _features
from baselines.aggregation import combine_stages, with_brightness
from baselines.calibration import PositionalBaseline
from baselines.coreset import chunked_greedy_coreset
from baselines.knn import nearest_in_bank, nearest_neighbors
from threecad.device import resolve_device
from threecad.errors import ThreecadError
from threecad.maps.postprocess import top_fraction_mean, upsample_maps
from threecad.methods import Method, Option, iter_batches, register
from threecad.progress import progress

log = logging.getLogger(__name__)


#: The paper's configuration (Lite0 taps aside): maximum score, no brightness channel, no
#: calibration, raw exposure, a coreset of a random 200k-patch sample in one greedy pass.
PAPER_SETTINGS = {"topk": 0.0, "intensity_weight": 0.0, "calibration_images": 0, "max_patches": 200_000,
                  "coreset_chunk": None, "exposure": "raw"}


def embed_patches(extractor, images: torch.Tensor, layers: Sequence[str], neighbourhood: int,
                  feature_dim: int | None, intensity_weight: float) -> torch.Tensor:
    """Patch features (B, h, w, D) of images (B, 3, H, W) in [0, 1]: the fused, locally aggregated
    stages, channel-reduced to ``feature_dim``, with the brightness channel when ``intensity_weight > 0``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ThreecadError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    maps = _features.extract(extractor, images, layers)
    fused = combine_stages([m.float() for m in maps], neighbourhood)
    b, c, h, w = fused.shape
    if feature_dim is not None and c > feature_dim:
        fused = F.adaptive_avg_pool1d(fused.permute(0, 2, 3, 1).reshape(-1, 1, c), feature_dim)
        fused = fused.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    if intensity_weight > 0:
        fused = with_brightness(fused, images, intensity_weight, neighbourhood)
    return fused.permute(0, 2, 3, 1).contiguous()


class PatchCoreInference(torch.nn.Module):
    """PatchCore's predict, images (B, 3, H, W) -> (scores (B,), maps (B, H, W)), as one module.

    The backbone and the whole nearest-neighbour search are in the graph, the memory bank a constant
    (so ``3cad export`` writes backbone + bank + search as one ONNX model). The search scans the bank
    in chunks sized so that a batch of the method's ``batch_size`` images needs about ``block_mb``
    of distances (:func:`baselines.knn.nearest_in_bank`): the loop runs over the fixed bank only, so
    the batch stays a dynamic axis.
    """

    def __init__(self, method: PatchCore, bank: torch.Tensor):
        super().__init__()
        self.extractor = method._get_extractor()
        self.register_buffer("bank", bank)
        self.register_buffer("bank_sq", (bank * bank).sum(1))
        self.baseline = method.baseline if method.calibration_images else None
        self.layers = list(method.layers)
        self.neighbourhood, self.feature_dim = method.neighbourhood, method.feature_dim
        self.intensity_weight, self.num_neighbors = method.intensity_weight, method.num_neighbors
        self.reweight, self.reweight_neighbors = method.reweight, method.reweight_neighbors
        self.topk, self.sigma = method.topk, method.sigma
        self.batch_entries = max(1, method.block_mb * 2**20 // 4 // method.batch_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = embed_patches(self.extractor, images, self.layers, self.neighbourhood, self.feature_dim,
                                self.intensity_weight)
        b, h, w, d = patches.shape
        if d != self.bank.shape[1]:
            raise ThreecadError(f"feature dimension {d} differs from the memory bank's {self.bank.shape[1]}: predict "
                                "with the backbone, layers and feature_dim the run was fitted with")
        chunk = max(1, self.batch_entries // (h * w))
        flat = patches.reshape(-1, d)
        dist, index = nearest_in_bank(flat, self.bank, self.num_neighbors, chunk, self.bank_sq)
        scores = dist.mean(1).reshape(b, h, w)
        if self.baseline is not None:
            scores = scores - self.baseline.correction((h, w), scores.device)
        scores = scores.reshape(b, h * w)
        best = scores.argmax(1)
        image_scores = scores.gather(1, best[:, None])[:, 0]
        if self.reweight:
            image_scores = image_scores * self._reweight(flat.reshape(b, h * w, d), best, index.reshape(b, h * w, -1),
                                                         chunk)
        maps = upsample_maps(scores.reshape(b, h, w), tuple(images.shape[-2:]), self.sigma)
        if self.topk > 0:
            image_scores = top_fraction_mean(maps, self.topk)
        return image_scores.float(), maps.float()

    def _reweight(self, patches: torch.Tensor, best: torch.Tensor, index: torch.Tensor, chunk: int) -> torch.Tensor:
        """Weight 1 - exp(d(m_test, m*)) / sum_{m in N_b(m*)} exp(d(m_test, m)) of the paper (eq. 7).

        ``m_test`` is the image's most anomalous patch, ``m*`` its nearest bank entry and ``N_b(m*)``
        is ``m*`` with its ``reweight_neighbors`` nearest bank entries. Computed as a softmax for
        stability. Since ``m*`` is the nearest entry, the weight lies in [b / (b + 1), 1): near 1 when the
        rest of the neighbourhood is far from ``m_test`` (``m*`` is a rare pattern), lower when dense.
        """
        rows = torch.arange(best.shape[0], device=patches.device)
        m_test = patches[rows, best]  # (B, D)
        m_star = self.bank[index[rows, best, 0]]  # (B, D)
        _, hood = nearest_in_bank(m_star, self.bank, self.reweight_neighbors + 1, chunk, self.bank_sq)
        dists = (m_test[:, None] - self.bank[hood]).pow(2).sum(-1).sqrt()  # (B, b+1); column 0 is m* itself
        return 1.0 - torch.softmax(dists, dim=1)[:, 0]


@register
class PatchCore(Method):
    """Memory-bank anomaly detector.

    Defaults are the settings chosen on validation data (held-out normals with synthetic anomalies,
    ``docs/results/``); :data:`PAPER_SETTINGS` gives the paper's. Input: squash 256 with
    ``exposure="mean"`` (each image scaled to one mean grey level).

    Parameters
    ----------
    backbone, layers, weights:
        Feature extractor (:mod:`threecad.backbones`); layers by name or output stride.
    neighbourhood:
        Side of the local averaging window (3 in the paper; 1 disables it).
    feature_dim:
        Reduce the fused channels to this many by averaging adjacent channels (the paper's 1024 for
        WRN50); ``None`` keeps them all.
    coreset_ratio:
        Fraction of the candidate patches kept in the bank (greedy k-center); 1.0 keeps all of them.
    max_patches:
        Seeded random subset of the training patches the coreset starts from; ``None`` (default):
        every training patch is a candidate.
    coreset_chunk:
        Run the greedy selection on chunks of this many patches (whole images), each keeping
        ``coreset_ratio`` of its patches (:func:`baselines.coreset.chunked_greedy_coreset`): ``c``
        chunks cost ``1 / c`` of one global pass, so fit time grows linearly with the data, and a
        20k-patch chunk stays in the CPU cache (memory still holds every candidate: patches x
        channels floats). ``None``: one global pass (the paper).
    projection_dim:
        Random-projection dimension used for the coreset distances.
    num_neighbors:
        Patch score = mean distance to this many nearest bank entries (1 in the paper).
    reweight, reweight_neighbors:
        The paper's image-score reweighting by the density of the bank around the nearest entry
        (with ``topk=0`` only).
    topk:
        0 (the paper): the image score is the largest patch score. A fraction in (0, 1]: the mean of
        the highest ``topk`` share of the smoothed map's pixels instead (default 0.03).
    sigma:
        Gaussian smoothing of the full-resolution maps.
    intensity_weight:
        ``w > 0``: every patch gets one more feature, ``w`` times the local mean grey level of the
        input (:func:`baselines.aggregation.with_brightness`), so that the inside of a large faint
        defect does not match a normal patch of another brightness. The scale matters: Lite0 patch
        features lie about 13-20 from their nearest bank entry, grey levels in [0, 1] (about 0.45
        after ``exposure="mean"``), so with the default ``w = 200`` a 10 % brightness change adds 9,
        about half a typical distance. Saved with the bank; predicting with another is an error.
        0: off (the paper).
    calibration_images:
        ``n > 0`` (default 100): ``fit`` scores ``n`` seeded training images leave-one-out (against
        the bank without the entries taken from that image, so they count as unseen) and every map
        then has their mean score by place subtracted (:class:`baselines.calibration.PositionalBaseline`).
        Needs at least 2 training images. ``3cad predict --set calibration_images=0`` ignores a
        fitted correction. 0: off (the paper).
    batch_size, device, seed, block_mb:
        Run-time settings; ``block_mb`` bounds the memory of one distance block.
    """

    name = "patchcore"
    DEFAULT_INPUTS = {"exposure": "mean"}
    #: ``3cad tune``: the resize mode is a property of the dataset (tall or wide frames lose detail
    #: in a 256 x 256 squash), so the validation split chooses it.
    TUNE_GRID = {"resize": ("squash", "aspect")}
    #: Ranges as the parameters above describe them. Inference options (``predict=True``) act only
    #: on a fitted bank: the map smoothing, the image score, the reweighting, ignoring the calibration
    #: (``calibration_images=0``), and run-time settings. Everything else built the bank.
    OPTIONS = {
        "backbone": Option(str),
        "layers": Option(str, many=True),
        "weights": Option(str, null=True),
        "neighbourhood": Option(int, low=1),
        "feature_dim": Option(int, low=1, null=True),
        "coreset_ratio": Option(float, low=0, high=1, open_low=True),
        "max_patches": Option(int, low=1, null=True),
        "coreset_chunk": Option(int, low=1, null=True),
        "projection_dim": Option(int, low=1, null=True),
        "num_neighbors": Option(int, low=1),
        "reweight": Option(bool, predict=True),
        "reweight_neighbors": Option(int, low=1, predict=True),
        "topk": Option(float, low=0, high=1, predict=True),
        "sigma": Option(float, low=0, predict=True),
        "intensity_weight": Option(float, low=0),
        "calibration_images": Option(int, low=0, predict=True),
        "batch_size": Option(int, low=1),
        "device": Option(str, predict=True),
        "seed": Option(int, low=0),
        "block_mb": Option(int, low=1, predict=True),
    }

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] = ("stride8", "stride16"),
        weights: str | None = "default",
        neighbourhood: int = 3,
        feature_dim: int | None = None,
        coreset_ratio: float = 0.1,
        max_patches: int | None = None,
        coreset_chunk: int | None = 20_000,
        projection_dim: int | None = 128,
        num_neighbors: int = 1,
        reweight: bool = False,
        reweight_neighbors: int = 9,
        topk: float = 0.03,
        sigma: float = 4.0,
        intensity_weight: float = 200.0,
        calibration_images: int = 100,
        batch_size: int = 16,
        device: str = "auto",
        seed: int = 0,
        block_mb: int = 64,
    ):
        self.backbone = backbone
        self.layers = list(layers)
        self.weights = weights
        self.neighbourhood = int(neighbourhood)
        self.feature_dim = feature_dim
        self.coreset_ratio = float(coreset_ratio)
        self.max_patches = max_patches
        self.coreset_chunk = coreset_chunk
        self.projection_dim = projection_dim
        self.num_neighbors = int(num_neighbors)
        self.reweight = bool(reweight)
        self.reweight_neighbors = int(reweight_neighbors)
        self.topk = float(topk)
        self.sigma = float(sigma)
        self.intensity_weight = float(intensity_weight)
        self.calibration_images = calibration_images
        self.batch_size = int(batch_size)
        self.device = device
        self.seed = int(seed)
        self.block_mb = int(block_mb)
        # Each option's own range is checked against OPTIONS before __init__ runs (Method.__new__);
        # what is left here relates two options.
        if self.reweight and self.topk > 0:
            raise ThreecadError("reweight scales the single most anomalous patch; it does not combine with topk > 0: "
                                "pass topk=0 with it")
        self.memory_bank: torch.Tensor | None = None
        self.baseline: PositionalBaseline | None = None
        #: The intensity_weight the bank was built with (a bank of another weight can have the same shape).
        self.fitted_intensity_weight: float | None = None
        self._extractor = None

    # ------------------------------------------------------------------ features
    def _device(self) -> torch.device:
        return resolve_device(self.device)

    def _get_extractor(self):
        if self._extractor is None:
            self._extractor = _features.build_extractor(self.backbone, self.layers, self.weights, self._device())
        return self._extractor

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features (B, h, w, D) of images (B, 3, H, W) in [0, 1]."""
        return embed_patches(self._get_extractor(), images.to(self._device()), self.layers, self.neighbourhood,
                             self.feature_dim, self.intensity_weight)

    # ------------------------------------------------------------------ fit
    def fit(self, train_set, val_set=None) -> PatchCore:
        chunks, grids = [], []
        for images, _ in iter_batches(train_set, self.batch_size, desc="patchcore features"):
            embedded = self.embed(images)
            grids += [tuple(embedded.shape[1:3])] * len(embedded)
            chunks.append(embedded.reshape(-1, embedded.shape[-1]).cpu())
        if not chunks:
            raise ThreecadError("PatchCore.fit got no training images")
        patches = torch.cat(chunks)
        del chunks
        origin = torch.repeat_interleave(torch.arange(len(grids)), torch.tensor([h * w for h, w in grids]))
        held = self._calibration_patches(patches, grids)
        if self.max_patches is not None and len(patches) > self.max_patches:
            generator = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(len(patches), generator=generator)[: int(self.max_patches)].sort().values
            log.info("patchcore: random subset of %d of %d training patches", len(keep), len(patches))
            patches, origin = patches[keep], origin[keep]
        target = max(1, round(self.coreset_ratio * len(patches)))
        log.info("patchcore: %d training patches of dim %d -> bank of %d", len(patches), patches.shape[1], target)
        if target < len(patches):
            index = chunked_greedy_coreset(patches.to(self._device()), target, self.coreset_chunk,
                                           self.projection_dim, self.seed).cpu()
            patches, origin = patches[index], origin[index]
        self.memory_bank = patches.contiguous()
        self.fitted_intensity_weight = self.intensity_weight
        self.baseline = self._leave_one_out_baseline(held, origin) if held else None
        return self

    def _calibration_patches(self, patches: torch.Tensor, grids: list[tuple[int, int]]) -> list:
        """(image index, its patches, its grid) of the seeded calibration images; copies, so the
        full patch tensor can be freed once the bank is chosen."""
        if not self.calibration_images:
            return []
        if len(grids) < 2:
            raise ThreecadError("calibration_images needs at least 2 training images (each is scored against the "
                                "others); pass calibration_images=0 to fit on one image")
        chosen = torch.randperm(len(grids), generator=torch.Generator().manual_seed(self.seed + 1))
        chosen = chosen[: self.calibration_images].sort().values.tolist()
        starts = np.cumsum([0] + [h * w for h, w in grids])
        return [(i, patches[starts[i] : starts[i + 1]].clone(), grids[i]) for i in chosen]

    def _leave_one_out_baseline(self, held: list, origin: torch.Tensor) -> PositionalBaseline:
        """Each calibration image scored without its own bank entries, then their mean by place."""
        bank = self._bank()
        origin = origin.to(bank.device)
        maps = []
        for index, feats, (h, w) in progress(held, desc="patchcore calibration"):
            others = bank[origin != index]
            if len(others) == 0:
                raise ThreecadError("every memory-bank entry comes from one image: calibration needs a bank from "
                                    "several images")
            dist, _ = nearest_neighbors(feats.to(bank.device), others, self.num_neighbors, self.block_mb * 2**20)
            maps.append(dist.mean(1).reshape(h, w).cpu())
        baseline = PositionalBaseline.fit(maps)
        log.info("patchcore: positional baseline from %d images spans %.3g", len(held), baseline.span)
        return baseline

    # ------------------------------------------------------------------ predict
    def _bank(self) -> torch.Tensor:
        if self.memory_bank is None:
            raise ThreecadError("PatchCore is not fitted: call fit() or load a saved run")
        device = self._device()
        if self.memory_bank.device != device:
            self.memory_bank = self.memory_bank.to(device)
        return self.memory_bank

    def inference_module(self) -> PatchCoreInference:
        """The fitted bank's predict as one module (:class:`PatchCoreInference`)."""
        bank = self._bank()
        if self.intensity_weight != self.fitted_intensity_weight:
            raise ThreecadError(f"this PatchCore was fitted with intensity_weight={self.fitted_intensity_weight:g}, "
                                f"not {self.intensity_weight:g}: the bank was built with that value; predict with "
                                "the fitted value")
        if self.calibration_images and self.baseline is None:
            raise ThreecadError("this PatchCore was fitted without calibration: fit again with calibration_images > 0, "
                                "or predict with calibration_images=0")
        return PatchCoreInference(self, bank)

    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ThreecadError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        return self.run_inference(images.to(self._device()))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.memory_bank is None:
            raise ThreecadError("PatchCore is not fitted: nothing to save")
        state = {"memory_bank": self.memory_bank.detach().cpu(),
                 "intensity_weight": torch.tensor(self.fitted_intensity_weight, dtype=torch.float64)}
        if self.baseline is not None:
            state.update(self.baseline.state_dict())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "memory_bank" not in state or state["memory_bank"].ndim != 2:
            raise ThreecadError("PatchCore weights must hold a 2-D 'memory_bank' tensor")
        weight = state.get("intensity_weight")
        if weight is None or weight.numel() != 1:
            raise ThreecadError("PatchCore weights must hold the bank's 'intensity_weight' as one number (a run saved "
                                "by threecad before 0.1 lacks it: fit it again)")
        self.memory_bank = state["memory_bank"].float()
        self.fitted_intensity_weight = float(weight)
        self.baseline = PositionalBaseline.from_state(state)
