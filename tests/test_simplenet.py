"""SimpleNet (``baselines/simplenet.py``): the official parameter counts, the local embedding against
a brute-force computation in the official order, the truncated L1 loss against a hand computation,
noise only in the fake branch, the optimiser pair, a tiny fit, exact resume after a killed
subprocess, options, saving, the runner.

Seconds in all: the WideResNet-50-2 configuration is counted with random encoder weights; fits use
the offline Lite0 on 64-px images.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from smooth_images import SmoothImages
from test_fastflow import LITE, killed_and_resumed

from baselines.simplenet import (
    LAYERS,
    NARROW_NOISE,
    PAPER_NOISE,
    SimpleNet,
    SimpleNetNet,
    local_embedding,
    truncated_l1_loss,
    two_rule_adam,
)
from threecad.errors import ThreecadError
from threecad.methods import CONFIG_FILE, build, check_overrides, load_method
from threecad.methods.blocks import Teacher, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lite_taps():
    return Teacher("efficientnet_lite0", layers=LAYERS)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> SimpleNet:
    """The default (paper) encoder, fitted offline: the WRN50 file is hidden, so it falls back to Lite0."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THREECAD_OFFLINE", "1")
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        return build("simplenet", epochs=3, batch_size=4, device="cpu").fit(SmoothImages(8))


def _images(n: int, seed: int) -> torch.Tensor:
    data = SmoothImages(n, seed=seed)
    return torch.stack([data[i]["image"] for i in range(n)])


# ------------------------------------------------------------------------------------------ architecture
def test_wrn50_configuration_matches_the_official_parameter_counts():
    teacher = Teacher("wide_resnet50_2", weights="random", layers=LAYERS)
    assert teacher.channels == (512, 1024) and teacher.extractor._names[-1] == "layer3"
    model = SimpleNet(encoder="wide_resnet50_2")
    assert model._widths(teacher.name) == (1536, 1024)
    net = SimpleNetNet(teacher, *model._widths(teacher.name))
    assert count_parameters(net.adaptor) == 2_360_832
    assert count_parameters(net.discriminator) == 1_576_960
    assert count_parameters(net) == 3_937_792  # "3.94 M"; the encoder is frozen
    kinds = [type(m).__name__ for m in net.discriminator]
    assert kinds == ["Linear", "BatchNorm1d", "LeakyReLU", "Linear"] and net.discriminator[3].bias is None
    assert net.discriminator[2].negative_slope == 0.2 and net.adaptor.bias is not None
    with torch.no_grad():  # 224 px: a 28 x 28 grid of 1536-vectors
        assert tuple(net.eval()({"image": torch.rand(1, 3, 224, 224)})["scores"].shape) == (1, 28, 28)


def test_lite0_configuration(lite_taps):
    assert lite_taps.channels == (40, 112)
    model = SimpleNet(encoder="efficientnet_lite0")
    assert model._widths("efficientnet_lite0") == (384, 256)
    assert count_parameters(SimpleNetNet(lite_taps, 384, 256)) == 247_168
    assert SimpleNet(feature_dim=96, dsc_hidden=50)._widths("efficientnet_lite0") == (96, 50)


