"""Tiles per second: our full preprocessing vs ``sahi.slicing.slice_image`` writing image tiles only.

Both run on the same generated raw frames (2448x2048 and 4096x1024, PNG) with the same
1024-px / 20 % windows. Ours writes image tiles, mask tiles, COCO RLE, the manifest and the
report and validates every annotation; SAHI writes the image tiles only (its own thread pool,
PIL's default PNG settings). Usage: ``python benchmarks/preprocess.py [--frames 8] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd
from sahi.slicing import slice_image

from threecad.ingest.preprocess import preprocess
from threecad.progress import set_progress
from threecad.synth.raw import make_raw_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4, help="Large frames per category (2 categories).")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Worker counts to time.")
    parser.add_argument("--tile", type=int, default=1024)
    args = parser.parse_args()
    set_progress(False)
    logging.getLogger("sahi").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_raw_dataset(tmp / "raw", seed=0, categories=2, images=args.frames, large=args.frames)
        print(f"generated {2 * args.frames} raw frames in {time.perf_counter() - t0:.1f} s")
        results = []
        manifest = None
        for workers in args.workers:
            out = tmp / f"ours_{workers}"
            t0 = time.perf_counter()
            summary = preprocess(tmp / "raw", out, tile=args.tile, workers=workers)
            seconds = time.perf_counter() - t0
            results.append((f"threecad preprocess --workers {workers} (tiles+masks+COCO+manifest)", summary["tiles"], seconds))
            manifest = pd.read_parquet(out / "manifest.parquet")
        sources = sorted(manifest["source"].unique())
        t0 = time.perf_counter()
        n_sahi = 0
        for i, source in enumerate(sources):
            result = slice_image(
                image=str(tmp / "raw" / source),
                output_file_name=f"s{i}",
                output_dir=str(tmp / "sahi"),
                slice_height=args.tile,
                slice_width=args.tile,
                overlap_height_ratio=0.2,
                overlap_width_ratio=0.2,
                auto_slice_resolution=False,
            )
            n_sahi += len(result)
        seconds = time.perf_counter() - t0
        results.append(("sahi.slicing.slice_image (image tiles only)", n_sahi, seconds))
    print(f"{'pipeline':<72}{'tiles':>7}{'seconds':>9}{'tiles/s':>9}")
    for name, tiles, seconds in results:
        print(f"{name:<72}{tiles:>7}{seconds:>9.2f}{tiles / seconds:>9.1f}")
    sahi_rate = results[-1][1] / results[-1][2]
    for name, tiles, seconds in results[:-1]:
        print(f"ratio ours/sahi [{name.split('(')[0].strip()}]: {tiles / seconds / sahi_rate:.2f}x")


if __name__ == "__main__":
    main()
