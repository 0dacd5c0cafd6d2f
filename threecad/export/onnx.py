"""A trained run as one ONNX model, and the onnxruntime engine that scores images with it.

:func:`export_onnx` traces the method's :meth:`~threecad.methods.Method.inference_module` (the same
module its ``predict_batch`` runs, so the two engines cannot drift apart) with the
``torch.export``-based exporter (``torch.onnx.export(dynamo=True)``, which needs ``onnx`` and
``onnxscript``; the TorchScript exporter is deprecated), with a dynamic batch axis and the run's
fixed input size. The graph takes images ``(B, 3, H, W)`` float32 in [0, 1] already at the input
size and returns ``scores`` ``(B,)`` and ``maps`` ``(B, H, W)``; the input transform before it
(resize, exposure) and the resize of the maps back to each image's size stay in Python, shared
with ``Method.predict`` (:func:`threecad.methods.method.predict_images`), and are described in the
model's ``metadata_props`` (:data:`METADATA_KEYS`), which :class:`OnnxPredictor` reads back.

Models whose weights pass :data:`EXTERNAL_BYTES` (protobuf's 2 GB limit, a large PatchCore bank or
PaDiM covariances) keep them in ``<out>.data`` beside ``<out>``; both files are written atomically.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from threecad import __version__
from threecad.errors import ThreecadError
from threecad.io import atomic_write, sha256_file

log = logging.getLogger(__name__)

#: Version of the metadata layout below; a predictor refuses a model of another.
FORMAT = "1"
#: Every ``metadata_props`` key :func:`export_onnx` writes (all strings; JSON where structured).
METADATA_KEYS = ("threecad.format", "threecad.version", "threecad.method", "threecad.config", "threecad.input",
                 "threecad.input_shape", "threecad.batch_size", "threecad.outputs", "threecad.run",
                 "threecad.weights_sha256")
#: What the two outputs mean, recorded in the model.
OUTPUTS = ("scores (B,) float32: raw image scores, higher = more anomalous, never squashed; "
           "maps (B, H, W) float32 at the input size, same scale; threecad resizes each map back to its "
           "image's native size (bilinear, align_corners=False)")
#: Above this many bytes of weights the model keeps them in an external data file.
EXTERNAL_BYTES = 1_800_000_000
INSTALL_HINT = "pip install 'threecad[onnx]'"


def _require(module: str) -> Any:
    """Import an optional dependency, or a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ThreecadError(f"ONNX export needs the package {module!r}: {INSTALL_HINT}") from None


def exportable(method_name: str) -> bool:
    """Whether runs of this method can be exported (its predict is one tensor graph)."""
    from threecad.methods.registry import get_method

    return get_method(method_name).exportable()


def _input_shape(settings: dict[str, Any], run: Path) -> tuple[int, int]:
    """(height, width) every image reaches the model at, or an error when it varies by image."""
    if settings["resize"] != "squash" or settings["size"] is None:
        raise ThreecadError(f"the run feeds images at their own shapes (resize={settings['resize']}, "
                            f"size={settings['size']}); ONNX export needs one input size: train with --resize squash "
                            "and a --size", run)
    return int(settings["size"]), int(settings["size"])


def _metadata(run: Path, method: Any, shape: tuple[int, int]) -> dict[str, str]:
    from threecad.methods.method import WEIGHTS_FILE
    from threecad.methods.runner import read_run

    record = read_run(run)
    identity = {"folder": run.resolve().name, **{k: record[k] for k in ("dataset", "category", "method", "seed")
                                                 if k in record}}
    config = {**method.get_config(), **method.resolved_config()}
    return {
        "threecad.format": FORMAT,
        "threecad.version": __version__,
        "threecad.method": method.name,
        "threecad.config": json.dumps(config, sort_keys=True, default=str),
        "threecad.input": json.dumps(method.input_settings(), sort_keys=True),
        "threecad.input_shape": json.dumps([3, *shape]),
        "threecad.batch_size": str(int(getattr(method, "batch_size", 16) or 16)),
        "threecad.outputs": OUTPUTS,
        "threecad.run": json.dumps(identity, sort_keys=True, default=str),
        "threecad.weights_sha256": sha256_file(run / WEIGHTS_FILE),
    }


def export_onnx(run: str | Path, out: str | Path, opset: int | None = None, overwrite: bool = False,
                external_data: bool | None = None) -> Path:
    """Write the run's inference as the ONNX model ``out`` (and ``<out>.data`` when the weights are large).

    ``run``: one run folder (``config.json``, ``weights.pt``, ``run.json``). ``opset``: the ONNX opset
    (default: the exporter's). ``overwrite``: replace an existing ``out``. ``external_data``: force
    (``True``) or forbid (``False``) the external data file; ``None`` uses it above
    :data:`EXTERNAL_BYTES`. Returns ``out``. Nothing is written unless the export succeeds.
    """
    from threecad.methods.registry import load_method
    from threecad.methods.runner import find_runs

    run, out = Path(run), Path(out)
    if not run.is_dir():
        raise ThreecadError("run folder not found", run)
    runs = find_runs(run)
    if runs != [run]:
        raise ThreecadError(f"export takes one run folder; this folder holds {len(runs)} runs: pass one of them", run)
    if out.exists() and not overwrite:
        raise ThreecadError("output file exists; pass --overwrite to replace it", out)
    if out.exists() and not out.is_file():
        raise ThreecadError("output path is not a file", out)
    if opset is not None and not 18 <= int(opset) <= 23:
        raise ThreecadError(f"--opset must be between 18 and 23 (the torch.export-based exporter), got {opset}")
    method = load_method(run, **_cpu(run))
    if not method.exportable():
        raise ThreecadError(f"method {method.name!r} cannot be exported to ONNX: its inference is not a tensor graph "
                            "(see docs/export.md)", run)
    _require("onnx")
    _require("onnxscript")
    shape = _input_shape(method.input_settings(), run)
    module = _whole_batches(method.inference_module().eval())
    example = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.inference_mode(False), torch.no_grad():
        try:
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"],
                                        output_names=["scores", "maps"], dynamic_shapes=({0: batch},),
                                        opset_version=opset, verbose=False)
        except Exception as exc:  # the exporter's errors are long: keep the first line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise ThreecadError(f"ONNX export of {method.name!r} failed ({first})", run) from None
    batch_dim = program.model.graph.inputs[0].shape[0]
    if isinstance(batch_dim, int):  # the exporter fell back to a trace specialised to the example batch
        raise ThreecadError(f"ONNX export of {method.name!r} could not keep the batch axis dynamic (its inference "
                            f"depends on the batch size, fixed at {batch_dim}); nothing written", run)
    for key, value in _metadata(run, method, shape).items():
        program.model.metadata_props[key] = value
    weight_bytes = sum(p.numel() * p.element_size() for p in [*module.parameters(), *module.buffers()])
    external = weight_bytes > EXTERNAL_BYTES if external_data is None else bool(external_data)
    _save(program, out, external)
    log.info("exported %s (%s, %.1f MB of weights%s) to %s", method.name, run, weight_bytes / 2**20,
             ", external data" if external else "", out)
    return out


