"""Dataset loaders for the 3CAD and MVTec layouts (PyTorch ``Dataset`` and a plain iterator).

Resizing is always explicit, because it changes what the metrics mean:

* ``"squash"``: the paper's anisotropic resize of every image to ``size x size`` (3CAD's official
  loader does this; aspect ratio is lost);
* ``"aspect"``: the longer side becomes ``size``, the aspect ratio is kept (images in a batch then
  differ in shape: use batch size 1 or a collate that pads);
* ``"native"``: no resizing at all.

Exposure is explicit too: ``exposure="mean"`` multiplies each image by ``EXPOSURE_TARGET / mean``
(:func:`normalize_exposure`). Line-scan cameras and strobes change the overall gain between frames
(the magnetic tile images come in six exposure series, mean grey levels 66 to 153 of 255); a frozen
ImageNet backbone sees such a gain as a different texture, so a memory bank or a student must cover
every gain separately. Dividing by the image mean removes the global gain and keeps local contrast,
which is what a defect changes. ``"raw"`` (the default) leaves pixels alone.

Images are returned as float32 RGB tensors in [0, 1] (grayscale replicated to three channels;
16-bit images scaled by bit depth, ``round(v * 255 / 65535)``, by :func:`threecad.io.read_image`);
normalisation belongs to the model, since backbones disagree on it. Masks are float32 {0, 1}.

A source is either a dataset folder in the layout of :mod:`threecad.layout` or a manifest table
(``.csv`` or ``.parquet``, read by :func:`threecad.manifest.read_manifest`) with one row per image;
:func:`tabular_frame` writes the table anomalib's ``Tabular`` dataset reads (``image_path,
label_index, split, mask_path``), and the same table reads back here, so a split made once is
usable in both.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image

from threecad.errors import ThreecadError
from threecad.io import atomic_write, open_image, read_image
from threecad.layout import SPLITS, Sample, list_categories, list_samples

# the one manifest reader; image_metadata is re-exported for the exporters that read it from here
from threecad.manifest import MANIFEST_SUFFIXES, image_metadata, is_manifest, samples_from_manifest  # noqa: F401

ResizeMode = Literal["squash", "aspect", "native"]
ExposureMode = Literal["raw", "mean"]
EXPOSURE_MODES = ("raw", "mean")
#: Mean intensity (of [0, 1]) that ``exposure="mean"`` gives every image.
EXPOSURE_TARGET = 0.45


def check_exposure(mode: str) -> str:
    """``mode`` if it is a known exposure mode, else a :class:`ThreecadError` listing them."""
    if mode not in EXPOSURE_MODES:
        raise ThreecadError(f"unknown exposure mode {mode!r}; expected one of {', '.join(EXPOSURE_MODES)}")
    return mode


def normalize_exposure(image: np.ndarray, mode: ExposureMode = "mean") -> np.ndarray:
    """``image`` (uint8 or float in [0, 1], any shape) scaled so its mean is :data:`EXPOSURE_TARGET`.

    Same dtype out, clipped to the valid range. An all-black image is left as it is. ``mode="raw"``
    returns the image unchanged.
    """
    if check_exposure(mode) == "raw":
        return image
    top = 255.0 if image.dtype == np.uint8 else 1.0
    mean = float(image.mean()) / top
    if mean <= 1e-6:
        return image
    scaled = image.astype(np.float32) * (EXPOSURE_TARGET / mean)
    if image.dtype == np.uint8:
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.clip(scaled, 0.0, 1.0).astype(image.dtype, copy=False)


def read_mask(path: str | Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as a bool (H, W) array, binarised robustly.

    Accepts 0/255 and 0/1 grayscale, anti-aliased masks (threshold at half the maximum value
    the file can hold, so 0/1 and 0/255 both work), mode '1' and palette images (foreground =
    any non-zero palette index). RGB masks are refused: they usually mean a wrong file.
    ``expected_size`` is (width, height) of the image the mask belongs to, as displayed: masks
    are read through :func:`threecad.io.open_image`, so an EXIF orientation turns them too.
    """
    path = Path(path)
    with open_image(path, "mask") as image:  # the image rule: bomb guard, EXIF orientation
        mode = image.mode
        array = np.asarray(image)
    if array.ndim == 3:
        if array.shape[2] == 2 or (array.shape[2] == 4 and mode == "LA"):
            array = array[..., 0]
        else:
            raise ThreecadError(f"mask must be single-channel, got mode {mode} with {array.shape[2]} channels", path)
    if mode in ("1", "P"):
        binary = array > 0
    else:
        top = float(array.max()) if array.size else 0.0
        # 0/1 masks hold 1 as foreground; 0..255 masks (possibly anti-aliased) use > 127.
        binary = array > (0 if top <= 1 else 127)
    if expected_size is not None and (binary.shape[1], binary.shape[0]) != tuple(expected_size):
        raise ThreecadError(
            f"mask size {binary.shape[1]}x{binary.shape[0]} differs from its image's {expected_size[0]}x{expected_size[1]}",
            path,
        )
    return binary


