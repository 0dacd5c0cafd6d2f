"""FastFlow (``baselines/fastflow.py``): the official parameter counts, FrEIA-0.2 block semantics
against a hand computation, invertibility and the log-determinant against a brute-force Jacobian,
loss and map against numpy, a tiny fit, exact resume after a killed subprocess, options, saving, the
runner.

Seconds in all: the ResNet-18 configuration is counted with random encoder weights (no file needed);
fits use the offline Lite0 on 64-px images.

This file is also the worker of the kill test: ``python tests/test_fastflow.py kill OUT METHOD CONFIG``
(repository on PYTHONPATH); ``tests/test_simplenet.py`` reuses :func:`killed_and_resumed`.
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
from killing import kill_when_paused, subprocess_env
from scipy.ndimage import gaussian_filter
from smooth_images import SmoothImages

from baselines.fastflow import FastFlow, FastFlowNet, build_flow, fastflow_loss, fastflow_map
from threecad.errors import ThreecadError
from threecad.methods import CONFIG_FILE, build, check_overrides, load_method
from threecad.methods.blocks import Teacher, count_parameters
from threecad.methods.training import CHECKPOINT_FILE

LITE = {"encoder": "efficientnet_lite0", "device": "cpu"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> FastFlow:
    """The default (paper) encoder, fitted offline: the ResNet-18 file is hidden, so it falls back to Lite0."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THREECAD_OFFLINE", "1")
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        return build("fastflow", epochs=3, batch_size=4, device="cpu", seed=0).fit(SmoothImages(8))


def _images(n: int, seed: int) -> torch.Tensor:
    data = SmoothImages(n, seed=seed)
    return torch.stack([data[i]["image"] for i in range(n)])


# ------------------------------------------------------------------------------------------ architecture
def test_resnet18_configuration_matches_the_official_parameter_counts():
    teacher = Teacher("resnet18", weights="random")
    net = FastFlowNet(teacher, (256, 256))
    assert net.shapes == [(64, 64, 64), (128, 32, 32), (256, 16, 16)]
    assert count_parameters(teacher) == 0
    assert sum(count_parameters(n) for n in net.norms) == 917_504  # one weight + bias per (c, h, w)
    assert sum(count_parameters(f) for f in net.flows) == 2_593_024
    assert count_parameters(net) == 3_510_528  # "3.51 M trainable" (anomalib v1+, alternating kernels)
    # the permutations are stored as frozen parameters: a naive count adds 1,376,256
    frozen = sum(p.numel() for f in net.flows for p in f.parameters() if not p.requires_grad)
    assert frozen == 1_376_256
    kernels = [block.subnet[0].kernel_size[0] for block in net.flows[0]]
    assert kernels == [3, 1] * 4
    assert count_parameters(FastFlowNet(teacher, (256, 256), conv3x3_only=True)) == 5_574_912  # anomalib v0


def test_lite0_configuration(lite_teacher):
    net = FastFlowNet(lite_teacher, (256, 256))
    assert net.shapes == [(24, 64, 64), (40, 32, 32), (112, 16, 16)]
    assert (sum(count_parameters(f) for f in net.flows), count_parameters(net)) == (446_528, 782_400)
    assert count_parameters(FastFlowNet(lite_teacher, (256, 256), conv3x3_only=True)) == 1_135_680


