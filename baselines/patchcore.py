"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Normal images are described by a memory bank of locally aggregated mid-level patch features; a test
patch is as anomalous as its distance to the nearest bank entry. The pieces live in small modules:
:mod:`baselines.aggregation` (3x3 neighbourhood averaging, stage fusion, map smoothing),
:mod:`baselines.coreset` (greedy k-center subsampling of the bank) and :mod:`baselines.knn`
(nearest-neighbour search in blocks of bounded memory).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from baselines import features as _features
from baselines.aggregation import combine_stages, local_aggregate
from baselines.coreset import chunked_greedy_coreset
from baselines.knn import nearest_neighbors
from threecad.device import resolve_device
from threecad.errors import ThreecadError
from threecad.methods import Method, Option, iter_batches, register
from threecad.postprocess import top_fraction_mean, upsample_maps
from threecad.progress import progress

log = logging.getLogger(__name__)

#: Border distances (in patch cells) the calibration of mixed grid sizes tells apart; farther cells
#: share one value. 8 cells is 64 px at stride 8, where the magnetic-tile bias has faded.
BORDER_CELLS = 8


#: Settings a bank depends on, saved with it; predicting with other values is an error. The defaults
#: are what runs saved before the setting existed were fitted with. Another value of either can
#: leave the feature dimension unchanged, so the bank's shape alone would not catch it.
FITTED_DEFAULTS = {"intensity_weight": 0.0, "input_scale": 1.0}


