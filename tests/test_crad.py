"""CRAD (``baselines/crad.py``): the official parameter counts, the memory grids' own learning rate,
the refinement step and the maps' 21x21 mean filter against brute force, a tiny fit, exact resume after
a killed subprocess, options, saving, the runner and the CLI.

Seconds in all: the official configuration is counted on the head alone (B4 with random weights for the
tap widths); fits use the offline Lite0 on 64-px images with two bottlenecks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from smooth_images import SmoothImages
from test_fastflow import killed_and_resumed

from baselines.aggregation import resize_concat
from baselines.crad import CRAD, CRADHead, CRADNet, memory_adamw, refine
from threecad.errors import ThreecadError
from threecad.maps.postprocess import mean_filter
from threecad.methods import CONFIG_FILE, build, check_overrides, load_method
from threecad.methods.blocks import Teacher, count_parameters

LITE = {"encoder": "efficientnet_lite0", "device": "cpu", "blocks": 2}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> CRAD:
    """The default (paper) encoder, fitted offline: the B4 file is hidden, so it falls back to Lite0."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THREECAD_OFFLINE", "1")
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        return build("crad", epochs=2, batch_size=4, blocks=2, device="cpu", size=64).fit(SmoothImages(8))


def _images(n: int, seed: int) -> torch.Tensor:
    data = SmoothImages(n, seed=seed)
    return torch.stack([data[i]["image"] for i in range(n)])


# ------------------------------------------------------------------------------------------ architecture
def test_official_configuration_matches_the_parameter_count():
    head = CRADHead(216, (28, 28))  # B4 taps 56 + 160 at 224 px
    assert count_parameters(head) == 15_361_492  # "CRAD 15.36 M": every trainable parameter of the head
    assert sum(p.numel() for p in head.memories()) == 216 * 8 * 8 + 216 * 28 * 28 * 4 * 4 == 2_723_328
    assert count_parameters(head.decoder) == 12_450_240  # 11 x (SE without biases, BN affine counted)
    assert count_parameters(head.global_coord) == count_parameters(head.local_coord) == 47_306
    assert count_parameters(head.recover) == 93_312
    assert [b.expand.out_channels for b in head.decoder] == [864] * 11  # 4 C, the official 864, not hard-coded
    assert count_parameters(CRADHead(216, (28, 28), expansion=216)) == 5_261_116  # config_crad-s.yaml


def test_b4_taps_give_the_official_features_and_lite0_its_adaptation():
    b4 = CRADNet(Teacher("efficientnet_b4", weights="random", layers=("stride8", "stride16")), (224, 224))
    assert b4.encoder.channels == (56, 160) and (b4.head.channels, b4.head.feature_size) == (216, (28, 28))
    assert count_parameters(b4) == 15_361_492 and count_parameters(b4.encoder) == 0
    lite = CRADNet(Teacher("efficientnet_lite0", layers=("stride8", "stride16")), (256, 256))
    assert (lite.head.channels, lite.head.feature_size) == (152, (32, 32))
    assert count_parameters(lite) == 8_786_516  # the reference's 8.79 M (width 304, expansion 608)


def test_sampling_matches_bilinear_interpolation_of_the_grids():
    """Global: the whole C x h x w map at one point of the 4 x 4 lattice; local: per position, with
    align_corners=False (the lattice's cell centres at -1 + (2 i + 1) / n) and zero padding."""
    torch.manual_seed(0)
    head = CRADHead(3, (2, 2), blocks=1, local_grid=4, global_grid=4).double()
    glob = torch.tensor([[-0.75, -0.75], [0.1, -0.3]], dtype=torch.float64)  # (0, 0) cell centre, then inside
    local = torch.tensor([0.25, 0.6], dtype=torch.float64).view(1, 2, 1, 1).expand(2, 2, 2, 2).contiguous()
    sampled = head.sample(glob, local)

    def bilinear(grid: np.ndarray, u: float, v: float) -> np.ndarray:
        n = grid.shape[-1]
        px, py = ((u + 1) * n - 1) / 2, ((v + 1) * n - 1) / 2  # align_corners=False
        x0, y0 = int(np.floor(px)), int(np.floor(py))
        out = np.zeros(grid.shape[0])
        for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                if 0 <= yy < n and 0 <= xx < n:
                    out += wy * wx * grid[:, yy, xx]
        return out

    memory = head.global_memory.detach().numpy()[0]
    np.testing.assert_allclose(sampled[0, :3].detach().numpy().ravel(), memory[:, 0, 0])
    np.testing.assert_allclose(sampled[1, :3].detach().numpy().ravel(), bilinear(memory, 0.1, -0.3))
    expected_local = bilinear(head.local_memory.detach().numpy()[0], 0.25, 0.6)
    for i, j in ((0, 0), (1, 1)):
        np.testing.assert_allclose(sampled[1, 3:, i, j].detach().numpy(), expected_local)