def test_coupling_block_is_freia_0_2_all_in_one_block():
    """One block by hand: the first ceil(C/2) channels condition the rest, the whole subnet output
    scaled by 0.1, s = 2 tanh(.), the softplus global affine starting at exactly 1, then the hard
    permutation; log|det| = sum s + H W sum log(scale)."""
    torch.manual_seed(0)
    block = build_flow((5, 3, 4), steps=1)[0].double()
    assert block.splits == [3, 2]
    scale = 0.1 * F.softplus(block.global_scale, beta=0.5)
    torch.testing.assert_close(scale, torch.ones_like(scale), rtol=1e-6, atol=0)  # git tag v0.2: 1.0013
    perm = block.w_perm[:, :, 0, 0]
    assert not block.w_perm.requires_grad and torch.equal(perm.sum(0), torch.ones(5, dtype=torch.float64))
    assert torch.equal(block.w_perm_inv[:, :, 0, 0], perm.T)
    with torch.no_grad():
        block.global_scale.normal_(0, 3)
        block.global_offset.normal_()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    (y,), logdet = block((x,))
    with torch.no_grad():
        a = 0.1 * block.subnet(x[:, :3])
        s, t = 2 * torch.tanh(a[:, :2]), a[:, 2:]
        g = 0.1 * F.softplus(block.global_scale, beta=0.5)
        u = torch.cat([x[:, :3], x[:, 3:] * torch.exp(s) + t], 1) * g + block.global_offset
        expected = torch.einsum("ij,bjhw->bihw", perm, u)
        expected_logdet = s.sum((1, 2, 3)) + 12 * torch.log(g).sum()
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(logdet, expected_logdet)


def _randomised_flow(shape, steps: int, seed: int):
    """A flow far from the identity: random global affines, subnet outputs scaled up."""
    torch.manual_seed(seed)
    flow = build_flow(shape, steps=steps).double()
    with torch.no_grad():
        for block in flow:
            block.global_scale.normal_(0, 3)
            block.global_offset.normal_()
            block.subnet[-1].weight.mul_(20)
    return flow


def test_flow_is_invertible_and_its_log_determinant_is_the_jacobians():
    flow = _randomised_flow((3, 2, 2), steps=4, seed=1)  # kernels 3, 1, 3, 1 on 12 dimensions
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    z, logdet = flow(x)
    assert float((z - x).detach().abs().max()) > 0.5  # not near the identity
    back, back_logdet = flow(z, rev=True)
    torch.testing.assert_close(back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(back_logdet, -logdet)

    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 3, 2, 2))[0].flatten(), x.flatten())
    sign, logabs = torch.linalg.slogdet(jacobian)
    assert float(sign) != 0
    torch.testing.assert_close(logdet[0], logabs, rtol=1e-9, atol=1e-9)


def test_network_reverse_recovers_the_normalised_features(lite_teacher):
    torch.manual_seed(0)
    net = FastFlowNet(lite_teacher, (32, 32)).eval()
    images = _images(2, seed=1)[:, :, :32, :32]
    with torch.no_grad():
        out = net({"image": images})
        normalised = [norm(f) for norm, f in zip(net.norms, lite_teacher(images))]
        for back, f in zip(net.reverse(out["z"]), normalised):
            torch.testing.assert_close(back, f, rtol=1e-4, atol=1e-4)
        cached = net({"features": lite_teacher(images)})  # cached features give the same result
    assert all(torch.equal(a, b) for a, b in zip(cached["z"], out["z"]))