def border_distances(grid: tuple[int, int], limit: int = BORDER_CELLS) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance of each row (column) of a ``grid`` to the nearer top/bottom (left/right) border, at most ``limit``."""
    rows, cols = (torch.minimum(torch.arange(n), torch.arange(n).flip(0)).clamp(max=limit) for n in grid)
    return rows, cols


def border_table(maps: list[torch.Tensor], limit: int = BORDER_CELLS) -> torch.Tensor:
    """Mean of ``maps`` (each (h, w), any sizes) per (row, column) border distance: (limit + 1, limit + 1).

    A pair of distances no map reaches (a grid narrower than ``2 * limit`` cells everywhere) takes
    the value of the nearest pair that was seen, so any grid can be looked up.
    """
    total = torch.zeros(limit + 1, limit + 1, dtype=torch.float64)
    count = torch.zeros_like(total)
    for m in maps:
        rows, cols = border_distances(tuple(m.shape), limit)
        index = (rows[:, None] * (limit + 1) + cols[None, :]).flatten()
        total.view(-1).index_add_(0, index, m.flatten().double())
        count.view(-1).index_add_(0, index, torch.ones(index.numel(), dtype=torch.float64))
    seen = count > 0
    table = torch.where(seen, total / count.clamp(min=1), torch.zeros_like(total))
    if not seen.all():
        pairs = seen.nonzero().double()
        for a, b in (~seen).nonzero().tolist():
            nearest = pairs[(pairs - torch.tensor([a, b], dtype=torch.float64)).abs().sum(1).argmin()].long()
            table[a, b] = table[nearest[0], nearest[1]]
    return table.float()


def rescale(images: torch.Tensor, factor: float) -> torch.Tensor:
    """``images`` (B, C, H, W) resized by ``factor`` (bilinear, antialiased when shrinking); 1: unchanged."""
    if factor == 1.0:
        return images
    size = (max(1, round(images.shape[-2] * factor)), max(1, round(images.shape[-1] * factor)))
    return F.interpolate(images.float(), size=size, mode="bilinear", antialias=factor < 1, align_corners=False)


def local_brightness(images: torch.Tensor, grid: tuple[int, int], neighbourhood: int) -> torch.Tensor:
    """(B, h, w, 1) mean grey level of ``images`` (B, 3, H, W) over each cell of an ``h x w`` grid,
    then over the same ``neighbourhood`` window as the deep features (:func:`local_aggregate`)."""
    grey = F.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), grid)
    return local_aggregate(grey, neighbourhood).permute(0, 2, 3, 1)


@register
class PatchCore(Method):
    """Memory-bank anomaly detector.

    Parameters
    ----------
    backbone, layers, weights:
        Feature extractor (:mod:`threecad.backbones`); layers by name or output stride.
    neighbourhood:
        Side of the local averaging window (3 in the paper; 1 disables it).
    balance_stages:
        Weigh every backbone stage equally in the patch distance, as the paper's per-layer pooling to
        a common dimension does (:func:`baselines.aggregation.combine_stages`); ``False`` concatenates
        the raw channels, so the widest stage dominates.
    feature_dim:
        Reduce the fused channels to this many by averaging adjacent channels (the paper's 1024 for
        WRN50); ``None`` keeps them all.
    coreset_ratio:
        Fraction of training patches kept in the bank (greedy k-center); 1.0 keeps all of them.
    max_bank:
        Upper bound on the bank size after subsampling (``None``: no bound).
    max_patches:
        Seeded random subset of the training patches the coreset starts from (``None``: all). Greedy
        k-center costs one pass over all candidates per selected entry, so this bounds fit time on
        large training sets; the coreset ratio applies to the patches kept.
    coreset_chunk:
        Run the greedy selection on chunks of this many patches (whole images), each keeping
        ``coreset_ratio`` of its patches (:func:`baselines.coreset.chunked_greedy_coreset`): ``c``
        chunks cost ``1 / c`` of one global pass, so with ``max_patches=None`` every training patch
        is a candidate at a fit time that grows linearly with the data (memory still holds all of
        them: patches x channels floats). ``None``: one global pass.
    projection_dim:
        Random-projection dimension used for the coreset distances.
    num_neighbors:
        Patch score = mean distance to this many nearest bank entries (1 in the paper).
    reweight, reweight_neighbors:
        The paper's image-score reweighting by the density of the bank around the nearest entry.
    topk:
        0 (the paper): the image score is the largest patch score. A fraction in (0, 1]: the mean of
        the highest ``topk`` share of the smoothed map's pixels instead (0.03 chosen on magnetic-tile
        validation data, see ``docs/methods.md``); ``reweight`` then does not apply.
    sigma:
        Gaussian smoothing of the full-resolution maps.
    intensity_weight:
        Deep features barely change under a gentle change of brightness, so the inside of a large,
        faint defect (uneven grinding, a worn area, a stain) looks normal and only its rim scores;
        pixel-level AUROC, which pools every pixel, is dominated by such regions. With ``w > 0`` every
        patch gets one more feature, ``w`` times the mean grey level of the input under it
        (averaged over the same ``neighbourhood`` as the deep features), so its nearest bank entry
        must match both texture and brightness. The scale matters: features of the Lite0 taps lie
        about 13-20 from their nearest bank entry, grey levels lie in [0, 1] (about 0.45 after
        ``--exposure mean``), so with ``w = 200`` (chosen on magnetic-tile validation data,
        ``docs/methods.md``) a 10 % brightness change adds 9, about half a typical distance.
        The fitted value is saved with the bank; predicting with another is an error. 0: off (the paper).
    scales:
        Input scales, each with its own bank and calibration (``[1.0]``: the paper). A faint defect
        larger than the backbone's receptive field looks normal at full scale except near its rim;
        a half-scale copy of the input sees it whole. With several scales, each scale's
        full-resolution map is divided by the spread (standard deviation) of its calibration
        images' leave-one-out patch scores, so that a unit means the same at every scale, and the
        maps are averaged; image scores come from the average. Needs ``calibration_images > 0``
        and costs one bank and one nearest-neighbour search per scale. A single scale other than 1
        just resizes the input.
    calibration_images:
        Normal patches are not equally far from the bank everywhere: on magnetic tiles, held-out
        normal images score about 50 % higher near the image border than in the middle, and those
        border scores outrank real defects. With ``n > 0``, ``fit`` scores ``n`` seeded training
        images leave-one-out (against the bank without the entries taken from that image, so they
        count as unseen), averages their patch-score maps per position, and every map then has that
        average subtracted, centred on zero so the overall level stays. Image scores come from the
        corrected maps. Mixed input sizes (``--resize aspect``, native) average by distance to the
        border instead of by position (:func:`border_table`). 0: off (the paper).
        ``3cad predict --set calibration_images=0`` ignores a fitted correction.
    batch_size, device, seed, block_mb:
        Run-time settings; ``block_mb`` bounds the memory of one distance block.
    """

    name = "patchcore"
    #: Ranges as the parameters above describe them. Inference options (``predict=True``) act only
    #: on a fitted bank: the map smoothing, the image score, the reweighting, ignoring the calibration
    #: (``calibration_images=0``), and run-time settings. Everything else built the bank.
    OPTIONS = {
        "backbone": Option(str),
        "layers": Option(str, many=True),
        "weights": Option(str, null=True),
        "neighbourhood": Option(int, low=1),
        "balance_stages": Option(bool),
        "feature_dim": Option(int, low=1, null=True),
        "coreset_ratio": Option(float, low=0, high=1, open_low=True),
        "max_bank": Option(int, low=1, null=True),
        "max_patches": Option(int, low=1, null=True),
        "coreset_chunk": Option(int, low=1, null=True),
        "projection_dim": Option(int, low=1, null=True),
        "num_neighbors": Option(int, low=1),
        "reweight": Option(bool, predict=True),
        "reweight_neighbors": Option(int, low=1, predict=True),
        "topk": Option(float, low=0, high=1, predict=True),
        "sigma": Option(float, low=0, predict=True),
        "intensity_weight": Option(float, low=0),
        "scales": Option(float, low=0, high=4, open_low=True, many=True, unique=True),
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
        balance_stages: bool = False,
        feature_dim: int | None = None,
        coreset_ratio: float = 0.1,
        max_bank: int | None = None,
        max_patches: int | None = 200_000,
        coreset_chunk: int | None = None,
        projection_dim: int | None = 128,
        num_neighbors: int = 1,
        reweight: bool = False,
        reweight_neighbors: int = 9,
        topk: float = 0.0,
        sigma: float = 4.0,
        intensity_weight: float = 0.0,
        scales: Sequence[float] = (1.0,),
        calibration_images: int = 0,
        batch_size: int = 16,
        device: str = "auto",
        seed: int = 0,
        block_mb: int = 64,
    ):
        self.backbone = backbone
        self.layers = list(layers)
        self.weights = weights
        self.neighbourhood = int(neighbourhood)
        self.balance_stages = bool(balance_stages)
        self.feature_dim = feature_dim
        self.coreset_ratio = float(coreset_ratio)
        self.max_bank = max_bank
        self.max_patches = max_patches
        self.coreset_chunk = coreset_chunk
        self.projection_dim = projection_dim
        self.num_neighbors = int(num_neighbors)
        self.reweight = bool(reweight)
        self.reweight_neighbors = int(reweight_neighbors)
        self.topk = float(topk)
        self.sigma = float(sigma)
        self.intensity_weight = float(intensity_weight)
        self.scales = [float(f) for f in scales]
        self.calibration_images = calibration_images
        self.batch_size = int(batch_size)
        self.device = device
        self.seed = int(seed)
        self.block_mb = int(block_mb)
        # Each option's own range is checked against OPTIONS before __init__ runs (Method.__new__);
        # what is left here relates two options.
        if self.reweight and self.topk > 0:
            raise ThreecadError("reweight scales the single most anomalous patch; it does not combine with topk > 0")
        if len(self.scales) > 1 and not calibration_images:
            raise ThreecadError("several scales need calibration_images > 0: each scale's map is divided by the spread "
                                "of its calibration scores before they are averaged")
        if len(self.scales) > 1 and self.reweight:
            raise ThreecadError("reweight scales one bank's most anomalous patch; it does not combine with several scales")
        self.memory_bank: torch.Tensor | None = None
        self.position_baseline: torch.Tensor | None = None
        self.border_baseline: torch.Tensor | None = None
        self.calibration_spread: float | None = None
        self.fitted: dict[str, float] = dict(FITTED_DEFAULTS)  # settings the bank was built with (see FITTED_DEFAULTS)
        self._extractor = None
        self._parts: list[PatchCore] | None = None  # one single-scale PatchCore per scale (several scales)

    # ------------------------------------------------------------------ features
    def _device(self) -> torch.device:
        return resolve_device(self.device)

    def _get_extractor(self):
        if self._extractor is None:
            self._extractor = _features.build_extractor(self.backbone, self.layers, self.weights, self._device())
        return self._extractor

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features (B, h, w, D) of images (B, 3, H, W) in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ThreecadError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if len(self.scales) > 1:
            raise ThreecadError("embed works on one scale; with several scales each part embeds its own copy")
        images = rescale(images, self.scales[0])
        maps = _features.extract(self._get_extractor(), images.to(self._device()), self.layers)
        fused = combine_stages([m.float() for m in maps], self.neighbourhood, self.balance_stages)
        b, c, h, w = fused.shape
        fused = fused.permute(0, 2, 3, 1)
        if self.feature_dim is not None and c > self.feature_dim:
            fused = F.adaptive_avg_pool1d(fused.reshape(-1, 1, c), self.feature_dim).reshape(b, h, w, -1)
        if self.intensity_weight > 0:
            fused = torch.cat([fused, self.intensity_weight * local_brightness(images, (h, w), self.neighbourhood)
                               .to(fused.device)], dim=-1)
        return fused.contiguous()

    # ------------------------------------------------------------------ fit
    def fit(self, train_set, val_set=None) -> PatchCore:
        if len(self.scales) > 1:
            for factor, part in zip(self.scales, self._scale_parts()):
                log.info("patchcore: fitting input scale %g", factor)
                part.fit(train_set)
            return self
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
        if self.max_bank is not None:
            target = min(target, int(self.max_bank))
        log.info("patchcore: %d training patches of dim %d -> bank of %d", len(patches), patches.shape[1], target)
        if target < len(patches):
            index = chunked_greedy_coreset(patches.to(self._device()), target, self.coreset_chunk,
                                           self.projection_dim, self.seed).cpu()
            patches, origin = patches[index], origin[index]
        self.memory_bank = patches.contiguous()
        self.fitted = self._bank_settings()
        self.position_baseline = self.border_baseline = None
        if held:
            self._leave_one_out_baseline(held, origin)
        return self

    def _calibration_patches(self, patches: torch.Tensor, grids: list[tuple[int, int]]) -> list:
        """(image index, its patches, its grid) of the seeded calibration images; copies, so the
        full patch tensor can be freed once the bank is chosen."""
        if not self.calibration_images:
            return []
        if len(grids) < 2:
            raise ThreecadError("calibration_images needs at least 2 training images (each is scored against the others)")
        chosen = torch.randperm(len(grids), generator=torch.Generator().manual_seed(self.seed + 1))
        chosen = chosen[: self.calibration_images].sort().values.tolist()
        starts = np.cumsum([0] + [h * w for h, w in grids])
        return [(i, patches[starts[i] : starts[i + 1]].clone(), grids[i]) for i in chosen]

    def _leave_one_out_baseline(self, held: list, origin: torch.Tensor) -> None:
        """Mean patch-score map of the calibration images, each scored without its own bank entries.

        One grid (squashed input): a map with one value per grid cell (``position_baseline``).
        Several grids (``--resize aspect`` or native sizes): cell ``(i, j)`` of one image and of
        another lie at different relative places, while the bias measured on magnetic tiles sits at
        a fixed distance from the border. So the scores are averaged by distance to the nearest
        top/bottom and left/right border instead, each clipped to :data:`BORDER_CELLS`
        (``border_baseline``), and any grid looks its cells up there. Centred on the mean
        calibration score: only the differences between positions matter.
        """
        bank = self._bank()
        origin = origin.to(bank.device)
        maps = []
        for index, feats, (h, w) in progress(held, desc="patchcore calibration"):
            others = bank[origin != index]
            if len(others) == 0:
                raise ThreecadError("every memory-bank entry comes from one image: calibration needs a bank from several images")
            dist, _ = nearest_neighbors(feats.to(bank.device), others, self.num_neighbors, self.block_mb * 2**20)
            maps.append(dist.mean(1).reshape(h, w).cpu())
        scores = torch.cat([m.flatten() for m in maps])
        level, self.calibration_spread = float(scores.mean()), float(scores.std())
        if len({tuple(m.shape) for m in maps}) == 1:
            self.position_baseline, self.border_baseline = torch.stack(maps).mean(0) - level, None
            spread = self.position_baseline
        else:
            self.position_baseline, self.border_baseline = None, border_table(maps, BORDER_CELLS) - level
            spread = self.border_baseline
        log.info("patchcore: positional baseline from %d images spans %.3g (mean patch score %.3g)",
                 len(held), float(spread.max() - spread.min()), level)

    # ------------------------------------------------------------------ predict
    def _bank(self) -> torch.Tensor:
        if self.memory_bank is None:
            raise ThreecadError("PatchCore is not fitted: call fit() or load a saved run")
        device = self._device()
        if self.memory_bank.device != device:
            self.memory_bank = self.memory_bank.to(device)
        return self.memory_bank

    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        image_scores, maps = self._predict(images)
        return image_scores.float().cpu().numpy(), maps.cpu().numpy().astype(np.float32)

    def _predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.scales) > 1:
            parts = self._scale_parts()
            maps = sum(part._predict(images)[1] / part._spread() for part in parts) / len(parts)
            return top_fraction_mean(maps, self.topk), maps
        bank = self._bank()
        for key, value in self._bank_settings().items():
            if value != self.fitted[key]:
                raise ThreecadError(f"this PatchCore was fitted with {key}={self.fitted[key]:g}, not {value:g}: the "
                                    "bank was built with that value; predict with the fitted value")
        patches = self.embed(images)
        b, h, w, d = patches.shape
        if d != bank.shape[1]:
            raise ThreecadError(f"feature dimension {d} differs from the memory bank's {bank.shape[1]}: predict with the "
                                "backbone, layers and feature_dim the run was fitted with")
        flat = patches.reshape(-1, d)
        dist, index = nearest_neighbors(flat, bank, self.num_neighbors, self.block_mb * 2**20)
        scores = dist.mean(1).reshape(b, h, w)
        if self.calibration_images:
            scores = scores - self._baseline((h, w), scores.device)
        scores = scores.reshape(b, h * w)
        best = scores.argmax(1)
        image_scores = scores.gather(1, best[:, None])[:, 0]
        if self.reweight:
            image_scores = image_scores * self._reweight(flat.reshape(b, h * w, d), best, index.reshape(b, h * w, -1))
        maps = upsample_maps(scores.reshape(b, h, w), tuple(images.shape[-2:]), self.sigma)
        if self.topk > 0:
            image_scores = top_fraction_mean(maps, self.topk)
        return image_scores, maps

    def _bank_settings(self) -> dict[str, float]:
        """The configured values of :data:`FITTED_DEFAULTS`' settings."""
        return {"intensity_weight": self.intensity_weight, "input_scale": self.scales[0]}

    def _spread(self) -> float:
        if self.calibration_spread is None or not self.calibration_spread > 0:
            raise ThreecadError("this PatchCore scale has no calibration spread: fit again with calibration_images > 0")
        return self.calibration_spread

    def _scale_parts(self) -> list[PatchCore]:
        """One single-scale PatchCore per entry of ``scales``, configured like this one, sharing its backbone
        (built on first use). Their own image scores are not used, so they take the cheap maximum."""
        if self._parts is None:
            config = {**self.get_config(), "topk": 0.0}
            self._parts = [PatchCore(**{**config, "scales": [factor]}) for factor in self.scales]
            for part in self._parts:
                part._get_extractor = self._get_extractor
        return self._parts

    def _baseline(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        if self.border_baseline is not None:
            rows, cols = border_distances(grid, len(self.border_baseline) - 1)
            return self.border_baseline.to(device)[rows[:, None].to(device), cols[None, :].to(device)]
        if self.position_baseline is None:
            raise ThreecadError("this PatchCore was fitted without calibration: fit again with calibration_images > 0, "
                                "or predict with calibration_images=0")
        return upsample_maps(self.position_baseline.to(device)[None], grid, 0.0)[0]

    def _reweight(self, patches: torch.Tensor, best: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Weight 1 - exp(d(m_test, m*)) / sum_{m in N_b(m*)} exp(d(m_test, m)) of the paper (eq. 7).

        ``m_test`` is the image's most anomalous patch, ``m*`` its nearest bank entry and ``N_b(m*)``
        is ``m*`` with its ``reweight_neighbors`` nearest bank entries. Computed as a softmax for
        stability. Since ``m*`` is the nearest entry, the weight lies in [b / (b + 1), 1): near 1 when the
        rest of the neighbourhood is far from ``m_test`` (``m*`` is a rare pattern), lower when dense.
        """
        bank = self._bank()
        rows = torch.arange(len(best), device=patches.device)
        m_test = patches[rows, best]  # (B, D)
        m_star = bank[index[rows, best, 0]]  # (B, D)
        _, hood = nearest_neighbors(m_star, bank, self.reweight_neighbors + 1, self.block_mb * 2**20)
        dists = torch.cdist(m_test[:, None], bank[hood])[:, 0]  # (B, b+1); column 0 is m* itself
        return 1.0 - torch.softmax(dists, dim=1)[:, 0]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        if len(self.scales) > 1:
            if self._parts is None:
                raise ThreecadError("PatchCore is not fitted: nothing to save")
            return {f"scale{i}.{key}": value for i, part in enumerate(self._parts)
                    for key, value in part.state_dict().items()}
        if self.memory_bank is None:
            raise ThreecadError("PatchCore is not fitted: nothing to save")
        state = {"memory_bank": self.memory_bank.detach().cpu(),
                 **{key: torch.tensor(value, dtype=torch.float64) for key, value in self.fitted.items()}}
        for key in ("position_baseline", "border_baseline"):
            if getattr(self, key) is not None:
                state[key] = getattr(self, key).detach().cpu()
        if self.calibration_spread is not None:
            state["calibration_spread"] = torch.tensor(self.calibration_spread, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        saved_scales = {key.split(".", 1)[0] for key in state if re.match(r"scale\d+\.", key)}
        if len(self.scales) > 1 or saved_scales:
            if len(saved_scales) != len(self.scales) or "memory_bank" in state:
                raise ThreecadError(f"the weights hold {len(saved_scales) or 1} scale(s), the configuration "
                                    f"{len(self.scales)} ({self.scales}): predict with the scales the run was fitted with")
            for i, part in enumerate(self._scale_parts()):
                prefix = f"scale{i}."
                part.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            return
        if "memory_bank" not in state or state["memory_bank"].ndim != 2:
            raise ThreecadError("PatchCore weights must hold a 2-D 'memory_bank' tensor")
        self.memory_bank = state["memory_bank"].float()
        numbers = {key: state.get(key, torch.tensor(default)) for key, default in FITTED_DEFAULTS.items()}
        spread = state.get("calibration_spread")
        if spread is not None:
            numbers["calibration_spread"] = spread
        for key, value in numbers.items():
            if value.numel() != 1:
                raise ThreecadError(f"PatchCore {key!r} must be a single number")
        self.fitted = {key: float(numbers[key]) for key in FITTED_DEFAULTS}
        self.calibration_spread = None if spread is None else float(spread)
        for key in ("position_baseline", "border_baseline"):
            baseline = state.get(key)
            if baseline is not None and baseline.ndim != 2:
                raise ThreecadError(f"PatchCore {key!r} must be a 2-D tensor")
            if key == "border_baseline" and baseline is not None and baseline.shape[0] != baseline.shape[1]:
                raise ThreecadError("PatchCore 'border_baseline' must be square (one row and column per border distance)")
            setattr(self, key, None if baseline is None else baseline.float())
