"""CFRG: reference shapes and parameter counts, losses and maps against direct transcriptions,
gradient routing, schedule, the engine port against a hand-written loop, exact resume, DDP (gloo,
2 processes), predict and the leaderboard path.

Everything but the paper-configuration test uses the offline Lite0 teacher and 64 px inputs.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from smooth_images import SmoothImages

from cfrg.infer import anomaly_maps
from cfrg.losses import cfrg_losses, distillation_loss, segmentation_loss
from cfrg.model import CFRGNet
from cfrg.train import CHECKPOINT_FILE, TrainConfig, collate, make_optimizer, make_scheduler, train
from threecad.errors import ThreecadError
from threecad.methods.blocks import Teacher, build_teacher, count_parameters, flattened_cosine_loss
from threecad.synth.anomalies import SyntheticAnomalyDataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _lite_net(teacher: Teacher, seed: int = 0) -> CFRGNet:
    torch.manual_seed(seed)
    return CFRGNet(teacher)


# ------------------------------------------------------------------------------------------ paper config
@pytest.mark.slow
def test_paper_configuration_shapes_and_parameter_counts():
    torch.manual_seed(0)
    net = CFRGNet(Teacher("wide_resnet50_2", weights="random")).eval()
    millions = {name: count_parameters(m) / 1e6 for name, m in net.trainable_modules().items()}
    reference = {"student": 0.852, "ocbe": 58.885, "decoder": 24.918, "head": 20.364}
    for name, value in reference.items():
        assert abs(millions[name] - value) / value < 0.01, (name, millions[name])
    for adapter, value in zip(net.adapters, (0.013, 0.038, 0.243)):
        assert abs(count_parameters(adapter) / 1e6 - value) < 0.0006
    assert count_parameters(net.teacher) == 0  # frozen
    # Dead modules are not built: no teacher layer4/fc, no student blocks 11-15/head, no OCBE conv4.
    assert net.teacher.extractor._names == ["stem", "layer1", "layer2", "layer3"]
    assert len(net.student.blocks) == 11
    assert not any("conv4" in n or "bn4" in n for n, _ in net.ocbe.named_parameters())

    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        raw = net.student.forward(x)
        out = net(x, x)
    assert [tuple(t.shape[1:]) for t in raw] == [(24, 64, 64), (40, 32, 32), (112, 16, 16)]
    levels = [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
    for key in ("teacher", "teacher_clean", "student", "recovery"):
        assert [tuple(t.shape[1:]) for t in out[key]] == levels, key
    # WRN taps follow a ReLU; the adapters and decoder stages end in one too (as in the reference).
    assert all(float(t.min()) >= 0 for t in out["teacher"] + out["student"] + out["recovery"])
    teacher, head = out["teacher"], net.head
    with torch.inference_mode():
        assert tuple(net.ocbe.fuse(teacher).shape[1:]) == (3072, 16, 16)
        assert tuple(net.ocbe(teacher).shape[1:]) == (2048, 8, 8)
        gated = [head.gate(t, s, r) for t, s, r in zip(out["teacher"], out["student"], out["recovery"])]
        u1 = head.up1(gated[2], gated[1])
        u2 = head.up2(u1, gated[0])
        u3 = head.up3(u2)
        u4 = head.up4(u3)
    assert [tuple(u.shape[1:]) for u in (u1, u2, u3, u4)] == [(512, 32, 32), (256, 64, 64), (128, 128, 128),
                                                           (64, 256, 256)]
    assert tuple(out["logits"].shape) == (1, 1, 256, 256)


def test_offline_teacher_sizes_everything_from_its_channels(lite_teacher):
    net = _lite_net(lite_teacher).eval()
    assert lite_teacher.channels == (24, 40, 112)
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64))
    assert [tuple(t.shape[1:]) for t in out["recovery"]] == [(24, 16, 16), (40, 8, 8), (112, 4, 4)]
    assert [tuple(t.shape[1:]) for t in out["student"]] == [(24, 16, 16), (40, 8, 8), (112, 4, 4)]
    assert tuple(out["logits"].shape) == (2, 1, 64, 64)
    # Lite taps are signed, so adapted-student and recovery features must be able to go negative.
    assert min(float(t.min()) for t in out["teacher"]) < 0
    assert all(float(t.min()) < 0 for t in out["student"] + out["recovery"])


def test_missing_wrn_weights_fall_back_to_lite_with_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("THREECAD_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with caplog.at_level("WARNING", logger="cfrg"):
        teacher = build_teacher("wide_resnet50_2", "default")
    assert teacher.name == "efficientnet_lite0"
    assert "falling back" in caplog.text


# ------------------------------------------------------------------------------------------ losses
def _cos_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Channel cosine, (B, C, H, W) -> (B, 1, H, W), straight from the definition."""
    dot = (a * b).sum(1, keepdims=True)
    na = np.sqrt((a * a).sum(1, keepdims=True))
    nb = np.sqrt((b * b).sum(1, keepdims=True))
    return dot / np.maximum(na * nb, 1e-8)


