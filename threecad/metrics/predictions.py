"""Evaluate a predictions folder in the submission layout against a dataset's ground truth.

The folder is checked by the rules of :mod:`threecad.maps.files`, the same functions the leaderboard
validator uses: exactly one ``<Category>/test/<defect>/<stem>.tiff`` per test image, float16 or
float32, at the image's size (or the declared ``size``), finite, and a ``scores.csv`` (if any)
with one finite score per test image. Any problem is an error naming the file, so a leaderboard
never scores a partial submission and ``evaluate`` never scores one the leaderboard would refuse.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from threecad.dataset.catalog import resolve_categories
from threecad.dataset.layout import list_categories, list_samples
from threecad.errors import ThreecadError
from threecad.io import image_size
from threecad.maps.files import SCORES_FILE, check_map_files, map_relpath, read_map, read_scores
from threecad.metrics.evaluator import DEFAULT_MEMORY_BUDGET, METRICS, Evaluator
from threecad.progress import progress

log = logging.getLogger(__name__)

BATCH = 32


def _parse_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    width, height = size
    return int(width), int(height)


def evaluate_predictions(
    dataset_root: str | Path,
    predictions_dir: str | Path,
    protocol: str = "mvtec",
    categories: Sequence[str] | None = None,
    device: str = "cpu",
    size: int | tuple[int, int] | None = None,
    curves: bool = False,
    scores: str | Path | dict | None = "auto",
    memory_budget: int | float | str | None = DEFAULT_MEMORY_BUDGET,
    spill_dir: str | Path | None = None,
) -> dict:
    """Score a predictions folder; returns the :meth:`Evaluator.compute` dictionary.

    ``categories`` defaults to every category of the dataset, and then every file of the folder
    must belong to it (a category the dataset lacks is an error too); explicit names may be
    folders, 3CAD codes (``ANI``) or catalogue aliases
    (:func:`threecad.dataset.catalog.resolve_categories`), and then only those category folders, and
    ``scores.csv`` rows of those categories, are looked at. ``size`` evaluates at a declared
    (width, height) instead of the native resolution (``mvtec`` protocol only); the maps must then
    have that size.

    ``scores`` gives the image scores: ``"auto"`` reads ``<predictions>/scores.csv`` when it exists
    (else the image score is the max of the map), a path reads that file, a dict maps
    ``(category, "test/<defect>/<file>")`` to a score, ``None`` ignores any scores file. The
    ``3cad-paper`` protocol defines its own image score and ignores them.

    ``memory_budget`` / ``spill_dir``: see :class:`Evaluator` (float32 maps beyond the budget spill
    to a temporary folder, removed when this returns or raises; results are unchanged).
    """
    root, predictions = Path(dataset_root), Path(predictions_dir)
    if not predictions.is_dir():
        raise ThreecadError("predictions folder not found", predictions)
    available = list_categories(root)
    # folders, 3CAD codes or aliases; every category when none is named
    chosen = resolve_categories(available, categories, root) if categories else available
    declared = _parse_size(size)
    samples = {category: list_samples(root, category, "test") for category in chosen}
    for category, found in samples.items():
        if not found:
            raise ThreecadError(f"category {category} has no test images", root / category)
    expected = {map_relpath(c, s.defect, s.stem): s for c in chosen for s in samples[c]}
    missing, unexpected = check_map_files(predictions, expected, chosen, within=chosen if categories else None)
    if missing:
        raise ThreecadError(f"{len(missing)} map(s) missing, e.g. {missing[0]}", predictions)
    if unexpected:
        raise ThreecadError(f"{len(unexpected)} file(s) with no matching test image (or a second map for one "
                            f"image), e.g. {unexpected[0]}", predictions)
    if isinstance(scores, str) and scores == "auto":
        scores = predictions / SCORES_FILE if (predictions / SCORES_FILE).is_file() else None
    if protocol == "3cad-paper":
        scores = None
    elif scores is not None:
        keys = [(c, s.relpath) for c in chosen for s in samples[c]]
        scores = read_scores(scores, keys, within=chosen if categories else None)
    with Evaluator(protocol=protocol, device=device, size=declared, memory_budget=memory_budget,
                   spill_dir=spill_dir) as evaluator:
        return _evaluate(evaluator, predictions, chosen, samples, declared, scores, curves)


def _evaluate(evaluator: Evaluator, predictions: Path, chosen: list[str], samples: dict, declared, scores,
              curves: bool) -> dict:
    """Feed every category's maps and masks, batch by batch, then compute."""
    for category in chosen:
        chunks = range(0, len(samples[category]), BATCH)
        for start in progress(chunks, desc=f"evaluate {category}", total=len(chunks)):
            chunk = samples[category][start : start + BATCH]
            maps, masks = [], []
            for sample in chunk:
                native = image_size(sample.image_path)
                path = predictions / map_relpath(category, sample.defect, sample.stem)
                maps.append(read_map(path, expected=declared or native))
                masks.append(ground_truth_mask(sample, native))
            image_scores = None if scores is None else [scores[(category, s.relpath)] for s in chunk]
            evaluator.update(maps, masks, image_scores=image_scores, labels=[s.label for s in chunk],
                             categories=category)
    return evaluator.compute(curves=curves)


def ground_truth_mask(sample, size: tuple[int, int] | None = None) -> np.ndarray:
    """The boolean mask of a test image at its native ``size`` (width, height; read from the image
    when not given), all False for a good image."""
    from threecad.dataset.masks import read_mask  # imports torch: only when a folder is evaluated

    width, height = size or image_size(sample.image_path)
    if sample.label == 0:
        return np.zeros((height, width), dtype=bool)
    if sample.mask_path is None or not sample.mask_path.is_file():
        raise ThreecadError(f"ground-truth mask missing: defective test image {sample.category}/{sample.relpath} "
                            "needs it to be evaluated", sample.mask_path or sample.image_path)
    return read_mask(sample.mask_path, expected_size=(width, height))


def format_table(result: dict) -> str:
    """Rows = categories + mean, columns = metrics, percentages with one decimal ('n/a' = undefined)."""
    headers = ["category", *METRICS]
    rows = [[name, *(result["categories"][name][m] for m in METRICS)] for name in result["categories"]]
    rows.append(["mean", *(result["mean"][m] for m in METRICS)])
    cells = [[str(row[0]), *("n/a" if v is None else f"{100 * v:.1f}" for v in row[1:])] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [f"protocol: {result['protocol']}"]
    lines.append(
        "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(headers))
    )
    for row in cells:
        lines.append(
            "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row))
        )
    return "\n".join(lines)
