"""``3cad data preprocess`` on ``3cad synth raw`` output: report, masks, tiles, layout, determinism, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from sahi.slicing import get_slice_bboxes

from threecad.dataset.layout import detect_mask_style, list_samples
from threecad.dataset.loaders import AnomalyDataset
from threecad.dataset.masks import read_mask
from threecad.errors import ThreecadError
from threecad.ingest.preprocess import STATE, PreprocessConfig, plan, preprocess
from threecad.ingest.tiling import tile_windows
from threecad.io import sha256_file
from threecad.synth.raw import make_raw_dataset

ROOT = Path(__file__).resolve().parents[1]
RAW = {"seed": 11, "categories": 2, "images": 6, "size": (300, 220), "large": 0}
OPTS = {"tile": 128, "overlap": 0.2, "seed": 3}


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return make_raw_dataset(tmp_path_factory.mktemp("raw") / "raw", **RAW)


@pytest.fixture(scope="module")
def out(raw, tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("pre") / "out"
    return path, preprocess(raw, path, **OPTS)


def test_tiling_follows_sahi_and_the_min_fraction_rule():
    assert tile_windows(2448, 2048) == [tuple(b) for b in get_slice_bboxes(2048, 2448, 1024, 1024, False, 0.2, 0.2)]
    assert len(tile_windows(2448, 2048)) == 9 and tile_windows(900, 700) == [(0, 0, 900, 700)]
    assert tile_windows(4096, 150) == []  # 1024 x 150 windows: a side of 14.6 % of the window
    assert all(y1 - y0 == 300 for _, y0, _, y1 in tile_windows(4096, 300))  # 29.3 %: kept
    # The side rule applies to small frames too (they used to be kept whole at any size): the paper's
    # smallest images are 288 px, 28 % of a 1024 window; 'dimensions under 20 %' means either side.
    assert tile_windows(150, 150) == [] and tile_windows(288, 288) == [(0, 0, 288, 288)]
    assert tile_windows(900, 204) == [] and tile_windows(900, 205) == [(0, 0, 900, 205)]  # 0.2 x 1024 = 204.8
    assert tile_windows(150, 150, tile=128, min_fraction=0.2) != [] and tile_windows(100, 100, min_fraction=0.0) != []
    cover = np.zeros((2048, 2448), dtype=int)
    for x0, y0, x1, y1 in tile_windows(2448, 2048):
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1


def test_every_deliberate_breakage_is_reported_with_its_action(raw, out):
    path, summary = out
    truth = json.loads((raw / "ground_truth.json").read_text())
    expected = {(b["file"], -1 if b["annotation"] is None else b["annotation"], b["problem"], b["action"]) for b in truth["breakages"]}
    report = pd.read_csv(path / "report.csv", keep_default_na=False)
    found = set(zip(report["file"], report["annotation"], report["problem"], report["action"]))
    assert found == expected  # each deliberate one, and nothing the generator did not intend
    assert sum(summary["problems"].values()) == len(expected)


def test_bowtie_keeps_both_lobes(raw, out):
    path, _ = out
    truth = json.loads((raw / "ground_truth.json").read_text())
    bowtie = next(b for b in truth["breakages"] if b["kind"] == "bowtie")
    record = next(d for i in truth["images"] if i["json"] == bowtie["file"] for d in i["defects"] if d["annotation"] == bowtie["annotation"])
    import shapely
    from shapely.geometry import Polygon

    points = json.loads((raw / bowtie["file"]).read_text())["shapes"][bowtie["annotation"]]["points"]
    assert record["geometry_area"] == pytest.approx(shapely.make_valid(Polygon(points)).area)
    assert record["geometry_area"] > 1.5 * Polygon(points).buffer(0).area


def _full_masks(path: Path, manifest: pd.DataFrame, source: str, shape: tuple[int, int]):
    """Paste tile masks back into the frame: (union of tiles, per-pixel disagreement count)."""
    union = np.zeros(shape, dtype=bool)
    for row in manifest[manifest["source"] == source].itertuples():
        crop = read_mask(path / row.mask) if row.mask else np.zeros((row.height, row.width), dtype=bool)
        union[row.y0 : row.y1, row.x0 : row.x1] |= crop
    return union


def test_tiles_are_crops_and_masks_lose_no_pixel(raw, out):
    path, _ = out
    manifest = pd.read_parquet(path / "manifest.parquet")
    sources, _, _ = plan(raw, PreprocessConfig(**OPTS))
    from threecad.ingest.annotations import rasterize, rle_decode

    cut = 0
    for src in (s for s in sources if s.status == "defective"):
        full = np.zeros((src.height, src.width), dtype=bool)
        for _, geom in src.shapes:
            full |= rle_decode(geom) if isinstance(geom, dict) else rasterize(geom, src.height, src.width)
        rows = manifest[manifest["source"] == src.image]
        assert len(rows) == len(src.windows) > 1
        pasted = _full_masks(path, manifest, src.image, full.shape)
        assert np.array_equal(pasted, full)  # every defect pixel survives the cut
        image = np.asarray(Image.open(raw / src.image))
        for row in rows.itertuples():
            tile = np.asarray(Image.open(path / row.image))
            assert np.array_equal(tile, image[row.y0 : row.y1, row.x0 : row.x1])
            crop = full[row.y0 : row.y1, row.x0 : row.x1]
            assert row.label == int(crop.any()) and row.defect_area == crop.sum()
            if row.mask:
                assert np.array_equal(read_mask(path / row.mask), crop)
        # some defect is split by a window border: its pixels show up in two tiles
        cut += sum(full[:, x0 - 1].any() and full[:, x0].any() for x0 in {r.x0 for r in rows.itertuples()} if x0 > 0)
    assert cut >= 1


def test_manifest_matches_tree_and_loaders(out):
    path, summary = out
    manifest = pd.read_parquet(path / "manifest.parquet")
    csv = pd.read_csv(path / "manifest.csv", keep_default_na=False)
    assert len(csv) == len(manifest) == summary["tiles"]
    listed = set()
    for category in sorted(manifest["category"].unique()):
        for split in ("train", "validation", "test"):
            for s in list_samples(path, category, split):
                listed.add(s.image_path.relative_to(path).as_posix())
                if s.label:
                    assert read_mask(s.mask_path).any()
    assert listed == set(manifest["image"])
    files = {p.relative_to(path).as_posix() for p in path.glob("*/*/*/*.png") if "ground_truth" not in p.parts}
    assert files == listed
    masks = {p.relative_to(path).as_posix() for p in path.glob("*/ground_truth/*/*.png")}
    assert masks == set(manifest.loc[manifest["label"] == 1, "mask"])
    for row in manifest.itertuples():
        assert sha256_file(path / row.image) == row.image_sha256
    assert (manifest.loc[manifest["split"] == "train", "label"] == 0).all()
    # a source never lands on both sides
    assert (manifest.groupby("source")["split"].nunique() == 1).all()
    assert set(manifest["split"]) == {"train", "test"}
    category = manifest["category"].iloc[0]
    assert len(AnomalyDataset(path, category, "train", size=64)) > 0
    item = AnomalyDataset(path, category, "test", size=64)[0]
    assert item["image"].shape == (3, 64, 64)


def test_coco_rles_are_the_per_type_masks(out):
    path, _ = out
    manifest = pd.read_parquet(path / "manifest.parquet")
    for category in manifest["category"].unique():
        coco = json.loads((path / "coco" / f"{category}.json").read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        by_image: dict[int, list] = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        rows = manifest[manifest["category"] == category].reset_index(drop=True)
        assert len(coco["images"]) == len(rows)
        for image in coco["images"]:
            row = rows.iloc[image["id"] - 1]
            assert f"{category}/{image['file_name']}" == row["image"]
            anns = by_image.get(image["id"], [])
            assert sorted(names[a["category_id"]] for a in anns) == sorted(filter(None, row["defect_types"].split(";")))
            union = np.zeros((row["height"], row["width"]), dtype=bool)
            for ann in anns:
                rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
                assert int(coco_mask.area(rle)) == ann["area"]
                union |= coco_mask.decode(rle).astype(bool)
            if row["mask"]:
                assert np.array_equal(union, read_mask(path / row["mask"]))
            else:
                assert not anns


def test_rerun_identical_bytes_with_other_worker_count(raw, out, tmp_path):
    path, _ = out
    again = tmp_path / "again"
    preprocess(raw, again, workers=2, **OPTS)
    assert _tree(again) == _tree(path)
    # A second run into the finished folder is a no-op resume with the same bytes.
    assert preprocess(raw, again, **OPTS)["resumed"] and _tree(again) == _tree(path)


def test_kill_and_resume_gives_identical_bytes(raw, out, tmp_path):
    path, _ = out
    target = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "cli.py"), "-q", "data", "preprocess", str(raw), str(target),
           "--tile", "128", "--seed", "3", "--workers", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = target / STATE / "sources"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if records.is_dir() and sum(1 for _ in records.rglob("*.json")) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sum(1 for _ in records.rglob("*.json"))
    total = sum(1 for _ in (path / STATE / "sources").rglob("*.json"))
    assert 0 < done < total, "the run was not interrupted mid-way"
    assert not (target / "manifest.parquet").exists()
    (target / "Aluminum_Camera_Cover" / "test").mkdir(parents=True, exist_ok=True)
    (target / "Aluminum_Camera_Cover" / "test" / ".half.png.abc.part").write_bytes(b"half")  # a killed write
    summary = preprocess(raw, target, **OPTS)
    assert summary["resumed"]
    assert _tree(target) == _tree(path)


def test_refuses_foreign_or_changed_output_and_strict(raw, out, tmp_path):
    path, _ = out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ThreecadError, match="not empty"):
        preprocess(raw, foreign, **OPTS)
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(ThreecadError, match="other settings"):
        preprocess(raw, path, **{**OPTS, "tile": 96})
    with pytest.raises(ThreecadError, match="strict"):
        preprocess(raw, tmp_path / "strict", strict=True, **OPTS)
    assert not (tmp_path / "strict").exists()
    with pytest.raises(ThreecadError, match="raw folder"):
        preprocess(raw, raw / "inside", **OPTS)
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "data", "preprocess", str(raw), str(tmp_path / "s2"), "--strict", "--tile", "128"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
    )  # fmt: skip
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr and last.startswith("error: 13 problem(s)")


def test_coco_input_with_rle_and_mvtec_naming(tmp_path):
    from shapely.geometry import Polygon

    from threecad.ingest.annotations import rasterize
    from threecad.ingest.annotations.raster import rle_encode

    folder = tmp_path / "raw" / "parts"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (90, 120), dtype=np.uint8)).save(folder / "b.png")
    blob = np.zeros((90, 120), dtype=bool)
    blob[60:70, 10:40] = True
    coco = {
        "images": [{"id": 1, "file_name": "parts/a.png", "width": 120, "height": 90},
                   {"id": 2, "file_name": "parts/b.png", "width": 120, "height": 90}],
        "categories": [{"id": 1, "name": "dent"}, {"id": 2, "name": "stain"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[5.5, 5, 50, 8, 30, 40.5]]},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": rle_encode(blob)},
            {"id": 3, "image_id": 1, "category_id": 2, "segmentation": [[80.1, 80.1, 80.4, 80.1, 80.2, 80.4]]},
        ],
    }  # fmt: skip
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    summary = preprocess(tmp_path / "raw", out, coco=tmp_path / "coco.json", mask_suffix="_mask", train_fraction=1.0, tile=128)
    assert summary["tiles"] == 2 and summary["problems"] == {"sub_pixel/marked_one_pixel": 1}
    assert detect_mask_style(out / "parts") == "mvtec"
    (sample,) = list_samples(out, "parts", "test")
    expected = rasterize(Polygon([(5.5, 5), (50, 8), (30, 40.5)]), 90, 120) | blob
    assert not expected[80, 80]
    expected[80, 80] = True  # the sub-pixel speck keeps the pixel it lies in
    assert sample.mask_path.name.endswith("_mask.png") and np.array_equal(read_mask(sample.mask_path), expected)
    assert sample.defect == "dent"  # the polygon has more pixels than the blob
    assert [s.image_path.name for s in list_samples(out, "parts", "train")] == ["b_0_0_120_90.png"]


def test_small_frames_follow_the_side_rule_end_to_end(tmp_path):
    raw = tmp_path / "raw" / "parts"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, side in (("small", 150), ("paper", 288)):
        Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(raw / f"{name}.png")
    summary = preprocess(tmp_path / "raw", tmp_path / "out", train_fraction=1.0)  # default 1024 window, 0.2
    assert summary["tiles"] == 1 and summary["problems"] == {"no_tiles/skipped": 1}
    report = pd.read_csv(tmp_path / "out" / "report.csv", keep_default_na=False)
    assert list(report["file"]) == ["parts/small.png"] and "204.8 px" in report["detail"][0]
    assert [p.name for p in (tmp_path / "out" / "parts" / "train" / "good").iterdir()] == ["paper_0_0_288_288.png"]
