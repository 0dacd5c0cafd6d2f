"""Loaders: robust mask binarisation, both layouts, manifests and the anomalib Tabular table."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from threecad.dataset.layout import list_categories, list_samples
from threecad.dataset.loaders import AnomalyDataset, collect_samples, iter_samples
from threecad.dataset.manifest import image_metadata, samples_from_manifest
from threecad.dataset.masks import read_mask
from threecad.dataset.tabular import tabular_frame, write_tabular
from threecad.dataset.transforms import EXPOSURE_TARGET, normalize_exposure, target_size
from threecad.errors import ThreecadError
from threecad.synth.dataset import SynthDatasetConfig, make_synthetic_dataset


def _save(path, array, mode=None):
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path)
    return path


def test_read_mask_encodings(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.random((20, 30)) > 0.6
    # 0/255 and 0/1 grayscale
    assert np.array_equal(read_mask(_save(tmp_path / "a.png", truth.astype(np.uint8) * 255)), truth)
    assert np.array_equal(read_mask(_save(tmp_path / "b.png", truth.astype(np.uint8))), truth)
    # anti-aliased: a smooth 0..255 ramp must be cut at > 127, exactly like numpy
    ramp = (np.linspace(0, 255, 20 * 30).reshape(20, 30)).astype(np.uint8)
    assert np.array_equal(read_mask(_save(tmp_path / "c.png", ramp)), ramp > 127)
    # mode '1'
    assert np.array_equal(read_mask(_save(tmp_path / "d.png", truth, "1")), truth)
    # palette whose colour 0 is white and colour 1 black: the index, not the colour, decides
    pal = Image.fromarray(truth.astype(np.uint8), mode="P")
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * (256 * 3 - 6))
    pal.save(tmp_path / "e.png")
    assert Image.open(tmp_path / "e.png").mode == "P"
    assert np.array_equal(read_mask(tmp_path / "e.png"), truth)


def test_read_mask_errors_name_the_file(tmp_path):
    rgb = _save(tmp_path / "rgb.png", np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ThreecadError, match="rgb.png.*single-channel"):
        read_mask(rgb)
    gray = _save(tmp_path / "g.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(ThreecadError, match="g.png.*5x4 differs.*6x4"):
        read_mask(gray, expected_size=(6, 4))
    with pytest.raises(ThreecadError, match="missing.png.*not found"):
        read_mask(tmp_path / "missing.png")


def test_target_size_modes():
    assert target_size(400, 200, 256, "squash") == (256, 256)
    assert target_size(400, 200, 256, "aspect") == (256, 128)
    assert target_size(201, 402, 100, "aspect") == (50, 100)
    assert target_size(400, 200, 256, "native") == (400, 200)
    with pytest.raises(ThreecadError, match="unknown resize"):
        target_size(4, 4, 4, "crop")


def test_mvtec_and_3cad_layouts_load_the_same_masks(tmp_path):
    cfg = dict(categories=1, train=2, test_good=1, test_defect=3, size=(48, 48))
    a = make_synthetic_dataset(tmp_path / "a", seed=3, config=SynthDatasetConfig(**cfg, mask_style="3cad"))
    b = make_synthetic_dataset(tmp_path / "b", seed=3, config=SynthDatasetConfig(**cfg, mask_style="mvtec"))
    cat = list_categories(a)[0]
    masks_b = sorted(p.name for p in (b / cat / "ground_truth").rglob("*.png"))
    assert masks_b and all(name.endswith("_mask.png") for name in masks_b)
    items_a = list(iter_samples(a, cat, "test", size=None, resize="native"))
    items_b = list(iter_samples(b, cat, "test", size=None, resize="native"))
    assert [x["label"] for x in items_a] == [x["label"] for x in items_b]
    for x, y in zip(items_a, items_b, strict=True):
        assert np.array_equal(x["mask"], y["mask"])
        assert x["mask"].any() == bool(x["label"])


def test_tabular_round_trip(synth_root, tmp_path):
    for name in ("table.csv", "table.parquet"):
        out = write_tabular(synth_root, tmp_path / name)
        frame = pd.read_csv(out) if name.endswith("csv") else pd.read_parquet(out)
        assert list(frame.columns[:4]) == ["image_path", "label_index", "split", "mask_path"]
        expected = collect_samples(synth_root, None, None)
        assert len(frame) == len(expected)
        assert set(frame["split"]) <= {"train", "val", "test"}
        # anomalib's convention: normal rows have an empty mask path, abnormal ones a path
        normal = frame["label_index"] == 0
        assert (frame.loc[normal, "mask_path"].fillna("") == "").all()
        assert (frame.loc[~normal, "mask_path"].str.len() > 0).all()
        back = samples_from_manifest(out)
        key = lambda s: (s.image_path.resolve(), s.mask_path.resolve() if s.mask_path else None,  # noqa: E731
                         s.label, s.category, s.defect, s.split)
        assert sorted(map(key, back)) == sorted(map(key, expected))


def test_manifest_relative_paths_and_validation_alias(synth_root, tmp_path):
    cat = list_categories(synth_root)[0]
    samples = list_samples(synth_root, cat, "train")[:3] + list_samples(synth_root, cat, "test")
    frame = tabular_frame(samples, relative_to=synth_root)
    frame.loc[0, "split"] = "val"
    path = tmp_path / "m.csv"
    frame.to_csv(path, index=False)
    moved = samples_from_manifest(path, root=synth_root)
    assert moved[0].split == "validation" and moved[0].image_path == samples[0].image_path
    assert [s.image_path for s in samples_from_manifest(path, split="test", root=synth_root)] == [
        s.image_path for s in samples if s.split == "test"
    ]


def test_dataset_from_manifest_matches_folder(synth_root, tmp_path):
    cat = list_categories(synth_root)[1]
    table = write_tabular(synth_root, tmp_path / "t.csv", category=cat)
    folder = AnomalyDataset(synth_root, cat, "test", size=64)
    manifest = AnomalyDataset(table, cat, "test", size=64)
    assert len(folder) == len(manifest) > 0
    for i in range(len(folder)):
        a, b = folder[i], manifest[i]
        assert a["path"] == b["path"] and a["label"] == b["label"] and a["defect"] == b["defect"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["image"].shape == (3, 64, 64) and a["mask"].shape == (1, 64, 64)


def test_manifest_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"path": ["x.png"]}).to_csv(bad, index=False)
    with pytest.raises(ThreecadError, match=r"bad.csv.*no image_path \(or image\) column"):
        samples_from_manifest(bad)
    pd.DataFrame({"image_path": ["x.png"], "label": ["maybe"]}).to_csv(bad, index=False)
    with pytest.raises(ThreecadError, match="row 2: unknown label 'maybe'"):
        samples_from_manifest(bad)
    pd.DataFrame({"image_path": ["x.png"], "label_index": [1]}).to_csv(bad, index=False)
    with pytest.raises(ThreecadError, match="row 2: defective image without a mask_path"):
        samples_from_manifest(bad)
    pd.DataFrame({"image_path": ["x.png"], "split": ["holdout"]}).to_csv(bad, index=False)
    with pytest.raises(ThreecadError, match="unknown split 'holdout'"):
        samples_from_manifest(bad)
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(ThreecadError, match="unknown manifest format"):
        samples_from_manifest(tmp_path / "t.txt")


def test_image_metadata_from_the_synth_manifest(synth_root):
    meta = image_metadata(synth_root)
    defective = [s for c in list_categories(synth_root) for s in list_samples(synth_root, c, "test") if s.label]
    assert defective
    for sample in defective:
        types = meta[sample.image_path.relative_to(synth_root).as_posix()]["defect_types"]
        assert sample.defect in types  # the folder is the largest of the image's types


def test_preprocess_manifest_format_loads(synth_root, tmp_path):
    """The preprocess/split manifest (threecad.dataset.manifest: image/mask/label/source/x0..y1) reads as it is."""
    from threecad.dataset.manifest import COLUMNS, write_manifest

    cat = list_categories(synth_root)[0]
    samples = list_samples(synth_root, cat, "train") + list_samples(synth_root, cat, "test")
    rows = []
    for i, s in enumerate(samples):
        rows.append({c: "" for c in COLUMNS} | {
            "category": cat, "split": s.split, "label": s.label, "defect": s.defect,
            "defect_types": "" if s.label == 0 else f"{s.defect};extra", "region_count": 0, "defect_area": 0,
            "source": f"raw/{i}.png", "x0": i, "y0": 2 * i, "x1": i + 10, "y1": 2 * i + 10, "width": 10, "height": 10,
            "image": s.image_path.relative_to(synth_root).as_posix(),
            "mask": s.mask_path.relative_to(synth_root).as_posix() if s.label else "",
        })
    parquet, csv = write_manifest(pd.DataFrame(rows, columns=list(COLUMNS)), tmp_path / "manifest")
    for table in (parquet, csv):
        back = samples_from_manifest(table, root=synth_root)
        assert [(s.image_path, s.mask_path, s.label, s.split, s.defect) for s in back] == [
            (s.image_path, s.mask_path, s.label, s.split, s.defect) for s in samples
        ]
    meta = image_metadata(synth_root, csv)
    assert meta == {}  # the table's paths are relative to the dataset root, not to tmp_path
    inside = tmp_path / "ds"
    shutil.copytree(synth_root / cat, inside / cat)
    shutil.copyfile(parquet, inside / "manifest.parquet")
    meta = image_metadata(inside)
    sample = next(s for s in samples if s.label)
    rel = sample.image_path.relative_to(synth_root).as_posix()
    i = samples.index(sample)
    assert meta[rel] == {"defect_types": [sample.defect, "extra"], "source_path": f"raw/{i}.png",
                         "box": [i, 2 * i, i + 10, 2 * i + 10]}
    dataset = AnomalyDataset(inside / "manifest.parquet", cat, "test", size=32)
    assert len(dataset) == sum(s.split == "test" for s in samples)


def test_normalize_exposure_removes_a_global_gain():
    rng = np.random.default_rng(0)
    dark = rng.uniform(0.1, 0.3, (32, 48, 3)).astype(np.float32)
    bright = dark * 1.8  # the same surface at a longer exposure (no clipping)
    a, b = normalize_exposure(dark), normalize_exposure(bright)
    assert a.dtype == np.float32 and np.allclose(a, b, atol=1e-6)
    assert a.mean() == pytest.approx(EXPOSURE_TARGET, rel=1e-5)
    # local contrast is kept: the ratio of two pixels does not change
    assert a[3, 5, 0] / a[7, 9, 0] == pytest.approx(dark[3, 5, 0] / dark[7, 9, 0], rel=1e-5)
    as_uint8 = normalize_exposure(np.round(dark * 255).astype(np.uint8))
    assert as_uint8.dtype == np.uint8 and abs(as_uint8.mean() - EXPOSURE_TARGET * 255) < 1.0
    # values past the valid range are clipped, black images and "raw" are left alone
    spiky = np.full((4, 4), 0.1, np.float32)
    spiky[0, 0] = 1.0
    assert normalize_exposure(spiky).max() == 1.0
    black = np.zeros((4, 4), np.uint8)
    assert np.array_equal(normalize_exposure(black), black)
    assert normalize_exposure(dark, "raw") is dark
    with pytest.raises(ThreecadError, match="exposure mode"):
        normalize_exposure(dark, "histogram")


def test_dataset_exposure_mode(synth_root):
    category = list_categories(synth_root)[0]
    raw = AnomalyDataset(synth_root, category, "train", size=64)[0]["image"]
    mean = AnomalyDataset(synth_root, category, "train", size=64, exposure="mean")[0]["image"]
    assert abs(float(mean.mean()) - EXPOSURE_TARGET) < 2 / 255
    expected = normalize_exposure(np.round(raw.numpy() * 255).astype(np.uint8)).astype(np.float32) / 255
    assert torch.allclose(mean, torch.from_numpy(expected))
    item = next(iter_samples(synth_root, category, "train", size=64, exposure="mean"))
    assert abs(item["image"].mean() - EXPOSURE_TARGET * 255) < 2
    with pytest.raises(ThreecadError, match="exposure mode"):
        AnomalyDataset(synth_root, category, "train", exposure="auto")
