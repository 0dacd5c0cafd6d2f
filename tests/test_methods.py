"""PatchCore, PaDiM and their pieces, each checked against an independent reference.

Most tests use a tiny seeded convolutional extractor in place of the pretrained backbone, so they
test the method maths, not ImageNet features; one test uses the real offline backbone on the
synthetic dataset.
"""

from __future__ import annotations

import json
import re
from unittest.mock import patch

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score

import baselines.calibration as calibration_module
import baselines.features as features_module
from baselines.aggregation import (
    gaussian_blur,
    local_aggregate,
    top_fraction_mean,
    upsample_maps,
)
from baselines.coreset import chunked_greedy_coreset, greedy_coreset
from baselines.knn import nearest_neighbors
from baselines.padim import PaDiM, mahalanobis
from baselines.patchcore import PAPER_SETTINGS, PatchCore
from threecad.dataset.layout import Sample
from threecad.dataset.loaders import AnomalyDataset
from threecad.errors import ThreecadError
from threecad.methods import INPUT_OPTIONS, available, build, get_method, load_method, native_size_maps


class FakeExtractor:
    """A seeded random conv layer pooled to strides 4/8/16: cheap, deterministic, position-aware."""

    def __init__(self, layers):
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.randn(12, 3, 3, 3, generator=generator)
        self.layers = list(layers)

    def __call__(self, images):
        x = F.relu(F.conv2d(images * 2 - 1, self.weight, padding=1))
        out = {"stride4": F.avg_pool2d(x, 4)}
        out["stride8"] = F.avg_pool2d(out["stride4"], 2)[:, :8]
        out["stride16"] = F.avg_pool2d(out["stride8"], 2)
        return {name: out[name] for name in self.layers}


@pytest.fixture
def fake_backbone(monkeypatch):
    monkeypatch.setattr(features_module, "build_extractor", lambda backbone, layers, weights, device: FakeExtractor(layers))


class ImageList(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "path": f"img{i}"}


def _pc(**options) -> PatchCore:
    """PatchCore in the paper's configuration (the tests of its parts), with ``options`` over it."""
    return PatchCore(**{**PAPER_SETTINGS, **options})


