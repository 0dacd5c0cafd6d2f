"""The synthetic raw dataset: determinism, every breakage present and real, painted pixels = annotations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon

from threecad.errors import ThreecadError
from threecad.io import image_size, read_image, sha256_file
from threecad.synth import raw as R
from threecad.synth.surface import to_uint8

SMALL = {"categories": 2, "images": 4, "size": (160, 120), "large": 0}


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return R.make_raw_dataset(tmp_path_factory.mktemp("raw") / "r", seed=5, **SMALL)


def test_same_seed_same_bytes_other_seed_other_bytes(raw, tmp_path):
    again = R.make_raw_dataset(tmp_path / "again", seed=5, **SMALL)
    assert _tree(raw) == _tree(again)
    other = _tree(R.make_raw_dataset(tmp_path / "other", seed=6, **SMALL))
    assert other.keys() == _tree(raw).keys() and other != _tree(raw)
    with pytest.raises(ThreecadError, match="not empty"):
        R.make_raw_dataset(again, seed=5, **SMALL)


def test_every_breakage_kind_is_present_and_really_broken(raw):
    truth = json.loads((raw / "ground_truth.json").read_text())
    kinds = {b["kind"] for b in truth["breakages"]}
    assert kinds == set(R.ANNOTATION_BREAKAGES) | set(R.FILE_BREAKAGES)
    for b in truth["breakages"]:
        path = raw / b["file"]
        if b["annotation"] is not None:
            shape = json.loads(path.read_text())["shapes"][b["annotation"]]
            pts = np.asarray(shape["points"], dtype=float)
            if b["kind"] == "two_point_polygon":
                assert len(pts) == 2
            elif b["kind"] == "bowtie":
                assert not Polygon(pts).is_valid and "Self-intersection" in shapely.validation.explain_validity(Polygon(pts))
            elif b["kind"] == "duplicate_vertices":
                assert (np.all(pts[1:] == pts[:-1], axis=1)).any()
            elif b["kind"] == "outside_image":
                width, height = image_size(path.parent / json.loads(path.read_text())["imagePath"])
                assert (pts[:, 0] > width).any() or (pts < 0).any() or (pts[:, 1] > height).any()
            elif b["kind"] == "nan_coordinate":
                assert np.isnan(pts).any()
            elif b["kind"] == "zero_area":
                assert Polygon(pts).area == 0
            elif b["kind"] == "unknown_label":
                assert shape["label"] == R.UNKNOWN
            elif b["kind"] == "ignored_label":
                assert shape["label"] == R.IGNORED
        elif b["kind"] == "missing_image":
            assert not (path.parent / json.loads(path.read_text())["imagePath"]).exists()
        elif b["kind"] == "unreadable_image":
            with pytest.raises(ThreecadError, match="unreadable"):
                read_image(path)
        elif b["kind"] == "decompression_bomb":
            with pytest.raises(ThreecadError, match="limit"):
                image_size(path)
        elif b["kind"] == "invalid_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(path.read_text())
        elif b["kind"] == "size_mismatch":
            doc = json.loads(path.read_text())
            assert (doc["imageWidth"], doc["imageHeight"]) != image_size(path.parent / doc["imagePath"])


def test_painted_pixels_are_exactly_the_annotated_ones():
    specs = R._plan(**{k: v for k, v in SMALL.items()})
    checked = 0
    for spec in specs:
        if not spec.defective:
            continue
        clean, image, shapes, records = R._render(5, spec)
        union = np.zeros((spec.height, spec.width), dtype=bool)
        for record in records:
            if "defect_type" not in record:
                continue
            from threecad.ingest.annotations import RawAnnotation, rasterize, to_geometry

            shape = shapes[record["annotation"]]
            geom, _ = to_geometry(RawAnnotation(0, shape["label"], shape["shape_type"], shape["points"]), spec.width, spec.height, R.LINE_WIDTH)
            mask = rasterize(geom, spec.height, spec.width)
            changed = image.astype(int) != to_uint8(clean).astype(int)
            changed = changed.any(axis=-1) if changed.ndim == 3 else changed
            assert changed[mask].mean() > 0.9, record  # (overlapping defects of opposite sign may cancel a few)
            union |= mask
            checked += 1
        changed = image.astype(int) != to_uint8(clean).astype(int)
        changed = changed.any(axis=-1) if changed.ndim == 3 else changed
        assert not changed[~union].any()  # nothing painted outside the annotations
    assert checked >= 10


def test_plan_has_large_frames_small_defects_and_mixed_formats(raw):
    sizes = {(s.width, s.height) for s in R._plan(2, 6, (640, 480), 1)}
    assert {(2448, 2048), (4096, 1024)} <= sizes
    truth = json.loads((raw / "ground_truth.json").read_text())
    images = truth["images"]
    assert {Path(i["file"]).suffix for i in images} == {".png", ".jpg"}
    assert {i["channels"] for i in images} == {1, 3}
    defects = [d for i in images for d in i["defects"]]
    assert {d["shape_type"] for d in defects} >= {"polygon", "rectangle", "circle", "linestrip"}
    assert all(1 <= sum(d["kind"] == "defect" for d in i["defects"]) <= 10 for i in images if i["defective"])
    assert any(len({d["defect_type"] for d in i["defects"]}) >= 2 for i in images)
    assert min(d["area"] for d in defects) < 0.001 * 160 * 120  # a few pixels
    assert any(d["label"] in R.PINYIN.values() for d in defects)  # aliases exercised
    assert math.isfinite(truth["line_width"])


def test_cli_writes_the_same_bytes_as_the_function(raw, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    result = CliRunner().invoke(
        cli, ["-q", "synth", "raw", str(tmp_path / "cli"), "--seed", "5", "--images", "4", "--size", "160x120", "--large", "0"]
    )
    assert result.exit_code == 0, result.output
    assert _tree(tmp_path / "cli") == _tree(raw)
    again = CliRunner().invoke(cli, ["synth", "raw", str(tmp_path / "cli")])
    assert again.exit_code == 1 and "not empty" in again.output
