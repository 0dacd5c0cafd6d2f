"""Standardized runs: every registered method fitted, predicted, evaluated and timed the same way.

Same data, seed, image size and device for everyone; for each category: ``threecad.methods.runner.train``,
``threecad.methods.runner.predict`` (native-size maps), evaluation under both protocols, and inference
timing the way the MVTec AD 2 runtime protocol measures it: batch size 1, warm-up passes first,
and each timed pass covers the copy of the image to the device, the forward pass and the map coming
back to host memory. Memory is the peak reserved by PyTorch's CUDA allocator
(``torch.cuda.memory_stats()['reserved_bytes.all.peak']``) on a GPU, and the process's peak resident
set size during the timed passes on a CPU (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``).

A run is identified by the sha256 of its settings (method, configuration, seed, size, resize, dtype,
dataset fingerprint, device): its categories are stored one at a time, so an interrupted run
resumes where it stopped and finished categories are never redone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leaderboard.reported import family_of
from leaderboard.store import STANDARDIZED_RUNNER, Store, opened_store
from leaderboard.submit import (
    PROTOCOLS,
    curve_rows,
    dataset_fingerprint,
    dataset_name,
    evaluate_tree,
    result_rows,
)
from threecad.dataset.catalog import resolve_categories
from threecad.dataset.layout import list_categories
from threecad.device import resolve_device
from threecad.errors import ThreecadError
from threecad.maps.files import SCORES_FILE, read_scores, write_scores

log = logging.getLogger(__name__)

RUNTIME = "runtime"
DEFAULT_RUNS_DIR = Path("~/.threecad/runs")
LOCK_FILE = ".lock"  # beside runs/ and maps/: serialises merges into maps/scores.csv


# ---------------------------------------------------------------------------------------------- hardware
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def hardware_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What a timing was measured on (stored with every runtime number)."""
    device = resolve_device(device)
    info: dict[str, Any] = {
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": _ram_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


# ---------------------------------------------------------------------------------------------- memory
def _reset_cpu_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak, KiB on Linux
    except (ImportError, OSError):
        return None


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    latencies_ms: list[float]
    peak_memory_mb: float | None
    memory_kind: str  # "cuda_reserved_peak" or "cpu_peak_rss" (or "cpu_lifetime_peak_rss")
    warmup: int

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.latencies_ms)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"protocol": RUNTIME, "metric": "latency_ms", "value": self.mean_ms},
            {"protocol": RUNTIME, "metric": "throughput_ips", "value": 1000.0 / self.mean_ms},
            {"protocol": RUNTIME, "metric": "peak_memory_mb", "value": self.peak_memory_mb},
        ]


def time_inference(method, images: list[torch.Tensor], device: str | torch.device, warmup: int = 3,
                   timed: int = 20) -> Timing:
    """Batch-1 latency of ``method.predict_batch``; ``images`` are CPU tensors (3, H, W), decoded beforehand.

    Each timed pass starts with the image in host memory and ends with the map in host memory
    (``predict`` returns numpy arrays, which forces the device to finish).
    """
    if not images:
        raise ThreecadError("no test images to time inference on")
    device = resolve_device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        kind = "cuda_reserved_peak"
    else:
        kind = "cpu_peak_rss" if _reset_cpu_peak() else "cpu_lifetime_peak_rss"
    latencies = []
    for i in range(warmup + timed):
        image = images[i % len(images)]
        start = time.perf_counter()
        batch = image.unsqueeze(0).to(device, non_blocking=False)
        scores, maps = method.predict_batch(batch)
        if isinstance(maps, torch.Tensor):  # the protocol requires the map back on the host
            maps = maps.cpu()
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = (time.perf_counter() - start) * 1000.0
        if i >= warmup:
            latencies.append(elapsed)
    if cuda:
        peak = torch.cuda.memory_stats(device)["reserved_bytes.all.peak"] / 2**20
    else:
        peak = _cpu_peak_mb()
    return Timing(latencies, peak, kind, warmup)


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class RunSummary:
    sha256: str
    method: str
    done: list[str] = field(default_factory=list)  # categories run now
    skipped: list[str] = field(default_factory=list)  # categories already stored (resumed)
    results: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)

    def text(self) -> str:
        lines = [f"standardized run {self.sha256[:12]} ({self.method}): ran {', '.join(self.done) or 'nothing'}"
                 + (f"; already stored: {', '.join(self.skipped)}" if self.skipped else "")]
        for category, values in self.results.items():
            cells = ", ".join(f"{k} {'-' if v is None else round(v, 4)}" for k, v in values.items())
            lines.append(f"  {category}: {cells}")
        return "\n".join(lines)


