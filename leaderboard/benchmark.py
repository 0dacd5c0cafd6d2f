"""``3cad leaderboard benchmark``: every method x every category as one job each, here or on a Ray cluster.

A job is one category of one standardized run (:mod:`leaderboard.standardized`): fit, predict,
evaluate under both protocols and time it, exactly as ``3cad leaderboard run`` does, through the
same :func:`~leaderboard.standardized.compute_category`. Jobs return their store rows as plain data
and the driver (this process) writes the store as each job ends: the SQLite file stays on the
driver, and a worker on another node never writes SQLite over a network.

Executors: ``local`` runs the jobs one after another in this process; ``ray`` submits them all at
once to a Ray instance (a local one started here, or an existing cluster with ``address``), each
job declaring its CPUs, GPUs and memory so that Ray places them (one per GPU on a multi-GPU node,
or across nodes). Both give the same stored numbers for a seed (timings aside: they are measured).

Resumable and idempotent: a job is identified by its run's identity (the sha256 of the settings,
the dataset fingerprint included) and its category, and a job already in the store is skipped. A
failing job is recorded (``benchmark-failures.jsonl`` in the output folder, and the summary) and
the others go on; a rerun tries it again. Ctrl-C cancels the jobs still running: finished ones are
stored, and a rerun continues with the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leaderboard.standardized import (
    DEFAULT_RUNS_DIR,
    CategoryResult,
    RunPlan,
    compute_category,
    done_categories,
    hardware_info,
    plan_run,
    store_category,
)
from leaderboard.store import Store, opened_store
from threecad.device import resolve_device
from threecad.errors import ThreecadError
from threecad.io import write_text

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
FAILURES_FILE = "benchmark-failures.jsonl"
#: Modules whose registered methods are test or demo fixtures, never benchmarked by ``methods="all"``.
_FIXTURE_MODULES = ("tests", "test_", "conftest", "__main__")


# ---------------------------------------------------------------------------------------------- methods
def benchmark_methods() -> list[str]:
    """Every registered method except those registered by tests or scripts (``--methods all``)."""
    from threecad.methods import available, get_method

    names = []
    for name in available():
        module = get_method(name).__module__
        if not module.split(".")[0].startswith(_FIXTURE_MODULES):
            names.append(name)
    return names


def resolve_methods(methods: str | Iterable[str] = "all") -> list[str]:
    """``"all"``, ``"a,b"`` or a list of names to checked method names (unknown name: an error)."""
    from threecad.methods import get_method

    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(methods)
    if not methods or methods == ["all"]:
        return benchmark_methods()
    for name in methods:
        get_method(name)  # unknown method: one line naming the available ones
    return list(dict.fromkeys(methods))


def method_configs(methods: list[str], settings: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Each method's options from ``--set`` pairs: ``method.KEY`` for one method, ``KEY`` for every method
    that has the option (a plain ``KEY`` that no benchmarked method has is an error, as is ``method.KEY``
    for a method not benchmarked; ``method.KEY`` wins over ``KEY``)."""
    from threecad.methods import get_method

    configs: dict[str, dict[str, Any]] = {m: {} for m in methods}
    shared = {k: v for k, v in (settings or {}).items() if "." not in k}
    scoped = {k: v for k, v in (settings or {}).items() if "." in k}
    for key, value in shared.items():
        takers = [m for m in methods if key in get_method(m).config_keys()]
        if not takers:
            raise ThreecadError(f"--set {key}: no benchmarked method ({', '.join(methods)}) has option {key!r}")
        for m in takers:
            configs[m][key] = value
    for key, value in scoped.items():
        method, _, option = key.partition(".")
        if method not in configs:
            raise ThreecadError(f"--set {key}: method {method!r} is not benchmarked ({', '.join(methods)})")
        configs[method][option] = value  # an unknown option is build()'s error, before any work
    return configs


