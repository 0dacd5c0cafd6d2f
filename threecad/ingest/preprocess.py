"""``3cad data preprocess``: raw frames + polygon annotations -> validated masks, tiles, 3CAD tree, COCO, manifest.

Three phases:

1. **Plan** (main process, cheap: JSON, shapely and image *headers* only). Pair every image with
   its LabelMe JSON (same stem, else the JSON's ``imagePath``) or its COCO entry, resolve labels
   through the label map, validate and repair every annotation, choose the windows, and decide
   with a seeded group split (:mod:`threecad.dataset.split`) which normal frames go to train. Every
   problem becomes a report row; a broken file never stops the run (``strict`` makes it fatal).
   Annotation files are foreign input: every name that becomes a path is checked
   (:func:`_source_names`, :mod:`threecad.paths`), every shape's work is bounded
   (:mod:`threecad.ingest.annotations.shapes`), and every file written is proven to lie inside OUT.
2. **Tile** (``workers`` processes, one task per source frame). Decode once, rasterise the
   whole-frame masks once (pixel-centre rule, :mod:`threecad.ingest.annotations.raster`), crop image and
   masks per window and write PNGs atomically. A frame's record (its tiles, checksums, COCO RLEs)
   is written last, so it marks the frame as done.
3. **Collect**: manifest (parquet + CSV), one COCO JSON per category, the problem report and a
   summary, all sorted, so any number of workers and any number of kills and resumes give the
   same bytes.

**Labels of a tile.** A tile holding any defect pixel is defective. Its folder is the defect type
with the most pixels *in that tile* (ties: alphabetical), the same rule ``3cad synth dataset``
uses for whole images; the binary mask is the union of all types; the manifest lists every type
and the COCO file holds one RLE per (tile, type), so nothing about multi-type tiles is lost.

**Speed.** PNG encoding dominates the cost; tiles are written at zlib level 1 with the ``Z_RLE``
strategy, which on machined-metal textures is as fast as plain level 1 and ~20 % smaller (PIL's
default level 6, which SAHI uses, is ~5x slower).

**Split.** Tiles of one source never straddle splits: every tile of a frame with defects goes to
test (its clean tiles to ``test/good``); clean frames go, whole, to train / validation / test.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import shapely.affinity

from threecad.dataset.layout import GOOD, IMAGE_SUFFIXES
from threecad.dataset.manifest import COLUMNS, manifest_row, write_manifest
from threecad.dataset.split import Group, assign_splits
from threecad.errors import ThreecadError, shorten
from threecad.ingest.annotations import (
    GeometryWorker,
    LabelMap,
    RawAnnotation,
    load_label_map,
    rasterize,
    read_coco,
    read_labelme,
    rle_decode,
)
from threecad.ingest.annotations import shapes as S
from threecad.ingest.annotations.labelmap import IGNORED, MAX_NAME_CHARS, UNKNOWN, folder_name_problem
from threecad.ingest.annotations.raster import rle_counts, rle_encode, rle_size
from threecad.ingest.tiling import check_tiling, tile_windows
from threecad.io import image_header, image_size, read_image, save_image, write_json, write_text
from threecad.paths import check_component, safe_join, unsafe_reason
from threecad.progress import progress

log = logging.getLogger(__name__)

STATE = ".threecad-preprocess"
LABEL_MAP_NAMES = ("label_map.yaml", "label_map.yml", "label_map.json")
#: Longest source key (its path below the category, ``/`` written ``__``) in UTF-8 bytes: 200, so
#: that a tile name ``<key>_<x0>_<y0>_<x1>_<y1>_mask.png`` stays under the 255-byte file-name limit.
MAX_KEY_BYTES = 200
#: Names at the top of OUT that preprocess writes itself, so no category folder may take them.
RESERVED_NAMES = frozenset({"coco", "manifest.parquet", "manifest.csv", "report.csv", "preprocess_summary.json"})
_TOP_LEVEL = "lies directly in the raw folder; put frames in one sub-folder per category or pass --category"


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that determines the output (recorded; a resume must match it exactly)."""

    tile: int = 1024
    overlap: float = 0.2
    min_fraction: float = 0.2
    category: str | None = None
    label_map: str | None = None
    coco: str | None = None
    line_width: float = 3.0
    train_fraction: float = 0.7
    val_fraction: float = 0.0
    seed: int = 0
    mask_suffix: str = ""