def run_identity(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class RunPlan:
    """Everything one standardized run needs, settled once on the driver: plain, picklable data.

    A category is computed from the plan alone (:func:`compute_category`, in this process or in a
    Ray worker) and stored from it (:func:`store_category`), so the run identity, the output folder
    and the submission record are the same whichever process computes a category.
    """

    method: str
    dataset: Path
    categories: list[str]
    out: Path
    device: str  # "cpu" or "cuda": the device type the identity was computed for
    size: int
    resize: str
    seed: int
    config: dict[str, Any]
    dtype: str
    exposure: str
    warmup: int
    timed: int
    eval_device: str
    settings: dict[str, Any]
    sha256: str
    record: dict[str, Any]  # the store's submission record (without the per-category memory kind)


def _identity_settings(method: str, config: dict[str, Any], seed: int, size: int, resize: str, exposure: str,
                       dtype: str, fingerprint: str, hardware: dict[str, Any], warmup: int,
                       timed: int) -> dict[str, Any]:
    return {
        "kind": "standardized-run", "method": method, "config": config, "seed": seed, "size": size,
        "resize": resize, "exposure": exposure, "dtype": dtype, "dataset_fingerprint": fingerprint,
        "device": hardware["device"], "gpu": hardware.get("gpu"), "warmup": warmup, "timed": timed,
    }


def plan_run(
    method: str,
    dataset: str | Path,
    categories: list[str] | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    size: int = 256,
    resize: str = "squash",
    seed: int = 0,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    exposure: str = "raw",
    warmup: int = 3,
    timed: int = 20,
    eval_device: str = "cpu",
    hardware: dict[str, Any] | None = None,
) -> RunPlan:
    """Settle a standardized run: its categories, identity (sha256 of the settings), folder and record.

    ``hardware`` is what the categories will run on (:func:`hardware_info`); by default this
    machine with ``device``. A Ray driver passes what a worker with the job's resources reported,
    since the identity names the GPU model and the driver may have none. ``out`` defaults to
    ``~/.threecad/runs/<run id>``. Raises before any work for an unknown method or category.
    """
    from threecad.methods import get_method

    dataset = Path(dataset)
    cats = resolve_categories(list_categories(dataset), categories, dataset)
    get_method(method)  # unknown method: clear error before any work
    if hardware is None:
        hardware = hardware_info(resolve_device(device))
    fingerprint = dataset_fingerprint(dataset)
    config = dict(config or {})
    settings = _identity_settings(method, config, seed, size, resize, exposure, dtype, fingerprint, hardware,
                                  warmup, timed)
    sha = run_identity(settings)
    out = Path(out).expanduser() if out is not None else DEFAULT_RUNS_DIR.expanduser() / sha[:12]
    record = {
        "sha256": sha, "method": method, "version": "standardized", "family": family_of(method),
        "source": "evaluated", "dataset_fingerprint": fingerprint, "dataset_name": dataset_name(dataset),
        "eval_size": f"{size}x{size} {resize}",
        "hardware": hardware, "meta": {**settings, "runner": STANDARDIZED_RUNNER},
    }
    return RunPlan(method, dataset, cats, out, hardware["device"], size, resize, seed, config, dtype, exposure,
                   warmup, timed, eval_device, settings, sha, record)


@dataclass
class CategoryResult:
    """One category of a run, computed: the store rows (plain dicts) and what the summary prints."""

    sha256: str
    method: str
    category: str
    rows: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    memory_kind: str
    summary: dict[str, float | None]
    hardware: dict[str, Any]
    seconds: float = 0.0


def _mean_rows(store: Store, sha: str) -> list[dict[str, Any]]:
    """The run's ``mean`` rows over every category stored so far (None if any category lacks a value)."""
    from threecad.metrics.evaluator import mean_of

    by_key: dict[tuple[str, str], list[float | None]] = {}
    for row in store.results(submission=sha):
        if row["category"] != "mean":
            by_key.setdefault((row["protocol"], row["metric"]), []).append(row["value"])
    return [{"category": "mean", "protocol": p, "metric": m, "value": mean_of(v)} for (p, m), v in by_key.items()]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing): parallel jobs of one run on one
    machine take turns merging into the run's shared ``maps/scores.csv``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _keep_category(scratch: Path, out: Path, category: str) -> Path:
    """Move one category's run and maps from ``scratch`` into ``out/runs`` and ``out/maps``.

    ``runner.train``/``predict`` each own a whole output folder (they refuse or replace it), while a
    standardized run fills ``out`` one category at a time: the category is produced in its own scratch
    folder and moved in, so ``out/maps`` ends as one submission covering every category run (also when
    several categories of the run are computed at once, each in its own scratch folder).
    """
    for kind in ("runs", "maps"):
        target = out / kind / category
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)  # this run's own earlier output for the category
        os.replace(scratch / kind / category, target)
    with _locked(out / LOCK_FILE):
        write_scores(out / "maps" / SCORES_FILE, read_scores(scratch / "maps" / SCORES_FILE), merge=True)
    shutil.rmtree(scratch)
    return out / "runs" / category


