"""Standardized runs: timing protocol, a small PatchCore run landing in the store and table, resume."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from leaderboard import standardized as runs
from leaderboard.store import Store
from leaderboard.tables import render_table
from leaderboard.validate import validate_submission
from threecad.dataset.layout import list_categories, list_samples
from threecad.dataset.masks import read_mask
from threecad.io import image_size
from threecad.maps.files import find_map, read_map


class _Fake:
    """Records what predict_batch receives; returns a torch map to check it is brought back to the host."""

    def __init__(self):
        self.shapes = []

    def predict_batch(self, images):
        self.shapes.append(tuple(images.shape))
        return np.zeros(len(images), np.float32), torch.zeros(len(images), *images.shape[-2:])


def test_time_inference_is_batch_one_with_warmup():
    fake = _Fake()
    images = [torch.rand(3, 16, 16) for _ in range(3)]
    timing = runs.time_inference(fake, images, "cpu", warmup=2, timed=5)
    assert len(fake.shapes) == 7 and set(fake.shapes) == {(1, 3, 16, 16)}
    assert len(timing.latencies_ms) == 5 and all(t > 0 for t in timing.latencies_ms)
    assert timing.memory_kind in ("cpu_peak_rss", "cpu_lifetime_peak_rss")
    assert timing.peak_memory_mb is not None and timing.peak_memory_mb > 10  # a Python process with torch
    rows = {r["metric"]: r["value"] for r in timing.rows()}
    assert rows["throughput_ips"] == pytest.approx(1000 / rows["latency_ms"])
    assert rows["latency_ms"] == pytest.approx(np.mean(timing.latencies_ms))


def test_hardware_record():
    info = runs.hardware_info("cpu")
    assert info["device"] == "cpu" and info["cpu_count"] >= 1 and info["torch"] == torch.__version__


@pytest.mark.slow
def test_standardized_patchcore_run_lands_in_store_and_table(synth_root, tmp_path, monkeypatch):
    category = list_categories(synth_root)[0]
    store = tmp_path / "lb.sqlite"
    monkeypatch.setattr(runs, "dataset_fingerprint", lambda dataset: "sha256:synthetic")
    settings = dict(categories=[category], store=store, out=tmp_path / "work", device="cpu", size=64, seed=0,
                    config={"coreset_ratio": 0.25, "batch_size": 8}, warmup=1, timed=2)
    summary = runs.standardized_run("patchcore", synth_root, **settings)
    assert summary.done == [category] and summary.skipped == []
    with Store(store) as db:
        rows = db.results(submission=summary.sha256)
        sub = db.submissions("evaluated")[0]
        counts = db.counts()
    values = {(r["category"], r["protocol"], r["metric"]): r["value"] for r in rows}
    assert sub["method"] == "patchcore" and sub["family"] == "embedding-based" and '"device": "cpu"' in sub["hardware"]
    for protocol in ("mvtec", "3cad-paper"):
        for metric in ("i_auroc", "p_auroc", "aupro", "p_ap"):
            assert values[(category, protocol, metric)] is not None
            assert values[("mean", protocol, metric)] == values[(category, protocol, metric)]
    assert values[(category, "runtime", "latency_ms")] > 0 and values[(category, "runtime", "peak_memory_mb")] > 0
    assert values[(category, "runtime", "fit_s")] > 0
    # The stored pixel AUROC is that of the maps the run wrote (checked with scikit-learn).
    labels, scores = [], []
    for sample in list_samples(synth_root, category, "test"):
        amap = read_map(find_map(tmp_path / "work" / "maps", category, sample.defect, sample.stem))
        w, h = image_size(sample.image_path)
        assert amap.shape == (h, w)  # native size
        labels.append((read_mask(sample.mask_path) if sample.label else np.zeros((h, w), bool)).ravel())
        scores.append(amap.ravel().astype(np.float64))
    expected = roc_auc_score(np.concatenate(labels), np.concatenate(scores))
    assert values[(category, "mvtec", "p_auroc")] == pytest.approx(expected, abs=1e-9)
    assert expected > 0.6  # PatchCore finds the synthetic defects better than chance
    # I-AUROC under mvtec uses the method's own image scores (the runner's scores.csv), not the map max.
    with open(tmp_path / "work" / "maps" / "scores.csv") as handle:
        own = {r["path"]: float(r["score"]) for r in csv.DictReader(handle) if r["category"] == category}
    samples = list_samples(synth_root, category, "test")
    image_auroc = roc_auc_score([s.label for s in samples], [own[s.relpath] for s in samples])
    assert values[(category, "mvtec", "i_auroc")] == pytest.approx(image_auroc, abs=1e-12)
    # The runner's output plus a meta.json is a valid submission.
    (tmp_path / "work" / "maps" / "meta.json").write_text('{"method": "patchcore"}')
    report = validate_submission(tmp_path / "work" / "maps", synth_root, categories=[category])
    assert report.ok, report.text()
    with Store(store) as db:
        table = render_table(db, metric="p_auroc", source="evaluated", protocol="mvtec")
        speed = render_table(db, pair="latency_ms/peak_memory_mb", source="evaluated")
    assert "patchcore (standardized)" in table and f"{100 * expected:.1f}" in table
    assert "protocol runtime" in speed and "patchcore" in speed

    # Resuming: the finished category is not trained again and nothing is added.
    def refuse(*args, **kwargs):
        raise AssertionError("train called for a finished category")

    monkeypatch.setattr("threecad.methods.runner.train", refuse)
    again = runs.standardized_run("patchcore", synth_root, **settings)
    assert again.sha256 == summary.sha256 and again.done == [] and again.skipped == [category]
    with Store(store) as db:
        assert db.counts() == counts

    # A second category joins the first: runs/ and maps/ keep both, and maps/ is one submission.
    monkeypatch.undo()
    monkeypatch.setattr(runs, "dataset_fingerprint", lambda dataset: "sha256:synthetic")
    both = list_categories(synth_root)
    more = runs.standardized_run("patchcore", synth_root, **{**settings, "categories": both})
    assert more.skipped == [category] and more.done == [both[1]]
    assert all((tmp_path / "work" / "runs" / c / "run.json").is_file() for c in both)
    report = validate_submission(tmp_path / "work" / "maps", synth_root, categories=both)
    assert report.ok and report.has_scores, report.text()


def test_unknown_method_fails_before_work(synth_root, tmp_path):
    from threecad.errors import ThreecadError

    with pytest.raises(ThreecadError, match="unknown method"):
        runs.standardized_run("nope", synth_root, store=tmp_path / "lb.sqlite", out=tmp_path / "w", device="cpu")
    assert not (tmp_path / "w").exists()
