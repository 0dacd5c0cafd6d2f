"""Choose method settings on validation normals with synthetic anomalies (the test split is never read).

Usage (after ``3cad data import-folder ... --validation-fraction 0.15``)::

    python benchmarks/magnetic_tile.py DATASET [--category Magnetic_Tile] [--train-images 200]
        [--configs NAME ...] [--kinds painted texture dark edge shade] [--threads 2] [--bank random|coreset]
    python benchmarks/magnetic_tile.py DATASET --run RUN_DIR [--variant topk=0.03 --variant ...]

Each configuration is fitted on a seeded subset of ``train/good`` (``--train-images 0``: all of
them) and scored on the validation set of :func:`baselines.validation.make_validation_set` (each
``validation/good`` image unchanged and once per anomaly kind), with the standard metrics at native
resolution, per kind (that kind's images against all the normals) and over everything. Prints one
line per configuration and kind, with fit and predict seconds; ``--json`` appends the numbers to a
JSON-lines file. The reference run is the library default (``pc-squash256``): compare every line
with it.

PatchCore's bank is a random 40k-patch sample by default (fits take seconds; it overrides a
configuration's bank options). ``--bank coreset`` keeps the library's greedy coreset and the
configuration's bank options, as ``3cad train`` does: rank the final candidates that way, on all
training images, since a 200-image random bank underrates every configuration at pixel level
(docs/methods.md).

``--run`` scores an already trained run folder (CFRG, say) instead, once per ``--variant`` of its
inference options (``KEY=VALUE`` pairs joined by ``,``; the saved settings are the reference).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from baselines.validation import KINDS, make_validation_set
from threecad.data import AnomalyDataset, read_mask
from threecad.errors import ThreecadError
from threecad.io import image_size
from threecad.layout import list_samples
from threecad.methods import Method, build, iter_batches, load_method, native_size_maps
from threecad.methods.runner import read_run
from threecad.metrics import Evaluator

#: PatchCore bank settings per ``--bank``: a random sample (fits take seconds) or the library's coreset.
BANKS = {"random": {"coreset_ratio": 1.0, "max_patches": 40_000}, "coreset": {}}

CONFIGS: dict[str, tuple[str, dict, int | None, str, str]] = {
    # name: (method, options, size, resize, exposure)
    "pc-squash256": ("patchcore", {}, 256, "squash", "raw"),
    "pc-squash256-exposure": ("patchcore", {}, 256, "squash", "mean"),
    "pc-squash256-exposure-top1%": ("patchcore", {"topk": 0.01}, 256, "squash", "mean"),
    "pc-squash256-exposure-top3%": ("patchcore", {"topk": 0.03}, 256, "squash", "mean"),
    "pc-squash256-exposure-top10%": ("patchcore", {"topk": 0.1}, 256, "squash", "mean"),
    "pc-squash320-exposure-top3%": ("patchcore", {"topk": 0.03}, 320, "squash", "mean"),
    "pc-squash256-exposure-top3%-nn3": ("patchcore", {"topk": 0.03, "num_neighbors": 3}, 256, "squash", "mean"),
    "pc-squash256-exposure-top3%-lite2": ("patchcore", {"topk": 0.03, "backbone": "efficientnet_lite2"}, 256,
                                          "squash", "mean"),
    "pc-squash256-exposure-top3%-balanced": ("patchcore", {"topk": 0.03, "balance_stages": True}, 256, "squash",
                                             "mean"),
    "pc-squash256-exposure-top3%-balanced-s4s8s16": ("patchcore", {"topk": 0.03, "balance_stages": True,
                                                                   "layers": ["stride4", "stride8", "stride16"]},
                                                     256, "squash", "mean"),
    "pc-squash256-exposure-top3%-balanced-s8s16s32": ("patchcore", {"topk": 0.03, "balance_stages": True,
                                                                    "layers": ["stride8", "stride16", "stride32"]},
                                                      256, "squash", "mean"),
    # Every training patch a candidate, greedy coreset per 50k-patch chunk (run with --bank coreset).
    "pc-squash256-exposure-top3%-chunk50k": ("patchcore", {"topk": 0.03, "max_patches": None,
                                                           "coreset_chunk": 50_000}, 256, "squash", "mean"),
    "pc-aspect320": ("patchcore", {}, 320, "aspect", "raw"),
    "pc-squash256-exposure-top3%-cal100": ("patchcore", {"topk": 0.03, "calibration_images": 100}, 256, "squash",
                                           "mean"),
    "pc-squash320-exposure-top3%-cal100": ("patchcore", {"topk": 0.03, "calibration_images": 100}, 320, "squash",
                                           "mean"),
    "pc-native-exposure-top3%": ("patchcore", {"topk": 0.03}, None, "native", "mean"),
    "pc-native-exposure-top3%-cal100": ("patchcore", {"topk": 0.03, "calibration_images": 100}, None, "native",
                                        "mean"),
    "pc-aspect320-exposure-top3%-cal100": ("patchcore", {"topk": 0.03, "calibration_images": 100}, 320, "aspect",
                                           "mean"),
    # Sixth look (docs/methods.md): candidates scored with the ``shade`` kind added.
    "pc-squash320-top3%-cal100": ("patchcore", {"topk": 0.03, "calibration_images": 100}, 320, "squash", "raw"),
    "pc-squash320-exposure-top3%-cal100-sigma8": ("patchcore", {"topk": 0.03, "calibration_images": 100,
                                                               "sigma": 8.0}, 320, "squash", "mean"),
    "pc-squash192-exposure-top3%-cal100": ("patchcore", {"topk": 0.03, "calibration_images": 100}, 192, "squash",
                                           "mean"),
    "pc-squash256-exposure-top3%-balanced-s8s16s32-cal100": ("patchcore", {
        "topk": 0.03, "balance_stages": True, "layers": ["stride8", "stride16", "stride32"],
        "calibration_images": 100}, 256, "squash", "mean"),
    "pc-squash256-exposure-top3%-cal100-int200": ("patchcore", {"topk": 0.03, "calibration_images": 100,
                                                               "intensity_weight": 200.0}, 256, "squash", "mean"),
    "pc-squash320-exposure-top3%-cal100-int200": ("patchcore", {"topk": 0.03, "calibration_images": 100,
                                                               "intensity_weight": 200.0}, 320, "squash", "mean"),
    # Every training patch a candidate (bank 10 % of all of them), coreset per 100k-patch chunk (--bank coreset).
    "pc-squash256-exposure-top3%-cal100-int200-chunk100k": ("patchcore", {
        "topk": 0.03, "calibration_images": 100, "intensity_weight": 200.0, "max_patches": None,
        "coreset_chunk": 100_000}, 256, "squash", "mean"),
    "pc-squash256-exposure-top3%-cal100-int200-chunk20k": ("patchcore", {
        "topk": 0.03, "calibration_images": 100, "intensity_weight": 200.0, "max_patches": None,
        "coreset_chunk": 20_000}, 256, "squash", "mean"),
    # Two input scales (the input and a half-size copy), each its own bank and calibration, maps averaged.
    "pc-ms320+160-exposure-top3%-cal100-int200-chunk20k": ("patchcore", {
        "topk": 0.03, "calibration_images": 100, "intensity_weight": 200.0, "scales": [1.0, 0.5],
        "max_patches": None, "coreset_chunk": 20_000}, 320, "squash", "mean"),
    "pc-ms256+128-exposure-top3%-cal100-int200-chunk20k": ("patchcore", {
        "topk": 0.03, "calibration_images": 100, "intensity_weight": 200.0, "scales": [1.0, 0.5],
        "max_patches": None, "coreset_chunk": 20_000}, 256, "squash", "mean"),
    "pc-squash256-s4s8s16": ("patchcore", {"layers": ["stride4", "stride8", "stride16"]}, 256, "squash", "raw"),
    "padim-squash256": ("padim", {}, 256, "squash", "raw"),
    "padim-squash256-exposure-top3%": ("padim", {"topk": 0.03}, 256, "squash", "mean"),
}


def configured(name: str, bank: str, seed: int) -> tuple[Method, int | None, str, str]:
    """The unfitted method of configuration ``name`` with ``bank``'s PatchCore bank, and its input settings."""
    method_name, options, size, resize, exposure = CONFIGS[name]
    options = {**options, **BANKS[bank]} if method_name == "patchcore" else options
    return build(method_name, device="cpu", seed=seed, **options), size, resize, exposure