def _images(n, h=64, w=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.linspace(0.3, 0.7, w).expand(3, h, w)
    return [(base + 0.05 * torch.randn(3, h, w, generator=generator)).clamp(0, 1) for _ in range(n)]


# ---------------------------------------------------------------------------- registry and config
def test_registry_lists_and_builds_both_methods():
    assert {"patchcore", "padim"} <= set(available())
    assert isinstance(build("patchcore"), PatchCore)
    assert isinstance(build("padim", n_features=10), PaDiM)


def test_unknown_option_and_method_are_clear_errors():
    with pytest.raises(ThreecadError, match="no option.*coreset_raito.*valid:.*coreset_ratio"):
        build("patchcore", coreset_raito=0.1)
    with pytest.raises(ThreecadError, match="unknown method 'nope'"):
        build("nope")
    with pytest.raises(ThreecadError, match="coreset_ratio"):
        build("patchcore", coreset_ratio=0.0)


def test_none_is_accepted_only_where_the_option_allows_it():
    # max_patches: int | None (None = every patch a coreset candidate); sigma: float only.
    assert build("patchcore", max_patches=None).max_patches is None
    assert build("patchcore", coreset_chunk=1000).coreset_chunk == 1000
    with pytest.raises(ThreecadError, match="option sigma takes a number >= 0, got None"):
        build("patchcore", sigma=None)


@pytest.mark.parametrize("name", ["patchcore", "padim", "cfrg"])
def test_every_option_is_declared_once_and_its_default_is_allowed(name):
    cls = get_method(name)
    # nothing inferred: every option declared, by the method or (the input options) by the framework
    assert set(cls.OPTIONS) | set(INPUT_OPTIONS) == set(cls.config_keys())
    assert set(cls.OPTIONS).isdisjoint(INPUT_OPTIONS) or name == "cfrg"  # cfrg declares its own size
    build(name)  # the defaults pass their own declarations
    assert any(o.predict for o in cls.OPTIONS.values()) and not all(o.predict for o in cls.OPTIONS.values())


@pytest.mark.parametrize("name, key, value, allowed", [
    ("patchcore", "topk", 1.5, "a number in [0, 1]"),
    ("patchcore", "feature_dim", 0, "a whole number >= 1 or null"),
    ("patchcore", "sigma", -1, "a number >= 0"),
    ("patchcore", "coreset_ratio", 0, "a number in (0, 1]"),
    ("patchcore", "max_patches", 2.5, "a whole number >= 1 or null"),
    ("patchcore", "layers", [], "a non-empty list of texts"),
    ("padim", "sigma", -1, "a number >= 0"),
    ("padim", "n_features", 0, "a whole number >= 1 or null"),
    ("padim", "eps", float("nan"), "a number >= 0"),
    ("cfrg", "size", 48, "a whole number >= 0, a multiple of 32 or null"),
    ("cfrg", "lr", 0, "a number > 0"),
    ("cfrg", "clean_probability", 1.2, "a number in [0, 1]"),
    ("cfrg", "map_terms", "recovery+colour", "a +-joined choice of recovery, segmentation, distillation"),
    ("cfrg", "epochs", True, "a whole number >= 1"),
])
def test_out_of_range_options_fail_at_build_with_option_value_and_range(name, key, value, allowed):
    with pytest.raises(ThreecadError) as info:
        build(name, **{key: value})
    assert str(info.value) == f"method {name!r} option {key} takes {allowed}, got {value!r}"


def _saved_run(tmp_path, name, **config):
    """A fitted run folder of ``name`` on tiny images (CFRG: a random teacher, not trained)."""
    method = build(name, device="cpu", **config)
    if name == "cfrg":
        method._build()
    else:
        method.fit(ImageList(_images(4, 64, 64)))
    return method.save(tmp_path / name)


@pytest.mark.parametrize("name, key, value", [
    ("patchcore", "coreset_ratio", 0.5),
    ("patchcore", "backbone", "resnet18"),
    ("patchcore", "num_neighbors", 3),
    ("padim", "n_features", 4),
    ("padim", "layers", ["stride8"]),
    ("cfrg", "epochs", 3),
    ("cfrg", "teacher", "wide_resnet50_2"),
])
def test_a_fit_time_option_cannot_change_at_predict(fake_backbone, tmp_path, name, key, value):
    config = {"teacher": "efficientnet_lite0", "teacher_weights": "random", "size": 64} if name == "cfrg" else {}
    run = _saved_run(tmp_path, name, **config)
    with pytest.raises(ThreecadError) as info:
        load_method(run, **{key: value})
    message = str(info.value)
    assert message.startswith(f"{run}: {key} is fixed when the method is fitted") and "retrain to change it" in message
    saved = load_method(run).get_config()[key]
    assert load_method(run, **{key: saved}).get_config()[key] == saved  # the fitted value itself is fine


@pytest.mark.parametrize("name, key, value", [
    ("patchcore", "sigma", -1),
    ("padim", "topk", 2),
    ("cfrg", "map_terms", "segmentation+noise"),
])
def test_an_inference_override_out_of_range_names_the_run(fake_backbone, tmp_path, name, key, value):
    config = {"teacher": "efficientnet_lite0", "teacher_weights": "random", "size": 64} if name == "cfrg" else {}
    run = _saved_run(tmp_path, name, **config)
    pattern = rf"^{re.escape(str(run))}: method '{name}' option {key} takes .*, got {re.escape(repr(value))}$"
    with pytest.raises(ThreecadError, match=pattern):
        load_method(run, **{key: value})


@pytest.mark.parametrize("name, key, value", [
    ("patchcore", "sigma", 0.0),
    ("padim", "sigma", 0.0),
    ("cfrg", "map_terms", "segmentation"),
])
def test_a_valid_inference_override_changes_the_maps_and_not_the_run(fake_backbone, tmp_path, name, key, value):
    config = {"teacher": "efficientnet_lite0", "teacher_weights": "random", "size": 64} if name == "cfrg" else {}
    run = _saved_run(tmp_path, name, **config)
    before = (run / "config.json").read_bytes()
    images = torch.stack(_images(2, 64, 64, seed=5))
    _, plain = load_method(run).predict(images)
    changed = load_method(run, **{key: value})
    assert getattr(changed, key) == value
    _, other = changed.predict(images)
    assert other.shape == plain.shape and not np.allclose(other, plain)
    assert (run / "config.json").read_bytes() == before


def test_methods_never_rewrite_their_options(fake_backbone, tmp_path, monkeypatch):
    for name in ("patchcore", "padim"):
        method = build(name, device="cpu")
        before = method.get_config()
        method.fit(ImageList(_images(3, 48, 48)))
        method.predict(torch.stack(_images(1, 48, 48)))
        assert method.get_config() == before
    # CFRG falls back to the offline Lite0 teacher without the WideResNet file: its option still says
    # what was asked, the saved run says what was built, and reloads it.
    monkeypatch.setenv("THREECAD_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_hub"))
    cfrg = build("cfrg", device="cpu", teacher="wide_resnet50_2")
    cfrg._build()
    assert cfrg.teacher == "wide_resnet50_2" and cfrg.get_config()["teacher"] == "wide_resnet50_2"
    assert cfrg.resolved_config() == {"teacher": "efficientnet_lite0"}
    run = cfrg.save(tmp_path / "cfrg")
    assert load_method(run).teacher == "efficientnet_lite0"
    _, maps = cfrg.predict(torch.rand(1, 3, 64, 64))  # size None: the input's side, not stored as an option
    assert maps.shape == (1, 64, 64) and cfrg.size is None


def test_unfitted_predict_is_a_clear_error(fake_backbone):
    with pytest.raises(ThreecadError, match="not fitted"):
        _pc(device="cpu").predict(torch.rand(1, 3, 32, 32))
    with pytest.raises(ThreecadError, match="not fitted"):
        PaDiM(device="cpu").predict(torch.rand(1, 3, 32, 32))


# ---------------------------------------------------------------------------- building blocks
def _brute_force_k_center(points: np.ndarray, n: int, first: int) -> list[int]:
    chosen = [first]
    min_d = cdist(points, points[[first]], "sqeuclidean")[:, 0]
    while len(chosen) < n:
        nxt = int(np.argmax(min_d))
        chosen.append(nxt)
        min_d = np.minimum(min_d, cdist(points, points[[nxt]], "sqeuclidean")[:, 0])
    return chosen


