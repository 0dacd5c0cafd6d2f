"""UniAD (``baselines/uniad.py``) and torchvision's EfficientNet-B4 layout: the official parameter
counts, the neighbour mask against a brute-force loop (and that every attention receives it), the
jitter against the official formula, map and score against numpy/scipy, a tiny fit, exact resume after
a killed subprocess, options, saving, and the runner/CLI in both the unified and per-category modes.

Seconds in all: the B4 configuration is counted with random weights (no file needed); fits use the
offline Lite0 with a small transformer on 64- and 128-px images.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.ndimage import map_coordinates, uniform_filter
from smooth_images import SmoothImages
from test_fastflow import killed_and_resumed

from baselines.uniad import (
    LAYERS,
    PAPER_PARAMETERS,
    NeckEncoder,
    UniAD,
    UniADNet,
    jitter,
    neighbour_mask,
    uniad_map,
)
from threecad.backbones import FeatureExtractor, create_backbone
from threecad.errors import ThreecadError
from threecad.maps.postprocess import pooled_max
from threecad.methods import CONFIG_FILE, build, check_overrides, load_method
from threecad.methods.blocks import Teacher, build_teacher, count_parameters
from threecad.methods.training import CHECKPOINT_FILE, LOG_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

#: A small transformer on Lite0 for the fits (64 px: a 4x4 token grid, so a 3x3 mask).
TINY = {"encoder": "efficientnet_lite0", "device": "cpu", "hidden_dim": 32, "ffn_dim": 64, "num_heads": 2,
        "enc_layers": 1, "dec_layers": 1, "neighbor_size": 3}


@pytest.fixture(scope="module")
def b4_teacher() -> Teacher:
    return Teacher("efficientnet_b4", weights="random", layers=LAYERS)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> UniAD:
    """The default (paper) encoder, fitted offline: the B4 file is absent, so it falls back to Lite0."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THREECAD_OFFLINE", "1")
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        config = {k: v for k, v in TINY.items() if k != "encoder"}
        return build("uniad", epochs=2, batch_size=4, seed=0, **config).fit(SmoothImages(8))


def _images(n: int, seed: int) -> torch.Tensor:
    data = SmoothImages(n, seed=seed)
    return torch.stack([data[i]["image"] for i in range(n)])


# ------------------------------------------------------------------------------------------ backbone
def test_efficientnet_b4_has_torchvisions_parameter_count_layout_and_taps(b4_teacher):
    model = create_backbone("efficientnet_b4", weights="random")
    assert sum(p.numel() for p in model.parameters()) == 19_341_616  # torchvision's EfficientNet_B4 figure
    state = model.state_dict()
    # torchvision's names: stem, stage 1 (no expansion: depthwise, SE, project), stage 2 (expand first), head
    assert state["features.0.0.weight"].shape == (48, 3, 3, 3)
    assert state["features.1.0.block.1.fc1.weight"].shape == (12, 48, 1, 1)
    assert state["features.2.0.block.0.0.weight"].shape == (144, 24, 1, 1)
    assert state["features.2.0.block.2.fc1.weight"].shape == (6, 144, 1, 1)  # SE to a quarter of the input
    assert state["features.8.0.weight"].shape == (1792, 448, 1, 1)
    assert state["classifier.1.weight"].shape == (1000, 1792)
    assert [len(model.features[i]) for i in range(1, 8)] == [2, 4, 4, 6, 6, 8, 2]
    feats = b4_teacher(torch.rand(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 112, 112), (32, 56, 56), (56, 28, 28), (160, 14, 14)]
    fe = FeatureExtractor("efficientnet_b4", layers=("stride16", "features.4"), weights="random", device="cpu")
    assert fe.channels == {"stride16": 160, "features.4": 112}  # UniAD's tap is the end of the stage


def test_efficientnet_b4_weights_never_silently_random(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(ThreecadError, match="efficientnet_b4_rwightman-23ab8bcd.pth"):
        create_backbone("efficientnet_b4")
    saved = tmp_path / "b4.pth"
    reference = create_backbone("efficientnet_b4", weights="random")
    torch.save(reference.state_dict(), saved)
    loaded = create_backbone("efficientnet_b4", weights=saved)  # a torchvision-layout file loads strictly
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), reference(x), rtol=0, atol=0)
    with caplog.at_level(logging.WARNING):
        teacher = build_teacher("efficientnet_b4", layers=LAYERS)  # only the method-level fallback, with a warning
    assert teacher.name == "efficientnet_lite0" and "falling back" in caplog.text


