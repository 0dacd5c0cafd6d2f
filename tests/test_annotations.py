"""Annotations: rasteriser vs pycocotools and shapely, validation/repair vs shapely, label maps, readers."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time

import numpy as np
import pytest
import shapely
from pycocotools import mask as coco_mask
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box

from threecad.errors import ThreecadError
from threecad.ingest.annotations import (
    LabelMap,
    RawAnnotation,
    jsonfile,
    load_label_map,
    rasterize,
    read_coco,
    read_labelme,
    to_geometry,
)
from threecad.ingest.annotations import shapes as S
from threecad.ingest.annotations.jsonfile import MAX_JSON_DEPTH, read_json
from threecad.ingest.annotations.raster import rle_decode, rle_encode


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
    (image,) = read_coco(tmp_path / "c.json").images
    assert image.file_name == "cat/b.png" and [a.shape_type for a in image.annotations] == ["polygons", "rle"]
    geom, issues = to_geometry(image.annotations[0], 53, 37)
    assert issues == [] and geom.area == pytest.approx(32)


# ---------------------------------------------------------------- hostile input: bounded work per shape
def _star(n: int, k: int) -> np.ndarray:
    """The star polygon {n/k}: n vertices on a circle, each joined to the k-th next one."""
    angle = 2 * np.pi * k * np.arange(n) / n
    return np.stack([500 + 400 * np.cos(angle), 500 + 400 * np.sin(angle)], axis=1)


def _issues(geom_issues):
    return [(p, a) for p, a, _ in geom_issues[1]]


def test_crossing_count_matches_brute_force_pairs():
    rng = np.random.default_rng(5)
    for n in (4, 7, 12, 25):
        pts = rng.uniform(0, 100, (n, 2))
        edges = [LineString([pts[i], pts[(i + 1) % n]]) for i in range(n)]
        brute = sum(edges[i].intersects(edges[j]) for i in range(n) for j in range(i + 2, n) if not (i == 0 and j == n - 1))
        assert S.count_crossings([pts], closed=True, limit=10**6) == brute
    bowtie = np.array([[0, 0], [100, 100], [100, 0], [0, 100]], dtype=float)
    assert S.count_crossings([bowtie], closed=True) == 1
    square = np.array([[0, 0], [10, 0], [10, 0], [10, 10], [0, 10], [0, 0]], dtype=float)  # repeats are not crossings
    assert S.count_crossings([square], closed=True) == 0
    assert S.count_crossings([np.array([[0, 0], [10, 10], [10, 0], [0, 10]], dtype=float)], closed=False) == 1


def test_huge_polygon_is_refused_by_the_vertex_cap_at_once():
    pts = np.random.default_rng(0).uniform(0, 1000, (100_000, 2))  # make_valid: 12.8 GB, then bad_alloc
    started = time.perf_counter()
    geom, issues = to_geometry(RawAnnotation(0, "dirt", "polygon", pts.tolist()), 1000, 1000)
    assert geom is None and [(p, a) for p, a, _ in issues] == [(S.TOO_COMPLEX, S.DROPPED)]
    assert "100,000 vertices" in issues[0][2] and time.perf_counter() - started < 2.0
    parts = [pts[i : i + 4].ravel().tolist() for i in range(0, 12_000, 4)]  # the cap counts every COCO part
    assert _issues(to_geometry(RawAnnotation(0, "dirt", "polygons", parts), 1000, 1000)) == [(S.TOO_COMPLEX, S.DROPPED)]


def test_many_self_intersections_are_refused_before_any_repair():
    random400 = np.random.default_rng(1).uniform(0, 1000, (400, 2))  # ~18,000 crossings: make_valid took 30-60 s
    started = time.perf_counter()
    for pts in (random400, _star(3001, 2)):  # the star: 3,001 crossings
        geom, issues = to_geometry(RawAnnotation(0, "dirt", "polygon", pts.tolist()), 1000, 1000)
        assert geom is None and [(p, a) for p, a, _ in issues] == [(S.TOO_COMPLEX, S.DROPPED)]
    scribble = np.random.default_rng(2).uniform(0, 1000, (300, 2))  # a stroke crossing itself ~10,000 times
    assert _issues(to_geometry(RawAnnotation(0, "dirt", "linestrip", scribble.tolist()), 1000, 1000)) == [(S.TOO_COMPLEX, S.DROPPED)]
    assert time.perf_counter() - started < 2.0


def test_moderate_self_intersections_are_repaired_in_the_worker():
    star = _star(501, 2)  # 501 crossings: under the cap, over the in-process size
    assert S.INLINE_CROSSINGS < S.count_crossings([star], closed=True) <= S.MAX_CROSSINGS
    with S.GeometryWorker() as worker:
        geom, issues = to_geometry(RawAnnotation(0, "dirt", "polygon", star.tolist()), 1000, 1000, worker=worker)
        assert worker._process is not None  # it really went through the child
    assert [(p, a) for p, a, _ in issues] == [(S.SELF_INTERSECTION, S.REPAIRED)]
    assert geom.area == pytest.approx(shapely.make_valid(Polygon(star)).area)


def test_time_budget_abandons_one_shape_and_the_next_still_works():
    # 10,000 vertices, no crossing, but the 3-px stroke overlaps itself everywhere: GEOS needs seconds.
    zigzag = np.stack([np.tile([0.0, 1000.0], 5000), np.arange(10_000) * 0.3], axis=1)
    assert S.count_crossings([zigzag], closed=False) == 0
    bowtie = [[0, 0], [100, 100], [100, 0], [0, 100]] + [[0, 100 - i * 1e-3] for i in range(1, 80)]
    with S.GeometryWorker(seconds=0.2) as worker:
        started = time.perf_counter()
        geom, issues = to_geometry(RawAnnotation(0, "dirt", "linestrip", zigzag.tolist()), 1000, 3000, worker=worker)
        assert time.perf_counter() - started < 1.5
        assert geom is None and [(p, a) for p, a, _ in issues] == [(S.TOO_COMPLEX, S.DROPPED)] and "budget" in issues[0][2]
        geom, issues = to_geometry(RawAnnotation(1, "dirt", "polygon", bowtie), 200, 200, worker=worker)
    assert (S.SELF_INTERSECTION, S.REPAIRED) in [(p, a) for p, a, _ in issues] and geom.area == pytest.approx(5000, rel=1e-3)


def test_a_repair_that_kills_its_process_costs_only_that_shape(monkeypatch):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("simulating an abort needs a forked child")
    monkeypatch.setattr(S, "_construct", lambda *job: os._exit(134))  # what std::bad_alloc does to the process
    star = _star(201, 2)
    with S.GeometryWorker() as worker:
        geom, issues = to_geometry(RawAnnotation(0, "dirt", "polygon", star.tolist()), 1000, 1000, worker=worker)
        assert geom is None and [(p, a) for p, a, _ in issues] == [(S.TOO_COMPLEX, S.DROPPED)] and "died" in issues[0][2]
        monkeypatch.undo()
        geom, _ = to_geometry(RawAnnotation(0, "dirt", "polygon", star.tolist()), 1000, 1000, worker=worker)
    assert geom is not None


# ---------------------------------------------------------------- hostile input: files, labels, RLE
def test_one_bounded_json_reader_names_the_file(tmp_path, monkeypatch):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # a bare RecursionError before
    shallow_but_deep = tmp_path / "forty.json"
    shallow_but_deep.write_text('{"shapes": ' + "[" * 40 + "]" * 40 + "}")
    digits = tmp_path / "digits.json"
    digits.write_text('{"images": [], "x": ' + "9" * 5000 + "}")
    for path in (deep, shallow_but_deep, digits):
        for reader in (read_labelme, read_coco, load_label_map):
            with pytest.raises(ThreecadError, match=path.name):
                reader(path)
    with pytest.raises(ThreecadError, match=f"{deep.name}.*deeper than {MAX_JSON_DEPTH}"):
        read_json(deep)
    monkeypatch.setattr(jsonfile, "MAX_JSON_BYTES", 1000)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"images": [], "pad": "x" * 2000}))
    with pytest.raises(ThreecadError, match="big.json.*over the 1,000-byte limit"):
        read_coco(big)
    yaml_map = tmp_path / "deep.yaml"
    yaml_map.write_text("names: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ThreecadError, match="deep.yaml"):
        load_label_map(yaml_map)


def test_long_or_odd_labels_never_become_folders(tmp_path):
    long = "a" * 300
    assert LabelMap().resolve(long) == (None, "unknown")  # was 'ok': a folder name over the 255-byte limit
    assert LabelMap().resolve("a" * 255)[1] == "ok"
    assert LabelMap().resolve(["scratch"]) == (None, "unknown")
    for bad in (long, "../x", "a/b", ".hidden", "good", "scratch\n"):  # '$' used to accept the trailing newline
        with pytest.raises(ThreecadError, match="cannot be a folder name"):
            LabelMap((bad,))
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nnames: [scratch]\naliases: {huahen: *c}\n")
    with pytest.raises(ThreecadError, match="bomb.yaml.*aliases"):
        load_label_map(bomb)  # str() of the shared lists would have exploded


@pytest.mark.parametrize(
    "rle, why",
    [
        ({"size": [20, 20], "counts": "1"}, "cover 1 pixels"),  # pycocotools filled the rest from uninitialised memory
        ({"size": [2, 2], "counts": "zz"}, "characters outside"),
        ({"size": [2, 2], "counts": "P"}, "middle of a run"),
        ({"size": [2, 2], "counts": [0, 10**6]}, "cover 1,000,000 pixels"),
        ({"size": [2, 2], "counts": [-1, 5]}, "non-negative"),
        ({"size": [2, 2], "counts": [1.5, 2.5]}, "non-negative"),
        ({"size": {"h": 2}, "counts": [4]}, "size must be"),
        ({"size": [True, 4], "counts": [4]}, "size must be"),
        ({"size": [2, 2], "counts": {"x": 1}}, "list or a string"),
        ({"size": [2, 2]}, "needs 'size' and 'counts'"),
        ({"size": [2, 2], "counts": "\u00e9"}, "not ASCII"),
    ],
)
def test_malformed_rle_is_refused_with_the_reason(rle, why):
    with pytest.raises(ValueError, match=why):
        rle_decode(rle)


def test_rle_decoder_agrees_with_pycocotools_on_valid_masks():
    rng = np.random.default_rng(9)
    for t in range(60):
        height, width = (int(v) for v in rng.integers(1, 70, 2))
        mask = rng.random((height, width)) < rng.uniform(0, 1)
        mask[:] = False if t % 7 == 0 else True if t % 11 == 0 else mask
        rle = rle_encode(mask)
        reference = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
        assert np.array_equal(rle_decode(rle), reference) and np.array_equal(reference, mask)
    big = np.zeros((3000, 2000), dtype=bool)
    big[100:2900, 5:1990] = True  # long runs need several 5-bit groups
    big[1500, 1000] = False
    assert np.array_equal(rle_decode(rle_encode(big)), big)


def test_coco_reader_turns_bad_entries_into_rows(tmp_path):
    coco = {
        "images": [
            {"id": [1], "file_name": "c/list.png"},
            {"id": {"a": 1}, "file_name": "c/dict.png"},
            {"id": 2, "file_name": 123},
            {"id": 3, "file_name": "c/ok.png", "width": "wide", "height": 10},
            {"id": 4, "file_name": "c/twice1.png"},
            {"id": 4, "file_name": "c/twice2.png"},
        ],
        "categories": [{"id": [5], "name": "x"}, {"id": 1, "name": "dirt"}, {"id": 1, "name": "dust"}],
        "annotations": [
            {"id": 1, "image_id": [3], "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]]},
            {"id": 2, "image_id": 3, "category_id": 7, "segmentation": [[1, 1, 5, 1, 5, 5]]},
            {"id": 3, "image_id": 3, "category_id": {"x": 1}, "segmentation": [[1, 1, 5, 1, 5, 5]]},
            {"id": 4, "image_id": 3, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]]},
            {"id": 5, "image_id": 4, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]]},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    result = read_coco(tmp_path / "c.json")  # raised TypeError (unhashable list) before
    assert [im.file_name for im in result.images] == ["c/ok.png"]
    (image,) = result.images
    assert (image.width, image.height) == (None, 10)
    assert [a.label for a in image.annotations] == [None, None, "dirt"]  # 7 and {'x': 1} are not declared
    assert image.annotations[0].extra == {"category_id": "7"}
    details = sorted(p.detail.split(":")[0] for p in result.problems)
    assert details == ["annotations[0]", "categories[0]", "categories[2]", "images[0]", "images[1]", "images[2]", "images[4]", "images[5]"]
    assert {p.problem for p in result.problems} == {S.MALFORMED_ENTRY} and all(p.file == "c.json" for p in result.problems)
    (tmp_path / "bad.json").write_text(json.dumps({"images": [], "annotations": {"a": 1}}))
    with pytest.raises(ThreecadError, match="bad.json.*'annotations' must be a list"):
        read_coco(tmp_path / "bad.json")
