"""DeSTSeg (``baselines/destseg.py``): parameter counts of the official configuration, losses and maps
against brute-force computations, the two phases (what trains in each, optimisers), a tiny fit that
learns to segment a synthetic defect, exact resume across the phase boundary after a real
subprocess is SIGKILLed, options, and ``3cad train/predict`` on a tiny dataset.

Fits use the offline Lite0 teacher on 32-64 px images. This file is also the worker script of the
kill test: ``python tests/test_destseg.py kill OUT`` (with the repository on PYTHONPATH).
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
from test_draem import _checker_textures, assert_segments_defects

from baselines.destseg import (
    DeSTSeg,
    DeSTSegNet,
    FullBatches,
    cosine_distances,
    dest_map,
    segmentation_input,
    segmentation_losses,
    student_losses,
)
from threecad.errors import ThreecadError
from threecad.methods import CONFIG_FILE, available, build, check_overrides, load_method
from threecad.methods.blocks import Teacher, count_parameters
from threecad.methods.training import CHECKPOINT_FILE

LITE = "efficientnet_lite0"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> str:
    return _checker_textures(tmp_path_factory.mktemp("textures"))


@pytest.fixture(scope="module")
def fitted(textures) -> DeSTSeg:
    """Lite0 teacher, segmentation width 32, 64 px: 6 student steps then 50 segmentation steps."""
    return DeSTSeg(student_steps=6, seg_steps=50, batch_size=8, seg_width=32, encoder=LITE, device="cpu", seed=0,
                   textures=textures).fit(SmoothImages(16, size=64))


# ------------------------------------------------------------------------------------------ architecture
def test_official_configuration_has_the_official_parameter_counts():
    torch.manual_seed(0)
    teacher = Teacher("resnet18", weights="random")  # counts do not depend on the weights
    assert teacher.channels == (64, 128, 256) and not teacher.signed
    assert count_parameters(teacher, trainable=False) == 2_782_784 and count_parameters(teacher) == 0
    net = DeSTSegNet(teacher)
    assert count_parameters(net.student.encoder) == 11_176_512
    assert count_parameters(net.student.decoder) == 13_488_512
    assert count_parameters(net.segmentation) == 7_706_369
    assert count_parameters(net.segmentation.res) == 2_918_912 and count_parameters(net.segmentation.head[0]) == 4_196_864
    assert net.segmentation.res[0].conv1.in_channels == 448
    # the random student's residual blocks start with a zero last BN weight (timm's initialisation)
    blocks = [m for m in net.student.encoder.modules() if hasattr(m, "bn2")]
    assert len(blocks) == 8 and all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in blocks)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = net.eval()(x)
    assert [tuple(f.shape[1:]) for f in out["student"]] == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert [f.shape for f in out["student"]] == [f.shape for f in out["teacher"]]
    assert tuple(out["segmentation"].shape) == (2, 1, 16, 16) and 0 <= float(out["segmentation"].min())


def test_lite0_teacher_sizes_the_student_and_head_and_drops_the_last_relus(lite_teacher):
    torch.manual_seed(0)
    net = DeSTSegNet(lite_teacher, seg_width=64)
    assert net.segmentation.res[0].conv1.in_channels == 24 + 40 + 112
    assert [stage[-1].relu_out for stage in net.student.decoder] == [True, False, False, False]
    with torch.no_grad():
        out = net.eval()(torch.rand(2, 3, 64, 64))
    assert [f.shape for f in out["student"]] == [f.shape for f in out["teacher"]]
    assert all(float(f.min()) < 0 for f in out["student"])  # can match signed teacher features


# ------------------------------------------------------------------------------------------ losses and maps
def _features(seed: int, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=g, dtype=torch.float64) for c, s in ((6, 8), (5, 4), (4, 2))]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel cosine over channels of (C, h, w) arrays."""
    return (a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))


def test_student_loss_is_the_official_batch_sum():
    t, s = _features(0), _features(1)
    expected = sum((1 - _cos(tl[b].numpy(), sl[b].numpy())).mean() for tl, sl in zip(t, s) for b in range(2))
    losses = student_losses({"teacher": t, "student": s}, batch_size=2)
    assert float(losses["loss"]) == pytest.approx(expected, rel=1e-6)  # sum over batch and levels (float32 maths)
    assert float(losses["cos"]) == pytest.approx(expected / 2, rel=1e-6)  # per-sample mean, logged


