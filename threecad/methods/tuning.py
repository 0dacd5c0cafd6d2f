"""Choose a method's settings on the validation split: ``3cad tune``.

Unsupervised detectors see no defects while training, so a setting such as the resize mode would
otherwise be chosen on the test set, which inflates every reported figure. ``tune`` chooses among
a small grid on a **validation set** instead: each ``validation/good`` image once unchanged and once
per kind of synthetic anomaly (:func:`threecad.synth.validation.make_validation_set`). The test
split is never opened.

The grid is declared beside each method (``TUNE_GRID``: option name -> candidate values, the
method's default first) and can be replaced with ``grid=``. Options that shape the fit (input
settings, network widths) are fitted once per combination; inference options (``Option(predict=
True)``: ``topk``, ``sigma``, ...) are scored on each fitted model without fitting again, through
the same override path as ``3cad predict --set``. The criterion is :data:`CRITERION`, over all
validation images; ties go to the combination listed first, so the defaults win unless another
combination does better. Every candidate is fitted on all training images, so the chosen fit is the
final model: the run folder is what ``3cad train`` would write with the chosen settings, plus
``tuning.json`` (every candidate's validation metrics, the criterion, the choice) and the choice
recorded in ``run.json``.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from threecad.dataset.layout import list_samples
from threecad.dataset.loaders import AnomalyDataset
from threecad.dataset.masks import read_mask
from threecad.errors import ThreecadError
from threecad.io import image_size, staged_dir, write_json
from threecad.methods.batching import iter_batches
from threecad.methods.inputs import native_size_maps
from threecad.methods.method import INPUT_OPTIONS, Method
from threecad.methods.registry import get_method, load_method
from threecad.methods.runner import _move_work_files, fit_category, prepare_run, save_run
from threecad.metrics import Evaluator
from threecad.synth.validation import KINDS, check_kinds, make_validation_set

log = logging.getLogger(__name__)

#: What a candidate is ranked by: the mean of these metrics over every validation image.
CRITERION = ("i_auroc", "p_auroc")
TUNING_FILE = "tuning.json"


def declared_grid(method: str) -> dict[str, list[Any]]:
    """The method's ``TUNE_GRID`` (``{}`` when it declares none)."""
    return {key: list(values) for key, values in get_method(method).TUNE_GRID.items()}


def candidates(method: str, grid: dict[str, Sequence[Any]]) -> tuple[list[dict], list[dict]]:
    """Fit-time combinations and inference-only combinations of ``grid`` (each in declared order).

    Every value is checked against the method's option declaration first, so a bad grid fails
    before any fit.
    """
    cls = get_method(method)
    options = cls.options()
    for key, values in grid.items():
        if key not in options:
            raise ThreecadError(f"method {method!r} has no option {key!r} to tune; its options: "
                                f"{', '.join(sorted(options))}")
        if not values:
            raise ThreecadError(f"tuning grid for {key!r} has no values")
        for value in values:
            options[key].check(method, key, value)
    predict_keys = [k for k in grid if options[k].predict and k not in INPUT_OPTIONS]
    fit_keys = [k for k in grid if k not in predict_keys]

    def product(keys: list[str]) -> list[dict]:
        return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]

    return product(fit_keys), product(predict_keys)


def validation_metrics(method: Method, val_root: Path, category: str, batch_size: int = 8) -> dict[str, dict]:
    """Standard metrics of ``method`` on a validation set, per anomaly kind (that kind's images against
    every normal) and over all of them (``"all"``), at native resolution."""
    evaluator = Evaluator()
    data = AnomalyDataset(val_root, category, "test", **method.input_settings())
    kinds = sorted({s.defect for s in data.samples if s.label})
    by_path = {str(s.image_path): s for s in data.samples}
    for images, items in iter_batches(data, batch_size, desc=f"validate {category}"):
        with torch.no_grad():
            scores, maps = method.predict_batch(images)
        samples = [by_path[item["path"]] for item in items]
        native = native_size_maps(maps, [image_size(s.image_path) for s in samples])
        for sample, value, amap in zip(samples, scores, native):
            mask = read_mask(sample.mask_path) if sample.label else np.zeros(amap.shape, bool)
            for group in ["all", *(kinds if not sample.label else [sample.defect])]:
                evaluator.update([amap], [mask], image_scores=[float(value)], categories=group)
    return evaluator.compute()["categories"]


def criterion(metrics: dict[str, dict]) -> float:
    return float(np.mean([metrics["all"][m] for m in CRITERION]))


