"""DRAEM (``baselines/draem.py``): the official networks' parameter counts, SSIM against
scikit-image, the focal loss against a per-pixel hand computation, the image score against scipy,
a tiny fit that learns to segment a synthetic defect, exact resume through the engine, options, and
``3cad train/predict`` on a tiny dataset.

Everything runs on CPU in seconds: the official configuration is counted on the meta device; fits
use 32-64 px images and the widths divided by 8.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy.ndimage import uniform_filter
from skimage.metrics import structural_similarity
from smooth_images import SmoothImages

from baselines.draem import (
    DRAEM,
    DRAEMNet,
    draem_losses,
    milestones,
    ssim_map,
    window_max,
)
from threecad.errors import ThreecadError
from threecad.methods import CONFIG_FILE, available, build, check_overrides, load_method
from threecad.methods.blocks import count_parameters, focal_loss
from threecad.methods.training import CHECKPOINT_FILE
from threecad.synth.anomalies import CFRG_SYNTHESIS, SyntheticAnomalyDataset, TextureBank

pytestmark = pytest.mark.usefixtures("one_thread")


def _checker_textures(folder) -> str:
    """High-contrast checkerboards: a texture folder (``--textures``) whose anomalies are plainly visible."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:64, 0:64]
    for k in range(6):
        cell = 2 + k
        pattern = (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.uint8)
        Image.fromarray(np.stack([pattern] * 3, -1)).save(folder / f"checker{k}.png")
    return str(folder)


@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> str:
    return _checker_textures(tmp_path_factory.mktemp("textures"))


@pytest.fixture(scope="module")
def fitted(textures) -> DRAEM:
    """Widths / 8 at 32 px, 50 epochs of two batches: enough for the segmentation to find defects."""
    return DRAEM(epochs=50, batch_size=8, lr=3e-3, width=8, device="cpu", seed=0, textures=textures).fit(
        SmoothImages(16, size=32))


# ------------------------------------------------------------------------------------------ architecture
def test_official_networks_have_the_official_parameter_counts():
    with torch.device("meta"):  # counts do not depend on the weights: no 97 M-parameter allocation
        net = DRAEMNet(width=1)
    assert count_parameters(net.reconstructive) == 69_048_579
    assert count_parameters(net.reconstructive.encoder) == 37_622_400
    assert count_parameters(net.discriminative) == 28_374_146
    assert [m.out_channels for m in net.reconstructive.encoder.modules() if isinstance(m, torch.nn.Conv2d)][::2] == [
        128, 256, 512, 1024, 1024]
    assert net.discriminative.encoder[0][0].in_channels == 6 and net.discriminative.out.out_channels == 2
    assert net.reconstructive.out.out_channels == 3
    with torch.device("meta"):
        quarter = DRAEMNet(width=4)
    # widths / 4: parameters fall about 16-fold
    assert count_parameters(quarter.reconstructive) == 4_322_883
    assert count_parameters(quarter.discriminative) == 1_778_210


def test_forward_shapes_and_official_initialisation():
    torch.manual_seed(0)
    net = DRAEMNet(width=8)
    out = net(torch.rand(2, 3, 64, 96))
    assert tuple(out["reconstruction"].shape) == (2, 3, 64, 96) and tuple(out["logits"].shape) == (2, 2, 64, 96)
    convs = torch.cat([m.weight.detach().flatten() for m in net.modules() if isinstance(m, torch.nn.Conv2d)])
    bns = torch.cat([m.weight.detach().flatten() for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert abs(float(convs.mean())) < 1e-3 and float(convs.std()) == pytest.approx(0.02, rel=0.02)
    assert float(bns.mean()) == pytest.approx(1.0, abs=5e-3) and float(bns.std()) == pytest.approx(0.02, rel=0.1)


# ------------------------------------------------------------------------------------------ losses and score
@pytest.mark.parametrize("shift", [0.0, -0.7])
def test_ssim_equals_scikit_image_away_from_the_border(shift):
    """Inside the border (where zero and reflect padding agree) the map is scikit-image's Gaussian
    SSIM; the dynamic range follows the official rule (2 when the reconstruction goes below -0.5)."""
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(2, 3, 40, 36, generator=g, dtype=torch.float64)
    rec = (clean + 0.2 * torch.randn(2, 3, 40, 36, generator=g, dtype=torch.float64)).clamp(0, 1) + shift
    got = ssim_map(rec, clean)
    assert tuple(got.shape) == (2, 3, 40, 36)
    for b in range(2):
        ref = structural_similarity(rec[b].permute(1, 2, 0).numpy(), clean[b].permute(1, 2, 0).numpy(),
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=2.0 if shift < -0.5 else 1.0, channel_axis=-1)
        assert float(got[b, :, 5:-5, 5:-5].mean()) == pytest.approx(ref, abs=1e-5)
    same = ssim_map(clean.float(), clean.float())
    torch.testing.assert_close(same, torch.ones_like(same), atol=1e-4, rtol=0)


def _hand_focal(probs: np.ndarray, target: np.ndarray, gamma: float, smooth: float) -> float:
    """Per-pixel loop: the one-hot target clamped to [smooth/(C-1), 1-smooth], p_t + smooth, the log."""
    b, c, h, w = probs.shape
    total = 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                key = [1.0 if k == target[i, 0, y, x] else 0.0 for k in range(c)]
                if smooth:
                    key = [min(max(v, smooth / (c - 1)), 1 - smooth) for v in key]
                pt = sum(k * p for k, p in zip(key, probs[i, :, y, x])) + smooth
                total += -((1 - pt) ** gamma) * max(math.log(pt), -100.0)
    return total / (b * h * w)


def test_focal_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64) * 3, dim=1)
    target = (torch.rand(2, 1, 5, 6, generator=g) > 0.7).double()
    for gamma, smooth in ((2.0, 1e-5), (4.0, 0.0), (0.0, 0.0)):
        expected = _hand_focal(probs.numpy(), target.numpy(), gamma, smooth)
        assert float(focal_loss(probs, target, gamma, smooth)) == pytest.approx(expected, rel=1e-10)
    # gamma 0 without smoothing is the cross-entropy
    ce = torch.nn.functional.nll_loss(probs.log(), target[:, 0].long())
    assert float(focal_loss(probs, target, 0.0)) == pytest.approx(float(ce), rel=1e-10)