def test_segmentation_input_and_dest_map_equal_brute_force():
    t, s = _features(2), _features(3)
    got = segmentation_input(t, s)
    assert tuple(got.shape) == (2, 15, 8, 8)
    for level, (tl, sl) in enumerate(zip(t, s)):
        tn, sn = tl / tl.norm(dim=1, keepdim=True), sl / sl.norm(dim=1, keepdim=True)
        expected = F.interpolate(-tn * sn, size=(8, 8), mode="bilinear", align_corners=False)
        lo = sum(f.shape[1] for f in t[:level])
        torch.testing.assert_close(got[:, lo:lo + tl.shape[1]].double(), expected, rtol=1e-5, atol=1e-6)
    product = 1.0
    for tl, sl in zip(t, s):
        d = torch.from_numpy(np.stack([1 - _cos(tl[b].numpy(), sl[b].numpy()) for b in range(2)]))[:, None]
        product = product * F.interpolate(d, size=(8, 8), mode="bilinear", align_corners=False)
    expected = F.interpolate(product, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(dest_map({"teacher": t, "student": s}, (32, 32)).double(), expected, rtol=1e-5,
                               atol=1e-6)
    assert all(tuple(d.shape[1:2]) == (1,) for d in cosine_distances(t, s))


def test_segmentation_loss_is_focal_gamma_4_plus_l1_on_the_resized_mask():
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64) * 0.98 + 0.01
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.float64)
    mask[0, 0, 4:20, 8:30] = 1
    losses = segmentation_losses({"segmentation": probs}, mask)
    target = (F.interpolate(mask, size=(8, 8), mode="bilinear", align_corners=False) >= 0.5).double()
    assert 0 < float(target.sum()) < 128
    pt = probs * target + (1 - probs) * (1 - target)
    focal = (F.binary_cross_entropy(probs, target, reduction="none") * (1 - pt) ** 4).mean()
    assert float(losses["focal"]) == pytest.approx(float(focal), rel=1e-6)
    assert float(losses["l1"]) == pytest.approx(float((probs - target).abs().mean()), rel=1e-6)
    assert float(losses["loss"]) == pytest.approx(float(losses["focal"] + losses["l1"]), rel=1e-6)


def test_full_batches_drop_a_different_remainder_each_pass():
    data = FullBatches(SmoothImages(10, size=32), batch=4, seed=0)
    assert len(data) == 8
    seen = []
    for epoch in range(6):
        data.set_epoch(epoch)
        items = {data[i]["path"] for i in range(len(data))}
        assert len(items) == 8
        seen.append(items)
    assert len(set().union(*seen)) == 10 and len({frozenset(s) for s in seen}) > 1
    assert len(FullBatches(SmoothImages(3, size=32), batch=4, seed=0)) == 3  # fewer images than a batch


# ------------------------------------------------------------------------------------------ fitting
def test_tiny_fit_trains_each_phase_and_segments_a_synthetic_defect(fitted, textures):
    student = [row for row in fitted.history_ if row["phase"] == "student"]
    seg = [row for row in fitted.history_ if row["phase"] == "segmentation"]
    assert student[-1]["iterations"] == 6 and seg[-1]["iterations"] == 50
    assert student[-1]["cos"] < student[0]["cos"] and np.mean([r["loss"] for r in seg[-3:]]) < 0.5 * seg[0]["loss"]
    assert {"focal", "l1"} <= set(seg[-1]) and seg[-1]["lr"] == 0.1
    for scores, maps in assert_segments_defects(fitted, textures, 64, min_pixels=10):
        assert maps.shape == (1, 64, 64) and maps.dtype == np.float32
        assert scores[0] == pytest.approx(np.sort(maps[0].ravel())[-100:].mean(), rel=1e-5)  # top-100 mean


def test_phases_train_their_own_part_with_the_official_optimisers():
    from baselines.destseg import _Phase

    model = DeSTSeg(encoder=LITE, seg_width=16, device="cpu")
    for name, lrs in (("student", [0.4]), ("segmentation", [0.1, 0.01])):
        phase = _Phase(model, name)
        net = phase.trainable_module()
        optimizer, scheduler = phase.configure_optimizers(net)
        assert scheduler is None and [g["lr"] for g in optimizer.param_groups] == lrs
        assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 1e-4
        trained = net.student if name == "student" else net.segmentation
        frozen = net.segmentation if name == "student" else net.student
        assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == count_parameters(trained)
        assert count_parameters(frozen) == 0 and count_parameters(net.teacher) == 0
        phase.train_mode(net)
        assert trained.training and not frozen.training and not net.teacher.training


def _rows(history):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


def _small(tmp: Path | None = None, resume: bool = False, **extra) -> DeSTSeg:
    model = DeSTSeg(student_steps=4, seg_steps=6, batch_size=4, seg_width=16, encoder=LITE, device="cpu", seed=5,
                    resume=resume, **extra)
    model.work_dir = tmp
    return model


def _kill_worker(out: Path) -> None:
    """Subprocess: the small fit, paused (marker file) at its 5th segmentation step, phase 2's third pass."""
    torch.set_num_threads(1)
    model = _small(out / "work")
    step, calls = model.segmentation_step, {"n": 0}

    def pausing(module, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            (out / "paused").write_text("paused")
            time.sleep(120)
        return step(module, batch)

    model.segmentation_step = pausing
    model.fit(SmoothImages(8, size=32))


def test_resume_across_the_phase_boundary_after_a_kill(tmp_path):
    kill_when_paused([sys.executable, __file__, "kill", str(tmp_path)], tmp_path / "paused",
                     subprocess_env(THREECAD_OFFLINE="1"))
    work = tmp_path / "work"
    assert torch.load(work / "student" / CHECKPOINT_FILE, weights_only=True)["iteration"] == 4  # phase 1 done
    assert torch.load(work / "segmentation" / CHECKPOINT_FILE, weights_only=True)["iteration"] == 4
    resumed = _small(work, resume=True).fit(SmoothImages(8, size=32))
    full = _small().fit(SmoothImages(8, size=32))
    assert _rows(resumed.history_) == _rows(full.history_)
    assert [row["phase"] for row in full.history_] == ["student"] * 2 + ["segmentation"] * 3
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in resumed.state_dict().items())
    with pytest.raises(ThreecadError, match="head_lr: 0.01 -> 0.02"):
        _small(work, resume=True, head_lr=0.02).fit(SmoothImages(8, size=32))


