"""``3cad leaderboard benchmark``: Ray and local executors store the same rows; resume after the driver is
killed; a failing job is recorded while the others finish. One local Ray instance for the module."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from click.testing import CliRunner
from killing import kill_when_paused, subprocess_env
from sklearn.metrics import roc_auc_score

from leaderboard import benchmark as bench
from leaderboard.standardized import standardized_run
from leaderboard.store import Store
from leaderboard.validate import validate_submission
from threecad.dataset.layout import list_categories, list_samples
from threecad.dataset.masks import read_mask
from threecad.errors import ThreecadError
from threecad.maps.files import find_map, read_map

#: Two cheap methods x two categories = 4 jobs of about a second each.
SETTINGS = {"batch_size": 8, "patchcore.coreset_ratio": 0.5}
KW = dict(methods="patchcore,padim", size=32, warmup=1, timed=2, settings=SETTINGS)
RUNTIME_METRICS = {"latency_ms", "throughput_ips", "peak_memory_mb", "fit_s"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance on 2 CPUs, started once (Ray takes 10-20 s to start)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from threecad.synth.dataset import SynthDatasetConfig, make_synthetic_dataset

    config = SynthDatasetConfig(categories=2, train=6, test_good=3, test_defect=3, size=(48, 48))
    return make_synthetic_dataset(tmp_path_factory.mktemp("bench") / "dataset", seed=3, config=config)


def _rows(store: Path) -> dict[tuple, float | None]:
    with Store(store) as db:
        return {(r["method"], r["category"], r["protocol"], r["metric"]): r["value"]
                for r in db.results(source="evaluated")}


def test_ray_and_local_executors_store_the_same_rows(ray_cluster, tiny, tmp_path):
    categories = list_categories(tiny)
    local = bench.benchmark(tiny, store=tmp_path / "local.sqlite", out=tmp_path / "local", **KW)
    lines = []
    distributed = bench.benchmark(tiny, store=tmp_path / "ray.sqlite", out=tmp_path / "ray", executor="ray",
                                  on_outcome=lambda o, n, total: lines.append((o.method, o.category, n, total)),
                                  **KW)
    for summary in (local, distributed):
        assert summary.ok and summary.jobs == 4 and len(summary.done) == 4 and not summary.skipped
    assert distributed.runs == local.runs  # the run identity does not depend on the executor
    assert sorted((m, c) for m, c, _, _ in lines) == sorted((m, c) for m in ("padim", "patchcore") for c in categories)
    assert [n for *_, n, _ in lines] == [1, 2, 3, 4] and {t for *_, t in lines} == {4}

    a, b = _rows(tmp_path / "local.sqlite"), _rows(tmp_path / "ray.sqlite")
    assert a.keys() == b.keys()
    assert {k[3] for k in a if k[2] == "runtime"} == RUNTIME_METRICS
    for key, value in a.items():
        if key[2] == "runtime":
            assert value is not None and value > 0 and b[key] > 0, key  # measured, so not equal
        else:
            assert b[key] == value, key  # metrics: identical for a seed
    # the stored means are the means of the two categories
    for (method, category, protocol, metric), value in a.items():
        if category == "mean" and value is not None:
            cells = [a[(method, c, protocol, metric)] for c in categories]
            assert value == pytest.approx(np.mean(cells), abs=1e-12)

    # The stored pixel AUROC is that of the maps a Ray worker wrote (scikit-learn on the files).
    run = tmp_path / "ray" / local.runs["padim"][:12]
    labels, scores = [], []
    for sample in list_samples(tiny, categories[1], "test"):
        amap = read_map(find_map(run / "maps", categories[1], sample.defect, sample.stem))
        labels.append((read_mask(sample.mask_path) if sample.label else np.zeros(amap.shape, bool)).ravel())
        scores.append(amap.ravel().astype(np.float64))
    expected = roc_auc_score(np.concatenate(labels), np.concatenate(scores))
    assert b[("padim", categories[1], "mvtec", "p_auroc")] == pytest.approx(expected, abs=1e-9)
    # two jobs of one run merged their scores into one submission folder
    (run / "maps" / "meta.json").write_text('{"method": "padim"}')
    report = validate_submission(run / "maps", tiny, categories=categories)
    assert report.ok and report.has_scores, report.text()

    # Idempotent: a rerun (either executor) and `leaderboard run` with the same settings compute nothing.
    with Store(tmp_path / "ray.sqlite") as db:
        counts = db.counts()
    again = bench.benchmark(tiny, store=tmp_path / "ray.sqlite", out=tmp_path / "ray", executor="ray", **KW)
    assert again.done == [] and sorted(again.skipped) == sorted((m, c) for m in ("padim", "patchcore")
                                                                  for c in categories)
    single = standardized_run("patchcore", tiny, store=tmp_path / "ray.sqlite", out=run.parent / "x", device="cpu",
                              size=32, config={"batch_size": 8, "coreset_ratio": 0.5}, warmup=1, timed=2)
    assert single.sha256 == local.runs["patchcore"] and single.done == [] and single.skipped == categories
    with Store(tmp_path / "ray.sqlite") as db:
        assert db.counts() == counts


def _broken_copy(tiny: Path, tmp_path: Path) -> tuple[Path, str]:
    """The dataset with one undecodable training image in its second category."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    category = list_categories(broken)[1]
    list_samples(broken, category, "train")[0].image_path.write_bytes(b"not an image")
    return broken, category


