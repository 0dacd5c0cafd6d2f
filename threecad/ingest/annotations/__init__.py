"""Polygon annotations: readers (LabelMe, COCO), the label map, validation + repair, rasterisation.

The pieces are separate so that users can validate or rasterise their own annotations without
running the whole preprocessing pipeline:

* :mod:`~threecad.ingest.annotations.labelmap`: defect-type names, aliases (e.g. Pinyin to English) and
  labels to ignore;
* :mod:`~threecad.ingest.annotations.labelme` / :mod:`~threecad.ingest.annotations.coco`: readers producing
  :class:`~threecad.ingest.annotations.shapes.RawAnnotation` objects;
* :mod:`~threecad.ingest.annotations.shapes`: turn one annotation into a valid shapely geometry, reporting
  every problem found and what was done about it;
* :mod:`~threecad.ingest.annotations.raster`: the one pixel convention (pixel centres) used everywhere;
* :mod:`~threecad.ingest.annotations.jsonfile`: the one bounded JSON reader (size and nesting limits).
"""

from threecad.ingest.annotations.coco import CocoFile, CocoImage, read_coco
from threecad.ingest.annotations.labelmap import LabelMap, load_label_map
from threecad.ingest.annotations.labelme import LabelmeDoc, read_labelme
from threecad.ingest.annotations.raster import rasterize, rle_decode, rle_encode
from threecad.ingest.annotations.shapes import GeometryWorker, Issue, RawAnnotation, to_geometry

__all__ = [
    "CocoFile",
    "CocoImage",
    "GeometryWorker",
    "Issue",
    "LabelMap",
    "LabelmeDoc",
    "RawAnnotation",
    "load_label_map",
    "rasterize",
    "read_coco",
    "read_labelme",
    "rle_decode",
    "rle_encode",
    "to_geometry",
]
