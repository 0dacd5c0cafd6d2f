"""Synthetic anomalies for self-supervised training: Perlin-noise masks filled with a foreign texture.

This is the recipe of DRAEM, DeSTSeg and CFRG, implemented once from its definition; each method
chooses its own :class:`SynthesisParams` (:data:`CFRG_SYNTHESIS`, :data:`DRAEM_SYNTHESIS`,
:func:`destseg_synthesis`). The common core:

1. two lattice exponents ``t_y, t_x`` drawn independently from {0..5}, so the noise has
   ``2**t_y x 2**t_x`` cells (blobs from image-sized to 8 px at 256 px);
2. classic gradient Perlin noise (fade ``6t^5 - 15t^4 + 10t^3``, scaled by sqrt 2);
3. the noise map rotated by an angle in [-90, 90] degrees (bilinear), corners filled with 0 so
   rotated-in areas are never anomalous;
4. mask = noise > 0.5;
5. inside the mask, ``x_aug = beta * x + (1 - beta) * texture`` with ``beta ~ U[0, 0.8)``.

What differs between the methods (official code of each): DRAEM returns the clean image for half of
the samples, rotates the normal image by U(-90, 90) degrees (black fill) with probability 0.3 and
applies three distinct augmenters out of ten (:data:`TEXTURE_AUGMENTERS`) to each texture; DeSTSeg
never leaves a sample clean, never augments the texture, and rotates the normal image according to
the category (none, U(-5, 5) degrees, or a multiple of 90 degrees then U(-5, 5), grey fill
114/255); CFRG does neither. DeSTSeg and CFRG normalise with ImageNet statistics after blending:
here the items stay in [0, 1] and each network normalises its own input (it must do so at
prediction time anyway), which is the same order of operations.

Differences from the official CFRG code, on purpose: every sample draws a random texture at every
call (the official code binds texture ``i`` to image ``i`` for the whole run and only ever uses the
first N textures), and every random draw comes from a generator seeded by ``(seed, epoch, index)``,
so results are deterministic for a seed whatever the number of DataLoader workers, and workers never
repeat each other's rotation angles (the official code shares one augmenter RNG across workers).

Textures: a folder of images (the Describable Textures Dataset, ``dtd/images``, when the user has
it), else an offline mix of procedurally generated textures (fractal noise, stripes, checkers,
cells, machined metal) and other training images of the same category, flipped and rotated.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from scipy import ndimage
from scipy.spatial import cKDTree

from threecad.dataset.layout import is_image
from threecad.errors import ThreecadError
from threecad.io import read_image

log = logging.getLogger(__name__)

#: Lattice exponents per axis: 2**0 .. 2**5 cells.
MIN_SCALE, MAX_SCALE = 0, 5
THRESHOLD = 0.5
MAX_BETA = 0.8
MAX_ANGLE = 90.0
PROCEDURAL_KINDS = ("fractal", "stripes", "checker", "cells", "metal")


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator, angle: float = 0.0
) -> np.ndarray:
    """Gradient noise of ``shape`` (H, W) on a ``cells`` (rows, cols) lattice, float32 in about [-1, 1].

    ``angle`` (degrees) rotates the field about the image centre; pixels whose source lies outside
    the frame are 0 (the zero fill of rotating a noise image). Rotating the sampling coordinates
    instead of the sampled image gives the same field without a second resampling pass (and without
    its blur), and keeps the whole thing one vectorised evaluation: a gather of the four corner
    gradients, a fade and two lerps per pixel.
    """
    height, width = shape
    rows, cols = cells
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(rows + 1, cols + 1))
    gy, gx = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    inside = None
    if angle:
        cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        # Source of each output pixel: the inverse rotation (image y axis points down).
        y, x = cy + (y - cy) * c + (x - cx) * s, cx - (y - cy) * s + (x - cx) * c
        inside = (y >= 0) & (y <= height - 1) & (x >= 0) & (x <= width - 1)
        y, x = np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)
    y, x = np.broadcast_arrays(y * np.float32(rows / height), x * np.float32(cols / width))
    iy = np.minimum(y.astype(np.int64), rows - 1)
    ix = np.minimum(x.astype(np.int64), cols - 1)
    fy, fx = y - iy, x - ix
    flat = iy * (cols + 1) + ix
    gy, gx = gy.ravel(), gx.ravel()

    def corner(dy: int, dx: int) -> np.ndarray:
        k = flat + (dy * (cols + 1) + dx)
        return gy[k] * (fy - dy) + gx[k] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    c00, c10 = corner(0, 0), corner(1, 0)
    top = c00 + ux * (corner(0, 1) - c00)
    bottom = c10 + ux * (corner(1, 1) - c10)
    noise = np.float32(math.sqrt(2.0)) * (top + uy * (bottom - top))
    if inside is not None:
        noise = np.where(inside, noise, np.float32(0.0))
    return noise.astype(np.float32, copy=False)


@dataclass(frozen=True)
class MaskDraw:
    """The random choices behind one mask (kept so tests and logs can inspect them)."""

    cells: tuple[int, int]
    angle: float


def perlin_mask(
    shape: tuple[int, int], rng: np.random.Generator, threshold: float = THRESHOLD,
    scales: tuple[int, int] = (MIN_SCALE, MAX_SCALE), max_angle: float = MAX_ANGLE,
) -> tuple[np.ndarray, MaskDraw]:
    """A binary anomaly mask (H, W) float32 {0, 1} and the draws that made it: lattice exponents
    uniform in ``scales`` (inclusive) per axis, rotation uniform in ``[-max_angle, max_angle]``."""
    ty, tx = rng.integers(scales[0], scales[1] + 1, size=2)
    cells = (2 ** int(ty), 2 ** int(tx))
    angle = float(rng.uniform(-max_angle, max_angle))
    noise = perlin_noise(shape, cells, rng, angle)
    return (noise > threshold).astype(np.float32), MaskDraw(cells, angle)


def blend(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """``image`` outside the mask, ``beta * image + (1 - beta) * texture`` inside; all HxWx3 in [0, 1]."""
    m = mask[..., None]
    return (image * (1.0 - m) + ((1.0 - beta) * texture + beta * image) * m).astype(np.float32)


# ---------------------------------------------------------------------------------------- textures
def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8/float HxWx3 -> float32 HxWx3 in [0, 1] of (H, W) = size, bilinear."""
    height, width = size
    if array.dtype != np.uint8:
        array = np.clip(array * 255.0, 0, 255).astype(np.uint8)
    if array.shape[:2] != (height, width):
        array = np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR))
    return array.astype(np.float32) / 255.0


