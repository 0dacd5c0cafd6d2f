"""The package skeleton: CLI conventions, atomic writes, layout, loaders and the synthetic dataset."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import cli
from threecad.dataset.layout import detect_mask_style, list_categories, list_samples
from threecad.dataset.loaders import AnomalyDataset
from threecad.dataset.masks import read_mask
from threecad.errors import ThreecadError
from threecad.io import atomic_write, read_image
from threecad.synth.dataset import SynthDatasetConfig, make_synthetic_dataset
from threecad.synth.surface import defect_polygon, paint_defect, polygon_mask, render_surface


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_help_lists_groups():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for group in ("synth", "data"):
        assert group in result.output


def test_user_error_is_one_line_exit_1(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "synth", "dataset", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "not empty" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "x" / "f").read_text() == "keep"


def test_usage_error_exit_2():
    result = CliRunner().invoke(cli, ["synth", "dataset", "out", "--size", "0x5"])
    assert result.exit_code == 2


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as handle:
        handle.write("new partial")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_read_image_rejects_corrupt_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ThreecadError, match="bad.png"):
        read_image(bad)


def test_synthetic_dataset_deterministic_and_consistent(tmp_path, synth_root):
    config = SynthDatasetConfig(categories=2, train=12, test_good=6, test_defect=10, size=(128, 128))
    again = make_synthetic_dataset(tmp_path / "again", seed=7, config=config)
    assert _tree_digest(again) == _tree_digest(synth_root)
    other = make_synthetic_dataset(tmp_path / "other", seed=8, config=config)
    assert _tree_digest(other) != _tree_digest(synth_root)

    assert list_categories(synth_root) == ["Aluminum_Camera_Cover", "Aluminum_Ipad"]
    for category in list_categories(synth_root):
        assert detect_mask_style(synth_root / category) == "3cad"
        assert len(list_samples(synth_root, category, "train")) == 12
        test = list_samples(synth_root, category, "test")
        assert sum(s.label for s in test) == 10 and len(test) == 16
        for sample in test:
            if sample.label:
                mask = read_mask(sample.mask_path)
                image = read_image(sample.image_path)
                assert mask.shape == image.shape[:2]
                assert mask.any(), sample.mask_path


def test_painted_defects_differ_from_clean_surface():
    rng = np.random.default_rng(3)
    for kind, channels in (("brushed", 1), ("milled", 3)):
        for dtype in ("scratch", "bump", "pinhole", "discoloration", "dirt"):
            clean = render_surface(rng, 200, 300, kind, "aluminum", channels)
            painted = clean.copy()
            mask = polygon_mask(defect_polygon(rng, dtype, 200, 300), 200, 300)
            paint_defect(painted, mask, dtype, rng)
            diff = np.abs(np.rint(np.clip(painted, 0, 255)) - np.rint(np.clip(clean, 0, 255)))
            if diff.ndim == 3:
                diff = diff.max(axis=2)
            assert mask.sum() > 0
            assert (diff[mask] > 0).all(), (kind, dtype)
            assert (diff[~mask] == 0).all(), (kind, dtype)


def test_mvtec_masks_and_loader(tmp_path):
    config = SynthDatasetConfig(categories=1, train=2, test_good=1, test_defect=2, size=(64, 48), vary_size=False,
                                mask_style="mvtec")
    root = make_synthetic_dataset(tmp_path / "mv", seed=1, config=config)
    cat = list_categories(root)[0]
    assert detect_mask_style(root / cat) == "mvtec"
    ds = AnomalyDataset(root, cat, "test", size=32, resize="squash")
    item = next(ds[i] for i in range(len(ds)) if ds[i]["label"] == 1)
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert 0 < item["mask"].sum() and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    native = AnomalyDataset(root, cat, "test", size=None, resize="native")
    assert native[0]["image"].shape == (3, 48, 64)


@pytest.mark.parametrize("values", [(0, 255), (0, 1)])
def test_read_mask_binarises_01_and_0255(tmp_path, values):
    array = np.zeros((10, 12), np.uint8)
    array[2:5, 3:7] = values[1]
    path = tmp_path / "m.png"
    Image.fromarray(array).save(path)
    mask = read_mask(path, expected_size=(12, 10))
    assert mask.sum() == 12 and mask[2:5, 3:7].all()
    with pytest.raises(ThreecadError, match="differs"):
        read_mask(path, expected_size=(10, 10))
    Image.fromarray(np.stack([array] * 3, -1)).save(tmp_path / "rgb.png")
    with pytest.raises(ThreecadError, match="single-channel"):
        read_mask(tmp_path / "rgb.png")