# ------------------------------------------------------------------------------------------ optimiser
def test_grids_get_their_own_learning_rate_in_a_single_process(lite_teacher):
    model = CRAD(**LITE)
    net = model._build((64, 64))
    optimizer, scheduler = model.configure_optimizers(net)
    groups = optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 0.1] and all(g["weight_decay"] == 0.01 for g in groups)
    assert [id(p) for p in groups[1]["params"]] == [id(net.head.local_memory), id(net.head.global_memory)]
    assert sum(p.numel() for g in groups for p in g["params"]) == count_parameters(net)
    assert not any(p is q for p in groups[0]["params"] for q in groups[1]["params"])
    assert (scheduler.step_size, scheduler.gamma) == (40, 0.1)
    # the first AdamW step moves a parameter by lr * g / (|g| + eps) + lr * wd * p: about 0.1 for a grid entry
    grid_before = net.head.global_memory.detach().clone()
    conv_before = net.head.recover.weight.detach().clone()
    loss = model.training_step(net.train(), {"image": _images(2, seed=0)})["loss"]
    loss.backward()
    grad = net.head.global_memory.grad.clone()
    optimizer.step()
    step = grid_before - net.head.global_memory.detach()
    expected = 0.1 * grad / (grad.abs() + 1e-8) + 0.1 * 0.01 * grid_before  # Adam's eps 1e-8
    assert float(step.abs().max()) > 0.09
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-6)
    conv_step = (conv_before - net.head.recover.weight.detach()).abs().max()
    assert 5e-4 < float(conv_step) < 2e-3  # the network moved at lr 1e-3


def test_memory_adamw_groups_by_identity_not_by_name():
    """The official rule picked the grids by the third dotted name component ('query'), which only
    matches a DDP-wrapped model; here the grids are found whatever the module is called."""
    net = CRADNet(Teacher("efficientnet_lite0", layers=("stride8", "stride16")), (32, 32), blocks=1)
    wrapped = torch.nn.ModuleDict({"anything": net})
    optimizer = memory_adamw(wrapped["anything"], 1e-3, 0.1, 0.01)
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in net.head.memories()}


# ------------------------------------------------------------------------------------------ refinement and maps
def test_refinement_equals_a_brute_force_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 4)) * 3
    x_hat = x + rng.normal(size=x.shape) * rng.uniform(0, 8, size=(2, 1, 3, 4))  # errors both sides of e = 10
    got, gate = refine(torch.from_numpy(x_hat), torch.from_numpy(x), mse_coef=0.05)
    expected, gates = np.zeros_like(x), np.zeros((2, 1, 3, 4))
    for b in range(2):
        for i in range(3):
            for j in range(4):
                a, r = x[b, :, i, j], x_hat[b, :, i, j]
                e = np.mean((r - a) ** 2)
                m = 1.0 if e < 10 else 0.0  # 1 - round(clamp(0.05 e, 0, 1))
                cos = a @ r / (np.linalg.norm(a) * np.linalg.norm(r))
                s = 0.3 * m + 0.7 * cos
                expected[b, :, i, j] = s * a + (1 - s) * r
                gates[b, 0, i, j] = m
    assert 0 < gates.mean() < 1  # both branches exercised
    np.testing.assert_array_equal(gate.numpy(), gates)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)


def _brute_mean(m: np.ndarray, window: int) -> np.ndarray:
    """Zero-padded window mean, the zeros counted (window**2 in every denominator)."""
    r = window // 2
    padded = np.pad(m, r)
    return np.array([[padded[i:i + window, j:j + window].sum() / window**2 for j in range(m.shape[1])]
                     for i in range(m.shape[0])])


def _brute_valid_max(m: np.ndarray, window: int) -> float:
    k = min(window, *m.shape)
    return max(m[i:i + k, j:j + k].mean() for i in range(m.shape[0] - k + 1) for j in range(m.shape[1] - k + 1))


