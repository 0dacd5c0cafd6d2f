"""A miniature *raw* dataset: large line-scan-like frames with LabelMe polygons, some deliberately broken.

This is what a factory hands over before any processing: one folder per category holding PNG and
JPEG frames (gray or RGB; a few wide ones such as 2448x2048 and 4096x1024, the rest small), a
LabelMe JSON next to each defective frame, and a label map. Labels use English names or Pinyin
aliases, shapes are polygons, rectangles, circles and linestrips, and every frame holds 1-10
regions of several types, many of them small.

Every kind of breakage the preprocessing must survive is injected on purpose (each at least once,
whatever the size of the set) and listed in ``ground_truth.json`` with the problem and action the
preprocessing is expected to report, so tests can check the report line by line:

* annotation level: a two-point polygon, a self-intersecting bow-tie, duplicate consecutive
  vertices, vertices outside the image, a NaN coordinate, a zero-area (collinear) polygon, an
  unknown label and an ignored label;
* file level: a JSON whose image is missing, an unreadable image, a JSON whose size fields
  disagree with its image, a JSON that does not parse, and a decompression-bomb-sized PNG header.

Defects are painted from the *repaired* geometry of their annotation under the project's pixel
convention (:mod:`threecad.ingest.annotations.raster`), so the pixels that differ from the clean surface
are exactly the annotated ones (up to JPEG ringing). Dropped annotations are not painted.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from threecad.dataset.catalog import CATEGORY_FOLDERS
from threecad.errors import ThreecadError
from threecad.ingest.annotations import RawAnnotation, rasterize, to_geometry
from threecad.ingest.annotations import shapes as S
from threecad.io import save_image, write_bytes, write_json, write_text
from threecad.progress import progress
from threecad.synth.surface import defect_polygon, paint_defect, render_surface, to_uint8

log = logging.getLogger(__name__)

#: The stroke width (pixels) given to linestrips; ``3cad data preprocess`` uses the same default.
LINE_WIDTH = 3.0
LARGE_SIZES = ((2448, 2048), (4096, 1024))
#: English defect types and the Pinyin aliases 3CAD used before it renamed its labels.
PINYIN = {"scratch": "huahen", "bump": "tuqi", "pinhole": "zhenkong", "discoloration": "secha", "dirt": "zangwu"}
IGNORED = "marker"
UNKNOWN = "yiwu_7"

_SHAPE_CYCLE = ("linestrip", "circle", "rectangle", "polygon")
#: (surface kind, material, channels, defect types) per category, cycled.
_STYLES = (
    ("brushed", "aluminum", 1, ("scratch", "bump", "pinhole", "discoloration", "dirt")),
    ("milled", "aluminum", 3, ("scratch", "pinhole", "dirt", "discoloration")),
    ("brushed", "copper", 3, ("scratch", "bump", "dirt")),
    ("milled", "iron", 1, ("scratch", "pinhole", "bump")),
)

#: Annotation-level breakages: kind -> (problem, action) the preprocessing must report.
ANNOTATION_BREAKAGES = {
    "two_point_polygon": (S.TOO_FEW_POINTS, S.DROPPED),
    "bowtie": (S.SELF_INTERSECTION, S.REPAIRED),
    "duplicate_vertices": (S.DUPLICATE_VERTICES, S.REPAIRED),
    "outside_image": (S.OUTSIDE_IMAGE, S.CLIPPED),
    "nan_coordinate": (S.NON_FINITE, S.DROPPED),
    "zero_area": (S.ZERO_AREA, S.DROPPED),
    "unknown_label": (S.UNKNOWN_LABEL, S.DROPPED),
    "ignored_label": (S.IGNORED_LABEL, S.DROPPED),
}
#: File-level breakages: kind -> (problem, action, which file the report names).
FILE_BREAKAGES = {
    "missing_image": (S.IMAGE_MISSING, S.SKIPPED, "json"),
    "unreadable_image": (S.IMAGE_UNREADABLE, S.SKIPPED, "image"),
    "size_mismatch": (S.SIZE_MISMATCH, S.USED_IMAGE_SIZE, "json"),
    "invalid_json": (S.JSON_UNREADABLE, S.SKIPPED, "json"),
    "decompression_bomb": (S.IMAGE_TOO_LARGE, S.SKIPPED, "image"),
}


@dataclass
class _Spec:
    category: int
    index: int
    width: int
    height: int
    fmt: str  # "png" or "jpg"
    defective: bool
    breakages: list[str] = field(default_factory=list)
    first_shape: str = "polygon"  # forced shape type of the first defect (cycled: every type appears)

    @property
    def stem(self) -> str:
        return f"frame_{self.index:04d}"


def _plan(categories: int, images: int, size: tuple[int, int], large: int) -> list[_Spec]:
    specs = []
    for c in range(categories):
        for i in range(images):
            rng = np.random.default_rng([c, i, 99])  # sizes only; independent of the seed for stable plans
            if i < large:
                width, height = LARGE_SIZES[(c + i) % len(LARGE_SIZES)]
                fmt = "png"
            else:
                width = int(rng.integers(int(size[0] * 0.6), size[0] + 1))
                height = int(rng.integers(int(size[1] * 0.6), size[1] + 1))
                fmt = "jpg" if i % 3 == 1 else "png"
            specs.append(_Spec(c, i, width, height, fmt, defective=i % 2 == 0))
    defective = [s for s in specs if s.defective]
    for k, spec in enumerate(defective):
        spec.first_shape = _SHAPE_CYCLE[k % len(_SHAPE_CYCLE)]
    for k, kind in enumerate(ANNOTATION_BREAKAGES):
        defective[k % len(defective)].breakages.append(kind)
    defective[-1].breakages.append("size_mismatch")
    return specs


def _surface(rng: np.random.Generator, height: int, width: int, style: tuple) -> np.ndarray:
    """The clean surface; frames over 2 M pixels are textured at half size and upsampled (4x faster)."""
    kind, material, channels, _ = style
    if height * width <= 2_000_000:
        return render_surface(rng, height, width, kind, material, channels)
    half = render_surface(rng, (height + 1) // 2, (width + 1) // 2, kind, material, channels)
    planes = half[..., None] if half.ndim == 2 else half
    up = np.stack(
        [np.asarray(Image.fromarray(planes[..., k]).resize((width, height), Image.BILINEAR)) for k in range(channels)],
        axis=-1,
    )
    up = up + rng.normal(0, 1.5, up.shape).astype(np.float32)
    return up[..., 0] if channels == 1 else up


def _shape_for(
    rng: np.random.Generator, dtype: str, height: int, width: int, scale: float, force: str | None = None
) -> tuple[str, list]:
    """A LabelMe (shape_type, points) for one defect of the given type (``force``: that shape type)."""
    poly = defect_polygon(rng, dtype, height, width, scale=scale)
    roll = rng.random() if force is None else 1.0
    if force == "linestrip" or (dtype == "scratch" and roll < 0.35):
        # The spine of the scratch as a linestrip, stroked with LINE_WIDTH by the preprocessing.
        half = len(poly) // 2
        spine = (poly[:half] + poly[half:][::-1]) / 2.0
        return "linestrip", spine.tolist()
    if force == "rectangle" or (dtype in ("dirt", "bump") and roll < 0.3):
        (x0, y0), (x1, y1) = poly.min(axis=0), poly.max(axis=0)
        return "rectangle", [[float(x0), float(y0)], [float(x1), float(y1)]]
    if force == "circle" or (dtype == "pinhole" and roll < 0.4):
        centre = poly.mean(axis=0)
        radius = float(np.abs(poly - centre).max()) * 0.8 + 0.5
        return "circle", [centre.tolist(), [float(centre[0] + radius), float(centre[1])]]
    return "polygon", poly.tolist()


def _broken_shape(rng: np.random.Generator, kind: str, dtype: str, height: int, width: int, scale: float) -> dict:
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    s = rng.uniform(8, 16) * scale
    label, shape_type = dtype, "polygon"
    if kind == "two_point_polygon":
        points = [[cx, cy], [cx + s, cy + s]]
    elif kind == "bowtie":
        points = [[cx - s, cy - s], [cx + s, cy + s], [cx + s, cy - s], [cx - s, cy + s]]
    elif kind == "duplicate_vertices":
        poly = defect_polygon(rng, dtype, height, width, scale=scale).tolist()
        points = poly[:2] + [poly[1], poly[1]] + poly[2:] + [poly[-1]]
    elif kind == "outside_image":
        a = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        points = np.stack([width + s * 0.4 + 2 * s * np.cos(a), cy + 2 * s * np.sin(a)], axis=1).tolist()
    elif kind == "nan_coordinate":
        points = [[cx, cy], [cx + s, cy], [float("nan"), cy + s], [cx, cy + s]]
    elif kind == "zero_area":
        points = [[cx, cy], [cx + s, cy + s], [cx + 2 * s, cy + 2 * s]]
    elif kind == "unknown_label":
        label, points = UNKNOWN, defect_polygon(rng, dtype, height, width, scale=scale).tolist()
    elif kind == "ignored_label":
        label, shape_type = IGNORED, "rectangle"
        points = [[cx, cy], [cx + 3 * s, cy + s]]
    else:  # pragma: no cover - the table above is the contract
        raise ValueError(kind)
    return {"label": label, "points": points, "shape_type": shape_type}


def _labelme(shapes: list[dict], image_name: str, width: int, height: int) -> str:
    doc = {
        "version": "5.4.1",
        "flags": {},
        "shapes": [{**s, "group_id": None, "description": "", "flags": {}} for s in shapes],
        "imagePath": image_name,
        "imageData": None,
        "imageHeight": height,
        "imageWidth": width,
    }
    return json.dumps(doc, indent=2) + "\n"  # NaN is written as NaN, as LabelMe (Python's json) does


def _render(seed: int, spec: _Spec) -> tuple[np.ndarray, np.ndarray, list[dict], list[dict]]:
    """(clean float image, painted uint8 image, LabelMe shapes, ground-truth defect records)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, spec.category, spec.index]))
    style = _STYLES[spec.category % len(_STYLES)]
    height, width = spec.height, spec.width
    clean = _surface(rng, height, width, style)
    image = clean.copy()
    shapes: list[dict] = []
    records: list[dict] = []
    if not spec.defective:
        return clean, to_uint8(image), shapes, records
    big = height * width > 2_000_000
    scale = 1.5 if big else min(width, height) / 256
    types = style[3]
    n_regions = int(rng.integers(1, 11))
    planned = [("defect", str(rng.choice(types))) for _ in range(n_regions)]
    if spec.first_shape == "linestrip":
        planned[0] = ("defect", "scratch")  # every style has scratches
    planned += [(kind, str(rng.choice(types))) for kind in spec.breakages if kind in ANNOTATION_BREAKAGES]
    order = rng.permutation(len(planned))
    for index, k in enumerate(order):
        kind, dtype = planned[k]
        expected = ANNOTATION_BREAKAGES.get(kind)
        wanted = set() if expected is None or kind.endswith("_label") else {expected[0]}
        for _ in range(20):  # redraw until the shape shows exactly the intended problems (usually once)
            if kind == "defect":
                force = spec.first_shape if k == 0 else None
                shape_type, points = _shape_for(rng, dtype, height, width, scale, force)
                label = PINYIN[dtype] if rng.random() < 0.3 else dtype
                shape = {"label": label, "points": points, "shape_type": shape_type}
            else:
                shape = _broken_shape(rng, kind, dtype, height, width, scale)
            ann = RawAnnotation(index, shape["label"], shape["shape_type"], shape["points"])
            geom, issues = to_geometry(ann, width, height, LINE_WIDTH)
            paint = geom is not None and (expected is None or expected[1] in (S.REPAIRED, S.CLIPPED))
            mask = rasterize(geom, height, width, min_one_pixel=False) if paint else None
            if {i[0] for i in issues} == wanted and (mask is None or mask.any()):  # no sub-pixel specks
                break
        else:  # pragma: no cover - would mean the generator itself is broken
            raise RuntimeError(f"could not draw a {kind} annotation with problems {wanted}")
        shapes.append(shape)
        record = {"annotation": index, "kind": kind, "label": shape["label"], "shape_type": shape["shape_type"]}
        if mask is not None:
            paint_defect(image, mask, dtype, rng)
            record.update(defect_type=dtype, area=int(mask.sum()), geometry_area=float(geom.area))
        if expected is not None:
            record.update(problem=expected[0], action=expected[1])
        records.append(record)
    return clean, to_uint8(image), shapes, records