# ------------------------------------------------------------------------------------------ options, saving
def test_registered_with_official_defaults_and_checked_options():
    assert "destseg" in available()
    d = DeSTSeg.defaults()
    assert (d["student_steps"], d["seg_steps"], d["batch_size"], d["student_lr"], d["seg_lr"], d["head_lr"],
            d["momentum"], d["weight_decay"], d["encoder"], d["seg_width"], d["map"], d["topk"]) == (
        1000, 4000, 32, 0.4, 0.1, 0.01, 0.9, 1e-4, "resnet18", 256, "segmentation", 100)
    assert {k for k, o in DeSTSeg.options().items() if o.predict} == {"map", "topk", "device"}
    for bad in ({"batch_size": 1}, {"rotation": "upside"}, {"map": "sum"}, {"topk": 0}, {"student_lr": 0.0},
                {"momentum": 1.5}, {"size": 100}, {"seg_width": 4}, {"seg_steps": 0}):
        with pytest.raises(ThreecadError, match=next(iter(bad))):
            build("destseg", **bad)
    with pytest.raises(ThreecadError, match="no option"):
        build("destseg", epochs=10)
    check_overrides(DeSTSeg, {"seg_width": 32}, {"map": "dest", "topk": 10})
    with pytest.raises(ThreecadError, match="seg_width is fixed"):
        check_overrides(DeSTSeg, {"seg_width": 32}, {"seg_width": 64})


def test_mvtec_rotation_follows_the_category():
    model = DeSTSeg(rotation="mvtec")

    class One(torch.utils.data.Dataset):
        def __init__(self, category):
            self.category = category

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {"image": torch.zeros(3, 32, 32), "category": self.category}

    assert [model._rotation_mode(One(c)) for c in ("screw", "wood", "pill", "Aluminum_Ipad")] == [
        "right", "small", "none", "none"]
    assert DeSTSeg(rotation="small")._rotation_mode(One("screw")) == "small"


def test_save_load_round_trip_records_the_teacher_and_switches_maps(fitted, tmp_path):
    images = torch.stack([SmoothImages(2, size=64, seed=11)[i]["image"] for i in range(2)])
    run = fitted.save(tmp_path / "run")
    assert json.loads((run / CONFIG_FILE).read_text())["config"]["encoder"] == LITE
    loaded = load_method(run)
    for a, b in zip(fitted.predict_batch(images), loaded.predict_batch(images)):
        np.testing.assert_array_equal(a, b)
    scores, maps = load_method(run, map="dest", topk=10).predict_batch(images)
    with torch.no_grad():
        out = fitted.net.eval()(images, segment=False)
    np.testing.assert_allclose(maps, dest_map(out, (64, 64)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, np.sort(maps.reshape(2, -1), 1)[:, -10:].mean(1), rtol=1e-5)


def test_paper_teacher_falls_back_to_lite0_without_its_file(tmp_path, monkeypatch):
    monkeypatch.setenv("THREECAD_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    model = DeSTSeg(seg_width=16, device="cpu")
    model._build()
    assert model.encoder == "resnet18" and model.resolved_config() == {"encoder": LITE}


def test_cli_trains_predicts_and_evaluates(synth_root, tmp_path):
    from cli import cli
    from threecad.dataset.layout import list_categories
    from threecad.metrics import evaluate_predictions

    category = list_categories(synth_root)[0]
    result = CliRunner().invoke(cli, ["train", "--method", "destseg", "--dataset", str(synth_root), "--category",
                                      category, "--out", str(tmp_path / "runs"), "--device", "cpu", "--size", "64",
                                      "--batch-size", "4", "--set", "student_steps=2", "--set", "seg_steps=2",
                                      "--set", "seg_width=16", "--set", f"encoder={LITE}"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / category
    assert (run / "student" / CHECKPOINT_FILE).is_file() and (run / "segmentation" / CHECKPOINT_FILE).is_file()
    result = CliRunner().invoke(cli, ["predict", "--run", str(run), "--dataset", str(synth_root),
                                      "--out", str(tmp_path / "maps"), "--set", "map=dest"])
    assert result.exit_code == 0, result.output
    metrics = evaluate_predictions(synth_root, tmp_path / "maps", categories=[category])["categories"][category]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("i_auroc", "p_auroc"))


if __name__ == "__main__":
    role, out = sys.argv[1], Path(sys.argv[2])
    {"kill": _kill_worker}[role](out)