def _normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo + 1e-8)


def procedural_pattern(rng: np.random.Generator, size: tuple[int, int], kind: str | None = None) -> np.ndarray:
    """A grayscale texture pattern, float32 HxW in [0, 1] (see :func:`procedural_texture`)."""
    height, width = size
    kind = kind or PROCEDURAL_KINDS[int(rng.integers(len(PROCEDURAL_KINDS)))]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "fractal":
        base = sum(
            perlin_noise(size, (2**o, 2**o), rng) / (1.6**o) for o in range(int(rng.integers(1, 3)), 6)
        )
        gray = _normalise(base)
    elif kind == "stripes":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(4, 40)
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period
        gray = 0.5 + 0.5 * np.sin(phase + 2.0 * perlin_noise(size, (4, 4), rng))
    elif kind == "checker":
        cell = rng.uniform(6, 48)
        theta = rng.uniform(0, math.pi / 2)
        u = xx * math.cos(theta) + yy * math.sin(theta)
        v = -xx * math.sin(theta) + yy * math.cos(theta)
        gray = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
        gray = 0.7 * gray + 0.3 * _normalise(perlin_noise(size, (8, 8), rng))
    elif kind == "cells":
        n = int(rng.integers(8, 80))
        points = rng.uniform(0, 1, size=(n, 2)) * np.array([height, width])
        distance, nearest = cKDTree(points).query(np.stack([yy.ravel(), xx.ravel()], -1))
        shades = rng.uniform(0, 1, n).astype(np.float32)
        gray = shades[nearest.reshape(size)] * 0.8 + 0.2 * _normalise(distance.reshape(size).astype(np.float32))
    elif kind == "metal":
        from threecad.synth.surface import render_surface

        surface = render_surface(rng, height, width, kind=str(rng.choice(["brushed", "milled"])), channels=1)
        gray = _normalise(surface)
    else:
        raise ValueError(f"unknown procedural texture {kind!r}; expected one of {PROCEDURAL_KINDS}")
    return np.clip(gray, 0.0, 1.0).astype(np.float32)