def test_losses_are_mse_plus_ssim_plus_focal():
    g = torch.Generator().manual_seed(3)
    clean, rec = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    logits, mask = torch.randn(2, 2, 32, 32, generator=g), (torch.rand(2, 1, 32, 32, generator=g) > 0.9).float()
    losses = draem_losses({"reconstruction": rec, "logits": logits}, clean, mask)
    mse = float(((rec - clean) ** 2).mean())
    ssim = 1 - float(ssim_map(rec, clean).mean())
    focal = float(focal_loss(torch.softmax(logits, 1), mask, 2.0, 1e-5))
    assert (float(losses["mse"]), float(losses["ssim"]), float(losses["focal"])) == pytest.approx((mse, ssim, focal))
    assert float(losses["loss"]) == pytest.approx(mse + ssim + focal, rel=1e-6)


def test_image_score_is_the_max_of_the_zero_padded_mean_filter():
    maps = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(4)) ** 4
    for window in (21, 5):
        expected = [uniform_filter(m.double().numpy(), size=window, mode="constant").max() for m in maps]
        np.testing.assert_allclose(window_max(maps, window).numpy(), expected, rtol=1e-5)


def test_schedules():
    assert milestones(700, (0.8, 0.9)) == [560, 630]
    assert milestones(700, (400 / 700, 600 / 700)) == [400, 600]
    assert milestones(3, (0.8, 0.9)) == [2, 3]  # short runs decay too
    for schedule, expected in (("code", [1e-4] * 8 + [2e-5] + [4e-6]), ("paper", [1e-4] * 6 + [1e-5] * 3 + [1e-6])):
        net = DRAEMNet(64)
        optimizer, scheduler = DRAEM(epochs=10, schedule=schedule).configure_optimizers(net)
        lrs = []
        for _ in range(10):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        np.testing.assert_allclose(lrs, expected, rtol=1e-9)
        assert optimizer.defaults["betas"] == (0.9, 0.999)
        # one Adam over both networks
        assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == count_parameters(net)


# ------------------------------------------------------------------------------------------ fitting
def test_tiny_fit_lowers_the_loss_and_segments_a_synthetic_defect(fitted, textures):
    losses = [row["loss"] for row in fitted.history_]
    assert len(losses) == 50 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert {"mse", "ssim", "focal", "lr"} <= set(fitted.history_[-1])
    predictions = assert_segments_defects(fitted, textures, 32, min_pixels=5)
    for scores, maps in predictions:
        assert maps.shape == (1, 32, 32) and maps.dtype == np.float32 and 0 <= maps.min() <= maps.max() <= 1
        assert scores[0] == pytest.approx(float(window_max(torch.from_numpy(maps), 21)[0]), rel=1e-6)


def assert_segments_defects(model, textures: str, size: int, min_pixels: int) -> list:
    """The fitted ``model``'s maps are higher inside synthetic defects (checkerboard textures on
    held-out smooth images) than outside, on average and on all images but one; returns the
    ``(scores, maps)`` of each image with a mask of at least ``min_pixels``."""
    test = SyntheticAnomalyDataset(SmoothImages(8, size=size, seed=9), TextureBank(textures), seed=123,
                                   params=CFRG_SYNTHESIS)
    inside, outside, predictions = [], [], []
    for i in range(len(test)):
        item = test[i]
        mask = item["mask"][0].bool().numpy()
        if mask.sum() < min_pixels:
            continue
        scores, maps = model.predict_batch(item["augmented"][None])
        predictions.append((scores, maps))
        inside.append(maps[0][mask].mean())
        outside.append(maps[0][~mask].mean())
    assert len(inside) >= 4
    assert np.mean(inside) > np.mean(outside) + 0.05, (inside, outside)
    assert sum(a > b for a, b in zip(inside, outside)) >= len(inside) - 1
    return predictions


