"""``3cad data import-folder``: a folder of class sub-folders with same-stem masks, into the 3CAD layout.

Source layout: ``<src>/<Class>/.../<name>.<ext>`` with the mask beside the image, as
``<name><mask suffix>`` (when images use another suffix, e.g. ``.jpg`` images with ``.png``
masks) or ``<name>_mask<mask suffix>``. Classes named with ``normal`` hold defect-free images
(their masks, if any, must be empty); every other class is a defect type.

The split is the unsupervised-benchmark one, made by :func:`threecad.dataset.split.assign_splits` (the
function ``preprocess`` and ``split`` use): a seeded ``train_fraction`` of the normal images
trains, a seeded ``validation_fraction`` of those moves to ``validation/good`` (model selection
without touching test), and the remaining normals plus every defective image form the test set.
Normal images with identical bytes form one group that stays on one side (the fractions count
groups), so the import never creates train/test leakage that ``verify`` would flag. Images are copied byte for byte (or hard-linked), EXIF
orientation included; masks are read in the displayed orientation (:func:`threecad.io.open_image`),
binarised and written upright as 0/255 PNGs named like their image (3CAD style), so they line up
with the image as every reader here shows it.

The output is built in a temporary sibling folder and renamed into place when complete. It also
holds the manifest (:mod:`threecad.dataset.manifest`; ``source`` is each file's path below the source
folder) and ``import.json`` (the settings, the source folder included, and the counts), so every
file can be traced to its source.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from threecad.dataset.layout import GOOD, IMAGE_SUFFIXES, MVTEC_SUFFIX
from threecad.dataset.manifest import MANIFEST, manifest_row, write_manifest
from threecad.dataset.masks import read_mask
from threecad.dataset.split import Group, assign_splits, place_file
from threecad.errors import ThreecadError
from threecad.io import (
    check_output_dir,
    image_size,
    read_image,
    save_image,
    sha256_file,
    staged_dir,
    to_uint8,
    write_json,
)
from threecad.progress import progress

log = logging.getLogger(__name__)

DEFAULT_NORMAL = ("good", "normal", "ok", "free")


@dataclass(frozen=True)
class FolderPreset:
    """Settings that make one known public folder import with a single command."""

    category: str
    normal: tuple[str, ...]
    strip_prefix: str = ""
    lowercase: bool = False
    image_suffixes: tuple[str, ...] | None = None
    mask_suffix: str = ".png"
    mask_threshold: int | None = None


PRESETS: dict[str, FolderPreset] = {
    # Huang et al.'s magnetic tile defects: MT_<Class>/Imgs/<name>.jpg + <name>.png, anti-aliased
    # 0..255 masks to binarise at > 127, MT_Free defect-free.
    "magnetic-tile": FolderPreset(
        category="Magnetic_Tile",
        normal=("MT_Free",),
        strip_prefix="MT_",
        lowercase=True,
        image_suffixes=(".jpg",),
        mask_suffix=".png",
        mask_threshold=127,
    ),
}


@dataclass
class ImportReport:
    out: str
    category: str
    seed: int
    counts: dict[str, int] = field(default_factory=dict)  # "<split>/<folder>" -> images
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}

    def summary(self) -> str:
        lines = [f"imported {sum(self.counts.values())} images into {self.out}/{self.category} (seed {self.seed})"]
        lines += [f"  {key:28s} {n:6d}" for key, n in sorted(self.counts.items())]
        for split in ("train", "validation", "test"):
            total = sum(n for key, n in self.counts.items() if key.startswith(split + "/"))
            if total:
                lines.append(f"  {split + ' (total)':28s} {total:6d}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {s['path']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


@dataclass
class _Item:
    image: Path
    mask: Path | None
    defect: str  # GOOD or the defect-type name
    split: str = "test"


def _mask_for(image: Path, mask_suffix: str) -> Path | None:
    candidates = []
    if image.suffix.lower() != mask_suffix.lower():
        candidates.append(image.with_suffix(mask_suffix))
    candidates.append(image.with_name(image.stem + MVTEC_SUFFIX + mask_suffix))
    return next((c for c in candidates if c.is_file()), None)


def _images(folder: Path, image_suffixes: tuple[str, ...] | None, mask_suffix: str) -> list[Path]:
    """Image files below ``folder``, excluding the files that are masks of other images."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if image_suffixes is not None:
        wanted = {s.lower() for s in image_suffixes}
        return [p for p in files if p.suffix.lower() in wanted]
    stems_other = {(p.parent, p.stem) for p in files if p.suffix.lower() != mask_suffix.lower()}
    return [
        p for p in files
        if not p.stem.endswith(MVTEC_SUFFIX)
        and not (p.suffix.lower() == mask_suffix.lower() and (p.parent, p.stem) in stems_other)
    ]


