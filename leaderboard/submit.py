"""``3cad leaderboard submit``: validate, evaluate under both protocols, store.

Order matters for the guarantees: validation runs first and a rejected submission raises before
the store is written; evaluation runs outside any database transaction (it can take minutes), and
the results are then written in one transaction keyed by the content sha256, so a re-submission or
a second process racing with the same bytes stores nothing twice and a killed process stores
nothing at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leaderboard.reported import DATASET as DATASET_3CAD
from leaderboard.reported import family_of
from leaderboard.store import Store, opened_store
from leaderboard.validate import (
    Limits,
    SubmissionRejected,
    UnsafeSubmission,
    ValidationReport,
    _check_categories,
    content_sha256,
    open_submission,
    validate_tree,
)
from threecad.metrics import PROTOCOLS

log = logging.getLogger(__name__)

_reports: dict[str, Any] = {}  # resolved dataset root -> its VerifyReport (with fingerprint)


def _verified(dataset: str | Path):
    """``verify_dataset(dataset, fingerprint=True)``, once per process and path: the fingerprint and
    the full-3CAD test both need it, and hashing a full copy takes minutes."""
    from threecad.dataset.verify import verify_dataset

    key = str(Path(dataset).resolve())
    if key not in _reports:
        _reports[key] = verify_dataset(dataset, fingerprint=True)
    return _reports[key]


def dataset_fingerprint(dataset: str | Path) -> str:
    """The dataset's content fingerprint (``threecad.dataset.verify``), cached per process and path."""
    return _verified(dataset).fingerprint


def dataset_name(dataset: str | Path) -> str:
    """The name stored beside the fingerprint, which the tables group by (with the fingerprint).

    ``3CAD`` for a copy that ``3cad data verify`` accepts as full 3CAD (all eight categories, the
    paper's Table 1 counts, no problems): its rows then sit in one section with the paper's. Any
    other dataset is named by its root folder; a folder called ``3CAD`` (any case) that is not a full
    copy gets `` (not full 3CAD)`` appended, so a subset is never ranked beside the paper's means.
    Datasets carry no declared name of their own; callers that know better pass one to :func:`submit`.
    """
    from threecad.dataset.layout import list_categories
    from threecad.dataset.verify import _strict

    root = Path(dataset).resolve()
    if _strict(list_categories(root), "auto"):  # only then is the (cached) full check worth running
        report = _verified(root)
        if report.strict and report.ok:
            return DATASET_3CAD
    if root.name.casefold() == DATASET_3CAD.casefold():
        return f"{root.name} (not full {DATASET_3CAD})"
    return root.name


def evaluate_tree(
    root: Path,
    dataset: Path,
    protocol: str,
    categories: list[str],
    size: list[int] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate a validated submission folder (curves included).

    Under ``mvtec`` the image scores are the folder's ``scores.csv`` when it has one, else the max
    of each map; ``3cad-paper`` defines its own.
    """
    from threecad.metrics import evaluate_predictions

    declared = None if size is None else (int(size[0]), int(size[1]))
    return evaluate_predictions(dataset, root, protocol=protocol, categories=categories, device=device,
                                size=declared, curves=True)


def result_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten an evaluator result into store rows (per category plus the evaluator's ``mean``)."""
    rows = []
    protocol = result["protocol"]
    for category, values in [*result["categories"].items(), ("mean", result["mean"])]:
        for metric, value in values.items():
            rows.append({"category": category, "protocol": protocol, "metric": metric, "value": value})
    return rows


def curve_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for category, curves in (result.get("curves") or {}).items():
        for kind, points in (curves or {}).items():
            if points and len(points) == 2 and len(points[0]):
                rows.append({"category": category, "protocol": result["protocol"], "kind": kind,
                             "x": [float(v) for v in points[0]], "y": [float(v) for v in points[1]]})
    return rows


@dataclass
class SubmitResult:
    sha256: str
    stored: bool  # False: the same content was already in the store
    method: str
    report: ValidationReport
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # protocol -> evaluator result

    def text(self) -> str:
        from threecad.metrics import format_table

        head = (f"stored submission {self.sha256[:12]} ({self.method})" if self.stored
                else f"already stored: submission {self.sha256[:12]} ({self.method}); nothing changed")
        return "\n\n".join([head, *(format_table(r) for r in self.results.values())])


def submit(
    submission: str | Path,
    dataset: str | Path,
    store: Store | str | Path | None = None,
    categories: list[str] | None = None,
    device: str = "cpu",
    limits: Limits = Limits(),
    fingerprint: str | None = None,
    workdir: str | Path | None = None,
    name: str | None = None,
) -> SubmitResult:
    """Validate, evaluate (``mvtec`` and ``3cad-paper``) and store a submission; idempotent by content.

    The stored dataset fingerprint is ``fingerprint`` or :func:`dataset_fingerprint`, its name ``name``
    or :func:`dataset_name`.

    Raises :class:`SubmissionRejected` (with the full report) before touching the store when the
    submission is invalid.
    """
    dataset = Path(dataset)
    cats = _check_categories(dataset, categories)
    with opened_store(store) as db:
        try:
            with open_submission(submission, limits, workdir) as root:
                report = validate_tree(root, dataset, cats, limits, label=str(submission))
                if not report.ok:
                    raise SubmissionRejected(report)
                sha = report.sha256 = content_sha256(root)
                method = report.meta["method"].strip()
                if db.has_submission(sha):
                    log.info("submission %s is already in %s", sha[:12], db.path)
                    return SubmitResult(sha, False, method, report)
                results = {p: evaluate_tree(root, dataset, p, cats, report.size, device) for p in PROTOCOLS}
        except UnsafeSubmission as exc:
            report = ValidationReport(str(submission), str(dataset), cats, errors=[str(exc)])
            raise SubmissionRejected(report) from None
        meta = report.meta
        family = meta.get("family") if meta.get("family") else family_of(method)
        size = "native" if report.size is None else f"{report.size[0]}x{report.size[1]}"
        record = {
            "sha256": sha, "method": method, "version": meta.get("version"), "family": family,
            "source": "evaluated", "dataset_fingerprint": fingerprint or dataset_fingerprint(dataset),
            "dataset_name": name or dataset_name(dataset),
            "eval_size": size, "hardware": meta.get("hardware"), "meta": meta,
        }
        rows = [row for r in results.values() for row in result_rows(r)]
        curves = [row for r in results.values() for row in curve_rows(r)]
        stored = db.add_submission(record, rows, curves)
        return SubmitResult(sha, stored, method, report, results)
