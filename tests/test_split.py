"""Seeded, group-aware, stratified splits and ``3cad data split``."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from threecad.dataset.layout import list_samples
from threecad.dataset.manifest import read_manifest
from threecad.dataset.split import Group, assign_splits, split_dataset
from threecad.errors import ThreecadError
from threecad.ingest.preprocess import preprocess
from threecad.synth.raw import make_raw_dataset


def _groups():
    groups = [Group(f"A/n{i}", "A", False) for i in range(20)] + [Group(f"B/n{i}", "B", False) for i in range(7)]
    groups += [Group(f"A/d{i}", "A", True, "scratch" if i % 3 else "dent") for i in range(12)]
    return groups


def test_assign_splits_proportions_determinism_and_stability():
    groups = _groups()
    a = assign_splits(groups, 0.7, 0.25, 0.5, seed=1)
    assert a == assign_splits(list(reversed(groups)), 0.7, 0.25, 0.5, seed=1)  # order does not matter
    assert a != assign_splits(groups, 0.7, 0.25, 0.5, seed=2)
    count = pd.Series(a).groupby(lambda k: (k[0], k[2], a[k])).size()
    assert count[("A", "n", "train")] + count[("A", "n", "validation")] == round(0.7 * 20) == 14
    assert count[("A", "n", "validation")] == round(0.25 * 14) == 4 and count[("A", "n", "test")] == 6
    assert count[("B", "n", "train")] + count[("B", "n", "validation")] == 5  # round(4.9)
    assert not any(a[g.key] == "train" for g in groups if g.defective)  # train holds only normal groups
    by_type = {t: [a[g.key] for g in groups if g.defective and g.stratum == t] for t in ("scratch", "dent")}
    assert by_type["scratch"].count("validation") == 4 and by_type["dent"].count("validation") == 2  # stratified
    # Adding a category never reshuffles another one.
    more = assign_splits([*groups, Group("C/n0", "C", False)], 0.7, 0.25, 0.5, seed=1)
    assert all(more[k] == v for k, v in a.items())
    with pytest.raises(ThreecadError, match="train_fraction"):
        assign_splits(groups, 1.5)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("pool")
    raw = make_raw_dataset(base / "raw", seed=2, categories=2, images=8, size=(260, 200), large=0)
    preprocess(raw, base / "pre", tile=128)
    return base / "pre"


def test_split_of_a_tile_pool_is_group_aware_and_materialises(pool, tmp_path):
    out = tmp_path / "split"
    summary = split_dataset(pool, out, seed=4, train_fraction=0.6, val_fraction=0.5, val_defect_fraction=0.5, materialize="hardlink")
    manifest = read_manifest(out / "manifest.parquet")
    original = read_manifest(pool / "manifest.parquet")
    assert len(manifest) == len(original) == summary["images"]
    assert (manifest.groupby(["category", "source"])["split"].nunique() == 1).all()  # never both sides
    assert set(manifest["split"]) == {"train", "validation", "test"}
    assert (manifest.loc[manifest["split"] == "train", "label"] == 0).all()
    csv = read_manifest(out / "manifest.csv")
    assert list(csv["image"]) == list(manifest["image"]) and list(csv["label"]) == list(manifest["label"])
    listed = set()
    for category in manifest["category"].unique():
        for split in ("train", "validation", "test"):
            for s in list_samples(out, category, split):
                listed.add(s.image_path.relative_to(out).as_posix())
                if s.label:
                    assert s.mask_path.exists()
    assert listed == set(manifest["image"])
    row = manifest.iloc[0]
    assert os.stat(out / row["image"]).st_ino == os.stat(row["pool_image"]).st_ino  # a hard link, no copy
    again = tmp_path / "again"
    split_dataset(pool / "manifest.csv", again, seed=4, train_fraction=0.6, val_fraction=0.5, val_defect_fraction=0.5)
    assert list(read_manifest(again / "manifest.parquet")["split"]) == list(manifest["split"])
    with pytest.raises(ThreecadError, match="not empty"):
        split_dataset(pool, out)


def test_split_of_a_folder_with_clashing_names_copies(synth_root, tmp_path):
    out = tmp_path / "folder_split"
    split_dataset(synth_root, out, seed=0, train_fraction=0.5, materialize="copy")
    manifest = read_manifest(out / "manifest.parquet")
    category = manifest["category"].iloc[0]
    n_before = sum(len(list_samples(synth_root, category, s)) for s in ("train", "test"))
    n_after = sum(len(list_samples(out, category, s)) for s in ("train", "validation", "test"))
    assert n_before == n_after == (manifest["category"] == category).sum()  # 0000.png of train and test both kept
    assert all(not s.label for s in list_samples(out, category, "train"))
    normals = manifest[(manifest["category"] == category) & (manifest["label"] == 0)]
    assert (normals["split"] == "train").sum() == round(0.5 * len(normals))


def test_cli_split_matches_the_function(pool, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    result = CliRunner().invoke(cli, ["-q", "data", "split", str(pool), str(tmp_path / "c"), "--seed", "4", "--val-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    split_dataset(pool, tmp_path / "f", seed=4, val_fraction=0.5)
    assert (tmp_path / "c" / "manifest.csv").read_bytes() == (tmp_path / "f" / "manifest.csv").read_bytes()
    assert "source groups" in result.output