@dataclass
class Source:
    """One raw frame after planning."""

    category: str
    key: str  # path below the category folder, without suffix ('/' kept)
    image: str | None  # relative to the raw folder
    annotation_file: str | None
    width: int = 0
    height: int = 0
    shapes: list[tuple[str, object]] = field(default_factory=list)  # (defect type, geometry or RLE dict)
    windows: list[tuple[int, int, int, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    status: str = "good"  # good, defective, skipped
    split: str = "test"

    @property
    def flat(self) -> str:
        return self.key.replace("/", "__")


# ----------------------------------------------------------------------------------------- plan
def _find_label_map(raw: Path, label_map: str | Path | None) -> LabelMap:
    if label_map is not None:
        return load_label_map(label_map)
    for name in LABEL_MAP_NAMES:
        if (raw / name).is_file():
            log.info("using the label map %s", raw / name)
            return load_label_map(raw / name)
    return LabelMap()


def _reason(exc: ThreecadError) -> str:
    """The message of ``exc`` without its ``path: `` prefix (the report names the file in its own column)."""
    text, prefix = str(exc), f"{exc.path}: "
    return text[len(prefix) :] if exc.path is not None and text.startswith(prefix) else text


def _split_key(rel: PurePosixPath, category: str | None) -> tuple[str, str]:
    """(category, key below the category) of a path relative to RAW, unchecked (pairing only)."""
    if category is not None:
        return category, rel.with_suffix("").as_posix()
    return rel.parts[0], PurePosixPath(*rel.parts[1:]).with_suffix("").as_posix()


def _text_problem(name: str) -> str | None:
    """What makes ``name`` unusable as text in file names and reports: lone surrogates, control characters."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid UTF-8 text"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        return "it contains a control character"
    return None


def _category_problem(name: str) -> str | None:
    """The folder-name rule of defect types (:func:`folder_name_problem`), plus OUT's own names."""
    if name.casefold() in RESERVED_NAMES:
        return f"{name!r} is a name preprocess writes at the top of OUT"
    return folder_name_problem(name)


def _source_names(name: str, category: str | None) -> tuple[str, str]:
    """(category, key) of a frame named ``name`` relative to RAW, checked before it becomes any path.

    ``name`` is foreign (a COCO ``file_name``, a file found in RAW): it must be a safe relative path
    (:func:`threecad.paths.unsafe_reason`: no absolute path, ``..``, backslash or empty part), its
    category must be a folder name by the defect-type rule, every part below it a plain visible
    name, and its key short enough for tile names (:data:`MAX_KEY_BYTES`). Raises a
    :class:`ThreecadError` without a path; the caller reports it as a problem row.
    """
    shown = shorten(repr(name), 120)
    why = _text_problem(name) or unsafe_reason(name)
    if why:
        raise ThreecadError(f"{shown} is refused: {why}")
    rel = PurePosixPath(name)
    if category is None and len(rel.parts) < 2:
        raise ThreecadError(f"{shown} {_TOP_LEVEL}")
    cat, key = _split_key(rel, category)
    why = _category_problem(cat) if category is None else None
    if why:
        raise ThreecadError(f"{shown}: its category {shorten(repr(cat), 80)} cannot be a folder name: {why}")
    for part in rel.parts[0 if category is not None else 1 :]:
        try:
            check_component(part, "path component")
        except ThreecadError as exc:
            raise ThreecadError(f"{shown}: {exc}") from None
    if not key or len(key.replace("/", "__").encode("utf-8")) > MAX_KEY_BYTES:
        raise ThreecadError(f"{shown} is refused: its name below the category must be 1 to {MAX_KEY_BYTES} bytes")
    return cat, key


def _discover_labelme(raw: Path, cfg: PreprocessConfig, issues: list[S.Issue]) -> list[Source]:
    skip = {(raw / n).resolve() for n in LABEL_MAP_NAMES}
    if cfg.label_map:
        skip.add(Path(cfg.label_map).resolve())
    images: dict[tuple[str, str], Path] = {}
    jsons: list[Path] = []
    for path in sorted(p for p in raw.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(raw).parts)):
        rel = path.relative_to(raw)
        if cfg.category is None and len(rel.parts) < 2 and path.suffix.lower() == ".json":
            continue  # files beside the category folders (e.g. ground_truth.json) are not annotations
        if path.suffix.lower() in IMAGE_SUFFIXES:
            if cfg.category is None and len(rel.parts) < 2:
                raise ThreecadError(f"{rel} {_TOP_LEVEL}", raw)
            cat, key = _split_key(PurePosixPath(rel.as_posix()), cfg.category)
            if (cat, key) in images:
                issues.append(S.Issue(rel.as_posix(), None, S.DUPLICATE_STEM, S.SKIPPED, f"same name as {images[(cat, key)].relative_to(raw).as_posix()}"))
                continue
            images[(cat, key)] = path
        elif path.suffix.lower() == ".json" and path.resolve() not in skip:
            jsons.append(path)
    paired: dict[tuple[str, str], Path] = {}
    by_target = {p.resolve(): k for k, p in images.items()}
    orphans: list[tuple[Path, object]] = []
    for path in jsons:
        rel = path.relative_to(raw)
        cat, key = _split_key(PurePosixPath(rel.as_posix()), cfg.category)
        if (cat, key) in images:
            paired[(cat, key)] = path
            continue
        try:
            doc = read_labelme(path)
        except ThreecadError as exc:
            if "not a LabelMe file" in str(exc):
                log.debug("ignoring %s: not a LabelMe file", path)
            else:
                issues.append(S.Issue(rel.as_posix(), None, S.JSON_UNREADABLE, S.SKIPPED, _reason(exc)))
            continue
        why = (_text_problem(doc.image_path) or unsafe_reason(doc.image_path)) if doc.image_path else None
        if why:
            detail = f"imagePath {doc.image_path!r} is refused: {why}; give the JSON its image's name instead"
            issues.append(S.Issue(rel.as_posix(), None, S.UNSAFE_NAME, S.SKIPPED, detail))
            continue
        target = (path.parent / doc.image_path).resolve() if doc.image_path else None
        match = by_target.get(target) if target is not None else None
        if match is not None and match not in paired:
            paired[match] = path
        else:
            orphans.append((path, doc))
    sources = []
    for (cat, key), path in sorted(images.items()):
        image = path.relative_to(raw).as_posix()
        ann = paired[(cat, key)].relative_to(raw).as_posix() if (cat, key) in paired else None
        try:
            _source_names(image, cfg.category)
        except ThreecadError as exc:
            issues.append(S.Issue(ann or image, None, S.UNSAFE_NAME, S.SKIPPED, _reason(exc)))
            continue
        sources.append(Source(cat, key, image, ann))
    for path, _ in orphans:
        rel = path.relative_to(raw)
        issues.append(S.Issue(rel.as_posix(), None, S.IMAGE_MISSING, S.SKIPPED, "no image with this name or the JSON's imagePath"))
    return sources


def _plan_source(
    raw: Path,
    src: Source,
    labels: LabelMap,
    cfg: PreprocessConfig,
    issues: list[S.Issue],
    coco_entry=None,
    worker: GeometryWorker | None = None,
) -> None:
    """Validate one source in place: size, annotations, windows; sets ``status``.

    Every annotation is checked on its own (:func:`_plan_annotation`), so one hostile shape costs
    only itself: the bounds of :mod:`threecad.ingest.annotations.shapes` (vertices, crossings, time).
    """
    ann_file = src.annotation_file or src.image
    where = f"{src.image}: " if coco_entry is not None else ""  # one COCO file holds many images

    def report(annotation: int | None, problem: str, action: str, detail: str = "", file: str | None = None) -> None:
        issues.append(S.Issue(file or ann_file, annotation, problem, action, where + detail if annotation is not None else detail))
        src.problems.append(problem)

    declared: tuple[int | None, int | None] = (None, None)
    shapes: list[RawAnnotation] = []
    if coco_entry is not None:
        declared = (coco_entry.width, coco_entry.height)
        shapes = coco_entry.annotations
    elif src.annotation_file:
        try:
            doc = read_labelme(raw / src.annotation_file)
        except ThreecadError as exc:
            report(None, S.JSON_UNREADABLE, S.SKIPPED, _reason(exc))
            src.status = "skipped"
            return
        declared = (doc.width, doc.height)
        shapes = doc.shapes
    try:
        src.width, src.height = image_size(raw / src.image)
    except ThreecadError as exc:
        text = _reason(exc)
        problem = S.IMAGE_MISSING if "not found" in text else S.IMAGE_TOO_LARGE if "limit" in text else S.IMAGE_UNREADABLE
        report(None, problem, S.SKIPPED, text, file=src.image if problem != S.IMAGE_MISSING else ann_file)
        src.status = "skipped"
        return
    if None not in declared and tuple(declared) != (src.width, src.height):
        report(None, S.SIZE_MISMATCH, S.USED_IMAGE_SIZE, f"declared {declared[0]}x{declared[1]}, image is {src.width}x{src.height}")
    dropped = 0
    for ann in shapes:
        kept = _plan_annotation(ann, src, labels, cfg, report, worker)
        if kept is None:
            dropped += 1
        elif kept[0] is not None:
            src.shapes.append(kept)
    if not src.shapes and dropped:
        report(None, S.NO_VALID_ANNOTATIONS, S.SKIPPED, f"all {dropped} defect annotation(s) dropped: unlabelled defects must not become normal data")
        src.status = "skipped"
        return
    src.windows = tile_windows(src.width, src.height, cfg.tile, cfg.overlap, cfg.min_fraction)
    if not src.windows:
        detail = f"{src.width}x{src.height}: a side is under {cfg.min_fraction:.0%} of the {cfg.tile}-px window ({cfg.min_fraction * cfg.tile:g} px)"
        report(None, S.NO_TILES, S.SKIPPED, detail, file=src.image)
        src.status = "skipped"
        return
    src.status = "defective" if src.shapes else "good"


def _label_detail(label: str) -> str:
    """A label for the report: whole when it could be a name, else its length and its start."""
    return label if len(label) <= MAX_NAME_CHARS else f"a label of {len(label):,} characters (limit {MAX_NAME_CHARS}): {label[:40]!r}..."


def _plan_annotation(ann: RawAnnotation, src: Source, labels: LabelMap, cfg: PreprocessConfig, report, worker) -> tuple | None:
    """``(defect type, geometry or RLE)`` to keep, ``(None, None)`` for an ignored label, None when dropped."""
    if ann.label is None:
        cid = ann.extra.get("category_id")
        detail = f"category_id {cid} is not declared in 'categories'" if cid is not None else "the label is missing or not a string"
        report(ann.index, S.UNKNOWN_LABEL, S.DROPPED, detail)
        return None
    name, status = labels.resolve(ann.label)
    if status == IGNORED:
        report(ann.index, S.IGNORED_LABEL, S.DROPPED, _label_detail(ann.label))
        return None, None
    if status == UNKNOWN:
        report(ann.index, S.UNKNOWN_LABEL, S.DROPPED, _label_detail(ann.label))
        return None
    if ann.shape_type == "rle":
        try:
            size = rle_size(ann.rle)
            if size != (src.height, src.width):
                report(ann.index, S.SIZE_MISMATCH, S.DROPPED, f"RLE size {size[0]}x{size[1]} differs from the image's {src.height}x{src.width}")
                return None
            rle_counts(ann.rle)
        except ValueError as exc:
            report(ann.index, S.MALFORMED_RLE, S.DROPPED, str(exc))
            return None
        return name, ann.rle
    geom, found = S.to_geometry(ann, src.width, src.height, cfg.line_width, worker=worker)
    for problem, action, detail in found:
        report(ann.index, problem, action, detail)
    if geom is None:
        return None
    if geom.area < 16 and not _covers_a_centre(geom):
        report(ann.index, S.SUB_PIXEL, S.ONE_PIXEL, f"area {geom.area:.2f} px² holds no pixel centre")
    return name, geom


def _covers_a_centre(geom) -> bool:
    """Whether the pixel-centre rule gives a tiny shape any pixel (rasterised in its own small box)."""
    x0, y0, x1, y1 = geom.bounds
    dx, dy = math.floor(x0), math.floor(y0)
    local = shapely.affinity.translate(geom, -dx, -dy)
    return bool(rasterize(local, math.ceil(y1) - dy + 1, math.ceil(x1) - dx + 1, min_one_pixel=False).any())


def _refuse_category(name: str) -> None:
    """``--category`` becomes a folder: the same rule as categories found in RAW, as a one-line error."""
    why = _category_problem(name)
    if why:
        raise ThreecadError(f"--category {shorten(repr(name), 80)} cannot be a folder name: {why}")


def _coco_sources(cfg: PreprocessConfig, issues: list[S.Issue], coco_of: dict[int, object]) -> list[Source]:
    """Sources of a COCO file; entries with an unusable or unsafe ``file_name`` become problem rows."""
    coco = read_coco(cfg.coco)  # an unreadable or non-COCO file is a one-line error
    name = Path(cfg.coco).name
    issues.extend(coco.problems)
    sources = []
    for entry in coco.images:
        try:
            cat, key = _source_names(entry.file_name, cfg.category)
        except ThreecadError as exc:
            issues.append(S.Issue(name, None, S.UNSAFE_NAME, S.SKIPPED, f"images[{entry.index}]: file_name {_reason(exc)}"))
            continue
        src = Source(cat, key, PurePosixPath(entry.file_name).as_posix(), name)
        sources.append(src)
        coco_of[id(src)] = entry
    return sources


def _unique_names(sources: list[Source], issues: list[S.Issue]) -> list[Source]:
    """Drop later sources whose tiles would take the names of an earlier one's (``a/b`` vs ``a__b``, ``x.png`` vs ``x.jpg``)."""
    seen: dict[tuple[str, str], Source] = {}
    kept = []
    for src in sources:
        first = seen.setdefault((src.category, src.flat), src)
        if first is not src:
            detail = f"{src.image}: its tiles would have the names of {first.image}'s"
            issues.append(S.Issue(src.annotation_file or src.image, None, S.DUPLICATE_STEM, S.SKIPPED, detail))
            continue
        kept.append(src)
    return kept


def plan(raw: str | Path, cfg: PreprocessConfig) -> tuple[list[Source], list[S.Issue], list[str]]:
    """(sources with status and split, problems, defect types in COCO id order) without touching pixels."""
    raw = Path(raw)
    if not raw.is_dir():
        raise ThreecadError("raw folder not found", raw)
    check_tiling(cfg.tile, cfg.overlap, cfg.min_fraction)
    if cfg.mask_suffix not in ("", "_mask"):
        raise ThreecadError(f"--mask-suffix must be '' (3CAD) or '_mask' (MVTec), got {cfg.mask_suffix!r}")
    if cfg.category is not None:
        _refuse_category(cfg.category)
    labels = _find_label_map(raw, cfg.label_map)
    issues: list[S.Issue] = []
    coco_of: dict[int, object] = {}
    if cfg.coco:
        sources = _coco_sources(cfg, issues, coco_of)
    else:
        sources = _discover_labelme(raw, cfg, issues)
    sources = _unique_names(sources, issues)
    with GeometryWorker() as worker:
        for src in progress(sources, desc="validate"):
            _plan_source(raw, src, labels, cfg, issues, coco_entry=coco_of.get(id(src)), worker=worker)
    if not any(s.status != "skipped" for s in sources):
        why = next((i for i in issues if i.action == S.SKIPPED), issues[0] if issues else None)
        first = f"; first problem: {why.file}: {why.problem} ({shorten(why.detail, 200)})" if why else ""
        raise ThreecadError(("no usable images found" if sources else "no images found") + first, raw)
    types = list(labels.names) if not labels.is_open else sorted({t for s in sources for t, _ in s.shapes})
    groups = [Group(f"{s.category}/{s.key}", s.category, s.status == "defective") for s in sources if s.status != "skipped"]
    assignment = assign_splits(groups, cfg.train_fraction, cfg.val_fraction, 0.0, cfg.seed)
    for s in sources:
        if s.status != "skipped":
            s.split = assignment[f"{s.category}/{s.key}"]
    return sources, issues, types


# ----------------------------------------------------------------------------------------- tile
def _record_path(out: Path, src: Source) -> Path:
    return _target(out, f"{STATE}/sources/{src.category}/{src.flat}.json")


def _target(out: Path, rel: str) -> Path:
    """``OUT/rel``, proven to lie inside OUT (links included) before anything is written there.

    Names were checked when planned; this is the second, independent check on the final path
    (:func:`threecad.paths.safe_join`), which also catches a link planted in OUT before a resume.
    """
    return safe_join(out, rel, "output path")


def read_frame(path: str | Path) -> np.ndarray:
    """A raw frame as preprocess (and ``3cad inspect``) reads it: gray (8 or 16 bit) and RGB frames as
    they are; palette, RGBA, CMYK and the rest as RGB. Unreadable: a ThreecadError naming the file."""
    mode = image_header(path).mode  # the header only; unreadable files are reported by it
    return read_image(path, None if mode in ("L", "RGB", "I;16", "I;16B", "I;16L") else "RGB")


def process_source(raw: Path, out: Path, src: Source, cfg: PreprocessConfig) -> dict:
    """Tile one frame and write its files, then its record; returns the record."""
    record: dict = {"category": src.category, "key": src.key, "tiles": [], "issues": []}
    try:
        image = read_frame(raw / src.image)
    except ThreecadError as exc:
        record["issues"].append(S.Issue(src.image, None, S.IMAGE_UNREADABLE, S.SKIPPED, _reason(exc)).as_row())
        write_json(_record_path(out, src), record, indent=None)
        return record
    height, width = image.shape[:2]
    by_type: dict[str, np.ndarray] = {}
    for dtype, shape in src.shapes:
        mask = rle_decode(shape) if isinstance(shape, dict) else rasterize(shape, height, width)
        by_type[dtype] = by_type[dtype] | mask if dtype in by_type else mask
    union = np.zeros((height, width), dtype=bool)
    for mask in by_type.values():
        union |= mask
    repairs = ";".join(sorted(set(src.problems)))
    for x0, y0, x1, y1 in src.windows:
        crop = union[y0:y1, x0:x1]
        areas = {t: int(m[y0:y1, x0:x1].sum()) for t, m in sorted(by_type.items())}
        present = [t for t, a in areas.items() if a > 0]
        defective = bool(present)
        folder = max(present, key=lambda t: areas[t]) if defective else GOOD  # max keeps the first (alphabetical) tie
        split = "test" if src.status == "defective" else src.split
        name = f"{src.flat}_{x0}_{y0}_{x1}_{y1}"
        image_rel = f"{src.category}/{split}/{folder}/{name}.png"
        save_image(_target(out, image_rel), np.ascontiguousarray(image[y0:y1, x0:x1]), compress_type=zlib.Z_RLE)
        mask_rel, coco = "", []
        if defective:
            mask_rel = f"{src.category}/ground_truth/{folder}/{name}{cfg.mask_suffix}.png"
            save_image(_target(out, mask_rel), crop.astype(np.uint8) * 255, compress_type=zlib.Z_RLE)
            for t in present:
                part = by_type[t][y0:y1, x0:x1]
                ys, xs = np.nonzero(part.any(axis=1))[0], np.nonzero(part.any(axis=0))[0]
                bbox = [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]
                coco.append({"defect_type": t, "rle": rle_encode(part), "area": areas[t], "bbox": bbox})
        row = manifest_row(out, image_rel, category=src.category, split=split, defect=folder, source=src.image,
                           mask=mask_rel, mask_array=crop, defect_types=present, box=(x0, y0, x1, y1),
                           repairs=repairs)
        record["tiles"].append(row | {"coco": coco})
    write_json(_record_path(out, src), record, indent=None)
    return record


def _worker(args: tuple) -> tuple[str, int]:
    raw, out, src, cfg = args
    record = process_source(raw, out, src, cfg)
    return src.key, len(record["tiles"])


# ----------------------------------------------------------------------------------------- collect
def _coco(category: str, rows: list[dict], types: list[str]) -> dict:
    ids = {t: i + 1 for i, t in enumerate(types)}
    images, annotations = [], []
    for image_id, row in enumerate(rows, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": row["image"].split("/", 1)[1],
                "width": row["width"],
                "height": row["height"],
                "source": row["source"],
                "box": [row["x0"], row["y0"], row["x1"], row["y1"]],
            }
        )
        for ann in row["coco"]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": ids[ann["defect_type"]],
                    "segmentation": ann["rle"],
                    "area": ann["area"],
                    "bbox": ann["bbox"],
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": f"{category}: tiles written by 3cad data preprocess", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": t, "supercategory": "defect"} for t, i in ids.items()],
    }


