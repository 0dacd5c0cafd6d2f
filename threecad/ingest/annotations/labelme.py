"""LabelMe JSON files: ``shapes`` (``label``, ``points``, ``shape_type``), ``imagePath``, size fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from threecad.errors import ThreecadError
from threecad.ingest.annotations.jsonfile import json_int, read_json
from threecad.ingest.annotations.shapes import RawAnnotation


@dataclass
class LabelmeDoc:
    """A parsed LabelMe file. ``width``/``height`` are the declared size (None when absent)."""

    path: Path
    image_path: str | None
    width: int | None
    height: int | None
    shapes: list[RawAnnotation] = field(default_factory=list)


def read_labelme(path: str | Path) -> LabelmeDoc:
    """Parse one LabelMe file; raises :class:`ThreecadError` only if it is not a LabelMe JSON at all.

    Problems inside individual shapes are left to :func:`threecad.ingest.annotations.to_geometry`, so a
    broken shape never hides its valid neighbours. NaN in coordinates (Python's json writes it)
    is accepted here and reported later. A ``label`` that is not a string becomes ``None`` (an
    unknown label downstream). The file is read by the one bounded reader
    (:func:`threecad.ingest.annotations.jsonfile.read_json`: size and nesting limits).
    """
    path = Path(path)
    data = read_json(path, "LabelMe JSON")
    if not isinstance(data, dict) or not isinstance(data.get("shapes", []), list):
        raise ThreecadError("not a LabelMe file (expected an object with a 'shapes' list)", path)
    shapes = []
    for index, shape in enumerate(data.get("shapes", [])):
        if not isinstance(shape, dict):
            shape = {}
        shapes.append(
            RawAnnotation(
                index=index,
                label=shape.get("label") if isinstance(shape.get("label"), str) else None,
                shape_type=str(shape.get("shape_type") or "polygon"),
                points=shape.get("points"),
                extra={k: v for k, v in shape.items() if k in ("group_id", "description", "flags")},
            )
        )
    image_path = data.get("imagePath")
    return LabelmeDoc(
        path=path,
        image_path=str(image_path) if isinstance(image_path, str) and image_path else None,
        width=json_int(data.get("imageWidth")),
        height=json_int(data.get("imageHeight")),
        shapes=shapes,
    )
