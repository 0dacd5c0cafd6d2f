"""Annotations: rasteriser vs pycocotools and shapely, validation/repair vs shapely, label maps, readers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import shapely
from pycocotools import mask as coco_mask
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box

from threecad.annotations import (
    LabelMap,
    RawAnnotation,
    load_label_map,
    rasterize,
    read_coco,
    read_labelme,
    to_geometry,
)
from threecad.annotations import shapes as S
from threecad.annotations.raster import rle_decode, rle_encode
from threecad.errors import ThreecadError


def _blob(rng, cx, cy, r, n=16):
    a = np.sort(rng.uniform(0, 2 * np.pi, n))
    rr = r * rng.uniform(0.5, 1.0, n)
    return np.stack([cx + rr * np.cos(a), cy + rr * np.sin(a)], axis=1)


def _centres_inside(geom, height, width):
    yy, xx = np.mgrid[0:height, 0:width]
    return shapely.contains_xy(geom, xx + 0.5, yy + 0.5)


def test_square_matches_pycocotools_exactly():
    ours = rasterize(box(10, 10, 110, 110), 200, 200)
    rle = coco_mask.frPyObjects([[10, 10, 110, 10, 110, 110, 10, 110]], 200, 200)
    assert ours.sum() == 10_000 == int(coco_mask.area(rle)[0])
    assert ours[10:110, 10:110].all() and ours.sum() == 100 * 100


def test_random_polygons_agree_with_pycocotools_up_to_border_pixels():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pts = _blob(rng, 150, 120, rng.uniform(5, 100))
        poly = Polygon(pts)
        assert poly.is_valid
        ours = rasterize(poly, 240, 300)
        theirs = coco_mask.decode(coco_mask.frPyObjects([pts.ravel().tolist()], 240, 300))[..., 0].astype(bool)
        differ = np.argwhere(ours != theirs)
        # Every disagreement is a border pixel: its centre lies within one pixel of the outline.
        dist = shapely.distance(poly.exterior, shapely.points(differ[:, 1] + 0.5, differ[:, 0] + 0.5))
        assert (dist <= 1.0).all()
        assert abs(int(ours.sum()) - int(theirs.sum())) <= poly.length


def test_raster_equals_shapely_point_in_polygon_with_holes_and_parts():
    rng = np.random.default_rng(1)
    for _ in range(10):
        outer = Polygon(_blob(rng, 60, 50, 45, 24))
        hole = Polygon(_blob(rng, 60, 50, 12, 10))
        other = Polygon(_blob(rng, 140, 60, 20, 12))
        geom = MultiPolygon([outer.difference(hole), other]) if outer.contains(hole) else MultiPolygon([outer, other])
        assert geom.is_valid
        assert np.array_equal(rasterize(geom, 110, 170), _centres_inside(geom, 110, 170))
    ring = Polygon([(0, 0), (100, 0), (100, 100), (0, 100)], [[(20, 20), (40, 20), (40, 40), (20, 40)]])
    assert rasterize(ring, 120, 120).sum() == 100 * 100 - 20 * 20  # the hole stays a hole


def test_sub_pixel_shape_keeps_one_pixel():
    tiny = Point(10.2, 20.7).buffer(0.2)
    assert rasterize(tiny, 30, 30, min_one_pixel=False).sum() == 0
    mask = rasterize(tiny, 30, 30)
    assert mask.sum() == 1 and mask[20, 10]


def test_bowtie_keeps_both_lobes_unlike_buffer0():
    points = [[0, 0], [100, 100], [100, 0], [0, 100]]
    geom, issues = to_geometry(RawAnnotation(0, "scratch", "polygon", points), 200, 200)
    reference = shapely.make_valid(Polygon(points))
    assert geom.area == pytest.approx(reference.area) == pytest.approx(5000)
    assert Polygon(points).buffer(0).area == pytest.approx(2500)  # what the legacy repair would keep
    assert [(p, a) for p, a, _ in issues] == [(S.SELF_INTERSECTION, S.REPAIRED)]
    mask = rasterize(geom, 200, 200)
    assert mask[50, 10] and mask[50, 90]  # left and right lobe
    differ = np.argwhere(mask != _centres_inside(reference, 200, 200))
    # Centres on the diagonals are ties (shapely's contains excludes the boundary); nothing else differs.
    assert np.allclose(shapely.distance(reference.boundary, shapely.points(differ[:, 1] + 0.5, differ[:, 0] + 0.5)), 0)


@pytest.mark.parametrize(
    "shape_type, points, problem, action",
    [
        ("polygon", [[1, 1], [5, 5]], S.TOO_FEW_POINTS, S.DROPPED),
        ("polygon", [[1, 1], [5, 5], [5, 5], [1, 1]], S.DUPLICATE_VERTICES, S.REPAIRED),
        ("polygon", [[1, 1], [5, float("nan")], [9, 1]], S.NON_FINITE, S.DROPPED),
        ("polygon", [[1, 1], [5, float("inf")], [9, 1]], S.NON_FINITE, S.DROPPED),
        ("polygon", [[1, 1], [5, 5], [9, 9]], S.ZERO_AREA, S.DROPPED),
        ("polygon", [[-50, -50], [-40, -50], [-40, -40]], S.OUTSIDE_IMAGE, S.DROPPED),
        ("polygon", "junk", S.MALFORMED, S.DROPPED),
        ("point", [[3, 3]], S.UNSUPPORTED, S.DROPPED),
        ("rectangle", [[3, 3], [3, 9]], S.ZERO_AREA, S.DROPPED),
    ],
)
def test_problems_are_detected(shape_type, points, problem, action):
    _, issues = to_geometry(RawAnnotation(0, "dirt", shape_type, points), 50, 50)
    assert (problem, action) in [(p, a) for p, a, _ in issues]


def test_duplicates_removed_and_outside_clipped_with_shapely_areas():
    square = [[10, 10], [10, 10], [30, 10], [30, 30], [30, 30], [10, 30]]
    geom, issues = to_geometry(RawAnnotation(0, "dirt", "polygon", square), 100, 100)
    assert geom.area == pytest.approx(400) and issues[0][:2] == (S.DUPLICATE_VERTICES, S.REPAIRED)
    points = [[80, 80], [130, 80], [130, 130], [80, 130]]
    geom, issues = to_geometry(RawAnnotation(0, "dirt", "polygon", points), 100, 100)
    assert geom.area == pytest.approx(Polygon(points).intersection(box(0, 0, 100, 100)).area) == pytest.approx(400)
    assert [(p, a) for p, a, _ in issues] == [(S.OUTSIDE_IMAGE, S.CLIPPED)]
    on_border = [[0, 0], [100, 0], [100, 100]]  # the border is inside: nothing to report
    assert to_geometry(RawAnnotation(0, "dirt", "polygon", on_border), 100, 100)[1] == []


def test_rectangle_circle_and_linestrip_geometry():
    rect, _ = to_geometry(RawAnnotation(0, "d", "rectangle", [[30, 20], [10, 5]]), 100, 100)
    assert rect.area == pytest.approx(300)
    circle, _ = to_geometry(RawAnnotation(0, "d", "circle", [[50, 50], [50, 60]]), 100, 100)
    assert circle.area == pytest.approx(math.pi * 100, rel=0.01)
    line, _ = to_geometry(RawAnnotation(0, "d", "linestrip", [[10, 10], [60, 10], [60, 40]]), 100, 100, line_width=4)
    assert line.area == pytest.approx(LineString([(10, 10), (60, 10), (60, 40)]).buffer(2, quad_segs=8).area)
    assert line.area == pytest.approx(80 * 4 + math.pi * 4, rel=0.02)


def test_label_map_aliases_ignore_and_unknown(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("names: [scratch, dirt]\naliases: {huahen: scratch}\nignore: [marker]\n")
    labels = load_label_map(path)
    assert labels.resolve(" HuaHen ") == ("scratch", "ok")
    assert labels.resolve("Scratch") == ("scratch", "ok")
    assert labels.resolve("marker") == (None, "ignored")
    assert labels.resolve("bump") == (None, "unknown")
    as_json = tmp_path / "map.json"
    as_json.write_text(json.dumps({"names": {"scratch": ["huahen"], "dirt": []}}))
    assert load_label_map(as_json).resolve("huahen") == ("scratch", "ok")
    bad = tmp_path / "bad.yaml"
    bad.write_text("names: [scratch]\naliases: {x: nothere}\n")
    with pytest.raises(ThreecadError, match="bad.yaml.*not in names"):
        load_label_map(bad)
    assert LabelMap().resolve("weird_one") == ("weird_one", "ok")  # open map: every label is a type
    assert LabelMap().resolve("good")[1] == "unknown"  # would collide with the good folder


def test_labelme_reader_accepts_nan_and_rejects_garbage(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"shapes": [{"label": "dirt", "points": [[1, NaN]], "shape_type": "polygon"}], '
                    '"imagePath": "a.png", "imageWidth": 10, "imageHeight": 8}')
    doc = read_labelme(path)
    assert (doc.width, doc.height, doc.image_path) == (10, 8, "a.png")
    assert math.isnan(doc.shapes[0].points[0][1])
    path.write_text("{not json")
    with pytest.raises(ThreecadError, match="a.json"):
        read_labelme(path)


def test_rle_round_trip_and_coco_reader(tmp_path):
    rng = np.random.default_rng(3)
    mask = rng.random((37, 53)) > 0.7
    rle = rle_encode(mask)
    assert isinstance(rle["counts"], str) and np.array_equal(rle_decode(rle), mask)
    assert int(coco_mask.area({"size": rle["size"], "counts": rle["counts"].encode()})) == mask.sum()
    # Uncompressed counts (column-major run lengths), as some tools write them.
    flat = mask.flatten(order="F").astype(np.uint8)
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0), prepend=0).tolist()
    runs = ([0] if flat[0] else []) + [r for r in runs if r > 0]
    assert np.array_equal(rle_decode({"size": [37, 53], "counts": runs}), mask)
    coco = {
        "images": [{"id": 7, "file_name": "cat/b.png", "width": 53, "height": 37}],
        "categories": [{"id": 1, "name": "dirt"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9]]},
            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": rle},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    (image,) = read_coco(tmp_path / "c.json")
    assert image.file_name == "cat/b.png" and [a.shape_type for a in image.annotations] == ["polygons", "rle"]
    geom, issues = to_geometry(image.annotations[0], 53, 37)
    assert issues == [] and geom.area == pytest.approx(32)
