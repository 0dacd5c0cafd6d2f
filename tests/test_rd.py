"""RD and RD++ (``baselines/rd.py``), the shared reverse-distillation blocks
(``threecad.methods.blocks``) and the shared map post-processing (``threecad.maps.postprocess``).

Everything runs on CPU in seconds: the WideResNet-50-2 configuration is counted with random encoder
weights (no file needed) and meta-device OCBE/decoder/projections; fits use the offline Lite0
encoder on 64-px images.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from killing import subprocess_env
from scipy.ndimage import gaussian_filter
from smooth_images import SmoothImages

from baselines.rd import (
    RD,
    RDPP,
    NoisyImages,
    ProjectionLayer,
    RDNet,
    contrast_loss,
    noise_field,
    noise_sides,
    rdpp_losses,
    reconstruction_loss,
)
from threecad.errors import ThreecadError
from threecad.maps.postprocess import gaussian_blur, top_fraction_mean, upsample_maps
from threecad.methods import CONFIG_FILE, available, build, check_overrides, load_method
from threecad.methods.blocks import (
    Teacher,
    UpBottleneck,
    cosine_distance_map,
    count_parameters,
    flattened_cosine_loss,
)

WRN50_CHANNELS = (256, 512, 1024)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict:
    """RD and RD++ with the default (paper) encoder, fitted offline: the WRN50 file is hidden, so the
    encoder falls back to Lite0. Three epochs of two batches each."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THREECAD_OFFLINE", "1")
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        models = {}
        for name in ("rd", "rdpp"):
            extra = {"accumulate": 1} if name == "rdpp" else {}
            models[name] = build(name, epochs=3, batch_size=4, device="cpu", seed=0, **extra).fit(SmoothImages())
    return models


# ------------------------------------------------------------------------------------------ architecture
def test_wrn50_configuration_matches_the_official_parameter_counts():
    teacher = Teacher("wide_resnet50_2", weights="random")
    assert teacher.channels == WRN50_CHANNELS and not teacher.signed
    assert teacher.extractor._names == ["stem", "layer1", "layer2", "layer3"]  # layer4/fc not built
    assert count_parameters(teacher, trainable=False) == 24_862_528  # "24.86 M up to layer3"
    assert count_parameters(teacher) == 0  # frozen: requires_grad False everywhere
    with torch.device("meta"):  # counts and shapes without allocating 99 M parameters
        net = RDNet(teacher, projection=True)
        counts = {name: count_parameters(m) for name, m in net.trainable_modules().items()}
        assert counts == {"ocbe": 58_885_120, "decoder": 24_917_504, "projection": 15_486_912}
        assert [count_parameters(p) for p in net.projection] == [737_856, 2_950_272, 11_798_784]
        assert not any("conv4" in n or "bn4" in n for n, _ in net.ocbe.named_parameters())  # dead in the official code
        feats = [torch.empty(1, c, s, s) for c, s in zip(WRN50_CHANNELS, (64, 32, 16))]
        assert tuple(net.ocbe.fuse(feats).shape) == (1, 3072, 16, 16)
        embedding = net.ocbe(feats)
        assert tuple(embedding.shape) == (1, 2048, 8, 8)
        assert [tuple(t.shape) for t in net.decoder(embedding)] == [tuple(f.shape) for f in feats]
        # WRN50 is wider than every floor of the "wide" bottleneck: the same network
        wide = RDNet(teacher, bottleneck="wide")
        assert {name: count_parameters(m) for name, m in wide.trainable_modules().items()} == {
            "ocbe": 58_885_120, "decoder": 24_917_504}
    # ResNet taps follow a ReLU: the decoder stages keep theirs.
    assert all(stage[-1].relu_out for stage in net.decoder.stages)


def test_lite0_configuration_is_sized_from_its_channels(lite_teacher):
    torch.manual_seed(0)
    net = RDNet(lite_teacher, projection=True).train()
    assert lite_teacher.channels == (24, 40, 112) and lite_teacher.signed
    assert net.ocbe.out_channels == 224
    assert not any(stage[-1].relu_out for stage in net.decoder.stages)  # signed taps: last ReLU dropped
    assert all(isinstance(stage[-1], UpBottleneck) for stage in net.decoder.stages)
    # Projection inner widths are floored at 32 (24 -> 32, 32, 32 -> 24).
    assert [m.out_channels for m in net.projection[0] if isinstance(m, torch.nn.Conv2d)] == [32, 32, 32, 24]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x, x.flip(-1))
    assert [tuple(t.shape[1:]) for t in out["encoder"]] == [(24, 16, 16), (40, 8, 8), (112, 4, 4)]
    for key in ("decoded", "projected", "projected_noisy", "encoder_noisy"):
        assert [t.shape for t in out[key]] == [t.shape for t in out["encoder"]], key
    assert all(float(t.min()) < 0 for t in out["decoded"])  # can match signed features
    counts = {name: count_parameters(m) for name, m in net.trainable_modules().items()}
    assert counts == {"ocbe": 669_968, "decoder": 268_864, "projection": 219_392}  # literal scaling
    wide = RDNet(lite_teacher, bottleneck="wide")  # the reference's suggested wider Lite0 variant
    assert [count_parameters(wide.ocbe), count_parameters(wide.decoder)] == [891_600, 1_016_160]
    with torch.no_grad():
        assert [t.shape for t in wide.eval()(x)["decoded"]] == [t.shape for t in out["encoder"]]


