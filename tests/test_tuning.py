"""`3cad tune`: settings chosen on the validation split, never the test split; the chosen fit is the run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from cli import cli
from threecad.dataset.layout import list_categories, list_samples
from threecad.dataset.loaders import AnomalyDataset
from threecad.errors import ThreecadError
from threecad.methods import load_method, runner, tuning
from threecad.synth.validation import make_validation_set

SMALL = {"coreset_ratio": 0.2, "calibration_images": 4, "size": 64}


@pytest.fixture(scope="module")
def with_validation(synth_root, tmp_path_factory):
    """``synth_root`` with 4 training normals of its first category moved to ``validation/good``."""
    root = tmp_path_factory.mktemp("tune") / "data"
    shutil.copytree(synth_root, root)
    category = list_categories(root)[0]
    (root / category / "validation" / "good").mkdir(parents=True)
    for sample in list_samples(root, category, "train")[:4]:
        shutil.move(sample.image_path, root / category / "validation" / "good" / sample.image_path.name)
    return root, category


def test_tune_picks_the_best_validated_candidate_and_keeps_its_fit(with_validation, tmp_path, monkeypatch):
    root, category = with_validation
    opened = []
    original = AnomalyDataset.__init__

    def spy(self, data_root, cat, split, *args, **kwargs):
        opened.append((str(data_root), split))
        original(self, data_root, cat, split, *args, **kwargs)

    monkeypatch.setattr(AnomalyDataset, "__init__", spy)
    grid = {"resize": ["squash", "aspect"], "topk": [0.0, 0.03]}
    runs = tuning.tune("patchcore", root, [category], out=tmp_path / "tuned", grid=grid, device="cpu",
                       config=SMALL, kinds=("dark", "edge"))
    assert not [o for o in opened if o == (str(root), "test")]  # the dataset's test split is never opened
    record = json.loads((runs[0] / tuning.TUNING_FILE).read_text())
    settings = [c["settings"] for c in record["candidates"]]
    assert settings == [{"resize": r, "topk": k} for r in ("squash", "aspect") for k in (0.0, 0.03)]
    values = [c["criterion"] for c in record["candidates"]]
    assert record["chosen"] == settings[int(np.argmax(values))]  # argmax: the first of equal values
    # The criterion is the mean of I-AUROC and P-AUROC on the validation set: recompute I-AUROC with
    # scikit-learn from the saved run's own scores on a regenerated (deterministic) validation set.
    val = make_validation_set(root, category, tmp_path / "val", seed=record["seed"], kinds=("dark", "edge"))
    model = load_method(runs[0])
    data = AnomalyDataset(val, category, "test", **model.input_settings())
    scores = [float(model.predict_batch(data[i]["image"][None])[0][0]) for i in range(len(data))]
    labels = [s.label for s in data.samples]
    chosen = next(c for c in record["candidates"] if c["settings"] == record["chosen"])
    assert chosen["metrics"]["all"]["i_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    # The run is the chosen fit: the same as `3cad train` with the chosen settings and the same seed.
    info = json.loads((runs[0] / "run.json").read_text())
    assert info["tuning"]["chosen"] == record["chosen"] and info["resize"] == record["chosen"]["resize"]
    trained = runner.train("patchcore", root, [category], out=tmp_path / "trained", device="cpu",
                           config={**SMALL, "topk": record["chosen"]["topk"]}, resize=record["chosen"]["resize"])
    image = data[0]["image"][None]
    np.testing.assert_array_equal(load_method(trained[0]).predict(image)[1], model.predict(image)[1])


def test_tune_refuses_bad_grids_and_a_dataset_without_validation_images(with_validation, synth_root, tmp_path):
    root, category = with_validation
    with pytest.raises(ThreecadError, match="no option 'resolution'"):
        tuning.tune("patchcore", root, [category], out=tmp_path / "a", grid={"resolution": [1]})
    with pytest.raises(ThreecadError, match="option topk takes"):
        tuning.tune("patchcore", root, [category], out=tmp_path / "b", grid={"topk": [0.0, 2.0]})
    with pytest.raises(ThreecadError, match="validation-fraction"):
        tuning.tune("patchcore", synth_root, "all", out=tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_grid_values_are_read_like_set_values():
    from cli import _parse_grid

    assert _parse_grid(("topk=0,0.03", "resize=squash,aspect")) == {"topk": [0, 0.03], "resize": ["squash", "aspect"]}


def test_tune_command_line_fixes_set_options_and_reports_the_choice(with_validation, tmp_path):
    root, category = with_validation
    result = CliRunner().invoke(cli, ["tune", "--method", "padim", "--dataset", str(root), "--category", category,
                                      "--out", str(tmp_path / "pd"), "--device", "cpu", "--kinds", "dark",
                                      "--set", "exposure=raw", "--set", "size=64"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "pd" / category / tuning.TUNING_FILE).read_text())
    # PaDiM's declared grid is exposure x topk; the fixed exposure leaves it
    assert [c["settings"] for c in record["candidates"]] == [{"topk": 0.0}, {"topk": 0.03}]
    assert f"wrote {tmp_path / 'pd' / category}: topk=" in result.output
    assert json.loads((tmp_path / "pd" / category / "run.json").read_text())["exposure"] == "raw"
