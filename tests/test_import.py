"""import-folder: generated class folders and the real magnetic tile data (skips without ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import cli
from threecad.dataset.layout import list_samples
from threecad.dataset.manifest import read_manifest
from threecad.dataset.verify import verify_dataset
from threecad.errors import ThreecadError
from threecad.ingest.import_folder import import_folder
from threecad.io import image_size, sha256_file


def _make_source(root: Path, normals: int = 10, defects: int = 4, empty_defect: bool = True, twins: bool = False) -> Path:
    rng = np.random.default_rng(0)
    (root / "Free").mkdir(parents=True)
    for i in range(normals):
        Image.fromarray(rng.integers(0, 256, (24, 32), dtype=np.uint8)).save(root / "Free" / f"n{i:02d}.jpg")
        Image.fromarray(np.zeros((24, 32), np.uint8)).save(root / "Free" / f"n{i:02d}.png")
    if twins:
        (root / "Free" / "n00.jpg").write_bytes((root / "Free" / "n01.jpg").read_bytes())
    (root / "MT_Scratch" / "sub").mkdir(parents=True)
    for i in range(defects):
        Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)).save(root / "MT_Scratch" / "sub" / f"d{i}.jpg")
        mask = np.zeros((20, 30), np.uint8)
        mask[2 + i : 9 + i, 3:12] = np.linspace(0, 255, 9, dtype=np.uint8)  # anti-aliased edge
        if empty_defect and i == defects - 1:
            mask[:] = 0
        Image.fromarray(mask).save(root / "MT_Scratch" / "sub" / f"d{i}.png")
    return root


def test_generated_folder(tmp_path):
    src = _make_source(tmp_path / "src")
    report = import_folder(src, tmp_path / "out", category="Widget", normal=["free"], strip_prefix="MT_",
                           train_fraction=0.6, validation_fraction=0.34, seed=3, mask_threshold=127)
    out = tmp_path / "out"
    # 10 normals: 6 to the training side (2 of them validation), 4 test; 3 of 4 defects (one empty mask)
    assert report.counts == {"train/good": 4, "validation/good": 2, "test/good": 4, "test/Scratch": 3}
    assert [s["reason"] for s in report.skipped] == ["empty mask"]
    assert verify_dataset(out).ok
    manifest = read_manifest(out / "manifest.parquet")
    assert len(manifest) == sum(report.counts.values())
    assert list(read_manifest(out / "manifest.csv")["image"]) == list(manifest["image"])
    settings = json.loads((out / "import.json").read_text())["settings"]
    assert settings["train_fraction"] == 0.6
    for row in manifest.to_dict("records"):
        source = Path(settings["source"]) / row["source"]
        assert (out / row["image"]).read_bytes() == source.read_bytes()  # byte-for-byte copy
        assert row["image_sha256"] == sha256_file(source) and (row["x1"], row["y1"]) == image_size(source)
        if row["label"] == 1:
            expected = np.asarray(Image.open(source.with_suffix(".png"))) > 127
            written = np.asarray(Image.open(out / row["mask"]))
            assert set(np.unique(written)) <= {0, 255} and np.array_equal(written > 0, expected)
            assert row["defect_area"] == expected.sum() and row["region_count"] == 1 and row["defect_types"] == "Scratch"
        else:
            assert row["mask"] == "" and row["defect_area"] == 0


def test_identical_images_stay_on_one_side(tmp_path):
    src = _make_source(tmp_path / "src", normals=6, twins=True)
    sides = set()
    for seed in range(8):
        import_folder(src, tmp_path / f"o{seed}", normal=["Free"], seed=seed, train_fraction=0.5)
        manifest = read_manifest(tmp_path / f"o{seed}" / "manifest.csv")
        side = {Path(r["source"]).name: r["split"] for r in manifest.to_dict("records")}
        assert side["n00.jpg"] == side["n01.jpg"]
        sides.add(side["n00.jpg"])
        assert verify_dataset(tmp_path / f"o{seed}").ok  # no leakage for verify to find
    assert sides == {"train", "test"}  # the twins do move: the check above is not vacuous


def test_split_is_seeded(tmp_path):
    src = _make_source(tmp_path / "src", normals=20, empty_defect=False)

    def train_names(seed, name):
        import_folder(src, tmp_path / name, normal=["Free"], seed=seed)
        return sorted(s.image_path.name for s in list_samples(tmp_path / name, "src", "train"))

    first = train_names(1, "a")
    assert train_names(1, "b") == first
    fingerprints = {verify_dataset(tmp_path / n, fingerprint=True).fingerprint for n in ("a", "b")}
    assert len(fingerprints) == 1  # same seed, same bytes
    assert train_names(2, "c") != first
    assert len(first) == 14


def test_import_errors(tmp_path):
    src = _make_source(tmp_path / "src", empty_defect=False)
    with pytest.raises(ThreecadError, match="no normal class folder"):
        import_folder(src, tmp_path / "o1", normal=["nominal"])
    (src / "MT_Scratch" / "sub" / "d0.png").unlink()
    with pytest.raises(ThreecadError, match="d0.jpg: defective image has no mask"):
        import_folder(src, tmp_path / "o2", normal=["Free"])
    assert not (tmp_path / "o2").exists()  # nothing written on failure
    src = _make_source(tmp_path / "src2", empty_defect=True)
    with pytest.raises(ThreecadError, match="d3.png: defective image has an empty mask"):
        import_folder(src, tmp_path / "o3", normal=["Free"], empty_masks="error")
    Image.fromarray(np.full((24, 32), 255, np.uint8)).save(src / "Free" / "n05.png")
    with pytest.raises(ThreecadError, match="n05.png: normal image has a non-empty mask"):
        import_folder(src, tmp_path / "o4", normal=["Free"])
    (tmp_path / "o5").mkdir()
    (tmp_path / "o5" / "keep.txt").write_text("x")
    with pytest.raises(ThreecadError, match="not empty; pass --overwrite"):
        import_folder(src, tmp_path / "o5", normal=["Free"])
    assert (tmp_path / "o5" / "keep.txt").exists()


def test_magnetic_tile_preset(magnetic_tile, tmp_path):
    result = CliRunner().invoke(cli, ["data", "import-folder", str(magnetic_tile), str(tmp_path / "mt"),
                                      "--preset", "magnetic-tile", "--link"])
    assert result.exit_code == 0, result.output
    # independent count of the source: images per class, and defect masks that are empty at > 127
    expected = {}
    for cls in sorted(p for p in magnetic_tile.iterdir() if p.is_dir()):
        images = sorted((cls / "Imgs").glob("*.jpg"))
        if cls.name == "MT_Free":
            expected["good"] = len(images)
        else:
            expected[cls.name[3:].lower()] = sum((np.asarray(Image.open(p.with_suffix(".png"))) > 127).any() for p in images)
    root = tmp_path / "mt"
    train = list_samples(root, "Magnetic_Tile", "train")
    test = list_samples(root, "Magnetic_Tile", "test")
    assert len(train) == round(0.7 * expected["good"])
    assert len(train) + sum(s.label == 0 for s in test) == expected["good"]
    for defect, n in expected.items():
        if defect != "good":
            assert sum(s.defect == defect for s in test) == n
    assert all(s.label == 0 for s in train)
