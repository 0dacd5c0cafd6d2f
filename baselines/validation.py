"""A validation set with synthetic anomalies, for choosing method settings without test images.

Unsupervised detectors have no defective training images, so settings (resolution, layers, bank
size) would otherwise be picked on the test set, which inflates the reported figures. Instead each
``validation/good`` image appears twice in a small dataset of its own: once unchanged
(``test/good``) and once with synthetic defects painted on it (``test/synthetic``, masks in
``ground_truth/synthetic``), using the same painting as the synthetic datasets
(:mod:`threecad.synth.surface`). ``3cad predict`` and ``evaluate`` then work on it unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from threecad.errors import ThreecadError
from threecad.io import read_image, save_image
from threecad.layout import list_samples
from threecad.progress import progress
from threecad.synth.surface import defect_polygon, paint_defect, polygon_mask, to_uint8

DEFECT_TYPES = ("scratch", "pinhole", "dirt", "bump")
SYNTHETIC = "synthetic"


def make_validation_set(
    dataset: str | Path,
    category: str,
    out: str | Path,
    seed: int = 0,
    defects: tuple[str, ...] = DEFECT_TYPES,
    max_defects: int = 2,
    overwrite: bool = False,
) -> Path:
    """Write ``<out>/<category>/{test/good, test/synthetic, ground_truth/synthetic}``; returns ``out``.

    Deterministic for a seed. Defect sizes scale with the image (``min(h, w) / 256``).
    """
    samples = list_samples(dataset, category, "validation")
    if not samples:
        raise ThreecadError(f"no validation/good images for category {category!r}; import with a "
                            "validation fraction (e.g. --validation-fraction 0.2)", Path(dataset) / category)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ThreecadError("output folder is not empty; pass --overwrite to replace it", out)
        shutil.rmtree(out)
    base = out / category
    for index, sample in enumerate(progress(samples, desc="validation set")):
        rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
        image = read_image(sample.image_path)
        save_image(base / "test" / "good" / f"{sample.stem}.png", image)
        painted = image.astype(np.float32)
        height, width = painted.shape[:2]
        union = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(1, max_defects + 1))):
            kind = str(rng.choice(defects))
            mask = polygon_mask(defect_polygon(rng, kind, height, width, scale=min(height, width) / 256), height, width)
            paint_defect(painted, mask, kind, rng)
            union |= mask
        save_image(base / "test" / SYNTHETIC / f"{sample.stem}_syn.png", to_uint8(painted))
        save_image(base / "ground_truth" / SYNTHETIC / f"{sample.stem}_syn.png", union.astype(np.uint8) * 255)
    return out