def test_encoder_is_frozen_and_stays_in_eval_mode(lite_teacher):
    net = RDNet(lite_teacher).train()
    assert not lite_teacher.training and not lite_teacher.extractor.training
    assert all(not p.requires_grad for p in net.teacher.parameters())
    assert net.ocbe.training and net.decoder.training


def test_chunked_forward_normalises_each_chunk_like_separate_batches(lite_teacher):
    """RD++ accumulation: BatchNorm sees each ``batch_size`` piece, as two official steps would."""
    torch.manual_seed(0)
    net = RDNet(lite_teacher, projection=True).train()
    x, noisy = torch.rand(6, 3, 64, 64), torch.rand(6, 3, 64, 64)
    with torch.no_grad():
        whole = net(x, noisy, chunk=4)
        first, second = net(x[:4], noisy[:4]), net(x[4:], noisy[4:])
    for key in ("decoded", "projected", "projected_noisy"):
        for got, a, b in zip(whole[key], first[key], second[key]):
            torch.testing.assert_close(got, torch.cat([a, b]), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ losses and map
def _features(seed: int, batch: int = 3, shapes=((8, 8), (12, 4), (16, 2))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=g, dtype=torch.float64) for c, s in shapes]


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_flattened_cosine_loss_equals_a_brute_force_sum():
    enc, dec = _features(0), _features(1)
    expected = 0.0
    for e, d in zip(enc, dec):
        ev, dv = e.numpy().reshape(len(e), -1), d.numpy().reshape(len(d), -1)
        expected += np.mean([1 - ev[i] @ dv[i] / np.sqrt((ev[i] @ ev[i]) * (dv[i] @ dv[i])) for i in range(len(ev))])
    assert float(flattened_cosine_loss(enc, dec)) == pytest.approx(expected, rel=1e-6)


def test_rdpp_losses_equal_brute_force_terms():
    enc, dec, proj, noisy, proj_noisy = (_features(s) for s in range(5))
    expected_recon = sum(np.mean(1 - (a * p).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(p, axis=1)))
                         for a, p in ((x.numpy(), y.numpy()) for x, y in zip(proj_noisy, proj)))
    expected_contrast = sum(np.mean(np.maximum(0, _cos_rows(a.numpy().reshape(3, -1), p.numpy().reshape(3, -1)) - 0.5))
                            for a, p in zip(noisy, proj))
    assert float(reconstruction_loss(proj_noisy, proj)) == pytest.approx(expected_recon, rel=1e-6)
    assert float(contrast_loss(noisy, proj)) == pytest.approx(expected_contrast, rel=1e-6, abs=1e-9)
    # the official criterion, for the contrast term
    official = sum(torch.nn.CosineEmbeddingLoss(margin=0.5)(a.flatten(1), p.flatten(1), -torch.ones(3))
                   for a, p in zip(noisy, proj))
    assert float(contrast_loss(noisy, proj)) == pytest.approx(float(official), rel=1e-6, abs=1e-9)
    out = {"encoder": enc, "decoded": dec, "projected": proj, "encoder_noisy": noisy, "projected_noisy": proj_noisy}
    losses = rdpp_losses(out, proj_weight=0.3)
    distill = float(flattened_cosine_loss(enc, dec))
    proj_term = (0.01 * expected_recon + 0.1 * expected_contrast) / 1.11
    assert float(losses["proj"]) == pytest.approx(proj_term, rel=1e-6)
    assert float(losses["loss"]) == pytest.approx(distill + 0.3 * proj_term, rel=1e-6)


