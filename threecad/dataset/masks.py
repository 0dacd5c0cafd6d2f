"""Ground-truth masks: one reader with one binarisation rule for every mask file format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from threecad.errors import ThreecadError
from threecad.io import open_image


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
