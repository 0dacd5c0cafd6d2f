"""Factory inspection: stitching, calibration, bad input, output rules, and a tiny end-to-end line.

The end-to-end fixture is the README's factory workflow at toy scale: synthetic raw frames ->
``preprocess`` with 128-pixel tiles and held-out normals -> PatchCore at 64 px -> ``calibrate`` on
validation/good -> ``inspect`` on the *raw* frames (every one larger than a tile, so each is cut,
scored and stitched). Ground truth comes from preprocess's own mask tiles pasted back into frames.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from cli import cli
from threecad.errors import ThreecadError
from threecad.ingest.preprocess import preprocess
from threecad.ingest.tiling import tile_windows
from threecad.inspect import (
    CALIBRATION_FILE,
    COLUMNS,
    calibrate,
    default_threads,
    frame_windows,
    inspect,
    load_predictor,
    read_calibration,
    score_frame,
    stitch,
    threshold_for_rate,
)
from threecad.inspect.overlay import find_regions, overlay
from threecad.io import read_image, sha256_file
from threecad.methods import runner
from threecad.synth.raw import make_raw_dataset

TILE = 128


class MeanPerWindow:
    """A fake model: each window's map is constant, the mean of the window's pixels; score = that mean."""

    def input_settings(self) -> dict:
        return {"size": None, "resize": "squash", "exposure": "raw"}

    def predict(self, images, batch_size=None):
        values = [float(np.asarray(w, dtype=np.float64).mean()) for w in images]
        return np.asarray(values, np.float32), [np.full(w.shape[:2], v, np.float32) for w, v in zip(images, values)]


class Identity(MeanPerWindow):
    """A fake model whose map is the window itself (so every window agrees where they overlap)."""

    def predict(self, images, batch_size=None):
        maps = [np.asarray(w, np.float32) / 255.0 for w in images]
        return np.asarray([m.max() for m in maps], np.float32), maps


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ stitching
@pytest.mark.parametrize("combine", ["max", "mean"])
def test_constant_per_window_maps_stitch_exactly_by_the_rule(combine):
    rng = np.random.default_rng(0)
    height, width = 150, 300
    image = rng.integers(0, 256, (height, width), dtype=np.uint8)
    boxes = frame_windows(width, height, 100, 0.25)
    assert len(boxes) > 4 and boxes == tile_windows(width, height, 100, 0.25, 0.0)
    score, stitched = score_frame(MeanPerWindow(), image, 100, 0.25, combine)
    means = [image[y0:y1, x0:x1].astype(np.float64).mean() for x0, y0, x1, y1 in boxes]
    assert score == pytest.approx(max(means), rel=1e-6)  # the frame score is the worst window's
    for y in range(0, height, 7):  # brute force, pixel by pixel: which windows cover it
        for x in range(0, width, 5):
            covering = [m for m, (x0, y0, x1, y1) in zip(means, boxes) if x0 <= x < x1 and y0 <= y < y1]
            expected = max(covering) if combine == "max" else np.mean(covering)
            assert stitched[y, x] == pytest.approx(expected, rel=1e-5), (x, y)


def test_same_windows_as_preprocess_and_small_frames_whole():
    assert frame_windows(4096, 1024, 1024, 0.2) == tile_windows(4096, 1024, 1024, 0.2, 0.2)
    assert frame_windows(4096, 1024, 1024, 0.2)[-1] == (3072, 0, 4096, 1024)
    assert frame_windows(500, 300, 1024, 0.2) == [(0, 0, 500, 300)]
    assert frame_windows(5000, 300, None) == [(0, 0, 5000, 300)]
    # a strip preprocess would drop (shorter than min_fraction * tile) is still scored by inspect
    assert tile_windows(3000, 150, 1024, 0.2, 0.2) == [] and len(frame_windows(3000, 150, 1024, 0.2)) == 4


@pytest.mark.parametrize("combine", ["max", "mean"])
def test_defect_cut_by_a_window_boundary_keeps_its_full_region(combine):
    height, width = 200, 400
    image = np.full((height, width), 40, np.uint8)
    boxes = frame_windows(width, height, TILE, 0.2)
    edge = boxes[1][0]  # the second window's left border cuts through the blob below
    yy, xx = np.mgrid[:height, :width]
    blob = (xx - edge) ** 2 / 30**2 + (yy - 100) ** 2 / 12**2 <= 1
    assert blob[:, edge - 20].any() and blob[:, edge + 20].any()
    image[blob] = 250
    _, stitched = score_frame(Identity(), image, TILE, 0.2, combine)
    np.testing.assert_array_equal(stitched > 0.5, blob)
    regions = find_regions(stitched, 0.5)
    ys, xs = np.nonzero(blob)
    assert regions.count == 1 and regions.area == blob.sum()
    assert regions.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_stitch_refuses_uncovered_frames_and_unknown_rules():
    with pytest.raises(ValueError, match="cover"):
        stitch([np.zeros((10, 10))], [(0, 0, 10, 10)], 10, 20)
    with pytest.raises(ThreecadError, match="--combine"):
        stitch([np.zeros((10, 10))], [(0, 0, 10, 10)], 10, 10, "median")


def test_regions_and_overlay():
    amap = np.zeros((60, 80), np.float32)
    amap[5:10, 5:9] = 2.0  # 20 px
    amap[30:50, 40:70] = 3.0  # 600 px: the largest
    amap[20, 20] = 1.0  # at the threshold: not above it
    regions = find_regions(amap, 1.0)
    assert (regions.count, regions.box, regions.area) == (2, (40, 30, 70, 50), 600)
    assert find_regions(amap, 5.0).box is None
    image = np.full((60, 80), 100, np.uint8)
    drawn = overlay(image, amap, regions.mask, 1.0)
    assert drawn.shape == (60, 80, 3) and drawn.dtype == np.uint8
    cyan = (drawn == [0, 255, 255]).all(axis=2)
    assert cyan[30, 40:70].all() and cyan[49, 40:70].all() and not cyan[35:45, 45:65].any()  # outline only
    assert cyan[5, 5:9].all() and not cyan[20, 20]  # the small region too; nothing at the threshold
    quiet = drawn[55, 2]
    assert abs(int(quiet[0]) - 100) <= 1  # map minimum: the frame shows through unchanged


# ---------------------------------------------------------------------------------------- calibration
def test_threshold_is_the_smallest_with_false_alarm_rate_at_most_the_target():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 300))
        scores = rng.normal(size=n) * rng.uniform(0.1, 10)
        rate = float(rng.choice([0.0, 0.01, 0.05, 0.1, 0.25, rng.uniform(0, 0.99)]))
        t = threshold_for_rate(scores, rate)
        assert np.mean(scores > t) <= rate + 1e-12
        smaller = scores[scores < t]  # every smaller candidate breaks the target
        if smaller.size:
            assert np.mean(scores > smaller.max()) > rate
        if not np.isclose(rate * n, round(rate * n)):  # off the CDF's steps numpy's rounding cannot differ
            assert t == np.quantile(scores, 1 - rate, method="inverted_cdf")
    assert threshold_for_rate(np.arange(30.0), 0.1) == 26.0  # 3 of 30 allowed above: 27, 28, 29
    assert threshold_for_rate(np.array([3.0, 1.0, 2.0]), 0.0) == 3.0
    with pytest.raises(ThreecadError, match="false-alarm-rate"):
        threshold_for_rate(np.ones(3), 1.0)
    with pytest.raises(ThreecadError, match="NaN"):
        threshold_for_rate(np.array([1.0, np.nan]), 0.1)


def test_default_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == os.cpu_count()
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ThreecadError, match="OMP_NUM_THREADS"):
        default_threads()


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def line(tmp_path_factory, one_thread):
    """Raw frames, the preprocessed dataset, and a trained (uncalibrated) PatchCore run."""
    root = tmp_path_factory.mktemp("line")
    raw = make_raw_dataset(root / "raw", seed=3, categories=1, images=12, size=(480, 256), large=0)
    data = root / "data"
    preprocess(raw, data, tile=TILE, val_fraction=0.3, seed=0)
    category = next(p.name for p in raw.iterdir() if p.is_dir())
    run = runner.train("patchcore", data, [category], out=root / "runs", device="cpu", size=64,
                       config={"coreset_ratio": 0.25})[0]
    truth = json.loads((raw / "ground_truth.json").read_text())["images"]
    return {"root": root, "raw": raw, "data": data, "category": category, "run": run, "truth": truth}


def _ground_truth(line: dict, frame: dict) -> np.ndarray:
    """A frame's defect mask, pasted back from preprocess's mask tiles (named ..._x0_y0_x1_y1.png)."""
    mask = np.zeros((frame["height"], frame["width"]), bool)
    stem = Path(frame["file"]).stem
    for tile in (line["data"] / line["category"] / "ground_truth").glob(f"*/{stem}_*.png"):
        x0, y0, x1, y1 = map(int, tile.stem.split("_")[-4:])
        mask[y0:y1, x0:x1] |= read_image(tile) > 0
    return mask


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        return {Path(r["path"]).name: r for r in reader}


def test_uncalibrated_run_writes_scores_and_maps_but_no_decision(line, tmp_path):
    out = tmp_path / "out"
    before = _tree(line["run"])
    result = CliRunner().invoke(cli, ["inspect", "--run", str(line["run"]), str(line["raw"] / line["category"]),
                                      "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "no decision" in result.output and "not calibrated" in result.output
    rows = _rows(out)
    good = [r for r in rows.values() if not r["error"]]
    assert good and all(r["score"] and r["decision"] == "" and r["threshold"] == "" for r in good)
    assert all((out / r["map"]).is_file() and (out / r["overlay"]).is_file() for r in good)
    assert _tree(line["run"]) == before  # inspect never writes into the run


def test_calibrate_then_inspect_the_raw_frames(line, tmp_path):
    run, category = line["run"], line["category"]
    normals = line["data"] / category / "validation" / "good"
    before, data_before = _tree(run), _tree(line["data"])
    record = calibrate(run, normals, 0.1, threads=1)
    after = _tree(run)
    assert set(after) - set(before) == {CALIBRATION_FILE} and {k: after[k] for k in before} == before
    assert _tree(line["data"]) == data_before
    assert read_calibration(run)["image_threshold"] == record["image_threshold"]
    assert record["tile"] == TILE and record["n_normals"] == len(list(normals.iterdir()))
    assert record["achieved_false_alarm_rate"] <= 0.1

    out = tmp_path / "inspection"
    listing = sorted(p.name for p in tmp_path.iterdir())
    summary = inspect(run, [line["raw"] / category], out, threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*listing, "inspection"])  # OUT, nothing beside it
    assert summary["tile"] == TILE and summary["tiling_source"] == "run" and summary["threshold_source"] == "calibration"
    rows = _rows(out)
    # broken files of the raw set: listed with the reason, no map, and the run went on
    assert "unreadable" in rows["frame_9001.png"]["error"] and rows["frame_9001.png"]["map"] == ""
    assert "pixel limit" in rows["frame_9003.png"]["error"]
    assert summary["unreadable"] == 2 and summary["frames"] == len(rows) - 2
    frames = [f for f in line["truth"] if f["category"] == category]
    normal_ok = []
    for frame in frames:
        row = rows[Path(frame["file"]).name]
        assert float(row["threshold"]) == record["image_threshold"]
        amap = tifffile.imread(out / row["map"])
        assert amap.shape == (frame["height"], frame["width"]) and amap.dtype == np.float32
        assert frame["width"] > TILE  # each frame was cut into windows and stitched
        drawn = np.asarray(Image.open(out / row["overlay"]))
        assert drawn.shape == (frame["height"], frame["width"], 3)
        if frame["defective"]:
            assert row["decision"] == "NG", row
            truth = _ground_truth(line, frame)
            regions = amap > record["pixel_threshold"]
            assert (regions & truth).any(), f"{frame['file']}: no outlined region on the defect"
            x0, y0, x1, y1 = (int(row[f"region_{k}"]) for k in ("x0", "y0", "x1", "y1"))
            assert truth[max(0, y0 - 8):y1 + 8, max(0, x0 - 8):x1 + 8].any()  # the largest box is on a defect
            assert int(row["region_area"]) <= regions.sum()
        else:
            normal_ok.append(row["decision"] == "OK")
    assert np.mean(normal_ok) >= 0.75, normal_ok

    # calibration scores normals exactly as inspect scores frames
    again = inspect(run, [normals], tmp_path / "normals", threads=1)
    scores = [float(r["score"]) for r in _rows(tmp_path / "normals").values()]
    assert again["ng"] == 0 and max(scores) == pytest.approx(record["normal_scores"]["max"], rel=1e-5)

    # --threshold overrides the calibration
    forced = inspect(run, [normals], tmp_path / "forced", threads=1, threshold=min(scores) - 1e-3)
    assert forced["ng"] == len(scores) and forced["threshold_source"] == "--threshold"


def test_output_folder_rules_and_bad_input(line, tmp_path):
    run = str(line["run"])
    frame = str(line["raw"] / line["category"] / "frame_0003.png")
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "mine.txt").write_text("keep me")
    refused = CliRunner().invoke(cli, ["inspect", "--run", run, frame, "--out", str(out)])
    assert refused.exit_code == 1 and "not empty" in refused.output and "--overwrite" in refused.output
    ok = CliRunner().invoke(cli, ["inspect", "--run", run, frame, "--out", str(out), "--overwrite", "--threads", "1"])
    assert ok.exit_code == 0, ok.output
    assert (out / "notes" / "mine.txt").read_text() == "keep me"  # only inspect's own outputs are replaced
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["frame_0003.tiff"]
    assert not [p for p in out.rglob("*.part")]

    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["inspect", "--run", run, str(empty), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 1 and "no images found" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()
    missing = CliRunner().invoke(cli, ["inspect", "--run", run, str(tmp_path / "nope.png"), "--out", str(tmp_path / "o3")])
    assert missing.exit_code == 1 and "input not found" in missing.output

    corrupt = tmp_path / "frames"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    Image.open(frame).save(corrupt / "fine.png")
    summary = inspect(line["run"], [corrupt / "*.png"], tmp_path / "o4", threads=1)
    rows = _rows(tmp_path / "o4")
    assert summary["frames"] == 1 and summary["unreadable"] == 1 and rows["broken.png"]["error"]
    assert rows["fine.png"]["score"]

    onnx = CliRunner().invoke(cli, ["inspect", "--run", run, frame, "--out", str(tmp_path / "o5"),
                                    "--engine", "onnxruntime"])
    assert onnx.exit_code == 1 and "3cad export" in onnx.output
    with pytest.raises(ThreecadError, match="--engine"):
        load_predictor(line["run"], "tensorrt")
    defects = next(p for p in (line["data"] / line["category"] / "test").iterdir() if p.name != "good")
    before = _tree(line["run"])
    labelled = CliRunner().invoke(cli, ["calibrate", "--run", run, "--normals", str(defects)])
    assert labelled.exit_code == 1 and "labelled test defect" in labelled.output
    assert _tree(line["run"]) == before  # the refused calibration wrote nothing
    bad_rate = CliRunner().invoke(cli, ["calibrate", "--run", run, "--normals", str(corrupt), "--false-alarm-rate", "1.5"])
    assert bad_rate.exit_code == 1 and "--false-alarm-rate" in bad_rate.output
