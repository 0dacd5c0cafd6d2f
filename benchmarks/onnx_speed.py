"""Predict throughput of the torch and onnxruntime engines, per exportable method (docs/export.md).

For each method: a tiny fit (a few seeded smooth images, one epoch: throughput does not depend on
how well a model learned) at ``--size`` squash, saved as a run and exported with
:func:`threecad.export.onnx.export_onnx`; then ``predict`` of ``--images`` native uint8 images of
that size through ``load_method(run)`` (``torch.set_num_threads(t)``) and through
``OnnxPredictor(model, threads=t)``, best of ``--repeats``, at each thread count and batch size.
Prints one JSON line per (method, threads, batch) with images/s of both and their ratio.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.onnx_speed --methods patchcore padim
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from inspection import best_time  # noqa: E402

TINY = {
    "patchcore": {"calibration_images": 3},
    "padim": {},
    "rd": {"encoder": "efficientnet_lite0", "epochs": 1},
    "rdpp": {"encoder": "efficientnet_lite0", "epochs": 1},
    "draem": {"epochs": 1},
    "destseg": {"student_steps": 2, "seg_steps": 2, "encoder": "efficientnet_lite0"},
    "fastflow": {"epochs": 1, "encoder": "efficientnet_lite0"},
    "simplenet": {"epochs": 1, "encoder": "efficientnet_lite0"},
    "cfrg": {"epochs": 1, "teacher": "efficientnet_lite0"},
}


def main() -> None:
    from smooth_images import SmoothImages

    from threecad.export.onnx import OnnxPredictor, export_onnx
    from threecad.methods import build, load_method
    from threecad.methods.runner import save_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(TINY))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    base = (SmoothImages(1, size=args.size).images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    images = [np.clip(base.astype(int) + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)
              for _ in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            batch_size = max(args.batches)
            method = build(name, size=args.size, resize="squash", device="cpu", seed=0, batch_size=batch_size,
                           **TINY[name])
            method.fit(SmoothImages(max(4, batch_size), size=args.size))
            run = save_run(Path(tmp) / name, method, {"method": name, "category": "bench"})
            start = time.perf_counter()
            model = export_onnx(run, run / "model.onnx")
            export_s = time.perf_counter() - start
            loaded = load_method(run, device="cpu")
            for threads in args.threads:
                torch.set_num_threads(threads)
                onnx = OnnxPredictor(model, threads=threads)
                for batch in args.batches:
                    t_torch = best_time(lambda e=loaded, b=batch: e.predict(images, batch_size=b), args.repeats)
                    t_onnx = best_time(lambda e=onnx, b=batch: e.predict(images, batch_size=b), args.repeats)
                    print(json.dumps({"method": name, "size": args.size, "threads": threads, "batch": batch,
                                      "torch_images_per_s": round(len(images) / t_torch, 2),
                                      "onnxruntime_images_per_s": round(len(images) / t_onnx, 2),
                                      "speedup": round(t_torch / t_onnx, 3), "export_s": round(export_s, 1)}),
                          flush=True)


if __name__ == "__main__":
    main()
