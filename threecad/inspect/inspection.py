"""``3cad inspect``: whole frames from the line in, one map, overlay, score and decision per frame out.

Each frame is read as preprocess reads raw frames, cut into the training windows, scored and
stitched (:mod:`threecad.inspect.stitching`); its score is compared with the run's calibrated
threshold (:mod:`threecad.inspect.calibration`) or ``threshold``, and its regions above the pixel
threshold are outlined and measured (:mod:`threecad.inspect.overlay`).

Output folder ``OUT`` (new or empty unless ``overwrite``; nothing is written outside it, every file
atomically):

* ``maps/<name>.tiff``: the anomaly map, float32, at the frame's native size;
* ``overlays/<name>.png``: the frame with the map and the regions above the pixel threshold;
* ``results.csv``: one row per input, unreadable ones included (:data:`COLUMNS`);
* ``summary.json``: counts, thresholds and their source, windows, engine, threads, frames/s.

Without a calibration and without ``threshold`` the scores and maps are written but the
``decision`` column is empty (and a warning says so): a raw score means nothing on its own.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from threecad import __version__
from threecad.errors import ThreecadError
from threecad.ingest.preprocess import read_frame
from threecad.inspect.calibration import read_calibration, single_run
from threecad.inspect.frames import discover_frames
from threecad.inspect.overlay import find_regions, overlay
from threecad.inspect.predictor import check_threads, load_predictor
from threecad.inspect.stitching import check_combine, resolve_tiling, score_frame
from threecad.io import save_image, write_json, write_text
from threecad.maps.files import write_map
from threecad.paths import safe_join
from threecad.progress import progress

log = logging.getLogger(__name__)

COLUMNS = ("path", "score", "decision", "threshold", "pixel_threshold", "region_x0", "region_y0", "region_x1",
           "region_y1", "region_area", "regions", "width", "height", "map", "overlay", "error")
#: What inspect writes in OUT; ``overwrite`` removes these (and only these) first.
OUTPUTS = ("maps", "overlays", "results.csv", "summary.json")
OK, NG = "OK", "NG"


def _check_out(out: Path, overwrite: bool, run: Path) -> None:
    """Refuse a bad OUT before any model is loaded; nothing is removed here."""
    real = Path(os.path.realpath(out))
    run_real = Path(os.path.realpath(run))
    if real == run_real or real in run_real.parents:
        raise ThreecadError("the output folder holds the run; choose another --out", out)
    if out.exists() and not out.is_dir():
        raise ThreecadError("output path exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ThreecadError("output folder is not empty; pass --overwrite to replace inspect's outputs in it", out)


def _prepare_out(out: Path) -> None:
    """OUT with inspect's own earlier outputs removed (only once the model has loaded)."""
    if out.is_dir():
        for name in OUTPUTS:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _thresholds(run: Path, threshold: float | None, pixel_threshold: float | None) -> tuple[dict | None, dict]:
    calibration = read_calibration(run)
    image_t = threshold if threshold is not None else (calibration or {}).get("image_threshold")
    if pixel_threshold is not None:
        pixel_t = pixel_threshold
    elif calibration is not None:
        pixel_t = calibration["pixel_threshold"]
    else:
        pixel_t = threshold  # --threshold without a calibration: the same value outlines the regions
    source = "--threshold" if threshold is not None else ("calibration" if calibration else "none")
    return calibration, {"image_threshold": None if image_t is None else float(image_t),
                         "pixel_threshold": None if pixel_t is None else float(pixel_t), "source": source}


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})
    return buffer.getvalue()


