"""``3cad data verify``: is a dataset copy complete, consistent and free of train/test leakage?

Checks, per category: the folder structure (``train`` and ``validation`` hold only ``good``);
every defective test image paired with exactly one mask of the same size that is not empty;
good images without masks; every image decodable; image sizes and counts against the paper's
Table 1; the same image bytes (sha256) on both sides of the train/test boundary. Images with more
than 8 bits per channel (16-bit frames) are listed per category as a warning and under
``bit_depth`` in the JSON report: they are valid, but the loaders scale them to 8 bits by bit
depth (``round(v * 255 / 65535)``, :func:`threecad.io.read_image`), which a user should know.

Counts and size ranges are strict only when the copy claims to be full 3CAD: ``expect="full"``,
or ``expect="auto"`` (the default) with all eight 3CAD category folders present. A subset, a
synthetic set or your own data gets the same table as information and warnings, not errors, so
one command serves both. Everything else is an error in every mode.

The fingerprint is a sha256 over the sorted list of ``<relative path> <sha256>`` lines of every
image and mask file: it names the exact content of a copy, independent of file system order,
timestamps or where the copy lives.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from threecad.dataset.catalog import CATEGORY_FOLDERS, canonical_category, category_info
from threecad.dataset.layout import (
    GOOD,
    MVTEC_SUFFIX,
    SPLITS,
    Sample,
    is_image,
    list_categories,
    list_samples,
)
from threecad.dataset.masks import read_mask
from threecad.errors import ThreecadError
from threecad.io import image_header, read_image, sha256_file, write_json
from threecad.progress import progress

log = logging.getLogger(__name__)

Expect = Literal["auto", "full", "subset"]


@dataclass(frozen=True)
class Issue:
    check: str  # structure, mask, readable, counts, sizes, leakage, duplicate, bit_depth
    path: str  # relative to the dataset root ('' for the whole dataset)
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.path or '.'}: {self.message}"


@dataclass
class VerifyReport:
    root: str
    strict: bool
    problems: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    table1: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    #: per category: images with more than 8 bits per channel (count, an example, modes seen)
    bit_depth: dict[str, dict] = field(default_factory=dict)
    files: int = 0
    fingerprint: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "ok": self.ok,
            "strict": self.strict,
            "problems": [vars(i) for i in self.problems],
            "warnings": [vars(i) for i in self.warnings],
            "counts": self.counts,
            "sizes": self.sizes,
            "table1": self.table1,
            "duplicates": self.duplicates,
            "bit_depth": self.bit_depth,
            "files": self.files,
            "fingerprint": self.fingerprint,
        }

    def summary(self, max_lines: int = 30) -> str:
        """A human-readable report: counts, the Table-1 diff, then problems and warnings."""
        lines = [f"dataset {self.root}: {len(self.counts)} categories, {self.files} image and mask files"]
        header = f"{'category':28s} {'train':>6s} {'val':>5s} {'test good':>9s} {'test defect':>11s} {'types':>5s}"
        lines += [header, "-" * len(header)]
        for cat, c in self.counts.items():
            lines.append(
                f"{cat:28s} {c['train']:6d} {c['validation']:5d} {c['test_good']:9d} {c['test_defect']:11d}"
                f" {c['defect_types']:5d}"
            )
        diffs = [row for row in self.table1 if any(row[k]["diff"] for k in ("train", "test_good", "test_defect"))]
        if self.table1:
            if diffs:
                mode = "errors" if self.strict else "for information: not full 3CAD; --expect full makes them errors"
                lines.append(f"differences from the paper's Table 1 ({mode}):")
                lines.append(f"{'category':28s} {'train':>16s} {'test good':>16s} {'test defect':>16s}")
                for row in diffs:
                    cells = [f"{row[k]['found']}/{row[k]['expected']} ({row[k]['diff']:+d})"
                             for k in ("train", "test_good", "test_defect")]
                    lines.append(f"{row['category']:28s} " + " ".join(f"{c:>16s}" for c in cells))
            else:
                lines.append("counts match the paper's Table 1")
        for title, issues in (("problems", self.problems), ("warnings", self.warnings)):
            if not issues:
                continue
            per_check: dict[str, int] = defaultdict(int)
            for issue in issues:
                per_check[issue.check] += 1
            lines.append(f"{len(issues)} {title} (" + ", ".join(f"{k}: {v}" for k, v in sorted(per_check.items())) + ")")
            lines += [f"  {issue}" for issue in issues[:max_lines]]
            if len(issues) > max_lines:
                lines.append(f"  ... {len(issues) - max_lines} more (see the JSON report)")
        if self.fingerprint:
            lines.append(f"fingerprint {self.fingerprint}")
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problems")
        return "\n".join(lines)


@dataclass
class _ImageResult:
    sample: Sample
    sha256: str | None = None
    size: tuple[int, int] | None = None  # (width, height)
    mode: str | None = None  # PIL mode as stored
    bits: int = 8  # bits per channel as stored
    masks: list[Path] = field(default_factory=list)
    issues: list[tuple[bool, str, Path, str]] = field(default_factory=list)  # (is_problem, check, path, message)


def _message(exc: ThreecadError) -> str:
    text = str(exc)
    prefix = f"{exc.path}: " if exc.path is not None else ""
    return text[len(prefix):] if prefix and text.startswith(prefix) else text


def _mask_candidates(gt_dir: Path, stem: str) -> list[Path]:
    """Every image file in ``gt_dir`` that could be the mask of ``stem`` (either naming style)."""
    if not gt_dir.is_dir():
        return []
    names = {stem, stem + MVTEC_SUFFIX}
    return sorted(p for p in gt_dir.iterdir() if is_image(p) and p.stem in names)


def _check_image(sample: Sample, cat_dir: Path, decode: bool = True) -> _ImageResult:
    result = _ImageResult(sample)
    try:
        result.sha256 = sha256_file(sample.image_path)
        header = image_header(sample.image_path)
        result.size, result.mode, result.bits = (header.width, header.height), header.mode, header.bits
        if decode:
            image = read_image(sample.image_path)
            result.size = (image.shape[1], image.shape[0])
            if header.bits > 8:
                read_image(sample.image_path, "RGB")  # what the loaders do; refuses what cannot be scaled
    except (ThreecadError, OSError) as exc:
        message = _message(exc) if isinstance(exc, ThreecadError) else str(exc)
        result.issues.append((True, "readable", sample.image_path, message))
        return result
    gt_dir = cat_dir / "ground_truth" / sample.defect
    candidates = _mask_candidates(gt_dir, sample.stem)
    result.masks = candidates
    if sample.label == 0:
        for mask_path in candidates:
            try:
                empty = not read_mask(mask_path).any()
            except ThreecadError as exc:
                result.issues.append((True, "mask", mask_path, _message(exc)))
                continue
            if empty:
                result.issues.append((False, "mask", mask_path, "good image has an (empty) mask file"))
            else:
                result.issues.append((True, "mask", mask_path, "good image has a non-empty mask"))
        return result
    if not candidates:
        expected = sample.mask_path.name if sample.mask_path else f"{sample.stem}.png"
        result.issues.append((True, "mask", sample.image_path, f"defective image has no mask (expected {gt_dir.name}/{expected})"))
        return result
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        result.issues.append((True, "mask", sample.image_path, f"defective image has {len(candidates)} masks ({names})"))
        return result
    mask_path = candidates[0]
    if sample.mask_path is not None and mask_path != sample.mask_path:
        result.issues.append(
            (True, "mask", mask_path, f"mask is not where the loaders look for it ({sample.mask_path.name})")
        )
    try:
        mask = read_mask(mask_path, expected_size=result.size)
    except ThreecadError as exc:
        result.issues.append((True, "mask", mask_path, _message(exc)))
        return result
    if not mask.any():
        result.issues.append((True, "mask", mask_path, "mask of a defective image is empty"))
    return result


def _strict(categories: list[str], expect: Expect) -> bool:
    if expect == "full":
        return True
    if expect == "subset":
        return False
    if expect != "auto":
        raise ThreecadError(f"unknown --expect {expect!r}; expected auto, full or subset")
    return set(CATEGORY_FOLDERS) <= {canonical_category(c) for c in categories}


def verify_dataset(
    root: str | Path,
    expect: Expect = "auto",
    fingerprint: bool = False,
    workers: int = 4,
    report_path: str | Path | None = None,
    decode: bool = True,
) -> VerifyReport:
    """Check a dataset in the 3CAD/MVTec layout; never raises for a dataset problem, only reports it.

    ``report_path`` writes the JSON report (whatever the outcome). ``decode=False`` reads only image
    headers (about 3x faster; a truncated image then goes unnoticed; masks are always decoded).
    Raises only when ``root`` is not a dataset at all.
    """
    root = Path(root)
    categories = list_categories(root)
    report = VerifyReport(str(root), _strict(categories, expect))
    rel = lambda p: Path(p).relative_to(root).as_posix()  # noqa: E731

    def add(is_problem: bool, check: str, path: Path | str, message: str) -> None:
        issue = Issue(check, rel(path) if isinstance(path, Path) else path, message)
        (report.problems if is_problem else report.warnings).append(issue)

    jobs: list[tuple[Sample, Path]] = []
    gt_files: dict[str, list[Path]] = {}
    for cat in categories:
        cat_dir = root / cat
        canonical = canonical_category(cat)
        if canonical is not None and canonical != cat:
            add(False, "structure", cat_dir, f"alias of the 3CAD folder {canonical}; compared with its Table-1 row")
        for split in SPLITS:
            split_dir = cat_dir / split
            if not split_dir.is_dir():
                if split != "validation":
                    add(True, "structure", split_dir, f"missing {split} folder")
                continue
            folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
            if split != "test":
                for name in folders:
                    if name != GOOD:
                        add(True, "structure", split_dir / name, f"{split} must hold only normal images in {split}/good")
            if GOOD not in folders and split != "validation":
                add(True, "structure", split_dir / GOOD, "missing good folder")
            for sample in list_samples(root, cat, split):
                if split != "test" and sample.label == 1:
                    continue  # reported above as a structure problem
                jobs.append((sample, cat_dir))
        gt_dir = cat_dir / "ground_truth"
        gt_files[cat] = sorted(p for p in gt_dir.rglob("*") if is_image(p)) if gt_dir.is_dir() else []

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(progress(pool.map(lambda job: _check_image(*job, decode=decode), jobs), desc="verify images", total=len(jobs)))

    claimed: set[Path] = set()
    by_hash: dict[str, list[Sample]] = defaultdict(list)
    file_hashes: dict[str, str] = {}
    for result in results:
        sample = result.sample
        for is_problem, check, path, message in result.issues:
            add(is_problem, check, path, message)
        claimed.update(result.masks)
        if result.sha256:
            by_hash[result.sha256].append(sample)
            file_hashes[rel(sample.image_path)] = result.sha256

    # Masks nobody claims: a renamed image, a deleted image, or a mask in the wrong folder.
    orphans = [p for files in gt_files.values() for p in files if p not in claimed]
    for path in orphans:
        add(False, "mask", path, "mask without a matching test image")
    if fingerprint:
        mask_files = [p for files in gt_files.values() for p in files]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            digests = list(progress(pool.map(sha256_file, mask_files), desc="hash masks", total=len(mask_files)))
        file_hashes.update({rel(p): d for p, d in zip(mask_files, digests, strict=True)})
        lines = "".join(f"{path}\t{digest}\n" for path, digest in sorted(file_hashes.items()))
        report.fingerprint = "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    report.files = sum(1 for r in results if r.sha256) + sum(len(v) for v in gt_files.values())

    # Leakage: identical bytes in a training-side split and in test.
    for digest, samples in sorted(by_hash.items()):
        if len(samples) < 2:
            continue
        sides = {"test" if s.split == "test" else "fit" for s in samples}
        names = [f"{s.category}/{s.relpath}" for s in samples]
        report.duplicates.append({"sha256": digest, "files": names, "leak": len(sides) == 2})
        if len(sides) == 2:
            add(True, "leakage", names[0], f"same image bytes in train/validation and test: {', '.join(names)}")
        else:
            add(False, "duplicate", names[0], f"same image bytes more than once: {', '.join(names)}")

    # Counts, defect types and sizes, against Table 1 where the category is a 3CAD one.
    for cat in categories:
        cat_results = [r for r in results if r.sample.category == cat]
        counts = {
            "train": sum(r.sample.split == "train" for r in cat_results),
            "validation": sum(r.sample.split == "validation" for r in cat_results),
            "test_good": sum(r.sample.split == "test" and r.sample.label == 0 for r in cat_results),
            "test_defect": sum(r.sample.split == "test" and r.sample.label == 1 for r in cat_results),
            "defect_types": len({r.sample.defect for r in cat_results if r.sample.label == 1}),
        }
        report.counts[cat] = counts
        sizes = [r.size for r in cat_results if r.size]
        if sizes:
            report.sizes[cat] = {
                "min_height": min(h for _, h in sizes),
                "max_height": max(h for _, h in sizes),
                "min_width": min(w for w, _ in sizes),
                "max_width": max(w for w, _ in sizes),
            }
        wide = [r for r in cat_results if r.bits > 8]
        if wide:
            modes: dict[str, int] = defaultdict(int)
            for r in wide:
                modes[f"{r.mode}, {r.bits}-bit"] += 1
            first = wide[0]
            report.bit_depth[cat] = {"images": len(wide), "example": first.sample.relpath, "modes": dict(modes)}
            add(False, "bit_depth", cat,
                f"{len(wide)} {'image has' if len(wide) == 1 else 'images have'} more than 8 bits per channel "
                f"(e.g. {first.sample.relpath}: {first.mode}, "
                f"{first.bits}-bit); the loaders scale them to 8 bits by bit depth (v * 255 / 65535, rounded)")
        info = category_info(cat)
        if info is None:
            continue
        found = {"train": counts["train"] + counts["validation"], "test_good": counts["test_good"],
                 "test_defect": counts["test_defect"], "defect_types": counts["defect_types"]}
        expected = {"train": info.train, "test_good": info.test_good, "test_defect": info.test_defect,
                    "defect_types": info.defect_types}
        row = {"category": cat}
        for key in expected:
            row[key] = {"expected": expected[key], "found": found[key], "diff": found[key] - expected[key]}
            if found[key] != expected[key] and report.strict:  # else the diff table says it
                add(True, "counts", cat, f"{key} {found[key]}, Table 1 says {expected[key]}")
        report.table1.append(row)
        outside = [
            r for r in cat_results
            if r.size and not (info.width[0] <= r.size[0] <= info.width[1] and info.height[0] <= r.size[1] <= info.height[1])
        ]
        if outside:
            first = outside[0]
            add(
                report.strict,
                "sizes",
                cat,
                f"{len(outside)} images outside the published {info.width[0]}-{info.width[1]} x "
                f"{info.height[0]}-{info.height[1]} (W x H), e.g. {first.sample.relpath} is {first.size[0]}x{first.size[1]}",
            )
    if report.strict:
        present = {canonical_category(c) for c in categories}
        for folder in CATEGORY_FOLDERS:
            if folder not in present:
                add(True, "counts", folder, "3CAD category missing")
    if report_path is not None:
        write_json(report_path, report.to_dict())
    log.info("verified %s: %d problems, %d warnings", root, len(report.problems), len(report.warnings))
    return report