# ---------------------------------------------------------------------------------------------- jobs
@dataclass
class JobOutcome:
    """What a job sends back to the driver: its rows, or the error that stopped it."""

    method: str
    category: str
    sha256: str
    result: CategoryResult | None = None
    error: str | None = None
    traceback: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.result is not None


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with ``threads`` torch CPU threads (``None``: as they are), restored after.

    Floating-point sums split across threads add in another order, so two executors give the same
    numbers for a seed only at the same thread count: every job and the hardware probe run with the
    benchmark's ``threads`` (the recorded ``torch_threads``), whichever process they run in."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_job(plan: RunPlan, category: str, threads: int | None = None) -> JobOutcome:
    """One job (any executor): :func:`compute_category` with its error caught, so one failing job is
    recorded and never stops the others. Interrupts (Ctrl-C) are not caught."""
    start = time.perf_counter()
    try:
        with torch_threads(threads):
            result = compute_category(plan, category)
    except Exception as exc:  # noqa: BLE001 - a job's failure is data for the driver, not the end of the benchmark
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return JobOutcome(plan.method, category, plan.sha256, error=f"{exc.__class__.__name__}: {message}",
                          traceback=traceback.format_exc(limit=-8), seconds=time.perf_counter() - start)
    return JobOutcome(plan.method, category, plan.sha256, result=result, seconds=time.perf_counter() - start)


def probe_hardware(device: str, threads: int | None = None) -> dict[str, Any]:
    """The hardware record of the process this runs in (a Ray worker with a job's resources), at the
    jobs' thread count."""
    with torch_threads(threads):
        return hardware_info(resolve_device(device))


@dataclass
class BenchmarkSummary:
    jobs: int = 0  # (method, category) pairs asked for
    done: list[JobOutcome] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # already stored
    failed: list[JobOutcome] = field(default_factory=list)
    interrupted: bool = False
    executor: str = "local"
    wall_s: float = 0.0
    runs: dict[str, str] = field(default_factory=dict)  # method -> run sha256
    failures_file: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def text(self) -> str:
        pending = self.jobs - len(self.done) - len(self.skipped) - len(self.failed)
        head = (f"benchmark ({self.executor}): {self.jobs} job(s): {len(self.done)} done, "
                f"{len(self.skipped)} already stored, {len(self.failed)} failed"
                + (f", {pending} not run (interrupted; rerun to continue)" if self.interrupted else "")
                + f"; {self.wall_s:.1f} s")
        lines = [head]
        lines += [f"  run {sha[:12]}: {method}" for method, sha in self.runs.items()]
        for outcome in self.failed:
            lines.append(f"  FAILED {outcome.method}/{outcome.category}: {outcome.error}")
        if self.failed and self.failures_file is not None:
            lines.append(f"  failures (with tracebacks): {self.failures_file}")
        return "\n".join(lines)


class BenchmarkInterrupted(KeyboardInterrupt):
    """Ctrl-C during a benchmark; ``summary`` says what was stored before it."""

    def __init__(self, summary: BenchmarkSummary):
        super().__init__("benchmark interrupted")
        self.summary = summary


def _failure_line(outcome: JobOutcome) -> dict[str, Any]:
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "method": outcome.method,
            "category": outcome.category, "sha256": outcome.sha256, "error": outcome.error,
            "traceback": outcome.traceback}


def _read_failures(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not {"sha256", "category"} <= set(entry):
                raise ValueError("not a failure record")
        except ValueError as exc:
            raise ThreecadError(f"line {number} is not a failure record this benchmark writes ({exc}); "
                                "move the file away to start a new list", path) from None
        entries.append(entry)
    return entries


class _FailureLog:
    """``benchmark-failures.jsonl``: the jobs whose latest attempt failed (a rerun that completes or
    retries a job replaces its line). Rewritten atomically; created only when a job has failed."""

    def __init__(self, path: Path, attempted: set[tuple[str, str]]):
        self.path = path
        before = _read_failures(path)
        self.entries = [e for e in before if (e["sha256"], e["category"]) not in attempted]
        self._dirty = len(self.entries) != len(before)

    def add(self, outcome: JobOutcome) -> None:
        self.entries.append(_failure_line(outcome))
        self._dirty = True
        self.flush()

    def flush(self) -> None:
        if self._dirty:
            write_text(self.path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.entries))
            self._dirty = False


# ---------------------------------------------------------------------------------------------- executors
def _import_ray():
    try:
        import ray
    except ImportError:
        raise ThreecadError("--executor ray needs Ray: pip install 'threecad[ray]'") from None
    return ray


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A one-line error when a ``HOST:PORT`` head address does not answer, instead of Ray's minutes
    of retries. ``auto`` and ``ray://`` addresses are left to Ray (they are resolved differently)."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ThreecadError(f"cannot reach the Ray head at {address} ({exc}): start it with `ray start --head` "
                            "there, or check --address") from None