def colour_ramp(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map a [0, 1] pattern onto a ramp between two random colours, so textures differ in hue too."""
    low, high = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
    return np.clip(low + (high - low) * gray[..., None], 0.0, 1.0).astype(np.float32)


def procedural_texture(rng: np.random.Generator, size: tuple[int, int], kind: str | None = None) -> np.ndarray:
    """An offline stand-in for a DTD texture: float32 HxWx3 in [0, 1].

    Five families cover what DTD gives the model (foreign colour, frequency and structure):
    multi-octave noise, oriented stripes, checkers, Voronoi-like cells and machined metal, each
    through a random two-colour ramp.
    """
    return colour_ramp(procedural_pattern(rng, size, kind), rng)


def list_texture_files(folder: str | Path) -> list[Path]:
    """Every image under ``folder`` (recursively, sorted): DTD's ``images/<class>/*.jpg`` works as is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ThreecadError("texture folder not found (pass the DTD 'images' folder or omit --textures)", folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p))
    if not files:
        raise ThreecadError("texture folder holds no images", folder)
    return files


class TextureBank:
    """Where anomaly textures come from; :meth:`draw` returns one at random for a sample.

    ``folder``: a texture folder (DTD). Without it, textures are procedural with probability
    ``procedural_probability`` and otherwise another image of ``images`` (the training set), flipped
    and rotated by a multiple of 90 degrees, which pastes real but misplaced structure.

    Procedural patterns are slow to make (tens of ms at 256 px), so ``pool_size`` of them are made
    once per size from ``pool_seed`` (identical in every worker) and each draw takes a random one
    with a random flip/rotation and a fresh random colour ramp. ``pool_size=0``: a new pattern per draw.
    """

    def __init__(
        self,
        folder: str | Path | None = None,
        images: torch.utils.data.Dataset | None = None,
        procedural_probability: float = 0.5,
        pool_size: int = 64,
        pool_seed: int = 0,
    ):
        self.files = list_texture_files(folder) if folder is not None else []
        self.images = images
        self.procedural_probability = float(procedural_probability)
        self.pool_size = int(pool_size)
        self.pool_seed = int(pool_seed)
        self._pools: dict[tuple[int, int], np.ndarray] = {}

    def prepare(self, size: tuple[int, int]) -> None:
        """Make the pattern pool for ``size`` now (before DataLoader workers copy the bank)."""
        size = (int(size[0]), int(size[1]))
        if self.files or self.pool_size <= 0 or size in self._pools:
            return
        rng = np.random.default_rng([self.pool_seed, *size])
        patterns = [procedural_pattern(rng, size) for _ in range(self.pool_size)]
        self._pools[size] = np.stack([np.round(p * 255).astype(np.uint8) for p in patterns])

    def _procedural(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        if self.pool_size <= 0:
            return procedural_texture(rng, size)
        self.prepare(size)
        pool = self._pools[(int(size[0]), int(size[1]))]
        gray = pool[int(rng.integers(len(pool)))].astype(np.float32) / 255.0
        if rng.random() < 0.5:
            gray = gray[::-1]
        if rng.random() < 0.5:
            gray = gray[:, ::-1]
        if size[0] == size[1] and rng.random() < 0.5:
            gray = gray.T
        return colour_ramp(np.ascontiguousarray(gray), rng)

    @property
    def source(self) -> str:
        return "folder" if self.files else "procedural+train" if self.images is not None else "procedural"

    def draw(self, rng: np.random.Generator, size: tuple[int, int], exclude: int | None = None) -> np.ndarray:
        if self.files:
            path = self.files[int(rng.integers(len(self.files)))]
            return _resize(read_image(path, "RGB"), size)
        use_image = self.images is not None and len(self.images) > 1 and rng.random() >= self.procedural_probability
        if not use_image:
            return self._procedural(rng, size)
        index = int(rng.integers(len(self.images) - 1))
        if exclude is not None and index >= exclude:
            index += 1
        image = self.images[index]["image"].numpy().transpose(1, 2, 0)
        image = np.rot90(image, int(rng.integers(4)))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        return _resize(np.ascontiguousarray(image), size)


def gray_like(image: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """``texture``'s luminance in three channels when ``image`` (HxWx3) is grayscale, else ``texture``.

    On grayscale parts (magnetic tiles, many line-scan cameras) a coloured texture would make colour
    the cue a model learns to spot.
    """
    if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]):
        return np.repeat(texture @ np.float32([[0.299], [0.587], [0.114]]), 3, axis=2)
    return texture


# ---------------------------------------------------------------------------------------- rotation
def rotate_image(image: np.ndarray, angle: float, fill: float = 0.0) -> np.ndarray:
    """``image`` (HxW or HxWxC float) rotated by ``angle`` degrees about its centre, same size,
    bilinear; pixels whose source lies outside the frame take the value ``fill``."""
    if angle == 0.0:
        return image
    out = ndimage.rotate(image, angle, axes=(1, 0), reshape=False, order=1, mode="constant", cval=float(fill),
                         prefilter=False)
    return out.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------- texture augmenters
# DRAEM's ten texture augmenters, written from their definitions on float HxWx3 images in [0, 1]
# (DRAEM applies them to uint8 images: the 0..255 parameters are kept and scaled here). Ranges the
# paper and code leave to library defaults (sharpness factor, posterize bits) are stated inline.
def _pil(texture: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(texture, 0.0, 1.0) * 255.0).astype(np.uint8))


