"""verify: each injected fault is caught, the Table-1 diff, the JSON report and a stable fingerprint."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import cli
from threecad.dataset.catalog import CATEGORIES, CATEGORY_FOLDERS
from threecad.dataset.verify import verify_dataset
from threecad.synth.dataset import SynthDatasetConfig, make_synthetic_dataset


@pytest.fixture
def copy(synth_root, tmp_path):
    return shutil.copytree(synth_root, tmp_path / "ds")


def _first_defect(root):
    cat = sorted(p.name for p in root.iterdir() if p.is_dir())[0]
    image = sorted(p for p in (root / cat / "test").rglob("*.png") if p.parent.name != "good")[0]
    return cat, image, root / cat / "ground_truth" / image.parent.name / image.name


def _brute_counts(root):
    """Independent count by walking the tree."""
    counts = Counter()
    for dirpath, _, files in os.walk(root):
        parts = os.path.relpath(dirpath, root).split(os.sep)
        if len(parts) == 3 and parts[1] in ("train", "test"):
            key = parts[1] if parts[1] == "train" else ("test_good" if parts[2] == "good" else "test_defect")
            counts[(parts[0], key)] += sum(f.endswith(".png") for f in files)
    return counts


def test_clean_dataset_passes_with_table1_diff(copy):
    report = verify_dataset(copy, fingerprint=True)
    assert report.ok, report.summary()
    assert not report.strict  # 2 of the 8 categories: a subset, counts are information only
    brute = _brute_counts(copy)
    for cat, counts in report.counts.items():
        for key in ("train", "test_good", "test_defect"):
            assert counts[key] == brute[(cat, key)]
    row = report.table1[0]
    info = next(c for c in CATEGORIES if c.folder == row["category"])
    assert row["train"] == {"expected": info.train, "found": report.counts[row["category"]]["train"],
                            "diff": report.counts[row["category"]]["train"] - info.train}
    assert "differences from the paper's Table 1" in report.summary()
    # forcing full makes the same differences errors
    strict = verify_dataset(copy, expect="full")
    assert not strict.ok
    checks = {i.check for i in strict.problems}
    assert checks == {"counts", "sizes"}
    missing = {i.path for i in strict.problems if i.message == "3CAD category missing"}
    assert missing == set(CATEGORY_FOLDERS) - set(report.counts)


def test_all_eight_categories_make_auto_strict(tmp_path):
    root = make_synthetic_dataset(tmp_path / "eight", seed=1, config=SynthDatasetConfig(8, 1, 1, 1, (32, 32)))
    report = verify_dataset(root)
    assert report.strict and not report.ok
    assert verify_dataset(root, expect="subset").ok


@pytest.mark.parametrize("fault", ["missing_mask", "wrong_size_mask", "empty_mask", "leak", "corrupt", "train_defect",
                                   "two_masks", "good_with_mask"])
def test_each_fault_is_caught(copy, fault):
    cat, image, mask = _first_defect(copy)
    expected_path = mask
    if fault == "missing_mask":
        mask.unlink()
        expected_path, check, text = image, "mask", "has no mask"
    elif fault == "wrong_size_mask":
        w, h = Image.open(image).size
        Image.fromarray(np.full((h + 3, w), 255, np.uint8)).save(mask)
        check, text = "mask", "differs from its image's"
    elif fault == "empty_mask":
        w, h = Image.open(image).size
        Image.fromarray(np.zeros((h, w), np.uint8)).save(mask)
        check, text = "mask", "is empty"
    elif fault == "leak":
        train = sorted((copy / cat / "train" / "good").iterdir())[0]
        shutil.copyfile(train, copy / cat / "test" / "good" / "9999.png")
        expected_path, check, text = None, "leakage", "train/good/" + train.name
    elif fault == "corrupt":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
        expected_path, check, text = image, "readable", "unreadable image"
    elif fault == "train_defect":
        (copy / cat / "train" / "scratch").mkdir()
        shutil.copyfile(image, copy / cat / "train" / "scratch" / "x.png")
        expected_path, check, text = copy / cat / "train" / "scratch", "structure", "must hold only normal"
    elif fault == "two_masks":
        shutil.copyfile(mask, mask.with_name(mask.stem + "_mask.png"))
        expected_path, check, text = image, "mask", "has 2 masks"
    elif fault == "good_with_mask":
        good = sorted((copy / cat / "test" / "good").iterdir())[0]
        (copy / cat / "ground_truth" / "good").mkdir()
        shutil.copyfile(mask, copy / cat / "ground_truth" / "good" / good.name)
        expected_path, check, text = copy / cat / "ground_truth" / "good" / good.name, "mask", "non-empty mask"
    report = verify_dataset(copy)
    if fault != "corrupt":  # header-only reading finds every fault but a truncated image body
        assert verify_dataset(copy, decode=False).problems == report.problems
    assert not report.ok
    hits = [i for i in report.problems if i.check == check and text in i.message]
    assert hits, report.summary()
    if expected_path is not None:
        assert hits[0].path == expected_path.relative_to(copy).as_posix()
    # nothing else is reported for a single fault
    assert all(i.check == check for i in report.problems), report.summary()


def test_cli_exit_codes_and_json(copy, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["data", "verify", str(copy), "--json", str(tmp_path / "ok.json"), "--fingerprint"])
    assert ok.exit_code == 0, ok.output
    assert "fingerprint sha256:" in ok.output and json.loads((tmp_path / "ok.json").read_text())["ok"] is True
    _, _, mask = _first_defect(copy)
    mask.unlink()
    bad = runner.invoke(cli, ["data", "verify", str(copy), "--json", str(tmp_path / "bad.json")])
    assert bad.exit_code == 1 and "FAILED" in bad.output
    data = json.loads((tmp_path / "bad.json").read_text())
    assert data["ok"] is False and data["problems"][0]["check"] == "mask"


def test_fingerprint_is_content_only(synth_root, tmp_path):
    first = verify_dataset(synth_root, fingerprint=True).fingerprint
    # a copy elsewhere, made in reverse order, with new mtimes: same content, same fingerprint
    other = tmp_path / "elsewhere"
    for path in sorted(synth_root.rglob("*"), reverse=True):
        target = other / path.relative_to(synth_root)
        if path.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    assert verify_dataset(other, fingerprint=True).fingerprint == first
    (other / "notes.txt").write_text("not part of the data")
    assert verify_dataset(other, fingerprint=True).fingerprint == first
    _, _, mask = _first_defect(other)
    array = np.asarray(Image.open(mask)).copy()
    array[0, 0] = 255 - array[0, 0]
    Image.fromarray(array).save(mask)
    assert verify_dataset(other, fingerprint=True).fingerprint != first


def test_alias_folder_is_compared_with_its_canonical_row(synth_root, tmp_path):
    root = tmp_path / "alias"
    shutil.copytree(synth_root / "Aluminum_Ipad", root / "aluminum_ipad")
    report = verify_dataset(root)
    assert report.ok
    assert [i.message for i in report.warnings if i.check == "structure"] == [
        "alias of the 3CAD folder Aluminum_Ipad; compared with its Table-1 row"
    ]
    assert report.table1[0]["train"]["expected"] == 2096
