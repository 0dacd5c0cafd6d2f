"""``3cad data preprocess`` on hostile input: names that try to leave OUT, ids that are not ids, shapes
that would stall GEOS, files nested too deeply. Each bad item costs only itself, as a report row."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import cli
from threecad.errors import ThreecadError
from threecad.ingest.annotations import shapes as S
from threecad.ingest.annotations.raster import rle_encode
from threecad.ingest.preprocess import STATE, preprocess


def _image(path: Path, size: tuple[int, int] = (96, 64), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, size[::-1], dtype=np.uint8)).save(path)
    return path


def _snapshot(root: Path) -> dict[str, str]:
    """Every file, folder and link below ``root``: content hash, ``dir`` or the link's target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


def _report(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "report.csv", keep_default_na=False)


def test_cli_coco_names_cannot_write_outside_out(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _image(raw / "parts" / "a.png")
    _image(tmp_path / "outside" / "x.png", seed=1)  # what '../outside/x.png' names from RAW
    absolute = _image(tmp_path / "abs" / "y.png", seed=2)
    (tmp_path / "outside" / "keep.txt").write_text("mine")
    names = ["../outside/x.png", str(absolute), "parts\\a.png", "parts//a.png", "parts/./a.png", "parts/.a.png",
             "coco/a.png", "a.png", "parts/" + "b" * 230 + ".png", "parts/a\u0000.png", "parts/\ud800.png"]  # fmt: skip
    coco = {
        "images": [{"id": i + 1, "file_name": n, "width": 96, "height": 64} for i, n in enumerate(names)]
        + [{"id": 99, "file_name": "parts/a.png", "width": 96, "height": 64}],
        "categories": [{"id": 1, "name": "dent"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 30, 1, 30, 30]]},
                        {"id": 2, "image_id": 2, "category_id": 1, "segmentation": [[1, 1, 30, 1, 30, 30]]}],
    }  # fmt: skip
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    before_tmp, before_root = _snapshot(tmp_path), set(os.listdir("/"))
    result = CliRunner().invoke(cli, ["-q", "data", "preprocess", str(raw), str(out), "--coco", str(tmp_path / "coco.json"),
                                      "--tile", "128"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "unsafe_name" in result.output and "no problems found" not in result.output
    after = _snapshot(tmp_path)
    assert {k: after.get(k) for k in before_tmp} == before_tmp  # nothing that existed was changed or removed
    assert {k for k in after if k not in before_tmp and not k.startswith("out/")} == {"out"}  # new entries only in OUT
    assert set(os.listdir("/")) == before_root  # an absolute file_name made the category '/' before
    report = _report(out)
    refused = report[report["problem"] == S.UNSAFE_NAME]
    assert len(refused) == len(names) and set(refused["file"]) == {"coco.json"} and (refused["action"] == S.SKIPPED).all()
    for why in ("'..' in path", "absolute path", "backslash", "empty or '.' path component", "hidden names",
                "name preprocess writes", "directly in the raw folder", "1 to 200 bytes", "control character", "not valid UTF-8"):  # fmt: skip
        assert refused["detail"].str.contains(why, regex=False).any(), why
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert list(manifest["source"]) == ["parts/a.png"]  # the one good entry is still used


def test_coco_entries_that_are_not_ids_or_masks_cost_only_themselves(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    for name in ("a", "b", "c", "d"):
        _image(raw / "parts" / f"{name}.png", seed=ord(name))
    blob = np.zeros((64, 96), dtype=bool)
    blob[10:20, 10:40] = True
    poly = [[50, 30, 90, 30, 90, 60]]
    coco = {
        "images": [{"id": [1], "file_name": "parts/a.png"}, {"id": {"k": 2}, "file_name": "parts/a.png"},
                   {"id": 1, "file_name": "parts/a.png", "width": 96, "height": 64},
                   {"id": 2, "file_name": "parts/b.png"}, {"id": 3, "file_name": "parts/c.png"},
                   {"id": 4, "file_name": "parts/d.png"}],
        "categories": [{"id": 1, "name": "dent"}, {"id": [2], "name": "x"}],
        "annotations": [
            {"id": 1, "image_id": [1], "category_id": 1, "segmentation": poly},
            {"id": 2, "image_id": 2, "category_id": 7, "segmentation": poly},  # undeclared: was a type named '7'
            {"id": 3, "image_id": 3, "category_id": 1, "segmentation": {"size": [64, 96], "counts": "1"}},
            {"id": 4, "image_id": 3, "category_id": 1, "segmentation": {"size": [{"h": 64}, 96], "counts": [6144]}},
            {"id": 5, "image_id": 3, "category_id": 1, "segmentation": {"size": [64, 96], "counts": [-1, 6145]}},
            {"id": 6, "image_id": 3, "category_id": 1, "segmentation": rle_encode(blob)},
            {"id": 7, "image_id": 4, "category_id": {"x": 1}, "segmentation": poly},
            {"id": 8, "image_id": 4, "category_id": 1, "segmentation": poly},
        ],
    }  # fmt: skip
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    summary = preprocess(raw, out, coco=tmp_path / "coco.json", tile=128, train_fraction=1.0)
    assert summary["problems"] == {
        "malformed_entry/dropped": 1, "malformed_entry/skipped": 3, "malformed_rle/dropped": 3,
        "no_valid_annotations/skipped": 1, "unknown_label/dropped": 2,
    }  # fmt: skip
    assert summary["defect_types"] == ["dent"]  # no type named '7'
    report = _report(out)
    assert report.loc[report["problem"] == "unknown_label", "detail"].str.contains("category_id 7 is not declared").any()
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("source")
    assert "parts/b.png" not in manifest.index  # its only defect was dropped: it must not become normal data
    assert manifest.loc["parts/a.png", "split"] == "train"
    assert manifest.loc["parts/c.png", "defect_area"] == blob.sum()  # the valid RLE survives its broken siblings
    assert manifest.loc["parts/d.png", "label"] == 1


def test_one_hostile_shape_costs_only_itself(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _image(raw / "parts" / "a.png", (200, 150))
    _image(raw / "parts" / "b.png", (200, 150), seed=1)
    rng = np.random.default_rng(0)
    shapes = [
        {"label": "dent", "points": rng.uniform(0, 150, (100_000, 2)).tolist(), "shape_type": "polygon"},
        {"label": "dent", "points": rng.uniform(0, 150, (400, 2)).tolist(), "shape_type": "polygon"},
        {"label": "d" * 300, "points": [[1, 1], [20, 1], [20, 20]], "shape_type": "polygon"},
        {"label": ["dent"], "points": [[1, 1], [20, 1], [20, 20]], "shape_type": "polygon"},
        {"label": "dent", "points": [[100, 100], [140, 100], [140, 140], [100, 140]], "shape_type": "polygon"},
    ]
    (raw / "parts" / "a.json").write_text(json.dumps({"shapes": shapes, "imagePath": "a.png"}))
    summary = preprocess(raw, out, tile=256, train_fraction=1.0)
    assert summary["problems"] == {"too_complex/dropped": 2, "unknown_label/dropped": 2}
    report = _report(out)
    assert sorted(report["annotation"]) == [0, 1, 2, 3] and set(report["file"]) == {"parts/a.json"}
    assert report["detail"].str.len().max() < 400  # the 300-character label is not copied whole
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("source")
    assert manifest.loc["parts/a.png", "defect_area"] == 40 * 40 and manifest.loc["parts/b.png", "label"] == 0


def test_labelme_names_deep_json_and_imagepath_are_rows(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _image(raw / "parts" / "ok.png")
    _image(raw / "parts" / "deep.png", seed=1)
    (raw / "parts" / "deep.json").write_text('{"shapes": ' + "[" * 50_000 + "]" * 50_000 + "}")
    _image(raw / "bad cat" / "x.png", seed=2)  # a category that is no folder name
    _image(raw / "parts" / "back\\slash.png", seed=3)
    _image(raw / "parts" / "a" / "b.png", seed=4)
    _image(raw / "parts" / "a__b.png", seed=5)  # would take the tile names of a/b.png
    for i, image_path in enumerate(["..\\ok.png", "/etc/passwd", "ok\u0000.png"]):
        (raw / "parts" / f"orphan{i}.json").write_text(json.dumps({"shapes": [], "imagePath": image_path}))
    summary = preprocess(raw, out, tile=128, train_fraction=1.0)
    report = _report(out).set_index("file")
    assert report.loc["parts/deep.json", "problem"] == S.JSON_UNREADABLE  # a bare RecursionError before
    assert "deeper than 32 levels" in report.loc["parts/deep.json", "detail"]
    assert report.loc["bad cat/x.png", "problem"] == S.UNSAFE_NAME
    assert report.loc["parts/back\\slash.png", "problem"] == S.UNSAFE_NAME
    assert report.loc["parts/a__b.png", "problem"] == S.DUPLICATE_STEM
    for i in range(3):
        assert report.loc[f"parts/orphan{i}.json", "problem"] == S.UNSAFE_NAME  # NUL: a ValueError before
    assert summary["sources_used"] == 2  # ok.png and a/b.png
    assert not (out / "bad cat").exists()


def test_category_option_is_checked_like_every_folder_name(tmp_path):
    _image(tmp_path / "raw" / "a.png")
    for bad in ("../up", "/", "a/b", "coco", ".hidden", "x" * 300):
        with pytest.raises(ThreecadError, match="--category .* cannot be a folder name"):
            preprocess(tmp_path / "raw", tmp_path / "out", category=bad)
    assert not (tmp_path / "out").exists()


def test_planted_link_in_out_stops_a_resume_before_writing_through_it(tmp_path):
    raw, out, elsewhere = tmp_path / "raw", tmp_path / "out", tmp_path / "elsewhere"
    _image(raw / "parts" / "a.png")
    _image(raw / "parts" / "b.png", seed=1)
    preprocess(raw, out, tile=128, train_fraction=1.0)
    elsewhere.mkdir()
    for record in (out / STATE / "sources" / "parts").glob("*.json"):
        record.unlink()  # as if killed before the frames were done
    target = out / "parts" / "train" / "good"
    for tile in target.iterdir():
        tile.unlink()
    target.rmdir()
    target.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ThreecadError, match="outside"):
        preprocess(raw, out, tile=128, train_fraction=1.0)
    assert list(elsewhere.iterdir()) == []
