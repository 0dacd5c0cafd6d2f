"""Exact threshold-free metrics from per-threshold counts, without sorting every pixel together.

Every metric here is a function of the curve swept by a threshold ``t`` over the scores. Between two
consecutive distinct *anomalous* scores the true-positive count (and the PRO) is constant, so the
whole curve is known once, for each distinct anomalous score ``a``, we know:

* ``count`` / ``weight``: how many anomalous pixels score exactly ``a`` (and their PRO weight,
  ``1 / |component|`` summed; see :mod:`threecad.metrics.pro`);
* ``below`` / ``below_eq``: how many normal pixels score ``< a`` and ``<= a``.

Normal pixels are never needed individually: a histogram (float16) or one sorted array of compact
integer keys (wider floats) answers ``below``/``below_eq``. Scores are compared through
order-preserving integer keys of their bit patterns, so ties are exact and no value is rounded.

Conventions (identical to scikit-learn and the official MVTec AD script):
ROC AUC with ties counted one half; step-wise average precision; F1-max over all thresholds;
AU-PRO integrated by the trapezoid rule up to FPR 0.3 with linear interpolation there, divided by 0.3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_INT = {2: np.int16, 4: np.int32, 8: np.int64}
_FLOAT = {2: np.float16, 4: np.float32, 8: np.float64}


def float_keys(values: np.ndarray) -> np.ndarray:
    """Signed integer keys whose order is the float order (``-0.0`` and ``+0.0`` share one key).

    IEEE floats are sign-magnitude: as signed integers, non-negative floats already sort correctly
    and negative ones sort backwards; flipping every bit but the sign of the negative ones fixes
    that. Integer operations only (float16 arithmetic is slow in numpy). torch uses the same keys
    (:func:`threecad.metrics.pixels.torch_keys`). NaN and inf get keys outside
    ``(key(-inf), key(inf))``: see :func:`keys_finite`.
    """
    values = np.asarray(values)
    if values.dtype not in (np.float16, np.float32, np.float64):
        values = values.astype(np.float64)
    bits = values.view(_INT[values.dtype.itemsize])
    keys = bits >> (8 * bits.itemsize - 1)  # -1 for negative floats, 0 otherwise
    keys &= np.iinfo(bits.dtype).max
    keys ^= bits
    keys[keys == -1] = 0  # -0.0 (the only float whose key is -1) equals +0.0
    return keys


def keys_finite(key_min: int, key_max: int, itemsize: int) -> bool:
    """Whether keys in [key_min, key_max] are all finite floats (NaN and inf lie at or beyond inf's key)."""
    inf = int(np.array(np.inf, dtype=_FLOAT[itemsize]).view(_INT[itemsize]))
    return -inf - 1 < key_min and key_max < inf


def keys_to_float(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float_keys` (the bit flip is its own inverse)."""
    keys = np.array(keys, copy=True)
    flip = keys >> (8 * keys.itemsize - 1)
    flip &= np.iinfo(keys.dtype).max
    keys ^= flip
    return keys.view(_FLOAT[keys.itemsize])


@dataclass
class RankStats:
    """What every metric needs, for the distinct anomalous scores in ascending order."""

    n_normal: int
    below: np.ndarray  # int64: normal samples scoring < a
    below_eq: np.ndarray  # int64: normal samples scoring <= a
    count: np.ndarray  # int64: anomalous samples scoring == a
    weight: np.ndarray | None = None  # float64: summed PRO weights of those samples
    n_components: int = 0

    @property
    def n_anomalous(self) -> int:
        return int(self.count.sum())


def stats_from_scores(scores: np.ndarray, labels: np.ndarray) -> RankStats:
    """RankStats of a small set of scores (image level) by sorting; exact for any float dtype."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    keys = float_keys(scores)
    normal = np.sort(keys[~labels])
    anomalous, count = np.unique(keys[labels], return_counts=True)
    return RankStats(
        n_normal=int(normal.size),
        below=np.searchsorted(normal, anomalous, side="left").astype(np.int64),
        below_eq=np.searchsorted(normal, anomalous, side="right").astype(np.int64),
        count=count.astype(np.int64),
    )


def auroc(stats: RankStats) -> float | None:
    """ROC AUC = P(anomalous > normal) + P(equal) / 2; None when a class is empty."""
    return Sweep.of(stats).auroc()


def average_precision(stats: RankStats) -> float | None:
    """Step-wise AP (sum of precision times recall increments); None without anomalous samples."""
    return Sweep.of(stats).average_precision()


def f1_max(stats: RankStats) -> float | None:
    """Best F1 over all thresholds; the optimum sits at a distinct anomalous score."""
    return Sweep.of(stats).f1_max()


def aupro(stats: RankStats, fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the PRO curve up to ``fpr_limit``; None without normals or regions."""
    return Sweep.of(stats, fpr_limit=fpr_limit).aupro()


class Sweep:
    """Every metric of one score set from :class:`RankStats` *slices*, fed from the highest scores down.

    The threshold sweeps from the top score downwards, so each slice only needs what the slices
    above it left behind: the true-positive count and the summed PRO weight so far, and the last
    vertex of the ROC and PRO polylines. Feeding all distinct anomalous scores as one slice or as
    many gives the same curves (integer counts are exact; the PRO cumulative sum runs on from its
    carry in the same order), so a caller can stream any number of distinct scores in bounded memory.

    ``n_normal``, ``n_anomalous`` and ``n_components`` are the totals over all slices (known before
    the sweep: FPR and precision need them). ``curve_points > 0`` also samples the ROC (FPR in
    [0, 1]) and PRO (FPR in [0, fpr_limit]) curves at that many evenly spaced FPR values, keeping only
    the polyline vertices that bracket a sample.
    """

    def __init__(
        self,
        n_normal: int,
        n_anomalous: int,
        n_components: int = 0,
        fpr_limit: float = 0.3,
        curve_points: int = 0,
    ):
        self.n_normal, self.n_anomalous, self.n_components = int(n_normal), int(n_anomalous), int(n_components)
        self.fpr_limit = float(fpr_limit)
        self._tp = 0  # anomalous samples at or above the lowest score fed so far
        self._weight = 0.0  # their summed PRO weight
        self._wins = 0.0
        self._ap = 0.0
        self._f1 = 0.0
        self._pro_area = 0.0
        self._roc_last = (0.0, 0.0)
        self._pro_last = (0.0, 0.0)
        self._finished = False
        self._has_pro = False
        sample = curve_points > 0 and self.n_normal > 0 and self.n_anomalous > 0
        self._roc_sampler = _CurveSampler(1.0, curve_points) if sample else None
        self._pro_sampler = _CurveSampler(self.fpr_limit, curve_points) if sample and self.n_components else None

    @classmethod
    def of(cls, stats: RankStats, fpr_limit: float = 0.3, curve_points: int = 0) -> Sweep:
        """The sweep of one complete :class:`RankStats` (a single slice)."""
        sweep = cls(stats.n_normal, stats.n_anomalous, stats.n_components, fpr_limit, curve_points)
        sweep.add(stats)
        return sweep

    def add(self, stats: RankStats) -> None:
        """One slice: consecutive distinct anomalous scores, ascending, all below the previous slices'."""
        if self._finished:
            raise ValueError("the sweep is finished; no more slices")
        if stats.count.size == 0:
            return
        self._wins += float(
            np.dot(stats.count.astype(np.float64), stats.below.astype(np.float64))
            + 0.5 * np.dot(stats.count.astype(np.float64), (stats.below_eq - stats.below).astype(np.float64))
        )
        count = stats.count[::-1].astype(np.float64)
        tp = self._tp + np.cumsum(stats.count[::-1])
        self._tp = int(tp[-1])
        tp = tp.astype(np.float64)
        fp_ge = self.n_normal - stats.below[::-1].astype(np.float64)
        fp_gt = self.n_normal - stats.below_eq[::-1].astype(np.float64)
        self._ap += float(np.sum(count * (tp / (tp + fp_ge))))
        self._f1 = max(self._f1, float(np.max(2.0 * tp / (tp + fp_ge + self.n_anomalous))))
        if self.n_normal == 0:
            return
        x_before, x_at = fp_gt / self.n_normal, fp_ge / self.n_normal
        if self._roc_sampler is not None:
            self._roc_last = self._extend(self._roc_last, x_before, x_at, tp / self.n_anomalous, self._roc_sampler)
        if self.n_components and stats.weight is not None:
            self._has_pro = True
            # cumsum from the carry: the same additions in the same order as one cumsum over all slices
            summed = np.cumsum(np.concatenate(([self._weight], stats.weight[::-1])))[1:]
            self._weight = float(summed[-1])
            self._pro_last = self._extend(
                self._pro_last, x_before, x_at, summed / self.n_components, self._pro_sampler, area=True
            )

    def _extend(self, last, x_before, x_at, y_at, sampler, area: bool = False) -> tuple[float, float]:
        """Append vertices (x just above each score, previous y), (x at it, new y); returns the last vertex.

        Thresholds between two anomalous scores only move x at constant y, so those intermediate
        points lie on the horizontal segments and dropping them changes no area.
        """
        m = x_at.size
        x = np.empty(2 * m + 1)
        y = np.empty(2 * m + 1)
        x[0], y[0] = last
        x[1::2] = x_before
        x[2::2] = x_at
        y[1] = last[1]
        y[3::2] = y_at[:-1]
        y[2::2] = y_at
        if area and x[0] < self.fpr_limit:
            self._pro_area += trapezoid_to(x, y, self.fpr_limit)
        if sampler is not None:
            sampler.add(x[1:], y[1:])
        return float(x[-1]), float(y[-1])

    def _finish(self) -> None:
        """Close both polylines at FPR 1 (last y held), once, before any result is read."""
        if self._finished:
            return
        self._finished = True
        if self.n_normal == 0:
            return
        one = np.ones(1)
        if self._roc_sampler is not None:
            self._roc_sampler.add(one, np.array([self._roc_last[1]]))
        if self._has_pro:
            x = np.array([self._pro_last[0], 1.0])
            y = np.array([self._pro_last[1], self._pro_last[1]])
            if x[0] < self.fpr_limit:
                self._pro_area += trapezoid_to(x, y, self.fpr_limit)
            if self._pro_sampler is not None:
                self._pro_sampler.add(one, y[1:])

    def auroc(self) -> float | None:
        """ROC AUC = P(anomalous > normal) + P(equal) / 2; None when a class is empty."""
        if self.n_normal == 0 or self.n_anomalous == 0:
            return None
        return self._wins / (float(self.n_anomalous) * float(self.n_normal))

    def average_precision(self) -> float | None:
        """Step-wise AP (sum of precision times recall increments); None without anomalous samples."""
        return None if self.n_anomalous == 0 else self._ap / self.n_anomalous

    def f1_max(self) -> float | None:
        """Best F1 over all thresholds; the optimum sits at a distinct anomalous score."""
        return None if self.n_anomalous == 0 else self._f1

    def aupro(self) -> float | None:
        """Normalised area under the PRO curve up to ``fpr_limit``; None without normals or regions."""
        if self.n_normal == 0 or self.n_components == 0 or self.n_anomalous == 0 or not self._has_pro:
            return None
        self._finish()
        return self._pro_area / self.fpr_limit

    def curves(self) -> dict[str, list[list[float]]]:
        """``{"roc": [fpr, tpr], "pro": [fpr, pro]}`` sampled (see :func:`downsample_curve`); {} without samplers."""
        self._finish()
        out = {}
        if self._roc_sampler is not None:
            out["roc"] = self._roc_sampler.values()
        if self._pro_sampler is not None and self._has_pro:
            out["pro"] = self._pro_sampler.values()
        return out


class _CurveSampler:
    """The vertices of a streamed polyline that :func:`downsample_curve` needs, and nothing else.

    ``downsample_curve`` keeps the last vertex of each run of equal x, then interpolates between
    the two kept vertices that bracket each sample. Streaming, the last vertex seen is held back
    until the next one shows whether it ends its run; of the strictly increasing vertices left, only
    the bracketing pairs (and the ends) are kept, so sampling the kept vertices gives exactly the
    values sampling the whole polyline would.
    """

    def __init__(self, x_max: float, points: int):
        self.x_max, self.points = x_max, points
        self.grid = np.linspace(0.0, x_max, points)
        self._pending = (np.zeros(1), np.zeros(1))  # the polyline starts at (0, 0)
        self._previous: tuple[float, float] | None = None  # last kept vertex of the increasing stream
        self._kept_x: list[np.ndarray] = []
        self._kept_y: list[np.ndarray] = []

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        xs = np.concatenate((self._pending[0], x))
        ys = np.concatenate((self._pending[1], y))
        last_of_run = xs[1:] != xs[:-1]
        self._pending = (xs[-1:], ys[-1:])
        self._reduce(xs[:-1][last_of_run], ys[:-1][last_of_run])

    def _reduce(self, x: np.ndarray, y: np.ndarray) -> None:
        if not x.size:
            return
        if self._previous is not None:
            x = np.concatenate(([self._previous[0]], x))
            y = np.concatenate(([self._previous[1]], y))
        right = np.searchsorted(x, self.grid, side="right")
        right = right[(right >= 1) & (right < x.size)]
        keep = np.zeros(x.size, dtype=bool)
        keep[right - 1] = keep[right] = True
        keep[0] = keep[-1] = True
        if self._previous is not None:
            keep[0] = False  # already kept
        self._kept_x.append(x[keep])
        self._kept_y.append(y[keep])
        self._previous = (float(x[-1]), float(y[-1]))

    def values(self) -> list[list[float]]:
        if self._pending[0].size:
            self._reduce(*self._pending)
            self._pending = (np.zeros(0), np.zeros(0))
        return downsample_curve(np.concatenate(self._kept_x), np.concatenate(self._kept_y), self.x_max, self.points)


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under a polyline with non-decreasing x, from x[0] to ``x_max``.

    When ``x_max`` falls strictly between two vertices, y is interpolated linearly there.
    """
    end = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:end], y[:end]
    if end < x.size and xs[-1] < x_max:
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs = np.append(xs, x_max)
        ys = np.append(ys, y_cut)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) * 0.5))


def downsample_curve(
    x: np.ndarray, y: np.ndarray, x_max: float = 1.0, points: int = 512
) -> list[list[float]]:
    """The curve read at ``points`` evenly spaced x in [0, x_max] (for plots; metrics use the exact one).

    At a vertical jump the upper value is taken, so steps are drawn as they are.
    """
    grid = np.linspace(0.0, x_max, points)
    # np.interp needs strictly increasing x for a well-defined answer at jumps: keep the last of ties.
    keep = np.append(x[1:] != x[:-1], True)
    values = np.interp(grid, x[keep], y[keep])
    return [grid.round(6).tolist(), values.round(6).tolist()]
