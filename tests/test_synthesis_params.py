"""The synthesis parameter sets of CFRG, DRAEM and DeSTSeg (``threecad.synth.anomalies``): one code, each
method's draws. CFRG's samples are pinned (its results must not move), DRAEM's clean and rotated
shares and texture augmenters are counted over many draws, DeSTSeg's samples are always anomalous
with grey-filled rotations, and the augmenters and the rotation are checked against their
definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from smooth_images import SmoothImages

from threecad.errors import ThreecadError
from threecad.synth.anomalies import (
    CFRG_SYNTHESIS,
    DRAEM_SYNTHESIS,
    GREY_FILL,
    TEXTURE_AUGMENTERS,
    SynthesisParams,
    SyntheticAnomalyDataset,
    TextureBank,
    augment_texture,
    collate,
    destseg_synthesis,
    perlin_mask,
    rotate_image,
)


class _Gray(torch.utils.data.Dataset):
    """Grayscale ramps, one brightness per index."""

    def __init__(self, n: int, size: int = 32):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        ramp = torch.linspace(0.2, 0.6, self.size)[None, :].expand(self.size, -1) + 0.001 * (index % 100)
        return {"image": torch.stack([ramp] * 3).contiguous(), "path": f"{index}.png", "category": "c"}


def _bank() -> TextureBank:
    return TextureBank(procedural_probability=1.0, pool_size=8)


# ------------------------------------------------------------------------------------------ CFRG
def test_cfrg_samples_are_pinned():
    """The draws of CFRG's parameter set, recorded when the other methods' parameters were added: a
    change of draw order or count (which would change CFRG's training) fails here."""
    data = SyntheticAnomalyDataset(SmoothImages(4, size=64), seed=11)
    explicit = SyntheticAnomalyDataset(SmoothImages(4, size=64), seed=11, params=CFRG_SYNTHESIS)
    assert data.params == CFRG_SYNTHESIS
    got = []
    for epoch in (0, 3):
        data.set_epoch(epoch)
        explicit.set_epoch(epoch)
        for i in range(4):
            a, b = data[i], explicit[i]
            assert torch.equal(a["augmented"], b["augmented"]) and torch.equal(a["image"], SmoothImages(4, 64)[i]["image"])
            assert not a["clean"] and a["image_angle"] == 0.0 and a["augmenters"] == ()
            got.append((int(a["mask"].sum()), round(a["beta"], 6), round(a["angle"], 4), a["cells"],
                        round(float(a["augmented"].double().sum()), 3)))
    assert got == PINNED_CFRG


#: (mask pixels, beta, mask angle, lattice cells, sum of the augmented image) of items 0-3 in epochs
#: 0 and 3, seed 11: identical before and after DRAEM's and DeSTSeg's parameters were added.
PINNED_CFRG = [
    (196, 0.053951, 18.2697, (16, 4), 6361.209), (0, 0.552529, 61.849, (4, 1), 6304.113),
    (198, 0.131382, 44.6927, (16, 8), 6306.712), (357, 0.082507, -63.4941, (8, 1), 6245.002),
    (202, 0.078063, -89.735, (2, 32), 6283.506), (210, 0.577312, -15.2223, (32, 32), 6353.18),
    (22, 0.338291, 1.2022, (1, 2), 6303.119), (215, 0.442694, -58.0653, (16, 16), 6279.289),
]


def test_a_parameter_switched_off_draws_nothing():
    """DRAEM's parameters with its extras switched off give CFRG's samples exactly."""
    off = SynthesisParams(clean_probability=0.0, texture_augmenters=0, rotate_probability=0.0, rotate_angle=90.0)
    a = SyntheticAnomalyDataset(SmoothImages(4, size=32), seed=2)
    b = SyntheticAnomalyDataset(SmoothImages(4, size=32), seed=2, params=off)
    assert all(torch.equal(a[i]["augmented"], b[i]["augmented"]) for i in range(4))
    # the legacy keywords override the fields they name
    c = SyntheticAnomalyDataset(SmoothImages(4, size=32), seed=2, params=DRAEM_SYNTHESIS, clean_probability=0.0,
                                max_beta=0.5)
    assert c.params.clean_probability == 0.0 and c.params.beta == (0.0, 0.5) and c.params.texture_augmenters == 3


# ------------------------------------------------------------------------------------------ DRAEM
def test_draem_clean_share_rotation_share_and_augmenters():
    data = SyntheticAnomalyDataset(_Gray(600), _bank(), seed=0, params=DRAEM_SYNTHESIS)
    items = [data[i] for i in range(len(data))]
    clean = np.mean([item["clean"] for item in items])
    rotated = np.mean([item["image_angle"] != 0.0 for item in items])
    assert 0.44 < clean < 0.56  # 50 % clean (binomial sd 2 %)
    assert 0.24 < rotated < 0.36  # 30 % of normal images rotated
    angles = [item["image_angle"] for item in items if item["image_angle"]]
    assert -90 <= min(angles) < -60 and 60 < max(angles) <= 90
    for item in items:
        if item["clean"]:
            assert torch.equal(item["augmented"], item["image"]) and item["mask"].sum() == 0
        else:
            assert len(item["augmenters"]) == 3 and len(set(item["augmenters"])) == 3
            outside = item["mask"][0] == 0
            assert torch.equal(item["augmented"][:, outside], item["image"][:, outside])
    used = {name for item in items for name in item["augmenters"]}
    assert used == set(TEXTURE_AUGMENTERS)
    # the rotated normal image is the clean target: black corners, and the augmented image shares them
    index = next(i for i, item in enumerate(items) if 20 < abs(item["image_angle"]) < 70)
    assert float(items[index]["image"][:, 0, 0].abs().sum()) == 0.0
    assert not torch.equal(items[index]["image"], _Gray(600)[index]["image"])


def test_mask_parameters_are_honoured():
    rng = np.random.default_rng(0)
    for _ in range(30):
        mask, draw = perlin_mask((64, 64), rng, threshold=0.3, scales=(2, 3), max_angle=10.0)
        assert {draw.cells[0], draw.cells[1]} <= {4, 8} and abs(draw.angle) <= 10.0
    coarse = np.mean([perlin_mask((64, 64), np.random.default_rng(s), threshold=0.2)[0].mean() for s in range(40)])
    fine = np.mean([perlin_mask((64, 64), np.random.default_rng(s), threshold=0.5)[0].mean() for s in range(40)])
    assert coarse > 2 * fine  # a lower threshold marks more of the image
    data = SyntheticAnomalyDataset(_Gray(50), _bank(), seed=1, params=SynthesisParams(beta=(0.6, 0.7)))
    assert all(0.6 <= data[i]["beta"] < 0.7 for i in range(50))


# ------------------------------------------------------------------------------------------ DeSTSeg
@pytest.mark.parametrize("rotation", ["none", "small", "right"])
def test_destseg_is_always_anomalous_without_texture_augmentation(rotation):
    data = SyntheticAnomalyDataset(_Gray(200), _bank(), seed=4, params=destseg_synthesis(rotation))
    items = [data[i] for i in range(len(data))]
    assert not any(item["clean"] for item in items) and all(item["augmenters"] == () for item in items)
    assert np.mean([item["mask"].sum() > 0 for item in items]) > 0.85  # empty masks only by chance (~5 %)
    angles = np.array([item["image_angle"] for item in items])
    if rotation == "none":
        assert not angles.any()
        return
    small = angles - 90.0 * np.round(angles / 90.0)
    assert np.abs(small).max() <= 5.0 and np.abs(small).min() < 1.0 and np.abs(small).max() > 4.0
    quarter_turns = set(np.round(angles / 90.0).astype(int) % 4)
    assert quarter_turns == ({0, 1, 2, 3} if rotation == "right" else {0})
    # a tilt of more than 4.5 degrees moves every corner's source more than a pixel out of the frame
    tilted = [item for item, tilt in zip(items, small) if abs(tilt) > 4.5]
    assert tilted
    for item in tilted:
        torch.testing.assert_close(item["image"][:, 0, 0], torch.full((3,), GREY_FILL), rtol=0, atol=1e-6)


def test_unknown_rotation_and_bad_parameters_are_refused():
    with pytest.raises(ThreecadError, match="upside"):
        destseg_synthesis("upside")
    for bad, name in (({"clean_probability": 1.5}, "clean_probability"), ({"beta": (0.8, 0.2)}, "beta"),
                      ({"texture_augmenters": 11}, "texture_augmenters"), ({"scales": (3, 1)}, "scales"),
                      ({"rotate_fill": 2.0}, "rotate_fill")):
        with pytest.raises(ThreecadError, match=name):
            SynthesisParams(**bad)


# ------------------------------------------------------------------------------------------ building blocks
def test_rotate_image_matches_a_quarter_turn_and_fills_outside():
    image = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(rotate_image(image, 90.0), np.rot90(image, 1, axes=(0, 1)), atol=1e-5)
    assert rotate_image(image, 0.0) is image
    turned = rotate_image(image, 45.0, 0.25)
    assert turned.shape == image.shape and turned.dtype == np.float32
    for corner in (turned[0, 0], turned[0, -1], turned[-1, 0], turned[-1, -1]):
        np.testing.assert_allclose(corner, 0.25, rtol=1e-6)


def test_augmenters_follow_their_definitions():
    rng = np.random.default_rng(3)
    texture = rng.random((24, 20, 3)).astype(np.float32) * 0.6 + 0.2
    out = {name: np.clip(fn(texture, np.random.default_rng(7)), 0, 1) for name, fn in TEXTURE_AUGMENTERS.items()}
    for name, result in out.items():
        assert result.shape == texture.shape, name
        if name != "solarize":  # it fires with probability 0.5 only (below)
            assert not np.allclose(result, texture, atol=1e-3), name
    np.testing.assert_allclose(out["invert"], 1 - texture, atol=1e-6)
    # brightness changes luminance only: channel differences are kept where nothing clipped
    diff = out["brightness"] - texture
    np.testing.assert_allclose(diff[..., 0], diff[..., 1], atol=1e-5)
    np.testing.assert_allclose(diff[..., 1], diff[..., 2], atol=1e-5)
    # solarize: half the time, the values at or above one threshold in [32, 128] / 255 are inverted
    fired, full = 0, rng.random((24, 20, 3)).astype(np.float32)
    for seed in range(40):
        solar = TEXTURE_AUGMENTERS["solarize"](full, np.random.default_rng(seed))
        inverted = ~np.isclose(solar, full, atol=1e-6)
        np.testing.assert_allclose(solar[inverted], 1 - full[inverted], atol=1e-6)
        if inverted.any():
            fired += 1
            assert full[~inverted].max() < full[inverted].min()  # one threshold
            assert 32 / 255 <= full[inverted].min() and full[~inverted].max() < 128 / 255
    assert 10 < fired < 30
    # posterize keeps the top 1..8 bits of each 8-bit value
    q = np.round(texture * 255).astype(int)
    kept = []
    for seed in range(12):
        levels = np.round(TEXTURE_AUGMENTERS["posterize"](texture, np.random.default_rng(seed)) * 255).astype(int)
        kept += [b for b in range(1, 9) if np.array_equal(levels, (q >> (8 - b)) << (8 - b))]
    assert len(kept) == 12 and len(set(kept)) > 3
    # gamma: per-channel power laws with exponents in [0.5, 2]
    exponents = np.log(out["gamma"].reshape(-1, 3)).mean(0) / np.log(texture.reshape(-1, 3)).mean(0)
    assert np.all((exponents > 0.45) & (exponents < 2.1))
    augmented, names = augment_texture(texture, np.random.default_rng(1), 3)
    again, names2 = augment_texture(texture, np.random.default_rng(1), 3)
    assert len(set(names)) == 3 and names == names2 and np.array_equal(augmented, again)
    assert augmented.dtype == np.float32 and 0.0 <= augmented.min() and augmented.max() <= 1.0
    same, none = augment_texture(texture, rng, 0)
    assert same is texture and none == ()


def test_collate_stacks_one_size_and_refuses_mixed_sizes():
    data = SyntheticAnomalyDataset(_Gray(3), _bank(), seed=0)
    batch = collate([data[i] for i in range(3)])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {"image": (3, 3, 32, 32), "augmented": (3, 3, 32, 32),
                                                             "mask": (3, 1, 32, 32)}
    other = SyntheticAnomalyDataset(_Gray(1, size=64), _bank(), seed=0)
    with pytest.raises(ThreecadError, match="one image size"):
        collate([data[0], other[0]])