def _installed() -> bool:
    """Whether threecad is installed (``pip install``, also ``-e``): then a worker of the same Python
    imports it without help, and the jobs can use Ray's already started default workers."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("threecad")
    except PackageNotFoundError:
        return False
    return True


class _RayExecutor:
    """Jobs as Ray tasks; the driver collects each as it finishes (``ray.wait``)."""

    def __init__(self, address: str | None, cpus: float, gpus: float, memory_gb: float | None,
                 threads: int | None = None):
        self.ray = _import_ray()
        self.threads = threads
        self.started = False
        self.local = address is None
        if not self.ray.is_initialized():
            if address is None:
                log.info("starting a local Ray instance")
                self.ray.init(include_dashboard=None, logging_level=logging.WARNING)
            else:
                _check_reachable(address)
                log.info("joining the Ray cluster at %s", address)
                try:
                    self.ray.init(address=address, logging_level=logging.WARNING)
                except (ConnectionError, RuntimeError, TimeoutError) as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
                    raise ThreecadError(f"cannot join the Ray cluster at {address}: {first}") from None
            self.started = True
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": 0}
        if memory_gb:
            options["memory"] = int(memory_gb * 2**30)
        if self.local and not _installed():  # a source checkout: workers import it as the driver does
            import leaderboard

            root = str(Path(leaderboard.__file__).resolve().parents[1])
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": root}}
        self.options = options
        self.job = self.ray.remote(run_job).options(**options)
        self.pending: dict[Any, tuple[RunPlan, str]] = {}

    def hardware(self, device: str) -> dict[str, Any]:
        return self.ray.get(self.ray.remote(probe_hardware).options(**self.options).remote(device, self.threads))

    def run(self, jobs: list[tuple[RunPlan, str]]) -> Iterable[JobOutcome]:
        plans = {plan.sha256: self.ray.put(plan) for plan, _ in jobs}  # each plan shipped once
        self.pending = {self.job.remote(plans[plan.sha256], category, self.threads): (plan, category)
                        for plan, category in jobs}
        while self.pending:
            ready, _ = self.ray.wait(list(self.pending), num_returns=1)
            plan, category = self.pending.pop(ready[0])
            try:
                yield self.ray.get(ready[0])
            except self.ray.exceptions.RayError as exc:  # the worker died (killed, out of memory, node lost)
                text = str(exc).strip().splitlines()
                yield JobOutcome(plan.method, category, plan.sha256,
                                 error=f"{exc.__class__.__name__}: {text[0] if text else ''}",
                                 traceback=str(exc)[-4000:])

    def cancel(self) -> None:
        for ref in self.pending:
            try:
                self.ray.cancel(ref, force=True)
            except Exception as exc:  # noqa: BLE001 - best effort while stopping
                log.debug("cancel failed: %s", exc)
        self.pending = {}

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


class _LocalExecutor:
    def __init__(self, threads: int | None = None):
        self.threads = threads

    def hardware(self, device: str) -> dict[str, Any]:
        return probe_hardware(device, self.threads)

    def run(self, jobs: list[tuple[RunPlan, str]]) -> Iterable[JobOutcome]:
        for plan, category in jobs:
            yield run_job(plan, category, self.threads)

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- driver
def benchmark(
    dataset: str | Path,
    methods: str | Iterable[str] = "all",
    categories: list[str] | None = None,
    store: Store | str | Path | None = None,
    out: str | Path | None = None,
    executor: str = "local",
    address: str | None = None,
    gpus_per_job: float = 0,
    cpus_per_job: float = 1,
    memory_per_job_gb: float | None = None,
    threads: int | None = None,
    device: str = "auto",
    size: int = 256,
    resize: str = "squash",
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    dtype: str = "float32",
    exposure: str = "raw",
    warmup: int = 3,
    timed: int = 20,
    eval_device: str = "cpu",
    on_outcome: Callable[[JobOutcome, int, int], None] | None = None,
) -> BenchmarkSummary:
    """Run every (method, category) job not yet stored; store each as it ends; return the summary.

    ``out`` (default ``~/.threecad/runs``) holds one folder per run, ``<run id[:12]>`` (the folder
    ``3cad leaderboard run`` uses for the same settings), and ``benchmark-failures.jsonl``. With
    ``executor="ray"`` the device is CUDA when ``gpus_per_job > 0``, else the CPU; the run identity
    records the hardware a worker with the job's resources reports. ``on_outcome(outcome, n, total)``
    is called after each finished job (the CLI prints its progress line there). Ctrl-C raises
    :class:`BenchmarkInterrupted` once running jobs are cancelled; what finished is stored.
    ``threads``: torch CPU threads of every job (default ``cpus_per_job``, rounded, at least 1), for
    both executors, so that local and Ray runs store the same numbers for a seed.
    """
    start = time.perf_counter()
    if executor not in EXECUTORS:
        raise ThreecadError(f"unknown executor {executor!r}; expected {' or '.join(EXECUTORS)}")
    if address is not None and executor != "ray":
        raise ThreecadError("--address joins a Ray cluster; it needs --executor ray")
    dataset = Path(dataset).expanduser().resolve()  # workers may not share the driver's working directory
    root = (Path(out) if out is not None else DEFAULT_RUNS_DIR).expanduser().resolve()
    names = resolve_methods(methods)
    if not names:
        raise ThreecadError("no methods to benchmark")
    configs = method_configs(names, settings)
    from threecad.methods import build

    for name in names:  # options checked on the driver: a typo fails before Ray starts or any job runs
        build(name, **configs[name])
    if executor == "ray":
        if device not in ("auto", "cpu", "cuda"):
            raise ThreecadError(f"--device {device}: with --executor ray use auto, cpu or cuda (Ray assigns the GPU)")
        want = "cuda" if gpus_per_job > 0 else "cpu"
        if device != "auto" and device != want:
            raise ThreecadError(f"--device {device} with --gpus-per-job {gpus_per_job}: jobs would run on {want}")
        device = want
    threads = max(1, round(cpus_per_job)) if threads is None else int(threads)
    runner = _RayExecutor(address, cpus_per_job, gpus_per_job, memory_per_job_gb, threads) if executor == "ray" \
        else _LocalExecutor(threads)
    summary = BenchmarkSummary(executor=executor)
    stores = contextlib.ExitStack()
    try:
        hardware = runner.hardware(device)
        plans = []
        for name in names:
            plan = plan_run(name, dataset, categories, None, device, size, resize, seed, configs[name], dtype,
                            exposure, warmup, timed, eval_device, hardware=hardware)
            plans.append(dataclasses.replace(plan, out=root / plan.sha256[:12]))
        db = stores.enter_context(opened_store(store))
        jobs = []
        for plan in plans:
            summary.runs[plan.method] = plan.sha256
            finished = done_categories(db, plan.sha256)
            for category in plan.categories:
                summary.jobs += 1
                if category in finished:
                    summary.skipped.append((plan.method, category))
                else:
                    jobs.append((plan, category))
        by_sha = {plan.sha256: plan for plan in plans}
        summary.failures_file = root / FAILURES_FILE
        attempted = {(p.sha256, c) for p, c in jobs} | {(summary.runs[m], c) for m, c in summary.skipped}
        failures = _FailureLog(summary.failures_file, attempted)  # drops lines of jobs retried or stored since
        failures.flush()
        log.info("benchmark: %d job(s), %d already stored, %d to run (%s)", summary.jobs, len(summary.skipped),
                 len(jobs), executor)
        finished_count = len(summary.skipped)
        for outcome in runner.run(jobs):
            finished_count += 1
            if outcome.ok:
                store_category(db, by_sha[outcome.sha256], outcome.result)
                summary.done.append(outcome)
                log.info("%s/%s: stored (%.1f s)", outcome.method, outcome.category, outcome.seconds)
            else:
                summary.failed.append(outcome)
                failures.add(outcome)
                log.warning("%s/%s failed: %s", outcome.method, outcome.category, outcome.error)
            if on_outcome is not None:
                on_outcome(outcome, finished_count, summary.jobs)
    except KeyboardInterrupt:
        runner.cancel()
        summary.interrupted = True
        summary.wall_s = time.perf_counter() - start
        raise BenchmarkInterrupted(summary) from None
    finally:
        runner.close()
        stores.close()
    summary.wall_s = time.perf_counter() - start
    return summary
