"""The input transform of a saved method: native images in, model inputs out, maps back to native size.

A file loaded by :class:`threecad.dataset.loaders.AnomalyDataset` is decoded to uint8 RGB, resized and
exposure-normalised by :func:`threecad.dataset.transforms.prepare_image`, and scaled to [0, 1]. An image handed
to :meth:`threecad.methods.Method.predict` takes the same road from the same point: integer arrays
are brought to uint8 RGB as :func:`threecad.io.read_image` brings a file (16 bits scaled by bit
depth, grey replicated), float images are quantised to the 8-bit grid a loaded file lies on. So the
model sees the same tensor whether an image comes from a file or from memory. A float image that
needs neither resizing nor exposure normalisation goes to the model as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from threecad.dataset.transforms import prepare_image, target_size
from threecad.errors import ThreecadError
from threecad.io import to_uint8

ACCEPTED = "numpy HxW or HxWx3 uint8/uint16 arrays, or float 3xHxW tensors in [0, 1]"


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
    """An integer HxW / HxWx1 / HxWx3 array as uint8 HxWx3, as ``read_image(path, "RGB")`` gives a file."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ThreecadError(f"cannot read an image of shape {image.shape}; predict takes {ACCEPTED}")
    image = to_uint8(image)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def _as_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 3xHxW in [0, 1], as :class:`threecad.dataset.loaders.AnomalyDataset` returns it."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


def model_input(image: Any, size: int | None, resize: str, exposure: str) -> torch.Tensor:
    """One native image (see :data:`ACCEPTED`) as the float32 3xhxw tensor the model is fed."""
    if isinstance(image, np.ndarray) and image.dtype.kind in "ui":
        return _as_tensor(prepare_image(_rgb_uint8(image), size, resize, exposure))
    if isinstance(image, np.ndarray) and image.dtype.kind == "f":
        image = torch.from_numpy(image.transpose(2, 0, 1) if image.ndim == 3 else np.repeat(image[None], 3, 0))
    if not isinstance(image, torch.Tensor) or not image.is_floating_point() or image.ndim != 3 or image.shape[0] != 3:
        what = f"a tensor of shape {tuple(image.shape)} ({image.dtype})" if isinstance(image, (torch.Tensor, np.ndarray)) \
            else type(image).__name__
        raise ThreecadError(f"cannot read {what}; predict takes {ACCEPTED}")
    height, width = image.shape[-2:]
    if target_size(width, height, size, resize) == (width, height) and exposure == "raw":
        return image.float()
    grid = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return _as_tensor(prepare_image(grid, size, resize, exposure))


def native_size_maps(maps: np.ndarray, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Each (h, w) map resized (bilinear) back to its image's native (width, height)."""
    out = []
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    for i, (width, height) in enumerate(sizes):
        m = tensor[i]
        if tuple(m.shape) != (height, width):
            m = F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        out.append(m.numpy())
    return out
