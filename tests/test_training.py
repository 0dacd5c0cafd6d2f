"""The training engine (threecad.methods.training) on a tiny regression model, seconds in all.

Covered: the loss goes down; the epoch order and the DDP shards; exact resume (in process, mid-pass
in iterations mode, and after a real subprocess is SIGKILLed mid-run); refusing a checkpoint written
with other settings; iterations mode; gradient clipping against a hand loop with
torch.nn.utils.clip_grad_norm_; validation isolated from the training trajectory; the JSONL log and
the progress-bar postfix; a 2-process gloo torchrun run against a 1-process one.

This file is also the worker script of the subprocess tests: ``python tests/test_training.py
kill|ddp OUT`` (run with the repository on PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from killing import kill_when_paused, subprocess_env

from threecad.errors import ThreecadError
from threecad.methods import training
from threecad.methods.training import (
    CHECKPOINT_FILE,
    LOG_FILE,
    TrainSettings,
    epoch_order,
    fit,
    shard_batches,
)


class Points(torch.utils.data.Dataset):
    """y = x @ w + 0.1 noise, 4 features; items carry their index. Records ``set_epoch`` calls."""

    def __init__(self, n: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "y": self.y[index], "index": index}


class Regression:
    """A Trainable: a 4-8-1 tanh MLP, SGD with momentum, StepLR(gamma 0.5) per epoch."""

    def __init__(self, seed: int = 0, lr: float = 0.05, pause_at: int | None = None, marker: Path | None = None):
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.lr = lr
        self.seen: list[list[int]] = []
        self.modes: list[bool] = []
        self.pause_at, self.marker, self.steps = pause_at, marker, 0

    def trainable_module(self) -> torch.nn.Module:
        return self.net

    def configure_optimizers(self, module):
        optimizer = torch.optim.SGD(module.parameters(), lr=self.lr, momentum=0.9)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    def _losses(self, module, batch) -> dict:
        error = module(batch["x"])[:, 0] - batch["y"]
        return {"loss": (error**2).mean(), "mae": error.abs().mean()}

    def training_step(self, module, batch) -> dict:
        self.steps += 1
        if self.pause_at is not None and self.steps == self.pause_at:  # the kill test: wait to be killed
            self.marker.write_text("paused")
            time.sleep(60)
        self.seen.append([int(i) for i in batch["index"]])
        return self._losses(module, batch)

    def validation_step(self, module, batch) -> dict:
        self.modes.append(training.unwrap(module).training)
        return self._losses(module, batch)


def _weights(trainable: Regression) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainable.net.parameters()]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _rows(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ basics
def test_fit_lowers_the_loss_and_amp_is_cpu_neutral():
    trainable = Regression()
    history = fit(trainable, Points(), TrainSettings(epochs=6, batch_size=4, seed=1), "cpu")
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5, 6]
    assert [row["iterations"] for row in history] == [3, 6, 9, 12, 15, 18]
    assert all(row["images"] == 10 for row in history)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert [row["lr"] for row in history[:3]] == [0.05, 0.025, 0.0125]  # the scheduler steps per epoch
    assert not trainable.net.training  # left in eval mode
    again = Regression()
    fit(again, Points(), TrainSettings(epochs=6, batch_size=4, seed=1, amp=False), "cpu")
    assert _equal(_weights(trainable), _weights(again))  # AMP is used only on CUDA


def test_epoch_order_is_the_seeded_order_of_the_first_cfrg_loop():
    """CFRG's first loop shuffled with a DataLoader owning ``epoch_generator(seed, e)``, wrapped in
    the progress bar; the engine's explicit order reproduces it, so old runs keep their batches."""
    from threecad.progress import progress

    for n, batch, epoch in ((4, 2, 0), (10, 3, 1), (37, 5, 6)):
        loader = torch.utils.data.DataLoader(list(range(n)), batch_size=batch, shuffle=True,
                                             generator=training.epoch_generator(11, epoch))
        assert [int(i) for b in progress(loader) for i in b] == epoch_order(11, epoch, n)
    assert epoch_order(11, 0, 50) != epoch_order(11, 1, 50) != epoch_order(12, 1, 50)
    assert sorted(epoch_order(3, 2, 50)) == list(range(50))