def _upsample_half_pixel(m: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), separable np.interp."""
    h = m.shape[-1]
    src = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
    rows = np.stack([[np.interp(src, np.arange(h), row) for row in plane] for plane in m.reshape(-1, h, h)])
    out = np.stack([[np.interp(src, np.arange(h), col) for col in plane.T] for plane in rows]).transpose(0, 2, 1)
    return out.reshape(*m.shape[:-2], size, size)


def _upsample_corners(m: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize with align_corners=True."""
    h = m.shape[-1]
    src = np.arange(size) * (h - 1) / (size - 1)
    rows = np.stack([[np.interp(src, np.arange(h), row) for row in plane] for plane in m.reshape(-1, h, h)])
    out = np.stack([[np.interp(src, np.arange(h), col) for col in plane.T] for plane in rows]).transpose(0, 2, 1)
    return out.reshape(*m.shape[:-2], size, size)


def _features(seed: int, shapes=((8, 8), (12, 4), (16, 2)), batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=g, dtype=torch.float64) for c, s in shapes]


def test_losses_match_direct_transcription():
    teacher, student, clean, recovery = (_features(s) for s in range(4))
    mask = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(9)) > 0.7).double()
    logits = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(10), dtype=torch.float64)

    m = mask.numpy()
    terms = []
    for t, s in zip(teacher, student):
        d = _upsample_half_pixel(1 - _cos_np(t.numpy(), s.numpy()), 16)
        terms.append(np.mean(m * (1 - d) + (1 - m) * d))
    expected_dis = sum(terms) / 3
    expected_rec = 0.0
    for t, r in zip(clean, recovery):
        tv, rv = t.numpy().reshape(2, -1), r.numpy().reshape(2, -1)
        cos = (tv * rv).sum(1) / (np.linalg.norm(tv, axis=1) * np.linalg.norm(rv, axis=1))
        expected_rec += np.mean(1 - cos)
    z = logits.numpy()
    expected_seg = np.mean(np.maximum(z, 0) - z * m + np.log1p(np.exp(-np.abs(z))))

    assert float(distillation_loss(teacher, student, mask)) == pytest.approx(expected_dis, rel=1e-9)
    assert float(flattened_cosine_loss(clean, recovery)) == pytest.approx(expected_rec, rel=1e-6)  # float32 maths
    assert float(segmentation_loss(logits, mask)) == pytest.approx(expected_seg, rel=1e-9)
    out = {"teacher": teacher, "student": student, "teacher_clean": clean, "recovery": recovery, "logits": logits}
    total = cfrg_losses(out, mask, (2.0, 0.5, 3.0))
    assert float(total["loss"]) == pytest.approx(2 * expected_dis + 0.5 * expected_rec + 3 * expected_seg, rel=1e-6)


def test_gradients_reach_the_modules_each_loss_trains(lite_teacher):
    net = _lite_net(lite_teacher).train()
    x = torch.rand(2, 3, 64, 64)
    mask = (torch.rand(2, 1, 64, 64) > 0.8).float()

    def touched(loss_key: str) -> dict[str, bool]:
        net.zero_grad(set_to_none=True)
        out = net(x, x)
        cfrg_losses(out, mask)[loss_key].backward()
        return {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())
                for name, mod in net.trainable_modules().items()}

    assert touched("dis") == {"student": True, "adapters": True, "ocbe": False, "decoder": False, "head": False}
    assert touched("rec") == {"student": False, "adapters": False, "ocbe": True, "decoder": True, "head": False}
    assert all(touched("seg").values())  # through the two (1 - cos) gates, nothing detached
    assert all(p.grad is None for p in net.teacher.parameters())


