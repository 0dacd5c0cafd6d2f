"""Train and predict runners: run folders in, submission-layout maps out.

``train`` writes one run folder per category, ``<out>/<Category>/`` holding the saved method
(``config.json`` + ``weights.pt``; its configuration includes the input options ``size``, ``resize``
and ``exposure``, see :data:`threecad.methods.INPUT_OPTIONS`) and ``run.json`` (dataset, category,
the same input settings as a record, seed, timings). ``predict`` reads a run folder (or a folder of
them), scores the test split of the same category at the method's own input settings, and writes
``<out>/<Category>/test/<defect>/<stem>.tiff`` at each image's native size plus
``<out>/scores.csv``, which is exactly what ``3cad evaluate`` reads. The maps are those
``load_method(run).predict(images)`` returns for the same images.

Under ``torchrun`` every rank takes part in ``train`` (the methods' fits are distributed) and only
rank 0 writes; ``predict`` runs on rank 0 alone.

The test split is never opened while training; validation images (``validation/good``) are passed
to methods that use them. ``predict`` reads test images only, never their ground-truth masks.

Output folders: both refuse a non-empty ``out`` without ``overwrite`` (a PaDiM run silently replaced
by PatchCore, or PatchCore maps landing in a folder of PaDiM maps, is a wrong result nobody sees),
and both build ``out`` in a hidden sibling that replaces it only when everything succeeded
(:func:`threecad.io.staged_dir`): a failing run leaves the previous content as it was. A method's
own training artefacts (CFRG's per-epoch checkpoints) live in ``.<out>.checkpoints/<Category>``
next to ``out`` while training, so an interrupted run can ``--resume`` from them; they move into the
run folders when the whole run has succeeded.

Unified models: a method with the option :data:`UNIFIED_OPTION` set (UniAD's default, the paper's
"unified" setting) is fitted **once** on the union of the categories' ``train/good`` (and
``validation/good``) images when ``train`` is given several categories, and that one model is saved
into every category's run folder (``run.json``: ``"fit_categories"`` lists the categories it was
fitted on, for every run). ``predict``, ``evaluate`` and the leaderboard read such runs like any
other. The fit's artefacts live in ``.<out>.checkpoints/.unified`` while it trains (``--resume``
continues from there) and end in the first category's run folder; the others get a copy of the
training log.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from threecad import __version__
from threecad.dataset.catalog import resolve_categories
from threecad.dataset.layout import list_categories, list_samples
from threecad.dataset.loaders import AnomalyDataset
from threecad.dataset.transforms import check_exposure
from threecad.device import resolve_device
from threecad.errors import ThreecadError, located
from threecad.io import check_output_dir, image_size, staged_dir, write_bytes, write_json
from threecad.maps.files import SCORES_FILE, map_relpath, write_map, write_scores
from threecad.methods.batching import iter_batches
from threecad.methods.inputs import native_size_maps
from threecad.methods.method import CONFIG_FILE, INPUT_OPTIONS, RUN_FILE, Method
from threecad.methods.registry import build, get_method, load_method
from threecad.methods.training import LOG_FILE, seed_all

log = logging.getLogger(__name__)

#: The runner's input settings when neither the call nor the method's options give them.
DEFAULT_INPUTS = {"size": 256, "resize": "squash", "exposure": "raw"}
#: The option of a method that fits one model on the union of the categories it is given (UniAD).
UNIFIED_OPTION = "unified"
#: The work folder of a unified fit, beside the categories' ones (a dot name: no category folder).
UNIFIED_WORK = ".unified"


def is_unified(method: str, options: dict[str, Any]) -> bool:
    """Whether :func:`train` fits one model for all its categories: the method has
    :data:`UNIFIED_OPTION` and it is true in ``options`` (else in the method's defaults)."""
    cls = get_method(method)
    return UNIFIED_OPTION in cls.config_keys() and bool(options.get(UNIFIED_OPTION, cls.defaults()[UNIFIED_OPTION]))


def _refuse_inputs_inside(out: Path, inputs: dict[str, Path]) -> None:
    """``--overwrite`` replaces ``out`` wholesale: refuse an ``out`` that holds an input of the job."""
    target = out.resolve()
    for what, path in inputs.items():
        if path.resolve().is_relative_to(target):
            raise ThreecadError(f"the output folder holds the {what} ({path}); choose another --out", out)


def _is_main_process() -> bool:
    """False on the other ranks of a ``torchrun`` job: every rank fits, only rank 0 writes."""
    return int(os.environ.get("RANK", "0")) == 0


def _checkpoint_dir(out: Path) -> Path:
    """Where methods keep training artefacts while ``out`` is staged: beside it, so they survive a
    failure (for ``--resume``) without touching ``out`` itself."""
    return out.parent / f".{out.name}.checkpoints"


def _move_work_files(work: Path, run_dir: Path) -> None:
    """A category's training artefacts (checkpoints, logs) into its finished run folder."""
    if work.is_dir():
        for item in sorted(work.iterdir()):
            if not (run_dir / item.name).exists():
                os.replace(item, run_dir / item.name)


def _method_config(method: str, config: dict[str, Any] | None, device: str, seed: int | None) -> dict[str, Any]:
    """User options plus device and seed where the method takes them (never overriding the user).

    ``seed=None`` keeps the method's own default (CFRG's is the paper's 42).
    """
    keys = get_method(method).config_keys()
    merged = dict(config or {})
    if "device" in keys:
        merged.setdefault("device", device)
    if "seed" in keys and seed is not None:
        merged.setdefault("seed", seed)
    return merged


def _input_options(method: str, options: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The input options the method is built with: ``size``/``resize``/``exposure`` given to
    :func:`train` (``--size``...), else in ``config`` (``--set size=...``), else the method's
    recommendation (:attr:`~threecad.methods.Method.DEFAULT_INPUTS`) over :data:`DEFAULT_INPUTS`.
    Both, with different values, is an error: which one was meant is not known."""
    merged = dict(options)
    recommended = {**DEFAULT_INPUTS, **get_method(method).DEFAULT_INPUTS}
    for key in INPUT_OPTIONS:
        value = given.get(key)
        if value is not None and key in merged and merged[key] != value:
            raise ThreecadError(f"{key} is given twice ({merged[key]!r} as an option, {value!r} as --{key}); "
                                f"give it once, as --{key}")
        merged[key] = value if value is not None else merged.get(key, recommended[key])
    return merged


def _effective_seed(method: str, options: dict[str, Any], seed: int | None) -> int:
    if "seed" in options:
        return int(options["seed"])
    if seed is not None:
        return seed
    default = inspect.signature(get_method(method).__init__).parameters.get("seed")
    return int(default.default) if default is not None and isinstance(default.default, int) else 0


def prepare_run(method: str, dataset: Path, categories: Sequence[str] | str | None, out: Path, overwrite: bool,
                device: str, seed: int | None, config: dict[str, Any] | None,
                inputs: dict[str, Any] | None = None) -> tuple[list[str], dict[str, Any], int]:
    """What :func:`train` and :func:`threecad.methods.tuning.tune` check before any work: the
    categories, the output folder (refused when non-empty without ``overwrite``, or holding the
    dataset), the device, and the method's options with device, seed and input options merged in
    and built once. Returns ``(categories, options, seed)``."""
    cats = resolve_categories(list_categories(dataset), categories, dataset)
    check_output_dir(out, overwrite)
    _refuse_inputs_inside(out, {"dataset": dataset})
    resolve_device(device)  # a missing GPU is reported before any work
    options = _input_options(method, _method_config(method, config, device, seed), inputs or {})
    seed = _effective_seed(method, options, seed)
    build(method, **options)  # unknown or out-of-range options fail here, before any category is trained
    return cats, options, seed


def train(
    method: str,
    dataset: str | Path,
    categories: Sequence[str] | str | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    size: int | None = None,
    resize: str | None = None,
    seed: int | None = None,
    config: dict[str, Any] | None = None,
    validation: bool | str = "auto",
    exposure: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Fit ``method`` on the ``train/good`` images of each category; returns the run folders.

    ``out`` defaults to ``runs/<method>``; a non-empty ``out`` is refused unless ``overwrite``, and
    it is replaced only once every category is fitted (see the module docstring). ``categories``:
    folder names, 3CAD codes or aliases, or ``"all"`` (:func:`threecad.dataset.catalog.resolve_categories`).
    ``validation``: ``"auto"`` passes ``validation/good`` to the method when the dataset has it,
    ``True`` requires it, ``False`` never passes it. ``size``, ``resize`` and ``exposure`` are the
    method's input options (``None``: the value in ``config``, else the method's recommendation,
    else 256, ``"squash"``, ``"raw"``);
    ``exposure="mean"`` normalises each image's mean intensity
    (:func:`threecad.dataset.transforms.normalize_exposure`). They are saved with the method, recorded in
    ``run.json``, and applied again by :func:`predict` and by the loaded method's ``predict``.
    """
    dataset = Path(dataset)
    if exposure is not None:
        check_exposure(exposure)
    out = Path(out) if out is not None else Path("runs") / method
    cats, options, seed = prepare_run(method, dataset, categories, out, overwrite, device, seed, config,
                                      {"size": size, "resize": resize, "exposure": exposure})
    checkpoints = _checkpoint_dir(out)
    if not _is_main_process():  # torchrun: this rank takes part in every fit; rank 0 writes
        _train_categories(method, dataset, cats, options, seed, None, checkpoints, validation, device)
        return [out / category for category in cats]
    if not options.get("resume"):
        shutil.rmtree(checkpoints, ignore_errors=True)  # a fresh run never inherits another run's artefacts
    try:
        with staged_dir(out) as stage:
            _train_categories(method, dataset, cats, options, seed, stage, checkpoints, validation, device)
            for category in cats:
                _move_work_files(checkpoints / category, stage / category)
            if len(cats) > 1 and is_unified(method, options):
                _move_work_files(checkpoints / UNIFIED_WORK, stage / cats[0])
                log_file = stage / cats[0] / LOG_FILE
                for category in cats[1:] if log_file.is_file() else ():
                    write_bytes(stage / category / LOG_FILE, log_file.read_bytes())
    except BaseException:
        if any(p.is_file() for p in checkpoints.rglob("*")):
            log.warning("training artefacts kept in %s: rerun with --resume to continue", checkpoints)
        else:
            shutil.rmtree(checkpoints, ignore_errors=True)
        raise
    shutil.rmtree(checkpoints, ignore_errors=True)
    return [out / category for category in cats]


def _train_categories(method: str, dataset: Path, cats: list[str], options: dict[str, Any], seed: int,
                      stage: Path | None, checkpoints: Path, validation: bool | str, device: str) -> None:
    """Fit and save each category into ``stage/<Category>`` (``None``: fit only, another rank writes);
    a unified method (:func:`is_unified`) is fitted once on all of them and saved into each."""
    if len(cats) > 1 and is_unified(method, options):
        model, record = fit_categories(method, dataset, cats, options, seed, checkpoints / UNIFIED_WORK, validation,
                                       device)
        for category in cats if stage is not None else ():
            save_run(stage / category, model, {**record, "category": category})
        return
    for category in cats:
        model, record = fit_category(method, dataset, category, options, seed, checkpoints / category, validation,
                                     device)
        if stage is not None:
            save_run(stage / category, model, record)


def fit_category(method: str, dataset: Path, category: str, options: dict[str, Any], seed: int,
                 work_dir: Path | None, validation: bool | str = "auto",
                 device: str = "auto") -> tuple[Method, dict[str, Any]]:
    """Build ``method`` with ``options`` and fit it on ``category``'s ``train/good`` images.

    Returns the fitted method and its run record (what :func:`save_run` writes as ``run.json``).
    ``work_dir``: the method's folder for checkpoints and logs while it trains.
    """
    return fit_categories(method, dataset, [category], options, seed, work_dir, validation, device)


def fit_categories(method: str, dataset: Path, categories: Sequence[str], options: dict[str, Any], seed: int,
                   work_dir: Path | None, validation: bool | str = "auto",
                   device: str = "auto") -> tuple[Method, dict[str, Any]]:
    """:func:`fit_category` on the union of several categories' images (one unified model); the
    record's ``category`` is the first of them, ``fit_categories`` all of them."""
    seed_all(seed)
    start = time.perf_counter()
    model = build(method, **options)
    inputs = model.input_settings()  # the datasets are loaded as the method will see images
    train_sets, val_sets = [], []
    for category in categories:
        train_sets.append(AnomalyDataset(dataset, category, "train", **inputs))
        has_val = bool(list_samples(dataset, category, "validation"))
        if validation is True and not has_val:
            raise ThreecadError(f"no validation/good images for category {category!r}", dataset / category)
        if validation and has_val:
            val_sets.append(AnomalyDataset(dataset, category, "validation", **inputs))
    train_set = train_sets[0] if len(train_sets) == 1 else torch.utils.data.ConcatDataset(train_sets)
    val_set = None if not val_sets else val_sets[0] if len(val_sets) == 1 else torch.utils.data.ConcatDataset(val_sets)
    model.work_dir = work_dir
    names = ", ".join(categories)
    log.info("training %s on %s (%d images, %s %s, exposure %s)", method, names, len(train_set),
             inputs["resize"], inputs["size"], inputs["exposure"])
    fit_start = time.perf_counter()
    model.fit(train_set, val_set)
    fit_s = time.perf_counter() - fit_start
    log.info("%s: fitted in %.1f s", names, fit_s)
    return model, {
        "method": method,
        "dataset": str(dataset.resolve()),
        "category": categories[0],
        "fit_categories": list(categories),
        **inputs,  # a record: the method's own config.json holds what predict uses
        "seed": seed,
        "device": str(resolve_device(device)),
        "train_images": len(train_set),
        "validation_images": len(val_set) if val_set is not None else 0,
        "timings": {"fit_s": round(fit_s, 3), "total_s": round(time.perf_counter() - start, 3)},
        "threecad": __version__,
    }


def save_run(run_dir: Path, model: Method, record: dict[str, Any]) -> Path:
    """Write a run folder: the saved method (``config.json``, ``weights.pt``) and ``run.json``."""
    model.save(run_dir)
    write_json(run_dir / RUN_FILE, record)
    return run_dir


def find_runs(run: str | Path) -> list[Path]:
    """A run folder itself, or the run folders directly inside ``run``."""
    run = Path(run)
    if (run / CONFIG_FILE).is_file() and (run / RUN_FILE).is_file():
        return [run]
    if run.is_dir():
        found = sorted(p for p in run.iterdir() if (p / CONFIG_FILE).is_file() and (p / RUN_FILE).is_file())
        if found:
            return found
    raise ThreecadError(f"not a run folder (no {RUN_FILE} + {CONFIG_FILE}, nor sub-folders with them)", run)


def read_run(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ThreecadError(f"unreadable {RUN_FILE} ({exc})", run_dir) from None


def predict(
    run: str | Path,
    dataset: str | Path,
    out: str | Path,
    dtype: str = "float32",
    batch_size: int = 16,
    device: str | None = None,
    config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Score the test split of each run's category; writes maps and ``scores.csv`` under ``out``.

    ``config`` overrides inference options of the saved method (``topk``, ``sigma``, CFRG's
    ``map_terms``: those its ``OPTIONS`` mark ``predict``), so a scoring choice can change without
    training again; an option the method lacks, a value out of range or a fit-time option
    (``coreset_ratio``, ``backbone``) is an error naming the run, before any map is written.

    Images are fed at the method's input settings (its saved ``size``, ``resize``, ``exposure``;
    recorded in its ``config.json``); maps are resized back to
    each image's native size, exactly as ``load_method(run).predict`` returns them. Under
    ``torchrun`` only rank 0 predicts (the others return at once). Only images are read: a defective
    test image whose ground-truth mask is missing still gets its map (``evaluate`` is where masks
    are needed). ``out`` holds exactly this prediction: a non-empty ``out`` is refused unless
    ``overwrite``, and it is replaced only once every map and ``scores.csv`` (category, path below
    the category, score) are written.
    """
    if dtype not in ("float16", "float32"):
        raise ThreecadError(f"--dtype must be float16 or float32, not {dtype}")
    dataset, out = Path(dataset), Path(out)
    if not _is_main_process():  # torchrun: prediction is not distributed; rank 0 writes everything
        log.info("predict: rank %s leaves the prediction to rank 0", os.environ.get("RANK"))
        return out
    runs = find_runs(run)
    check_output_dir(out, overwrite)
    _refuse_inputs_inside(out, {"dataset": dataset, **{f"run {r}": r for r in runs}})
    available = list_categories(dataset)
    if device is not None:
        resolve_device(device)
    rows: dict[tuple[str, str], float] = {}

    def loaded(run_dir: Path) -> tuple[dict, str, Method]:
        info = read_run(run_dir)
        try:  # the run names its category: resolved like any other name (codes, aliases)
            category = resolve_categories(available, [info["category"]], dataset)[0]
        except ThreecadError as exc:
            raise ThreecadError(f"the run's category is not in the dataset: {exc}", run_dir) from None
        overrides = dict(config or {})
        if device is not None and "device" in json.loads((run_dir / CONFIG_FILE).read_text())["config"]:
            overrides["device"] = device
        return info, category, load_method(run_dir, **overrides)

    # A broken run is reported before any map is written. The models are not kept: every category's
    # CFRG network at once would not fit in memory, so each is loaded again when its turn comes.
    for run_dir in runs[1:]:
        loaded(run_dir)
    with staged_dir(out) as stage:
        for run_dir in runs:
            info, category, method = loaded(run_dir)
            samples = list_samples(dataset, category, "test")
            # Images only: masks are the evaluator's business, so the loader is handed the samples
            # without them (label 0 tells it not to look for one); maps are named from the real ones.
            test_set = AnomalyDataset(dataset, category, "test", **method.input_settings(),
                                      samples=[replace(s, mask_path=None, label=0) for s in samples])
            by_path = {str(s.image_path): s for s in samples}
            start = time.perf_counter()
            for images, items in iter_batches(test_set, batch_size, desc=f"predict {category}"):
                with located(run_dir), torch.no_grad():  # e.g. an override the fitted method does not match
                    scores, maps = method.predict_batch(images)
                chosen = [by_path[item["path"]] for item in items]
                native = native_size_maps(maps, [image_size(s.image_path) for s in chosen])
                for sample, score, amap in zip(chosen, scores, native):
                    write_map(stage / map_relpath(category, sample.defect, sample.stem), amap, dtype=dtype)
                    rows[(category, sample.relpath)] = float(score)
            log.info("%s: %d test images in %.1f s -> %s", category, len(test_set), time.perf_counter() - start,
                     out / category)
        write_scores(stage / SCORES_FILE, rows, merge=False)
    return out
