"""Train and predict runners: run folders in, submission-layout maps out.

``train`` writes one run folder per category, ``<out>/<Category>/`` holding the saved method
(``config.json`` + ``weights.pt``) and ``run.json`` (dataset, category, image size and resize mode,
seed, timings). ``predict`` reads a run folder (or a folder of them), scores the test split of the
same category, and writes ``<out>/<Category>/test/<defect>/<stem>.tiff`` at each image's native size
plus ``<out>/scores.csv``, which is exactly what ``3cad evaluate`` reads.

The test split is never opened while training; validation images (``validation/good``) are passed
to methods that use them.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from baselines.base import CONFIG_FILE, Method, build, get_method, load_method
from baselines.batching import iter_batches
from threecad import __version__
from threecad.data import AnomalyDataset, check_exposure
from threecad.device import resolve_device
from threecad.errors import ThreecadError, located
from threecad.io import image_size, write_json
from threecad.layout import list_categories, list_samples
from threecad.maps import SCORES_FILE, map_relpath, write_map, write_scores

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


def seed_everything(seed: int) -> None:
    """Seed Python, numpy's legacy global generator and torch (methods also take explicit seeds)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_categories(dataset: str | Path, categories: Sequence[str] | str | None) -> list[str]:
    """``None``, ``"all"`` or ``["all"]`` means every category of the dataset; names are checked."""
    present = list_categories(dataset)
    if categories is None or categories == "all" or list(categories) == ["all"]:
        return present
    if isinstance(categories, str):
        categories = [categories]
    unknown = [c for c in categories if c not in present]
    if unknown:
        raise ThreecadError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                            f"present: {', '.join(present)}", dataset)
    return list(dict.fromkeys(categories))


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


def _effective_seed(method: str, options: dict[str, Any], seed: int | None) -> int:
    if "seed" in options:
        return int(options["seed"])
    if seed is not None:
        return seed
    default = inspect.signature(get_method(method).__init__).parameters.get("seed")
    return int(default.default) if default is not None and isinstance(default.default, int) else 0


def train(
    method: str,
    dataset: str | Path,
    categories: Sequence[str] | str | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    size: int = 256,
    resize: str = "squash",
    seed: int | None = None,
    config: dict[str, Any] | None = None,
    validation: bool | str = "auto",
    exposure: str = "raw",
) -> list[Path]:
    """Fit ``method`` on the ``train/good`` images of each category; returns the run folders.

    ``out`` defaults to ``runs/<method>``. ``validation``: ``"auto"`` passes ``validation/good`` to
    the method when the dataset has it, ``True`` requires it, ``False`` never passes it.
    ``exposure``: ``"mean"`` normalises each image's mean intensity (:func:`threecad.data.normalize_exposure`);
    it is recorded in ``run.json`` and applied again by :func:`predict`.
    """
    dataset = Path(dataset)
    check_exposure(exposure)
    cats = resolve_categories(dataset, categories)
    out = Path(out) if out is not None else Path("runs") / method
    resolve_device(device)  # a missing GPU is reported before any work
    options = _method_config(method, config, device, seed)
    seed = _effective_seed(method, options, seed)
    build(method, **options)  # unknown options fail here, before any category is trained
    runs = []
    for category in cats:
        seed_everything(seed)
        run_dir = out / category
        start = time.perf_counter()
        train_set = AnomalyDataset(dataset, category, "train", size=size, resize=resize, exposure=exposure)
        val_set = None
        has_val = bool(list_samples(dataset, category, "validation"))
        if validation is True and not has_val:
            raise ThreecadError(f"no validation/good images for category {category!r}", dataset / category)
        if validation and has_val:
            val_set = AnomalyDataset(dataset, category, "validation", size=size, resize=resize, exposure=exposure)
        model = build(method, **options)
        new_dirs = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first
        run_dir.mkdir(parents=True, exist_ok=True)
        model.work_dir = run_dir
        log.info("training %s on %s (%d images, %s %d)", method, category, len(train_set), resize, size)
        fit_start = time.perf_counter()
        try:
            model.fit(train_set, val_set)
        except BaseException:
            for folder in new_dirs:  # a failed fit leaves no empty folders; checkpoints stay for --resume
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            raise
        fit_s = time.perf_counter() - fit_start
        model.save(run_dir)
        write_json(run_dir / RUN_FILE, {
            "method": method,
            "dataset": str(dataset.resolve()),
            "category": category,
            "size": size,
            "resize": resize,
            "exposure": exposure,
            "seed": seed,
            "device": str(resolve_device(device)),
            "train_images": len(train_set),
            "validation_images": len(val_set) if val_set is not None else 0,
            "timings": {"fit_s": round(fit_s, 3), "total_s": round(time.perf_counter() - start, 3)},
            "threecad": __version__,
        })
        log.info("%s: fitted in %.1f s -> %s", category, fit_s, run_dir)
        runs.append(run_dir)
    return runs


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


