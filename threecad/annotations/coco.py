"""COCO instance files as input: polygon segmentations (several parts are unioned) or RLE masks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from threecad.annotations.shapes import RawAnnotation
from threecad.errors import ThreecadError


@dataclass
class CocoImage:
    """One ``images`` entry with its annotations, in file order."""

    file_name: str
    width: int | None
    height: int | None
    annotations: list[RawAnnotation] = field(default_factory=list)


def read_coco(path: str | Path) -> list[CocoImage]:
    """Images of a COCO JSON with their annotations (label = category name), sorted by file name.

    ``segmentation`` is either a list of flat polygons ``[x1, y1, x2, y2, ...]`` (shape type
    ``polygons``) or an RLE dict, compressed or not (shape type ``rle``).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ThreecadError(f"unreadable COCO JSON ({exc.__class__.__name__}: {exc})", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ThreecadError("not a COCO file (expected an object with an 'images' list)", path)
    names = {c.get("id"): str(c.get("name")) for c in data.get("categories", []) if isinstance(c, dict)}
    images: dict[object, CocoImage] = {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or "file_name" not in entry or "id" not in entry:
            raise ThreecadError("every COCO image needs 'id' and 'file_name'", path)
        images[entry["id"]] = CocoImage(str(entry["file_name"]), entry.get("width"), entry.get("height"))
    for ann in data.get("annotations", []):
        image = images.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if image is None:
            raise ThreecadError(f"annotation {ann.get('id') if isinstance(ann, dict) else ann!r} names no known image", path)
        seg = ann.get("segmentation")
        label = names.get(ann.get("category_id"), str(ann.get("category_id")))
        index = len(image.annotations)
        if isinstance(seg, dict):
            image.annotations.append(RawAnnotation(index, label, "rle", rle=seg))
        else:
            image.annotations.append(RawAnnotation(index, label, "polygons", points=seg))
    return sorted(images.values(), key=lambda im: im.file_name)