def format_summary(summary: dict) -> str:
    """The summary table printed by the CLI: tiles per category and split, then problems."""
    lines = [f"{'category':<28}{'split':<12}{'good':>8}{'defect':>8}"]
    for key, counts in sorted(summary["tiles_by_split"].items()):
        cat, split = key.split("/")
        lines.append(f"{cat:<28}{split:<12}{counts.get('good', 0):>8}{counts.get('defect', 0):>8}")
    lines.append(f"{summary['tiles']} tiles from {summary['sources_used']} of {summary['sources']} frames")
    if summary["problems"]:
        lines.append(f"{'problem':<26}{'action':<18}{'count':>6}")
        for key, n in sorted(summary["problems"].items()):
            problem, action = key.split("/")
            lines.append(f"{problem:<26}{action:<18}{n:>6}")
        lines.append(f"details: {summary['report']}")
    else:
        lines.append("no problems found")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- driver
def _fingerprint(raw: Path, sources: list[Source], cfg: PreprocessConfig) -> str:
    """Names and sizes of every input file: a resume over changed inputs is refused."""
    digest = hashlib.sha256()
    files = sorted({f for s in sources for f in (s.image, s.annotation_file) if f})
    extra = [cfg.coco, cfg.label_map] + [str(raw / n) for n in LABEL_MAP_NAMES]
    for rel in files:
        path = raw / rel
        digest.update(f"{rel}\0{path.stat().st_size if path.exists() else -1}\0{path.stat().st_mtime_ns if path.exists() else 0}\n".encode())
    for path in extra:
        if path and Path(path).is_file():
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def _prepare_out(raw: Path, out: Path, settings: dict, overwrite: bool) -> bool:
    """Create or validate the output folder; returns True when resuming."""
    raw_r, out_r = raw.resolve(), out.resolve()
    if out_r == raw_r or raw_r in out_r.parents or out_r in raw_r.parents:
        raise ThreecadError("the output folder must not contain or lie inside the raw folder", out)
    marker = out / STATE / "settings.json"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if overwrite:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        elif not marker.is_file():
            raise ThreecadError("output folder is not empty and was not written by preprocess; pass --overwrite to replace it", out)
        elif json.loads(marker.read_text()) != settings:
            raise ThreecadError("output folder was written with other settings or inputs; pass --overwrite to start over", out)
        else:
            for part in out.rglob(".*.part"):  # temporaries of a killed run
                part.unlink(missing_ok=True)
            return True
    out.mkdir(parents=True, exist_ok=True)
    write_json(_target(out, f"{STATE}/settings.json"), settings)
    return False


