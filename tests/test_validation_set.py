"""Validation sets with synthetic anomalies: defect-like anomaly kinds, layout and determinism."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from scipy import ndimage

from threecad.dataset.layout import list_samples
from threecad.dataset.masks import read_mask
from threecad.errors import ThreecadError
from threecad.io import read_image
from threecad.synth.anomalies import dark_spot, edge_chip, shaded_region
from threecad.synth.validation import KINDS, make_validation_set


def _surface(seed: int = 0, shape=(96, 160)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gray = ndimage.gaussian_filter(rng.uniform(0.3, 0.7, shape), 2).astype(np.float32)
    return np.repeat(gray[..., None], 3, axis=2)


@pytest.mark.parametrize("seed", range(5))
def test_dark_spot_darkens_one_small_blob_and_nothing_far_from_it(seed):
    image = _surface(seed)
    out, mask = dark_spot(image, np.random.default_rng(seed))
    assert mask.any() and ndimage.label(mask)[1] == 1 and mask.mean() <= 0.03
    far = ~ndimage.binary_dilation(mask, structure=np.ones((3, 3)), iterations=5)  # the rim is 4 px wide
    assert np.array_equal(out[far], image[far])
    core = ndimage.binary_erosion(mask, iterations=2)
    if core.any():
        ratio = out[core][:, 0] / image[core][:, 0]
        assert 0.29 <= ratio.min() and ratio.max() <= 0.75


@pytest.mark.parametrize("seed", range(5))
def test_edge_chip_replaces_material_at_one_border(seed):
    image = _surface(seed)
    out, mask = edge_chip(image, np.random.default_rng(seed))
    assert mask.any()
    border = mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
    assert border
    assert np.array_equal(out[~mask], image[~mask])
    assert out[mask].max() <= 0.2


@pytest.mark.parametrize("seed", range(5))
def test_shaded_region_is_one_large_faint_blob_with_a_bounded_rim(seed):
    image = _surface(seed)
    out, mask = shaded_region(image, np.random.default_rng(seed))
    assert mask.any() and ndimage.label(mask)[1] == 1 and 0.05 < mask.mean() <= 0.4
    # the rim is a Gaussian of sigma 0.02 * 96 px, truncated at 4 sigma: 8 px
    far = ~ndimage.binary_dilation(mask, structure=np.ones((3, 3)), iterations=9)
    assert np.array_equal(out[far], image[far])
    assert not np.array_equal(out[mask], image[mask])
    core = ndimage.binary_erosion(mask, iterations=8)
    if core.any():  # fully inside: the drawn 12-30 % change, give or take the grain
        change = np.median(out[core][:, 0] / image[core][:, 0]) - 1.0
        assert 0.1 <= abs(change) <= 0.32


@pytest.fixture()
def with_validation(synth_root, tmp_path):
    """A copy of one synthetic category whose first training images serve as validation normals."""
    category = "Aluminum_Ipad"
    root = tmp_path / "data"
    shutil.copytree(synth_root / category, root / category)
    val = root / category / "validation" / "good"
    val.mkdir(parents=True)
    for sample in list_samples(root, category, "train")[:4]:
        shutil.move(sample.image_path, val / sample.image_path.name)
    return root, category


def test_validation_set_layout_and_determinism(with_validation, tmp_path):
    root, category = with_validation
    normals = list_samples(root, category, "validation")
    out = make_validation_set(root, category, tmp_path / "a", seed=3)
    base = out / category
    assert sorted(p.name for p in (base / "test").iterdir()) == sorted(["good", *KINDS])
    for sample in normals:
        original = read_image(sample.image_path, "RGB")
        assert np.array_equal(read_image(base / "test" / "good" / f"{sample.stem}.png", "RGB"), original)
        for kind in KINDS:
            image = read_image(base / "test" / kind / f"{sample.stem}_{kind}.png", "RGB")
            mask = read_mask(base / "ground_truth" / kind / f"{sample.stem}_{kind}.png")
            assert mask.shape == original.shape[:2] and mask.any()
            assert not np.array_equal(image, original)
            if kind == "edge":  # outside its mask an edge chip changes nothing
                assert np.array_equal(image[~mask], original[~mask])
    again = make_validation_set(root, category, tmp_path / "b", seed=3)
    only_dark = make_validation_set(root, category, tmp_path / "c", seed=3, kinds=("dark",))
    for path in sorted((base / "test").rglob("*.png")):
        rel = path.relative_to(out)
        assert (again / rel).read_bytes() == path.read_bytes()
        if path.parent.name in ("dark", "good"):  # other kinds do not change a kind's draws
            assert (only_dark / rel).read_bytes() == path.read_bytes()


def test_validation_set_errors(with_validation, synth_root, tmp_path):
    root, category = with_validation
    with pytest.raises(ThreecadError, match="unknown validation anomaly kind"):
        make_validation_set(root, category, tmp_path / "x", kinds=("scratchy",))
    with pytest.raises(ThreecadError, match="no validation/good images"):
        make_validation_set(synth_root, category, tmp_path / "y")
    make_validation_set(root, category, tmp_path / "z", kinds=("dark",))
    with pytest.raises(ThreecadError, match="not empty"):
        make_validation_set(root, category, tmp_path / "z", kinds=("dark",))
