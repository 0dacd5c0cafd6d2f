"""Submissions of anomaly maps: the format, safe unpacking and the validator.

A submission is a folder, ``.zip`` or ``.tar.gz`` holding ``<Category>/test/<defect>/<stem>.tiff``
(one single-channel float16/float32 map per test image, at the image's native size or at the size
declared in ``meta.json``), ``meta.json`` and optionally ``scores.csv`` (``category,path,score``;
``path`` is the image path below its category, e.g. ``test/scratch/001.png``). See
``docs/submission.md``.

Nothing is trusted before it is checked: archives are unpacked by :func:`threecad.archive.extract`,
the one extractor (no absolute paths, no ``..``, no links or device files, file-count, size and
compression-ratio limits, bytes counted while extracting so a lying header cannot exceed them),
maps and ``scores.csv`` are checked by :mod:`threecad.maps.files`, the rules ``3cad evaluate`` applies too
(TIFF headers read before pixel data, so a map declaring a huge size is refused without decoding),
and every problem is collected so one report lists them all, each naming its file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leaderboard.reported import FAMILY_ORDER
from threecad import archive as _archive
from threecad.archive import archive_kind
from threecad.dataset.layout import list_categories, list_samples
from threecad.errors import ThreecadError
from threecad.io import image_size, sha256_file
from threecad.maps.files import (
    MAX_MAP_PIXELS,
    META_FILE,
    SCORES_FILE,
    check_map_files,
    check_scores,
    map_problem,
    map_relpath,
    parse_scores,
)
from threecad.progress import progress

META_KEYS = {
    "method": "method name (required)",
    "version": "method or submission version",
    "family": f"one of {', '.join(FAMILY_ORDER)}",
    "url": "paper or code URL",
    "size": '"native" (default), N or [width, height]: the size of every map',
    "training_data": "what the method was trained on",
    "hardware": "where it ran",
    "notes": "anything else",
}
#: Longest accepted value, in characters, of each text key of meta.json: method 200, version 100,
#: family 40, url 500, training_data 500, hardware 200, notes 2000. Names appear in every table and
#: listing, so they stay short; only notes may hold newlines and tabs.
META_MAX_CHARS = {"method": 200, "version": 100, "family": 40, "url": 500, "training_data": 500,
                  "hardware": 200, "notes": 2000}
META_MULTILINE = {"notes": "\n\t"}
#: A meta.json above 64 KiB is refused before it is parsed (it holds a few short strings).
META_MAX_BYTES = 64 * 2**10


@dataclass(frozen=True)
class Limits(_archive.Limits):
    """Bounds on what a submission may unpack to. 3CAD's test split is 16,546 images; float16 maps at
    native size are about 27 GB uncompressed, so the defaults leave room while stopping bombs.

    The archive fields are :class:`threecad.archive.Limits` (the one extractor applies them):
    100,000 members, 64 GiB written, and at most 1000:1 written/compressed, for the whole archive
    and for each member, once past ``ratio_floor`` (8 MiB).
    """

    max_files: int = 100_000
    max_bytes: int = 64 * 2**30
    max_map_pixels: int = MAX_MAP_PIXELS  # one map; 3CAD images are at most 1024 x 1024


@dataclass
class ValidationReport:
    """Everything wrong with a submission (empty ``errors`` = valid)."""

    submission: str
    dataset: str
    categories: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    maps_checked: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    size: list[int] | None = None  # declared (width, height); None = native
    has_scores: bool = False
    sha256: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.errors or self.missing or self.unexpected)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def text(self, max_lines: int = 25) -> str:
        lines = [
            f"submission {self.submission} against dataset {self.dataset}: "
            + ("VALID" if self.ok else "INVALID"),
            f"categories: {', '.join(self.categories) or '-'}; maps checked: {self.maps_checked}; "
            f"size: {'x'.join(map(str, self.size)) if self.size else 'native'}; "
            f"scores.csv: {'yes' if self.has_scores else 'no (image score = max of the map)'}",
        ]
        for title, items in (
            ("missing file(s)", self.missing),
            ("unexpected file(s)", self.unexpected),
            ("error(s)", self.errors),
            ("warning(s)", self.warnings),
        ):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines.extend(f"  {item}" for item in items[:max_lines])
                if len(items) > max_lines:
                    lines.append(f"  ... and {len(items) - max_lines} more (--json lists all)")
        return "\n".join(lines)


class SubmissionRejected(ThreecadError):
    """Validation failed; ``report`` says why (the message is its first problem)."""

    def __init__(self, report: ValidationReport):
        self.report = report
        first = (report.errors or [f"missing {m}" for m in report.missing]
                 or [f"unexpected {u}" for u in report.unexpected])[0]
        problems = len(report.errors) + len(report.missing) + len(report.unexpected)
        super().__init__(f"invalid submission ({problems} problem(s)), first: {first}", report.submission)


class UnsafeSubmission(ThreecadError):
    """The archive or folder itself is refused (unsafe, over a limit, unreadable)."""


# ---------------------------------------------------------------------------------------------- unpacking
def _check_folder(root: Path, limits: Limits) -> None:
    """A folder submission gets the same rules as an archive: regular files only, within the limits."""
    count = total = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            mode = entry.lstat().st_mode
            rel = entry.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                raise UnsafeSubmission(f"{rel} is a symbolic link; links are not allowed in a submission", root)
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UnsafeSubmission(f"{rel} is a device or special file; only regular files are allowed", root)
            if stat.S_ISREG(mode):
                count += 1
                total += entry.lstat().st_size
        if count > limits.max_files:
            raise UnsafeSubmission(f"submission holds more than {limits.max_files} files", root)
        if total > limits.max_bytes:
            raise UnsafeSubmission(f"submission is larger than {limits.max_bytes:,} bytes", root)


def _unwrap(root: Path) -> Path:
    """Accept an archive whose content sits in one top-level folder (``zip -r sub.zip sub/``)."""
    entries = [p for p in root.iterdir()]
    if len(entries) == 1 and entries[0].is_dir() and not (root / META_FILE).exists():
        inner = entries[0]
        if (inner / META_FILE).is_file() or any((p / "test").is_dir() for p in inner.iterdir() if p.is_dir()):
            return inner
    return root


@contextlib.contextmanager
def open_submission(path: str | Path, limits: Limits = Limits(), workdir: str | Path | None = None) -> Iterator[Path]:
    """Yield a folder holding the submission: the folder itself, or a vetted temporary extraction."""
    path = Path(path)
    if path.is_symlink() and path.is_dir():
        raise UnsafeSubmission("the submission folder is a symbolic link; give the real path", path)
    if path.is_dir():
        _check_folder(path, limits)
        yield _unwrap(path)
        return
    if not path.is_file():
        raise UnsafeSubmission("submission not found (expected a folder, .zip or .tar.gz)", path)
    kind = archive_kind(path)
    if kind is None:
        raise UnsafeSubmission("unknown submission type; expected a folder, .zip, .tar.gz or .tgz", path)
    tmp = Path(tempfile.mkdtemp(prefix="threecad-submission-", dir=workdir))  # private scratch, removed below
    try:
        _archive.extract(path, tmp, limits, error=UnsafeSubmission)
        yield _unwrap(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def content_sha256(root: str | Path) -> str:
    """sha256 over sorted ``<relative path>\\t<sha256>`` lines: the same content gives the same id
    whether it arrives as a folder, a zip or a tar.gz."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    lines = "".join(f"{p.relative_to(root).as_posix()}\t{sha256_file(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- validation
def _parse_size(value: Any) -> list[int] | None:
    if value in (None, "native"):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return [value, value]
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return [int(value[0]), int(value[1])]
    raise ValueError(f'"size" must be "native", a positive integer or [width, height], not {value!r}')


def read_meta(root: Path, report: ValidationReport) -> None:
    """Read and check ``meta.json`` into ``report.meta``; every problem is a report error naming the key.

    Its strings end up in tables, the site, listings and exports, so they are checked here, where
    they enter: each text key (:data:`META_MAX_CHARS`) must be a string (or null, except
    ``method``) within its length limit and without control characters. Rendering escapes them
    again for each format; this keeps what is stored plain.
    """
    from leaderboard.tables import text_problem

    path = root / META_FILE
    if not path.is_file():
        report.errors.append(f'{META_FILE}: missing; it must hold at least {{"method": "<name>"}}')
        return
    size = path.stat().st_size
    if size > META_MAX_BYTES:
        report.errors.append(f"{META_FILE}: {size:,} bytes; the limit is {META_MAX_BYTES:,}")
        return
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        report.errors.append(f"{META_FILE}: not valid JSON ({exc.__class__.__name__}: {str(exc)[:200]})")
        return
    if not isinstance(meta, dict):
        report.errors.append(f"{META_FILE}: must be a JSON object")
        return
    report.meta = meta
    if not isinstance(meta.get("method"), str) or not meta["method"].strip():
        report.errors.append(f'{META_FILE}: "method" must be a non-empty string')
    for key, limit in META_MAX_CHARS.items():
        if meta.get(key) is None or (key == "method" and not isinstance(meta[key], str)):
            continue  # absent, or the error above
        problem = text_problem(meta[key], limit, META_MULTILINE.get(key, ""))
        if problem:
            report.errors.append(f'{META_FILE}: "{key}" {problem}')
    if isinstance(meta.get("family"), str) and meta["family"] not in FAMILY_ORDER:
        report.warnings.append(f'{META_FILE}: family {meta["family"][:40]!r} is not one of '
                               f'{", ".join(FAMILY_ORDER)}; shown under "other"')
    try:
        report.size = _parse_size(meta.get("size"))
    except ValueError as exc:
        report.errors.append(f"{META_FILE}: {str(exc)[:300]}")
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        names = ", ".join(repr(k[:40]) for k in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        report.warnings.append(f"{META_FILE}: unknown key(s) {names} (kept, not used)")


def read_scores(root: Path, expected: list[tuple[str, str]], report: ValidationReport) -> dict | None:
    """``scores.csv`` rows keyed (category, path below category), checked against the test images
    ``expected`` by :func:`threecad.maps.files.check_scores` (the rules ``evaluate`` applies); every
    problem becomes a report error. None when the submission has no ``scores.csv``."""
    path = root / SCORES_FILE
    if not path.is_file():
        return None
    report.has_scores = True
    table = parse_scores(path)
    report.errors.extend(f"{SCORES_FILE} {p}" if p.startswith("line ") else f"{SCORES_FILE}: {p}"
                         for p in check_scores(table, expected))
    return table.scores


def _check_categories(dataset: Path | str, categories: list[str] | None) -> list[str]:
    """The dataset folders meant by ``categories`` (folders, 3CAD codes, aliases); all when empty."""
    from threecad.dataset.catalog import resolve_categories

    return resolve_categories(list_categories(dataset), categories, dataset)


def validate_tree(
    root: str | Path,
    dataset: str | Path,
    categories: list[str] | None = None,
    limits: Limits = Limits(),
    label: str | None = None,
) -> ValidationReport:
    """Check an unpacked submission folder against the dataset's test split; never raises for a bad map."""
    root, dataset = Path(root), Path(dataset)
    cats = _check_categories(dataset, categories)
    report = ValidationReport(label or str(root), str(dataset), cats)
    read_meta(root, report)

    expected = {map_relpath(c, s.defect, s.stem): s for c in cats for s in list_samples(dataset, c, "test")}
    report.missing, report.unexpected = check_map_files(root, expected, cats)
    read_scores(root, [(s.category, s.relpath) for s in expected.values()], report)

    size = report.size
    for rel in progress(sorted(set(expected) - set(report.missing)), desc="validate maps"):
        sample = expected[rel]
        if size is None:
            width, height = image_size(sample.image_path)
        else:
            width, height = size
        problem = map_problem(root / rel, (width, height), limits.max_map_pixels)
        report.maps_checked += 1
        if problem:
            report.errors.append(f"{rel}: {problem}")
    return report


def validate_submission(
    submission: str | Path,
    dataset: str | Path,
    categories: list[str] | None = None,
    limits: Limits = Limits(),
    workdir: str | Path | None = None,
) -> ValidationReport:
    """Validate a folder or archive; an unsafe archive comes back as a report with that one error."""
    _check_categories(dataset, categories)  # dataset problems are the caller's error, not the submission's
    try:
        with open_submission(submission, limits, workdir) as root:
            report = validate_tree(root, dataset, categories, limits, label=str(submission))
            if report.ok:
                report.sha256 = content_sha256(root)
            return report
    except UnsafeSubmission as exc:
        report = ValidationReport(str(submission), str(dataset), list(categories or []))
        report.errors.append(str(exc))
        return report
