"""``3cad calibrate``: decision thresholds from held-out normal images, stored in the run.

**Definition.** The image threshold for a target false-alarm rate ``a`` on ``n`` normal scores is
the *smallest* threshold ``t`` whose false-alarm rate on them, ``#(score > t) / n``, is at most
``a`` (a frame is NG when its score is strictly above ``t``). With the scores sorted ascending
``s_1 <= ... <= s_n`` and ``k = floor(a * n)`` false alarms allowed, ``t = s_(n-k)``: this is
numpy's ``quantile(scores, 1 - a, method="inverted_cdf")`` (the smallest score whose empirical CDF
reaches ``1 - a``), computed on integers so that no rounding of ``1 - a`` moves it. With fewer than
``1 / a`` normals, ``k = 0`` and ``t`` is the largest normal score (a warning says so).

**Pixel threshold** (for the region outlines and boxes): the same rule applied to each normal
image's largest map value, so at most the same share of normal images shows any outlined pixel.

Normals are scored exactly as ``3cad inspect`` scores frames (:func:`threecad.inspect.stitching.score_frame`:
the same windows, stitching and frame score), so a held-out normal tile and a whole frame are
measured with one ruler. Only normal images are read: thresholds are never tuned on labelled
defects. The result is ``RUN/calibration.json``, the only file written; ``inspect --threshold``
overrides it.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from threecad import __version__
from threecad.errors import ThreecadError
from threecad.ingest.preprocess import read_frame
from threecad.inspect.frames import discover_frames
from threecad.inspect.predictor import check_threads, load_predictor
from threecad.inspect.stitching import check_combine, resolve_tiling, score_frame
from threecad.io import write_json
from threecad.methods.runner import find_runs
from threecad.progress import progress

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
RULE = ("smallest t with #(normal score > t) / n <= false_alarm_rate; NG when score > t "
        "(numpy quantile 1 - rate, method inverted_cdf)")


def check_rate(false_alarm_rate: float) -> float:
    rate = float(false_alarm_rate)
    if not (math.isfinite(rate) and 0.0 <= rate < 1.0):
        raise ThreecadError(f"--false-alarm-rate must be in [0, 1), got {false_alarm_rate}")
    return rate


def threshold_for_rate(scores: np.ndarray, false_alarm_rate: float) -> float:
    """The smallest ``t`` with ``mean(scores > t) <= false_alarm_rate`` (module docstring)."""
    rate = check_rate(false_alarm_rate)
    values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if values.size == 0:
        raise ThreecadError("no normal scores to calibrate on")
    if not np.isfinite(values).all():
        raise ThreecadError("a normal image scored NaN or infinity; cannot calibrate")
    allowed = math.floor(rate * values.size + 1e-9)  # false alarms allowed; the epsilon absorbs 0.1 * 30 = 2.9999...
    return float(values[values.size - 1 - allowed])


def single_run(run: str | Path) -> Path:
    """``run`` as one run folder: inspection thresholds and windows belong to one category's model."""
    runs = find_runs(run)
    if len(runs) != 1:
        raise ThreecadError(f"holds {len(runs)} runs ({', '.join(r.name for r in runs)}); name one category's "
                            "run folder", run)
    return runs[0]


def read_calibration(run: str | Path) -> dict | None:
    """``RUN/calibration.json`` as written by :func:`calibrate`, or ``None`` when the run has none."""
    import json

    path = Path(run) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        float(data["image_threshold"]), float(data["pixel_threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ThreecadError(f"corrupt {CALIBRATION_FILE} ({exc}); run `3cad calibrate` again", path) from None
    return data


def _refuse_labelled_defect(path: Path) -> None:
    """A dataset's ``<Category>/test/<defect>/`` image (beside ``ground_truth/``) is a labelled defect, never a normal."""
    folder = Path(path).resolve().parent
    if folder.parent.name == "test" and folder.name != "good" and (folder.parent.parent / "ground_truth").is_dir():
        raise ThreecadError("is a labelled test defect (test/<defect>/ of a dataset): calibrate on normal images "
                            "only, e.g. <Category>/validation/good", path)


def calibrate(run: str | Path, normals: list[str | Path] | str | Path, false_alarm_rate: float = 0.01, *,
              tile: int | None = None, overlap: float | None = None, combine: str = "max", engine: str = "torch",
              model: str | Path | None = None, threads: int | None = None,
              batch_size: int | None = None) -> dict:
    """Score held-out normal images and write the image and pixel thresholds to ``RUN/calibration.json``.

    ``normals``: folders, files or glob patterns of normal images only (e.g. a preprocessed dataset's
    ``<Category>/validation/good``). Unreadable files are skipped and listed in the record. Returns
    the record written.
    """
    rate = check_rate(false_alarm_rate)
    check_combine(combine)
    run = single_run(run)
    threads = check_threads(threads)
    tiling = resolve_tiling(run, tile, overlap)
    inputs = [normals] if isinstance(normals, (str, Path)) else list(normals)
    frames = discover_frames(inputs)
    for frame in frames:
        _refuse_labelled_defect(frame.path)
    predictor = load_predictor(run, engine, model, threads)
    scores, peaks, skipped = [], [], []
    start = time.perf_counter()
    for frame in progress(frames, desc="calibrate", unit="image"):
        try:
            image = read_frame(frame.path)
        except ThreecadError as exc:
            log.warning("skipped: %s", exc)
            skipped.append({"path": str(frame.path), "error": str(exc)})
            continue
        score, amap = score_frame(predictor, image, tiling["tile"], tiling["overlap"], combine, batch_size)
        scores.append(score)
        peaks.append(float(np.max(amap)))
    if not scores:
        raise ThreecadError(f"none of the {len(frames)} normal image(s) could be read; first: {skipped[0]['error']}")
    scores_a, peaks_a = np.asarray(scores), np.asarray(peaks)
    image_t, pixel_t = threshold_for_rate(scores_a, rate), threshold_for_rate(peaks_a, rate)
    if rate > 0 and len(scores) * rate < 1:
        log.warning("only %d normal image(s): a false-alarm rate of %g needs at least %d to be resolved; the "
                    "threshold is the largest normal score", len(scores), rate, math.ceil(1 / rate))
    record = {
        "image_threshold": image_t,
        "pixel_threshold": pixel_t,
        "false_alarm_rate": rate,
        "rule": RULE,
        "pixel_rule": "the same rule on each normal image's largest map value",
        "normals": [str(Path(i).resolve()) if Path(i).exists() else str(i) for i in inputs],
        "n_normals": len(scores),
        "skipped": skipped,
        "achieved_false_alarm_rate": float(np.mean(scores_a > image_t)),
        "normal_scores": {"min": float(scores_a.min()), "median": float(np.median(scores_a)),
                          "max": float(scores_a.max())},
        "tile": tiling["tile"],
        "overlap": tiling["overlap"],
        "combine": combine,
        "engine": engine,
        "threads": threads,
        "seconds": round(time.perf_counter() - start, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threecad": __version__,
    }
    write_json(run / CALIBRATION_FILE, record)
    log.info("calibrated on %d normal image(s): image threshold %.6g, pixel threshold %.6g (false-alarm rate %g)",
             len(scores), image_t, pixel_t, rate)
    return record