# ------------------------------------------------------------------------------------------ architecture
def test_official_configuration_has_the_official_parameter_count(b4_teacher):
    net = UniADNet(NeckEncoder(b4_teacher), (224, 224))
    assert (net.channels, net.grid) == (272, (14, 14))
    assert count_parameters(net) == PAPER_PARAMETERS == 7_717_392  # the transformer; the backbone is frozen
    assert count_parameters(net.encoder) == 0
    assert count_parameters(net.row_embed) + count_parameters(net.col_embed) == 3_584
    assert [count_parameters(layer) for layer in net.encoder_layers] == [789_760] * 4
    assert [count_parameters(layer) for layer in net.decoder_layers] == [1_103_616] * 4
    assert count_parameters(net.decoder_layers[0].query) == 196 * 256
    assert (count_parameters(net.input_proj), count_parameters(net.output_proj)) == (69_888, 69_904)
    assert count_parameters(net.decoder_norm) == 512


def test_lite0_adaptation():
    net = UniADNet(NeckEncoder(Teacher("efficientnet_lite0", layers=LAYERS)), (256, 256))
    assert (net.channels, net.grid, count_parameters(net)) == (192, (16, 16), 7_738_304)


@pytest.mark.parametrize("h, w, size", [(14, 14, 7), (5, 9, 3), (4, 6, 1), (6, 5, 5)])
def test_neighbour_mask_is_exactly_the_window_around_each_query(h, w, size):
    mask = neighbour_mask(h, w, size)
    expected = np.zeros((h * w, h * w), bool)
    for i in range(h):
        for j in range(w):
            for k in range(h):
                for m in range(w):
                    expected[i * w + j, k * w + m] = abs(i - k) <= size // 2 and abs(j - m) <= size // 2
    np.testing.assert_array_equal(mask.numpy(), expected)
    if (h, w, size) == (14, 14, 7):
        assert int(mask[7 * 14 + 7].sum()) == 49  # an interior query hides exactly 7 x 7 keys, itself included


def test_an_even_or_too_large_mask_is_refused_not_widened():
    for even in (0, 8):
        with pytest.raises(ThreecadError, match="odd"):
            neighbour_mask(14, 14, even)
    with pytest.raises(ThreecadError, match="neighbor_size must be odd"):
        UniAD(neighbor_size=8)
    with pytest.raises(ThreecadError, match="hides every token"):
        UniADNet(NeckEncoder(Teacher("efficientnet_lite0", layers=LAYERS)), (64, 64), neighbor_size=7)


def test_every_attention_gets_the_mask_and_the_decoder_wiring(monkeypatch):
    """Encoder self-attention (q = k = x + pos, v = x); per decoder layer a cross-attention from its
    learned query to the encoder output, then an attention to the previous decoder layer's output
    (the encoder output for the first); the same 7x7 mask in all of them."""
    net = UniADNet(NeckEncoder(Teacher("efficientnet_lite0", layers=LAYERS)), (128, 128), hidden_dim=16, ffn_dim=8,
                   num_heads=2, enc_layers=2, dec_layers=2).eval()
    calls, outputs = [], {}
    original = torch.nn.MultiheadAttention.forward

    def spy(self, query, key, value, **kwargs):
        calls.append((self, query, key, value, kwargs.get("attn_mask")))
        return original(self, query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.MultiheadAttention, "forward", spy)
    for name, layer in [*[(f"enc{i}", m) for i, m in enumerate(net.encoder_layers)],
                        *[(f"dec{i}", m) for i, m in enumerate(net.decoder_layers)]]:
        layer.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out))
    net({"features": [torch.randn(2, 192, 8, 8)]})
    pos = net.position()
    enc, dec = net.encoder_layers, net.decoder_layers
    assert [c[0] for c in calls] == [enc[0].attn, enc[1].attn, dec[0].cross, dec[0].attn, dec[1].cross, dec[1].attn]
    assert all(torch.equal(q, k) for _, q, k, _, _ in calls[:2])  # self-attention
    memory = outputs["enc1"]
    for _, _, key, value, _ in (calls[2], calls[4]):  # cross-attention to the encoder output
        torch.testing.assert_close(value, memory)
        torch.testing.assert_close(key, memory + pos)
    torch.testing.assert_close(calls[2][1], dec[0].query.weight.expand(2, -1, -1) + pos)  # the layer's own query
    torch.testing.assert_close(calls[3][3], memory)  # the first layer's "previous output" is the encoder's
    torch.testing.assert_close(calls[5][3], outputs["dec0"])
    expected = neighbour_mask(8, 8, 7)
    assert all(mask is not None and torch.equal(mask, expected) for *_, mask in calls)


