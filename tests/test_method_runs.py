"""The synthesis and embedding baselines through `3cad leaderboard run` and under torchrun.

Each method's own tests cover its networks, losses and resume; these check the two entry points a
researcher uses for the benchmark: the standardized run (fit, predict, both protocols, timing, the
store; a rerun adds nothing) and a 2-process gloo DDP fit of the synthesis methods.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from killing import subprocess_env
from sklearn.metrics import roc_auc_score

from leaderboard.store import Store
from threecad.dataset.layout import list_categories, list_samples
from threecad.dataset.masks import read_mask
from threecad.io import image_size
from threecad.maps.files import find_map, read_map

LITE = "encoder=efficientnet_lite0"
TINY = {
    "draem": ["epochs=1", "batch_size=4", "width=16"],
    "destseg": ["student_steps=2", "seg_steps=2", "seg_width=16", "batch_size=4", LITE],
    "fastflow": ["epochs=1", "batch_size=4", LITE],
    "simplenet": ["epochs=1", "batch_size=4", LITE],
}


def _leaderboard_run(method: str, dataset: Path, category: str, store: Path, out: Path):
    from cli import cli

    args = ["leaderboard", "run", "--method", method, "--dataset", str(dataset), "--categories", category,
            "--store", str(store), "--out", str(out), "--device", "cpu", "--size", "64", "--warmup", "1",
            "--timed", "2"]
    for pair in TINY[method]:
        args += ["--set", pair]
    return CliRunner().invoke(cli, args)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(TINY))
def test_leaderboard_run_stores_both_protocols_and_a_rerun_adds_nothing(method, synth_root, tmp_path):
    category = list_categories(synth_root)[0]
    store, out = tmp_path / "lb.sqlite", tmp_path / "work"
    result = _leaderboard_run(method, synth_root, category, store, out)
    assert result.exit_code == 0, result.output
    with Store(store, readonly=True) as db:
        subs = db.submissions("evaluated")
        assert [s["method"] for s in subs] == [method]
        rows = db.results(submission=subs[0]["sha256"])
        counts = db.counts()
    values = {(r["category"], r["protocol"], r["metric"]): r["value"] for r in rows}
    for protocol in ("mvtec", "3cad-paper"):
        for metric in ("i_auroc", "p_auroc", "aupro", "p_ap"):
            assert 0.0 <= values[(category, protocol, metric)] <= 1.0
    assert values[(category, "runtime", "latency_ms")] > 0 and values[(category, "runtime", "fit_s")] > 0
    # The stored pixel AUROC is that of the native-size maps the run wrote (scikit-learn on the same pixels).
    labels, scores = [], []
    for sample in list_samples(synth_root, category, "test"):
        amap = read_map(find_map(out / "maps", category, sample.defect, sample.stem))
        width, height = image_size(sample.image_path)
        assert amap.shape == (height, width)
        labels.append((read_mask(sample.mask_path) if sample.label else np.zeros((height, width), bool)).ravel())
        scores.append(amap.ravel().astype(np.float64))
    expected = roc_auc_score(np.concatenate(labels), np.concatenate(scores))
    assert values[(category, "mvtec", "p_auroc")] == pytest.approx(expected, abs=1e-9)

    again = _leaderboard_run(method, synth_root, category, store, out)
    assert again.exit_code == 0, again.output
    assert "already stored" in again.output
    with Store(store, readonly=True) as db:
        assert db.counts() == counts


@pytest.mark.slow
@pytest.mark.parametrize("method", ["draem", "destseg"])
def test_torchrun_trains_the_synthesis_methods_and_rank_0_alone_writes(method, synth_root, tmp_path):
    """A real 2-process gloo DDP fit: both ranks train, one run folder is written once and it predicts."""
    from threecad.methods import load_method

    category = list_categories(synth_root)[0]
    cli_file = Path(__file__).resolve().parents[1] / "cli.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--",
                str(cli_file)]
    train = ["train", "--method", method, "--dataset", str(synth_root), "--category", category, "--out",
             str(tmp_path / "runs"), "--device", "cpu", "--size", "64"]
    for pair in TINY[method]:
        train += ["--set", pair]
    done = subprocess.run([*torchrun, *train], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run = tmp_path / "runs" / category
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no staging leftovers beside it
    assert done.stdout.count(f"wrote {run}") == 1
    images = [np.full((64, 80, 3), 128, np.uint8)]
    scores, maps = load_method(run).predict(images)
    assert scores.shape == (1,) and maps[0].shape == (64, 80) and np.isfinite(maps[0]).all()
