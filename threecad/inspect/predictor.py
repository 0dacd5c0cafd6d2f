"""The scoring engine behind ``3cad inspect`` and ``3cad calibrate``: a saved method or its ONNX export.

Both engines expose the same two calls, ``predict(images, batch_size=...)`` (``Method.predict``'s
contract: native images in, ``(scores (N,), maps at each image's native size)`` out, the training
input transform applied inside) and ``input_settings()``, so everything after loading (windows,
stitching, thresholds, outputs) is one code path whichever engine scores.

Threads: on a loaded 2-core machine PyTorch's default intra-op thread count was measured 5-8x
slower than one thread, so the count is always set explicitly: :func:`default_threads` is the one
definition (``OMP_NUM_THREADS`` when set, else the core count), shared with the ONNX engine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from threecad.errors import ThreecadError

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnxruntime")
#: Where ``3cad export --format onnx`` is expected to have written a run's model by default.
ONNX_FILE = "model.onnx"


class Predictor(Protocol):
    """What inspection needs from an engine (a :class:`threecad.methods.Method` is one)."""

    def predict(self, images: list[np.ndarray], batch_size: int | None = None) -> tuple[np.ndarray, list]: ...

    def input_settings(self) -> dict[str, Any]: ...


def default_threads() -> int:
    """Intra-op threads when none are asked for: ``int(OMP_NUM_THREADS)`` if set, else ``os.cpu_count()``.

    The one definition for every engine (the ONNX predictor imports it). A malformed or
    non-positive ``OMP_NUM_THREADS`` is a user error, not a silent fallback.
    """
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            raise ThreecadError(f"OMP_NUM_THREADS must be a whole number, got {text!r}") from None
        if value < 1:
            raise ThreecadError(f"OMP_NUM_THREADS must be at least 1, got {value}")
        return value
    return max(1, os.cpu_count() or 1)


def check_threads(threads: int | None) -> int:
    """``threads`` checked (>= 1), or :func:`default_threads` for ``None``."""
    if threads is None:
        return default_threads()
    if int(threads) < 1:
        raise ThreecadError(f"--threads must be at least 1, got {threads}")
    return int(threads)


def load_predictor(run: str | Path, engine: str = "torch", model: str | Path | None = None,
                   threads: int | None = None) -> Predictor:
    """The engine that scores images for ``run`` (one run folder of one category).

    ``torch``: :func:`threecad.methods.load_method` (its saved input transform), with
    ``torch.set_num_threads(threads)`` set process-wide. ``onnxruntime``:
    ``threecad.export.onnx.OnnxPredictor(model or RUN/model.onnx, threads)``; a missing model file is
    a one-line error saying how to make it.
    """
    if engine not in ENGINES:
        raise ThreecadError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    run = Path(run)
    threads = check_threads(threads)
    if engine == "onnxruntime":
        path = Path(model) if model is not None else run / ONNX_FILE
        if not path.is_file():
            raise ThreecadError(f"ONNX model not found; write it first with `3cad export --run {run} --format onnx "
                                f"--out {path}` (or pass --model)", path)
        try:
            from threecad.export.onnx import OnnxPredictor
        except ImportError as exc:
            raise ThreecadError(f"the onnxruntime engine is not available ({exc}); use --engine torch") from None
        log.info("onnxruntime engine: %s, %d thread(s)", path, threads)
        return OnnxPredictor(path, threads=threads)
    if model is not None:
        raise ThreecadError("--model is for --engine onnxruntime; the torch engine reads the run folder itself")
    import torch

    from threecad.methods.registry import load_method

    torch.set_num_threads(threads)
    log.info("torch engine: %s, %d thread(s)", run, threads)
    return load_method(run)
