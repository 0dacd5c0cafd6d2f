"""stats: Table-1 statistics and the Fig.-3 values, checked by hand and against scikit-image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage.measure import label, regionprops

from cli import cli
from threecad.dataset.layout import list_categories, list_samples
from threecad.dataset.masks import read_mask
from threecad.dataset.stats import dataset_stats


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def handmade(tmp_path):
    root = tmp_path / "hand"
    cat = root / "Widget"
    for i, (h, w) in enumerate([(30, 50), (45, 20)]):
        _save(cat / "train" / "good" / f"t{i}.png", np.zeros((h, w), np.uint8))
    _save(cat / "test" / "good" / "g0.png", np.zeros((35, 35), np.uint8))
    mask = np.zeros((40, 60), np.uint8)
    mask[5:10, 10:30] = 255  # 5 high, 20 wide: aspect 4
    mask[10, 30] = 255  # touches the rectangle's corner only: same region with 8-connectivity
    mask[20:30, 40:45] = 255  # 10 high, 5 wide: aspect 0.5
    _save(cat / "test" / "scratch" / "a.png", np.zeros((40, 60), np.uint8))
    _save(cat / "ground_truth" / "scratch" / "a.png", mask)
    single = np.zeros((50, 50), np.uint8)
    single[0:50, 0:25] = 255
    _save(cat / "test" / "dent" / "b.png", np.zeros((50, 50), np.uint8))
    _save(cat / "ground_truth" / "dent" / "b.png", single)
    return root


def test_handmade_values(handmade):
    report = dataset_stats(handmade)
    (c,) = report.categories
    assert (c.train, c.validation, c.test_good, c.test_defect, c.defect_types) == (2, 0, 1, 2, 2)
    assert c.height == (30, 50) and c.width == (20, 60)
    assert c.regions == (1, 2)
    assert c.types_per_image is None  # no metadata: the folder layout cannot tell
    assert sorted(report.area_ratios["Widget"]) == pytest.approx(sorted([151 / 2400, 0.5]))
    # rectangle+corner pixel: 6 high (rows 5-10), 21 wide (cols 10-30); the block 10x5; the half 50x25
    assert sorted(report.aspect_ratios["Widget"]) == pytest.approx(sorted([21 / 6, 5 / 10, 25 / 50]))
    assert "| Widget | 2 | 0 | 3 | 1 | 2 | 2 | 30-50 | 20-60 | 1-2 | - |" in report.table()


def test_matches_scikit_image_on_synthetic_data(synth_root):
    report = dataset_stats(synth_root)
    for c in report.categories:
        areas, aspects, regions = [], [], []
        for s in list_samples(synth_root, c.category, "test"):
            if not s.label:
                continue
            mask = read_mask(s.mask_path)
            labelled = label(mask, connectivity=2)
            props = regionprops(labelled)
            regions.append(len(props))
            areas.append(mask.sum() / mask.size)
            aspects += [(p.bbox[3] - p.bbox[1]) / (p.bbox[2] - p.bbox[0]) for p in props]
        assert report.area_ratios[c.category] == pytest.approx(areas)
        assert sorted(report.aspect_ratios[c.category]) == pytest.approx(sorted(aspects))
        assert c.regions == (min(regions), max(regions))
        assert c.types_per_image is not None and c.types_per_image[0] >= 1  # from synth_dataset.json


def test_cli_writes_histograms(synth_root, tmp_path):
    out = tmp_path / "st"
    result = CliRunner().invoke(cli, ["data", "stats", str(synth_root), "--out", str(out), "--json",
                                      str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("| category |")
    for name in ("defect_area_ratio.png", "bbox_aspect_ratio.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 300
    data = json.loads((tmp_path / "s.json").read_text())
    assert [c["category"] for c in data["categories"]] == list_categories(synth_root)
