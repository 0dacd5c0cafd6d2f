"""A small, already processed dataset in the 3CAD layout, for fast tests of the later stages.

Categories take real 3CAD folder names (so catalogue look-ups and leaderboard tables work on it),
images vary in size like 3CAD crops do, and defective test images carry one or several defects,
possibly of several types; the image goes to the folder of its largest defect type and its mask
is the union of all its defects (the same rule as ``3cad data preprocess``).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from threecad.dataset.catalog import CATEGORY_FOLDERS
from threecad.dataset.layout import GOOD, mask_name
from threecad.dataset.manifest import MANIFEST, manifest_row, write_manifest
from threecad.errors import ThreecadError
from threecad.io import check_output_dir, save_image, write_json
from threecad.progress import progress
from threecad.synth.surface import (
    defect_polygon,
    paint_defect,
    polygon_mask,
    render_surface,
    to_uint8,
)

log = logging.getLogger(__name__)

#: Per-category look: surface kind, material, channels, and the defect types it shows.
_STYLES = (
    ("brushed", "aluminum", 3, ("scratch", "bump", "pinhole", "discoloration", "dirt")),
    ("milled", "aluminum", 1, ("scratch", "pinhole", "dirt")),
    ("brushed", "aluminum", 1, ("scratch", "bump", "discoloration")),
    ("milled", "aluminum", 3, ("scratch", "dirt", "bump")),
    ("brushed", "aluminum", 3, ("pinhole", "scratch", "discoloration", "dirt")),
    ("milled", "aluminum", 1, ("scratch", "bump", "pinhole", "discoloration", "dirt")),
    ("milled", "copper", 3, ("scratch",)),
    ("brushed", "iron", 1, ("scratch", "dirt", "pinhole", "bump")),
)


@dataclass(frozen=True)
class SynthDatasetConfig:
    """Sizes of the generated dataset; the defaults build in a few seconds."""

    categories: int = 3
    train: int = 24
    test_good: int = 8
    test_defect: int = 16
    size: tuple[int, int] = (256, 256)  # (width, height) of the largest image
    vary_size: bool = True
    mask_style: str = "3cad"


def _image_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _render(
    rng: np.random.Generator, cfg: SynthDatasetConfig, style: tuple, defective: bool
) -> tuple[np.ndarray, np.ndarray | None, str | None, list[str]]:
    kind, material, channels, defects = style
    width, height = cfg.size
    if cfg.vary_size:
        width = int(rng.integers(int(width * 0.75), width + 1))
        height = int(rng.integers(int(height * 0.75), height + 1))
    image = render_surface(rng, height, width, kind, material, channels)
    if not defective:
        return to_uint8(image), None, None, []
    union = np.zeros((height, width), dtype=bool)
    area_by_type: dict[str, int] = {}
    for _ in range(int(rng.integers(1, 4))):
        dtype = str(rng.choice(defects))
        mask = polygon_mask(defect_polygon(rng, dtype, height, width, scale=min(width, height) / 256), height, width)
        paint_defect(image, mask, dtype, rng)
        union |= mask
        area_by_type[dtype] = area_by_type.get(dtype, 0) + int(mask.sum())
    folder = max(sorted(area_by_type), key=lambda k: area_by_type[k])
    return to_uint8(image), union, folder, sorted(area_by_type)


def make_synthetic_dataset(
    out: str | Path, seed: int = 0, config: SynthDatasetConfig | None = None, overwrite: bool = False
) -> Path:
    """Write ``<out>/<Category>/{train/good,test/good,test/<defect>,ground_truth/<defect>}``.

    Deterministic for a seed: the same seed gives the same bytes. Also writes the manifest
    (:mod:`threecad.dataset.manifest`: every image with its defect types, regions and checksums) and
    ``<out>/synth_dataset.json`` (the seed and the configuration).
    """
    cfg = config or SynthDatasetConfig()
    if not 1 <= cfg.categories <= len(CATEGORY_FOLDERS):
        raise ThreecadError(f"--categories must be between 1 and {len(CATEGORY_FOLDERS)}, got {cfg.categories}")
    out = Path(out)
    check_output_dir(out, overwrite)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    jobs = []
    for c in range(cfg.categories):
        for split, defective, count in (
            ("train", False, cfg.train),
            ("test", False, cfg.test_good),
            ("test", True, cfg.test_defect),
        ):
            jobs.extend((c, split, defective, i) for i in range(count))
    for c, split, defective, i in progress(jobs, desc="synth dataset"):
        category = CATEGORY_FOLDERS[c]
        rng = _image_rng(seed, c, 0 if split == "train" else 1, int(defective), i)
        image, mask, folder, types = _render(rng, cfg, _STYLES[c], defective)
        stem = f"{i:04d}"
        defect = folder if defective else GOOD
        image_rel, mask_rel = f"{category}/{split}/{defect}/{stem}.png", ""
        save_image(out / image_rel, image)
        if mask is not None:
            style = "mvtec" if cfg.mask_style == "mvtec" else "3cad"
            mask_rel = f"{category}/ground_truth/{defect}/{mask_name(stem, style)}"
            save_image(out / mask_rel, mask.astype(np.uint8) * 255)
        # a generated image is cut from nothing: it is its own source, its box the whole image
        rows.append(manifest_row(out, image_rel, category=category, split=split, defect=defect, source=image_rel,
                                 mask=mask_rel, mask_array=mask, defect_types=types))
    write_manifest(sorted(rows, key=lambda r: r["image"]), out / MANIFEST)
    write_json(out / "synth_dataset.json", {"seed": seed, "config": cfg.__dict__ | {"size": list(cfg.size)}})
    log.info("wrote a synthetic dataset of %d categories to %s", cfg.categories, out)
    return out
