"""A validation set with synthetic anomalies, for choosing method settings without test images.

Unsupervised detectors have no defective training images, so settings (resolution, layers, bank
size, exposure) would otherwise be picked on the test set, which inflates the reported figures.
Instead each ``validation/good`` image appears once unchanged (``test/good``) and once per kind of
synthetic anomaly (``test/<kind>``, masks in ``ground_truth/<kind>``), so ``3cad predict`` and
``evaluate`` work on it unchanged and every kind can be scored on its own against the same normals:

* ``painted``: scratches, pinholes, dirt and bumps painted as in the synthetic datasets
  (:mod:`threecad.synth.surface`);
* ``texture``: the self-supervised training recipe (Perlin blob blended with another training image
  or a procedural texture, :func:`threecad.synth.anomalies.texture_blob`): large, often faint regions;
* ``dark``: a pit, hole or crack (:func:`threecad.synth.anomalies.dark_spot`);
* ``edge``: material missing at the border (:func:`threecad.synth.anomalies.edge_chip`);
* ``shade``: a large, faint, soft-edged region 12-30 % darker or brighter, like uneven grinding or a
  worn area (:func:`threecad.synth.anomalies.shaded_region`). Pixel-level AUROC pools every pixel, so
  large defects weigh most in it; the other kinds are all small or high-contrast.

No kind is a real defect, so a validation score ranks settings; it does not predict test figures.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from threecad.dataset.layout import list_samples
from threecad.dataset.loaders import AnomalyDataset
from threecad.errors import ThreecadError
from threecad.io import read_image, save_image
from threecad.progress import progress
from threecad.synth.anomalies import TextureBank, dark_spot, edge_chip, shaded_region, texture_blob
from threecad.synth.surface import defect_polygon, paint_defect, polygon_mask, to_uint8

DEFECT_TYPES = ("scratch", "pinhole", "dirt", "bump")
#: New kinds go at the end: a kind's random draws are seeded by its index here.
KINDS = ("painted", "texture", "dark", "edge", "shade")


def _painted(image: np.ndarray, rng: np.random.Generator, max_defects: int) -> tuple[np.ndarray, np.ndarray]:
    painted = image.astype(np.float32)
    height, width = painted.shape[:2]
    union = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(1, max_defects + 1))):
        kind = str(rng.choice(DEFECT_TYPES))
        mask = polygon_mask(defect_polygon(rng, kind, height, width, scale=min(height, width) / 256), height, width)
        paint_defect(painted, mask, kind, rng)
        union |= mask
    return to_uint8(painted), union


def check_kinds(kinds: tuple[str, ...]) -> None:
    """A one-line error unless ``kinds`` is a non-empty selection of :data:`KINDS`."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ThreecadError(f"unknown validation anomaly kind(s) {unknown or list(kinds)}; choose from {', '.join(KINDS)}")


def make_validation_set(
    dataset: str | Path,
    category: str,
    out: str | Path,
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
    max_defects: int = 2,
    overwrite: bool = False,
) -> Path:
    """Write ``<out>/<category>/{test/good, test/<kind>, ground_truth/<kind>}``; returns ``out``.

    Deterministic for a seed: image ``i`` draws every kind from ``default_rng([seed, i, k])``, so
    adding a kind leaves the others unchanged. Painted defect sizes scale with ``min(h, w) / 256``.
    Textures come from the category's training images (native size) and procedural patterns.
    """
    check_kinds(kinds)
    samples = list_samples(dataset, category, "validation")
    if not samples:
        raise ThreecadError(f"no validation/good images for category {category!r}; import with a "
                            "validation fraction (e.g. --validation-fraction 0.2)", Path(dataset) / category)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ThreecadError("output folder is not empty; pass --overwrite to replace it", out)
        shutil.rmtree(out)
    textures = None
    if "texture" in kinds:
        textures = TextureBank(images=AnomalyDataset(dataset, category, "train", size=None, resize="native"))
    synthesize_kind = {"texture": lambda x, rng: texture_blob(x, rng, textures), "dark": dark_spot, "edge": edge_chip,
                       "shade": shaded_region}
    base = out / category
    for index, sample in enumerate(progress(samples, desc="validation set")):
        image = read_image(sample.image_path, "RGB")
        save_image(base / "test" / "good" / f"{sample.stem}.png", image)
        as_float = image.astype(np.float32) / 255.0
        for kind in kinds:
            rng = np.random.default_rng([seed, index, KINDS.index(kind)])
            if kind == "painted":
                augmented, mask = _painted(image, rng, max_defects)
            else:
                result, mask = synthesize_kind[kind](as_float, rng)
                augmented = np.clip(np.rint(result * 255.0), 0, 255).astype(np.uint8)
            if not mask.any():
                continue
            name = f"{sample.stem}_{kind}.png"
            save_image(base / "test" / kind / name, augmented)
            save_image(base / "ground_truth" / kind / name, mask.astype(np.uint8) * 255)
    return out
