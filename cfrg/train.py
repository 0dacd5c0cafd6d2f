"""CFRG training loop: single stage, all non-teacher modules jointly, resumable, DDP-ready.

Recipe (``../shared/reference/cfrg.md`` section 5, with the official code's flaws fixed): Adam
(lr 5e-4, betas 0.5/0.999) over every trainable parameter, weight decay applied when given (the
official option is parsed and dropped), MultiStepLR at 80 % and 90 % of the epochs (rounded, so
short runs decay too) with gamma 0.2, stepped per epoch; AMP only on CUDA; the last epoch is kept
(no test-set selection: the test split is never read here).

Exact resume: every epoch ends with an atomic checkpoint holding the trainable weights, optimizer,
scheduler, grad scaler, RNG states (python, numpy, torch, CUDA) and the log so far. The shuffling
order of epoch ``e`` comes from a generator seeded by ``(seed, e)`` and the synthetic anomalies from
``(seed, e, index)``, so a resumed run replays exactly the batches and losses of an uninterrupted one
(on CPU; CUDA kernels may be non-deterministic).

Multi-GPU: under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised (NCCL on CUDA,
gloo on CPU), the model is wrapped in DistributedDataParallel, each rank sees its shard of every
epoch (``DistributedSampler``), ``batch_size`` is the global batch, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cfrg.losses import cfrg_losses
from cfrg.model import CFRGNet
from threecad.anomalies import SyntheticAnomalyDataset
from threecad.errors import ThreecadError
from threecad.io import atomic_write, write_text
from threecad.progress import progress

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 32
    lr: float = 5e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # dis, rec, seg
    milestones: tuple[float, float] = (0.8, 0.9)
    gamma: float = 0.2
    amp: bool = True
    seed: int = 42
    workers: int = 0

    def milestone_epochs(self) -> list[int]:
        return sorted({max(1, int(round(f * self.epochs))) for f in self.milestones})


# ------------------------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(device: torch.device, world: int) -> torch.device:
    if device.type == "cuda" and world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


# ------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Every generator's state as plain Python values and tensors, so checkpoints load with
    ``torch.load(weights_only=True)`` (no arbitrary unpickling when resuming)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------- helpers
def make_optimizer(net: CFRGNet, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=config.milestone_epochs(), gamma=config.gamma)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def _collate(items: list[dict]) -> dict:
    return {key: torch.stack([item[key] for item in items]) for key in ("image", "augmented", "mask")}


def make_loader(data: SyntheticAnomalyDataset, config: TrainConfig, epoch: int, rank: int, world: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    data.set_epoch(epoch)
    generator = epoch_generator(config.seed, epoch)
    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=config.seed, drop_last=False)
        sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        data, batch_size=max(1, config.batch_size // world), shuffle=sampler is None, sampler=sampler,
        num_workers=config.workers, collate_fn=_collate, generator=generator, drop_last=False,
        pin_memory=device.type == "cuda",
    )


#: Options that may change between an interrupted run and its resumption without changing results.
RESUME_FREE = frozenset({"workers"})


def save_checkpoint(path: Path, net: CFRGNet, optimizer, scheduler, scaler, epoch: int, history: list,
                    config: TrainConfig) -> None:
    state = {
        "epoch": epoch,
        "model": net.trainable_state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "history": history,
        "config": asdict(config),
    }
    with atomic_write(path) as handle:
        torch.save(state, handle)


def load_checkpoint(path: Path) -> dict:
    """Tensors and plain values only (``weights_only=True``): a checkpoint cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ThreecadError(f"unreadable checkpoint ({exc.__class__.__name__}: {exc}); delete it to start over",
                            path) from None


def write_log(path: Path, history: Sequence[dict]) -> None:
    write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in history))


@torch.no_grad()
def validation_losses(net: CFRGNet, data: SyntheticAnomalyDataset, config: TrainConfig,
                      device: torch.device) -> dict[str, float]:
    """Mean losses on held-out normal images with fixed synthetic anomalies (logged, not used to select)."""
    was_training = net.training
    net.eval()
    data.set_epoch(0)
    loader = torch.utils.data.DataLoader(data, batch_size=max(1, config.batch_size), shuffle=False,
                                         num_workers=config.workers, collate_fn=_collate)
    sums, count = {"loss": 0.0, "dis": 0.0, "rec": 0.0, "seg": 0.0}, 0
    for batch in loader:
        out = net(batch["augmented"].to(device), batch["image"].to(device))
        losses = cfrg_losses(out, batch["mask"].to(device), config.loss_weights)
        n = batch["image"].shape[0]
        for key in sums:
            sums[key] += float(losses[key]) * n
        count += n
    net.train(was_training)
    return {f"val_{k}": v / max(count, 1) for k, v in sums.items()}