def _label(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


def tune(
    method: str,
    dataset: str | Path,
    categories: Sequence[str] | str | None = None,
    out: str | Path | None = None,
    grid: dict[str, Sequence[Any]] | None = None,
    device: str = "auto",
    seed: int | None = None,
    config: dict[str, Any] | None = None,
    kinds: Sequence[str] = KINDS,
    overwrite: bool = False,
) -> list[Path]:
    """Choose ``method``'s settings per category on the validation split; returns the run folders.

    ``grid``: option -> candidate values (default: the method's ``TUNE_GRID``). Options given in
    ``config`` are fixed and leave the grid. ``kinds``: the synthetic anomaly kinds of the
    validation set. ``out`` (default ``runs/<method>-tuned``) is written like :func:`train`'s.
    """
    dataset = Path(dataset)
    check_kinds(kinds)
    out = Path(out) if out is not None else Path("runs") / f"{method}-tuned"
    config = dict(config or {})
    cats, base, seed = prepare_run(method, dataset, categories, out, overwrite, device, seed, config)
    missing = [c for c in cats if not list_samples(dataset, c, "validation")]
    if missing:
        raise ThreecadError(f"tune needs validation/good images, and {', '.join(missing)} has none: make them with "
                            "`3cad data import-folder ... --validation-fraction 0.15` or `3cad data split "
                            "--val-fraction 0.15`", dataset)
    grid = {k: list(v) for k, v in (declared_grid(method) if grid is None else grid).items() if k not in config}
    fit_grid, predict_grid = candidates(method, grid)
    for fit_settings in fit_grid:  # every combination is built once before any work
        get_method(method)(**{**base, **fit_settings})
    log.info("tune %s: %d fit(s) x %d scoring(s) per category, criterion mean of %s", method, len(fit_grid),
             len(predict_grid), "+".join(CRITERION))
    with staged_dir(out) as stage:
        scratch = stage / ".tuning"
        for category in cats:
            _tune_category(method, dataset, category, base, seed, fit_grid, predict_grid, stage / category,
                           scratch, device, tuple(kinds))
        shutil.rmtree(scratch, ignore_errors=True)
    return [out / category for category in cats]


def _tune_category(method: str, dataset: Path, category: str, base: dict[str, Any], seed: int,
                   fit_grid: list[dict], predict_grid: list[dict], run_dir: Path, scratch: Path, device: str,
                   kinds: tuple[str, ...]) -> None:
    start = time.perf_counter()
    val_root = make_validation_set(dataset, category, scratch / "validation" / category, seed=seed, kinds=kinds)
    results, best = [], None
    for i, fit_settings in enumerate(fit_grid):
        options = {**base, **fit_settings}
        work = scratch / "work" / category / str(i)
        model, record = fit_category(method, dataset, category, options, seed, work, device=device)
        fitted = save_run(scratch / "fits" / category / str(i), model, record)
        for predict_settings in predict_grid:
            scored = load_method(fitted, **predict_settings) if predict_settings else model
            metrics = validation_metrics(scored, val_root, category)
            value = criterion(metrics)
            settings = {**fit_settings, **predict_settings}
            results.append({"settings": settings, "criterion": value, "metrics": metrics,
                            "fit_s": record["timings"]["fit_s"]})
            log.info("%s: %s -> %.4f (I-AUROC %.3f, P-AUROC %.3f)", category, _label(settings), value,
                     metrics["all"]["i_auroc"], metrics["all"]["p_auroc"])
            if best is None or value > best[0]:
                best = (value, settings, fitted, predict_settings, record, work)
        del model
    value, settings, fitted, predict_settings, record, work = best
    chosen = load_method(fitted, **predict_settings)
    tuning = {"criterion": f"mean of {', '.join(CRITERION)} over all validation images", "chosen": settings,
              "chosen_criterion": value, "kinds": list(kinds), "seed": seed,
              "validation_images": len(list_samples(dataset, category, "validation")), "candidates": results,
              "tune_s": round(time.perf_counter() - start, 3)}
    save_run(run_dir, chosen, {**record, "tuning": {"chosen": settings, "criterion": value}})
    write_json(run_dir / TUNING_FILE, tuning)
    _move_work_files(work, run_dir)  # the chosen fit's training log, as `3cad train` keeps it
    log.info("%s: chose %s (%.4f) of %d candidates", category, _label(settings), value, len(results))
