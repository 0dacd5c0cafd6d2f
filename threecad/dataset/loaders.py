"""Dataset loaders for the 3CAD and MVTec layouts (PyTorch ``Dataset`` and a plain iterator).

Images are returned as float32 RGB tensors in [0, 1] (grayscale replicated to three channels;
16-bit images scaled by bit depth, ``round(v * 255 / 65535)``, by :func:`threecad.io.read_image`),
resized and exposure-normalised as :mod:`threecad.dataset.transforms` says (always explicit);
normalisation belongs to the model, since backbones disagree on it. Masks are float32 {0, 1}.

A source is either a dataset folder in the layout of :mod:`threecad.dataset.layout` or a manifest
table (``.csv`` or ``.parquet``, read by :func:`threecad.dataset.manifest.read_manifest`) with one
row per image; :mod:`threecad.dataset.tabular` writes the table anomalib's ``Tabular`` dataset reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from threecad.dataset.layout import SPLITS, Sample, list_categories, list_samples
from threecad.dataset.manifest import is_manifest, samples_from_manifest
from threecad.dataset.masks import read_mask
from threecad.dataset.transforms import ExposureMode, ResizeMode, check_exposure, prepare_image, target_size
from threecad.errors import ThreecadError
from threecad.io import read_image


def load_sample(
    sample: Sample, size: int | None = 256, resize: ResizeMode = "squash", exposure: ExposureMode = "raw"
) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, mask bool HxW) of one sample, resized (bilinear / nearest), exposure applied."""
    image = read_image(sample.image_path, "RGB")
    height, width = image.shape[:2]
    if sample.label == 1:
        if sample.mask_path is None:
            raise ThreecadError("defective image without a mask path", sample.image_path)
        mask = read_mask(sample.mask_path, expected_size=(width, height))
    else:
        mask = np.zeros((height, width), dtype=bool)
    tw, th = target_size(width, height, size, resize)
    if (tw, th) != (width, height):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((tw, th), Image.NEAREST)) > 127
    return prepare_image(image, size, resize, exposure), mask


def collect_samples(source: str | Path, category: str | None, split: str | None = "test") -> list[Sample]:
    """Samples of a dataset folder or a manifest (chosen by what ``source`` is).

    For a folder, ``category=None`` means every category and ``split=None`` every split.
    """
    source = Path(source)
    if is_manifest(source):
        return samples_from_manifest(source, category, split)
    categories = [category] if category is not None else list_categories(source)
    splits = [split] if split is not None else list(SPLITS)
    return [s for c in categories for sp in splits for s in list_samples(source, c, sp)]


def iter_samples(
    root: str | Path,
    category: str | None,
    split: str = "test",
    size: int | None = 256,
    resize: ResizeMode = "squash",
    exposure: ExposureMode = "raw",
) -> Iterator[dict]:
    """Plain-Python iteration: dicts with numpy ``image``, ``mask`` and the sample's metadata.

    ``root`` is a dataset folder or a manifest table (see :func:`samples_from_manifest`).
    """
    for sample in collect_samples(root, category, split):
        image, mask = load_sample(sample, size, resize, exposure)
        yield {
            "image": image,
            "mask": mask,
            "label": sample.label,
            "category": sample.category,
            "defect": sample.defect,
            "path": str(sample.image_path),
        }


class AnomalyDataset(torch.utils.data.Dataset):
    """One split of one category as a PyTorch dataset.

    ``root`` is a dataset folder or a manifest table (then ``category=None`` keeps every row).
    Items are dicts: ``image`` (3xHxW float32 in [0, 1]), ``mask`` (1xHxW float32 {0, 1}),
    ``label`` (int), ``category``, ``defect``, ``path`` (str).
    """

    def __init__(
        self,
        root: str | Path,
        category: str | None,
        split: str = "train",
        size: int | None = 256,
        resize: ResizeMode = "squash",
        samples: list[Sample] | None = None,
        exposure: ExposureMode = "raw",
    ):
        self.exposure = check_exposure(exposure)
        self.root = Path(root)
        self.category = category
        self.split = split
        self.size = size
        self.resize = resize
        self.samples = samples if samples is not None else collect_samples(root, category, split)
        if not self.samples:
            where = self.root if category is None or is_manifest(self.root) else self.root / category
            raise ThreecadError(f"no images in split {split!r} of category {category!r}", where)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image, mask = load_sample(sample, self.size, self.resize, self.exposure)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "label": sample.label,
            "category": sample.category,
            "defect": sample.defect,
            "path": str(sample.image_path),
        }
