"""The one training loop for every gradient-trained method (``docs/training.md``).

A method hands :func:`fit` a :class:`Trainable` (its module, optimiser, scheduler and steps) and
the engine does the rest, identically for every method:

* **Schedule**: ``epochs`` passes over the data, or ``iterations`` optimiser steps (the data
  cycles through passes). The order of pass ``e`` comes from a generator seeded by
  ``(seed, e)`` (:func:`epoch_order`); a dataset with ``set_epoch(e)`` gets it called first.
* **Checkpoints**: atomic (``checkpoint.pt`` written through :func:`threecad.io.atomic_write`) at
  the end of every epoch (epochs mode) or period of ``checkpoint_every`` iterations, holding the
  module weights, optimiser, scheduler, grad scaler, every process's RNG states (python, numpy,
  torch, CUDA), the position in the data, the partial sums of the current log row and the history.
  Loaded with ``torch.load(weights_only=True)``: tensors and plain values only.
* **Exact resume** (``resume=True``): an interrupted run continued from its checkpoint gives the
  losses and weights of an uninterrupted one, bit for bit on CPU (CUDA kernels may be
  non-deterministic). A checkpoint written with other settings (:class:`TrainSettings` or the
  method's ``fingerprint``) is refused with one line naming it and what differs.
* **DDP** under ``torchrun`` (``WORLD_SIZE > 1``): NCCL on CUDA, gloo on CPU; ``batch_size`` is
  the global batch; every global batch of the seeded order is split across the ranks
  (:func:`shard_batches`) and each rank's loss weighted by its share, so the averaged gradient is
  the gradient of the global-batch mean (a 1-process run's, up to summation order and BatchNorm's
  per-rank statistics). Only rank 0 writes.
* **AMP** (float16 autocast + grad scaler) only on CUDA; gradient clipping (``clip_grad_norm``)
  after unscaling; a JSONL log (``train_log.jsonl``), a progress bar with the running losses,
  validation losses on held-out data (``validation_step``, RNG states saved and restored around it,
  so validation never changes the training trajectory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from threecad.errors import ThreecadError
from threecad.io import atomic_write, write_text
from threecad.progress import progress

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"
#: Version of the checkpoint layout written by :func:`fit`.
CHECKPOINT_FORMAT = 1
#: Settings that may change between an interrupted run and its resumption without changing results.
RESUME_FREE = frozenset({"num_workers", "checkpoint_every"})


@dataclass(frozen=True)
class TrainSettings:
    """How the engine trains (the method's own hyper-parameters go in its ``fingerprint``).

    ``epochs`` / ``iterations``: exactly one. ``batch_size``: the global batch (split across
    ``torchrun`` ranks). ``amp``: float16 autocast and grad scaling, used only on CUDA.
    ``clip_grad_norm``: clip the total gradient norm of the optimised parameters to this value.
    ``checkpoint_every`` (optional field): in iterations mode, a log row and a checkpoint every
    this many iterations (default: one pass over the data); in epochs mode, an extra mid-epoch
    checkpoint every this many iterations (default: none). ``scheduler_interval`` (optional
    field): ``"epoch"`` (the contract's default: the scheduler steps after every pass) or
    ``"iteration"`` (after every optimiser step).
    """

    epochs: int | None = None
    iterations: int | None = None
    batch_size: int = 16
    seed: int = 0
    amp: bool = True
    clip_grad_norm: float | None = None
    num_workers: int = 0
    checkpoint_every: int | None = None
    scheduler_interval: str = "epoch"

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.iterations is None):
            raise ThreecadError(f"give exactly one of epochs and iterations (got epochs={self.epochs}, "
                                f"iterations={self.iterations})")
        for name in ("epochs", "iterations", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ThreecadError(f"training setting {name} must be a whole number >= 1, got {value!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ThreecadError(f"training setting num_workers must be a whole number >= 0, got {self.num_workers!r}")
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise ThreecadError(f"training setting clip_grad_norm must be a number > 0, got {self.clip_grad_norm!r}")
        if self.scheduler_interval not in ("epoch", "iteration"):
            raise ThreecadError(f"training setting scheduler_interval must be 'epoch' or 'iteration', "
                                f"got {self.scheduler_interval!r}")


@runtime_checkable
class Trainable(Protocol):
    """What a method hands :func:`fit`.

    Required: ``trainable_module()`` (one module holding every parameter to optimise; the engine
    moves it to the device and wraps it in DDP), ``configure_optimizers(module)`` returning
    ``(optimizer, scheduler or None)``, ``training_step(module, batch)`` returning a dict of scalar
    tensors whose ``"loss"`` (the **mean** over the batch's samples) is backpropagated and every
    key logged. ``module`` is the DDP-wrapped one: call it (its ``forward``), not its submodules;
    :func:`unwrap` gives the plain module.

    Optional (looked up with ``getattr``): ``validation_step(module, batch)`` (same keys, run on
    the plain module in eval mode under ``no_grad``; logged as ``val_<key>``),
    ``train_mode(module)`` (default ``module.train()``; e.g. keep a frozen encoder in eval),
    ``checkpoint_state(module)`` / ``load_checkpoint_state(module, state)`` (default the module's
    ``state_dict``; e.g. leave a frozen teacher out of the checkpoint), and the attribute
    ``find_unused_parameters`` (passed to DDP; default False).
    """

    def trainable_module(self) -> torch.nn.Module: ...

    def configure_optimizers(self, module: torch.nn.Module) -> tuple[torch.optim.Optimizer, object | None]: ...

    def training_step(self, module: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]: ...


# ------------------------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(device: torch.device, world: int) -> torch.device:
    """Under torchrun on CUDA each process drives the GPU of its ``LOCAL_RANK``."""
    if device.type == "cuda" and world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (itself otherwise)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


# ------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Every generator's state as plain values and tensors (loadable with ``weights_only=True``)."""
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
    """Seed Python, numpy's legacy global generator and torch: the one seeding of the project (the
    runner before a fit, the engine per rank). Methods also take explicit seeds for their own draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch and numpy global generators seeded for a block and restored after it: FrEIA draws
    each block's permutation from numpy's global generator, the layers' initial weights from torch's."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(state)


# ------------------------------------------------------------------------------------------- data order
def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of pass ``epoch``: seeded by ``(seed, epoch)`` through numpy's SeedSequence."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The sample order of pass ``epoch``: ``randperm(n)`` from :func:`epoch_generator`, after two
    int64 draws that are skipped.

    The skipped draws keep the order of runs made by CFRG's first loop unchanged: there, a
    shuffling ``DataLoader`` owned the generator, and two loader iterators were created per epoch
    (the progress bar's ``tqdm.auto`` class makes one on construction), each drawing its workers'
    base seed before the sampler ran.
    """
    generator = epoch_generator(seed, epoch)
    for _ in range(2):
        torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(n, generator=generator).tolist()


def shard_batches(order: Sequence[int], batch_size: int, world: int = 1, rank: int = 0) -> list[tuple[list[int], float]]:
    """This rank's batches of one pass: ``(indices, loss weight)`` per optimiser step.

    Global batch ``j`` is ``order[j*B:(j+1)*B]`` (the last one may be short); it is cut into
    ``world`` contiguous parts as even as possible (``numpy.array_split``), rank ``r`` taking part
    ``r``. The weight ``world * n_r / n`` makes DDP's gradient average equal to the gradient of the
    mean over the global batch when the parts differ in size. A rank left without a sample (a last
    batch shorter than ``world``) gets the batch's first index with weight 0, so that every rank
    takes part in every gradient all-reduce; it adds nothing to the gradient or the logged losses.
    """
    if batch_size < world:
        raise ThreecadError(f"batch_size {batch_size} is smaller than the number of processes {world}; "
                            "give a global batch of at least one sample per process")
    out = []
    for start in range(0, len(order), batch_size):
        chunk = list(order[start:start + batch_size])
        sizes = [len(part) for part in np.array_split(np.arange(len(chunk)), world)]
        begin = sum(sizes[:rank])
        part = chunk[begin:begin + sizes[rank]]
        if part:
            out.append((part, world * len(part) / len(chunk)))
        else:
            out.append(([chunk[0]], 0.0))
    return out


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


# ------------------------------------------------------------------------------------------- checkpoints
def _plain(obj: Any) -> Any:
    """JSON-normalised copy (tuples become lists), so saved and current settings compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` atomically: a killed process leaves the previous checkpoint or this one."""
    with atomic_write(path) as handle:
        torch.save(state, handle)


def load_checkpoint(path: Path) -> dict:
    """Tensors and plain values only (``weights_only=True``): a checkpoint cannot run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ThreecadError(f"unreadable checkpoint ({exc.__class__.__name__}: {exc}); delete it to start over",
                            path) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ThreecadError("checkpoint was not written by this version of the training engine; "
                            "start a new run folder (or delete it to start over)", path)
    return state


def _check_settings(path: Path, state: dict, settings: dict, fingerprint: dict) -> None:
    saved = {**state.get("settings", {}), **state.get("fingerprint", {})}
    now = {**settings, **fingerprint}
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE and saved.get(k) != now.get(k))
    if changed:
        raise ThreecadError(
            "checkpoint was written with other settings ("
            + ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
            + "); resume with the same options or start a new run folder",
            path,
        )


def write_log(path: Path, history: Sequence[dict]) -> None:
    write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in history))


# ------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def _validate(trainable, module: torch.nn.Module, data, settings: TrainSettings, device: torch.device,
              collate: Callable | None) -> dict[str, float]:
    """Mean ``validation_step`` values over ``data`` (in order, eval mode, RNG states restored)."""
    saved = rng_state()
    module.eval()
    if hasattr(data, "set_epoch"):
        data.set_epoch(0)
    loader = torch.utils.data.DataLoader(data, batch_size=settings.batch_size, shuffle=False,
                                         num_workers=settings.num_workers, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    sums: dict[str, float] = {}
    count = 0
    for batch in loader:
        n = _batch_len(batch)
        out = trainable.validation_step(module, _to_device(batch, device))
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        count += n
    set_rng_state(saved)
    return {f"val_{key}": value / max(count, 1) for key, value in sums.items()}


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
        if isinstance(value, list | tuple):
            return len(value)
    return 1


# ------------------------------------------------------------------------------------------- the loop
def fit(
    trainable: Trainable,
    train_data: torch.utils.data.Dataset,
    settings: TrainSettings,
    device: torch.device | str,
    work_dir: Path | None = None,
    resume: bool = False,
    val_data: torch.utils.data.Dataset | None = None,
    collate: Callable | None = None,
    desc: str = "train",
    fingerprint: dict | None = None,
    stop_after: int | None = None,
) -> list[dict]:
    """Train ``trainable.trainable_module()`` in place; returns the history (one row per epoch,
    or per ``checkpoint_every`` iterations in iterations mode), also written to ``work_dir``.

    Row keys: ``epoch`` (1-based pass), ``iterations`` (optimiser steps so far), ``lr`` (of the
    period's last step), ``images`` (samples seen in the period, all ranks), ``time_s``, the mean
    of every ``training_step`` key over the period's samples, and ``val_<key>`` when ``val_data``
    is given (computed at the end of each row, on rank 0, shared with the others).

    ``work_dir`` None: no files. ``fingerprint``: the method's settings a checkpoint must match
    (plain values). ``stop_after`` (optional): return after this many epochs (iterations in
    iterations mode) of *this call*, with a checkpoint (a time-boxed job; continue with
    ``resume=True``). ``collate``: the DataLoader's ``collate_fn`` (default: torch's).
    """
    fingerprint = _plain(fingerprint or {})
    settings_plain = _plain(asdict(settings))
    clash = sorted(set(fingerprint) & set(settings_plain))
    if clash:
        raise ValueError(f"fingerprint keys {clash} repeat TrainSettings fields")
    n_data = len(train_data)
    if n_data == 0:
        raise ThreecadError("no training samples: the training set is empty")
    rank, world = init_distributed()
    device = rank_device(torch.device(device), world)
    use_amp = bool(settings.amp) and device.type == "cuda"
    net = trainable.trainable_module()
    net.to(device)
    optimizer, scheduler = trainable.configure_optimizers(net)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    steps_per_epoch = math.ceil(n_data / settings.batch_size)
    iterations_mode = settings.iterations is not None
    period = (settings.checkpoint_every or steps_per_epoch) if iterations_mode else None
    extra_every = settings.checkpoint_every if not iterations_mode else None
    total_epochs = settings.epochs if not iterations_mode else None
    validate = val_data is not None and len(val_data) > 0 and hasattr(trainable, "validation_step")
    checkpoint = Path(work_dir) / CHECKPOINT_FILE if work_dir is not None else None

    # position: next batch ``step_in_epoch`` of pass ``epoch``; ``iteration`` steps done so far
    epoch, step_in_epoch, iteration = 0, 0, 0
    history: list[dict] = []
    partial = {"sums": None, "keys": None, "count": 0.0, "time_s": 0.0, "lr": None}
    if resume and checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        _check_settings(checkpoint, state, settings_plain, fingerprint)
        _load_module(trainable, net, state["module"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) != world:
            log.warning("checkpoint written by %d processes, resumed by %d: the run continues, but not "
                        "exactly as an uninterrupted one would", len(rngs), world)
        set_rng_state(rngs[rank % len(rngs)])
        history = list(state["history"])
        epoch, step_in_epoch, iteration = int(state["epoch"]), int(state["step_in_epoch"]), int(state["iteration"])
        saved_partial = state["partial"]
        partial = {"sums": saved_partial["sums"], "keys": saved_partial["keys"],
                   "count": float(saved_partial["count"]), "time_s": float(saved_partial["time_s"]),
                   "lr": saved_partial["lr"]}
        if partial["sums"] is not None:
            partial["sums"] = partial["sums"].to(device)
        log.info("%s: resuming from %s at epoch %d, iteration %d", desc, checkpoint, epoch + 1, iteration)
    else:
        if resume:
            log.info("%s: no checkpoint in %s, starting from the beginning", desc, work_dir)
        seed_all(settings.seed + rank)

    model = net
    if world > 1:
        model = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(getattr(trainable, "find_unused_parameters", False)))
    train_mode = getattr(trainable, "train_mode", None)

    def set_train_mode() -> None:
        train_mode(net) if train_mode is not None else net.train()

    def finished() -> bool:
        return iteration >= settings.iterations if iterations_mode else epoch >= total_epochs

    def close_row() -> None:
        keys = partial["keys"] or []
        sums = partial["sums"] if partial["sums"] is not None else torch.zeros(0, dtype=torch.float64, device=device)
        totals = torch.cat([sums, torch.tensor([partial["count"]], dtype=torch.float64, device=device)])
        if world > 1:
            dist.all_reduce(totals)
        totals = totals.cpu()
        count = float(totals[-1])
        row = {"epoch": epoch if not iterations_mode or step_in_epoch == 0 else epoch + 1,
               "iterations": iteration, "lr": partial["lr"], "images": int(count),
               "time_s": round(partial["time_s"], 3)}
        row.update({key: float(totals[j] / max(count, 1)) for j, key in enumerate(keys)})
        if validate:
            values = [_validate(trainable, net, val_data, settings, device, collate) if rank == 0 else None]
            if world > 1:
                dist.broadcast_object_list(values, src=0)
            row.update(values[0])
            set_train_mode()
        history.append(row)
        losses = ", ".join(f"{k} {row[k]:.4f}" for k in keys)
        log.info("%s %s %d: %s in %.1f s", desc, "epoch" if not iterations_mode else "iteration",
                 row["epoch"] if not iterations_mode else iteration, losses, row["time_s"])
        partial.update(sums=None, keys=None, count=0.0, time_s=0.0, lr=None)

    def write_checkpoint() -> None:
        rngs = [rng_state()]
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if rank != 0 or checkpoint is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch, "step_in_epoch": step_in_epoch, "iteration": iteration,
            "module": _module_state(trainable, net),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(),
            "rng": rngs,
            "history": history,
            "partial": {"sums": None if partial["sums"] is None else partial["sums"].cpu(), "keys": partial["keys"],
                        "count": partial["count"], "time_s": partial["time_s"], "lr": partial["lr"]},
            "settings": settings_plain,
            "fingerprint": fingerprint,
        }
        save_checkpoint(checkpoint, state)
        write_log(Path(work_dir) / LOG_FILE, history)

    done_here = 0  # epochs (iterations in iterations mode) completed by this call, for ``stop_after``
    stop = False
    while not finished() and not stop:
        if hasattr(train_data, "set_epoch"):
            train_data.set_epoch(epoch)
        batches = shard_batches(epoch_order(settings.seed, epoch, n_data), settings.batch_size, world, rank)
        todo = batches[step_in_epoch:]
        if iterations_mode:
            todo = todo[:settings.iterations - iteration]
        set_train_mode()
        loader = torch.utils.data.DataLoader(
            train_data, batch_sampler=[indices for indices, _ in todo], num_workers=settings.num_workers,
            collate_fn=collate, pin_memory=device.type == "cuda", generator=epoch_generator(settings.seed, epoch))
        label = (f"{desc} epoch {epoch + 1}/{total_epochs}" if not iterations_mode
                 else f"{desc} iterations {iteration + 1}-{iteration + len(todo)}/{settings.iterations}")
        # A manual bar: wrapping the loader in ``tqdm.auto`` would create a second loader iterator
        # (and with workers, a second worker pool) on construction.
        bar = progress(None, desc=label, total=len(todo))
        show = not getattr(bar, "disable", True)
        last = time.perf_counter()
        for (indices, weight), batch in zip(todo, loader):
            batch = _to_device(batch, device)
            with torch.autocast(device.type, enabled=use_amp):
                out = trainable.training_step(model, batch)
            loss = out["loss"] * weight if world > 1 else out["loss"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if settings.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, settings.clip_grad_norm)
            partial["lr"] = float(optimizer.param_groups[0]["lr"])
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None and settings.scheduler_interval == "iteration":
                scheduler.step()
            iteration += 1
            step_in_epoch += 1
            n = len(indices) if weight > 0 else 0
            if partial["keys"] is None:
                partial["keys"] = list(out)
                partial["sums"] = torch.zeros(len(out), dtype=torch.float64, device=device)
            partial["sums"] += torch.stack([out[k].detach().double() for k in partial["keys"]]) * n
            partial["count"] += n
            if show:
                means = (partial["sums"] / max(partial["count"], 1)).tolist()
                bar.set_postfix({k: f"{v:.4f}" for k, v in zip(partial["keys"], means)}, refresh=False)
                bar.update(1)
            now = time.perf_counter()
            partial["time_s"] += now - last
            epoch_end = step_in_epoch == len(batches)
            if epoch_end:  # the pass is complete: the position moves to the next one
                if scheduler is not None and settings.scheduler_interval == "epoch":
                    scheduler.step()
                epoch, step_in_epoch = epoch + 1, 0
            if iterations_mode:
                row_end = iteration % period == 0 or iteration == settings.iterations
                done_here += 1
            else:
                row_end = epoch_end
                done_here += int(epoch_end)
            stop = stop_after is not None and done_here >= stop_after and not finished()
            if row_end:
                close_row()
            if row_end or stop or (extra_every is not None and iteration % extra_every == 0):
                write_checkpoint()
            if stop:
                break
            last = time.perf_counter()
        bar.close()
    net.eval()
    return history


def _module_state(trainable, module: torch.nn.Module) -> dict:
    hook = getattr(trainable, "checkpoint_state", None)
    return hook(module) if hook is not None else module.state_dict()


def _load_module(trainable, module: torch.nn.Module, state: dict) -> None:
    hook = getattr(trainable, "load_checkpoint_state", None)
    if hook is not None:
        hook(module, state)
    else:
        module.load_state_dict(state)
