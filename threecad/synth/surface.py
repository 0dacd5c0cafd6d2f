"""Clean machined-metal textures and defect painting, vectorised with numpy.

Real 3CAD parts are anodised aluminium, copper and iron seen by line-scan cameras: directional
brushing or milling arcs, faint tool marks, a lighting gradient across the frame and sensor
noise. A defect is drawn as a polygon whose pixels are shifted in intensity (and tint), so the
mask of a defect is exactly the set of pixels that differ from the clean surface.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter, gaussian_filter1d

#: Defect types the generators know, with how each is painted (see :func:`defect_polygon`).
DEFECT_TYPES = ("scratch", "bump", "pinhole", "discoloration", "dirt")
SURFACE_KINDS = ("brushed", "milled")


@dataclass(frozen=True)
class Material:
    """Base colour (RGB, 0-255) and texture contrast of a surface material."""

    name: str
    rgb: tuple[float, float, float]
    contrast: float


MATERIALS = {
    "aluminum": Material("aluminum", (172.0, 174.0, 178.0), 14.0),
    "copper": Material("copper", (184.0, 120.0, 82.0), 12.0),
    "iron": Material("iron", (108.0, 110.0, 114.0), 10.0),
}


def render_surface(
    rng: np.random.Generator,
    height: int,
    width: int,
    kind: str = "brushed",
    material: str = "aluminum",
    channels: int = 1,
) -> np.ndarray:
    """A clean surface as float32 (H, W) or (H, W, 3) in 0-255 (not yet clipped or quantised)."""
    mat = MATERIALS[material]
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    if kind == "brushed":
        # Streaks along x: per-row noise smoothed a little, plus a slow drift along the streak.
        rows = gaussian_filter1d(rng.normal(0, 1, height).astype(np.float32), 0.8)
        cols = gaussian_filter1d(rng.normal(0, 1, width).astype(np.float32), 40.0) * 4.0
        texture = rows[:, None] * mat.contrast * 0.5 + cols[None, :]
    elif kind == "milled":
        # Concentric tool arcs around a centre far outside the frame.
        cy = rng.uniform(-2.0, 3.0) * height
        cx = rng.choice([-1.5, 2.5]) * width
        radius = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        period = rng.uniform(5.0, 11.0)
        texture = np.sin(2 * np.pi * radius / period) * mat.contrast * 0.35
    else:
        raise ValueError(f"unknown surface kind {kind!r}; expected one of {SURFACE_KINDS}")
    # Faint machining marks: a few thin lines at a random angle.
    angle = rng.uniform(0, np.pi)
    proj = xx * np.cos(angle) + yy * np.sin(angle)
    for _ in range(int(rng.integers(1, 4))):
        offset = rng.uniform(proj.min(), proj.max())
        texture = texture + 6.0 * np.exp(-((proj - offset) ** 2) / 2.0)
    # Lighting: a linear gradient and a soft vignette.
    gy, gx = rng.uniform(-0.15, 0.15, 2)
    light = 1.0 + gy * (yy / height - 0.5) + gx * (xx / width - 0.5)
    light = light - 0.12 * (((yy / height - 0.5) ** 2) + ((xx / width - 0.5) ** 2))
    fine = gaussian_filter(rng.normal(0, 1, (height, width)).astype(np.float32), 0.7) * 2.5
    gray = texture + fine
    base = np.asarray(mat.rgb, dtype=np.float32)
    if channels == 1:
        out = (base.mean() + gray) * light
        out = out + rng.normal(0, 1.5, (height, width)).astype(np.float32)
    else:
        out = (base[None, None, :] + gray[..., None]) * light[..., None]
        out = out + rng.normal(0, 1.5, (height, width, 3)).astype(np.float32)
    return out.astype(np.float32)


def _blob(rng: np.random.Generator, cx: float, cy: float, radius: float, n: int = 14, rough: float = 0.35):
    """A star-shaped irregular polygon around (cx, cy)."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * (1.0 + rough * rng.uniform(-1, 1, n))
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def defect_polygon(
    rng: np.random.Generator, defect_type: str, height: int, width: int, scale: float = 1.0
) -> np.ndarray:
    """Vertices (N, 2) as (x, y) floats of one defect of the given type, inside the frame.

    ``scale`` grows the defects with the frame (1.0 suits ~256-1024 px crops).
    """
    margin = 4.0
    cx = rng.uniform(margin, width - margin)
    cy = rng.uniform(margin, height - margin)
    if defect_type == "scratch":
        length = rng.uniform(20, 140) * scale
        half_w = rng.uniform(1.0, 2.5) * max(scale, 1.0)
        angle = rng.uniform(0, np.pi)
        d = np.array([np.cos(angle), np.sin(angle)])
        n = np.array([-d[1], d[0]])
        # A slightly bent scratch: four points along its length, offset sideways.
        t = np.linspace(-0.5, 0.5, 4)[:, None] * length
        bend = rng.normal(0, 2.0, (4, 1)) * scale
        spine = np.array([cx, cy]) + t * d + bend * n
        poly = np.concatenate([spine + half_w * n, (spine - half_w * n)[::-1]])
    elif defect_type == "bump":
        rx, ry = rng.uniform(5, 16, 2) * scale
        a = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        rot = rng.uniform(0, np.pi)
        ex, ey = rx * np.cos(a), ry * np.sin(a)
        poly = np.stack(
            [cx + ex * np.cos(rot) - ey * np.sin(rot), cy + ex * np.sin(rot) + ey * np.cos(rot)], axis=1
        )
    elif defect_type == "pinhole":
        poly = _blob(rng, cx, cy, rng.uniform(2.0, 5.0) * scale, n=10, rough=0.15)
    elif defect_type == "discoloration":
        poly = _blob(rng, cx, cy, rng.uniform(12, 36) * scale, n=18, rough=0.4)
    elif defect_type == "dirt":
        poly = _blob(rng, cx, cy, rng.uniform(3, 10) * scale, n=12, rough=0.5)
    else:
        raise ValueError(f"unknown defect type {defect_type!r}; expected one of {DEFECT_TYPES}")
    poly[:, 0] = np.clip(poly[:, 0], 0, width - 1)
    poly[:, 1] = np.clip(poly[:, 1], 0, height - 1)
    return poly


