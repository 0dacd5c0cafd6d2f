"""Choose PatchCore/PaDiM settings on magnetic tiles without looking at the test images.

Usage (after ``3cad data import-folder ... --validation-fraction 0.2``)::

    python benchmarks/magnetic_tile.py DATASET [--train-images 120] [--configs NAME ...]

Each configuration is fitted on a seeded subset of ``train/good`` and scored on the validation set
of :func:`baselines.validation.make_validation_set` (validation normals, and the same images with
painted synthetic defects), with the standard metrics at native resolution. The test split is never
read. Prints one line per configuration: metrics and fit/predict seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baselines import build
from baselines.batching import iter_batches
from baselines.validation import make_validation_set
from threecad.data import AnomalyDataset, read_mask
from threecad.io import image_size
from threecad.layout import list_samples
from threecad.metrics import Evaluator

CATEGORY = "Magnetic_Tile"

#: Bank settings shared by every PatchCore configuration (bounded fit time on 2 cores).
BANK = {"coreset_ratio": 0.05, "max_patches": 50_000}

CONFIGS: dict[str, tuple[str, dict, int, str]] = {
    # name: (method, options, size, resize)
    "pc-squash256-s8s16": ("patchcore", {}, 256, "squash"),
    "pc-squash320-s8s16": ("patchcore", {}, 320, "squash"),
    "pc-squash256-s4s8": ("patchcore", {"layers": ["stride4", "stride8"]}, 256, "squash"),
    "pc-aspect320-s8s16": ("patchcore", {}, 320, "aspect"),
    "pc-aspect384-s8s16": ("patchcore", {}, 384, "aspect"),
    "pc-squash256-s4s8s16": ("patchcore", {"layers": ["stride4", "stride8", "stride16"]}, 256, "squash"),
    "pc-squash256-s8s16-bank12k": ("patchcore", {"coreset_ratio": 0.2, "max_patches": 60_000,
                                                 "projection_dim": 32}, 256, "squash"),
    "pc-aspect320-s4s8": ("patchcore", {"layers": ["stride4", "stride8"]}, 320, "aspect"),
    "pc-aspect320-s4s8s16": ("patchcore", {"layers": ["stride4", "stride8", "stride16"]}, 320, "aspect"),
    "pc-aspect320-s8s16-k1": ("patchcore", {"neighbourhood": 1}, 320, "aspect"),
    "pc-aspect320-s8s16-sigma2": ("patchcore", {"sigma": 2.0}, 320, "aspect"),
    "padim-squash256": ("padim", {}, 256, "squash"),
    "padim-squash320": ("padim", {}, 320, "squash"),
}


def score(method, val_root: Path, size: int, resize: str) -> tuple[dict, float]:
    evaluator = Evaluator()
    data = AnomalyDataset(val_root, CATEGORY, "test", size=size, resize=resize)
    by_path = {str(s.image_path): s for s in data.samples}
    start = time.perf_counter()
    for images, items in iter_batches(data, 8):
        _, maps = method.predict(images)
        for item, amap in zip(items, maps):
            sample = by_path[item["path"]]
            width, height = image_size(sample.image_path)
            native = F.interpolate(torch.from_numpy(amap)[None, None], size=(height, width),
                                   mode="bilinear", align_corners=False)[0, 0].numpy()
            mask = (read_mask(sample.mask_path) if sample.label else np.zeros((height, width), bool))
            evaluator.update([native], [mask], labels=[sample.label], categories=CATEGORY)
    seconds = time.perf_counter() - start
    return evaluator.compute()["categories"][CATEGORY], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--train-images", type=int, default=120)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        val_root = make_validation_set(args.dataset, CATEGORY, Path(tmp) / "val", seed=args.seed)
        train_samples = list_samples(args.dataset, CATEGORY, "train")
        rng = np.random.default_rng(args.seed)
        subset = [train_samples[i] for i in sorted(rng.choice(len(train_samples), args.train_images, replace=False))]
        print(f"{'config':28s} i_auroc p_auroc  aupro   p_ap   fit_s  pred_s")
        for name in args.configs:
            method_name, options, size, resize = CONFIGS[name]
            options = {**BANK, **options} if method_name == "patchcore" else options
            method = build(method_name, device="cpu", seed=args.seed, **options)
            train = AnomalyDataset(args.dataset, CATEGORY, "train", size=size, resize=resize, samples=subset)
            start = time.perf_counter()
            method.fit(train)
            fit_s = time.perf_counter() - start
            metrics, pred_s = score(method, val_root, size, resize)
            print(f"{name:28s} {metrics['i_auroc']:.3f}   {metrics['p_auroc']:.3f}   {metrics['aupro']:.3f}  "
                  f"{metrics['p_ap']:.3f}  {fit_s:6.1f}  {pred_s:6.1f}", flush=True)


if __name__ == "__main__":
    main()