def test_shards_are_disjoint_cover_the_order_and_weight_the_gradient_average():
    order = epoch_order(0, 0, 10)
    one = shard_batches(order, 3)
    assert [indices for indices, _ in one] == [order[0:3], order[3:6], order[6:9], order[9:10]]
    assert all(weight == 1.0 for _, weight in one)
    ranks = [shard_batches(order, 3, world=2, rank=r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # every rank takes part in every step
    for j in range(3):  # global batch j split 2 + 1, weights world * n_r / n
        (a, wa), (b, wb) = ranks[0][j], ranks[1][j]
        assert a + b == one[j][0] and (wa, wb) == (4 / 3, 2 / 3)
    assert ranks[0][3] == (order[9:10], 2.0) and ranks[1][3] == (order[9:10], 0.0)  # a weight-0 stand-in
    with pytest.raises(ThreecadError, match="smaller than the number of processes"):
        shard_batches(order, 1, world=2, rank=0)


# ------------------------------------------------------------------------------------------ resume
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    settings = TrainSettings(epochs=4, batch_size=4, seed=5)
    full = Regression()
    full_history = fit(full, Points(), settings, "cpu", work_dir=tmp_path / "full")
    part = Regression()
    first = fit(part, Points(), settings, "cpu", work_dir=tmp_path / "split", stop_after=2)
    assert len(first) == 2
    again = Regression(seed=99)  # other initial weights: everything comes from the checkpoint
    data = Points()
    resumed = fit(again, data, settings, "cpu", work_dir=tmp_path / "split", resume=True)
    assert data.epochs == [2, 3]
    assert _rows(resumed) == _rows(full_history)
    assert _equal(_weights(again), _weights(full))
    # resuming a finished run trains nothing and returns its history
    done = Regression(seed=98)
    assert _rows(fit(done, Points(), settings, "cpu", work_dir=tmp_path / "split", resume=True)) == _rows(full_history)
    assert done.seen == [] and _equal(_weights(done), _weights(full))


def test_resume_mid_pass_in_iterations_mode(tmp_path):
    settings = TrainSettings(iterations=8, batch_size=4, seed=2, checkpoint_every=2)
    full = Regression()
    data = Points()
    full_history = fit(full, data, settings, "cpu", work_dir=tmp_path / "full")
    assert data.epochs == [0, 1, 2]  # 3 batches a pass: passes 0, 1 and 2/3 of pass 2
    assert [row["iterations"] for row in full_history] == [2, 4, 6, 8]
    assert [row["epoch"] for row in full_history] == [1, 2, 2, 3]  # the pass of each row's last step
    assert [row["images"] for row in full_history] == [8, 6, 6, 8]  # the third batch of a pass has 2 samples
    assert [row["lr"] for row in full_history] == [0.05, 0.025, 0.025, 0.0125]  # of the last step
    part = Regression()
    fit(part, Points(), settings, "cpu", work_dir=tmp_path / "split", stop_after=5)  # stops inside a row
    state = torch.load(tmp_path / "split" / CHECKPOINT_FILE, weights_only=True)
    assert (state["iteration"], state["epoch"], state["step_in_epoch"]) == (5, 1, 2)
    again = Regression(seed=7)
    resumed = fit(again, Points(), settings, "cpu", work_dir=tmp_path / "split", resume=True)
    assert _rows(resumed) == _rows(full_history)
    assert _equal(_weights(again), _weights(full))


def _kill_worker(out: Path) -> None:
    """Subprocess: train with a pause (and a marker file) at step 7, i.e. mid-epoch 3."""
    torch.set_num_threads(1)
    trainable = Regression(pause_at=7, marker=out / "paused")
    fit(trainable, Points(), TrainSettings(epochs=4, batch_size=4, seed=5), "cpu", work_dir=out / "run")


def test_resume_after_a_real_subprocess_is_killed_mid_run(tmp_path):
    kill_when_paused([sys.executable, __file__, "kill", str(tmp_path)], tmp_path / "paused", subprocess_env(),
                     timeout=60)
    run = tmp_path / "run"
    assert len((run / LOG_FILE).read_text().splitlines()) == 2  # two epochs were checkpointed
    assert not [p for p in run.iterdir() if p.name not in (CHECKPOINT_FILE, LOG_FILE)]  # no temp file left
    settings = TrainSettings(epochs=4, batch_size=4, seed=5)
    resumed = Regression(seed=3)
    history = fit(resumed, Points(), settings, "cpu", work_dir=run, resume=True)
    full = Regression()
    expected = fit(full, Points(), settings, "cpu")
    assert _rows(history) == _rows(expected)
    assert _equal(_weights(resumed), _weights(full))
    assert [row["epoch"] for row in map(json.loads, (run / LOG_FILE).read_text().splitlines())] == [1, 2, 3, 4]


def test_a_checkpoint_written_with_other_settings_is_refused(tmp_path):
    settings = TrainSettings(epochs=3, batch_size=4, seed=5)
    fit(Regression(), Points(), settings, "cpu", work_dir=tmp_path, stop_after=1, fingerprint={"lr": 0.05})
    checkpoint = tmp_path / CHECKPOINT_FILE
    before = checkpoint.read_bytes()
    cases = [
        (settings, {"lr": 0.1}, "lr: 0.05 -> 0.1"),
        (TrainSettings(epochs=3, batch_size=2, seed=5), {"lr": 0.05}, "batch_size: 4 -> 2"),
        (TrainSettings(iterations=3, batch_size=4, seed=5), {"lr": 0.05}, "epochs: 3 -> None, iterations: None -> 3"),
        (TrainSettings(epochs=3, batch_size=4, seed=5, clip_grad_norm=1.0), {"lr": 0.05}, "clip_grad_norm: None -> 1.0"),
        (settings, {}, "lr: 0.05 -> None"),
    ]
    for other, fingerprint, change in cases:
        with pytest.raises(ThreecadError) as caught:
            fit(Regression(), Points(), other, "cpu", work_dir=tmp_path, resume=True, fingerprint=fingerprint)
        message = str(caught.value)
        assert "\n" not in message and message.startswith(str(checkpoint)) and change in message, message
        assert "start a new run folder" in message
    assert checkpoint.read_bytes() == before
    # what does not change results may change: loader workers, checkpoint frequency
    fit(Regression(), Points(), TrainSettings(epochs=3, batch_size=4, seed=5, num_workers=1, checkpoint_every=2),
        "cpu", work_dir=tmp_path, resume=True, fingerprint={"lr": 0.05})
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(ThreecadError, match="unreadable checkpoint"):
        fit(Regression(), Points(), settings, "cpu", work_dir=tmp_path, resume=True)
    torch.save({"epoch": 1, "model": {}}, checkpoint)  # a dict from another writer
    with pytest.raises(ThreecadError, match="not written by this version"):
        fit(Regression(), Points(), settings, "cpu", work_dir=tmp_path, resume=True)


def test_settings_are_checked():
    for bad in ({}, {"epochs": 2, "iterations": 3}, {"epochs": 0}, {"epochs": 2, "batch_size": 0},
                {"epochs": 2, "clip_grad_norm": 0.0}, {"epochs": 2, "scheduler_interval": "batch"}):
        with pytest.raises(ThreecadError):
            TrainSettings(**bad)


# ------------------------------------------------------------------------------------------ features
def test_gradient_clipping_matches_clip_grad_norm_in_a_hand_loop():
    settings = TrainSettings(epochs=2, batch_size=4, seed=4, clip_grad_norm=0.05)
    engine = Regression(lr=0.2)
    fit(engine, Points(), settings, "cpu")

    hand = Regression(lr=0.2)
    data = Points()
    optimizer, scheduler = hand.configure_optimizers(hand.net)
    hand.net.train()
    norms = []
    for epoch in range(2):
        for indices, _ in shard_batches(epoch_order(4, epoch, len(data)), 4):
            batch = torch.utils.data.default_collate([data[i] for i in indices])
            loss = hand._losses(hand.net, batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(hand.net.parameters(), 0.05)))
            optimizer.step()
        scheduler.step()
    assert _equal(_weights(engine), _weights(hand))
    assert min(norms) > 0.05  # clipping was active on every step
    unclipped = Regression(lr=0.2)
    fit(unclipped, Points(), TrainSettings(epochs=2, batch_size=4, seed=4), "cpu")
    assert not _equal(_weights(unclipped), _weights(engine))


def test_validation_is_logged_in_eval_mode_and_leaves_training_unchanged(tmp_path):
    settings = TrainSettings(epochs=3, batch_size=4, seed=8)
    plain = Regression()
    plain_history = fit(plain, Points(), settings, "cpu")
    checked = Regression()
    history = fit(checked, Points(), settings, "cpu", val_data=Points(5, seed=1), work_dir=tmp_path)
    assert all({"val_loss", "val_mae"} <= set(row) for row in history)
    assert checked.modes and not any(checked.modes)  # validation_step ran in eval mode
    assert [{k: row[k] for k in ("loss", "mae")} for row in history] == \
        [{k: row[k] for k in ("loss", "mae")} for row in plain_history]
    assert _equal(_weights(checked), _weights(plain))
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    logged = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert logged == history
    assert set(logged[0]) == {"epoch", "iterations", "lr", "images", "time_s", "loss", "mae", "val_loss", "val_mae"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, LOG_FILE]


def test_progress_bar_shows_the_running_losses(monkeypatch):
    bars = []

    class Bar:
        disable = False

        def __init__(self, iterable=None, desc=None, total=None):
            self.desc, self.total, self.postfix, self.n = desc, total, [], 0
            bars.append(self)

        def set_postfix(self, values, refresh=True):
            self.postfix.append(values)

        def update(self, n=1):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(training, "progress", Bar)
    history = fit(Regression(), Points(), TrainSettings(epochs=2, batch_size=4, seed=1), "cpu", desc="tiny")
    assert [b.desc for b in bars] == ["tiny epoch 1/2", "tiny epoch 2/2"]
    assert all(b.total == b.n == 3 for b in bars)
    assert set(bars[0].postfix[-1]) == {"loss", "mae"}
    assert bars[1].postfix[-1]["loss"] == f"{history[1]['loss']:.4f}"  # the running mean of the epoch


# ------------------------------------------------------------------------------------------ torchrun
def _ddp_worker(out: Path) -> None:
    """Subprocess under torchrun: each rank trains with its own work_dir (only rank 0 may write)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    trainable = Regression()
    history = fit(trainable, Points(), TrainSettings(epochs=3, batch_size=3, seed=6), "cpu",
                  work_dir=out / f"rank{rank}")
    torch.save({"seen": trainable.seen, "history": history, "weights": _weights(trainable),
                "world": dist.get_world_size()}, out / f"result{rank}.pt")
    dist.barrier()  # both ranks done before either tears its connections down
    dist.destroy_process_group()


def test_torchrun_two_processes_gloo_equals_one_process(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, "ddp", str(tmp_path)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == 2
    # each rank saw its shard of the seeded order: disjoint, together the whole global batch
    for epoch in range(3):
        order = epoch_order(6, epoch, 10)
        for rank, result in enumerate((r0, r1)):
            expected = [indices for indices, _ in shard_batches(order, 3, world=2, rank=rank)]
            assert result["seen"][4 * epoch:4 * epoch + 4] == expected
    # only rank 0 wrote
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == [CHECKPOINT_FILE, LOG_FILE]
    assert not (tmp_path / "rank1").exists()
    # same global batches, loss weighted by each rank's share: the 1-process result up to summation order
    single = Regression()
    history = fit(single, Points(), TrainSettings(epochs=3, batch_size=3, seed=6), "cpu")
    for result in (r0, r1):
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(result["weights"], _weights(single)))
        assert [row["images"] for row in result["history"]] == [10, 10, 10]
        for got, want in zip(result["history"], history):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert _equal(r0["weights"], r1["weights"])


if __name__ == "__main__":
    role, out = sys.argv[1], Path(sys.argv[2])
    {"kill": _kill_worker, "ddp": _ddp_worker}[role](out)
