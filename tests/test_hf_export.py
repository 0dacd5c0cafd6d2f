"""export-hf: export, delete the source, reload the parquet shards and compare every pixel (offline)."""

from __future__ import annotations

import shutil

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import cli
from threecad.dataset.catalog import CATEGORY_FOLDERS
from threecad.dataset.layout import list_categories, list_samples
from threecad.dataset.masks import read_mask
from threecad.errors import ThreecadError
from threecad.ingest.hf_export import export_hf


@pytest.fixture
def source(synth_root, tmp_path):
    """A private copy with a validation split carved from train (so the source can be deleted)."""
    root = shutil.copytree(synth_root, tmp_path / "src")
    for cat in list_categories(root):
        (root / cat / "validation" / "good").mkdir(parents=True)
        for path in sorted((root / cat / "train" / "good").iterdir())[:3]:
            path.rename(root / cat / "validation" / "good" / path.name)
    return root


def _expected(root):
    """Every pixel of the source, read with PIL directly (independent of the exporter)."""
    table = {}
    for cat in list_categories(root):
        for split in ("train", "validation", "test"):
            for s in list_samples(root, cat, split):
                image = np.asarray(Image.open(s.image_path))
                mask = read_mask(s.mask_path) if s.label else None
                table[s.image_path.relative_to(root).as_posix()] = (split, image, mask, s.label, cat, s.defect)
    return table


def _check(dataset_dict, expected):
    seen = 0
    for split, ds in dataset_dict.items():
        names = ds.features["category"].names
        assert ds.features["label"].names == ["good", "defect"]
        assert names[: len(CATEGORY_FOLDERS)] == list(CATEGORY_FOLDERS)
        for row in ds:
            exp_split, image, mask, label, cat, defect = expected[row["path"]]
            assert split == exp_split and row["label"] == label and names[row["category"]] == cat
            assert row["defect"] == defect
            assert np.array_equal(np.asarray(row["image"]), image)
            if mask is None:
                assert row["mask"] is None and row["defect_types"] == []
            else:
                assert np.array_equal(np.asarray(row["mask"]) > 0, mask) and mask.any()
                assert defect in row["defect_types"]
            seen += 1
    assert seen == len(expected)


def test_round_trip_after_deleting_the_source(source, tmp_path):
    expected = _expected(source)
    result = export_hf(source, tmp_path / "hf", max_shard_mb=0.05)  # tiny shards: several per split
    assert set(result.rows) == {"train", "validation", "test"}
    assert len(result.shards["test"]) > 1
    shutil.rmtree(source)
    files = {split: [str(tmp_path / "hf" / f) for f in shards] for split, shards in result.shards.items()}
    # the parquet shards hold the bytes themselves, not paths to the deleted files
    table = pq.read_table(files["test"][0], columns=["image"])
    assert all(cell["bytes"] for cell in table.column("image").to_pylist())
    reloaded = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache"))
    _check(reloaded, expected)
    _check(datasets.load_from_disk(str(tmp_path / "hf" / "disk")), expected)
    # the folder itself loads through its card's YAML (the layout the Hub serves)
    by_card = datasets.load_dataset(str(tmp_path / "hf"), cache_dir=str(tmp_path / "cache2"))
    assert {k: len(v) for k, v in by_card.items()} == result.rows
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\n") and "license: unknown" in card and "state no licence" in card
    assert "path: data/validation-*.parquet" in card


def test_metadata_and_cli(synth_root, tmp_path):
    meta = tmp_path / "meta.csv"
    cat = list_categories(synth_root)[0]
    sample = next(s for s in list_samples(synth_root, cat, "test") if s.label)
    rel = sample.image_path.relative_to(synth_root).as_posix()
    meta.write_text(f"image_path,defect_types,source_path,x0,y0,x1,y1\n{sample.image_path},a;b,raw/scan7.png,5,6,70,80\n")
    result = CliRunner().invoke(cli, ["data", "export-hf", str(synth_root), str(tmp_path / "hf"), "--category", cat,
                                      "--metadata", str(meta), "--no-disk"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "hf" / "disk").exists()
    ds = datasets.load_dataset("parquet", data_files={"test": str(tmp_path / "hf" / "data" / "test-*.parquet")},
                               cache_dir=str(tmp_path / "c"))["test"]
    row = next(r for r in ds if r["path"] == rel)
    assert row["defect_types"] == ["a", "b"] and row["source_path"] == "raw/scan7.png" and row["box"] == [5, 6, 70, 80]
    assert {ds.features["category"].names[c] for c in ds["category"]} == {cat}
    again = CliRunner().invoke(cli, ["data", "export-hf", str(synth_root), str(tmp_path / "hf")])
    assert again.exit_code == 1 and "not empty; pass --overwrite" in again.output
    with pytest.raises(ThreecadError, match="outside the dataset folder"):
        export_hf(synth_root, synth_root / "export")
