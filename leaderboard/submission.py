"""Submissions of anomaly maps: the format, safe unpacking and the validator.

A submission is a folder, ``.zip`` or ``.tar.gz`` holding ``<Category>/test/<defect>/<stem>.tiff``
(one single-channel float16/float32 map per test image, at the image's native size or at the size
declared in ``meta.json``), ``meta.json`` and optionally ``scores.csv`` (``category,path,score``;
``path`` is the image path below its category, e.g. ``test/scratch/001.png``). See
``docs/submission.md``.

Nothing is trusted before it is checked: archive members are vetted (no absolute paths, no ``..``,
no links or device files, file-count, size and compression-ratio limits, bytes counted while
extracting so a lying header cannot exceed them), TIFF headers are read before pixel data (a map
declaring a huge size is refused without decoding), and every problem is collected so one report
lists them all, each naming its file.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import tifffile

from leaderboard.reported import FAMILY_ORDER
from threecad.errors import ThreecadError
from threecad.io import image_size, sha256_file
from threecad.layout import Sample, list_categories, list_samples
from threecad.maps import SCORES_FILE, map_relpath
from threecad.progress import progress

META_FILE = "meta.json"
MAP_SUFFIX = ".tiff"
DTYPES = ("float16", "float32")
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


@dataclass(frozen=True)
class Limits:
    """Bounds on what a submission may unpack to. 3CAD's test split is 16,546 images; float16 maps at
    native size are about 27 GB uncompressed, so the defaults leave room while stopping bombs."""

    max_files: int = 100_000
    max_bytes: int = 64 * 2**30
    max_ratio: float = 1000.0  # uncompressed / compressed, above ``ratio_floor`` bytes
    ratio_floor: int = 64 * 2**20
    max_map_pixels: int = 64 * 2**20  # one map; 3CAD images are at most 1024 x 1024


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
def _bad_name(name: str) -> str | None:
    """Why an archive member name is unsafe, or None."""
    if not name or "\x00" in name:
        return "empty or NUL in name"
    if "\\" in name:
        return "backslash in path (use / separators)"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "'..' in path"
    return None


def _copy_limited(src: io.BufferedIOBase, dst_path: Path, declared: int, budget: list[int], name: str,
                  archive: Path, guard: Callable[[int], None] | None = None) -> None:
    """Copy a member counting real bytes: a header that understates the size cannot beat the limits."""
    written = 0
    with open(dst_path, "wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            budget[0] -= len(chunk)
            if written > declared or budget[0] < 0:
                raise UnsafeSubmission(f"{name}: member expands beyond its declared size or the total limit "
                                       f"(decompression bomb?)", archive)
            if guard is not None:
                guard(written)
            out.write(chunk)


def _extract_zip(path: Path, dest: Path, limits: Limits) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise UnsafeSubmission(f"not a readable zip archive ({exc})", path) from None
    with archive:
        infos = archive.infolist()
        files = [i for i in infos if not i.is_dir()]
        if len(files) > limits.max_files:
            raise UnsafeSubmission(f"archive holds {len(files)} files, over the limit of {limits.max_files}", path)
        total = sum(i.file_size for i in files)
        compressed = max(1, sum(i.compress_size for i in files))
        if total > limits.max_bytes:
            raise UnsafeSubmission(f"archive expands to {total:,} bytes, over the limit of {limits.max_bytes:,}", path)
        if total > limits.ratio_floor and total / compressed > limits.max_ratio:
            raise UnsafeSubmission(f"compression ratio {total / compressed:.0f}:1 is over {limits.max_ratio:.0f}:1 "
                                f"(decompression bomb?)", path)
        seen: set[str] = set()
        for info in infos:
            name = info.filename
            why = _bad_name(name)
            if why:
                raise UnsafeSubmission(f"unsafe member {name!r}: {why}", path)
            mode = info.external_attr >> 16  # Unix mode; 0 or no type bits from non-Unix zip tools
            if stat.S_ISLNK(mode):
                raise UnsafeSubmission(f"member {name!r} is a symbolic link; links are not allowed", path)
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UnsafeSubmission(f"member {name!r} is a device or special file; only regular files allowed", path)
            if info.file_size > limits.ratio_floor and info.file_size / max(1, info.compress_size) > limits.max_ratio:
                raise UnsafeSubmission(f"member {name!r} expands {info.file_size / max(1, info.compress_size):.0f}:1, "
                                       f"over {limits.max_ratio:.0f}:1 (decompression bomb?)", path)
            if info.flag_bits & 0x1:
                raise UnsafeSubmission(f"member {name!r} is encrypted; submit an unencrypted archive", path)
            key = name.rstrip("/")
            if key in seen:
                raise UnsafeSubmission(f"member {name!r} appears twice", path)
            seen.add(key)
        budget = [limits.max_bytes]
        for info in progress(infos, desc="unpack zip"):
            target = dest / info.filename
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as src:
                    _copy_limited(src, target, info.file_size, budget, info.filename, path)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
                raise UnsafeSubmission(f"member {info.filename!r} is unreadable ({exc})", path) from None


def _extract_tar(path: Path, dest: Path, limits: Limits) -> None:
    compressed = max(1, path.stat().st_size)
    budget = [limits.max_bytes]
    count = 0
    seen: set[str] = set()
    try:
        archive = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise UnsafeSubmission(f"not a readable tar archive ({exc})", path) from None
    with archive:
        try:
            for member in progress(archive, desc="unpack tar"):  # streamed: limits apply as we go
                name = member.name
                why = _bad_name(name)
                if why:
                    raise UnsafeSubmission(f"unsafe member {name!r}: {why}", path)
                if member.issym() or member.islnk():
                    raise UnsafeSubmission(f"member {name!r} is a link; links are not allowed", path)
                if not (member.isreg() or member.isdir()):
                    raise UnsafeSubmission(f"member {name!r} is a device or special file; only regular files allowed",
                                        path)
                key = name.rstrip("/")
                if key in seen:
                    raise UnsafeSubmission(f"member {name!r} appears twice", path)
                seen.add(key)
                target = dest / name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                count += 1
                if count > limits.max_files:
                    raise UnsafeSubmission(f"archive holds more than {limits.max_files} files", path)
                if member.size > budget[0]:
                    raise UnsafeSubmission(f"archive expands beyond the limit of {limits.max_bytes:,} bytes", path)
                target.parent.mkdir(parents=True, exist_ok=True)
                src = archive.extractfile(member)
                if src is None:
                    raise UnsafeSubmission(f"member {name!r} is unreadable", path)
                raw = getattr(getattr(archive, "fileobj", None), "fileobj", None)  # the compressed stream
                start = raw.tell() if raw is not None else 0

                def guard(written: int, name: str = name, raw=raw, start: int = start) -> None:
                    # Compressed bytes consumed for this member (read-ahead makes this an overestimate,
                    # so the ratio is a lower bound): a bomb is stopped while it streams.
                    used = (raw.tell() - start) if raw is not None else compressed
                    if written > limits.ratio_floor and written / max(1, used) > limits.max_ratio:
                        raise UnsafeSubmission(f"member {name!r} expands over {limits.max_ratio:.0f}:1 "
                                               f"(decompression bomb?)", path)

                with src:
                    _copy_limited(src, target, member.size, budget, name, path, guard)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise UnsafeSubmission(f"corrupt tar archive ({exc.__class__.__name__}: {exc})", path) from None


def archive_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return "tar"
    return None


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
    tmp = Path(tempfile.mkdtemp(prefix="threecad-submission-", dir=workdir))
    try:
        (_extract_zip if kind == "zip" else _extract_tar)(path, tmp, limits)
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
    path = root / META_FILE
    if not path.is_file():
        report.errors.append(f'{META_FILE}: missing; it must hold at least {{"method": "<name>"}}')
        return
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        report.errors.append(f"{META_FILE}: not valid JSON ({exc})")
        return
    if not isinstance(meta, dict):
        report.errors.append(f"{META_FILE}: must be a JSON object")
        return
    report.meta = meta
    if not isinstance(meta.get("method"), str) or not meta["method"].strip():
        report.errors.append(f'{META_FILE}: "method" must be a non-empty string')
    for key in ("version", "family", "url", "training_data", "notes"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], str):
            report.errors.append(f'{META_FILE}: "{key}" must be a string')
    if isinstance(meta.get("family"), str) and meta["family"] not in FAMILY_ORDER:
        report.warnings.append(f'{META_FILE}: family {meta["family"]!r} is not one of {", ".join(FAMILY_ORDER)}; '
                               f'shown under "other"')
    try:
        report.size = _parse_size(meta.get("size"))
    except ValueError as exc:
        report.errors.append(f"{META_FILE}: {exc}")
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        report.warnings.append(f"{META_FILE}: unknown key(s) {', '.join(unknown)} (kept, not used)")


def read_scores(root: Path, samples: dict[tuple[str, str], Sample], report: ValidationReport) -> dict | None:
    """``scores.csv`` rows keyed like ``samples`` ((category, path below category)); None if absent."""
    path = root / SCORES_FILE
    if not path.is_file():
        return None
    report.has_scores = True
    scores: dict[tuple[str, str], float] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing_cols = {"category", "path", "score"} - set(reader.fieldnames or ())
            if missing_cols:
                report.errors.append(f"{SCORES_FILE}: missing column(s) {', '.join(sorted(missing_cols))}; "
                                     f"expected header category,path,score")
                return None
            for line, row in enumerate(reader, start=2):
                key = (row["category"], row["path"])
                where = f"{SCORES_FILE} line {line}"
                try:
                    value = float(row["score"])
                except (TypeError, ValueError):
                    report.errors.append(f"{where}: score {row['score']!r} is not a number")
                    continue
                if not math.isfinite(value):
                    report.errors.append(f"{where}: score is {value} (must be finite)")
                elif key not in samples:
                    report.errors.append(f"{where}: {key[0]}/{key[1]} is not a test image of the chosen categories")
                elif key in scores:
                    report.errors.append(f"{where}: second score for {key[0]}/{key[1]}")
                else:
                    scores[key] = value
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        report.errors.append(f"{SCORES_FILE}: unreadable ({exc})")
        return None
    absent = [f"{c}/{p}" for (c, p) in samples if (c, p) not in scores]
    if absent:
        report.errors.append(f"{SCORES_FILE}: no score for {len(absent)} test image(s), e.g. {absent[0]}; "
                             f"give every image a score or drop the file")
    return scores


def _check_map(path: Path, rel: str, expected: tuple[int, int], limits: Limits) -> str | None:
    """Why one map file is unacceptable, or None. ``expected`` is (height, width)."""
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.series) != 1 or len(tif.pages) != 1:
                return f"{rel}: holds {len(tif.pages)} pages; one single-channel map per file"
            series = tif.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype)
            if dtype.name not in DTYPES:
                return f"{rel}: dtype {dtype.name}; maps must be float16 or float32"
            squeezed = tuple(s for s in shape if s != 1) if len(shape) == 3 and 1 in (shape[0], shape[-1]) else shape
            if len(squeezed) != 2:
                return f"{rel}: shape {shape} is not a single-channel 2-D map"
            if math.prod(squeezed) > limits.max_map_pixels:
                return f"{rel}: {squeezed[1]}x{squeezed[0]} pixels is over the limit of {limits.max_map_pixels:,}"
            if squeezed != expected:
                return (f"{rel}: size {squeezed[1]}x{squeezed[0]} (WxH) but expected {expected[1]}x{expected[0]}"
                        f" (the image's native size, or meta.json's \"size\")")
            data = series.asarray()
    except Exception as exc:  # tifffile raises many types for corrupt files
        return f"{rel}: not a readable TIFF ({exc.__class__.__name__}: {exc})"
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        return f"{rel}: {bad} NaN/inf value(s)"
    return None


def _check_categories(dataset: Path | str, categories: list[str] | None) -> list[str]:
    available = list_categories(dataset)
    if categories:
        unknown = [c for c in categories if c not in available]
        if unknown:
            raise ThreecadError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                                f"the dataset has {', '.join(available)}", dataset)
        return list(dict.fromkeys(categories))
    return available


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

    expected: dict[str, Sample] = {}
    by_image: dict[tuple[str, str], Sample] = {}
    for category in cats:
        for sample in list_samples(dataset, category, "test"):
            expected[map_relpath(category, sample.defect, sample.stem, MAP_SUFFIX)] = sample
            by_image[(category, sample.relpath)] = sample
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    extras = {META_FILE, SCORES_FILE}
    report.missing = sorted(set(expected) - present)
    for rel in sorted(present - set(expected) - extras):
        hint = ""
        stem_path = rel.rsplit(".", 1)[0] + MAP_SUFFIX
        if stem_path in expected:
            hint = f" (maps must be named <stem>{MAP_SUFFIX})"
        elif rel.split("/", 1)[0] not in cats:
            hint = " (not a chosen category of the dataset)"
        report.unexpected.append(rel + hint)
    read_scores(root, by_image, report)

    size = report.size
    for rel in progress(sorted(set(expected) & present), desc="validate maps"):
        sample = expected[rel]
        if size is None:
            width, height = image_size(sample.image_path)
        else:
            width, height = size
        problem = _check_map(root / rel, rel, (height, width), limits)
        report.maps_checked += 1
        if problem:
            report.errors.append(problem)
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
