"""One implementation of each job: the places that used to disagree now give the same answers.

* ``3cad evaluate`` and the leaderboard validator refuse the same malformed ``scores.csv`` and maps
  with the same problem, and the CLI error is one line naming the file;
* every dataset writer (synth, import-folder, preprocess, split) writes the one manifest schema,
  with values checked against the files themselves (checksums, mask areas and 8-connected regions
  counted with scikit-image), and older per-image files still load through the one reader;
* import-folder splits with the function preprocess and split use;
* METRICS / PROTOCOLS are defined once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image
from skimage import measure

from cli import cli
from leaderboard.validate import validate_submission
from threecad.dataset.layout import list_categories, list_samples
from threecad.dataset.manifest import (
    COLUMNS,
    find_manifest,
    image_metadata,
    read_manifest,
    samples_from_manifest,
)
from threecad.dataset.masks import read_mask
from threecad.dataset.tabular import tabular_frame
from threecad.errors import ThreecadError
from threecad.io import image_size
from threecad.maps.files import map_relpath, write_map

# ---------------------------------------------------------------------------------------------- scores


@pytest.fixture(scope="module")
def predictions(synth_root, tmp_path_factory) -> Path:
    """Valid maps (native size), a valid scores.csv and meta.json: accepted by evaluate and the validator."""
    out = tmp_path_factory.mktemp("one_way") / "pred"
    rng = np.random.default_rng(3)
    rows = ["category,path,score"]
    for category in list_categories(synth_root):
        for sample in list_samples(synth_root, category, "test"):
            width, height = image_size(sample.image_path)
            write_map(out / map_relpath(category, sample.defect, sample.stem), rng.random((height, width)), "float16")
            rows.append(f"{category},{sample.relpath},{rng.random()!r}")
    (out / "scores.csv").write_text("\n".join(rows) + "\n")
    (out / "meta.json").write_text(json.dumps({"method": "Noise"}))
    return out


def _edit_scores(lines: list[str], case: str) -> list[str]:
    header, first, *rest = lines
    category, path, _ = first.split(",")
    if case == "missing column":
        return ["category,path", *(r.rsplit(",", 1)[0] for r in lines[1:])]
    if case == "NaN":
        return [header, f"{category},{path},nan", *rest]
    if case == "duplicate row":
        return [header, first, *rest, first]
    if case == "unknown image":
        return [*lines, f"{category},test/good/not_there.png,0.5"]
    if case == "non-numeric":
        return [header, f"{category},{path},high", *rest]
    if case == "missing score":
        return [header, *rest]
    raise AssertionError(case)


SCORE_CASES = {
    "missing column": "missing column(s) score",
    "NaN": "line 2: score is nan; scores must be finite",
    "duplicate row": "second score for",
    "unknown image": "not_there.png is not a test image of the chosen categories",
    "non-numeric": "line 2: score 'high' is not a number",
    "missing score": "no score for 1 test image(s)",
}


@pytest.mark.parametrize("case", list(SCORE_CASES))
def test_malformed_scores_csv_is_one_line_error_in_evaluate_and_refused_by_the_validator(
        synth_root, predictions, tmp_path, case):
    pred = shutil.copytree(predictions, tmp_path / "pred")
    lines = (pred / "scores.csv").read_text().splitlines()
    (pred / "scores.csv").write_text("\n".join(_edit_scores(lines, case)) + "\n")
    result = CliRunner().invoke(cli, ["evaluate", "--dataset", str(synth_root), "--predictions", str(pred)])
    assert result.exit_code == 1
    output = result.output.strip().splitlines()
    assert len(output) == 1 and output[0].startswith("error:"), result.output
    assert str(pred / "scores.csv") in output[0] and SCORE_CASES[case] in output[0]
    report = validate_submission(pred, synth_root)
    assert not report.ok and any(SCORE_CASES[case] in e and e.startswith("scores.csv") for e in report.errors)


def test_the_valid_folder_passes_both(synth_root, predictions):
    """The cases above differ from an accepted folder by their one defect."""
    assert validate_submission(predictions, synth_root).ok
    result = CliRunner().invoke(cli, ["evaluate", "--dataset", str(synth_root), "--predictions", str(predictions)])
    assert result.exit_code == 0, result.output


def _first_map(pred: Path, synth_root: Path) -> tuple[Path, tuple[int, int]]:
    category = list_categories(synth_root)[0]
    sample = list_samples(synth_root, category, "test")[0]
    return pred / map_relpath(category, sample.defect, sample.stem), image_size(sample.image_path)


@pytest.mark.parametrize("case, expected", [
    ("float64", "dtype float64; maps must be float16 or float32"),
    ("other size", "but expected"),
    (".npy map", "maps must be named <stem>.tiff"),
    (".tif map", "maps must be named <stem>.tiff"),
])
def test_maps_evaluate_would_have_taken_are_refused_by_both(synth_root, predictions, tmp_path, case, expected):
    """Rules where evaluate used to be laxer than the leaderboard: both now apply the stricter one."""
    pred = shutil.copytree(predictions, tmp_path / "pred")
    path, (width, height) = _first_map(pred, synth_root)
    if case == "float64":
        tifffile.imwrite(path, np.zeros((height, width), np.float64))
    elif case == "other size":
        write_map(path, np.zeros((height // 2, width // 2)))
    elif case == ".npy map":
        np.save(path.with_suffix(".npy"), np.zeros((height, width), np.float32))
        path.unlink()
    else:
        path.rename(path.with_suffix(".tif"))
    result = CliRunner().invoke(cli, ["evaluate", "--dataset", str(synth_root), "--predictions", str(pred)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    report = validate_submission(pred, synth_root)
    assert not report.ok
    if case.endswith("map"):  # a map under another name: missing for evaluate's first check, unexpected
        assert "map(s) missing" in result.output
        assert any(expected in u for u in report.unexpected)
    else:
        assert expected in result.output and any(expected in e for e in report.errors)


def test_scores_of_categories_not_evaluated_are_left_out(synth_root, predictions):
    """``evaluate --categories A`` looks at A's maps and rows only, as it always has for the maps."""
    first = list_categories(synth_root)[0]
    result = CliRunner().invoke(cli, ["evaluate", "--dataset", str(synth_root), "--predictions", str(predictions),
                                      "--categories", first])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------- manifest
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_rows(root: Path, table: pd.DataFrame, hashed: bool = True) -> None:
    """Every row against its files, computed independently of the writers."""
    assert list(table.columns[: len(COLUMNS)]) == list(COLUMNS)
    for row in table.to_dict("records"):
        image = root / row["image"]
        assert (row["width"], row["height"]) == image_size(image) == (row["x1"] - row["x0"], row["y1"] - row["y0"])
        assert row["label"] == int(row["defect"] != "good") == int(bool(row["mask"]))
        if hashed:
            assert row["image_sha256"] == _sha(image)
        if row["mask"]:
            mask = np.asarray(Image.open(root / row["mask"])) > 127
            assert row["defect_area"] == mask.sum() > 0
            assert row["region_count"] == measure.label(mask, connectivity=2).max()
            assert row["defect"] in row["defect_types"].split(";")
            if hashed:
                assert row["mask_sha256"] == _sha(root / row["mask"])
        else:
            assert row["defect_area"] == row["region_count"] == 0 and row["defect_types"] == ""


