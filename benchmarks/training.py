"""Per-step time of the training engine against a bare hand loop on the same model and batches.

    .venv/bin/python benchmarks/training.py [--model conv|cfrg] [--threads 1] [--passes 2] [--repeats 5]

Both loops draw the same batches from the same DataLoader set-up (the engine's seeded order) and
run forward, loss, zero_grad, backward and an Adam step; the engine adds what it always does
(batch to device, the autocast context, the grad scaler calls, loss accumulation in float64, the
lr read, the progress-bar check) with no work_dir (no checkpoint files) and no progress bar.
Each repeat times ``--passes`` passes of each (the engine's as one ``fit``, set-up included),
alternating which runs first, after a warm-up pass; the figure is the median over repeats of the
per-step time. ``conv``: a 4-layer CNN on 64x64 images,
batch 16. ``cfrg``: CFRG with the offline Lite0 teacher at 64 px, batch 4. ``tiny``: an MLP whose
step is a fraction of a millisecond, so the ratio shows the engine's fixed cost per step.
Goal: ratio engine / hand <= 1.05. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch
import torch.nn.functional as F

from threecad.methods.training import TrainSettings, epoch_order, fit, shard_batches
from threecad.progress import set_progress


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.targets = torch.rand(n, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "target": self.targets[index]}


class _Conv:
    """A small CNN regressing a scalar: about 10-30 ms a step at batch 16 on one CPU thread."""

    batch_size = 16
    collate = None

    def __init__(self):
        torch.manual_seed(0)
        layers, c = [], 3
        for width in (16, 32, 64, 64):
            layers += [torch.nn.Conv2d(c, width, 3, stride=2, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU()]
            c = width
        self.net = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, 1))
        self.data = _Images(16 * 40, 64)

    def trainable_module(self):
        return self.net

    def configure_optimizers(self, module):
        return torch.optim.Adam(module.parameters(), lr=1e-3), None

    def training_step(self, module, batch):
        return {"loss": F.mse_loss(module(batch["image"])[:, 0], batch["target"])}


class _Tiny(_Conv):
    """A 2-layer MLP on flattened 8x8 images (well under 1 ms a step): the engine's fixed cost per
    step laid bare, the worst case for the ratio."""

    def __init__(self):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 1))
        self.data = _Images(16 * 40, 8)


class _CFRG:
    """CFRG (Lite0 teacher, random weights) at 64 px with its own recipe and collate."""

    batch_size = 4

    def __init__(self):
        from cfrg.model import CFRGNet
        from cfrg.train import CFRGTraining, TrainConfig, collate
        from threecad.methods.blocks import Teacher
        from threecad.synth.anomalies import SyntheticAnomalyDataset

        torch.manual_seed(0)
        self.inner = CFRGTraining(CFRGNet(Teacher("efficientnet_lite0", weights="random")), TrainConfig(epochs=1000))
        self.collate = collate
        items = _Images(4 * 40, 64)
        synthetic = SyntheticAnomalyDataset(items, seed=0)
        # synthesis outside the timed loops: both loops read the same precomputed items
        self.data = [synthetic[i] for i in range(len(synthetic))]

    def trainable_module(self):
        return self.inner.trainable_module()

    def configure_optimizers(self, module):
        return self.inner.configure_optimizers(module)

    def training_step(self, module, batch):
        return self.inner.training_step(module, batch)


def _hand(model, optimizer, passes: int) -> float:
    """``passes`` passes of a bare loop over the engine's batches; seconds per step."""
    net = model.trainable_module()
    net.train()
    steps = 0
    start = time.perf_counter()
    for epoch in range(passes):
        batches = [indices for indices, _ in shard_batches(epoch_order(0, epoch, len(model.data)), model.batch_size)]
        loader = torch.utils.data.DataLoader(model.data, batch_sampler=batches, collate_fn=model.collate)
        for batch in loader:
            loss = model.training_step(net, batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
    return (time.perf_counter() - start) / steps


def _engine(model, passes: int) -> float:
    """One ``fit`` of ``passes`` epochs (set-up included: optimizer, seeding); seconds per step."""
    start = time.perf_counter()
    history = fit(model, model.data, TrainSettings(epochs=passes, batch_size=model.batch_size, seed=0), "cpu",
                  collate=model.collate)
    return (time.perf_counter() - start) / history[-1]["iterations"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("conv", "cfrg", "tiny"), default="conv")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--passes", type=int, default=2, help="passes over the data per timed run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_progress(False)
    logging.getLogger("threecad").setLevel(logging.WARNING)
    model = {"conv": _Conv, "cfrg": _CFRG, "tiny": _Tiny}[args.model]()
    optimizer, _ = model.configure_optimizers(model.trainable_module())
    _hand(model, optimizer, 1)  # warm-up (allocator, oneDNN primitives)
    _engine(model, 1)
    hand, engine = [], []
    for repeat in range(args.repeats):
        if repeat % 2:
            engine.append(_engine(model, args.passes))
            hand.append(_hand(model, optimizer, args.passes))
        else:
            hand.append(_hand(model, optimizer, args.passes))
            engine.append(_engine(model, args.passes))
    h, e = statistics.median(hand), statistics.median(engine)
    print(json.dumps({
        "model": args.model, "threads": torch.get_num_threads(), "batch_size": model.batch_size,
        "steps_per_pass": len(shard_batches(list(range(len(model.data))), model.batch_size)),
        "passes": args.passes, "repeats": args.repeats, "hand_ms_per_step": round(1000 * h, 3), "engine_ms_per_step": round(1000 * e, 3),
        "ratio": round(e / h, 4), "overhead_us_per_step": round(1e6 * (e - h), 1), "hand_ms_all": [round(1000 * x, 2) for x in hand],
        "engine_ms_all": [round(1000 * x, 2) for x in engine],
    }, indent=1))


if __name__ == "__main__":
    main()