def test_coreset_equals_brute_force_greedy_k_center():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(300, 6)).astype(np.float32)
    got = greedy_coreset(torch.from_numpy(points), 25, projection_dim=None, seed=5).tolist()
    assert got == _brute_force_k_center(points.astype(np.float64), 25, got[0])
    again = greedy_coreset(torch.from_numpy(points), 25, projection_dim=None, seed=5).tolist()
    assert again == got  # deterministic for a seed


def test_projected_coreset_covers_nearly_as_well():
    rng = np.random.default_rng(4)
    points = rng.normal(size=(2000, 256)).astype(np.float32)
    exact = greedy_coreset(torch.from_numpy(points), 50, projection_dim=None).numpy()
    projected = greedy_coreset(torch.from_numpy(points), 50, projection_dim=64).numpy()
    assert len(set(projected.tolist())) == 50

    def radius(idx):
        return cdist(points, points[idx]).min(1).max()

    # Greedy k-center is a 2-approximation; the JL projection costs a small factor on top.
    assert radius(projected) <= 1.25 * radius(exact)
    random_subset = rng.choice(len(points), 50, replace=False)
    assert radius(exact) < radius(random_subset)


def test_chunked_coreset_is_greedy_per_chunk_with_proportional_shares():
    rng = np.random.default_rng(6)
    points = rng.normal(size=(250, 5)).astype(np.float32)
    got = chunked_greedy_coreset(torch.from_numpy(points), 30, chunk_size=100, projection_dim=None, seed=2)
    assert len(got) == 30 and len(set(got.tolist())) == 30
    # ceil(250 / 100) = 3 near-equal chunks [0, 84), [84, 167), [167, 250): shares 10.08, 9.96, 9.96
    # -> 10 each; every chunk is brute-force greedy k-center on its own points.
    bounds = [(0, 84), (84, 167), (167, 250)]
    pieces = np.split(got.numpy(), [10, 20])
    for (lo, hi), piece in zip(bounds, pieces):
        assert ((piece >= lo) & (piece < hi)).all()
        local = (piece - lo).tolist()
        assert local == _brute_force_k_center(points[lo:hi].astype(np.float64), 10, local[0])
    # No chunking (None, or a chunk at least as large as the data) is the global greedy pass.
    whole = greedy_coreset(torch.from_numpy(points), 30, projection_dim=None, seed=2).tolist()
    assert chunked_greedy_coreset(torch.from_numpy(points), 30, None, None, 2).tolist() == whole
    assert chunked_greedy_coreset(torch.from_numpy(points), 30, 250, None, 2).tolist() == whole


def test_chunked_coreset_shares_follow_largest_remainders():
    points = torch.from_numpy(np.random.default_rng(7).normal(size=(10, 3)).astype(np.float32))
    got = chunked_greedy_coreset(points, 5, chunk_size=4, projection_dim=None).numpy()
    # chunks [0, 4), [4, 7), [7, 10): exact shares 2.0, 1.5, 1.5 -> 2, 2, 1 (ties: first chunk first)
    assert [int(((got >= lo) & (got < hi)).sum()) for lo, hi in [(0, 4), (4, 7), (7, 10)]] == [2, 2, 1]


