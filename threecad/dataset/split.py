"""Seeded, group-aware, stratified splits of a pool of images or tiles.

A *group* is everything cut from one source image: its tiles always land on the same side, so
no test tile shares pixels (20 % overlap!) or a frame with a training tile. Training holds only
normal groups; defective groups go to test, except an optional share carved into validation.
Within each stratum (category x defect type, the type being the group's dominant one by area)
groups are shuffled with a generator seeded by (seed, category, type), so adding a category
never reshuffles another and the result does not depend on input order.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from threecad.dataset.layout import GOOD, SPLITS, list_categories, list_samples
from threecad.dataset.manifest import (
    COLUMNS,
    MANIFEST,
    find_manifest,
    manifest_row,
    read_manifest,
    write_manifest,
)
from threecad.errors import ThreecadError
from threecad.io import check_output_dir
from threecad.progress import progress

log = logging.getLogger(__name__)

#: Tile names end in ``_<x0>_<y0>_<x1>_<y1>``; what precedes is the source image.
_TILE = re.compile(r"^(?P<source>.+)_(\d+)_(\d+)_(\d+)_(\d+)$")


@dataclass(frozen=True)
class Group:
    key: str
    category: str
    defective: bool
    stratum: str = GOOD  # the dominant defect type of a defective group


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def assign_splits(
    groups: list[Group],
    train_fraction: float = 0.7,
    val_fraction: float = 0.0,
    val_defect_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, str]:
    """Group key -> ``train``, ``validation`` or ``test``.

    Normal groups: ``round(train_fraction * n)`` of each category to train (of which
    ``round(val_fraction * n_train)`` to validation), the rest to test. Defective groups:
    ``round(val_defect_fraction * n)`` of each (category, type) stratum to validation, the rest to test.
    """
    for name, value in (("train_fraction", train_fraction), ("val_fraction", val_fraction), ("val_defect_fraction", val_defect_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ThreecadError(f"{name} must be in [0, 1], got {value}")
    keys = [g.key for g in groups]
    if len(set(keys)) != len(keys):
        raise ThreecadError("group keys must be unique")
    strata: dict[tuple[str, bool, str], list[str]] = {}
    for g in groups:
        strata.setdefault((g.category, g.defective, g.stratum if g.defective else GOOD), []).append(g.key)
    out: dict[str, str] = {}
    for (category, defective, stratum), members in sorted(strata.items()):
        members = sorted(members)
        ss = np.random.SeedSequence([seed, zlib.crc32(category.encode()), zlib.crc32(stratum.encode())])
        order = [members[i] for i in np.random.default_rng(ss).permutation(len(members))]
        if defective:
            n_val = _round(val_defect_fraction * len(order))
            out.update({k: "validation" for k in order[:n_val]})
            out.update({k: "test" for k in order[n_val:]})
        else:
            n_train = _round(train_fraction * len(order))
            n_val = _round(val_fraction * n_train)
            out.update({k: "validation" for k in order[:n_val]})
            out.update({k: "train" for k in order[n_val:n_train]})
            out.update({k: "test" for k in order[n_train:]})
    return out


def _groups_of(pool: pd.DataFrame) -> list[Group]:
    groups = []
    for key, rows in pool.groupby("group", sort=True):
        defective = bool((rows["label"] == 1).any())
        stratum = GOOD
        if defective:
            area = rows[rows["label"] == 1].groupby("defect")["defect_area"].sum()
            stratum = str(max(sorted(area.index), key=lambda d: area[d]))
        groups.append(Group(str(key), str(rows["category"].iloc[0]), defective, stratum))
    return groups


def _own_source(split: str, defect: str, stem: str) -> str:
    """The source of an image of a folder pool: the frame a tile name points to, else the image itself."""
    match = _TILE.match(stem)
    return match.group("source") if match else f"{split}/{defect}/{stem}"


def pool_from_folder(root: str | Path) -> pd.DataFrame:
    """Every image of a dataset tree (all splits) as a manifest table; tiles are grouped by their source
    name (``<source>_<x0>_<y0>_<x1>_<y1>``, the box too). Files are not hashed (checksums left empty)."""
    from threecad.dataset.masks import read_mask  # lazy: threecad.dataset pulls in torch

    root = Path(root)
    rows = []
    for category in list_categories(root):
        for split in SPLITS:
            for s in list_samples(root, category, split):
                match = _TILE.match(s.stem)
                box = tuple(int(v) for v in match.groups()[1:]) if match else None
                mask = s.mask_path if s.mask_path is not None and s.mask_path.exists() else None
                rows.append(manifest_row(
                    root, s.image_path.relative_to(root).as_posix(), category=category, split=split,
                    defect=s.defect, source=_own_source(split, s.defect, s.stem),
                    mask="" if mask is None else mask.relative_to(root).as_posix(),
                    mask_array=None if mask is None else read_mask(mask),
                    defect_types=() if s.label == 0 else (s.defect,), box=box, hashed=False))
    if not rows:
        raise ThreecadError("no images found", root)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def load_pool(source: str | Path) -> tuple[pd.DataFrame, Path]:
    """(pool table, folder its relative paths start from) from a manifest file, a dataset folder's
    manifest (:func:`threecad.dataset.manifest.find_manifest`) or, without one, the folder's images.

    A row without a ``source`` (a foreign table) is its own source, as in a folder pool.
    """
    source = Path(source)
    if source.is_file():
        pool, base = read_manifest(source), source.parent
    elif (manifest := find_manifest(source)) is not None:
        pool, base = read_manifest(manifest), source
    else:
        return pool_from_folder(source), source
    own = [_own_source(r["split"], r["defect"], Path(r["image"]).stem)
           for r in pool[["split", "defect", "image"]].to_dict("records")]
    pool["source"] = [s or o for s, o in zip(pool["source"], own)]
    return pool, base


def split_dataset(
    source: str | Path,
    out: str | Path,
    seed: int = 0,
    train_fraction: float = 0.7,
    val_fraction: float = 0.0,
    val_defect_fraction: float = 0.0,
    materialize: str = "none",
    overwrite: bool = False,
) -> dict:
    """Re-split a pool (preprocess manifest or dataset folder) and write ``<out>/manifest.{parquet,csv}``.

    ``materialize`` = ``hardlink`` or ``copy`` also builds the 3CAD tree under ``out`` (hard links
    fall back to copies across file systems). Returns counts per category and split.
    """
    if materialize not in ("none", "hardlink", "copy"):
        raise ThreecadError(f"materialize must be none, hardlink or copy, got {materialize!r}")
    pool, base = load_pool(source)
    out = Path(out)
    check_output_dir(out, overwrite)
    if out.exists() and any(out.iterdir()):
        if base.resolve() == out.resolve() or out.resolve() in base.resolve().parents:
            raise ThreecadError("refusing to overwrite the folder the pool comes from", out)
        shutil.rmtree(out)
    pool = pool.copy()
    pool["group"] = pool["category"].astype(str) + "/" + pool["source"].astype(str)
    assignment = assign_splits(_groups_of(pool), train_fraction, val_fraction, val_defect_fraction, seed)
    pool["split"] = pool["group"].map(assignment)
    names = pool["image"].map(lambda p: Path(p).name)
    clash = pool.assign(name=names).duplicated(["category", "name"], keep=False)
    new_rows = []
    for row, name, renamed in zip(pool.to_dict("records"), names, clash):
        stem, suffix = Path(name).stem, Path(name).suffix
        if renamed:  # the same file name in two splits of a folder pool: keep both, prefixed
            stem = f"{Path(row['image']).parts[-3]}-{stem}"
        image = f"{row['category']}/{row['split']}/{row['defect']}/{stem}{suffix}"
        mask = ""
        if row["mask"]:
            old = Path(row["mask"])
            mask_suffix = "_mask" if old.stem.endswith("_mask") else ""
            mask = f"{row['category']}/ground_truth/{row['defect']}/{stem}{mask_suffix}{old.suffix}"
        row.update(pool_image=str((base / row["image"]).resolve()), pool_mask=str((base / row["mask"]).resolve()) if row["mask"] else "")
        row.update(image=image, mask=mask)
        new_rows.append(row)
    result = pd.DataFrame(new_rows).drop(columns=["group"])
    out.mkdir(parents=True, exist_ok=True)
    if materialize != "none":
        for row in progress(new_rows, desc="materialise"):
            for src, dst in ((row["pool_image"], row["image"]), (row["pool_mask"], row["mask"])):
                if src:
                    place_file(Path(src), out / dst, materialize)
    write_manifest(result, out / MANIFEST)
    counts = result.groupby(["category", "split", "label"]).size()
    summary = {f"{c}/{s}/{'defect' if lab else 'good'}": int(n) for (c, s, lab), n in counts.items()}
    log.info("split %d images of %d groups into %s", len(result), len(assignment), out)
    return {"images": len(result), "groups": len(assignment), "counts": summary}


def place_file(src: Path, dst: Path, how: str) -> None:
    """Put ``src`` at ``dst`` (replacing it): a hard link for ``how="hardlink"`` where the file system
    allows one, else a copy written beside ``dst`` and renamed into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    if how == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    tmp = dst.with_name(f".{dst.name}.part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
