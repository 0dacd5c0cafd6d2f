"""ONNX export (``3cad export --format onnx``) and the onnxruntime engine against the torch engine.

For every exportable method a tiny model is fitted, saved as a run, exported, and the two engines
score the same native images (a non-square uint8 image, so the map is resized back; a float image
at the input size; a uint16 grey image): scores and maps must agree within 1e-4. The torch engine
is the reference: the issue's acceptance is "onnxruntime maps equal torch maps".
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from smooth_images import SmoothImages

from baselines.patchcore import PatchCore
from cli import cli
from threecad.errors import ThreecadError
from threecad.export.onnx import METADATA_KEYS, OnnxPredictor, export_onnx, exportable
from threecad.io import sha256_file
from threecad.methods import build, load_method
from threecad.methods.runner import save_run

SIZE = 64
LITE = "efficientnet_lite0"
#: One tiny, fast fit per method (tiny budgets; the maths, not the quality, is under test).
TINY = {
    "patchcore": {"calibration_images": 3, "batch_size": 4},
    "padim": {"batch_size": 4, "n_features": 24},
    "rd": {"encoder": LITE, "epochs": 1, "batch_size": 4},
    "rdpp": {"encoder": LITE, "epochs": 1, "batch_size": 4},
    "draem": {"epochs": 1, "batch_size": 4, "width": 8},
    "destseg": {"student_steps": 2, "seg_steps": 2, "batch_size": 4, "seg_width": 16, "encoder": LITE},
    "fastflow": {"epochs": 1, "batch_size": 4, "encoder": LITE},
    "simplenet": {"epochs": 1, "batch_size": 4, "encoder": LITE},
    "cfrg": {"epochs": 1, "batch_size": 3, "teacher": LITE},
    "uniad": {"encoder": LITE, "epochs": 1, "batch_size": 4, "hidden_dim": 32, "ffn_dim": 64, "num_heads": 2,
              "enc_layers": 1, "dec_layers": 1, "neighbor_size": 3},
    "realnet-texture": {"encoder": LITE, "epochs": 1, "batch_size": 4, "layers": ["stride4", "stride8"],
                        "keep": [16, 24], "afs_batches": 3},
}  # crad: tests/test_crad.py exports its own tiny fit (its global grid fixes a larger input)


def _images() -> list:
    rng = np.random.default_rng(7)
    smooth = SmoothImages(3, size=SIZE, seed=3).images
    return [
        (smooth[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)[:48, :],  # 48 x 64: squashed, resized back
        smooth[1],  # float 3 x 64 x 64 at the input size: fed as it is
        rng.integers(0, 65535, (40, 72), dtype=np.uint16),  # grey 16-bit, non-square
        (smooth[2].permute(1, 2, 0).numpy() * 255).astype(np.uint8),
        rng.integers(0, 255, (70, 50, 3), dtype=np.uint8),
    ]


def _fit_run(root, name: str, **extra):
    options = {**TINY[name], **extra}
    method = build(name, size=SIZE, resize=options.pop("resize", "squash"), device="cpu", seed=0, **options)
    method.fit(SmoothImages(6, size=SIZE))
    run = root / name
    save_run(run, method, {"method": name, "category": "tiny", "dataset": "smooth", "seed": 0})
    return run


@pytest.fixture(scope="module")
def patchcore_export(tmp_path_factory):
    """PatchCore with calibration and the paper's reweighted maximum score (every branch of its graph
    but the top-fraction score, which the other methods cover), its bank in an external data file."""
    run = _fit_run(tmp_path_factory.mktemp("runs"), "patchcore", topk=0.0, reweight=True)
    return run, export_onnx(run, run / "model.onnx", external_data=True)


def _assert_engines_agree(run, model, batch_size=None):
    torch_scores, torch_maps = load_method(run, device="cpu").predict(_images(), batch_size=batch_size)
    onnx_scores, onnx_maps = OnnxPredictor(model, threads=1).predict(_images(), batch_size=batch_size)
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-4, atol=1e-4)
    assert [m.shape for m in onnx_maps] == [(48, 64), (64, 64), (40, 72), (64, 64), (70, 50)]
    for ours, reference in zip(onnx_maps, torch_maps):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
    return torch_scores, torch_maps


@pytest.mark.slow  # one fit and one torch.export trace per method
@pytest.mark.parametrize("name", sorted(set(TINY) - {"patchcore"}))
def test_onnxruntime_equals_torch(tmp_path, name):
    run = _fit_run(tmp_path, name)
    model = export_onnx(run, tmp_path / f"{name}.onnx")
    scores, maps = _assert_engines_agree(run, model)
    assert np.ptp(np.concatenate([m.ravel() for m in maps])) > 0  # a constant map would agree trivially


def test_patchcore_equals_torch_at_every_batch_size(patchcore_export):
    """Backbone + bank + nearest-neighbour search in one graph; the batch axis is dynamic (exported at 2)."""
    run, model = patchcore_export
    for batch_size in (1, 3, 8):
        _assert_engines_agree(run, model, batch_size)


def test_external_data_file(patchcore_export):
    run, model = patchcore_export
    assert (model.parent / "model.onnx.data").stat().st_size > model.stat().st_size  # the bank lives outside
    assert json.loads(OnnxPredictor(model, threads=1).metadata["threecad.config"])["reweight"] is True


def test_metadata_round_trip(patchcore_export):
    run, model = patchcore_export
    predictor = OnnxPredictor(model, threads=1)
    method = load_method(run)
    assert set(METADATA_KEYS) <= set(predictor.metadata)
    assert predictor.name == "patchcore"
    assert predictor.input_settings() == method.input_settings() == {"size": SIZE, "resize": "squash",
                                                                      "exposure": "mean"}
    assert predictor.metadata["threecad.weights_sha256"] == sha256_file(run / "weights.pt")
    assert json.loads(predictor.metadata["threecad.run"])["category"] == "tiny"
    assert json.loads(predictor.metadata["threecad.config"])["topk"] == method.topk
    assert json.loads(predictor.metadata["threecad.input_shape"]) == [3, SIZE, SIZE]
    assert predictor.batch_size == method.batch_size
    assert [i.shape[1:] for i in predictor.session.get_inputs()] == [[3, SIZE, SIZE]]
    assert isinstance(predictor.session.get_inputs()[0].shape[0], str)  # the dynamic batch axis


def test_inspect_engines_agree(patchcore_export):
    from threecad.inspect.predictor import load_predictor

    run, model = patchcore_export
    images = _images()
    torch_scores, torch_maps = load_predictor(run, engine="torch", threads=1).predict(images)
    onnx_engine = load_predictor(run, engine="onnxruntime", model=model, threads=1)
    assert onnx_engine.input_settings() == load_predictor(run, engine="torch", threads=1).input_settings()
    onnx_scores, onnx_maps = onnx_engine.predict(images)
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-4, atol=1e-4)
    for ours, reference in zip(onnx_maps, torch_maps):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)


def test_cli_export_and_its_errors(patchcore_export, tmp_path, monkeypatch):
    run, _ = patchcore_export
    runner = CliRunner()
    out = tmp_path / "cli.onnx"
    out.write_bytes(b"an older file")
    result = runner.invoke(cli, ["export", "--run", str(run), "--format", "onnx", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert OnnxPredictor(out, threads=1).name == "patchcore"
    assert not (tmp_path / "cli.onnx.data").exists()  # a small bank stays inside the model
    before = out.read_bytes()

    def error(*args: str) -> str:
        result = runner.invoke(cli, ["export", *args])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
        return lines[0]

    assert "exists; pass --overwrite" in error("--run", str(run), "--out", str(out))
    assert out.read_bytes() == before  # refused: nothing rewritten
    assert "not found" in error("--run", str(tmp_path / "missing"), "--out", str(tmp_path / "a.onnx"))
    (tmp_path / "empty").mkdir()
    assert "not a run folder" in error("--run", str(tmp_path / "empty"), "--out", str(tmp_path / "b.onnx"))
    monkeypatch.setattr(PatchCore, "exportable", classmethod(lambda cls: False))
    assert "cannot be exported" in error("--run", str(run), "--out", str(tmp_path / "c.onnx"))
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "c.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.onnx", "empty"]  # no temporary left behind


def test_varying_input_shapes_are_refused(tmp_path):
    run = _fit_run(tmp_path, "padim", resize="aspect")
    with pytest.raises(ThreecadError, match="one input size"):
        export_onnx(run, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_predictor_errors(tmp_path):
    with pytest.raises(ThreecadError, match="3cad export"):
        OnnxPredictor(tmp_path / "absent.onnx", threads=1)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ThreecadError, match="cannot load"):
        OnnxPredictor(tmp_path / "junk.onnx", threads=1)


def test_every_method_says_whether_it_exports():
    assert all(exportable(name) for name in TINY)
    assert PatchCore.exportable()


def test_predict_batch_runs_the_exported_module():
    """One forward: predict_batch is the inference module's output, as numpy."""
    method = build("draem", epochs=1, batch_size=2, width=8, size=32, device="cpu", seed=0)
    method.fit(SmoothImages(2, size=32))
    images = torch.stack(SmoothImages(2, size=32, seed=5).images)
    scores, maps = method.predict_batch(images)
    with torch.no_grad():
        ref_scores, ref_maps = method.inference_module()(images)
    np.testing.assert_array_equal(scores, ref_scores.numpy())
    np.testing.assert_array_equal(maps, ref_maps.numpy())


def test_missing_onnxruntime_says_how_to_install(patchcore_export, monkeypatch):
    run, model = patchcore_export
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ThreecadError, match=r"pip install 'threecad\[onnx\]'"):
        OnnxPredictor(model, threads=1)