def test_jitter_matches_the_official_formula_and_is_recalibrated_for_the_width():
    tokens = torch.randn(64, 50, 272) * 3
    torch.manual_seed(0)
    noisy = jitter(tokens, 20.0)
    torch.manual_seed(0)
    official = tokens + torch.randn_like(tokens) * tokens.norm(dim=-1, keepdim=True) / 272 * 20
    torch.testing.assert_close(noisy, official)
    for c in (192, 272):
        x = torch.randn(200, 100, c) * 2.5
        ratio = ((jitter(x, 20.0) - x).std() / x.pow(2).mean().sqrt()).item()
        assert ratio == pytest.approx(20 / np.sqrt(272), rel=0.02)  # 1.21 at every width


def test_map_and_score_against_scipy():
    rng = np.random.default_rng(0)
    rec, align = rng.normal(size=(2, 5, 6, 7)), rng.normal(size=(2, 5, 6, 7))
    maps = uniad_map(torch.tensor(rec), torch.tensor(align), (96, 112)).numpy()
    error = np.sqrt(((rec - align) ** 2).sum(1))
    rows, cols = np.meshgrid(np.arange(96) * 5 / 95, np.arange(112) * 6 / 111, indexing="ij")  # align_corners
    for b in range(2):
        expected = map_coordinates(error[b], [rows, cols], order=1)
        np.testing.assert_allclose(maps[b], expected, rtol=1e-5, atol=1e-5)
        pooled = uniform_filter(maps[b].astype(np.float64), 16, mode="constant")[8:-7, 8:-7]  # valid 16x16 windows
        assert pooled_max(torch.tensor(maps), 16)[b].item() == pytest.approx(pooled.max(), rel=1e-5)


# ------------------------------------------------------------------------------------------ fitting
def test_tiny_fit_lowers_the_loss_runs_the_encoder_once_and_uses_the_official_optimiser(monkeypatch):
    calls = []
    original = Teacher.forward
    monkeypatch.setattr(Teacher, "forward", lambda self, images: calls.append(len(images)) or original(self, images))
    model = UniAD(epochs=5, batch_size=4, lr=1e-3, seed=0, **TINY)
    data = SmoothImages(8)
    net = model._build((64, 64))
    encoder_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    calls.clear()
    model.fit(data)
    losses = [row["loss"] for row in model.history_]
    assert len(losses) == 5 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert sum(calls) == len(data)  # cached: later epochs cost only the transformer
    assert all(torch.equal(v, net.encoder.state_dict()[k]) for k, v in encoder_before.items())
    optimizer, scheduler = UniAD(**TINY).configure_optimizers(net)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 1e-4
    assert optimizer.defaults["lr"] == 1e-4 and scheduler.step_size == 80 and scheduler.gamma == 0.1
    assert UniAD(lr_step=800, **TINY)._lr_step() == 800
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == count_parameters(net)


def test_resume_after_a_killed_subprocess_equals_an_uninterrupted_fit(tmp_path):
    killed_and_resumed("uniad", {"epochs": 3, "batch_size": 4, "seed": 1, **TINY}, tmp_path)


# ------------------------------------------------------------------------------------------ options, saving
def test_options_are_declared_and_checked():
    assert {k for k, o in UniAD.options().items() if o.predict} == {"pool_size", "sigma", "device"}
    d = UniAD.defaults()
    official = {"batch_size": 8, "lr": 1e-4, "weight_decay": 1e-4, "clip_grad": 0.1, "hidden_dim": 256, "ffn_dim": 1024,
                "num_heads": 8, "enc_layers": 4, "dec_layers": 4, "dropout": 0.1, "neighbor_size": 7,
                "jitter_scale": 20.0, "jitter_prob": 1.0, "pool_size": 16, "unified": True,
                "encoder": "efficientnet_b4", "sigma": 0.0, "seed": 133, "size": 224}
    assert {k: d[k] for k in official} == official
    for bad in ({"hidden_dim": 3}, {"jitter_prob": 1.5}, {"dropout": -0.1}, {"pool_size": 0}, {"lr": 0.0},
                {"epochs": 0}, {"unified": "yes"}, {"clip_grad": 0.0}):
        with pytest.raises(ThreecadError, match=next(iter(bad))):
            build("uniad", **bad)
    with pytest.raises(ThreecadError, match="multiple of num_heads"):
        build("uniad", hidden_dim=100, num_heads=8)
    check_overrides(UniAD, {"pool_size": 8}, {"pool_size": 16, "device": "cpu"})
    with pytest.raises(ThreecadError, match="neighbor_size is fixed"):
        check_overrides(UniAD, {"neighbor_size": 7}, {"neighbor_size": 5})


