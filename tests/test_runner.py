"""train/predict runners and their CLI, end to end on the synthetic dataset with the real backbone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import threecad.methods.runner as runner
from cli import cli
from threecad.dataset.layout import list_samples
from threecad.errors import ThreecadError
from threecad.io import image_size
from threecad.maps.files import find_map, read_map
from threecad.metrics import evaluate_predictions

CATEGORY = "Aluminum_Ipad"
SMALL = ["--size", "64", "--set", "coreset_ratio=0.2"]


@pytest.fixture(scope="module")
def cli_run(synth_root, tmp_path_factory):
    """One PatchCore run trained and predicted through the CLI (shared by the checks below)."""
    tmp = tmp_path_factory.mktemp("cli")
    result = CliRunner().invoke(cli, ["train", "--method", "patchcore", "--dataset", str(synth_root),
                                      "--category", CATEGORY, "--out", str(tmp / "runs"), "--device", "cpu",
                                      "--resize", "aspect", *SMALL])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["predict", "--run", str(tmp / "runs"), "--dataset", str(synth_root),
                                      "--out", str(tmp / "pred"), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    return tmp


def test_cli_train_writes_a_complete_run_folder(cli_run, synth_root):
    run = cli_run / "runs" / CATEGORY
    assert {p.name for p in run.iterdir()} >= {"config.json", "weights.pt", "run.json"}
    info = json.loads((run / "run.json").read_text())
    assert info["category"] == CATEGORY and info["size"] == 64 and info["resize"] == "aspect"
    assert info["exposure"] == "mean"  # not given: PatchCore's recommended input setting
    assert info["train_images"] == len(list_samples(synth_root, CATEGORY, "train"))
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "patchcore" and config["config"]["coreset_ratio"] == 0.2


def test_cli_predict_writes_native_size_maps_and_scores(cli_run, synth_root):
    pred = cli_run / "pred"
    samples = list_samples(synth_root, CATEGORY, "test")
    for sample in samples:
        path = find_map(pred, CATEGORY, sample.defect, sample.stem)
        assert path is not None and path.suffix == ".tiff"
        array = read_map(path)
        width, height = image_size(sample.image_path)
        assert array.shape == (height, width) and array.dtype == np.float16
    with open(pred / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["path"] for r in rows) == sorted(s.relpath for s in samples)
    assert {r["category"] for r in rows} == {CATEGORY}


def test_predictions_pass_the_evaluator(cli_run, synth_root):
    result = evaluate_predictions(synth_root, cli_run / "pred", categories=[CATEGORY])
    scores = result["categories"][CATEGORY]
    assert scores["i_auroc"] > 0.7 and scores["p_auroc"] > 0.7
    if "evaluate" in cli.commands:
        out = CliRunner().invoke(cli, ["evaluate", "--dataset", str(synth_root), "--predictions",
                                       str(cli_run / "pred"), "--categories", CATEGORY])
        assert out.exit_code == 0, out.output


def test_python_api_padim_predicts_a_folder_of_runs(synth_root, tmp_path, monkeypatch):
    opened = []
    original = runner.AnomalyDataset

    def spy(root, category, split, *args, **kwargs):
        opened.append(split)
        return original(root, category, split, *args, **kwargs)

    monkeypatch.setattr(runner, "AnomalyDataset", spy)
    runs = runner.train("padim", synth_root, "all", out=tmp_path / "runs", device="cpu", size=64)
    assert "test" not in opened  # training never opens the test split
    assert [r.name for r in runs] == ["Aluminum_Camera_Cover", "Aluminum_Ipad"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no staging or checkpoint folder left
    runner.predict(tmp_path / "runs", synth_root, tmp_path / "pred")
    with open(tmp_path / "pred" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = sum(len(list_samples(synth_root, r.name, "test")) for r in runs)
    assert len(rows) == expected and {r["category"] for r in rows} == {r.name for r in runs}


def _snapshot(folder):
    """Every file below ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_lines(result):
    return [line for line in result.output.splitlines() if line.startswith("error")]


