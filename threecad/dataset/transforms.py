"""How a native image becomes a model input: resizing and exposure normalisation, both explicit.

Resizing changes what the metrics mean:

* ``"squash"``: the paper's anisotropic resize of every image to ``size x size`` (3CAD's official
  loader does this; aspect ratio is lost);
* ``"aspect"``: the longer side becomes ``size``, the aspect ratio is kept (images in a batch then
  differ in shape: use batch size 1 or a collate that pads);
* ``"native"``: no resizing at all.

``exposure="mean"`` multiplies each image by ``EXPOSURE_TARGET / mean`` (:func:`normalize_exposure`).
Line-scan cameras and strobes change the overall gain between frames (the magnetic tile images come
in six exposure series, mean grey levels 66 to 153 of 255); a frozen ImageNet backbone sees such a
gain as a different texture, so a memory bank or a student must cover every gain separately.
Dividing by the image mean removes the global gain and keeps local contrast, which is what a defect
changes. ``"raw"`` leaves pixels alone.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

from threecad.errors import ThreecadError

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