def test_save_load_round_trip_and_the_recorded_encoder(fitted, tmp_path):
    assert fitted.encoder == "efficientnet_b4"  # the option is never rewritten ...
    run = fitted.save(tmp_path / "run")
    config = json.loads((run / CONFIG_FILE).read_text())
    assert config["method"] == "uniad" and config["config"]["encoder"] == "efficientnet_lite0"  # ... what was used
    loaded = load_method(run)
    images = _images(3, seed=11)
    for a, b in zip(fitted.predict_batch(images), loaded.predict_batch(images)):
        np.testing.assert_array_equal(a, b)
    scores, maps = fitted.predict_batch(images)
    np.testing.assert_allclose(scores, pooled_max(torch.tensor(maps), 16).numpy(), rtol=1e-6)
    with pytest.raises(ThreecadError, match="trained at 64x64"):
        fitted.predict_batch(images[:, :, :32, :32])


# ------------------------------------------------------------------------------------------ runner, CLI
def test_cli_unified_model_for_all_categories_then_per_category(synth_root, tmp_path, monkeypatch):
    from cli import cli
    from threecad.dataset.layout import list_categories, list_samples
    from threecad.metrics import evaluate_predictions

    fits = []
    original = UniAD.fit
    monkeypatch.setattr(UniAD, "fit", lambda self, *a: fits.append(len(a[0])) or original(self, *a))
    cats = list_categories(synth_root)
    small = ["--size", "128", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
             *[f"--set={k}={v}" for k, v in TINY.items() if k not in ("device", "neighbor_size")]]
    result = CliRunner().invoke(cli, ["train", "--method", "uniad", "--dataset", str(synth_root), "--category", "all",
                                      "--out", str(tmp_path / "runs"), *small])
    assert result.exit_code == 0, result.output
    n_train = [len(list_samples(synth_root, c, "train")) for c in cats]
    assert fits == [sum(n_train)]  # one fit on the union of the categories' images
    weights = [torch.load(tmp_path / "runs" / c / "weights.pt", weights_only=True) for c in cats]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for category in cats:
        info = json.loads((tmp_path / "runs" / category / "run.json").read_text())
        assert (info["category"], info["fit_categories"], info["train_images"]) == (category, cats, sum(n_train))
        assert (tmp_path / "runs" / category / LOG_FILE).is_file()
    # the unified fit's checkpoint ends in the first category's run; nothing is left beside the runs
    assert [(tmp_path / "runs" / c / CHECKPOINT_FILE).is_file() for c in cats] == [True, False]
    assert not (tmp_path / ".runs.checkpoints").exists()
    result = CliRunner().invoke(cli, ["predict", "--run", str(tmp_path / "runs"), "--dataset", str(synth_root),
                                      "--out", str(tmp_path / "pred")])
    assert result.exit_code == 0, result.output
    metrics = evaluate_predictions(synth_root, tmp_path / "pred", categories=cats)["categories"]
    assert all(0.0 <= metrics[c][k] <= 1.0 for c in cats for k in ("i_auroc", "p_auroc"))

    fits.clear()
    result = CliRunner().invoke(cli, ["train", "--method", "uniad", "--dataset", str(synth_root), "--category", "all",
                                      "--out", str(tmp_path / "per"), "--set", "unified=false", *small])
    assert result.exit_code == 0, result.output
    assert fits == n_train  # one model per category
    for category in cats:
        info = json.loads((tmp_path / "per" / category / "run.json").read_text())
        assert info["fit_categories"] == [category]
        assert json.loads((tmp_path / "per" / category / CONFIG_FILE).read_text())["config"]["unified"] is False
