"""Regression tests for paths no other test ran: the demo pipeline body and ``--debug`` causes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import roc_auc_score

from baselines.demo import DemoConfig, run_demo
from cli import cli
from threecad.backbones import list_backbones
from threecad.dataset.layout import list_categories, list_samples
from threecad.errors import ThreecadError
from threecad.maps.files import map_relpath, read_scores

#: The smallest demo that still has train, good-test and defective-test tiles: one category of four
#: small raw frames (two defective), 64-px tiles, PatchCore with a quarter of the patches kept.
TINY = DemoConfig(size=64, raw_categories=1, raw_images=4, raw_frame=(192, 128), raw_large=0,
                  patchcore={"coreset_ratio": 0.25, "batch_size": 8})


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_demo(out, device="cpu", seed=0, config=TINY)


def test_demo_body_writes_every_stage_and_metrics_that_match_its_maps(demo):
    out, result = demo
    assert {p.name for p in out.iterdir()} == {"raw", "dataset", "runs", "predictions", "metrics.json",
                                               "metrics.txt"}
    assert not list(out.parent.glob(".out*"))  # the staged folder was renamed into place, nothing left
    dataset = out / "dataset"
    categories = list_categories(dataset)
    assert len(categories) == TINY.raw_categories and (dataset / "manifest.parquet").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["source"] == "raw" and saved["metrics"] == json.loads(json.dumps(result["metrics"]))
    assert set(saved["timings"]) == {"data_s", "train_s", "predict_s", "evaluate_s", "total_s"}
    text = (out / "metrics.txt").read_text()
    assert str(out / "dataset" / "report.csv") in text and ".out" not in text  # final paths, not the staging one
    scores = read_scores(out / "predictions" / "scores.csv")
    for category in categories:
        config = json.loads((out / "runs" / category / "config.json").read_text())
        assert config["method"] == "patchcore" and config["config"]["backbone"] in list_backbones()  # recorded
        samples = list_samples(dataset, category, "test")
        labels = [s.label for s in samples]
        assert 0 < sum(labels) < len(labels) and list_samples(dataset, category, "train")
        # independent recomputation from the written maps, scores and masks with scikit-learn
        maps = [tifffile.imread(out / "predictions" / map_relpath(category, s.defect, s.stem)) for s in samples]
        masks = [np.asarray(Image.open(s.mask_path)) > 127 if s.label else np.zeros(m.shape, bool)
                 for s, m in zip(samples, maps)]
        assert all(m.shape == k.shape for m, k in zip(maps, masks))  # native size
        p_auroc = roc_auc_score(np.concatenate([k.ravel() for k in masks]),
                                np.concatenate([m.astype(np.float64).ravel() for m in maps]))
        i_auroc = roc_auc_score(labels, [scores[(category, s.relpath)] for s in samples])
        got = saved["metrics"]["categories"][category]
        assert got["p_auroc"] == pytest.approx(p_auroc, abs=1e-9)
        assert got["i_auroc"] == pytest.approx(i_auroc, abs=1e-9)
        assert got["p_auroc"] > 0.75  # painted defects on smooth surfaces: far from chance (0.93 measured)
    assert result["table"].splitlines()[-4].startswith("mean")


def test_demo_refuses_a_non_empty_out_without_overwrite(demo):
    out, _ = demo
    with pytest.raises(ThreecadError, match="not empty"):
        run_demo(out, device="cpu", config=TINY)


# ---------------------------------------------------------------------------------------------- --debug
def test_debug_shows_the_cause_a_one_line_error_hides(tmp_path):
    """The library raises its one-line errors ``from None``; ``--debug`` still prints the cause."""
    bad = tmp_path / "bad.parquet"
    bad.write_text("not a parquet file")
    args = ["data", "split", str(bad), str(tmp_path / "out")]
    plain = CliRunner().invoke(cli, args)
    assert plain.exit_code == 1
    lines = plain.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: unreadable manifest"), plain.output
    debug = CliRunner().invoke(cli, ["--debug", *args])
    assert debug.exit_code == 1
    assert "During handling of the above exception, another exception occurred" in debug.output
    assert "pyarrow.lib.ArrowInvalid" in debug.output  # the original exception, with its own traceback
    assert debug.output.strip().splitlines()[-1] == lines[0]  # and the same last line