def polygon_mask(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels painted for a polygon (PIL's fill, outline included) as a bool (H, W) array.

    This is the painting raster only; the preprocessing pipeline has its own documented
    rasteriser, so a painted defect and its annotation agree up to border pixels.
    """
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in polygon], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def paint_defect(image: np.ndarray, mask: np.ndarray, defect_type: str, rng: np.random.Generator) -> None:
    """Change the masked pixels of a float image in place so every one differs visibly (>= 20 levels)."""
    if not mask.any():
        return
    sign = {"scratch": -1.0, "bump": 1.0, "pinhole": -1.0, "discoloration": 1.0, "dirt": -1.0}[defect_type]
    if defect_type == "scratch" and rng.random() < 0.4:
        sign = 1.0  # bright scratches catch the light
    strength = rng.uniform(35, 70)
    if defect_type in ("bump", "discoloration"):
        # Soft inside, but never weaker than the minimum shift.
        soft = gaussian_filter(mask.astype(np.float32), 2.0)
        delta = np.maximum(soft / max(soft.max(), 1e-6), 0.5) * strength
    else:
        delta = np.full(mask.shape, strength, dtype=np.float32)
    delta = np.where(mask, delta, 0.0).astype(np.float32)
    if image.ndim == 2:
        image += sign * delta
    else:
        tint = np.array([1.0, 1.0, 1.0], dtype=np.float32)
        if defect_type == "discoloration":
            tint = rng.uniform(0.4, 1.6, 3).astype(np.float32)
        image += sign * delta[..., None] * tint[None, None, :]


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