def _unpil(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _gamma(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma contrast, one exponent in [0.5, 2] per channel."""
    return np.power(t, rng.uniform(0.5, 2.0, size=3).astype(np.float32))


def _brightness(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Luminance (Y of YCbCr) times U(0.8, 1.2) plus U(-30, 30)/255, chroma kept: a change of Y
    adds the same amount to R, G and B."""
    y = t @ np.float32([0.299, 0.587, 0.114])
    change = y * np.float32(rng.uniform(0.8, 1.2) - 1.0) + np.float32(rng.uniform(-30.0, 30.0) / 255.0)
    return t + change[..., None]


def _sharpness(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL sharpness enhancement, factor U(0, 2) (0 blurs, 1 is the identity, 2 sharpens)."""
    return _unpil(ImageEnhance.Sharpness(_pil(t)).enhance(float(rng.uniform(0.0, 2.0))))


def _hue_saturation(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hue (cyclic) and saturation shifted by independent integers in [-50, 50] on PIL's 0..255 HSV scale."""
    hsv = np.asarray(_pil(t).convert("HSV"), dtype=np.int32)
    dh, ds = (int(v) for v in rng.integers(-50, 51, size=2))
    hsv[..., 0] = (hsv[..., 0] + dh) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + ds, 0, 255)
    return _unpil(Image.fromarray(hsv.astype(np.uint8), "HSV"))


def _solarize(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """With probability 0.5, values at or above a threshold U(32, 128)/255 are inverted."""
    if rng.random() >= 0.5:
        return t
    threshold = np.float32(rng.uniform(32.0, 128.0) / 255.0)
    return np.where(t >= threshold, 1.0 - t, t)


def _posterize(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep the top 1..8 bits (uniform) of each 8-bit value."""
    return _unpil(ImageOps.posterize(_pil(t), int(rng.integers(1, 9))))


def _invert(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - t


def _autocontrast(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _unpil(ImageOps.autocontrast(_pil(t)))


def _equalize(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _unpil(ImageOps.equalize(_pil(t)))


def _rotate(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation by U(-45, 45) degrees, black fill."""
    return rotate_image(t, float(rng.uniform(-45.0, 45.0)), 0.0)


#: DRAEM's augmenters, in its order; :func:`augment_texture` applies a few distinct ones.
TEXTURE_AUGMENTERS = {
    "gamma": _gamma, "brightness": _brightness, "sharpness": _sharpness, "hue_saturation": _hue_saturation,
    "solarize": _solarize, "posterize": _posterize, "invert": _invert, "autocontrast": _autocontrast,
    "equalize": _equalize, "rotate": _rotate,
}


def augment_texture(texture: np.ndarray, rng: np.random.Generator, count: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """``count`` distinct augmenters of :data:`TEXTURE_AUGMENTERS`, drawn without replacement and applied
    in the order drawn (DRAEM: 3), so one texture file yields many different anomalies. Returns the
    float32 HxWx3 texture in [0, 1] and the names applied."""
    names = list(TEXTURE_AUGMENTERS)
    chosen = tuple(names[int(i)] for i in rng.choice(len(names), size=count, replace=False)) if count else ()
    for name in chosen:
        texture = np.clip(TEXTURE_AUGMENTERS[name](texture, rng), 0.0, 1.0).astype(np.float32)
    return texture, chosen


# ---------------------------------------------------------------------------------------- parameters
#: DeSTSeg's normal-image rotations: (probability, uniform angle range, first a random multiple of 90).
IMAGE_ROTATIONS: dict[str, tuple[float, float, bool]] = {
    "none": (0.0, 0.0, False), "small": (1.0, 5.0, False), "right": (1.0, 5.0, True),
}
#: DeSTSeg's fill colour of the rotated normal image (114 of 255 in every channel).
GREY_FILL = 114.0 / 255.0


@dataclass(frozen=True)
class SynthesisParams:
    """Everything a method chooses about the synthesis; the code that applies it is one.

    ``clean_probability``: share of samples returned clean (empty mask). ``beta``: the blend
    factor's range ``[low, high)`` (the image's weight inside the mask). ``threshold``, ``scales``,
    ``mask_angle``: the Perlin mask (threshold, inclusive lattice exponent range per axis,
    rotation range in degrees). ``texture_augmenters``: how many distinct
    :data:`TEXTURE_AUGMENTERS` are applied to each texture. ``rotate_probability``,
    ``rotate_angle``, ``rotate_right_angles``, ``rotate_fill``: the normal image is rotated with
    that probability by U(-angle, angle) degrees (after a random multiple of 90 degrees if asked),
    the uncovered corners filled with ``rotate_fill``; it is then both the input's base and the
    clean target. ``match_gray``: grayscale images get grayscale textures (this project's choice:
    on grayscale parts a coloured texture would make colour the cue a model learns).
    """

    clean_probability: float = 0.0
    beta: tuple[float, float] = (0.0, MAX_BETA)
    threshold: float = THRESHOLD
    scales: tuple[int, int] = (MIN_SCALE, MAX_SCALE)
    mask_angle: float = MAX_ANGLE
    texture_augmenters: int = 0
    rotate_probability: float = 0.0
    rotate_angle: float = 0.0
    rotate_right_angles: bool = False
    rotate_fill: float = 0.0
    match_gray: bool = True

    def __post_init__(self) -> None:
        n = len(TEXTURE_AUGMENTERS)
        checks = (
            ("clean_probability", 0.0 <= self.clean_probability <= 1.0, "in [0, 1]"),
            ("beta", 0.0 <= self.beta[0] < self.beta[1] <= 1.0, "a range 0 <= low < high <= 1"),
            ("threshold", math.isfinite(self.threshold), "a finite number"),
            ("scales", 0 <= self.scales[0] <= self.scales[1] <= 12, "a range 0 <= low <= high <= 12"),
            ("mask_angle", 0.0 <= self.mask_angle <= 180.0, "in [0, 180]"),
            ("texture_augmenters", 0 <= self.texture_augmenters <= n, f"a whole number in 0..{n}"),
            ("rotate_probability", 0.0 <= self.rotate_probability <= 1.0, "in [0, 1]"),
            ("rotate_angle", 0.0 <= self.rotate_angle <= 180.0, "in [0, 180]"),
            ("rotate_fill", 0.0 <= self.rotate_fill <= 1.0, "in [0, 1]"),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise ThreecadError(f"synthesis {name} must be {allowed}, got {getattr(self, name)!r}")


#: CFRG (official code): every sample anomalous, no texture augmentation, no image rotation.
CFRG_SYNTHESIS = SynthesisParams()
#: DRAEM (official code): half the samples clean, three texture augmenters, the normal image rotated
#: by U(-90, 90) degrees with black fill with probability 0.3.
DRAEM_SYNTHESIS = SynthesisParams(clean_probability=0.5, texture_augmenters=3, rotate_probability=0.3,
                                  rotate_angle=90.0, rotate_fill=0.0)


def destseg_synthesis(rotation: str = "none") -> SynthesisParams:
    """DeSTSeg (official code): every sample anomalous, no texture augmentation, the normal image
    rotated per :data:`IMAGE_ROTATIONS` ``rotation`` with grey fill."""
    if rotation not in IMAGE_ROTATIONS:
        raise ThreecadError(f"unknown image rotation {rotation!r}; choose from {', '.join(IMAGE_ROTATIONS)}")
    probability, angle, right = IMAGE_ROTATIONS[rotation]
    return SynthesisParams(rotate_probability=probability, rotate_angle=angle, rotate_right_angles=right,
                           rotate_fill=GREY_FILL)


# ---------------------------------------------------------------------------------------- dataset
class SyntheticAnomalyDataset(torch.utils.data.Dataset):
    """Wraps a dataset of normal images (items with an ``image`` 3xHxW in [0, 1]) with synthesis.

    Items: ``image`` (the clean target: the normal image, rotated when ``params`` rotate it),
    ``augmented`` (with a synthetic anomaly), ``mask`` (1xHxW {0, 1}), ``clean`` (True when the
    draw left the sample clean), and the draws for inspection: ``beta``, ``angle`` (of the mask),
    ``cells``, ``image_angle`` (of the normal image, 0 when not rotated), ``augmenters`` (names
    applied to the texture). ``params`` (default :data:`CFRG_SYNTHESIS`) says what is drawn;
    ``clean_probability``, ``max_beta`` and ``match_gray``, when given, replace those fields of it.

    Randomness: draws for item ``index`` come from ``default_rng([seed, epoch, index])``; call
    :meth:`set_epoch` before each epoch (DataLoader workers receive a fresh copy every epoch unless
    ``persistent_workers`` is set, which this class refuses to rely on). A draw that a parameter
    switches off is not made, so CFRG's parameters give the same samples as before the others
    existed.
    """

    def __init__(
        self,
        base: torch.utils.data.Dataset,
        textures: TextureBank | str | Path | None = None,
        clean_probability: float | None = None,
        seed: int = 42,
        max_beta: float | None = None,
        match_gray: bool | None = None,
        params: SynthesisParams | None = None,
    ):
        params = params if params is not None else CFRG_SYNTHESIS
        given = {"clean_probability": clean_probability, "match_gray": match_gray,
                 "beta": None if max_beta is None else (params.beta[0], float(max_beta))}
        self.params = replace(params, **{key: value for key, value in given.items() if value is not None})
        self.base = base
        if not isinstance(textures, TextureBank):
            textures = TextureBank(textures, images=base)
        self.textures = textures
        if len(base):
            self.textures.prepare(tuple(base[0]["image"].shape[-2:]))
        self.seed = int(seed)
        self.epoch = 0

    @property
    def clean_probability(self) -> float:
        return self.params.clean_probability

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def _rotated(self, clean: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
        p = self.params
        if p.rotate_probability <= 0.0 or rng.random() >= p.rotate_probability:
            return clean, 0.0
        angle = 90.0 * int(rng.integers(4)) if p.rotate_right_angles else 0.0
        angle += float(rng.uniform(-p.rotate_angle, p.rotate_angle)) if p.rotate_angle else 0.0
        image = rotate_image(clean.numpy().transpose(1, 2, 0), angle, p.rotate_fill)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), angle

    def __getitem__(self, index: int) -> dict:
        p = self.params
        item = self.base[index]
        rng = self.rng(index)
        clean, image_angle = self._rotated(item["image"], rng)
        image = clean.numpy().transpose(1, 2, 0)
        shape = image.shape[:2]
        out = {"image": clean, "path": item.get("path", ""), "category": item.get("category", ""),
               "image_angle": image_angle}
        if rng.random() < p.clean_probability:
            out.update(augmented=clean.clone(), mask=torch.zeros(1, *shape), beta=1.0, angle=0.0, cells=(0, 0),
                       clean=True, augmenters=())
            return out
        mask, draw = perlin_mask(shape, rng, p.threshold, p.scales, p.mask_angle)
        beta = float(rng.uniform(p.beta[0], p.beta[1]))
        texture = self.textures.draw(rng, shape, exclude=index)
        texture, augmenters = augment_texture(texture, rng, p.texture_augmenters)
        if p.match_gray:
            texture = gray_like(image, texture)
        augmented = blend(image, texture, mask, beta)
        out.update(
            augmented=torch.from_numpy(np.ascontiguousarray(augmented.transpose(2, 0, 1))),
            mask=torch.from_numpy(mask[None]),
            beta=beta,
            angle=draw.angle,
            cells=draw.cells,
            clean=False,
            augmenters=augmenters,
        )
        return out


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack ``image``, ``augmented`` and ``mask`` of :class:`SyntheticAnomalyDataset` items of one size."""
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) > 1:
        raise ThreecadError(f"synthetic anomalies train on batches of one image size, got {sorted(shapes)}: "
                            "use --resize squash")
    return {key: torch.stack([item[key].float() for item in items]) for key in ("image", "augmented", "mask")}


# ----------------------------------------------------------------------- defect-like anomalies
# Validation sets need anomalies that look like real surface defects more than a pasted texture
# does: pits and cracks darken a small region with a soft rim, chipped edges replace material at
# the part's border with the dark background. Both act on HxWx3 float images in [0, 1] and return
# (augmented, mask bool HxW); an empty mask means the draw failed and the caller should skip it.
def single_blob(shape: tuple[int, int], rng: np.random.Generator, min_area: float, max_area: float,
                tries: int = 200) -> np.ndarray:
    """One connected Perlin blob covering a share of the image in ``(min_area, max_area]``."""
    for _ in range(tries):
        mask, _ = perlin_mask(shape, rng)
        labels, count = ndimage.label(mask > 0)
        if count == 0:
            continue
        blob = labels == int(rng.integers(count)) + 1
        if min_area < blob.mean() <= max_area:
            return blob
    return np.zeros(shape, dtype=bool)


def dark_spot(image: np.ndarray, rng: np.random.Generator, max_area: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """A pit, hole or crack: one small blob darkened to 30-70 % of its brightness, with a soft rim."""
    mask = single_blob(image.shape[:2], rng, 0.0005, max_area)
    soft = ndimage.gaussian_filter(mask.astype(np.float32), 1.0)[..., None]
    factor = float(rng.uniform(0.3, 0.7))
    return (image * (1.0 - soft * (1.0 - factor))).astype(np.float32), mask


def edge_chip(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Missing material at one border: a ragged region 4-15 % deep, 10-30 % long, set to dark background."""
    height, width = image.shape[:2]
    side = int(rng.integers(4))
    yy, xx = np.mgrid[0:height, 0:width]
    depth_axis = (yy, height - 1 - yy, xx, width - 1 - xx)[side]
    along, length = (xx, width) if side < 2 else (yy, height)
    depth = rng.uniform(0.04, 0.15) * (height if side < 2 else width)
    ragged = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (height, width)).astype(np.float32), 3.0)
    ragged /= np.abs(ragged).max() + 1e-6
    start = rng.uniform(0.0, 0.7) * length
    mask = (depth_axis < depth * (1.0 + 0.8 * ragged)) & (along >= start)
    mask &= along < start + rng.uniform(0.1, 0.3) * length
    out = image.copy()
    background = rng.uniform(0.02, 0.12) + rng.normal(0.0, 0.01, (int(mask.sum()), 1))
    out[mask] = background
    return np.clip(out, 0.0, 1.0).astype(np.float32), mask


def shaded_region(image: np.ndarray, rng: np.random.Generator, min_area: float = 0.05,
                  max_area: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Uneven surface: one large blob (5-40 % of the image) 12-30 % darker or brighter, with a wide soft
    rim and a slight grain inside.

    The other kinds are small or high-contrast, while pixel-level AUROC pools every pixel, so real
    defects covering a large share of the image (uneven grinding, worn areas) dominate it. This kind
    lets a validation score see how a setting treats faint regions that are large.
    """
    height, width = image.shape[:2]
    mask = single_blob((height, width), rng, min_area, max_area)
    if not mask.any():
        return image, mask
    soft = ndimage.gaussian_filter(mask.astype(np.float32), max(1.0, 0.02 * min(height, width)))
    grain = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (height, width)).astype(np.float32), 1.5)
    grain /= grain.std() + 1e-6
    change = float(rng.uniform(0.12, 0.3)) * (1.0 if rng.random() < 0.5 else -1.0)
    factor = 1.0 + soft * (change + 0.03 * grain)
    return np.clip(image * factor[..., None], 0.0, 1.0).astype(np.float32), mask


def texture_blob(image: np.ndarray, rng: np.random.Generator, textures: TextureBank,
                 max_area: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """The training recipe (Perlin mask, texture, beta blend) with the mask's area bounded, for validation."""
    shape = image.shape[:2]
    mask = np.zeros(shape, dtype=np.float32)
    for _ in range(100):
        mask, _ = perlin_mask(shape, rng)
        if 0.005 < mask.mean() <= max_area:
            break
    texture = gray_like(image, textures.draw(rng, shape))
    return blend(image, texture, mask, float(rng.uniform(0.0, MAX_BETA))), mask > 0
