"""Evaluate a predictions folder in the submission layout against a dataset's ground truth.

The folder must hold exactly one map per test image (``<Category>/test/<defect>/<stem>.tiff`` or
``.npy``): a missing map, a map with no test image, a second map for one image, NaN/inf or a map
that is not 2-D is an error naming the file, so a leaderboard never scores a partial submission.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from threecad.catalog import resolve_categories
from threecad.errors import ThreecadError
from threecad.io import image_size
from threecad.layout import list_categories, list_samples
from threecad.maps import MAP_SUFFIXES, SCORES_FILE, find_map, read_map, read_scores
from threecad.metrics.evaluator import METRICS, Evaluator
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


def _check_layout(predictions: Path, category: str, samples: list, paths: list[Path | None]) -> None:
    """Every test image has its map and every map file belongs to a test image."""
    missing = [sample for sample, path in zip(samples, paths) if path is None]
    if missing:
        sample = missing[0]
        raise ThreecadError(
            f"{len(missing)} map(s) missing for category {category}, e.g. for test image {sample.relpath} "
            f"(expected {category}/test/{sample.defect}/{sample.stem}.tiff or .npy)",
            predictions,
        )
    test_dir = predictions / category / "test"
    found = {p for p in test_dir.rglob("*") if p.is_file() and p.suffix.lower() in MAP_SUFFIXES}
    extra = sorted(found - set(paths))
    if extra:
        raise ThreecadError(
            f"{len(extra)} map(s) with no matching test image (or a second map for one image), "
            f"e.g. {extra[0].relative_to(predictions)}",
            predictions,
        )


def evaluate_predictions(
    dataset_root: str | Path,
    predictions_dir: str | Path,
    protocol: str = "mvtec",
    categories: Sequence[str] | None = None,
    device: str = "cpu",
    size: int | tuple[int, int] | None = None,
    curves: bool = False,
    scores: str | Path | dict | None = "auto",
) -> dict:
    """Score a submission folder; returns the :meth:`Evaluator.compute` dictionary.

    ``categories`` defaults to every category of the dataset, and then a predictions folder with a
    category the dataset lacks is an error too; names may be folders, 3CAD codes (``ANI``) or
    catalogue aliases (:func:`threecad.catalog.resolve_categories`). ``size`` evaluates at a
    declared (width, height) instead of the native resolution (``mvtec`` protocol only).

    ``scores`` gives the image scores: ``"auto"`` reads ``<predictions>/scores.csv`` when it exists
    (else the image score is the max of the map), a path reads that file, a dict maps
    ``(category, "test/<defect>/<file>")`` to a score, ``None`` ignores any scores file. The
    ``3cad-paper`` protocol defines its own image score and ignores them.
    """
    root, predictions = Path(dataset_root), Path(predictions_dir)
    if not predictions.is_dir():
        raise ThreecadError("predictions folder not found", predictions)
    available = list_categories(root)
    if categories:
        chosen = resolve_categories(available, categories, root)  # folders, 3CAD codes or aliases
    else:
        chosen = available
        stray = sorted(p.name for p in predictions.iterdir() if p.is_dir() and p.name not in available)
        if stray:
            raise ThreecadError(
                f"predictions for categories the dataset lacks: {', '.join(stray)}", predictions
            )
    if isinstance(scores, str) and scores == "auto":
        scores = predictions / SCORES_FILE if (predictions / SCORES_FILE).is_file() else None
    if isinstance(scores, (str, Path)):
        scores = read_scores(scores)
    if protocol == "3cad-paper":
        scores = None
    evaluator = Evaluator(protocol=protocol, device=device, size=_parse_size(size))
    for category in chosen:
        samples = list_samples(root, category, "test")
        if not samples:
            raise ThreecadError(f"category {category} has no test images", root / category)
        paths = [find_map(predictions, category, s.defect, s.stem) for s in samples]
        _check_layout(predictions, category, samples, paths)
        if scores is not None:
            absent = [s.relpath for s in samples if (category, s.relpath) not in scores]
            if absent:
                raise ThreecadError(
                    f"{len(absent)} test image(s) of {category} have no score, e.g. {absent[0]}; "
                    f"give every image a score or remove {SCORES_FILE}",
                    predictions / SCORES_FILE,
                )
        batches = range(0, len(samples), BATCH)
        for start in progress(batches, desc=f"evaluate {category}", total=len(batches)):
            chunk = list(zip(samples[start : start + BATCH], paths[start : start + BATCH]))
            maps, masks = [], []
            for sample, path in chunk:
                maps.append(read_map(path))
                masks.append(ground_truth_mask(sample))
            image_scores = None if scores is None else [scores[(category, s.relpath)] for s, _ in chunk]
            evaluator.update(maps, masks, image_scores=image_scores, labels=[s.label for s, _ in chunk],
                             categories=category)
    return evaluator.compute(curves=curves)


def ground_truth_mask(sample) -> np.ndarray:
    """The boolean mask of a test image at its native size (all False for a good image)."""
    from threecad.data import read_mask  # imports torch: only when a folder is evaluated

    width, height = image_size(sample.image_path)
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
