"""Choose method settings on validation normals with synthetic anomalies (the test split is never read).

Usage (after ``3cad data import-folder ... --validation-fraction 0.15``)::

    python benchmarks/magnetic_tile.py DATASET [--category Magnetic_Tile] [--train-images 200]
        [--configs NAME ...] [--kinds painted texture dark edge shade] [--threads 2] [--bank random|coreset]
    python benchmarks/magnetic_tile.py DATASET --run RUN_DIR [--variant topk=0.03 --variant ...]

Each configuration is fitted on a seeded subset of ``train/good`` (``--train-images 0``: all of
them) and scored on the validation set of :func:`threecad.synth.validation.make_validation_set` (each
``validation/good`` image unchanged and once per anomaly kind), with the standard metrics at native
resolution, per kind (that kind's images against all the normals) and over everything. Prints one
line per configuration and kind, with fit and predict seconds; ``--json`` appends the numbers to a
JSON-lines file. PatchCore configurations are named by how they depart from the paper's settings
(``pc-squash256``, :data:`baselines.patchcore.PAPER_SETTINGS`); ``pc-defaults`` is the library's
defaults, the validated choice: compare every line with both.

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

from baselines.patchcore import PAPER_SETTINGS
from threecad.dataset.layout import list_samples
from threecad.dataset.loaders import AnomalyDataset
from threecad.errors import ThreecadError
from threecad.methods import Method, build, load_method
from threecad.methods.runner import read_run
from threecad.methods.tuning import validation_metrics
from threecad.synth.validation import KINDS, make_validation_set

#: PatchCore bank settings per ``--bank``: a random sample (fits take seconds) or the library's coreset.
BANKS = {"random": {"coreset_ratio": 1.0, "max_patches": 40_000}, "coreset": {}}

CONFIGS: dict[str, tuple[str, dict, int | None, str, str]] = {
    # name: (method, options, size, resize, exposure)
    "pc-defaults": ("patchcore", {}, 256, "squash", "mean"),  # the library's defaults (the validated choice)
    "pc-squash256": ("patchcore", {}, 256, "squash", "raw"),
    "pc-squash256-exposure": ("patchcore", {}, 256, "squash", "mean"),
    "pc-squash256-exposure-top1%": ("patchcore", {"topk": 0.01}, 256, "squash", "mean"),
    "pc-squash256-exposure-top3%": ("patchcore", {"topk": 0.03}, 256, "squash", "mean"),
    "pc-squash256-exposure-top10%": ("patchcore", {"topk": 0.1}, 256, "squash", "mean"),
    "pc-squash320-exposure-top3%": ("patchcore", {"topk": 0.03}, 320, "squash", "mean"),
    "pc-squash256-exposure-top3%-nn3": ("patchcore", {"topk": 0.03, "num_neighbors": 3}, 256, "squash", "mean"),
    "pc-squash256-exposure-top3%-lite2": ("patchcore", {"topk": 0.03, "backbone": "efficientnet_lite2"}, 256,
                                          "squash", "mean"),
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
    "pc-squash256-s4s8s16": ("patchcore", {"layers": ["stride4", "stride8", "stride16"]}, 256, "squash", "raw"),
    "padim-squash256": ("padim", {}, 256, "squash", "raw"),
    "padim-squash256-exposure-top3%": ("padim", {"topk": 0.03}, 256, "squash", "mean"),
}


def configured(name: str, bank: str, seed: int) -> Method:
    """The unfitted method of configuration ``name`` with ``bank``'s PatchCore bank and its input settings."""
    method_name, options, size, resize, exposure = CONFIGS[name]
    if method_name == "patchcore":  # named by their departures from the paper (PAPER_SETTINGS)
        base = {} if name == "pc-defaults" else {k: v for k, v in PAPER_SETTINGS.items() if k != "exposure"}
        options = {**base, **options, **BANKS[bank]}
    return build(method_name, device="cpu", seed=seed, size=size, resize=resize, exposure=exposure, **options)


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
                start = time.perf_counter()
                metrics = validation_metrics(method, val_root, args.category)
                pred_s = time.perf_counter() - start
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
                method = configured(name, args.bank, args.seed)
                train = AnomalyDataset(args.dataset, args.category, "train", samples=subset, **method.input_settings())
                start = time.perf_counter()
                method.fit(train)
                fit_s = time.perf_counter() - start
                metrics = validation_metrics(method, val_root, args.category)
                pred_s = time.perf_counter() - start - fit_s
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
