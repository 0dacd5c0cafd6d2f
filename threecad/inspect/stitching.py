"""Whole frames scored window by window, as ``3cad data preprocess`` cut the training tiles.

A frame larger than the training tile (in either side) is cut into the same SAHI windows
(:func:`threecad.ingest.tiling.tile_windows`, the same ``tile`` and ``overlap``), every window is
scored by the predictor at the run's input transform, and the window maps are pasted back into one
map at the frame's native size. A frame no larger than the tile goes in whole (one window).

Unlike preprocess, no window is ever dropped (``min_fraction`` 0): every pixel of a frame on the
line must get a score, so a narrow border strip is scored too (it is short only where the frame is).

**Combination rule** where windows overlap (``combine``):

* ``max`` (default): each pixel takes the largest value any covering window gave it. A defect that
  a window boundary cuts keeps its whole region: whichever window sees a part of it marks that part,
  and no other window's lower value dilutes it.
* ``mean``: each pixel takes the mean over its covering windows (smoother seams; a defect seen at the
  edge of one window and not by its neighbour is weakened).

**Frame score**: the largest window score (the method's own image score of each window). A frame
is as anomalous as its worst window, and a frame that is a single window gets exactly the score
the method gives that image, which is what calibration on held-out normal tiles measured.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from threecad.errors import ThreecadError
from threecad.ingest.preprocess import STATE
from threecad.ingest.tiling import Box, check_tiling, tile_windows
from threecad.inspect.predictor import Predictor
from threecad.methods.runner import read_run

log = logging.getLogger(__name__)

COMBINE_RULES = ("max", "mean")


def check_combine(combine: str) -> None:
    if combine not in COMBINE_RULES:
        raise ThreecadError(f"--combine must be one of {', '.join(COMBINE_RULES)}, got {combine!r}")


def frame_windows(width: int, height: int, tile: int | None, overlap: float = 0.2) -> list[Box]:
    """The windows of a ``width x height`` frame: the whole frame when ``tile`` is None or the frame
    fits in one tile, else preprocess's SAHI windows with none dropped (they cover every pixel)."""
    if tile is None or (width <= tile and height <= tile):
        return [(0, 0, width, height)]
    return tile_windows(width, height, tile, overlap, min_fraction=0.0)


def stitch(maps: list[np.ndarray], boxes: list[Box], height: int, width: int, combine: str = "max") -> np.ndarray:
    """One ``(height, width)`` float32 map from window maps (each the size of its box), per ``combine``."""
    check_combine(combine)
    if len(maps) != len(boxes) or not boxes:
        raise ValueError(f"{len(maps)} maps for {len(boxes)} windows")
    if len(boxes) == 1 and boxes[0] == (0, 0, width, height):
        return np.asarray(maps[0], dtype=np.float32)
    if combine == "max":
        out = np.full((height, width), -np.inf, dtype=np.float32)
        for amap, (x0, y0, x1, y1) in zip(maps, boxes):
            np.maximum(out[y0:y1, x0:x1], amap, out=out[y0:y1, x0:x1])
        if np.isneginf(out).any():
            raise ValueError("the windows do not cover the frame")
        return out
    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.int32)
    for amap, (x0, y0, x1, y1) in zip(maps, boxes):
        total[y0:y1, x0:x1] += amap
        count[y0:y1, x0:x1] += 1
    if (count == 0).any():
        raise ValueError("the windows do not cover the frame")
    return (total / count).astype(np.float32)


def score_frame(predictor: Predictor, image: np.ndarray, tile: int | None, overlap: float = 0.2,
                combine: str = "max", batch_size: int | None = None) -> tuple[float, np.ndarray]:
    """``(frame score, map at the frame's native size)``: windows scored by ``predictor``, then stitched."""
    height, width = image.shape[:2]
    boxes = frame_windows(width, height, tile, overlap)
    windows = [np.ascontiguousarray(image[y0:y1, x0:x1]) for x0, y0, x1, y1 in boxes]
    scores, maps = predictor.predict(windows, batch_size=batch_size)
    return float(np.max(scores)), stitch(list(maps), boxes, height, width, combine)


def run_tiling(run: str | Path) -> dict | None:
    """``{"tile", "overlap"}`` that cut the run's training tiles, from the dataset's preprocess settings
    (``<dataset>/.threecad-preprocess/settings.json``, the dataset named in ``run.json``); ``None`` when the
    dataset is gone or was not made by ``3cad data preprocess``."""
    info = read_run(Path(run))
    dataset = info.get("dataset")
    if not dataset:
        return None
    settings = Path(dataset) / STATE / "settings.json"
    if not settings.is_file():
        return None
    try:
        config = json.loads(settings.read_text())["config"]
        tiling = {"tile": int(config["tile"]), "overlap": float(config["overlap"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ThreecadError(f"unreadable preprocess settings ({exc}); pass --tile and --overlap", settings) from None
    check_tiling(tiling["tile"], tiling["overlap"], 0.0)
    return tiling


def resolve_tiling(run: str | Path, tile: int | None, overlap: float | None) -> dict:
    """The windows to use: ``--tile``/``--overlap`` where given, else the run's (:func:`run_tiling`).

    With neither, images go in whole (``tile`` None), which is right for datasets whose images are
    the training images' size, and a warning says so for anyone feeding large frames.
    """
    recorded = run_tiling(run) or {}
    chosen = {"tile": tile if tile is not None else recorded.get("tile"),
              "overlap": overlap if overlap is not None else recorded.get("overlap", 0.2)}
    if chosen["tile"] is not None:
        check_tiling(int(chosen["tile"]), float(chosen["overlap"]), 0.0)
        chosen = {"tile": int(chosen["tile"]), "overlap": float(chosen["overlap"])}
    else:
        log.warning("%s: no tiling recorded (dataset not made by `3cad data preprocess`, or moved): images go in "
                    "whole; pass --tile/--overlap to cut large frames", run)
    chosen["source"] = "options" if tile is not None else ("run" if recorded else "none")
    return chosen