# ------------------------------------------------------------------------------------------- the loop
def train(
    net: CFRGNet,
    data: SyntheticAnomalyDataset,
    config: TrainConfig,
    device: torch.device,
    work_dir: Path | None = None,
    resume: bool = False,
    validation: SyntheticAnomalyDataset | None = None,
    stop_after: int | None = None,
) -> list[dict]:
    """Train ``net`` in place; returns the per-epoch log (also written to ``work_dir``).

    ``stop_after``: return after this many epochs of *this call* (a time-boxed job; continue later
    with ``resume=True``). The schedule always follows ``config.epochs``.
    """
    rank, world = init_distributed()
    device = rank_device(device, world)
    use_amp = bool(config.amp) and device.type == "cuda"
    # NHWC: oneDNN (CPU) and cuDNN convolutions run faster on it (a 128 px CPU step: -12 %)
    net.to(device=device, memory_format=torch.channels_last)
    optimizer = make_optimizer(net, config)
    scheduler = make_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history: list[dict] = []
    start_epoch = 0
    checkpoint = Path(work_dir) / CHECKPOINT_FILE if work_dir is not None else None
    if resume and checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        saved, now = state.get("config", {}), asdict(config)
        changed = sorted(k for k in now if k not in RESUME_FREE and saved.get(k, now[k]) != now[k])
        if changed:
            raise ThreecadError(
                "checkpoint was written with other settings ("
                + ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
                + "); resume with the same options or start a new run folder",
                checkpoint,
            )
        net.load_trainable_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        log.info("resuming from %s at epoch %d/%d", checkpoint, start_epoch + 1, config.epochs)
    else:
        if resume:
            log.info("no checkpoint in %s: starting from epoch 1", work_dir)
        seed_all(config.seed + rank)
    model = net
    if world > 1:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    end_epoch = config.epochs if stop_after is None else min(config.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, end_epoch):
        net.train()  # the teacher stays in eval mode by construction
        loader = make_loader(data, config, epoch, rank, world, device)
        sums = torch.zeros(4, dtype=torch.float64)
        count = 0
        begin = time.perf_counter()
        bar = progress(loader, desc=f"cfrg epoch {epoch + 1}/{config.epochs}", total=len(loader))
        for batch in bar:
            clean = batch["image"].to(device, non_blocking=True, memory_format=torch.channels_last)
            augmented = batch["augmented"].to(device, non_blocking=True, memory_format=torch.channels_last)
            mask = batch["mask"].to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=use_amp):
                out = model(augmented, clean)
            losses = cfrg_losses(out, mask, config.loss_weights)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            n = clean.shape[0]
            values = [float(losses[k].detach()) for k in ("loss", "dis", "rec", "seg")]
            sums += torch.tensor(values, dtype=torch.float64) * n
            count += n
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(dis=f"{values[1]:.4f}", rec=f"{values[2]:.4f}", seg=f"{values[3]:.4f}")
        totals = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)])
        if world > 1:
            dist.all_reduce(totals)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "images": int(totals[4]),
               "time_s": round(time.perf_counter() - begin, 3)}
        row.update({k: float(totals[i] / max(totals[4], 1)) for i, k in enumerate(("loss", "dis", "rec", "seg"))})
        scheduler.step()
        if validation is not None and rank == 0:
            row.update(validation_losses(net, validation, config, device))
        history.append(row)
        log.info("epoch %d/%d: loss %.4f (dis %.4f rec %.4f seg %.4f) in %.1f s", epoch + 1, config.epochs,
                 row["loss"], row["dis"], row["rec"], row["seg"], row["time_s"])
        if rank == 0 and work_dir is not None:
            save_checkpoint(checkpoint, net, optimizer, scheduler, scaler, epoch, history, config)
            write_log(Path(work_dir) / LOG_FILE, history)
    net.eval()
    return history