def preprocess(
    raw_dir: str | Path,
    out_dir: str | Path,
    *,
    tile: int = 1024,
    overlap: float = 0.2,
    min_fraction: float = 0.2,
    category: str | None = None,
    label_map: str | Path | None = None,
    coco: str | Path | None = None,
    line_width: float = 3.0,
    train_fraction: float = 0.7,
    val_fraction: float = 0.0,
    seed: int = 0,
    mask_suffix: str = "",
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
) -> dict:
    """Turn a raw folder into a 3CAD-layout dataset under ``out_dir``; returns the summary dict.

    Resumable: rerun the same command after a kill and it continues; the result is byte-identical
    to an uninterrupted run. See the module docstring and ``docs/preprocess.md``.
    """
    started = time.perf_counter()
    raw, out = Path(raw_dir), Path(out_dir)
    cfg = PreprocessConfig(
        tile, overlap, min_fraction, category, None if label_map is None else str(label_map),
        None if coco is None else str(coco), line_width, train_fraction, val_fraction, seed, mask_suffix,
    )  # fmt: skip
    if workers < 1:
        raise ThreecadError(f"--workers must be at least 1, got {workers}")
    sources, issues, types = plan(raw, cfg)
    if strict and issues:
        first = issues[0]
        raise ThreecadError(f"{len(issues)} problem(s) found with --strict; first: {first.file}: {first.problem} ({first.detail})")
    settings = {"config": asdict(cfg), "inputs": _fingerprint(raw, sources, cfg), "version": 1}
    resumed = _prepare_out(raw, out, settings, overwrite)
    todo = [s for s in sources if s.status != "skipped" and not _record_path(out, s).is_file()]
    if resumed:
        log.info("resuming: %d of %d frames left", len(todo), sum(s.status != "skipped" for s in sources))
    todo.sort(key=lambda s: -s.width * s.height)  # big frames first: better load balance
    jobs = [(raw, out, s, cfg) for s in todo]
    if workers == 1 or len(jobs) <= 1:
        for job in progress(jobs, desc="tiles", unit="frame"):
            _worker(job)
    else:
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_worker, job) for job in jobs]
            for future in progress(cf.as_completed(futures), desc="tiles", total=len(futures), unit="frame"):
                future.result()
    summary = _collect(out, sources, issues, types, cfg)
    if strict and summary["problems"]:
        raise ThreecadError(f"problems found while tiling with --strict; see {summary['report']}")
    summary["seconds"] = round(time.perf_counter() - started, 3)
    summary["resumed"] = resumed
    return summary