# ------------------------------------------------------------------------------------------ inference
def test_anomaly_map_matches_definition():
    teacher, recovery, student = _features(1), _features(2), _features(3)
    logits = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = {"teacher": teacher, "recovery": recovery, "student": student, "logits": logits}
    scores, maps = anomaly_maps(out, (16, 16))
    raw = sum(_upsample_corners(1 - _cos_np(t.numpy(), r.numpy()), 16) for t, r in zip(teacher, recovery))
    raw = raw + 1 / (1 + np.exp(-logits.numpy()))
    expected = np.stack([gaussian_filter(raw[b, 0], sigma=4, mode="reflect", truncate=4.0) for b in range(2)])
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, expected.reshape(2, -1).max(1), rtol=1e-5)
    # Alternatives: the teacher-student term only, unsmoothed, top-10 % mean score.
    s2, m2 = anomaly_maps(out, (16, 16), terms=("distillation",), sigma=0, topk=0.1)
    alt = sum(_upsample_corners(1 - _cos_np(t.numpy(), s.numpy()), 16) for t, s in zip(teacher, student))[:, 0]
    np.testing.assert_allclose(m2, alt, rtol=1e-5, atol=1e-6)
    k = round(0.1 * 256)
    np.testing.assert_allclose(s2, np.sort(alt.reshape(2, -1), 1)[:, -k:].mean(1), rtol=1e-5)


# ------------------------------------------------------------------------------------------ training
def test_schedule_and_weight_decay(lite_teacher):
    net = _lite_net(lite_teacher)
    config = TrainConfig(epochs=50, weight_decay=1e-4)
    optimizer = make_optimizer(net, config)
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4 and optimizer.param_groups[0]["betas"] == (0.5, 0.999)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == count_parameters(net)
    scheduler = make_scheduler(optimizer, config)
    lrs = []
    for _ in range(50):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(lrs[:40], 5e-4)
    np.testing.assert_allclose(lrs[40:45], 1e-4)
    np.testing.assert_allclose(lrs[45:], 2e-5)
    # Short runs decay too (the official float milestones would never fire for 3 epochs).
    assert TrainConfig(epochs=3).milestone_epochs() == [2, 3]