def test_synth_writes_the_schema(synth_root):
    table = read_manifest(synth_root / "manifest.parquet")
    everything = [s for c in list_categories(synth_root) for sp in ("train", "test") for s in list_samples(synth_root, c, sp)]
    assert sorted(table["image"]) == sorted(s.image_path.relative_to(synth_root).as_posix() for s in everything)
    _check_rows(synth_root, table)
    assert read_manifest(synth_root / "manifest.csv").equals(table)  # same table in both files


def test_import_and_split_write_the_schema_and_import_splits_like_assign_splits(tmp_path):
    from threecad.dataset.split import Group, assign_splits, split_dataset
    from threecad.ingest.import_folder import import_folder

    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    (src / "good").mkdir(parents=True)
    (src / "dent").mkdir()
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(src / "good" / f"n{i}.png")
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(src / "dent" / f"d{i}.jpg")
        mask = np.zeros((20, 24), np.uint8)
        mask[2:6, 2:6] = mask[10:14, 12 + i: 16 + i] = 255  # two separate regions
        Image.fromarray(mask).save(src / "dent" / f"d{i}.png")
    import_folder(src, tmp_path / "imp", category="Widget", train_fraction=0.5, validation_fraction=0.5, seed=9)
    table = read_manifest(tmp_path / "imp" / "manifest.parquet")
    _check_rows(tmp_path / "imp", table)
    assert set(table.loc[table["label"] == 1, "region_count"]) == {2}
    # the split is threecad.dataset.split.assign_splits over groups of identical bytes (here one file each)
    normals = table[table["label"] == 0]
    expected = assign_splits([Group(_sha(src / s), "Widget", False) for s in normals["source"]], 0.5, 0.5, 0.0, 9)
    assert list(normals["split"]) == [expected[_sha(src / s)] for s in normals["source"]]
    assert sorted(normals["split"]) == ["test"] * 3 + ["train"] * 2 + ["validation"] * 2
    # split re-splits the imported dataset (its manifest) and writes the schema plus the pool paths
    split_dataset(tmp_path / "imp", tmp_path / "re", seed=2, train_fraction=0.6, materialize="copy")
    again = read_manifest(tmp_path / "re" / "manifest.parquet")
    assert list(again.columns) == [*COLUMNS, "pool_image", "pool_mask"]
    _check_rows(tmp_path / "re", again)
    assert (again["source"].sort_values().tolist() == table["source"].sort_values().tolist())