def _bomb_png(width: int = 30000, height: int = 20000) -> bytes:
    """A PNG whose header claims a huge frame: caught from the header alone, before decoding."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_raw_dataset(
    out: str | Path,
    seed: int = 0,
    categories: int = 2,
    images: int = 6,
    size: tuple[int, int] = (640, 480),
    large: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write ``<out>/<Category>/frame_XXXX.{png,jpg,json}``, ``label_map.yaml`` and ``ground_truth.json``.

    ``images`` frames per category (even indices defective), the first ``large`` of them wide
    line-scan-like frames (2448x2048 or 4096x1024), the others up to ``size`` = (width, height).
    Plus a few extra broken files (see the module docstring). Same seed, same bytes.
    """
    if not 1 <= categories <= len(CATEGORY_FOLDERS):
        raise ThreecadError(f"--categories must be between 1 and {len(CATEGORY_FOLDERS)}, got {categories}")
    if images < 1 or large < 0 or min(size) < 32:
        raise ThreecadError("--images must be >= 1, --large >= 0 and --size at least 32x32")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ThreecadError("output folder is not empty; pass --overwrite to replace it", out)
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    specs = _plan(categories, images, size, large)
    truth_images: list[dict] = []
    breakages: list[dict] = []
    for spec in progress(specs, desc="synth raw"):
        folder = CATEGORY_FOLDERS[spec.category]
        _, image, shapes, records = _render(seed, spec)
        image_rel = f"{folder}/{spec.stem}.{spec.fmt}"
        save_image(out / image_rel, image, **({"quality": 92} if spec.fmt == "jpg" else {}))
        json_rel = None
        if spec.defective:
            json_rel = f"{folder}/{spec.stem}.json"
            declared_w = spec.width + (16 if "size_mismatch" in spec.breakages else 0)
            write_text(out / json_rel, _labelme(shapes, f"{spec.stem}.{spec.fmt}", declared_w, spec.height))
            if "size_mismatch" in spec.breakages:
                problem, action, _ = FILE_BREAKAGES["size_mismatch"]
                breakages.append({"file": json_rel, "annotation": None, "kind": "size_mismatch", "problem": problem, "action": action})
        for r in records:
            if "problem" in r:
                breakages.append({"file": json_rel, **{k: r[k] for k in ("annotation", "kind", "problem", "action")}})
        truth_images.append(
            {
                "file": image_rel,
                "json": json_rel,
                "category": folder,
                "width": spec.width,
                "height": spec.height,
                "channels": image.shape[2] if image.ndim == 3 else 1,
                "defective": spec.defective,
                "defects": [r for r in records if "defect_type" in r],
            }
        )
    breakages.extend(_write_broken_files(out, seed, categories))
    write_text(
        out / "label_map.yaml",
        "# Defect types, the Pinyin aliases of 3CAD's first release, and labels that are not defects.\n"
        f"names: [{', '.join(PINYIN)}]\n"
        "aliases:\n" + "".join(f"  {v}: {k}\n" for k, v in PINYIN.items()) + f"ignore: [{IGNORED}]\n",
    )
    write_json(
        out / "ground_truth.json",
        {
            "seed": seed,
            "config": {"categories": categories, "images": images, "size": list(size), "large": large},
            "label_map": "label_map.yaml",
            "line_width": LINE_WIDTH,
            "images": truth_images,
            "breakages": sorted(breakages, key=lambda b: (b["file"], -1 if b["annotation"] is None else b["annotation"])),
        },
    )
    log.info("wrote a raw dataset of %d frames (%d breakages) to %s", len(specs), len(breakages), out)
    return out