def test_a_failing_job_is_recorded_while_the_others_finish(ray_cluster, tiny, tmp_path):
    broken, bad = _broken_copy(tiny, tmp_path)
    good = list_categories(broken)[0]
    store, out = tmp_path / "lb.sqlite", tmp_path / "work"
    summary = bench.benchmark(broken, store=store, out=out, executor="ray", **KW)
    assert not summary.ok
    assert sorted((o.method, o.category) for o in summary.done) == [("padim", good), ("patchcore", good)]
    assert sorted((o.method, o.category) for o in summary.failed) == [("padim", bad), ("patchcore", bad)]
    assert all("unreadable image" in o.error and bad in o.error for o in summary.failed), summary.text()
    entries = [json.loads(line) for line in (out / bench.FAILURES_FILE).read_text().splitlines()]
    assert sorted((e["method"], e["category"]) for e in entries) == [("padim", bad), ("patchcore", bad)]
    assert all(e["traceback"] and e["sha256"] == summary.runs[e["method"]] for e in entries)
    rows = _rows(store)
    assert {k[1] for k in rows} == {good, "mean"}  # nothing stored for the failed category
    assert "FAILED padim/" + bad in summary.text()

    # The CLI (local executor): the stored jobs are skipped, the failed ones retried, exit status 1,
    # and the failure list is replaced, not appended to.
    from cli import cli

    args = ["leaderboard", "benchmark", "--dataset", str(broken), "--methods", "patchcore,padim", "--size", "32",
            "--warmup", "1", "--timed", "2", "--store", str(store), "--out", str(out)]
    for pair in ("batch_size=8", "patchcore.coreset_ratio=0.5"):
        args += ["--set", pair]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "4 job(s): 0 done, 2 already stored, 2 failed" in result.output
    assert f"[3/4] patchcore/{bad}: FAILED" in result.output and f"[4/4] padim/{bad}: FAILED" in result.output
    assert len((out / bench.FAILURES_FILE).read_text().splitlines()) == 2
    assert _rows(store) == rows


def test_ctrl_c_cancels_the_running_jobs_and_a_rerun_continues(ray_cluster, tiny, tmp_path):
    def interrupt(outcome, n, total):  # Ctrl-C arrives while the driver waits for the other jobs
        raise KeyboardInterrupt

    with pytest.raises(bench.BenchmarkInterrupted) as caught:
        bench.benchmark(tiny, store=tmp_path / "lb.sqlite", out=tmp_path / "out", executor="ray",
                        on_outcome=interrupt, **KW)
    stopped = caught.value.summary
    assert stopped.interrupted and len(stopped.done) == 1 and not stopped.failed
    assert "3 not run (interrupted; rerun to continue)" in stopped.text()
    _wait_until_idle()  # the cancelled jobs' workers are gone (the rerun shares their output folder)
    first = (stopped.done[0].method, stopped.done[0].category)
    resumed = bench.benchmark(tiny, store=tmp_path / "lb.sqlite", out=tmp_path / "out", **KW)  # local: no worker start
    assert resumed.ok and resumed.skipped == [first] and len(resumed.done) == 3