def test_mean_filter_equals_a_brute_force_mean():
    maps = torch.rand(2, 40, 33, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = mean_filter(maps, 21).numpy()
    assert got.shape == (2, 40, 33)
    for b in range(2):
        np.testing.assert_allclose(got[b], _brute_mean(maps[b].numpy(), 21), rtol=1e-6, atol=1e-7)
    assert torch.equal(mean_filter(maps, 1), maps.float())
    with pytest.raises(ValueError, match="odd"):
        mean_filter(maps, 20)


def test_predict_is_the_filtered_map_of_the_refined_error_and_its_pooled_maximum(fitted, tmp_path):
    images = _images(2, seed=7)
    scores, maps = fitted.predict_batch(images)
    assert scores.shape == (2,) and maps.shape == (2, 64, 64) and maps.dtype == np.float32
    with torch.no_grad():
        out = fitted.net.eval()({"image": images})
        x, x_hat = out["x"], fitted.net.head(out["x"])
    refined, _ = refine(x_hat, x, fitted.net.mse_coef)
    torch.testing.assert_close(out["x_tilde"], refined)
    error = np.sqrt(((refined - x).numpy() ** 2).sum(1))  # L2 over channels, at stride 8
    upsampled = F.interpolate(torch.from_numpy(error)[:, None], size=(64, 64), mode="bilinear",
                              align_corners=True)[:, 0].numpy()
    for b in range(2):
        expected = _brute_mean(upsampled[b], 21)
        np.testing.assert_allclose(maps[b], expected, rtol=1e-5, atol=1e-6)
        assert scores[b] == pytest.approx(_brute_valid_max(expected, 32), rel=1e-5)
    raw = load_method(fitted.save(tmp_path / "run"), mean_filter=1, score_pool=1).predict_batch(images)
    np.testing.assert_allclose(raw[1], upsampled, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(raw[0], upsampled.reshape(2, -1).max(1), rtol=1e-5)
    with pytest.raises(ThreecadError, match="trained at 64x64"):
        fitted.predict_batch(_images(1, seed=1)[:, :, :32, :32])


# ------------------------------------------------------------------------------------------ fitting
def test_tiny_fit_lowers_the_loss_runs_the_encoder_once_per_image_and_keeps_it_frozen(monkeypatch):
    calls = []
    original = Teacher.forward
    monkeypatch.setattr(Teacher, "forward", lambda self, images: calls.append(len(images)) or original(self, images))
    model = CRAD(epochs=4, batch_size=4, seed=0, **LITE)
    data = SmoothImages(8)
    net = model._build((64, 64))
    encoder_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    grids_before = [p.detach().clone() for p in net.head.memories()]
    calls.clear()
    model.fit(data)
    losses = [row["loss"] for row in model.history_]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
    assert all(0.0 <= row["gate"] <= 1.0 for row in model.history_)
    assert sum(calls) == len(data)  # cached: epochs 2-4 cost only the head
    assert all(torch.equal(v, net.encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert all(not torch.equal(a, p) for a, p in zip(grids_before, net.head.memories()))  # the grids learn


def test_the_neck_is_the_align_corners_resize_and_concat():
    g = torch.Generator().manual_seed(0)
    f8, f16 = torch.rand(1, 2, 4, 4, generator=g), torch.rand(1, 3, 2, 2, generator=g)
    fused = resize_concat([f8, f16], align_corners=True)
    assert fused.shape == (1, 5, 4, 4) and torch.equal(fused[:, :2], f8)
    # align_corners=True: the corners are the source corners, the rest linear between them
    torch.testing.assert_close(fused[0, 2:, 0, 0], f16[0, :, 0, 0])
    torch.testing.assert_close(fused[0, 2:, 3, 3], f16[0, :, 1, 1])
    torch.testing.assert_close(fused[0, 2:, 0, 1], f16[0, :, 0, 0] * 2 / 3 + f16[0, :, 0, 1] / 3)


def test_resume_after_a_killed_subprocess_equals_an_uninterrupted_fit(tmp_path):
    resumed = killed_and_resumed("crad", {"epochs": 3, "batch_size": 4, "seed": 1, **LITE}, tmp_path)
    assert resumed.history_[0]["gate"] >= 0


# ------------------------------------------------------------------------------------------ options, saving
def test_options_are_declared_and_checked():
    assert {k for k, o in CRAD.options().items() if o.predict} == {"mean_filter", "score_pool", "sigma", "device"}
    d = CRAD.defaults()
    assert (d["epochs"], d["batch_size"], d["lr"], d["grid_lr"], d["weight_decay"], d["lr_step"], d["clip_grad_norm"],
            d["blocks"], d["local_grid"], d["global_grid"], d["noise_std"], d["gate_weight"], d["mean_filter"],
            d["score_pool"], d["encoder"], d["sigma"], d["size"]) == (
        50, 64, 1e-3, 0.1, 0.01, 40, 0.1, 11, 8, 4, 0.05, 0.3, 21, 32, "efficientnet_b4", 0.0, 224)
    for bad in ({"grid_lr": 0.0}, {"lr": -1.0}, {"blocks": 0}, {"local_grid": 1}, {"gate_weight": 1.5},
                {"mse_coef": -0.1}, {"noise_std": -1.0}, {"score_pool": 0}, {"mean_filter": 0}, {"epochs": 0},
                {"clip_grad_norm": 0.0}, {"expansion": 0}):
        with pytest.raises(ThreecadError, match=next(iter(bad))):
            build("crad", **bad)
    with pytest.raises(ThreecadError, match="mean_filter takes an odd"):
        build("crad", mean_filter=20)
    check_overrides(CRAD, {"mean_filter": 1, "score_pool": 16}, {"mean_filter": 21, "score_pool": 32})
    with pytest.raises(ThreecadError, match="mse_coef is fixed"):
        check_overrides(CRAD, {"mse_coef": 0.05}, {"mse_coef": 0.01})


def test_save_load_round_trip_and_the_recorded_settings(fitted, tmp_path):
    from baselines.crad import LITE_MSE_COEF

    assert fitted.encoder == "efficientnet_b4" and fitted.mse_coef is None  # the options are never rewritten ...
    run = fitted.save(tmp_path / "run")
    config = json.loads((run / CONFIG_FILE).read_text())["config"]
    assert (config["encoder"], config["expansion"], config["mse_coef"]) == ("efficientnet_lite0", 608, LITE_MSE_COEF)
    loaded = load_method(run)
    assert loaded.net.mse_coef == LITE_MSE_COEF
    images = _images(3, seed=11)
    for a, b in zip(fitted.predict_batch(images), loaded.predict_batch(images)):
        np.testing.assert_array_equal(a, b)
    scores, maps = loaded.predict([(images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)])
    assert scores.shape == (1,) and maps[0].shape == (64, 64)


def test_cli_trains_predicts_and_evaluates(synth_root, tmp_path):
    from cli import cli
    from threecad.dataset.layout import list_categories
    from threecad.methods.training import CHECKPOINT_FILE

    category = list_categories(synth_root)[0]
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--method", "crad", "--dataset", str(synth_root), "--category", category,
                                 "--out", str(tmp_path / "runs"), "--device", "cpu", "--size", "64", "--epochs", "1",
                                 "--batch-size", "4", "--set", "encoder=efficientnet_lite0", "--set", "blocks=2"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / category
    saved = json.loads((run / CONFIG_FILE).read_text())["config"]
    assert (saved["size"], saved["encoder"], saved["blocks"]) == (64, "efficientnet_lite0", 2)
    assert (run / CHECKPOINT_FILE).is_file()
    result = runner.invoke(cli, ["predict", "--run", str(run), "--dataset", str(synth_root), "--out",
                                 str(tmp_path / "pred")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["evaluate", "--dataset", str(synth_root), "--predictions", str(tmp_path / "pred"),
                                 "--categories", category, "--json", str(tmp_path / "metrics.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())["categories"][category]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("i_auroc", "p_auroc"))


def test_predict_runs_the_inference_module_and_it_exports_to_onnx(fitted, tmp_path):
    from threecad.export.onnx import OnnxPredictor, export_onnx
    from threecad.methods.runner import save_run

    images = _images(2, seed=5)
    scores, maps = fitted.predict_batch(images)
    with torch.no_grad():
        ref_scores, ref_maps = fitted.inference_module()(images)
    np.testing.assert_array_equal(scores, ref_scores.numpy())
    np.testing.assert_array_equal(maps, ref_maps.numpy())
    assert CRAD.exportable()
    run = tmp_path / "crad"
    save_run(run, fitted, {"method": "crad", "category": "tiny", "dataset": "smooth", "seed": 0})
    model = export_onnx(run, tmp_path / "crad.onnx")
    native = [(images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)[:48], images[1]]
    torch_scores, torch_maps = load_method(run, device="cpu").predict(native)
    onnx_scores, onnx_maps = OnnxPredictor(model, threads=1).predict(native)
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-4, atol=1e-4)
    for ours, reference in zip(onnx_maps, torch_maps):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)


def test_cli_leaderboard_run(synth_root, tmp_path):
    from cli import cli
    from threecad.dataset.layout import list_categories

    category = list_categories(synth_root)[0]
    result = CliRunner().invoke(cli, ["leaderboard", "run", "--method", "crad", "--dataset", str(synth_root),
                                      "--categories", category, "--store", str(tmp_path / "store.sqlite"),
                                      "--device", "cpu", "--size", "64", "--warmup", "0", "--timed", "1",
                                      "--out", str(tmp_path / "out"), "--set", "encoder=efficientnet_lite0",
                                      "--set", "blocks=2", "--set", "epochs=1", "--set", "batch_size=4"])
    assert result.exit_code == 0, result.output
    assert f"ran {category}" in result.output and "(crad)" in result.output