def _binary_mask(path: Path, threshold: int | None, size: tuple[int, int]) -> np.ndarray:
    if threshold is None:
        return read_mask(path, expected_size=size)
    array = read_image(path)
    if array.ndim != 2:
        raise ThreecadError(f"mask must be single-channel, got shape {array.shape}", path)
    if (array.shape[1], array.shape[0]) != tuple(size):
        raise ThreecadError(f"mask size {array.shape[1]}x{array.shape[0]} differs from its image's {size[0]}x{size[1]}", path)
    if array.dtype != np.uint8 and array.dtype.kind in "ui":
        array = to_uint8(array, path)  # the threshold is on the 8-bit scale whatever the bit depth
    return array > threshold


def import_folder(
    src: str | Path,
    out: str | Path,
    preset: str | None = None,
    category: str | None = None,
    normal: tuple[str, ...] | list[str] | None = None,
    strip_prefix: str | None = None,
    lowercase: bool | None = None,
    image_suffixes: tuple[str, ...] | None = None,
    mask_suffix: str | None = None,
    mask_threshold: int | None = None,
    train_fraction: float = 0.7,
    validation_fraction: float = 0.0,
    seed: int = 0,
    empty_masks: Literal["skip", "error"] = "skip",
    link: bool = False,
    overwrite: bool = False,
) -> ImportReport:
    """Import ``src`` into ``out/<category>`` in the 3CAD layout; see the module docstring.

    Explicit arguments override the preset's. ``empty_masks="skip"`` leaves out defective images
    whose binarised mask is empty (listed in the report); ``"error"`` refuses them. ``link``
    hard-links images instead of copying them (falls back to a copy across file systems).
    """
    src, out = Path(src), Path(out)
    if preset is not None and preset not in PRESETS:
        raise ThreecadError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    base = PRESETS[preset] if preset else FolderPreset(category=src.name, normal=DEFAULT_NORMAL)
    category = category or base.category
    normal_names = {n.lower() for n in (normal or base.normal)}
    strip_prefix = base.strip_prefix if strip_prefix is None else strip_prefix
    lowercase = base.lowercase if lowercase is None else lowercase
    image_suffixes = image_suffixes or base.image_suffixes
    mask_suffix = mask_suffix or base.mask_suffix
    mask_threshold = base.mask_threshold if mask_threshold is None else mask_threshold
    if not 0 < train_fraction < 1:
        raise ThreecadError(f"--train-fraction must be between 0 and 1 (exclusive), got {train_fraction}")
    if not 0 <= validation_fraction < 1:
        raise ThreecadError(f"--validation-fraction must be in [0, 1), got {validation_fraction}")
    if not src.is_dir():
        raise ThreecadError("source folder not found", src)
    if "/" in category or category in ("", ".", ".."):
        raise ThreecadError(f"invalid category name {category!r}")
    check_output_dir(out, overwrite)

    classes = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    normals = [c for c in classes if c.name.lower() in normal_names]
    if not normals:
        raise ThreecadError(
            f"no normal class folder among {', '.join(c.name for c in classes) or 'none'}; name it with --normal", src
        )
    report = ImportReport(str(out), category, seed)
    items: list[_Item] = []
    for cls in classes:
        is_normal = cls in normals
        defect = GOOD
        if not is_normal:
            defect = cls.name.removeprefix(strip_prefix).replace(" ", "_")
            defect = defect.lower() if lowercase else defect
            if defect in ("", GOOD):
                raise ThreecadError(f"class folder maps to the defect name {defect!r}; rename it or use --normal", cls)
        for image in _images(cls, image_suffixes, mask_suffix):
            items.append(_Item(image, _mask_for(image, mask_suffix), defect))
    if not items:
        raise ThreecadError("no images found", src)

    # Binarise masks first: anything wrong stops the import before a file is written.
    masks: dict[Path, np.ndarray] = {}
    kept: list[_Item] = []
    for item in progress(items, desc="read masks"):
        if item.mask is None:
            if item.defect != GOOD:
                raise ThreecadError(f"defective image has no mask ({item.image.stem}{mask_suffix})", item.image)
            kept.append(item)
            continue
        binary = _binary_mask(item.mask, mask_threshold, image_size(item.image))
        if item.defect == GOOD:
            if binary.any():
                raise ThreecadError("normal image has a non-empty mask (mislabelled?)", item.mask)
        elif not binary.any():
            if empty_masks == "error":
                raise ThreecadError("defective image has an empty mask", item.mask)
            report.skipped.append({"path": item.image.relative_to(src).as_posix(), "reason": "empty mask"})
            log.warning("skipping %s: its mask is empty", item.image)
            continue
        else:
            masks[item.image] = binary
        kept.append(item)

    # Seeded split of the normals (threecad.dataset.split.assign_splits, as preprocess and split do it), by
    # groups of identical bytes: the fractions count groups, and twins land on one side.
    groups: dict[str, list[_Item]] = {}
    for item in progress([i for i in kept if i.defect == GOOD], desc="hash normals"):
        groups.setdefault(sha256_file(item.image), []).append(item)
    sides = assign_splits([Group(key, category, defective=False) for key in groups], train_fraction,
                          validation_fraction, 0.0, seed)
    for key, members in groups.items():
        for item in members:
            item.split = sides[key]

    names: dict[Path, Path] = {}
    for item in kept:
        rel = Path(category) / item.split / item.defect / item.image.name
        if rel in names.values():
            other = next(k for k, v in names.items() if v == rel)
            raise ThreecadError(f"two source images map to {rel.as_posix()} (also {other}); rename one", item.image)
        names[item.image] = rel

    with staged_dir(out) as tmp:
        rows = []
        for item in progress(kept, desc="import"):
            target = tmp / names[item.image]
            place_file(item.image, target, "hardlink" if link else "copy")
            mask_rel = ""
            if item.defect != GOOD:
                mask_rel = f"{category}/ground_truth/{item.defect}/{item.image.stem}.png"
                save_image(tmp / mask_rel, masks[item.image].astype(np.uint8) * 255)
            rows.append(manifest_row(tmp, names[item.image].as_posix(), category=category, split=item.split,
                                     defect=item.defect, source=item.image.relative_to(src).as_posix(),
                                     mask=mask_rel, mask_array=masks.get(item.image),
                                     defect_types=() if item.defect == GOOD else (item.defect,)))
            key = f"{item.split}/{item.defect}"
            report.counts[key] = report.counts.get(key, 0) + 1
        write_manifest(sorted(rows, key=lambda r: r["image"]), tmp / MANIFEST)
        settings = {"source": str(src.resolve()), "preset": preset, "normal": sorted(normal_names),
                    "strip_prefix": strip_prefix, "lowercase": lowercase, "mask_threshold": mask_threshold,
                    "train_fraction": train_fraction, "validation_fraction": validation_fraction}
        write_json(tmp / "import.json", asdict(report) | {"settings": settings, "out": str(out)})
    report.out = str(out)
    log.info("imported %d images into %s", len(kept), out / category)
    return report