def _wait_until_idle(timeout: float = 60.0) -> None:
    """Until every CPU of the test's Ray instance is free again (no job of a stopped driver still runs)."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"Ray still busy: {ray.available_resources()}"
        time.sleep(0.2)


def _driver(work: Path, dataset: Path, address: str) -> None:
    """Subprocess: a benchmark driver joining the test's Ray instance; it pauses (marker file) after the
    first job is stored and is killed there."""
    def pause(outcome, n, total):
        (work / "paused").write_text(f"{outcome.method}/{outcome.category}")
        time.sleep(600)

    bench.benchmark(dataset, store=work / "lb.sqlite", out=work / "out", executor="ray", address=address,
                    on_outcome=pause, **KW)


def test_resume_after_the_driver_is_killed(ray_cluster, tiny, tmp_path):
    kill_when_paused([sys.executable, __file__, "driver", str(tmp_path), str(tiny), ray_cluster],
                     tmp_path / "paused", subprocess_env(), timeout=90)
    first = tuple((tmp_path / "paused").read_text().split("/"))
    with Store(tmp_path / "lb.sqlite") as db:
        stored = {(r["method"], r["category"]) for r in db.results(source="evaluated") if r["category"] != "mean"}
    assert first in stored
    _wait_until_idle()  # Ray has killed the dead driver's workers (the rerun shares their output folder)
    resumed = bench.benchmark(tiny, store=tmp_path / "lb.sqlite", out=tmp_path / "out", **KW)  # any executor resumes
    assert resumed.ok and set(resumed.skipped) == stored
    everything = {(m, c) for m in ("padim", "patchcore") for c in list_categories(tiny)}
    assert set(resumed.skipped) | {(o.method, o.category) for o in resumed.done} == everything
    assert len(resumed.done) == 4 - len(stored)
    with Store(tmp_path / "lb.sqlite") as db:
        stored_now = {(r["method"], r["category"]) for r in db.results(source="evaluated") if r["category"] != "mean"}
        assert len(db.submissions("evaluated")) == 2  # one entry per run, not one per driver
    assert stored_now == everything


def test_ray_missing_is_one_line_naming_the_extra(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ThreecadError, match=r"pip install 'threecad\[ray\]'"):
        bench.benchmark(tiny, store=tmp_path / "lb.sqlite", out=tmp_path / "w", executor="ray", **KW)
    assert not (tmp_path / "w").exists() and not (tmp_path / "lb.sqlite").exists()


def test_methods_all_and_per_method_settings(monkeypatch):
    from threecad.methods import Method, available, registry

    class Fixture(Method):
        name = "fixture-only"

        def fit(self, train_set, val_set=None):
            return self

        def predict_batch(self, images):
            raise AssertionError

    registry.load_builtins()
    monkeypatch.setitem(registry._REGISTRY, "fixture-only", Fixture)
    assert "fixture-only" in available()
    assert bench.resolve_methods("all") == [m for m in available() if m != "fixture-only"]
    assert {"patchcore", "padim", "cfrg"} <= set(bench.resolve_methods("all"))
    assert bench.resolve_methods("padim, patchcore,padim") == ["padim", "patchcore"]
    with pytest.raises(ThreecadError, match="unknown method 'nope'"):
        bench.resolve_methods("padim,nope")

    configs = bench.method_configs(["patchcore", "padim"], {"batch_size": 4, "coreset_ratio": 0.2,
                                                            "padim.batch_size": 2})
    assert configs == {"patchcore": {"batch_size": 4, "coreset_ratio": 0.2}, "padim": {"batch_size": 2}}
    with pytest.raises(ThreecadError, match="no benchmarked method"):
        bench.method_configs(["padim"], {"coreset_ratio": 0.2})
    with pytest.raises(ThreecadError, match="'rd' is not benchmarked"):
        bench.method_configs(["padim"], {"rd.epochs": 1})


if __name__ == "__main__":
    role, work, dataset, address = sys.argv[1:5]
    {"driver": _driver}[role](Path(work), Path(dataset), address)


def test_an_unreachable_head_address_is_one_line_at_once(tmp_path):
    """Ray would retry for minutes; a HOST:PORT that refuses connections fails before Ray is asked."""
    import socket

    with socket.socket() as free:  # a port nobody listens on once closed
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(ThreecadError, match=f"cannot reach the Ray head at 127.0.0.1:{port}"):
        bench._check_reachable(f"127.0.0.1:{port}")
    assert time.perf_counter() - started < 5
    bench._check_reachable("auto")  # resolved by Ray itself: not probed