def target_size(width: int, height: int, size: int | None, resize: ResizeMode) -> tuple[int, int]:
    """(width, height) after resizing under the given mode."""
    if resize == "native" or size is None:
        return width, height
    if resize == "squash":
        return size, size
    if resize == "aspect":
        scale = size / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))
    raise ThreecadError(f"unknown resize mode {resize!r}; expected squash, aspect or native")


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


def prepare_image(
    image: np.ndarray, size: int | None = 256, resize: ResizeMode = "squash", exposure: ExposureMode = "raw"
) -> np.ndarray:
    """A uint8 RGB image (HxWx3) resized to :func:`target_size` (bilinear), then ``exposure`` applied.

    What every loaded image goes through (:func:`load_sample`), and what a saved method applies to
    the images handed to its ``predict`` (:mod:`threecad.methods`): one implementation of both.
    """
    height, width = image.shape[:2]
    tw, th = target_size(width, height, size, resize)
    if (tw, th) != (width, height):
        image = np.asarray(Image.fromarray(image).resize((tw, th), Image.BILINEAR))
    return normalize_exposure(image, exposure)


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


def tabular_frame(samples: Iterable[Sample], relative_to: str | Path | None = None) -> pd.DataFrame:
    """anomalib's ``Tabular`` table: ``image_path, label_index, split, mask_path`` (+ category, defect).

    Splits are written as anomalib names them (``train``, ``val``, ``test``); good images get an
    empty ``mask_path``. Paths are relative to ``relative_to`` where they lie below it (pass the
    same folder as anomalib's ``root``), else absolute.
    """
    base = Path(relative_to).resolve() if relative_to is not None else None

    def rel(p: Path | None) -> str:
        if p is None:
            return ""
        p = Path(p).resolve()
        if base is not None and p.is_relative_to(base):
            return p.relative_to(base).as_posix()
        return p.as_posix()

    rows = [
        {
            "image_path": rel(s.image_path),
            "label_index": int(s.label),
            "split": "val" if s.split == "validation" else s.split,
            "mask_path": rel(s.mask_path) if s.label == 1 else "",
            "category": s.category,
            "defect": s.defect,
        }
        for s in samples
    ]
    columns = ["image_path", "label_index", "split", "mask_path", "category", "defect"]
    return pd.DataFrame(rows, columns=columns).astype({"label_index": "int64"})


def write_tabular(source: str | Path, out: str | Path, category: str | None = None) -> Path:
    """Write the ``Tabular`` table of a dataset (all splits) to ``out`` (.csv or .parquet), atomically."""
    out = Path(out)
    if out.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ThreecadError("table must end in .csv or .parquet", out)
    frame = tabular_frame(collect_samples(source, category, None), relative_to=out.parent)
    with atomic_write(out, "wb") as handle:
        if out.suffix.lower() == ".csv":
            handle.write(frame.to_csv(index=False).encode())
        else:
            frame.to_parquet(handle, index=False)
    return out


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
