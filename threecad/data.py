"""Dataset loaders for the 3CAD and MVTec layouts (PyTorch ``Dataset`` and a plain iterator).

Resizing is always explicit, because it changes what the metrics mean:

* ``"squash"``: the paper's anisotropic resize of every image to ``size x size`` (3CAD's official
  loader does this; aspect ratio is lost);
* ``"aspect"``: the longer side becomes ``size``, the aspect ratio is kept (images in a batch then
  differ in shape: use batch size 1 or a collate that pads);
* ``"native"``: no resizing at all.

Images are returned as float32 RGB tensors in [0, 1] (grayscale replicated to three channels);
normalisation belongs to the model, since backbones disagree on it. Masks are float32 {0, 1}.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from threecad.errors import ThreecadError
from threecad.io import read_image
from threecad.layout import Sample, list_samples

ResizeMode = Literal["squash", "aspect", "native"]


def read_mask(path: str | Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as a bool (H, W) array, binarised robustly.

    Accepts 0/255 and 0/1 grayscale, anti-aliased masks (threshold at half the maximum value
    the file can hold, so 0/1 and 0/255 both work), mode '1' and palette images (foreground =
    any non-zero palette index). RGB masks are refused: they usually mean a wrong file.
    ``expected_size`` is (width, height) of the image the mask belongs to.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.asarray(image)
    except FileNotFoundError:
        raise ThreecadError("mask file not found", path) from None
    except Exception as exc:
        raise ThreecadError(f"unreadable mask ({exc.__class__.__name__}: {exc})", path) from None
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
    sample: Sample, size: int | None = 256, resize: ResizeMode = "squash"
) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, mask bool HxW) of one sample, resized (bilinear / nearest)."""
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
        image = np.asarray(Image.fromarray(image).resize((tw, th), Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((tw, th), Image.NEAREST)) > 127
    return image, mask


def iter_samples(
    root: str | Path,
    category: str,
    split: str = "test",
    size: int | None = 256,
    resize: ResizeMode = "squash",
) -> Iterator[dict]:
    """Plain-Python iteration: dicts with numpy ``image``, ``mask`` and the sample's metadata."""
    for sample in list_samples(root, category, split):
        image, mask = load_sample(sample, size, resize)
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

    Items are dicts: ``image`` (3xHxW float32 in [0, 1]), ``mask`` (1xHxW float32 {0, 1}),
    ``label`` (int), ``category``, ``defect``, ``path`` (str).
    """

    def __init__(
        self,
        root: str | Path,
        category: str,
        split: str = "train",
        size: int | None = 256,
        resize: ResizeMode = "squash",
        samples: list[Sample] | None = None,
    ):
        self.root = Path(root)
        self.category = category
        self.split = split
        self.size = size
        self.resize = resize
        self.samples = samples if samples is not None else list_samples(root, category, split)
        if not self.samples:
            raise ThreecadError(f"no images in split {split!r} of category {category!r}", self.root / category)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image, mask = load_sample(sample, self.size, self.resize)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "label": sample.label,
            "category": sample.category,
            "defect": sample.defect,
            "path": str(sample.image_path),
        }