def test_the_engine_runs_the_loop_cfrg_had_before_it(lite_teacher):
    """CFRG on the shared engine == the loop it replaced, written out by hand: channels-last
    network and inputs, Adam + MultiStepLR per epoch, the seeded epoch order (the order itself is
    checked against the old shuffling loader in tests/test_training.py), bit for bit on CPU."""
    from threecad.methods.training import epoch_order, seed_all

    config = TrainConfig(epochs=2, batch_size=2, seed=11)
    engine_net = _lite_net(lite_teacher, seed=11)
    history = train(engine_net, SyntheticAnomalyDataset(SmoothImages(4), seed=11), config, torch.device("cpu"))

    net = _lite_net(lite_teacher, seed=11).to(memory_format=torch.channels_last)
    data = SyntheticAnomalyDataset(SmoothImages(4), seed=11)
    optimizer = make_optimizer(net, config)
    scheduler = make_scheduler(optimizer, config)
    seed_all(11)
    losses = []
    for epoch in range(2):
        net.train()
        data.set_epoch(epoch)
        order = epoch_order(11, epoch, len(data))
        total = 0.0
        for start in (0, 2):
            batch = collate([data[i] for i in order[start:start + 2]])
            out = net(batch["augmented"].contiguous(memory_format=torch.channels_last),
                      batch["image"].contiguous(memory_format=torch.channels_last))
            loss = cfrg_losses(out, batch["mask"])["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * 2
        losses.append(total / 4)
        scheduler.step()
    assert [row["loss"] for row in history] == losses
    state = engine_net.trainable_state_dict()
    assert all(torch.equal(state[k], v) for k, v in net.trainable_state_dict().items())


def test_resume_reproduces_the_uninterrupted_loss_sequence(lite_teacher, tmp_path):
    config = TrainConfig(epochs=3, batch_size=2, seed=11)

    def run(work_dir: Path, stop_after=None, resume=False):
        net = _lite_net(lite_teacher, seed=11)
        data = SyntheticAnomalyDataset(SmoothImages(4), seed=11)
        history = train(net, data, config, torch.device("cpu"), work_dir, resume=resume, stop_after=stop_after,
                        fingerprint={"clean_probability": 0.0})
        return history, net.trainable_state_dict()

    full, full_state = run(tmp_path / "full")
    first, _ = run(tmp_path / "split", stop_after=1)
    assert len(first) == 1
    resumed, resumed_state = run(tmp_path / "split", resume=True)
    keys = ("loss", "dis", "rec", "seg", "lr", "images")
    assert [[row[k] for k in keys] for row in resumed] == [[row[k] for k in keys] for row in full]
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)
    log_rows = (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()
    assert len(log_rows) == 3 and full[0]["loss"] != full[2]["loss"]
    # Resuming with other settings would silently mix two runs: refused, checkpoint untouched.
    before = (tmp_path / "split" / CHECKPOINT_FILE).read_bytes()
    with pytest.raises(ThreecadError, match="lr: 0.0005 -> 0.001"):
        train(_lite_net(lite_teacher, seed=11), SyntheticAnomalyDataset(SmoothImages(4), seed=11),
              TrainConfig(epochs=3, batch_size=2, seed=11, lr=1e-3), torch.device("cpu"), tmp_path / "split",
              resume=True, fingerprint={"clean_probability": 0.0})
    # ... and so would other synthesis or teacher options (the method's fingerprint)
    with pytest.raises(ThreecadError, match="clean_probability: 0.0 -> 0.5"):
        train(_lite_net(lite_teacher, seed=11), SyntheticAnomalyDataset(SmoothImages(4), seed=11), config,
              torch.device("cpu"), tmp_path / "split", resume=True, fingerprint={"clean_probability": 0.5})
    assert (tmp_path / "split" / CHECKPOINT_FILE).read_bytes() == before


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    teacher = Teacher("efficientnet_lite0")
    net = _lite_net(teacher, seed=3)
    data = SyntheticAnomalyDataset(SmoothImages(6), seed=3)
    history = train(net, data, TrainConfig(epochs=1, batch_size=4, seed=3), torch.device("cpu"),
                    Path(out) / "run")
    flat = torch.cat([p.detach().flatten() for p in net.parameters() if p.requires_grad])
    torch.save({"params": flat, "history": history}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert torch.equal(r0["params"], r1["params"])  # gradients were averaged across ranks
    initial = torch.cat([p.detach().flatten() for p in _lite_net(Teacher("efficientnet_lite0"), seed=3).parameters()
                         if p.requires_grad])
    assert not torch.equal(initial, r0["params"])
    assert r0["history"][0]["images"] == 6  # both shards counted once
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


# ------------------------------------------------------------------------------------------ method
def test_method_predict_shapes_save_and_load(tmp_path):
    from threecad.methods import build, load_method

    method = build("cfrg", epochs=1, batch_size=3, size=64, device="cpu", teacher="efficientnet_lite0", seed=1)
    method.work_dir = tmp_path / "work"
    method.fit(SmoothImages(6), SmoothImages(2, seed=5))
    assert (tmp_path / "work" / "checkpoint.pt").is_file()
    assert "val_loss" in method.history_[0]
    images = torch.rand(3, 3, 80, 96)
    scores, maps = method.predict(images)
    assert scores.shape == (3,) and maps.shape == (3, 80, 96)
    assert scores.dtype == np.float32 and maps.dtype == np.float32 and np.isfinite(maps).all()
    method.save(tmp_path / "saved")
    again = load_method(tmp_path / "saved")
    s2, m2 = again.predict(images)
    np.testing.assert_allclose(s2, scores, rtol=1e-5)
    np.testing.assert_allclose(m2, maps, rtol=1e-5, atol=1e-6)
    assert not any(k.startswith("teacher.") for k in method.state_dict())


def test_runner_predict_writes_an_evaluable_submission(synth_root, tmp_path):
    from threecad.dataset.layout import list_categories
    from threecad.methods import runner
    from threecad.metrics import evaluate_predictions

    category = list_categories(synth_root)[0]
    runs = runner.train("cfrg", synth_root, [category], out=tmp_path / "runs", device="cpu", size=64,
                        config={"epochs": 1, "batch_size": 6, "size": 64, "teacher": "efficientnet_lite0"})
    out = runner.predict(runs[0], synth_root, tmp_path / "pred")
    result = evaluate_predictions(synth_root, out, categories=[category])
    metrics = result["categories"][category]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("i_auroc", "p_auroc"))
    assert math.isfinite(metrics["aupro"])