def test_train_refuses_a_non_empty_out_and_a_failed_overwrite_keeps_the_first_run(synth_root, tmp_path):
    out = tmp_path / "runs_pc"
    base = ["train", "--dataset", str(synth_root), "--category", CATEGORY, "--out", str(out), "--device", "cpu",
            "--size", "64"]
    first = CliRunner().invoke(cli, base + ["--method", "padim"])
    assert first.exit_code == 0, first.output
    kept = _snapshot(out)
    # The user meant a new PatchCore run but named the PaDiM folder: refused, nothing touched.
    second = CliRunner().invoke(cli, base + ["--method", "patchcore", "--set", "coreset_ratio=0.2"])
    errors = _error_lines(second)
    assert second.exit_code == 1 and len(errors) == 1, second.output
    assert str(out) in errors[0] and "--overwrite" in errors[0]
    assert _snapshot(out) == kept
    # --overwrite with a run that fails (PaDiM needs one input size; --resize aspect gives several)
    # leaves the previous run byte for byte, and no half-written folder beside it.
    failed = CliRunner().invoke(cli, base + ["--method", "padim", "--resize", "aspect", "--overwrite"])
    assert failed.exit_code == 1 and "one size" in failed.output, failed.output
    assert _snapshot(out) == kept and sorted(p.name for p in tmp_path.iterdir()) == ["runs_pc"]
    replaced = CliRunner().invoke(cli, base + ["--method", "patchcore", "--set", "coreset_ratio=0.2", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / CATEGORY / "config.json").read_text())["method"] == "patchcore"
    assert sorted(p.name for p in out.iterdir()) == [CATEGORY]


def test_train_refuses_an_out_that_holds_the_dataset(synth_root, tmp_path):
    with pytest.raises(ThreecadError, match="holds the dataset"):
        runner.train("padim", synth_root, [CATEGORY], out=synth_root.parent, device="cpu", size=64, overwrite=True)
    assert (synth_root / CATEGORY / "train").is_dir()


