"""RealNet with texture synthesis (``baselines/realnet.py``, method ``realnet-texture``): the official
parameter counts (on the meta device: no 518 M-parameter allocation), GroupNorm widths refused unless
multiples of 32, AFS and RRS against brute-force numpy, a tiny fit that lowers both losses, exact
resume after a SIGKILLed subprocess, options, save/load, and ``3cad train/predict/evaluate`` and
``3cad leaderboard run`` on the synthetic dataset.

Fits use the offline Lite0 encoder tapped at strides 4 and 8 on 32-64 px images. This file is also the
worker script of the kill test: ``python tests/test_realnet.py kill OUT`` (repository on PYTHONPATH).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from killing import kill_when_paused, subprocess_env
from smooth_images import SmoothImages

from baselines.realnet import (
    REALNET_SYNTHESIS,
    RRS,
    RealNetTexture,
    UNet,
    afs_errors,
    afs_indices,
    default_model_channels,
    realnet_losses,
    rrs_select,
)
from threecad.errors import ThreecadError
from threecad.methods import CONFIG_FILE, available, build, check_overrides, load_method
from threecad.methods.blocks import count_parameters
from threecad.methods.training import CHECKPOINT_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

LITE = "efficientnet_lite0"
#: Two Lite0 taps (24 and 40 channels), AFS keeping 16 and 24 of them: 32-px-divisible inputs.
TINY = {"encoder": LITE, "device": "cpu", "layers": ["stride4", "stride8"], "keep": [16, 24], "afs_batches": 3}


@pytest.fixture(scope="module")
def fitted() -> RealNetTexture:
    return RealNetTexture(epochs=4, batch_size=4, lr=1e-3, seed=0, **TINY).fit(SmoothImages(8, size=32))


# ------------------------------------------------------------------------------------------ architecture
def test_official_configuration_has_the_official_parameter_counts():
    method = RealNetTexture()
    keep, widths, topk = method._widths((256, 512, 1024, 2048))  # WRN50 layer1-4
    assert (keep, widths, topk) == ([256, 512, 512, 256], [128, 256, 256, 128], 256)
    with torch.device("meta"):
        unets = [UNet(k, w) for k, w in zip(keep, widths)]
        rrs = RRS(sum(keep), topk)
    assert [count_parameters(u) for u in unets] == [51_846_144, 207_271_936, 207_271_936, 51_846_144]
    assert sum(count_parameters(u) for u in unets) == 518_236_160
    assert count_parameters(rrs) == 5_872_662 and rrs.rank_norm.momentum == 0.9 and not rrs.rank_norm.affine
    # Lite0: AFS keeps every channel below the official counts, 256 of the 320 at stride 32
    assert method._widths((24, 40, 112, 320)) == ([24, 40, 112, 256], [32, 32, 64, 128], 64)
    with torch.device("meta"):
        assert [count_parameters(UNet(c, w)) for c, w in ((24, 32), (40, 32), (112, 64))] == [
            3_227_864, 3_237_096, 12_957_168]


def test_unet_keeps_the_shape_and_starts_at_zero():
    torch.manual_seed(0)
    unet = UNet(24, 32)
    x = torch.randn(2, 24, 8, 12)
    with torch.no_grad():
        out = unet(x)
        assert out.shape == x.shape and float(out.abs().max()) == 0.0  # zero-initialised output conv
        torch.nn.init.normal_(unet.out.weight, std=0.01)
        assert float(unet(x).abs().max()) > 0
    assert default_model_channels(24) == 32 and default_model_channels(112) == 64 and default_model_channels(512) == 256


@pytest.mark.parametrize("width", [48, 16, 100])
def test_groupnorm_widths_that_are_not_multiples_of_32_are_refused(width):
    with pytest.raises(ThreecadError, match=f"width {width} is not a multiple of 32") as info:
        UNet(24, width)
    assert "\n" not in str(info.value)
    with pytest.raises(ThreecadError, match="option model_channels takes .*a multiple of 32") as info:
        build("realnet-texture", layers=["stride8"], model_channels=[width])
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ AFS and RRS
def test_afs_errors_and_indices_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    synthetic = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    clean = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.6).double()
    got = afs_errors(synthetic, clean, mask).numpy()
    s, c, m = synthetic.numpy(), clean.numpy(), mask.numpy()
    expected = []
    for ch in range(5):
        d = (s[:, ch] - c[:, ch]) ** 2  # (B, 4, 4)
        d = (d - d.min()) / (d.max() - d.min() + 1e-4)
        label = m[:, 0, ::2, ::2]  # nearest 8 -> 4 takes every second pixel
        expected.append(((d - label) ** 2).mean())
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    errors = torch.tensor([0.5, 0.1, 0.9, 0.2, 0.3, 0.05])
    assert afs_indices(errors, 3).tolist() == sorted(np.argsort(errors.numpy())[:3].tolist()) == [1, 3, 5]


def test_afs_keeps_the_channels_that_follow_the_mask():
    """A channel that differs exactly where the mask is has error 0; one that differs everywhere does not."""
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 1:3, 1:3] = 1
    clean = torch.zeros(2, 3, 4, 4)
    synthetic = torch.stack([torch.ones(2, 4, 4), 2 * mask[:, 0], torch.rand(2, 4, 4)], dim=1)
    errors = afs_errors(synthetic, clean, mask)
    assert float(errors[1]) < 1e-6 < float(errors[0]) and afs_indices(errors, 1).tolist() == [1]


def test_rrs_selection_equals_brute_force_and_ranks_on_the_normalised_residual():
    g = torch.Generator().manual_seed(1)
    residuals = torch.rand(2, 6, 3, 3, generator=g, dtype=torch.float64)
    ranked = torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64)
    got = rrs_select(residuals, ranked, 2).numpy()
    r, k = residuals.numpy(), ranked.numpy()
    for b in range(2):
        by_max = np.argsort(-k[b].reshape(6, -1).max(1))[:2]
        by_mean = np.argsort(-k[b].reshape(6, -1).mean(1))[:2]
        np.testing.assert_array_equal(got[b], r[b][np.concatenate([by_max, by_mean])])
    # the module ranks through its BatchNorm (batch statistics while training), gathers the raw residual
    rrs = RRS(6, 2).double().train()
    seen = {}
    rrs.body.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0].detach()))
    logits = rrs(residuals, (8, 8))
    mean, var = residuals.mean((0, 2, 3), keepdim=True), residuals.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = rrs_select(residuals, (residuals - mean) / torch.sqrt(var + 1e-5), 2)
    torch.testing.assert_close(seen["x"], expected)
    assert tuple(logits.shape) == (2, 2, 8, 8)


def test_losses_are_cross_entropy_plus_the_sum_of_reconstruction_mse():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).double()
    rec = [torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    target = [torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    losses = realnet_losses({"logits": logits, "rec": rec, "target_selected": target}, mask)
    p = torch.softmax(logits, 1).numpy()
    m = mask[:, 0].numpy().astype(int)
    ce = -np.mean(np.log(np.where(m == 1, p[:, 1], p[:, 0])))
    mse = sum(((a.numpy() - b.numpy()) ** 2).mean() for a, b in zip(rec, target))
    assert float(losses["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(losses["mse"]) == pytest.approx(mse, rel=1e-5)
    assert float(losses["loss"]) == pytest.approx(ce + mse, rel=1e-5)


def test_synthesis_is_realnets_dtd_branch():
    p = REALNET_SYNTHESIS
    # half the samples clean; texture weight U(0.2, 1) = image weight U(0, 0.8); 3 of the 10 augmenters
    assert (p.clean_probability, p.beta, p.texture_augmenters, p.scales, p.mask_angle, p.rotate_probability) == (
        0.5, (0.0, 0.8), 3, (0, 5), 90.0, 0.0)


# ------------------------------------------------------------------------------------------ fitting
def test_tiny_fit_lowers_each_loss_and_sets_the_afs_indices(fitted):
    rows = fitted.history_
    assert len(rows) == 4 and rows[-1]["iterations"] == 8
    assert rows[-1]["ce"] < rows[0]["ce"] and rows[-1]["mse"] < rows[0]["mse"]
    for i, (keep, channels) in enumerate(((16, 24), (24, 40))):
        idx = getattr(fitted.net, f"afs_{i}")
        assert idx.dtype == torch.long and len(idx) == keep and idx.tolist() == sorted(set(idx.tolist()))
        assert 0 <= int(idx.min()) and int(idx.max()) < channels and idx.tolist() != list(range(keep))
    assert [u.model_channels for u in fitted.net.unets] == [32, 32] and fitted.net.rrs.topk == 40
    images = torch.stack([SmoothImages(2, size=32, seed=3)[i]["image"] for i in range(2)])
    scores, maps = fitted.predict_batch(images)
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32 and 0 <= maps.min() and maps.max() <= 1
    pooled = np.lib.stride_tricks.sliding_window_view(maps, (16, 16), axis=(1, 2)).mean((-1, -2))
    np.testing.assert_allclose(scores, pooled.reshape(2, -1).max(1), rtol=1e-5)  # max of the 16x16 average pool


def test_image_sides_must_allow_two_halvings_of_the_coarsest_tap():
    with pytest.raises(ThreecadError, match="divisible by 32"):
        RealNetTexture(epochs=1, **TINY).fit(SmoothImages(2, size=48))


def _rows(history):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


def _small(work: Path | None = None, resume: bool = False, **extra) -> RealNetTexture:
    model = RealNetTexture(epochs=3, batch_size=4, seed=5, resume=resume, **{**TINY, **extra})
    model.work_dir = work
    return model


def _kill_worker(out: Path) -> None:
    """Subprocess: the small fit, paused (marker file) at its 4th step, the second step of epoch 2."""
    torch.set_num_threads(1)
    model = _small(out / "work")
    step, calls = model.training_step, {"n": 0}

    def pausing(module, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            (out / "paused").write_text("paused")
            time.sleep(120)
        return step(module, batch)

    model.training_step = pausing
    model.fit(SmoothImages(8, size=32))


def test_resume_after_a_kill_equals_an_uninterrupted_fit(tmp_path):
    kill_when_paused([sys.executable, __file__, "kill", str(tmp_path)], tmp_path / "paused",
                     subprocess_env(THREECAD_OFFLINE="1"))
    work = tmp_path / "work"
    assert torch.load(work / CHECKPOINT_FILE, weights_only=True)["epoch"] == 1
    resumed = _small(work, resume=True).fit(SmoothImages(8, size=32))
    full = _small().fit(SmoothImages(8, size=32))
    assert _rows(resumed.history_) == _rows(full.history_) and len(full.history_) == 3
    expected = full.state_dict()
    assert set(expected) == set(resumed.state_dict()) and "afs_0" in expected
    assert all(torch.equal(v, expected[k]) for k, v in resumed.state_dict().items())
    with pytest.raises(ThreecadError, match="lr: 0.0001 -> 0.001"):
        _small(work, resume=True, lr=1e-3).fit(SmoothImages(8, size=32))


# ------------------------------------------------------------------------------------------ options, saving
def test_registered_with_official_defaults_and_checked_options():
    assert "realnet-texture" in available() and "realnet" not in available()
    d = RealNetTexture.defaults()
    official = {"batch_size": 16, "lr": 1e-4, "layers": ("stride4", "stride8", "stride16", "stride32"),
                "afs_batches": 64, "encoder": "wide_resnet50_2", "pool_size": 16, "seed": 100, "size": 256}
    assert {k: d[k] for k in official} == official
    assert {k for k, o in RealNetTexture.options().items() if o.predict} == {"pool_size", "device"}
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"layers": ["stride3"]}, {"keep": [0, 1, 2, 3]}, {"rrs_topk": 0},
                {"pool_size": 0}, {"afs_batches": 0}, {"amp": "yes"}):
        with pytest.raises(ThreecadError, match=next(iter(bad))):
            build("realnet-texture", **bad)
    with pytest.raises(ThreecadError, match="keep needs one value per tap"):
        build("realnet-texture", keep=[8, 8])
    check_overrides(RealNetTexture, {"pool_size": 8}, {"pool_size": 4, "device": "cpu"})
    with pytest.raises(ThreecadError, match="keep is fixed"):
        check_overrides(RealNetTexture, {"keep": [8]}, {"keep": [4]})


def test_save_load_round_trip_and_pool_override(fitted, tmp_path):
    images = torch.stack([SmoothImages(2, size=32, seed=11)[i]["image"] for i in range(2)])
    run = fitted.save(tmp_path / "run")
    config = json.loads((run / CONFIG_FILE).read_text())["config"]
    assert config["encoder"] == LITE and config["keep"] == [16, 24]
    loaded = load_method(run)
    assert all(torch.equal(getattr(loaded.net, f"afs_{i}"), getattr(fitted.net, f"afs_{i}")) for i in range(2))
    for a, b in zip(fitted.predict_batch(images), loaded.predict_batch(images)):
        np.testing.assert_array_equal(a, b)
    scores, maps = load_method(run, pool_size=4).predict_batch(images)
    pooled = F.avg_pool2d(torch.from_numpy(maps)[:, None], 4, stride=1).flatten(1).amax(1).numpy()
    np.testing.assert_allclose(scores, pooled, rtol=1e-6)


def test_paper_encoder_falls_back_to_lite0_without_its_file(tmp_path, monkeypatch):
    monkeypatch.setenv("THREECAD_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    model = RealNetTexture(layers=["stride8"], device="cpu")
    model._build()
    assert model.encoder == "wide_resnet50_2" and model.resolved_config() == {"encoder": LITE}
    assert model.net.keep == [40]


def _cli_options() -> list[str]:
    return ["--device", "cpu", "--size", "64", "--set", f"encoder={LITE}", "--set", 'layers=["stride4","stride8"]',
            "--set", "afs_batches=1", "--set", "epochs=1", "--set", "batch_size=4"]


def test_cli_trains_predicts_and_evaluates(synth_root, tmp_path):
    from cli import cli
    from threecad.dataset.layout import list_categories

    category = list_categories(synth_root)[0]
    result = CliRunner().invoke(cli, ["train", "--method", "realnet-texture", "--dataset", str(synth_root),
                                      "--category", category, "--out", str(tmp_path / "runs"), *_cli_options()])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / category
    assert (run / CHECKPOINT_FILE).is_file()
    assert json.loads((run / CONFIG_FILE).read_text())["method"] == "realnet-texture"
    result = CliRunner().invoke(cli, ["predict", "--run", str(run), "--dataset", str(synth_root),
                                      "--out", str(tmp_path / "maps"), "--set", "pool_size=8"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["evaluate", "--dataset", str(synth_root), "--predictions",
                                      str(tmp_path / "maps"), "--categories", category,
                                      "--json", str(tmp_path / "metrics.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())["categories"][category]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("i_auroc", "p_auroc"))


def test_cli_leaderboard_run(synth_root, tmp_path):
    from cli import cli
    from threecad.dataset.layout import list_categories

    category = list_categories(synth_root)[0]
    options = [o for o in _cli_options() if o != "--size" and o != "64"]
    result = CliRunner().invoke(cli, ["leaderboard", "run", "--method", "realnet-texture", "--dataset",
                                      str(synth_root), "--categories", category, "--store",
                                      str(tmp_path / "store.sqlite"), "--size", "64", "--warmup", "0", "--timed", "1",
                                      "--out", str(tmp_path / "out"), *options])
    assert result.exit_code == 0, result.output
    assert f"ran {category}" in result.output and "(realnet-texture)" in result.output


if __name__ == "__main__":
    role, out = sys.argv[1], Path(sys.argv[2])
    {"kill": _kill_worker}[role](out)
