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


def _descending(stats: RankStats):
    """Per distinct anomalous score, highest first: TP and FP at ``>= a`` and FP at ``> a``."""
    count = stats.count[::-1].astype(np.float64)
    tp = np.cumsum(count)
    fp_ge = stats.n_normal - stats.below[::-1].astype(np.float64)
    fp_gt = stats.n_normal - stats.below_eq[::-1].astype(np.float64)
    return count, tp, fp_ge, fp_gt


def auroc(stats: RankStats) -> float | None:
    """ROC AUC = P(anomalous > normal) + P(equal) / 2; None when a class is empty."""
    n_anom = stats.n_anomalous
    if stats.n_normal == 0 or n_anom == 0:
        return None
    below = stats.below.astype(np.float64)
    equal = (stats.below_eq - stats.below).astype(np.float64)
    count = stats.count.astype(np.float64)
    wins = float(np.dot(count, below) + 0.5 * np.dot(count, equal))
    return wins / (float(n_anom) * float(stats.n_normal))


def average_precision(stats: RankStats) -> float | None:
    """Step-wise AP (sum of precision times recall increments); None without anomalous samples."""
    n_anom = stats.n_anomalous
    if n_anom == 0:
        return None
    count, tp, fp_ge, _ = _descending(stats)
    return float(np.sum(count * (tp / (tp + fp_ge))) / n_anom)


def f1_max(stats: RankStats) -> float | None:
    """Best F1 over all thresholds; the optimum sits at a distinct anomalous score."""
    n_anom = stats.n_anomalous
    if n_anom == 0:
        return None
    _, tp, fp_ge, _ = _descending(stats)
    return float(np.max(2.0 * tp / (tp + fp_ge + n_anom)))


def roc_curve(stats: RankStats) -> tuple[np.ndarray, np.ndarray]:
    """Exact ROC polyline (FPR, TPR) from (0, 0) to (1, 1); collinear points are omitted."""
    n_anom = stats.n_anomalous
    _, tp, fp_ge, fp_gt = _descending(stats)
    return _polyline(fp_gt / stats.n_normal, fp_ge / stats.n_normal, tp / n_anom)


def pro_curve(stats: RankStats) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO polyline (FPR, PRO): PRO(t) = summed weights of anomalous pixels >= t over K."""
    if stats.weight is None:
        raise ValueError("PRO needs per-score component weights")
    weight = np.cumsum(stats.weight[::-1]) / stats.n_components
    _, _, fp_ge, fp_gt = _descending(stats)
    return _polyline(fp_gt / stats.n_normal, fp_ge / stats.n_normal, weight)


def _polyline(x_before: np.ndarray, x_at: np.ndarray, y_at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (0,0), then per anomalous score (x just above it, previous y), (x at it, new y), (1, last y).

    Thresholds between two anomalous scores only move x at constant y, so those intermediate
    points lie on the horizontal segments and dropping them changes no area.
    """
    m = x_at.size
    x = np.empty(2 * m + 2)
    y = np.empty(2 * m + 2)
    x[0] = y[0] = 0.0
    x[1 : 2 * m + 1 : 2] = x_before
    x[2 : 2 * m + 2 : 2] = x_at
    y[1] = 0.0
    y[3 : 2 * m + 1 : 2] = y_at[:-1]
    y[2 : 2 * m + 2 : 2] = y_at
    x[-1] = 1.0
    y[-1] = y_at[-1] if m else 0.0
    return x, y


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


def aupro(stats: RankStats, fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the PRO curve up to ``fpr_limit``; None without normals or regions."""
    if stats.n_normal == 0 or stats.n_components == 0 or stats.n_anomalous == 0:
        return None
    x, y = pro_curve(stats)
    return trapezoid_to(x, y, fpr_limit) / fpr_limit


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