def inspect(run: str | Path, inputs: list[str | Path], out: str | Path, *, tile: int | None = None,
            overlap: float | None = None, combine: str = "max", threshold: float | None = None,
            pixel_threshold: float | None = None, engine: str = "torch", model: str | Path | None = None,
            threads: int | None = None, batch_size: int | None = None, overwrite: bool = False) -> dict:
    """Score every frame named by ``inputs`` with ``run``'s model; write maps, overlays and ``results.csv`` in ``out``.

    ``tile``/``overlap``: the windows (default: those that cut the run's training tiles).
    ``threshold`` overrides the calibrated image threshold (``pixel_threshold`` the pixel one;
    with ``threshold`` and no calibration the regions use ``threshold`` too). Returns the summary
    (also written to ``summary.json``).
    """
    check_combine(combine)
    for name, value in (("--threshold", threshold), ("--pixel-threshold", pixel_threshold)):
        if value is not None and not np.isfinite(value):
            raise ThreecadError(f"{name} must be a finite number, got {value}")
    run, out = single_run(run), Path(out)
    threads = check_threads(threads)
    tiling = resolve_tiling(run, tile, overlap)
    frames = discover_frames(inputs, exclude=out)
    calibration, chosen = _thresholds(run, threshold, pixel_threshold)
    if calibration is not None and chosen["source"] == "calibration":
        used = {"tile": tiling["tile"], "overlap": tiling["overlap"], "combine": combine}
        differ = {k: (calibration.get(k), v) for k, v in used.items() if calibration.get(k) != v}
        if differ:
            log.warning("the calibration was made with other windows (%s); run `3cad calibrate` again with them",
                        ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items()))
    _check_out(out, overwrite, run)
    predictor = load_predictor(run, engine, model, threads)
    _prepare_out(out)
    image_t, pixel_t = chosen["image_threshold"], chosen["pixel_threshold"]
    if image_t is None:
        log.warning("%s has no calibration and no --threshold was given: scores and maps are written, no decision; "
                    "run `3cad calibrate --run %s --normals DIR` first", run, run)
    rows: list[dict] = []
    scored = ng = 0
    start = time.perf_counter()
    for frame in progress(frames, desc="inspect", unit="frame"):
        row: dict = {"path": str(frame.path)}
        try:
            image = read_frame(frame.path)
        except ThreecadError as exc:
            log.warning("skipped: %s", exc)
            rows.append(row | {"error": str(exc)})
            continue
        score, amap = score_frame(predictor, image, tiling["tile"], tiling["overlap"], combine, batch_size)
        height, width = amap.shape
        regions = find_regions(amap, pixel_t) if pixel_t is not None else None
        map_rel, overlay_rel = f"maps/{frame.name}.tiff", f"overlays/{frame.name}.png"
        write_map(safe_join(out, map_rel, "output name"), amap)
        save_image(safe_join(out, overlay_rel, "output name"),
                   overlay(image, amap, None if regions is None else regions.mask, pixel_t))
        decision = None if image_t is None else (NG if score > image_t else OK)
        ng += decision == NG
        scored += 1
        row |= {"score": f"{score:.6g}", "decision": decision, "threshold": image_t, "pixel_threshold": pixel_t,
                "width": width, "height": height, "map": map_rel, "overlay": overlay_rel}
        if regions is not None:
            row["regions"] = regions.count
            row["region_area"] = regions.area
            if regions.box is not None:
                row |= dict(zip(("region_x0", "region_y0", "region_x1", "region_y1"), regions.box))
        rows.append(row)
    seconds = time.perf_counter() - start
    write_text(out / "results.csv", _csv(rows))
    summary = {
        "frames": scored,
        "unreadable": len(rows) - scored,
        "ng": ng if image_t is not None else None,
        "ok": scored - ng if image_t is not None else None,
        "decided": image_t is not None,
        "image_threshold": image_t,
        "pixel_threshold": pixel_t,
        "threshold_source": chosen["source"],
        "false_alarm_rate": (calibration or {}).get("false_alarm_rate") if chosen["source"] == "calibration" else None,
        "tile": tiling["tile"],
        "overlap": tiling["overlap"],
        "tiling_source": tiling["source"],
        "combine": combine,
        "engine": engine,
        "threads": threads,
        "seconds": round(seconds, 3),
        "frames_per_s": round(scored / seconds, 3) if seconds > 0 else None,
        "run": str(run),
        "threecad": __version__,
    }
    write_json(out / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    """The one summary line the CLI prints."""
    decided = f"{summary['ng']} NG, {summary['ok']} OK" if summary["decided"] else "no decision (not calibrated)"
    bad = f", {summary['unreadable']} unreadable (listed in results.csv)" if summary["unreadable"] else ""
    return (f"{summary['frames']} frames: {decided}{bad}; {summary['frames_per_s']} frames/s "
            f"({summary['engine']}, {summary['threads']} thread(s))")