# ------------------------------------------------------------------------------------------ embedding, loss
def _adaptive_pool(v: np.ndarray, width: int) -> np.ndarray:
    """Adaptive average pooling by its definition: output i averages [floor(i L / w), ceil((i + 1) L / w))."""
    n = len(v)
    return np.array([v[(i * n) // width:-(-((i + 1) * n) // width)].mean() for i in range(width)])


def _neighbourhoods(f: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (h, w, C * 9): each position's zero-padded 3x3 neighbourhood, channel-major."""
    c, h, w = f.shape
    padded = np.pad(f, ((0, 0), (1, 1), (1, 1)))
    return np.stack([[padded[:, y:y + 3, x:x + 3].reshape(-1) for x in range(w)] for y in range(h)])


# 12: bins of one row on level 1 (WRN50 layer 2: 4608 -> 1536), the unfolded path on level 2; 6: bins of
# two rows and of three rows (layer 3: 9216 -> 1536), both on the row-means path; 8: uneven bins, unfolded.
@pytest.mark.parametrize("width", [12, 6, 8])
def test_local_embedding_equals_the_official_order_brute_force(width):
    g = torch.Generator().manual_seed(0)
    fine, coarse = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 6, 3, 3, generator=g)
    got = local_embedding([fine, coarse], width).numpy()
    assert got.shape == (2, 6, 6, width)
    for b in range(2):
        n_fine = _neighbourhoods(fine[b].numpy())  # (6, 6, 36)
        # official order: the coarse level's neighbourhood vectors are resized first, then pooled
        n_coarse = torch.from_numpy(_neighbourhoods(coarse[b].numpy())).permute(2, 0, 1)[None]
        n_coarse = F.interpolate(n_coarse, size=(6, 6), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        for y in range(6):
            for x in range(6):
                levels = [_adaptive_pool(n_fine[y, x], width), _adaptive_pool(n_coarse[y, x].numpy(), width)]
                expected = _adaptive_pool(np.concatenate(levels), width)
                np.testing.assert_allclose(got[b, y, x], expected, rtol=1e-5, atol=1e-6)


def test_truncated_l1_loss_equals_a_hand_computation():
    true = torch.tensor([0.9, 0.5, 0.2, -1.0])
    fake = torch.tensor([-0.9, -0.5, 0.1, 2.0])
    out = truncated_l1_loss(true, fake, margin=0.5)
    # true: max(0, 0.5 - s) = 0, 0, 0.3, 1.5; fake: max(0, 0.5 + s) = 0, 0, 0.6, 2.5
    assert float(out["loss"]) == pytest.approx((0.3 + 1.5) / 4 + (0.6 + 2.5) / 4, rel=1e-6)
    assert float(out["p_true"]) == pytest.approx(2 / 4) and float(out["p_fake"]) == pytest.approx(1 / 4)
    assert float(truncated_l1_loss(true, fake, margin=0.8)["loss"]) == pytest.approx(
        (0 + 0.3 + 0.6 + 1.8) / 4 + (0 + 0.3 + 0.9 + 2.8) / 4, rel=1e-6)


def test_noise_goes_only_to_the_fake_branch_and_batchnorm_sees_both(lite_taps):
    torch.manual_seed(0)
    net = SimpleNetNet(lite_taps, 96, 64)
    batch = {"features": lite_taps(_images(2, seed=3))}
    with torch.no_grad():
        adapted = net.adaptor(local_embedding(batch["features"], 96).reshape(-1, 96))
        clean = net.eval()(batch)["scores"].flatten()
        torch.manual_seed(5)
        out = net(batch, noise_std=0.3)
        torch.manual_seed(5)
        noise = 0.3 * torch.randn_like(adapted)
        torch.testing.assert_close(out["true"], -clean)  # eval: the normal rows are unchanged by the noise
        torch.testing.assert_close(out["fake"], net.discriminator(adapted + noise)[:, 0])
        net.train()
        torch.manual_seed(5)
        out = net(batch, noise_std=0.3)
        both = net.discriminator(torch.cat([adapted, adapted + noise]))[:, 0]  # one batch for BatchNorm
    torch.testing.assert_close(torch.cat([out["true"], out["fake"]]), both)


def test_one_optimiser_equals_the_official_adamw_and_adam_pair(lite_taps):
    torch.manual_seed(0)
    net = SimpleNetNet(lite_taps, 32, 16)
    twin = copy.deepcopy(net)
    ours = two_rule_adam(net.adaptor, net.discriminator, 1e-4, 2e-4)
    official = [torch.optim.AdamW(twin.adaptor.parameters(), lr=1e-4),  # its default weight decay: 0.01
                torch.optim.Adam(twin.discriminator.parameters(), lr=2e-4, weight_decay=1e-5)]
    x = torch.randn(20, 32)
    for _ in range(3):
        for model, optimisers in ((net, [ours]), (twin, official)):
            loss = model.discriminator(model.adaptor(x)).square().mean()
            for o in optimisers:
                o.zero_grad()
            loss.backward()
            for o in optimisers:
                o.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------ fitting, predict
def test_tiny_fit_lowers_the_loss_and_trains_only_adaptor_and_discriminator():
    model = SimpleNet(epochs=4, batch_size=4, **LITE)
    net = model._build()
    encoder_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    adaptor_before = net.adaptor.weight.clone()
    model.fit(SmoothImages(8))
    losses = [row["loss"] for row in model.history_]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert {"p_true", "p_fake"} <= set(model.history_[-1])
    assert all(torch.equal(v, net.encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert not torch.equal(net.adaptor.weight, adaptor_before)


def test_predict_scores_are_the_raw_patch_maximum_and_maps_are_smoothed(fitted):
    images = _images(2, seed=7)
    scores, maps = fitted.predict_batch(images)
    assert scores.shape == (2,) and maps.shape == (2, 64, 64) and maps.dtype == np.float32
    with torch.no_grad():
        patches = fitted.net.eval()({"image": images})["scores"]
    np.testing.assert_allclose(scores, patches.flatten(1).amax(1).numpy())  # not the smoothed map's max
    up = F.interpolate(patches[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0].numpy()
    for b in range(2):
        np.testing.assert_allclose(maps[b], gaussian_filter(up[b].astype(np.float64), sigma=4), rtol=1e-5, atol=1e-6)
    # the whole image is scored, at any size (no centre crop, no fixed grid)
    s, m = fitted.predict_batch(torch.rand(1, 3, 64, 96))
    assert m.shape == (1, 64, 96)


def test_resume_after_a_killed_subprocess_equals_an_uninterrupted_fit(tmp_path):
    killed_and_resumed("simplenet", {"epochs": 3, "batch_size": 4, "seed": 1, "feature_dim": 96, **LITE}, tmp_path)


# ------------------------------------------------------------------------------------------ options, saving
def test_options_are_declared_and_checked():
    assert {k for k, o in SimpleNet.options().items() if o.predict} == {"sigma", "device"}
    d = SimpleNet.defaults()
    assert (d["epochs"], d["batch_size"], d["adaptor_lr"], d["dsc_lr"], d["noise_std"], d["margin"], d["sigma"],
            d["encoder"], d["seed"]) == (160, 8, 1e-4, 2e-4, None, 0.5, 4.0, "wide_resnet50_2", 0)
    for bad in ({"noise_std": 0.0}, {"margin": -0.5}, {"feature_dim": 0}, {"dsc_hidden": 0}, {"adaptor_lr": 0.0},
                {"dsc_lr": -1.0}, {"sigma": -1.0}, {"batch_size": 0}, {"cache_gb": -2.0}, {"amp": "no"}):
        with pytest.raises(ThreecadError, match=next(iter(bad))):
            build("simplenet", **bad)
    check_overrides(SimpleNet, {"sigma": 4.0}, {"sigma": 2.0, "device": "cpu"})
    with pytest.raises(ThreecadError, match="noise_std is fixed"):
        check_overrides(SimpleNet, {"noise_std": 0.015}, {"noise_std": 0.03})


def test_save_load_round_trip_records_encoder_and_widths(fitted, tmp_path):
    assert fitted.encoder == "wide_resnet50_2" and fitted.feature_dim is None  # options never rewritten ...
    assert fitted.noise_std is None
    run = fitted.save(tmp_path / "run")
    config = json.loads((run / CONFIG_FILE).read_text())["config"]
    assert (config["encoder"], config["feature_dim"], config["dsc_hidden"]) == ("efficientnet_lite0", 384, 256)
    assert config["noise_std"] == NARROW_NOISE != PAPER_NOISE == 0.015  # ... the values used are recorded
    loaded = load_method(run)
    images = _images(3, seed=11)
    for a, b in zip(fitted.predict_batch(images), loaded.predict_batch(images)):
        np.testing.assert_array_equal(a, b)


def test_runner_trains_predicts_and_evaluates(synth_root, tmp_path):
    from threecad.dataset.layout import list_categories
    from threecad.methods import runner
    from threecad.metrics import evaluate_predictions

    category = list_categories(synth_root)[0]
    runs = runner.train("simplenet", synth_root, [category], out=tmp_path / "runs", device="cpu", size=64,
                        config={"epochs": 1, "batch_size": 4, "encoder": "efficientnet_lite0"})
    out = runner.predict(runs[0], synth_root, tmp_path / "pred")
    metrics = evaluate_predictions(synth_root, out, categories=[category])["categories"][category]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("i_auroc", "p_auroc"))