def _whole_batches(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every backbone taking whole batches. On the CPU a
    :class:`threecad.backbones.FeatureExtractor` splits a batch into pieces of 4 (a cache
    optimisation that does not change the result); that loop depends on the batch size, which the
    export keeps dynamic, and would make ``torch.export`` fall back to a slow, batch-specialised
    trace. The module is a fresh one built for this export, so nothing else sees the change."""
    from threecad.backbones import FeatureExtractor

    for part in module.modules():
        if isinstance(part, FeatureExtractor):
            part.micro_batch = None
    return module


def _cpu(run: Path) -> dict[str, str]:
    """``{"device": "cpu"}`` for a run whose method has a ``device`` option (the export traces on the
    CPU); empty otherwise, or when config.json is unreadable (:func:`load_method` then says why)."""
    from threecad.methods.method import CONFIG_FILE
    from threecad.methods.registry import get_method

    try:
        name = json.loads((run / CONFIG_FILE).read_text())["method"]
        return {"device": "cpu"} if "device" in get_method(name).config_keys() else {}
    except (OSError, ValueError, KeyError, TypeError, ThreecadError):
        return {}


def _save(program: Any, out: Path, external: bool) -> None:
    """Save in a hidden folder next to ``out``, then move the data file (if any) and the model into
    place through :func:`threecad.io.atomic_write`, the model last, so a reader never finds a model
    whose data is missing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        program.save(staged, external_data=external)
        files = sorted(Path(tmp).iterdir(), key=lambda p: p == staged)
        for path in files:
            with path.open("rb") as source, atomic_write(out.parent / path.name) as target:
                shutil.copyfileobj(source, target, 1 << 24)


class OnnxPredictor:
    """An exported run scored with onnxruntime, with ``Method.predict``'s contract.

    ``predict(images, batch_size=None)`` takes native images (numpy ``HxW`` / ``HxWx3`` uint8 or uint16,
    float ``3xHxW`` tensors in [0, 1]) and returns ``(scores (N,), [maps at each image's native size])``,
    applying the input transform recorded in the model (``input_settings()``) exactly as the saved
    method does. ``threads``: onnxruntime's intra-op threads (``None``: the one default,
    :func:`threecad.inspect.predictor.default_threads`).
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        from threecad.inspect.predictor import check_threads

        self.path = Path(path)
        self.threads = check_threads(threads)
        if not self.path.is_file():
            raise ThreecadError("ONNX model not found: write it with `3cad export --run RUN --format onnx --out PATH`",
                                self.path)
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise ThreecadError(f"onnxruntime cannot load the model ({first})", self.path) from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if self.metadata.get("threecad.format") != FORMAT:
            raise ThreecadError(f"not a threecad export of format {FORMAT} (metadata threecad.format is "
                                f"{self.metadata.get('threecad.format')!r}): export the run again", self.path)
        try:
            self._settings = json.loads(self.metadata["threecad.input"])
            self.input_shape = tuple(json.loads(self.metadata["threecad.input_shape"]))
            self.batch_size = int(self.metadata["threecad.batch_size"])
            self.name = self.metadata["threecad.method"]
        except (KeyError, ValueError, TypeError) as exc:
            raise ThreecadError(f"the model's threecad metadata is incomplete ({exc})", self.path) from None

    def input_settings(self) -> dict[str, Any]:
        """``size``, ``resize`` and ``exposure`` the run was trained with."""
        return dict(self._settings)

    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores (B,) and maps (B, H, W) of a batch already at the input size."""
        if tuple(images.shape[1:]) != self.input_shape:
            raise ThreecadError(f"the model takes images {self.input_shape}, got {tuple(images.shape[1:])}", self.path)
        feed = np.ascontiguousarray(images.detach().float().cpu().numpy())
        scores, maps = self.session.run(["scores", "maps"], {"images": feed})
        return scores, maps

    def predict(self, images: Any, batch_size: int | None = None) -> tuple[np.ndarray, Any]:
        """As :meth:`threecad.methods.Method.predict`: native images in, maps at native sizes out."""
        from threecad.methods.method import predict_images

        return predict_images(images, self._settings, self.predict_batch, batch_size or self.batch_size, self.name)


__all__ = ["EXTERNAL_BYTES", "FORMAT", "METADATA_KEYS", "OnnxPredictor", "export_onnx", "exportable"]