# ------------------------------------------------------------------------------------------ loss and map
def _bilinear_half_pixel(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), separable np.interp."""
    def axis(n_in: int, n_out: int) -> np.ndarray:
        return (np.arange(n_out) + 0.5) * n_in / n_out - 0.5

    rows = np.stack([np.interp(axis(m.shape[1], size[1]), np.arange(m.shape[1]), r) for r in m])
    return np.stack([np.interp(axis(m.shape[0], size[0]), np.arange(m.shape[0]), c) for c in rows.T]).T


def test_loss_and_map_equal_numpy():
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(3, c, s, s, generator=g, dtype=torch.float64) for c, s in ((4, 8), (6, 4), (8, 2))]
    logdets = [torch.randn(3, generator=g, dtype=torch.float64) for _ in zs]
    expected = sum(np.mean(0.5 * (z.numpy() ** 2).reshape(3, -1).sum(1) - ld.numpy()) for z, ld in zip(zs, logdets))
    assert float(fastflow_loss(zs, logdets)) == pytest.approx(expected, rel=1e-6)
    got = fastflow_map(zs, (16, 24)).numpy()
    for b in range(3):
        levels = [_bilinear_half_pixel(-np.exp(-0.5 * (z[b].numpy() ** 2).mean(0)), (16, 24)) for z in zs]
        np.testing.assert_allclose(got[b], np.mean(levels, 0), rtol=1e-5, atol=1e-6)
    assert got.max() < 0 and got.min() >= -1


def test_predict_returns_the_map_and_its_maximum(fitted, tmp_path):
    images = _images(2, seed=7)
    scores, maps = fitted.predict_batch(images)
    assert scores.shape == (2,) and maps.shape == (2, 64, 64) and maps.dtype == np.float32
    with torch.no_grad():
        out = fitted.net.eval()({"image": images})
    raw = fastflow_map(out["z"], (64, 64)).numpy()
    smoothed = np.stack([gaussian_filter(m.astype(np.float64), sigma=4.0, mode="reflect") for m in raw])
    np.testing.assert_allclose(maps, smoothed, rtol=1e-5, atol=1e-6)  # the default sigma 4 (validated)
    np.testing.assert_allclose(scores, maps.reshape(2, -1).max(1))
    unsmoothed = load_method(fitted.save(tmp_path / "run"), sigma=0.0).predict_batch(images)[1]
    np.testing.assert_allclose(unsmoothed, raw, rtol=1e-6)  # sigma=0: anomalib's map
    with pytest.raises(ThreecadError, match="trained at 64x64"):
        fitted.predict_batch(_images(1, seed=1)[:, :, :32, :32])


# ------------------------------------------------------------------------------------------ fitting
def test_tiny_fit_lowers_the_loss_runs_the_encoder_once_per_image_and_trains_only_the_flow(monkeypatch):
    calls = []
    original = Teacher.forward
    monkeypatch.setattr(Teacher, "forward", lambda self, images: calls.append(len(images)) or original(self, images))
    model = FastFlow(epochs=4, batch_size=4, seed=0, **LITE)
    data = SmoothImages(8)
    net = model._build((64, 64))
    encoder_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    perm_before = net.flows[0][0].w_perm.clone()
    calls.clear()
    model.fit(data)
    losses = [row["loss"] for row in model.history_]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert sum(calls) == len(data)  # cached: epochs 2-4 cost only the flows
    assert all(torch.equal(v, net.encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert torch.equal(net.flows[0][0].w_perm, perm_before)
    optimizer, _ = model.configure_optimizers(net)
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 1e-5
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == count_parameters(net)
    calls.clear()
    FastFlow(epochs=2, batch_size=4, seed=0, feature_cache=False, **LITE).fit(data)
    assert sum(calls) == 1 + 2 * len(data)  # the size probe, then every image every epoch


def test_seed_fixes_weights_and_permutations(lite_teacher):
    def perms(seed):
        model = FastFlow(seed=seed, **LITE)
        return [block.w_perm.clone() for flow in model._build((32, 32)).flows for block in flow]

    assert all(torch.equal(a, b) for a, b in zip(perms(3), perms(3)))
    assert any(not torch.equal(a, b) for a, b in zip(perms(3), perms(4)))


def _rows(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


def _kill_worker(out: Path, name: str, config: dict) -> None:
    """Subprocess: fit, pausing (to be killed) right after the first checkpoint is written."""
    from threecad.methods import training
    from threecad.progress import set_progress

    torch.set_num_threads(1)
    set_progress(False)
    save = training.save_checkpoint

    def save_then_pause(path, state):
        save(path, state)
        (out / "paused").write_text("paused")
        time.sleep(120)

    training.save_checkpoint = save_then_pause
    method = build(name, **config)
    method.work_dir = out / "run"
    method.fit(SmoothImages(8))


def killed_and_resumed(name: str, config: dict, tmp_path: Path):
    """Fit ``name`` uninterrupted, and in a subprocess SIGKILLed after its first epoch then resumed
    here; asserts identical history and weights, returns the resumed method."""
    full = build(name, **config)
    full.work_dir = tmp_path / "full"
    full.fit(SmoothImages(8))
    kill_when_paused([sys.executable, __file__, "kill", str(tmp_path), name, json.dumps(config)],
                     tmp_path / "paused", subprocess_env())
    state = torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 1 and state["fingerprint"]["features"] == "cached"
    resumed = build(name, resume=True, **config)
    resumed.work_dir = tmp_path / "run"
    resumed.fit(SmoothImages(8))
    assert _rows(resumed.history_) == _rows(full.history_)
    assert len(full.history_) == config["epochs"]
    expected = full.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.state_dict().items())
    # resuming with recomputed features (or any other setting) would mix two runs: refused
    other = build(name, resume=True, feature_cache=False, **config)
    other.work_dir = tmp_path / "run"
    with pytest.raises(ThreecadError, match="features: 'cached' -> 'recomputed'"):
        other.fit(SmoothImages(8))
    return resumed


def test_resume_after_a_killed_subprocess_equals_an_uninterrupted_fit(tmp_path):
    killed_and_resumed("fastflow", {"epochs": 3, "batch_size": 4, "seed": 1, **LITE}, tmp_path)


# ------------------------------------------------------------------------------------------ options, saving
def test_options_are_declared_and_checked():
    assert {k for k, o in FastFlow.options().items() if o.predict} == {"sigma", "device"}
    d = FastFlow.defaults()
    assert (d["epochs"], d["batch_size"], d["lr"], d["weight_decay"], d["flow_steps"], d["hidden_ratio"],
            d["conv3x3_only"], d["clamp"], d["encoder"], d["sigma"]) == (20, 32, 1e-3, 1e-5, 8, 1.0, True, 2.0,
                                                                        "resnet18", 4.0)  # validated
    for bad in ({"flow_steps": 0}, {"hidden_ratio": 0.0}, {"clamp": 0.0}, {"lr": 0.0}, {"weight_decay": -1e-5},
                {"sigma": -1.0}, {"cache_gb": -1.0}, {"epochs": 0}, {"conv3x3_only": "yes"}, {"feature_cache": 1}):
        with pytest.raises(ThreecadError, match=next(iter(bad))):
            build("fastflow", **bad)
    check_overrides(FastFlow, {"sigma": 0.0}, {"sigma": 4.0, "device": "cpu"})
    with pytest.raises(ThreecadError, match="flow_steps is fixed"):
        check_overrides(FastFlow, {"flow_steps": 8}, {"flow_steps": 4})


def test_save_load_round_trip_and_the_recorded_encoder(fitted, tmp_path):
    assert fitted.encoder == "resnet18"  # the option is never rewritten ...
    run = fitted.save(tmp_path / "run")
    config = json.loads((run / CONFIG_FILE).read_text())
    assert config["method"] == "fastflow" and config["config"]["encoder"] == "efficientnet_lite0"  # ... what was used
    loaded = load_method(run)
    images = _images(3, seed=11)
    for a, b in zip(fitted.predict_batch(images), loaded.predict_batch(images)):
        np.testing.assert_array_equal(a, b)
    scores, maps = load_method(run, sigma=4.0).predict([(images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)])
    assert scores.shape == (1,) and maps[0].shape == (64, 64)


def test_runner_trains_predicts_and_evaluates(synth_root, tmp_path):
    from threecad.dataset.layout import list_categories
    from threecad.methods import runner
    from threecad.metrics import evaluate_predictions

    category = list_categories(synth_root)[0]
    runs = runner.train("fastflow", synth_root, [category], out=tmp_path / "runs", device="cpu", size=64,
                        config={"epochs": 1, "batch_size": 4, "encoder": "efficientnet_lite0"})
    saved = json.loads((runs[0] / CONFIG_FILE).read_text())["config"]
    assert (saved["size"], saved["encoder"], saved["seed"]) == (64, "efficientnet_lite0", 42)
    assert (runs[0] / CHECKPOINT_FILE).is_file()
    out = runner.predict(runs[0], synth_root, tmp_path / "pred")
    metrics = evaluate_predictions(synth_root, out, categories=[category])["categories"][category]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("i_auroc", "p_auroc"))


if __name__ == "__main__" and sys.argv[1:2] == ["kill"]:
    _kill_worker(Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]))
