"""Inspection speed on whole 4096x1024 line-scan frames: scoring, stitching overhead, engines.

(Named ``inspection.py``, not ``inspect.py``: a file of that name would stand in for the standard
library's ``inspect`` module in every script run from this folder.)

Frames are synthetic clean 4096x1024 line-scan frames (``threecad.synth.raw``). Without ``--run``
a PatchCore run is fitted first, the factory way (raw frames -> ``preprocess`` at 1024-pixel tiles
-> ``train`` with the default settings), in a temporary folder. Each frame is cut into the
preprocess windows (five 1024x1024 windows at 20 % overlap) and timed, best of ``--repeats``:

* ``windows``: ``predictor.predict(windows)`` alone (the model's cost, the reference);
* ``stitch``: pasting those window maps into the frame map (:func:`threecad.inspect.stitching.stitch`);
  ``stitch overhead`` = stitch / windows (goal <= 10 %);
* ``inspect``: the whole ``inspect()`` call per frame (reading, scoring, stitching, the TIFF map, the
  overlay PNG, the CSV), i.e. what a user waits for;
* ``onnxruntime``: the same windows through ``threecad.export.onnx.OnnxPredictor`` when that module
  imports (exported from the run with ``export_onnx``); ``speedup`` = torch windows / onnxruntime
  windows (goal >= 1.3). Otherwise that row is skipped with the reason.

The thread count (``--threads``, default :func:`threecad.inspect.predictor.default_threads`) is
printed with the figures.

    python benchmarks/inspection.py [--run RUN] [--frames 4] [--repeats 3] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from threecad.ingest.preprocess import preprocess
from threecad.inspect.inspection import inspect
from threecad.inspect.predictor import check_threads, load_predictor
from threecad.inspect.stitching import frame_windows, resolve_tiling, stitch
from threecad.io import read_image, save_image
from threecad.methods import runner
from threecad.progress import set_progress
from threecad.synth.raw import make_raw_dataset

WIDTH, HEIGHT = 4096, 1024


def _line_frames(work: Path, count: int) -> tuple[Path, list[Path]]:
    """A raw set whose clean 4096x1024 frames are the benchmark's frames (odd indices of category 0)."""
    raw = make_raw_dataset(work / "raw", seed=0, categories=1, images=2 * count + 2, large=2 * count + 2)
    truth = json.loads((raw / "ground_truth.json").read_text())["images"]
    frames = [raw / f["file"] for f in truth if (f["width"], f["height"]) == (WIDTH, HEIGHT) and not f["defective"]]
    return raw, frames[:count]


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn``, after one untimed warm-up call (lazy
    initialisation: thread pools, onnxruntime's first run). ``benchmarks/onnx_speed.py`` uses it too."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a trained run folder (default: fit PatchCore on synthetic frames)")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    set_progress(False)
    threads = check_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        raw, paths = _line_frames(work, args.frames)
        run = args.run
        if run is None:
            preprocess(raw, work / "data", val_fraction=0.2, seed=0)
            run = runner.train("patchcore", work / "data", "all", out=work / "runs", device="cpu")[0]
        tiling = resolve_tiling(run, None, None)
        tile, overlap = tiling["tile"] or 1024, tiling["overlap"]
        frames = [read_image(p) for p in paths]
        boxes = frame_windows(WIDTH, HEIGHT, tile, overlap)
        windows = [[np.ascontiguousarray(f[y0:y1, x0:x1]) for x0, y0, x1, y1 in boxes] for f in frames]
        torch_predictor = load_predictor(run, "torch", threads=threads)
        torch_predictor.predict(windows[0])  # warm-up
        t_windows = best_time(lambda: [torch_predictor.predict(w) for w in windows], args.repeats)
        maps = [torch_predictor.predict(w)[1] for w in windows]
        t_stitch = best_time(lambda: [stitch(m, boxes, HEIGHT, WIDTH, "max") for m in maps], args.repeats)
        folder = work / "frames"
        for p, f in zip(paths, frames):
            save_image(folder / p.name, f)
        inspect(run, [folder / paths[0].name], work / "warm", tile=tile, overlap=overlap, threads=threads)
        start = time.perf_counter()
        inspect(run, [folder], work / "out", tile=tile, overlap=overlap, threads=threads)
        t_inspect = time.perf_counter() - start
        n = len(frames)
        result = {
            "frames": n, "frame": f"{WIDTH}x{HEIGHT}", "windows_per_frame": len(boxes), "tile": tile,
            "overlap": overlap, "threads": threads,
            "torch_windows_frames_per_s": round(n / t_windows, 3),
            "stitch_ms_per_frame": round(1000 * t_stitch / n, 2),
            "stitch_overhead_pct": round(100 * t_stitch / t_windows, 2),
            "torch_inspect_frames_per_s": round(n / t_inspect, 3),
        }
        try:
            from threecad.export.onnx import OnnxPredictor, export_onnx
        except ImportError as exc:
            result["onnxruntime"] = f"skipped: threecad.export.onnx does not import ({exc})"
        else:
            model = export_onnx(run, work / "model.onnx")
            onnx_predictor = OnnxPredictor(model, threads=threads)
            onnx_predictor.predict(windows[0])
            t_onnx = best_time(lambda: [onnx_predictor.predict(w) for w in windows], args.repeats)
            result["onnxruntime_windows_frames_per_s"] = round(n / t_onnx, 3)
            result["onnxruntime_speedup"] = round(t_windows / t_onnx, 3)
    print(f"inspect benchmark: {n} frames {WIDTH}x{HEIGHT}, {len(boxes)} windows of {tile} px "
          f"({overlap:.0%} overlap), {threads} thread(s)")
    print(f"  torch, windows only : {result['torch_windows_frames_per_s']:.3f} frames/s")
    print(f"  stitching           : {result['stitch_ms_per_frame']:.2f} ms/frame = "
          f"{result['stitch_overhead_pct']:.2f} % of scoring (goal <= 10 %)")
    print(f"  torch, whole inspect: {result['torch_inspect_frames_per_s']:.3f} frames/s (read, score, stitch, "
          "map, overlay, CSV)")
    if "onnxruntime_speedup" in result:
        print(f"  onnxruntime windows : {result['onnxruntime_windows_frames_per_s']:.3f} frames/s, speedup "
              f"{result['onnxruntime_speedup']:.2f}x over torch (goal >= 1.3x)")
    else:
        print(f"  onnxruntime         : {result['onnxruntime']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
