"""LabelMe JSON files: ``shapes`` (``label``, ``points``, ``shape_type``), ``imagePath``, size fields."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from threecad.annotations.shapes import RawAnnotation
from threecad.errors import ThreecadError


@dataclass
class LabelmeDoc:
    """A parsed LabelMe file. ``width``/``height`` are the declared size (None when absent)."""

    path: Path
    image_path: str | None
    width: int | None
    height: int | None
    shapes: list[RawAnnotation] = field(default_factory=list)


def _int_or_none(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value)


def read_labelme(path: str | Path) -> LabelmeDoc:
    """Parse one LabelMe file; raises :class:`ThreecadError` only if it is not a LabelMe JSON at all.

    Problems inside individual shapes are left to :func:`threecad.annotations.to_geometry`, so a
    broken shape never hides its valid neighbours. NaN in coordinates (Python's json writes it)
    is accepted here and reported later.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ThreecadError(f"unreadable LabelMe JSON ({exc.__class__.__name__}: {exc})", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("shapes", []), list):
        raise ThreecadError("not a LabelMe file (expected an object with a 'shapes' list)", path)
    shapes = []
    for index, shape in enumerate(data.get("shapes", [])):
        if not isinstance(shape, dict):
            shape = {}
        shapes.append(
            RawAnnotation(
                index=index,
                label=str(shape.get("label", "")),
                shape_type=str(shape.get("shape_type") or "polygon"),
                points=shape.get("points"),
                extra={k: v for k, v in shape.items() if k in ("group_id", "description", "flags")},
            )
        )
    image_path = data.get("imagePath")
    return LabelmeDoc(
        path=path,
        image_path=str(image_path) if isinstance(image_path, str) and image_path else None,
        width=_int_or_none(data.get("imageWidth")),
        height=_int_or_none(data.get("imageHeight")),
        shapes=shapes,
    )