def _write_broken_files(out: Path, seed: int, categories: int) -> list[dict]:
    """The file-level breakages other than the size mismatch, spread over the categories."""
    rows = []
    for k, kind in enumerate(("missing_image", "unreadable_image", "invalid_json", "decompression_bomb")):
        folder = CATEGORY_FOLDERS[k % categories]
        stem = f"frame_{9000 + k:04d}"
        problem, action, named = FILE_BREAKAGES[kind]
        polygon = {"label": "dirt", "points": [[10, 10], [40, 12], [30, 40]], "shape_type": "polygon"}
        if kind == "missing_image":
            write_text(out / folder / f"{stem}.json", _labelme([polygon], f"{stem}.png", 64, 64))
        elif kind == "unreadable_image":
            write_bytes(out / folder / f"{stem}.png", b"\x89PNG\r\n\x1a\n" + bytes(np.random.default_rng(seed).integers(0, 256, 200, dtype=np.uint8)))
            write_text(out / folder / f"{stem}.json", _labelme([polygon], f"{stem}.png", 64, 64))
        elif kind == "invalid_json":
            rng = np.random.default_rng([seed, 9000 + k])
            save_image(out / folder / f"{stem}.png", to_uint8(render_surface(rng, 64, 64)))
            write_text(out / folder / f"{stem}.json", '{"shapes": [{"label": "dirt", "points": [[1, 2], ')
        else:
            write_bytes(out / folder / f"{stem}.png", _bomb_png())
        suffix = ".json" if named == "json" else ".png"
        rows.append({"file": f"{folder}/{stem}{suffix}", "annotation": None, "kind": kind, "problem": problem, "action": action})
    return rows