@pytest.mark.parametrize("k", [1, 3])
def test_chunked_knn_equals_cdist(k):
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(257, 16)).astype(np.float32)
    bank = rng.normal(size=(1001, 16)).astype(np.float32)
    ref = cdist(queries.astype(np.float64), bank.astype(np.float64))
    ref_idx = np.argsort(ref, axis=1)[:, :k]
    # 4 KB blocks: forces many query and bank chunks.
    dist, idx = nearest_neighbors(torch.from_numpy(queries), torch.from_numpy(bank), k=k, block_bytes=4096)
    np.testing.assert_allclose(dist.numpy(), np.take_along_axis(ref, ref_idx, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)


def test_gaussian_blur_matches_scipy():
    rng = np.random.default_rng(2)
    maps = rng.random((2, 50, 70)).astype(np.float32)
    got = gaussian_blur(torch.from_numpy(maps), sigma=4.0).numpy()
    for i in range(2):
        ref = gaussian_filter(maps[i].astype(np.float64), sigma=4.0, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(got[i], ref, atol=1e-5)


def test_local_aggregate_is_neighbourhood_mean():
    rng = np.random.default_rng(5)
    feature = rng.random((1, 2, 6, 7)).astype(np.float32)
    got = local_aggregate(torch.from_numpy(feature), 3).numpy()
    for y in range(6):
        for x in range(7):
            window = feature[0, :, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
            np.testing.assert_allclose(got[0, :, y, x], window.mean(axis=(1, 2)), rtol=1e-6)


def test_mahalanobis_matches_scipy():
    from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

    rng = np.random.default_rng(6)
    positions, channels = 5, 4
    mean = rng.normal(size=(positions, channels))
    a = rng.normal(size=(positions, channels, channels))
    inv = np.linalg.inv(a @ a.transpose(0, 2, 1) + np.eye(channels))
    x = rng.normal(size=(3, positions, channels))
    got = mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(inv)).numpy()
    ref = [[scipy_mahalanobis(x[b, p], mean[p], inv[p]) for p in range(positions)] for b in range(3)]
    np.testing.assert_allclose(got, ref, rtol=1e-10)


# ---------------------------------------------------------------------------- PaDiM maths
def test_padim_gaussians_match_numpy(fake_backbone):
    images = _images(9, 32, 48)
    model = PaDiM(layers=("stride4", "stride8"), n_features=7, eps=0.01, device="cpu", batch_size=4).fit(
        ImageList(images)
    )
    extractor = FakeExtractor(["stride4", "stride8"])
    stack = torch.stack(images)
    f4, f8 = (v.double() for v in extractor(stack).values())
    fused = torch.cat([f4, F.interpolate(f8, size=f4.shape[-2:], mode="bilinear", align_corners=False)], 1)
    chosen = fused[:, model.channel_index].flatten(2).numpy()  # (N, k, P)
    assert len(model.channel_index) == 7 and model.grid == (8, 12)
    for p in (0, 17, 95):
        x = chosen[:, :, p]
        cov = np.cov(x, rowvar=False, ddof=1) + 0.01 * np.eye(7)
        np.testing.assert_allclose(model.mean[p].numpy(), x.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model.inv_cov[p].numpy(), np.linalg.inv(cov), rtol=1e-3, atol=1e-3)
    # A test image's patch score is its Mahalanobis distance at the training grid's position.
    test = _images(1, 32, 48, seed=9)[0][None]
    scores, maps = model.predict(test)
    assert maps.shape == (1, 32, 48) and scores[0] == pytest.approx(maps[0].max())


def test_padim_refuses_mixed_sizes(fake_backbone):
    with pytest.raises(ThreecadError, match="resize 'squash'"):
        PaDiM(device="cpu", batch_size=1).fit(ImageList(_images(2, 32, 32) + _images(2, 48, 32)))
    model = PaDiM(device="cpu").fit(ImageList(_images(3, 32, 32)))
    with pytest.raises(ThreecadError, match="feature grid"):
        model.predict(torch.rand(1, 3, 64, 64))


# ---------------------------------------------------------------------------- PatchCore behaviour
def test_patchcore_scores_are_nearest_bank_distances(fake_backbone):
    model = _pc(device="cpu", coreset_ratio=0.5, sigma=0.0).fit(ImageList(_images(4, 48, 48)))
    test = torch.stack(_images(2, 48, 48, seed=4))
    patches = model.embed(test)
    ref = cdist(patches.reshape(-1, patches.shape[-1]).double().numpy(), model.memory_bank.double().numpy()).min(1)
    scores, maps = model.predict(test)
    np.testing.assert_allclose(scores, ref.reshape(2, -1).max(1), rtol=1e-4)
    assert maps.shape == (2, 48, 48)


def test_patchcore_feature_dim_averages_adjacent_channels(fake_backbone):
    images = torch.stack(_images(2, 32, 48))
    full = _pc(device="cpu").embed(images).double().numpy()  # 8 + 8 = 16 channels at stride 8
    assert full.shape[-1] == 16
    got = _pc(device="cpu", feature_dim=6).embed(images).double().numpy()
    # adaptive average pooling over channels: bin i covers [floor(i C / d), ceil((i + 1) C / d))
    expected = np.stack([full[..., i * 16 // 6 : -(-(i + 1) * 16 // 6)].mean(-1) for i in range(6)], -1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert _pc(device="cpu", feature_dim=64).embed(images).shape[-1] == 16  # never widened


def test_patchcore_num_neighbors_averages_the_k_nearest_bank_distances(fake_backbone):
    model = _pc(device="cpu", coreset_ratio=1.0, sigma=0.0, num_neighbors=3).fit(ImageList(_images(3, 32, 32)))
    test = torch.stack(_images(1, 32, 32, seed=5))
    patches = model.embed(test).reshape(-1, model.memory_bank.shape[1]).double().numpy()
    d = np.sort(cdist(patches, model.memory_bank.double().numpy()), axis=1)[:, :3].mean(1)
    scores, _ = model.predict(test)
    assert scores[0] == pytest.approx(d.max(), rel=1e-4)
    assert not np.isclose(d.max(), np.sort(cdist(patches, model.memory_bank.double().numpy()), 1)[:, 0].max())


def test_patchcore_defaults_are_the_validated_settings(fake_backbone):
    """Defaults: every training patch a candidate, 10 % kept per 20k-patch chunk, brightness channel
    200, calibration on 100 images, top-3 % score, exposure mean. 24 images of 256 px give 24 x 32 x 32
    = 24,576 patches at stride 8: two chunks, so the chunk size and the absence of a random subset
    both show in the bank."""
    model = PatchCore(device="cpu")
    assert (model.topk, model.intensity_weight, model.calibration_images, model.max_patches,
            model.coreset_chunk, model.exposure) == (0.03, 200.0, 100, None, 20_000, "mean")
    images = _images(24, 256, 256)
    model.fit(ImageList(images))
    patches = model.embed(torch.stack(images)).reshape(-1, model.memory_bank.shape[1])
    assert len(patches) == 24_576 and patches.shape[1] == 17  # 16 feature channels + brightness
    index = chunked_greedy_coreset(patches, round(0.1 * len(patches)), 20_000, 128, 0)
    torch.testing.assert_close(model.memory_bank, patches[index])
    assert model.baseline is not None and model.baseline.by_position.shape == (32, 32)
    scores, maps = model.predict(torch.stack(images[:2]))
    np.testing.assert_allclose(scores, top_fraction_mean(torch.from_numpy(maps), 0.03).numpy(), rtol=1e-5)


def test_patchcore_chunked_bank_is_the_chunked_coreset_of_all_patches(fake_backbone):
    images = ImageList(_images(4, 48, 48))
    model = _pc(device="cpu", coreset_ratio=0.25, max_patches=None, coreset_chunk=100).fit(images)
    patches = torch.cat([model.embed(torch.stack(_images(4, 48, 48)))]).reshape(-1, model.memory_bank.shape[1])
    index = chunked_greedy_coreset(patches, round(0.25 * len(patches)), 100, model.projection_dim, model.seed)
    torch.testing.assert_close(model.memory_bank, patches[index])
    assert len(patches) == 144  # 4 images x 6 x 6 patches: two chunks, not one global pass
    whole = greedy_coreset(patches, len(index), model.projection_dim, model.seed)
    assert sorted(whole.tolist()) != sorted(index.tolist())
    with pytest.raises(ThreecadError, match="coreset_chunk"):
        _pc(coreset_chunk=0)
    with pytest.raises(ThreecadError, match="coreset_chunk"):
        _pc(coreset_chunk="many")


def test_patchcore_reweighting_follows_the_formula(fake_backbone):
    model = _pc(device="cpu", coreset_ratio=1.0, reweight=True, reweight_neighbors=3)
    model.fit(ImageList(_images(3, 32, 32)))
    plain = _pc(device="cpu", coreset_ratio=1.0)
    plain.load_state_dict(model.state_dict())
    test = torch.stack(_images(1, 32, 32, seed=8))
    reweighted, _ = model.predict(test)
    raw, _ = plain.predict(test)
    patches = model.embed(test)[0].reshape(-1, model.memory_bank.shape[1]).double().numpy()
    bank = model.memory_bank.double().numpy()
    d = cdist(patches, bank)
    worst = d.min(1).argmax()
    star = d[worst].argmin()
    hood = np.argsort(cdist(bank[[star]], bank)[0])[:4]
    weight = 1 - np.exp(d[worst, star]) / np.exp(d[worst, hood]).sum()
    assert reweighted[0] == pytest.approx(raw[0] * weight, rel=1e-4)
    assert 3 / 4 <= weight < 1


def test_patchcore_calibration_is_the_leave_one_out_mean_score_map(fake_backbone):
    images = _images(4, 48, 48)
    model = _pc(device="cpu", coreset_ratio=1.0, max_patches=None, calibration_images=10)
    model.fit(ImageList(images))
    feats = [model.embed(img[None])[0].reshape(-1, model.memory_bank.shape[1]).double().numpy() for img in images]
    loo = [cdist(f, np.concatenate([g for j, g in enumerate(feats) if j != i])).min(1) for i, f in enumerate(feats)]
    expected = np.mean(loo, 0).reshape(6, 6)
    np.testing.assert_allclose(model.baseline.by_position.numpy(), expected - expected.mean(), atol=1e-4)


def test_patchcore_calibration_corrects_every_map_by_position(fake_backbone, tmp_path):
    model = _pc(device="cpu", coreset_ratio=0.5, sigma=0.0, topk=0.05, calibration_images=3)
    model.fit(ImageList(_images(5, 48, 64)))
    assert model.baseline.by_position.shape == (6, 8) and abs(float(model.baseline.by_position.mean())) < 1e-5
    plain = _pc(device="cpu", coreset_ratio=0.5, sigma=0.0, topk=0.05)
    plain.load_state_dict(model.state_dict())
    test = torch.stack(_images(2, 48, 64, seed=3))
    scores, maps = model.predict(test)
    raw_scores, raw_maps = plain.predict(test)
    shift = upsample_maps(model.baseline.by_position[None], (48, 64), 0.0)[0].numpy()
    np.testing.assert_allclose(raw_maps - maps, np.stack([shift, shift]), atol=1e-4)
    np.testing.assert_allclose(scores, top_fraction_mean(torch.from_numpy(maps), 0.05).numpy(), rtol=1e-5)
    assert not np.allclose(scores, raw_scores)
    model.save(tmp_path / "run")
    loaded = load_method(tmp_path / "run")
    np.testing.assert_array_equal(loaded.predict(test)[1], maps)
    off = load_method(tmp_path / "run", calibration_images=0)  # switched off at predict time, no refit
    np.testing.assert_allclose(off.predict(test)[1], raw_maps)
    assert model.predict(torch.rand(1, 3, 96, 64))[1].shape == (1, 96, 64)  # other grids: baseline resized


def test_patchcore_calibration_of_mixed_sizes_is_a_table_by_border_distance(fake_backbone, tmp_path):
    # Grids 4x6 and 6x4 (stride 8): border distances 0..1 and 0..2 per axis, with limit 2.
    images = _images(2, 32, 48) + _images(3, 48, 32, seed=1)
    model = _pc(device="cpu", coreset_ratio=1.0, max_patches=None, calibration_images=5, sigma=0.0)
    with patch.object(calibration_module, "BORDER_CELLS", 2):
        model.fit(ImageList(images))
    assert model.baseline.by_position is None and model.baseline.by_border.shape == (3, 3)
    feats = [model.embed(img[None])[0] for img in images]
    flat = [f.reshape(-1, f.shape[-1]).double().numpy() for f in feats]
    sums, counts, everything = np.zeros((3, 3)), np.zeros((3, 3)), []
    for i, f in enumerate(flat):  # brute force: every cell of every leave-one-out map, by its border distances
        d = cdist(f, np.concatenate([g for j, g in enumerate(flat) if j != i])).min(1).reshape(feats[i].shape[:2])
        h, w = d.shape
        for y in range(h):
            for x in range(w):
                a, b = min(y, h - 1 - y, 2), min(x, w - 1 - x, 2)
                sums[a, b] += d[y, x]
                counts[a, b] += 1
                everything.append(d[y, x])
    assert counts[2, 2] == 0  # no grid reaches distance 2 on both axes: filled from a nearest seen pair
    expected = np.where(counts > 0, sums / np.maximum(counts, 1), 0) - np.mean(everything)
    got = model.baseline.by_border.numpy()
    np.testing.assert_allclose(got[counts > 0], expected[counts > 0], atol=1e-4)
    assert got[2, 2] in (got[1, 2], got[2, 1])
    # Any grid looks its cells up by border distance, and the table survives a save/load round trip.
    test = torch.stack(_images(1, 40, 56, seed=4))  # grid 5x7
    plain = _pc(device="cpu", sigma=0.0)
    plain.load_state_dict({"memory_bank": model.memory_bank, "intensity_weight": torch.tensor(0.0)})
    raw = plain.predict(test)[1][0]
    rows, cols = [0, 1, 2, 1, 0], [0, 1, 2, 2, 2, 1, 0]
    shift = got[np.ix_(rows, cols)]
    expected_map = upsample_maps(torch.from_numpy(shift)[None].float(), (40, 56), 0.0)[0].numpy()
    np.testing.assert_allclose(raw - model.predict(test)[1][0], expected_map, atol=1e-4)
    model.save(tmp_path / "run")
    np.testing.assert_array_equal(load_method(tmp_path / "run").predict(test)[1], model.predict(test)[1])
    with pytest.raises(ThreecadError, match="border_baseline"):
        plain.load_state_dict({"memory_bank": model.memory_bank, "intensity_weight": torch.tensor(0.0),
                               "border_baseline": torch.zeros(3, 4)})


@pytest.mark.parametrize("size", [(32, 48), (36, 52)])
def test_patchcore_intensity_feature_is_the_local_mean_grey_level(fake_backbone, tmp_path, size):
    images = torch.stack(_images(3, *size))
    plain = _pc(device="cpu", coreset_ratio=1.0, max_patches=None, sigma=0.0)
    model = _pc(device="cpu", coreset_ratio=1.0, max_patches=None, sigma=0.0, intensity_weight=50.0)
    with_grey, without = model.embed(images), plain.embed(images)
    torch.testing.assert_close(with_grey[..., :-1], without)
    b, h, w, _ = without.shape
    grey = images.double().mean(1).numpy()
    height, width = size
    cells = np.zeros((b, h, w))  # brute force: adaptive bins [floor(i H / h), ceil((i + 1) H / h))
    for i in range(h):
        for j in range(w):
            rows = slice(i * height // h, -(-(i + 1) * height // h))
            cols = slice(j * width // w, -(-(j + 1) * width // w))
            cells[:, i, j] = grey[:, rows, cols].mean((1, 2))
    expected = np.zeros_like(cells)
    for i in range(h):  # then the 3x3 neighbourhood, border windows averaging only the cells inside
        for j in range(w):
            expected[:, i, j] = cells[:, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].mean((1, 2))
    np.testing.assert_allclose(with_grey[..., -1].double().numpy(), 50.0 * expected, rtol=1e-5, atol=1e-5)
    # Fitted and saved with it; predicting without it (or with a bank from a plain fit) is a clear error.
    model.fit(ImageList(list(images)))
    assert model.memory_bank.shape[1] == without.shape[-1] + 1
    model.save(tmp_path / "run")
    loaded = load_method(tmp_path / "run")
    assert loaded.intensity_weight == 50.0
    np.testing.assert_array_equal(loaded.predict(images)[1], model.predict(images)[1])
    for other in (0.0, 100.0):  # a bank of another scale, even of the same dimension, is refused
        with pytest.raises(ThreecadError, match="intensity_weight is fixed when the method is fitted"):
            load_method(tmp_path / "run", intensity_weight=other)
        mismatched = _pc(device="cpu", sigma=0.0, intensity_weight=other)  # the bank's own check
        mismatched.load_state_dict(model.state_dict())
        with pytest.raises(ThreecadError, match="fitted with intensity_weight=50, not"):
            mismatched.predict(images)
    with pytest.raises(ThreecadError, match="option intensity_weight takes a number >= 0, got -1.0"):
        _pc(intensity_weight=-1.0)


def test_a_bad_tensor_in_saved_weights_is_reported_with_the_file(fake_backbone, tmp_path):
    model = _pc(device="cpu", calibration_images=2).fit(ImageList(_images(3, 32, 32)))
    model.save(tmp_path / "run")
    weights = tmp_path / "run" / "weights.pt"
    state = torch.load(weights)
    del state["position_baseline"]
    state["border_baseline"] = torch.zeros(3, 4)
    torch.save(state, weights)
    with pytest.raises(ThreecadError, match="must be square") as info:
        load_method(tmp_path / "run")
    assert str(info.value).startswith(f"{weights}: ")


def test_patchcore_calibration_errors_are_clear(fake_backbone):
    for bad in (-1, True, 2.5, "abc"):
        with pytest.raises(ThreecadError, match="calibration_images"):
            _pc(calibration_images=bad)
    with pytest.raises(ThreecadError, match="at least 2 training images"):
        _pc(device="cpu", calibration_images=1).fit(ImageList(_images(1, 32, 32)))
    uncalibrated = _pc(device="cpu").fit(ImageList(_images(2, 32, 32)))
    needs = _pc(device="cpu", calibration_images=2)
    needs.load_state_dict(uncalibrated.state_dict())
    with pytest.raises(ThreecadError, match="fitted without calibration"):
        needs.predict(torch.stack(_images(1, 32, 32)))


@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_save_load_round_trip_gives_identical_predictions(fake_backbone, tmp_path, name):
    config = {"device": "cpu", "layers": ["stride8", "stride16"]}
    if name == "padim":
        config["n_features"] = 6
    model = build(name, **config).fit(ImageList(_images(5, 40, 56)))
    test = torch.stack(_images(3, 40, 56, seed=11))
    scores, maps = model.predict(test)
    model.save(tmp_path / "run")
    loaded = load_method(tmp_path / "run")
    assert loaded.get_config() == model.get_config()
    scores2, maps2 = loaded.predict(test)
    np.testing.assert_array_equal(scores, scores2)
    np.testing.assert_array_equal(maps, maps2)
    assert maps.dtype == np.float32 and scores.shape == (3,) and maps.shape == (3, 40, 56)


def test_patchcore_maps_follow_non_square_inputs(fake_backbone):
    model = _pc(device="cpu").fit(ImageList(_images(3, 48, 80) + _images(2, 64, 40)))
    for shape in ((48, 80), (64, 40)):
        _, maps = model.predict(torch.rand(2, 3, *shape))
        assert maps.shape == (2, *shape)


# ---------------------------------------------------------------------------- real backbone on synthetic defects
@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_real_backbone_detects_synthetic_defects(synth_root, name):
    category = "Aluminum_Camera_Cover"
    model = build(name, device="cpu").fit(AnomalyDataset(synth_root, category, "train", size=128))
    test = AnomalyDataset(synth_root, category, "test", size=128)
    items = [test[i] for i in range(len(test))]
    scores, maps = model.predict(torch.stack([it["image"] for it in items]))
    labels = [it["label"] for it in items]
    masks = torch.stack([it["mask"][0] for it in items]).numpy().astype(bool)
    assert roc_auc_score(labels, scores) >= 0.8
    assert roc_auc_score(masks.ravel(), maps.ravel()) >= 0.8


def test_top_fraction_mean_matches_a_sort():
    maps = torch.randn(3, 7, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top_fraction_mean(maps, 0), maps.flatten(1).max(1).values)
    for fraction in (0.01, 0.1, 0.5, 1.0):
        k = max(1, round(fraction * 63))
        expected = torch.tensor([sorted(m.flatten().tolist())[-k:] for m in maps]).mean(1)
        assert torch.allclose(top_fraction_mean(maps, fraction), expected)
    with pytest.raises(ValueError):
        top_fraction_mean(maps, 2.0)


@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_topk_image_score_is_the_mean_of_the_top_map_pixels(name, synth_root):
    train = AnomalyDataset(synth_root, "Aluminum_Ipad", "train", size=64)
    test = AnomalyDataset(synth_root, "Aluminum_Ipad", "test", size=64)
    images = torch.stack([test[i]["image"] for i in range(4)])
    options = {"coreset_ratio": 0.5} if name == "patchcore" else {}
    method = build(name, device="cpu", topk=0.05, **options).fit(train)
    scores, maps = method.predict(images)
    k = round(0.05 * 64 * 64)
    expected = np.sort(maps.reshape(4, -1), axis=1)[:, -k:].mean(1)
    assert np.allclose(scores, expected, rtol=1e-5)
    with pytest.raises(ThreecadError, match="topk"):
        build(name, topk=1.5)


# ---------------------------------------------------------------------------- framework: input options, predict
def test_input_options_are_declared_checked_and_saved(fake_backbone, tmp_path):
    method = build("padim", device="cpu", n_features=6, size=32, resize="squash", exposure="mean")
    assert method.input_settings() == {"size": 32, "resize": "squash", "exposure": "mean"}
    assert _pc().input_settings() == {"size": None, "resize": "squash", "exposure": "raw"}
    for key, value, allowed in (("size", 0, "a whole number >= 1 or null"),
                                ("resize", "crop", "one of squash, aspect, native"),
                                ("exposure", "gain", "one of raw, mean")):
        with pytest.raises(ThreecadError) as info:
            build("patchcore", **{key: value})
        assert str(info.value) == f"method 'patchcore' option {key} takes {allowed}, got {value!r}"
    method.fit(ImageList(_images(4, 32, 32)))
    run = method.save(tmp_path / "run")
    saved = json.loads((run / "config.json").read_text())["config"]
    assert {k: saved[k] for k in INPUT_OPTIONS} == {"size": 32, "resize": "squash", "exposure": "mean"}
    assert load_method(run).input_settings() == method.input_settings()
    with pytest.raises(ThreecadError, match="size is fixed when the method is fitted"):
        load_method(run, size=64)  # the input shaped what was fitted


def test_predict_takes_native_images_of_any_size_as_the_loader_would(fake_backbone, tmp_path):
    from PIL import Image

    from threecad.io import read_image

    method = build("patchcore", device="cpu", size=48, resize="aspect", exposure="mean", coreset_ratio=0.5)
    method.fit(ImageList(_images(3, 48, 32)))
    rng = np.random.default_rng(0)
    shapes = [(60, 40), (60, 40), (45, 90), (50, 50)]
    arrays = [rng.integers(40, 200, size=(h, w, 3), dtype=np.uint8) for h, w in shapes]
    arrays[3] = arrays[3][..., 0]  # grey
    paths = []
    for i, array in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(array).save(paths[-1])
    loaded = AnomalyDataset(tmp_path, None, samples=[Sample(p, None, 0, "c", "good", "test") for p in paths],
                            size=48, resize="aspect", exposure="mean")
    scores, maps = method.predict(arrays, batch_size=1)  # batch composition changes the last float bits
    assert isinstance(maps, list) and [m.shape for m in maps] == shapes
    for i, item in enumerate(loaded):  # the loader's tensor through predict_batch, resized back like the runner
        s, m = method.predict_batch(item["image"][None])
        np.testing.assert_array_equal(maps[i], native_size_maps(m, [(shapes[i][1], shapes[i][0])])[0])
        assert scores[i] == pytest.approx(float(s[0]), abs=1e-6)
    # the same pixels as float tensors, as 16 bits (scaled by bit depth), or read from the files
    tensors = [torch.from_numpy(np.atleast_3d(a).repeat(3 // np.atleast_3d(a).shape[2], 2).transpose(2, 0, 1) / 255.0)
               .float() for a in arrays]
    for other in (tensors, [a.astype(np.uint16) * 257 for a in arrays], [read_image(p) for p in paths]):
        again_scores, again = method.predict(other, batch_size=1)
        np.testing.assert_array_equal(again_scores, scores)
        for a, b in zip(again, maps):
            np.testing.assert_array_equal(a, b)
    _, one_batch = method.predict(torch.stack(tensors[:2]), batch_size=1)  # a batch tensor in: an array out
    assert isinstance(one_batch, np.ndarray) and one_batch.shape == (2, 60, 40)
    np.testing.assert_array_equal(one_batch, np.stack(maps[:2]))
    for bad, what in ((torch.rand(3, 8, 8), "a list of images or a"), ([np.zeros((4, 4, 2), np.uint8)], "cannot read"),
                      (["image.png"], "cannot read str")):
        with pytest.raises(ThreecadError, match=what):
            method.predict(bad)


def test_a_float_image_needing_no_transform_is_fed_as_it_is(fake_backbone):
    method = _pc(device="cpu", coreset_ratio=0.5).fit(ImageList(_images(3, 32, 32)))
    images = torch.stack(_images(2, 32, 32, seed=3))  # not on the 8-bit grid: no quantisation
    np.testing.assert_array_equal(method.predict(images)[1], method.predict_batch(images)[1])


def test_a_method_never_imports_at_framework_import_and_builtins_are_found_by_scanning():
    import subprocess
    import sys

    code = ("import sys, threecad.methods as m; assert not [k for k in sys.modules if k.split('.')[0] in "
            "('baselines', 'cfrg', 'leaderboard')], 'imported early'; "
            "from threecad.methods import registry; assert 'baselines.padim' in registry._builtin_modules(); "
            "assert {'patchcore', 'padim', 'cfrg'} <= set(m.available())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_saved_run_with_a_removed_option_or_without_its_inputs_is_refused(fake_backbone, tmp_path):
    model = _pc(device="cpu").fit(ImageList(_images(3, 32, 32)))
    model.save(tmp_path / "run")
    config_file = tmp_path / "run" / "config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**saved, "config": {**saved["config"], "scales": [1.0]}}))
    with pytest.raises(ThreecadError, match="scales") as info:
        load_method(tmp_path / "run")
    assert str(tmp_path / "run") in str(info.value)
    config = {k: v for k, v in saved["config"].items() if k != "exposure"}
    config_file.write_text(json.dumps({**saved, "config": config}))
    with pytest.raises(ThreecadError, match="does not record exposure"):
        load_method(tmp_path / "run")


def test_each_method_recommends_its_validated_input_settings():
    """Input defaults come from each method's validation (docs/results/): a method built without
    them, the runner and `3cad train` all get them."""
    expected = {"patchcore": "mean", "padim": "mean", "cfrg": "mean", "rd": "raw", "rdpp": "raw"}
    for name, exposure in expected.items():
        assert build(name).exposure == exposure, name
        assert get_method(name).input_defaults()["exposure"] == exposure
    assert build("patchcore", exposure="raw").exposure == "raw"  # an explicit value wins