def score(method, val_root: Path, category: str, size: int | None, resize: str, exposure: str) -> tuple[dict, float]:
    """Metrics per anomaly kind (that kind + every normal) and over all kinds (``"all"``)."""
    evaluator = Evaluator()
    data = AnomalyDataset(val_root, category, "test", size=size, resize=resize, exposure=exposure)
    kinds = sorted({s.defect for s in data.samples if s.label})
    by_path = {str(s.image_path): s for s in data.samples}
    start = time.perf_counter()
    for images, items in iter_batches(data, 8):
        scores, maps = method.predict_batch(images)
        samples = [by_path[item["path"]] for item in items]
        native = native_size_maps(maps, [image_size(s.image_path) for s in samples])
        for sample, value, amap in zip(samples, scores, native):
            mask = read_mask(sample.mask_path) if sample.label else np.zeros(amap.shape, bool)
            for group in ["all", *(kinds if not sample.label else [sample.defect])]:
                evaluator.update([amap], [mask], image_scores=[float(value)], categories=group)
    return evaluator.compute()["categories"], time.perf_counter() - start


def report(name: str, metrics: dict, kinds: list[str], fit_s: float, pred_s: float) -> None:
    for kind in ["all", *kinds]:
        m = metrics.get(kind)
        if m is not None:
            print(f"{name:30s} {kind:8s} {m['i_auroc']:.3f}   {m['p_auroc']:.3f}   {m['aupro']:.3f}  "
                  f"{m['p_ap']:.3f}  {fit_s:6.1f}  {pred_s:6.1f}", flush=True)