def test_preprocess_writes_the_schema(tmp_path):
    from threecad.ingest.preprocess import preprocess
    from threecad.synth.raw import make_raw_dataset

    raw = make_raw_dataset(tmp_path / "raw", seed=1, categories=1, images=2, size=(160, 96), large=0)
    preprocess(raw, tmp_path / "ds", tile=64, seed=1)
    table = read_manifest(tmp_path / "ds" / "manifest.parquet")
    assert len(table) and (table["x1"] > table["x0"]).all()
    _check_rows(tmp_path / "ds", table)


def test_older_dataset_files_convert_through_the_one_reader(synth_root, tmp_path):
    """Datasets written before the schema: import-folder's import_manifest.csv (anomalib Tabular plus
    source_path and defect_types) and synth_dataset.json's per-image list still load."""
    category = list_categories(synth_root)[0]
    old = tmp_path / "old_import"
    shutil.copytree(synth_root / category, old / category)
    samples = [s for sp in ("train", "test") for s in list_samples(old, category, sp)]
    frame = tabular_frame(samples, relative_to=old)
    frame["source_path"] = [f"/raw/{s.image_path.name}" for s in samples]
    frame["defect_types"] = ["" if s.label == 0 else s.defect for s in samples]
    frame.to_csv(old / "import_manifest.csv", index=False)
    assert find_manifest(old) == old / "import_manifest.csv"
    table = read_manifest(old / "import_manifest.csv")
    assert list(table.columns) == list(COLUMNS)
    assert table["region_count"].isna().all()  # unknown, not invented
    back = samples_from_manifest(old / "import_manifest.csv")
    assert [(s.image_path, s.mask_path, s.label, s.split, s.defect) for s in back] == [
        (s.image_path, s.mask_path, s.label, s.split, s.defect) for s in samples]
    meta = image_metadata(old)
    defective = next(s for s in samples if s.label)
    assert meta[defective.image_path.relative_to(old).as_posix()] == {"defect_types": [defective.defect],
                                                                      "source_path": f"/raw/{defective.image_path.name}"}

    synth = tmp_path / "old_synth"
    shutil.copytree(synth_root / category, synth / category)
    test = list_samples(synth, category, "test")
    listed = [{"path": s.relpath, "defect_types": [s.defect, "dirt"] if s.label else [], "label": s.label} for s in test]
    (synth / "synth_dataset.json").write_text(json.dumps({"seed": 7, "config": {}, "test": {category: listed}}))
    meta = image_metadata(synth)
    assert {k: v.get("defect_types", []) for k, v in meta.items()} == {
        f"{category}/{e['path']}": e["defect_types"] for e in listed}
    (synth / "synth_dataset.json").write_text(json.dumps({"seed": 7, "config": {}}))  # today's: no image list
    assert find_manifest(synth) is None and image_metadata(synth) == {}
    with pytest.raises(ThreecadError, match="lists no images"):
        read_manifest(synth / "synth_dataset.json")


def test_read_mask_agrees_with_the_manifest_area(synth_root):
    """The loaders' mask reading and the writers' area are the same pixels."""
    table = read_manifest(synth_root / "manifest.parquet")
    row = table[table["label"] == 1].iloc[0]
    assert read_mask(synth_root / row["mask"]).sum() == row["defect_area"]


# ---------------------------------------------------------------------------------------------- constants
def test_metric_and_protocol_names_are_defined_once():
    import leaderboard.submit
    import leaderboard.tables
    import threecad.metrics
    import threecad.metrics.evaluator

    assert leaderboard.tables.METRICS is threecad.metrics.METRICS is threecad.metrics.evaluator.METRICS
    assert leaderboard.submit.PROTOCOLS is threecad.metrics.PROTOCOLS is threecad.metrics.evaluator.PROTOCOLS
