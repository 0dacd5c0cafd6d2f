"""COCO instance files as input: polygon segmentations (several parts are unioned) or RLE masks.

A COCO file describes many images, so one bad entry must not cost the others: entries whose ids
are not ids (lists, dicts, floats, bools), duplicated image ids, ``file_name`` values that are not
strings and annotations that name no image become :class:`~threecad.ingest.annotations.shapes.Issue`
rows in :attr:`CocoFile.problems`; only a file that is unreadable or not COCO at all raises. An
annotation whose ``category_id`` is not declared in ``categories`` keeps ``label=None`` (reported
as an unknown label by the caller), instead of silently becoming a defect type named after the id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from threecad.errors import ThreecadError, shorten
from threecad.ingest.annotations.jsonfile import json_id, json_int, read_json
from threecad.ingest.annotations.shapes import DROPPED, MALFORMED_ENTRY, SKIPPED, Issue, RawAnnotation


@dataclass
class CocoImage:
    """One ``images`` entry with its annotations, in file order."""

    file_name: str
    width: int | None
    height: int | None
    annotations: list[RawAnnotation] = field(default_factory=list)
    index: int = 0  # position in the file's ``images`` list, for messages


@dataclass
class CocoFile:
    """The usable images of a COCO file (sorted by ``file_name``) and the entries that were not."""

    images: list[CocoImage]
    problems: list[Issue] = field(default_factory=list)


def _short(value: object) -> str:
    return shorten(repr(value), 80)


def _list(data: dict, key: str, path: Path) -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ThreecadError(f"not a COCO file ('{key}' must be a list, got {type(value).__name__})", path)
    return value


def _categories(data: dict, path: Path, problems: list[Issue]) -> dict[int | str, str]:
    names: dict[int | str, str] = {}
    for i, cat in enumerate(_list(data, "categories", path)):
        cid = json_id(cat.get("id")) if isinstance(cat, dict) else None
        name = cat.get("name") if isinstance(cat, dict) else None
        if cid is None or not isinstance(name, str) or cid in names:
            why = "duplicate id" if cid in names else "needs an int or string 'id' and a string 'name'"
            problems.append(Issue(path.name, None, MALFORMED_ENTRY, SKIPPED, f"categories[{i}]: {why}: {_short(cat)}"))
            continue
        names[cid] = name
    return names


def read_coco(path: str | Path) -> CocoFile:
    """Images of a COCO JSON with their annotations (label = category name), sorted by file name.

    ``segmentation`` is either a list of flat polygons ``[x1, y1, x2, y2, ...]`` (shape type
    ``polygons``) or an RLE dict, compressed or not (shape type ``rle``). The file goes through
    the one bounded reader (:func:`threecad.ingest.annotations.jsonfile.read_json`). ``file_name`` is
    returned as written: the caller checks it before it becomes a path.
    """
    path = Path(path)
    data = read_json(path, "COCO JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ThreecadError("not a COCO file (expected an object with an 'images' list)", path)
    problems: list[Issue] = []
    names = _categories(data, path, problems)
    images: dict[int | str, CocoImage] = {}
    duplicated: set[int | str] = set()
    for i, entry in enumerate(data["images"]):
        image_id = json_id(entry.get("id")) if isinstance(entry, dict) else None
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        if image_id is None or not isinstance(file_name, str):
            detail = f"images[{i}]: needs an int or string 'id' and a string 'file_name': {_short(entry)}"
            problems.append(Issue(path.name, None, MALFORMED_ENTRY, SKIPPED, detail))
            continue
        if image_id in images or image_id in duplicated:
            problems.append(Issue(path.name, None, MALFORMED_ENTRY, SKIPPED, f"images[{i}]: id {image_id!r} is used twice"))
            if image_id in images:
                first = images.pop(image_id)
                detail = f"images[{first.index}]: id {image_id!r} is used twice"
                problems.append(Issue(path.name, None, MALFORMED_ENTRY, SKIPPED, detail))
            duplicated.add(image_id)
            continue
        images[image_id] = CocoImage(file_name, json_int(entry.get("width")), json_int(entry.get("height")), index=i)
    for i, ann in enumerate(_list(data, "annotations", path)):
        image_id = json_id(ann.get("image_id")) if isinstance(ann, dict) else None
        if image_id in duplicated:
            continue  # its image was refused above, with a row
        image = images.get(image_id) if image_id is not None else None
        if image is None:
            what = _short(ann.get("image_id")) if isinstance(ann, dict) else _short(ann)
            problems.append(Issue(path.name, None, MALFORMED_ENTRY, DROPPED, f"annotations[{i}]: image_id {what} names no image"))
            continue
        seg = ann.get("segmentation")
        cid = json_id(ann.get("category_id"))
        label = names.get(cid) if cid is not None else None
        extra = {"category_id": _short(ann.get("category_id"))} if label is None else {}
        index = len(image.annotations)
        if isinstance(seg, dict):
            image.annotations.append(RawAnnotation(index, label, "rle", rle=seg, extra=extra))
        else:
            image.annotations.append(RawAnnotation(index, label, "polygons", points=seg, extra=extra))
    return CocoFile(sorted(images.values(), key=lambda im: (im.file_name, im.index)), problems)