def test_an_interrupted_cfrg_run_leaves_out_alone_and_resumes(synth_root, tmp_path, monkeypatch):
    import threecad.methods.training as engine

    config = {"epochs": 2, "batch_size": 3, "train_images": 3, "size": 64, "teacher": "efficientnet_lite0",
              "teacher_weights": "random"}
    save = engine.save_checkpoint

    def killed_after_first_epoch(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        runner.train("cfrg", synth_root, ["AI"], out=tmp_path / "runs", device="cpu", size=64, config=config)
    assert not (tmp_path / "runs").exists()  # no half-written run folder
    assert (tmp_path / ".runs.checkpoints" / CATEGORY / "checkpoint.pt").is_file()  # kept for --resume
    trained = []

    def recording(*args, **kwargs):
        trained.append(args[1]["epoch"])  # epochs finished
        save(*args, **kwargs)

    monkeypatch.setattr(engine, "save_checkpoint", recording)
    runs = runner.train("cfrg", synth_root, ["AI"], out=tmp_path / "runs", device="cpu", size=64,
                        config={**config, "resume": True})
    assert trained == [2]  # epoch 1 came from the checkpoint
    log = [json.loads(line) for line in (runs[0] / "train_log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2]
    assert {"checkpoint.pt", "config.json", "weights.pt", "run.json"} <= {p.name for p in runs[0].iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def _dataset_copy(synth_root, tmp_path):
    """A private copy of the synthetic dataset (the session's is shared and read-only)."""
    import shutil

    return Path(shutil.copytree(synth_root, tmp_path / "dataset"))


def test_predict_refuses_a_non_empty_out_and_a_failed_overwrite_keeps_the_first_maps(cli_run, synth_root,
                                                                                    tmp_path):
    runs, out = cli_run / "runs", tmp_path / "maps"
    first = CliRunner().invoke(cli, ["predict", "--run", str(runs), "--dataset", str(synth_root), "--out", str(out)])
    assert first.exit_code == 0, first.output
    kept = _snapshot(out)
    again = CliRunner().invoke(cli, ["predict", "--run", str(runs), "--dataset", str(synth_root), "--out", str(out),
                                     "--set", "topk=1.0"])
    errors = _error_lines(again)
    assert again.exit_code == 1 and len(errors) == 1 and str(out) in errors[0] and "--overwrite" in errors[0]
    assert _snapshot(out) == kept
    # A test image that cannot be read half-way through: the first maps stay as they were.
    dataset = _dataset_copy(synth_root, tmp_path)
    last = list_samples(dataset, CATEGORY, "test")[-1]
    last.image_path.write_bytes(b"not a png")
    failed = CliRunner().invoke(cli, ["predict", "--run", str(runs), "--dataset", str(dataset), "--out", str(out),
                                      "--set", "topk=1.0", "--overwrite"])
    assert failed.exit_code == 1 and "unreadable image" in failed.output, failed.output
    assert _snapshot(out) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "maps"]  # no partial folder left
    replaced = CliRunner().invoke(cli, ["predict", "--run", str(runs), "--dataset", str(synth_root), "--out",
                                        str(out), "--set", "topk=1.0", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert (out / "scores.csv").read_bytes() != kept["scores.csv"]


def test_predict_reads_images_only_and_evaluate_names_a_missing_mask(cli_run, tmp_path):
    dataset = tmp_path / "data"
    made = CliRunner().invoke(cli, ["synth", "dataset", str(dataset), "--categories", "2", "--train", "2",
                                    "--test-good", "2", "--test-defect", "3", "--size", "64x64", "--seed", "3"])
    assert made.exit_code == 0, made.output
    samples = list_samples(dataset, CATEGORY, "test")
    lost = next(s for s in samples if s.label == 1)
    lost.mask_path.unlink()
    result = CliRunner().invoke(cli, ["predict", "--run", str(cli_run / "runs"), "--dataset", str(dataset),
                                      "--out", str(tmp_path / "maps")])
    assert result.exit_code == 0, result.output
    assert all(find_map(tmp_path / "maps", CATEGORY, s.defect, s.stem) is not None for s in samples)
    evaluated = CliRunner().invoke(cli, ["evaluate", "--dataset", str(dataset), "--predictions",
                                         str(tmp_path / "maps"), "--categories", "AI"])
    errors = _error_lines(evaluated)
    assert evaluated.exit_code == 1 and len(errors) == 1, evaluated.output
    assert str(lost.mask_path) in errors[0] and "ground-truth mask missing" in errors[0]
    assert f"{CATEGORY}/{lost.relpath}" in errors[0] and "Traceback" not in evaluated.output


def test_exposure_is_recorded_and_applied_at_predict(synth_root, tmp_path, monkeypatch):
    runs = runner.train("patchcore", synth_root, [CATEGORY], out=tmp_path / "runs", device="cpu", size=64,
                        config={"coreset_ratio": 0.2}, exposure="mean")
    assert json.loads((runs[0] / "run.json").read_text())["exposure"] == "mean"
    seen = []
    original = runner.AnomalyDataset

    def spy(root, category, split, *args, **kwargs):
        seen.append((split, kwargs.get("exposure")))
        return original(root, category, split, *args, **kwargs)

    monkeypatch.setattr(runner, "AnomalyDataset", spy)
    runner.predict(runs[0], synth_root, tmp_path / "pred")
    assert seen == [("test", "mean")]
    with pytest.raises(ThreecadError, match="exposure mode"):
        runner.train("patchcore", synth_root, [CATEGORY], out=tmp_path / "bad", device="cpu", exposure="gain")


def test_predict_overrides_inference_options(cli_run, synth_root, tmp_path):
    def scores(folder):
        with open(folder / "scores.csv") as handle:
            return {r["path"]: float(r["score"]) for r in csv.DictReader(handle)}

    result = CliRunner().invoke(cli, ["predict", "--run", str(cli_run / "runs"), "--dataset", str(synth_root),
                                      "--out", str(tmp_path / "mean"), "--set", "topk=1.0"])
    assert result.exit_code == 0, result.output
    maxima, means = scores(cli_run / "pred"), scores(tmp_path / "mean")
    assert maxima.keys() == means.keys()
    assert all(means[k] <= maxima[k] + 1e-6 for k in maxima) and any(means[k] < maxima[k] - 1e-4 for k in maxima)
    # the saved run is unchanged: its config still holds the default top-3 % mean
    assert json.loads((cli_run / "runs" / CATEGORY / "config.json").read_text())["config"]["topk"] == 0.03
    result = CliRunner().invoke(cli, ["predict", "--run", str(cli_run / "runs"), "--dataset", str(synth_root),
                                      "--out", str(tmp_path / "bad"), "--set", "topp=1"])
    assert result.exit_code == 1 and "has no option(s) topp" in result.output
    # an override the fitted bank cannot match is one line naming the run
    result = CliRunner().invoke(cli, ["predict", "--run", str(cli_run / "runs"), "--dataset", str(synth_root),
                                      "--out", str(tmp_path / "bright"), "--set", "intensity_weight=50"])
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert str(cli_run / "runs" / CATEGORY) in errors[0] and "intensity_weight" in errors[0]
    # fit-time options and out-of-range inference values: one line naming the run, no map written
    for setting, message in (("coreset_ratio=0.5", "coreset_ratio is fixed when the method is fitted"),
                             ("backbone=resnet18", "backbone is fixed when the method is fitted"),
                             ("sigma=-1", "option sigma takes a number >= 0, got -1")):
        result = CliRunner().invoke(cli, ["predict", "--run", str(cli_run / "runs"), "--dataset", str(synth_root),
                                          "--out", str(tmp_path / "refused"), "--set", setting])
        errors = [line for line in result.output.splitlines() if line.startswith("error")]
        assert result.exit_code == 1 and len(errors) == 1, result.output
        assert str(cli_run / "runs" / CATEGORY) in errors[0] and message in errors[0], errors[0]
        assert not (tmp_path / "refused").exists()


def test_same_seed_same_predictions(synth_root, tmp_path):
    for name in ("a", "b"):
        runs = runner.train("patchcore", synth_root, [CATEGORY], out=tmp_path / name, device="cpu", size=64,
                            seed=3, config={"coreset_ratio": 0.1})
        runner.predict(runs[0], synth_root, tmp_path / f"pred_{name}")
    assert (tmp_path / "pred_a" / "scores.csv").read_bytes() == (tmp_path / "pred_b" / "scores.csv").read_bytes()


def test_user_errors_are_one_line_exit_1(synth_root, tmp_path):
    base = ["train", "--dataset", str(synth_root), "--out", str(tmp_path / "r"), "--device", "cpu"]
    cases = [
        (base + ["--method", "patchcore", "--category", "Nope"], "unknown category Nope"),
        (base + ["--method", "patchcore", "--category", CATEGORY, "--set", "bogus=1"], "no option(s) bogus"),
        (base + ["--method", "patchcore", "--category", CATEGORY, "--epochs", "3"], "no option(s) epochs"),
        (base + ["--method", "nope", "--category", CATEGORY], "unknown method 'nope'"),
        (base + ["--method", "patchcore", "--category", CATEGORY, "--set", "reweight=maybe"],
         "option reweight takes true or false, got 'maybe'"),
        (base + ["--method", "patchcore", "--category", CATEGORY, "--set", "sigma=big"],
         "option sigma takes a number >= 0, got 'big'"),
        (base + ["--method", "patchcore", "--category", CATEGORY, "--set", "topk=1.5"],
         "option topk takes a number in [0, 1], got 1.5"),
        (base + ["--method", "patchcore", "--category", CATEGORY, "--set", "feature_dim=0"],
         "option feature_dim takes a whole number >= 1 or null, got 0"),
        (base + ["--method", "padim", "--category", CATEGORY, "--set", "sigma=-1"],
         "option sigma takes a number >= 0, got -1"),
        (base + ["--method", "cfrg", "--category", CATEGORY, "--size", "64", "--set", "map_terms=recovery+x"],
         "option map_terms takes a +-joined choice of recovery, segmentation, distillation, got 'recovery+x'"),
        (base + ["--method", "patchcore", "--category", CATEGORY, "--textures", str(tmp_path)],
         "no option(s) textures"),  # --textures is passed on as a method option
        (["predict", "--run", str(tmp_path), "--dataset", str(synth_root), "--out", str(tmp_path / "p")],
         "not a run folder"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # a rejected option writes nothing
    missing = CliRunner().invoke(cli, base + ["--method", "cfrg", "--category", CATEGORY,
                                              "--textures", str(tmp_path / "no_dtd")])
    assert missing.exit_code == 2 and "no_dtd" in missing.output and "does not exist" in missing.output
    corrupt = tmp_path / "dtd"
    corrupt.mkdir()
    (corrupt / "bad.jpg").write_bytes(b"not an image")
    result = CliRunner().invoke(cli, base + ["--method", "cfrg", "--category", CATEGORY, "--size", "64",
                                             "--epochs", "1", "--textures", str(corrupt)])
    assert result.exit_code == 1 and "bad.jpg: unreadable image" in result.output, result.output
    assert not (tmp_path / "r").exists()  # the failed fit leaves no empty run folder behind


def test_a_broken_run_stops_predict_before_any_map_is_written(synth_root, tmp_path):
    runs = runner.train("padim", synth_root, "all", out=tmp_path / "runs", device="cpu", size=64)
    (runs[1] / "weights.pt").write_bytes(b"garbage")  # the second category's run only
    result = CliRunner().invoke(cli, ["predict", "--run", str(tmp_path / "runs"), "--dataset", str(synth_root),
                                      "--out", str(tmp_path / "pred")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].endswith(")") and "weights.pt: unreadable weights" in lines[0], result.output
    assert not (tmp_path / "pred").exists()


def test_methods_command_lists_both():
    result = CliRunner().invoke(cli, ["methods"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert {"patchcore", "padim"} <= set(names)


def test_demo_refuses_to_overwrite_and_unknown_sources(tmp_path):
    from baselines.demo import run_demo

    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ThreecadError, match="--overwrite"):
        run_demo(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "x"
    with pytest.raises(ThreecadError, match="unknown demo source"):
        run_demo(tmp_path / "new", source="nope")


@pytest.mark.parametrize("method, options", [
    ("padim", ["--resize", "squash"]),
    ("patchcore", ["--resize", "aspect", "--set", "coreset_ratio=0.2"]),
])
def test_a_loaded_method_predicts_the_maps_3cad_predict_writes(synth_root, tmp_path, method, options):
    from threecad.io import read_image
    from threecad.methods import load_method

    runs = tmp_path / "runs"
    trained = CliRunner().invoke(cli, ["train", "--method", method, "--dataset", str(synth_root), "--category",
                                       CATEGORY, "--out", str(runs), "--device", "cpu", "--size", "64",
                                       "--exposure", "mean", *options])
    assert trained.exit_code == 0, trained.output
    config = json.loads((runs / CATEGORY / "config.json").read_text())["config"]
    assert config["size"] == 64 and config["exposure"] == "mean" and config["resize"] == options[1]
    predicted = CliRunner().invoke(cli, ["predict", "--run", str(runs), "--dataset", str(synth_root), "--out",
                                         str(tmp_path / "pred"), "--batch-size", "1"])
    assert predicted.exit_code == 0, predicted.output
    samples = list_samples(synth_root, CATEGORY, "test")
    images = [read_image(s.image_path) for s in samples]  # native sizes, 8-bit grey or RGB as stored
    assert len({i.shape[:2] for i in images}) > 1
    model = load_method(runs / CATEGORY)
    written = [read_map(find_map(tmp_path / "pred", CATEGORY, s.defect, s.stem)) for s in samples]
    _, maps = model.predict(images, batch_size=1)  # the same batches as --batch-size 1: bit for bit
    for amap, expected in zip(maps, written):
        assert amap.dtype == expected.dtype == np.float32
        np.testing.assert_array_equal(amap, expected)
    _, batched = model.predict(images)  # other batches: the same up to float rounding
    for amap, expected in zip(batched, written):
        np.testing.assert_allclose(amap, expected, rtol=1e-4, atol=1e-5)


def test_input_options_given_twice_and_predict_off_rank_0(synth_root, tmp_path, monkeypatch):
    with pytest.raises(ThreecadError, match=r"size is given twice \(32 as an option, 64 as --size\)"):
        runner.train("padim", synth_root, [CATEGORY], out=tmp_path / "runs", device="cpu", size=64,
                     config={"size": 32})
    result = CliRunner().invoke(cli, ["train", "--method", "padim", "--dataset", str(synth_root), "--category",
                                      CATEGORY, "--out", str(tmp_path / "runs"), "--device", "cpu",
                                      "--set", "size=48", "--set", "n_features=20"])
    assert result.exit_code == 0, result.output  # --set size alone is the size
    assert json.loads((tmp_path / "runs" / CATEGORY / "run.json").read_text())["size"] == 48
    monkeypatch.setenv("RANK", "1")  # torchrun: only rank 0 writes
    assert runner.predict(tmp_path / "runs", synth_root, tmp_path / "pred") == tmp_path / "pred"
    assert not (tmp_path / "pred").exists()