def parse_variant(text: str) -> dict:
    """``"topk=0.03,map_terms=segmentation"`` -> options (values read as JSON when they parse)."""
    options = {}
    for pair in filter(None, text.split(",")):
        key, _, value = pair.partition("=")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--category", default="Magnetic_Tile")
    parser.add_argument("--train-images", type=int, default=200, help="0: all training images.")
    parser.add_argument("--bank", choices=list(BANKS), default="random", help="PatchCore memory bank.")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME")
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="Append results to this JSON-lines file.")
    parser.add_argument("--run", type=Path, default=None, help="Score this trained run folder instead.")
    parser.add_argument("--variant", action="append", default=None, help="Inference options for --run.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = read_run(args.run) if args.run is not None else None  # a bad run folder fails before any work
    with tempfile.TemporaryDirectory() as tmp:
        val_root = make_validation_set(args.dataset, args.category, Path(tmp) / "val", seed=args.seed,
                                       kinds=tuple(args.kinds))
        print(f"{'config':30s} {'kind':8s} i_auroc p_auroc  aupro   p_ap   fit_s  pred_s")
        results = []
        if info is not None:
            for variant in args.variant or [""]:
                method = load_method(args.run, device="cpu", **parse_variant(variant))
                metrics, pred_s = score(method, val_root, args.category, info["size"], info["resize"],
                                        info.get("exposure", "raw"))
                results.append((variant or "saved settings", metrics, 0.0, pred_s))
                report(results[-1][0], metrics, args.kinds, 0.0, pred_s)
        else:
            train_samples = list_samples(args.dataset, args.category, "train")
            rng = np.random.default_rng(args.seed)
            count = len(train_samples) if args.train_images <= 0 else min(args.train_images, len(train_samples))
            subset = [train_samples[i] for i in sorted(rng.choice(len(train_samples), count, replace=False))]
            for name in args.configs:  # every configuration's options are checked before any fit
                configured(name, args.bank, args.seed)
            for name in args.configs:
                method, size, resize, exposure = configured(name, args.bank, args.seed)
                train = AnomalyDataset(args.dataset, args.category, "train", size=size, resize=resize,
                                       samples=subset, exposure=exposure)
                start = time.perf_counter()
                method.fit(train)
                fit_s = time.perf_counter() - start
                metrics, pred_s = score(method, val_root, args.category, size, resize, exposure)
                results.append((name, metrics, fit_s, pred_s))
                report(name, metrics, args.kinds, fit_s, pred_s)
        if args.json is not None:
            with open(args.json, "a") as handle:
                for name, metrics, fit_s, pred_s in results:
                    handle.write(json.dumps({"config": name, "run": str(args.run or ""), "seed": args.seed,
                                             "bank": args.bank, "train_images": args.train_images,
                                             "fit_s": fit_s, "predict_s": pred_s, "metrics": metrics}) + "\n")


if __name__ == "__main__":
    try:
        main()
    except ThreecadError as exc:  # a user error: one line, exit 1
        raise SystemExit(f"error: {exc}") from None