def _collect(out: Path, sources: list[Source], issues: list[S.Issue], types: list[str], cfg: PreprocessConfig) -> dict:
    rows: list[dict] = []
    rows_issues = [i.as_row() for i in issues]
    used = 0
    for src in sources:
        if src.status == "skipped":
            continue
        record = json.loads(_record_path(out, src).read_text())
        rows_issues.extend(record["issues"])
        rows.extend(record["tiles"])
        used += bool(record["tiles"])
    rows.sort(key=lambda r: (r["category"], r["image"]))
    manifest = pd.DataFrame(rows, columns=[*COLUMNS, "coco"])
    write_manifest(manifest[list(COLUMNS)], _target(out, "manifest"))
    for category in sorted({s.category for s in sources}):
        cat_rows = [r for r in rows if r["category"] == category]
        write_text(_target(out, f"coco/{category}.json"), json.dumps(_coco(category, cat_rows, types), separators=(",", ":")) + "\n")
    report = pd.DataFrame(rows_issues, columns=["file", "annotation", "problem", "action", "detail"])
    report = report.sort_values(["file", "annotation", "problem"], kind="stable").reset_index(drop=True)
    write_text(_target(out, "report.csv"), report.to_csv(index=False, lineterminator="\n"))
    problems: dict[str, int] = {}
    for row in rows_issues:
        key = f"{row['problem']}/{row['action']}"
        problems[key] = problems.get(key, 0) + 1
    tiles_by_split: dict[str, dict[str, int]] = {}
    for row in rows:
        entry = tiles_by_split.setdefault(f"{row['category']}/{row['split']}", {})
        kind = "defect" if row["label"] else "good"
        entry[kind] = entry.get(kind, 0) + 1
    summary = {
        "sources": len(sources),
        "sources_used": used,
        "files_skipped": sum(1 for r in rows_issues if r["action"] == S.SKIPPED),
        "tiles": len(rows),
        "defective_tiles": sum(r["label"] for r in rows),
        "tiles_by_split": tiles_by_split,
        "problems": dict(sorted(problems.items())),
        "defect_types": types,
        "report": str(out / "report.csv"),
        "manifest": str(out / "manifest.parquet"),
    }
    write_json(_target(out, "preprocess_summary.json"), {k: v for k, v in summary.items() if k not in ("report", "manifest")})
    log.info("wrote %d tiles (%d defective) to %s", summary["tiles"], summary["defective_tiles"], out)
    return summary