def compute_category(plan: RunPlan, category: str) -> CategoryResult:
    """Fit, predict, evaluate (both protocols) and time one category of ``plan``; touches no store.

    Writes only below ``plan.out`` (the category's run folder and maps). The hardware this process
    runs on must give the plan's identity (same device type and GPU model), else the numbers would
    be filed under settings they were not measured with: an error, before any work.
    """
    from threecad.dataset.loaders import AnomalyDataset
    from threecad.methods import get_method, load_method, runner

    start = time.perf_counter()
    torch_device = resolve_device(plan.device)
    hardware = hardware_info(torch_device)
    if (hardware["device"], hardware.get("gpu")) != (plan.settings["device"], plan.settings["gpu"]):
        raise ThreecadError(f"{plan.method}/{category}: this worker has {hardware['device']} "
                            f"{hardware.get('gpu') or ''} but run {plan.sha256[:12]} was planned for "
                            f"{plan.settings['device']} {plan.settings['gpu'] or ''}; give every job the same kind of "
                            "hardware (one GPU model per benchmark)")
    out = plan.out
    scratch = out / f".category-{category}"  # this category's run and maps, then kept beside the others
    runner.train(plan.method, plan.dataset, [category], out=scratch / "runs", device=str(torch_device),
                 size=plan.size, resize=plan.resize, seed=plan.seed, config=plan.config, exposure=plan.exposure,
                 overwrite=True)
    runner.predict(scratch / "runs" / category, plan.dataset, scratch / "maps", dtype=plan.dtype,
                   device=str(torch_device), overwrite=True)
    run_dir = _keep_category(scratch, out, category)
    results = {p: evaluate_tree(out / "maps", plan.dataset, p, [category], device=plan.eval_device)
               for p in PROTOCOLS}
    model = load_method(run_dir, **({"device": str(torch_device)}
                                    if "device" in get_method(plan.method).config_keys() else {}))
    test_set = AnomalyDataset(plan.dataset, category, "test", size=plan.size, resize=plan.resize,
                              exposure=plan.exposure)
    images = [test_set[i]["image"] for i in range(min(len(test_set), plan.warmup + plan.timed))]
    timing = time_inference(model, images, torch_device, plan.warmup, plan.timed)
    fit_s = runner.read_run(run_dir).get("timings", {}).get("fit_s")
    rows = [row for r in results.values() for row in result_rows(r) if row["category"] != "mean"]
    rows += [{**row, "category": category} for row in timing.rows()]
    rows.append({"category": category, "protocol": RUNTIME, "metric": "fit_s", "value": fit_s})
    curves = [row for r in results.values() for row in curve_rows(r)]
    summary = {
        **{f"{p}:{m}": v for p, r in results.items() for m, v in r["categories"][category].items()},
        "latency_ms": timing.mean_ms, "peak_memory_mb": timing.peak_memory_mb,
    }
    log.info("%s: computed (latency %.1f ms/image, peak memory %s MB)", category, timing.mean_ms,
             None if timing.peak_memory_mb is None else round(timing.peak_memory_mb))
    return CategoryResult(plan.sha256, plan.method, category, rows, curves, timing.memory_kind, summary,
                          hardware, time.perf_counter() - start)


def store_category(db: Store, plan: RunPlan, result: CategoryResult) -> None:
    """Write one computed category and the run's updated ``mean`` rows (the driver's side of a job)."""
    if result.sha256 != plan.sha256:
        raise ThreecadError(f"result of run {result.sha256[:12]} offered to run {plan.sha256[:12]}")
    record = {**plan.record, "meta": {**plan.record["meta"], "memory_kind": result.memory_kind}}
    db.add_submission(record, result.rows, result.curves, replace_results=True)
    db.add_submission(plan.record, _mean_rows(db, plan.sha256), replace_results=True)


def done_categories(db: Store, sha256: str) -> set[str]:
    """Categories of a run already stored under every protocol and the runtime (finished jobs)."""
    return db.categories_done(sha256, [*PROTOCOLS, RUNTIME])


def standardized_run(
    method: str,
    dataset: str | Path,
    categories: list[str] | None = None,
    store: Store | str | Path | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    size: int = 256,
    resize: str = "squash",
    seed: int = 0,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    exposure: str = "raw",
    warmup: int = 3,
    timed: int = 20,
    eval_device: str = "cpu",
) -> RunSummary:
    """Fit, predict, evaluate (both protocols) and time ``method`` per category; results go to the store.

    ``out`` holds run folders and maps (default ``~/.threecad/runs/<run id>``). Categories whose
    results are already stored for this exact run are skipped. Each category is one
    :func:`compute_category` then :func:`store_category`, the same two steps a benchmark job takes
    (:mod:`leaderboard.benchmark`).
    """
    plan = plan_run(method, dataset, categories, out, device, size, resize, seed, config, dtype, exposure, warmup,
                    timed, eval_device)
    summary = RunSummary(plan.sha256, method)
    with opened_store(store) as db:
        finished = done_categories(db, plan.sha256)
        for category in plan.categories:
            if category in finished:
                log.info("%s: already stored for run %s; skipped", category, plan.sha256[:12])
                summary.skipped.append(category)
                continue
            result = compute_category(plan, category)
            store_category(db, plan, result)
            summary.done.append(category)
            summary.results[category] = result.summary
    return summary