def _rows(history):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


def test_resume_after_an_interruption_is_exact(tmp_path):
    """A fit stopped by an exception in epoch 3 (its checkpoint is from epoch 2) and resumed gives the
    uninterrupted run's losses, learning rates and weights, bit for bit; other settings are refused."""
    def model(resume=False) -> DRAEM:
        m = DRAEM(epochs=4, batch_size=4, width=16, device="cpu", seed=3, resume=resume)
        m.work_dir = tmp_path / "split"
        return m

    full = DRAEM(epochs=4, batch_size=4, width=16, device="cpu", seed=3).fit(SmoothImages(8, size=32))
    broken = model()
    calls = {"n": 0}
    step = broken.training_step

    def failing(module, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 3, second step
            raise KeyboardInterrupt
        return step(module, batch)

    broken.training_step = failing
    with pytest.raises(KeyboardInterrupt):
        broken.fit(SmoothImages(8, size=32))
    state = torch.load(tmp_path / "split" / CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 2
    resumed = model(resume=True).fit(SmoothImages(8, size=32))
    assert _rows(resumed.history_) == _rows(full.history_)
    assert [row["lr"] for row in full.history_] == [1e-4, 1e-4, 1e-4, 2e-5]  # milestones [3, 4]
    assert all(torch.equal(v, full.net.state_dict()[k]) for k, v in resumed.net.state_dict().items())
    other = DRAEM(epochs=4, batch_size=4, width=16, device="cpu", seed=3, resume=True, lr=1e-3)
    other.work_dir = tmp_path / "split"
    with pytest.raises(ThreecadError, match="lr: 0.0001 -> 0.001"):
        other.fit(SmoothImages(8, size=32))


def test_fit_refuses_sides_not_divisible_by_32():
    with pytest.raises(ThreecadError, match="divisible by 32"):
        DRAEM(epochs=1, width=16, device="cpu").fit(SmoothImages(2, size=48))


# ------------------------------------------------------------------------------------------ options, saving
def test_registered_with_official_defaults_and_checked_options():
    assert "draem" in available()
    defaults = DRAEM.defaults()
    assert (defaults["epochs"], defaults["batch_size"], defaults["lr"], defaults["schedule"], defaults["width"],
            defaults["score_window"]) == (700, 8, 1e-4, "code", 1, 21)
    assert {k for k, o in DRAEM.options().items() if o.predict} == {"score_window", "device"}
    for bad in ({"width": 0}, {"width": 65}, {"schedule": "cosine"}, {"lr": 0.0}, {"size": 100}, {"epochs": 0},
                {"score_window": 0}, {"batch_size": 0}):
        with pytest.raises(ThreecadError, match=next(iter(bad))):
            build("draem", **bad)
    check_overrides(DRAEM, {"width": 4}, {"score_window": 5, "device": "cpu"})
    with pytest.raises(ThreecadError, match="width is fixed"):
        check_overrides(DRAEM, {"width": 4}, {"width": 2})


def test_save_load_round_trip(fitted, tmp_path):
    images = torch.stack([SmoothImages(3, size=32, seed=11)[i]["image"] for i in range(3)])
    run = fitted.save(tmp_path / "run")
    assert json.loads((run / CONFIG_FILE).read_text())["config"]["width"] == 8
    loaded = load_method(run)
    for a, b in zip(fitted.predict_batch(images), loaded.predict_batch(images)):
        np.testing.assert_array_equal(a, b)
    scores, maps = load_method(run, score_window=3).predict_batch(images)
    np.testing.assert_allclose(scores, window_max(torch.from_numpy(maps), 3).numpy())


def test_cli_trains_predicts_and_evaluates(synth_root, tmp_path, textures):
    from cli import cli
    from threecad.dataset.layout import list_categories
    from threecad.metrics import evaluate_predictions

    category = list_categories(synth_root)[0]
    result = CliRunner().invoke(cli, ["train", "--method", "draem", "--dataset", str(synth_root), "--category",
                                      category, "--out", str(tmp_path / "runs"), "--device", "cpu", "--size", "64",
                                      "--epochs", "1", "--batch-size", "4", "--textures", textures,
                                      "--set", "width=16"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / category
    saved = json.loads((run / CONFIG_FILE).read_text())["config"]
    assert (saved["size"], saved["width"], saved["epochs"], saved["textures"]) == (64, 16, 1, textures)
    assert (run / CHECKPOINT_FILE).is_file()
    result = CliRunner().invoke(cli, ["predict", "--run", str(tmp_path / "runs"), "--dataset", str(synth_root),
                                      "--out", str(tmp_path / "maps")])
    assert result.exit_code == 0, result.output
    metrics = evaluate_predictions(synth_root, tmp_path / "maps", categories=[category])["categories"][category]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("i_auroc", "p_auroc"))