def native_size_maps(maps: np.ndarray, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Each (h, w) map resized (bilinear) back to its image's native (width, height)."""
    out = []
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    for i, (width, height) in enumerate(sizes):
        m = tensor[i]
        if tuple(m.shape) != (height, width):
            m = F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        out.append(m.numpy())
    return out


def predict(
    run: str | Path,
    dataset: str | Path,
    out: str | Path,
    dtype: str = "float32",
    batch_size: int = 16,
    device: str | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Score the test split of each run's category; writes maps and ``scores.csv`` under ``out``.

    ``config`` overrides options of the saved method that act at inference (``topk``, ``sigma``,
    CFRG's ``map_terms``), so a scoring choice can change without training again; an option the
    method lacks is an error naming the valid ones.

    Images are fed at the run's size, resize mode and exposure mode; maps are resized back to each
    image's native size. ``scores.csv`` (category, path below the category, score) covers every
    category predicted so far in ``out``: rows of other categories already there are kept.
    """
    if dtype not in ("float16", "float32"):
        raise ThreecadError(f"--dtype must be float16 or float32, not {dtype}")
    dataset, out = Path(dataset), Path(out)
    runs = find_runs(run)
    present = set(list_categories(dataset))
    if device is not None:
        resolve_device(device)
    rows: dict[tuple[str, str], float] = {}

    def loaded(run_dir: Path) -> tuple[dict, Method]:
        info = read_run(run_dir)
        if info["category"] not in present:
            raise ThreecadError(f"run {run_dir} is for category {info['category']!r}, which the dataset lacks", dataset)
        overrides = dict(config or {})
        if device is not None and "device" in json.loads((run_dir / CONFIG_FILE).read_text())["config"]:
            overrides["device"] = device
        return info, load_method(run_dir, **overrides)

    # A broken run is reported before any map is written. The models are not kept: every category's
    # CFRG network at once would not fit in memory, so each is loaded again when its turn comes.
    for run_dir in runs[1:]:
        loaded(run_dir)
    for run_dir in runs:
        info, method = loaded(run_dir)
        category = info["category"]
        test_set = AnomalyDataset(dataset, category, "test", size=info["size"], resize=info["resize"],
                                  exposure=info.get("exposure", "raw"))
        by_path = {str(s.image_path): s for s in test_set.samples}
        start = time.perf_counter()
        for images, items in iter_batches(test_set, batch_size, desc=f"predict {category}"):
            with located(run_dir):  # e.g. an override the fitted method does not match: name the run
                scores, maps = method.predict(images)
            samples = [by_path[item["path"]] for item in items]
            native = native_size_maps(maps, [image_size(s.image_path) for s in samples])
            for sample, score, amap in zip(samples, scores, native):
                write_map(out / map_relpath(category, sample.defect, sample.stem), amap, dtype=dtype)
                rows[(category, sample.relpath)] = float(score)
        log.info("%s: %d test images in %.1f s -> %s", category, len(test_set), time.perf_counter() - start,
                 out / category)
    write_scores(out / SCORES_FILE, rows)
    return out