def _upsample_corners(m: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (h, h) to (size, size) with align_corners=True, separable np.interp."""
    h = m.shape[-1]
    src = np.arange(size) * (h - 1) / (size - 1)
    rows = np.stack([np.interp(src, np.arange(h), row) for row in m])
    return np.stack([np.interp(src, np.arange(h), col) for col in rows.T]).T


def test_map_equals_brute_force_cosine_distance_then_scipy(fitted):
    enc, dec = _features(3, batch=2, shapes=((8, 16), (12, 8), (16, 4))), _features(4, batch=2,
                                                                                 shapes=((8, 16), (12, 8), (16, 4)))
    got = cosine_distance_map(enc, dec, (32, 32)).numpy()
    for b in range(2):
        expected = 0
        for e, d in zip(enc, dec):
            ev, dv = e[b].numpy(), d[b].numpy()  # (C, h, h)
            cos = (ev * dv).sum(0) / np.maximum(np.linalg.norm(ev, axis=0) * np.linalg.norm(dv, axis=0), 1e-8)
            expected = expected + _upsample_corners(1 - cos, 32)
        np.testing.assert_allclose(got[b], expected, rtol=1e-5, atol=1e-6)

    model = fitted["rd"]
    images = torch.stack([SmoothImages(2, seed=7)[i]["image"] for i in range(2)])
    scores, maps = model.predict_batch(images)
    assert scores.shape == (2,) and maps.shape == (2, 64, 64) and maps.dtype == np.float32
    with torch.no_grad():
        out = model.net.eval()(images)
    raw = cosine_distance_map(out["encoder"], out["decoded"], (64, 64)).numpy()
    for b in range(2):
        np.testing.assert_allclose(maps[b], gaussian_filter(raw[b].astype(np.float64), sigma=4), rtol=1e-5, atol=1e-6)
    # image score: the mean of the top 1 % of the map (41 of 4096 pixels; the validated default)
    top = np.sort(maps.reshape(2, -1), axis=1)[:, -41:].mean(1)
    np.testing.assert_allclose(scores, top, rtol=1e-5)
    assert model.topk == 0.01 and fitted["rdpp"].topk == 0.0  # RD++ keeps the official maximum


@pytest.mark.parametrize("shape", [(50, 70), (5, 7), (1, 1), (2, 40), (33, 33)])
@pytest.mark.parametrize("sigma", [4.0, 1.0, 0.6])
def test_gaussian_blur_equals_scipy_reflect(shape, sigma):
    """Bit for bit after float32 rounding, also for maps smaller than the 33-tap kernel."""
    maps = np.random.default_rng(2).random((2, *shape)).astype(np.float32)
    got = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    assert got.dtype == np.float32 and got.shape == maps.shape
    for i in range(2):
        ref = gaussian_filter(maps[i].astype(np.float64), sigma=sigma, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(got[i], ref, rtol=1e-6, atol=1e-7)


def test_upsample_and_image_scores():
    patch = torch.rand(2, 4, 6, generator=torch.Generator().manual_seed(0))
    for corners in (False, True):
        up = upsample_maps(patch, (16, 24), 0.0, align_corners=corners)
        torch.testing.assert_close(up, F.interpolate(patch[:, None], size=(16, 24), mode="bilinear",
                                                     align_corners=corners)[:, 0])
    smoothed = upsample_maps(patch, (16, 24), 2.0, align_corners=True)
    torch.testing.assert_close(smoothed, gaussian_blur(upsample_maps(patch, (16, 24), 0.0, align_corners=True), 2.0))
    assert torch.equal(gaussian_blur(patch, 0.0), patch)
    maps = torch.rand(3, 10, 10)
    assert torch.equal(top_fraction_mean(maps, 0.0), maps.flatten(1).amax(1))
    torch.testing.assert_close(top_fraction_mean(maps, 0.05), maps.flatten(1).sort(1, descending=True).values[:, :5].mean(1))


# ------------------------------------------------------------------------------------------ RD++ noise
def test_noise_is_one_fixed_pattern_inside_one_rectangle():
    assert noise_sides(256) == (10, 32) and noise_sides(64) == (2, 8)
    field = noise_field((3, 31, 31), seed=3)
    assert field.shape == (3, 31, 31) and field.dtype == np.float32
    assert float(np.abs(field).max()) == pytest.approx(1.0)
    np.testing.assert_array_equal(field, noise_field((3, 31, 31), seed=3))
    assert not np.allclose(field, noise_field((3, 31, 31), seed=4))
    assert not np.allclose(field[0], field[2])  # the three channels differ

    class Zeros(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, index):
            return {"image": torch.zeros(3, 256, 256)}

    data = NoisyImages(Zeros(), field, amplitude=0.26, seed=0)
    rects = []
    for index in range(len(data)):
        item = data[index]
        assert torch.equal(item["image"], torch.zeros(3, 256, 256))
        rows, cols = torch.nonzero(item["noisy"].abs().sum(0), as_tuple=True)
        top, left, h, w = int(rows.min()), int(cols.min()), int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert 10 <= h <= 31 and 10 <= w <= 31 and top >= 1 and left >= 1
        # the crop always starts at the pattern's origin: every sample shows the same pattern
        expected = 0.26 * torch.from_numpy(field[:, :h, :w])
        torch.testing.assert_close(item["noisy"][:, top:top + h, left:left + w], expected)
        rects.append((top, left, h, w))
        torch.testing.assert_close(data[index]["noisy"], item["noisy"])  # deterministic per (seed, epoch, index)
    assert len(set(rects)) > 1
    data.set_epoch(1)
    assert any(not torch.equal(data[i]["noisy"], NoisyImages(Zeros(), field, 0.26, 0)[i]["noisy"]) for i in range(6))


# ------------------------------------------------------------------------------------------ fitting
def test_tiny_fits_lower_their_loss_and_only_train_ocbe_decoder_projections(lite_teacher):
    for cls, extra in ((RD, {}), (RDPP, {"accumulate": 2})):
        model = cls(encoder="efficientnet_lite0", epochs=4, batch_size=4, device="cpu", seed=0, **extra)
        net = model._build()
        encoder_before = {k: v.clone() for k, v in net.teacher.state_dict().items()}
        ocbe_before = {k: v.clone() for k, v in net.ocbe.state_dict().items()}
        model.fit(SmoothImages(8))
        losses = [row["loss"] for row in model.history_]
        assert len(losses) == 4 and losses[-1] < losses[0], (cls.name, losses)
        assert all(torch.equal(v, net.teacher.state_dict()[k]) for k, v in encoder_before.items())
        assert any(not torch.equal(v, net.ocbe.state_dict()[k]) for k, v in ocbe_before.items())
        if cls is RDPP:
            assert {"distill", "proj", "recon", "contrast"} <= set(model.history_[-1])
            # one step per 2 x 4 images: one Adam, two learning rates (OCBE + decoder first)
            assert model.history_[-1]["iterations"] == 4
            optimizer, _ = model.configure_optimizers(net)
            assert [g["lr"] for g in optimizer.param_groups] == [0.005, 0.001]
            assert optimizer.defaults["betas"] == (0.5, 0.999)


def test_fit_refuses_image_sides_not_divisible_by_32():
    model = RD(encoder="efficientnet_lite0", epochs=1, batch_size=2, device="cpu")
    with pytest.raises(ThreecadError, match="divisible by 32"):
        model.fit(SmoothImages(2, size=48))


# ------------------------------------------------------------------------------------------ options, saving
def test_registered_and_options_checked():
    assert {"rd", "rdpp"} <= set(available())
    assert {k for k, o in RD.options().items() if o.predict} == {"sigma", "topk", "device"}
    assert {k for k, o in RDPP.options().items() if o.predict} == {"sigma", "topk", "device"}
    assert set(RDPP.options()) - set(RD.options()) == {"proj_lr", "proj_weight", "accumulate", "noise_amplitude",
                                                       "noise_seed"}
    defaults = RD.defaults()
    assert (defaults["epochs"], defaults["batch_size"], defaults["lr"], defaults["sigma"], defaults["topk"],
            defaults["encoder"], defaults["bottleneck"]) == (200, 16, 0.005, 4.0, 0.01, "wide_resnet50_2", "wide")
    assert (RDPP.defaults()["topk"], RDPP.defaults()["bottleneck"]) == (0.0, "scaled")  # each its own validation
    for name, bad in (("rd", {"size": 100}), ("rd", {"lr": 0}), ("rd", {"topk": 1.5}), ("rd", {"epochs": 0}),
                      ("rd", {"sigma": -1.0}), ("rd", {"bottleneck": "huge"}), ("rdpp", {"accumulate": 0}),
                      ("rdpp", {"proj_lr": 0.0})):
        with pytest.raises(ThreecadError, match=next(iter(bad))):
            build(name, **bad)
    with pytest.raises(ThreecadError, match="no option"):
        build("rd", proj_lr=0.001)  # an RD++ option
    check_overrides(RD, {"sigma": 4.0, "epochs": 200}, {"sigma": 2.0, "topk": 0.01, "device": "cpu"})
    with pytest.raises(ThreecadError, match="epochs is fixed"):
        check_overrides(RD, {"sigma": 4.0, "epochs": 200}, {"epochs": 10})


def test_save_load_round_trip_gives_identical_maps_and_records_the_encoder(fitted, tmp_path):
    images = torch.stack([SmoothImages(3, seed=11)[i]["image"] for i in range(3)])
    for name, model in fitted.items():
        assert model.encoder == "wide_resnet50_2"  # the option is never rewritten ...
        run = model.save(tmp_path / name)
        config = json.loads((run / CONFIG_FILE).read_text())
        assert config["method"] == name
        assert config["config"]["encoder"] == "efficientnet_lite0"  # ... the saved config holds what was used
        loaded = load_method(run)
        assert loaded.encoder == "efficientnet_lite0"
        scores, maps = model.predict_batch(images)
        scores2, maps2 = loaded.predict_batch(images)
        np.testing.assert_array_equal(maps, maps2)
        np.testing.assert_array_equal(scores, scores2)
        # predict (the base class) takes native-size images and maps back to each size
        native = [(images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)]
        loaded_native = load_method(run, topk=0.01, sigma=2.0)
        s, m = loaded_native.predict(native)
        assert s.shape == (1,) and m[0].shape == (64, 64)
    # a run whose encoder file is missing here: a clear error, not a silently different network
    config = json.loads((tmp_path / "rd" / CONFIG_FILE).read_text())
    config["config"]["encoder"] = "wide_resnet50_2"
    (tmp_path / "rd" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THREECAD_OFFLINE", "1")
        mp.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
        with pytest.raises(ThreecadError, match="weight file"):
            load_method(tmp_path / "rd")


def test_projection_layer_is_the_official_stack():
    layer = ProjectionLayer(256)
    kinds = [type(m).__name__ for m in layer]
    assert kinds == ["Conv2d", "InstanceNorm2d", "LeakyReLU"] * 4
    assert [m.out_channels for m in layer if isinstance(m, torch.nn.Conv2d)] == [128, 64, 128, 256]
    assert all(m.bias is not None for m in layer if isinstance(m, torch.nn.Conv2d))
    assert all(not m.affine and not m.track_running_stats for m in layer if isinstance(m, torch.nn.InstanceNorm2d))
    assert all(m.negative_slope == 0.01 for m in layer if isinstance(m, torch.nn.LeakyReLU))


@pytest.mark.parametrize("name", ["rd", "rdpp"])
def test_runner_trains_predicts_and_evaluates(name, synth_root, tmp_path):
    from threecad.dataset.layout import list_categories
    from threecad.methods import runner
    from threecad.metrics import evaluate_predictions

    category = list_categories(synth_root)[0]
    runs = runner.train(name, synth_root, [category], out=tmp_path / "runs", device="cpu", size=64,
                        config={"epochs": 1, "batch_size": 4, "encoder": "efficientnet_lite0"})
    saved = json.loads((runs[0] / CONFIG_FILE).read_text())["config"]
    assert (saved["size"], saved["encoder"], saved["seed"]) == (64, "efficientnet_lite0", 111)
    assert (runs[0] / "checkpoint.pt").is_file()  # the engine's checkpoint moved into the run folder
    out = runner.predict(runs[0], synth_root, tmp_path / "pred")
    metrics = evaluate_predictions(synth_root, out, categories=[category])["categories"][category]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("i_auroc", "p_auroc"))


def test_torchrun_cli_train_and_predict_write_once_from_rank_0(synth_root, tmp_path):
    """`3cad train` and `3cad predict` under a real 2-process gloo torchrun: both ranks fit, rank 0
    alone writes the run folder and the maps."""
    from threecad.dataset.layout import list_categories, list_samples

    category = list_categories(synth_root)[0]
    cli_file = Path(__file__).resolve().parents[1] / "cli.py"
    env = subprocess_env()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--",
                str(cli_file)]  # "--": torchrun would take `--run` for its own `--run-path`
    train = ["train", "--method", "rd", "--dataset", str(synth_root), "--category", category, "--out",
             str(tmp_path / "runs"), "--device", "cpu", "--size", "64", "--epochs", "1", "--batch-size", "4",
             "--set", "encoder=efficientnet_lite0"]
    done = subprocess.run([*torchrun, *train], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run = tmp_path / "runs" / category
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no staging or checkpoint leftovers
    assert {"config.json", "weights.pt", "run.json", "checkpoint.pt"} <= {p.name for p in run.iterdir()}
    assert done.stdout.count(f"wrote {run}") == 1  # rank 0 alone reports (and writes)
    predict = ["predict", "--run", str(run), "--dataset", str(synth_root), "--out", str(tmp_path / "pred")]
    done = subprocess.run([*torchrun, *predict], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = (tmp_path / "pred" / "scores.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(list_samples(synth_root, category, "test"))  # header + each image once
