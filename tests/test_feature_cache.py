"""The frozen-feature cache (``threecad.methods.feature_cache``): values equal to fresh encoder
calls, the memory bound and its two fall-backs, determinism, collation. Lite0 on 32-64 px images."""

from __future__ import annotations

import pytest
import torch
from smooth_images import SmoothImages

from threecad.errors import ThreecadError
from threecad.methods import feature_cache
from threecad.methods.feature_cache import CHUNK, FeatureCache, batch_features, collate

pytestmark = pytest.mark.usefixtures("one_thread")


class Counting:
    """An encoder that counts the images it ran on."""

    def __init__(self, encoder):
        self.encoder, self.images = encoder, 0

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.images += len(images)
        return self.encoder(images)


def _images(data) -> torch.Tensor:
    return torch.stack([data[i]["image"] for i in range(len(data))])


def test_cached_features_equal_fresh_encoder_calls(lite_teacher):
    data = SmoothImages(CHUNK + 5, size=32)  # two chunks, the second one short
    encoder = Counting(lite_teacher)
    cache = FeatureCache(data, encoder)
    assert cache.mode == "memory" and len(cache) == len(data)
    assert encoder.images == len(data)  # every image through the encoder exactly once
    images = _images(data)
    chunks = [lite_teacher(images[:CHUNK]), lite_teacher(images[CHUNK:])]
    fresh = [torch.cat(levels) for levels in zip(*chunks)]
    assert cache.shapes == [tuple(f.shape[1:]) for f in fresh] == [(24, 8, 8), (40, 4, 4), (112, 2, 2)]
    assert cache.nbytes == 4 * len(data) * sum(f[0].numel() for f in fresh)
    for i in range(len(data)):
        got = cache[i]["features"]
        assert all(torch.equal(g, f[i]) for g, f in zip(got, fresh))  # the same chunks: the same bits
        single = lite_teacher(images[i:i + 1])
        for g, s in zip(got, single):  # another batching: float rounding at most
            torch.testing.assert_close(g, s[0], rtol=1e-4, atol=1e-5)
    # deterministic: a rebuilt cache (as in a resumed process) holds the same bits
    again = FeatureCache(data, lite_teacher)
    assert all(torch.equal(a, b) for i in range(len(data)) for a, b in zip(again[i]["features"], cache[i]["features"]))
    encoder.images = 0
    batch = collate([cache[i] for i in (3, 0, 7)])
    assert [tuple(f.shape) for f in batch["features"]] == [(3, 24, 8, 8), (3, 40, 4, 4), (3, 112, 2, 2)]
    assert all(torch.equal(b, f[[3, 0, 7]]) for b, f in zip(batch_features(batch, encoder), fresh))
    assert encoder.images == 0  # cached batches never run the encoder


def test_over_the_memory_bound_a_memory_mapped_file_holds_the_same_bits(lite_teacher, tmp_path):
    data = SmoothImages(6, size=32)
    memory = FeatureCache(data, lite_teacher)
    disk = FeatureCache(data, lite_teacher, memory_gb=0.0, spill_dir=tmp_path)
    assert disk.mode == "disk" and disk.nbytes == memory.nbytes > 0
    assert not list(tmp_path.iterdir())  # the spill file is unlinked from the start
    for i in range(len(data)):
        assert all(torch.equal(a, b) for a, b in zip(disk[i]["features"], memory[i]["features"]))
    disk.close()
    assert disk.mode == "off" and set(disk[0]) == {"image"}


def test_without_room_anywhere_the_features_are_recomputed(lite_teacher, monkeypatch, caplog):
    data = SmoothImages(5, size=32)
    cached = FeatureCache(data, lite_teacher)

    class Full:
        free = 0

    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda path: Full())
    off = FeatureCache(data, lite_teacher, memory_gb=0.0)
    assert off.mode == "off" and off.nbytes == 0 and "recomputed every epoch" in caplog.text
    assert set(off[2]) == {"image"} and torch.equal(off[2]["image"], data[2]["image"])
    batch = collate([off[i] for i in range(5)])
    assert tuple(batch["image"].shape) == (5, 3, 32, 32)
    recomputed = batch_features(batch, lite_teacher)  # the step runs the encoder itself
    for level, cache_level in zip(recomputed, collate([cached[i] for i in range(5)])["features"]):
        torch.testing.assert_close(level, cache_level, rtol=1e-4, atol=1e-5)
    disabled = FeatureCache(data, Counting(lite_teacher), enabled=False)
    assert disabled.mode == "off" and set(disabled[0]) == {"image"}


def test_one_image_size_per_cache(lite_teacher):
    class Mixed(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return {"image": torch.rand(3, 32, 32 if index < 2 else 64)}

    with pytest.raises(ThreecadError, match="one image size"):
        FeatureCache(Mixed(), lite_teacher)
    with pytest.raises(ThreecadError, match="one image size"):
        collate([Mixed()[i] for i in range(3)])
