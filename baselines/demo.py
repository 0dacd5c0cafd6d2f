"""``make demo`` / ``3cad demo``: the whole pipeline on embedded synthetic data, offline, in minutes.

Steps: synthetic raw line-scan-like images with LabelMe polygons -> ``preprocess`` (validation,
rasterised masks, the 3CAD layout and split) -> PatchCore fitted per category -> maps for every test
image -> ``evaluate`` -> a per-category table. Where the raw-data preprocessing is not installed the
demo starts from the already processed synthetic dataset (``3cad synth dataset``) and says so.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from threecad.errors import ThreecadError
from threecad.io import check_output_dir, staged_dir, write_json, write_text

log = logging.getLogger(__name__)

#: Small enough for < 5 minutes on 2 CPU cores, large enough for meaningful metrics.
DEMO_SIZE = 256
DEMO_PATCHCORE = {"coreset_ratio": 0.1, "batch_size": 8}
DEMO_RAW = {"categories": 2, "images": 8}


def _dataset_from_raw(work: Path, seed: int) -> tuple[Path, str] | None:
    """Raw synthetic frames through the real preprocessing (256-px tiles, seeded split).

    Returns the dataset root and a note on what preprocessing reported; ``None`` where the
    preprocessing modules are absent.
    """
    try:
        from threecad.preprocess import preprocess
        from threecad.synth.raw import make_raw_dataset
    except ImportError:
        return None
    raw = make_raw_dataset(work / "raw", seed=seed, categories=DEMO_RAW["categories"], images=DEMO_RAW["images"])
    summary = preprocess(raw, work / "dataset", tile=DEMO_SIZE, seed=seed)
    note = (f"{summary.get('sources_used', '?')} of {summary.get('sources', '?')} raw frames used, "
            f"{summary.get('tiles', '?')} tiles ({summary.get('defective_tiles', '?')} defective); "
            f"problems found in the raw data: {summary.get('report', 'report.csv')}")
    return work / "dataset", note


def _dataset_from_synth(work: Path, seed: int) -> Path:
    from threecad.synth.dataset import SynthDatasetConfig, make_synthetic_dataset

    config = SynthDatasetConfig(categories=3, train=24, test_good=8, test_defect=16, size=(256, 256))
    return make_synthetic_dataset(work / "dataset", seed=seed, config=config)


def run_demo(out: str | Path, overwrite: bool = False, device: str = "auto", seed: int = 0,
             source: str = "auto") -> dict[str, Any]:
    """Run the demo into ``out``; returns ``{"metrics", "table", "timings", "source"}``.

    ``source``: ``"raw"`` (synthetic raw data + preprocessing), ``"synth"`` (processed synthetic
    dataset) or ``"auto"`` (raw when the preprocessing is available).
    """
    out = Path(out)
    if source not in ("auto", "raw", "synth"):
        raise ThreecadError(f"unknown demo source {source!r}; expected auto, raw or synth")
    check_output_dir(out, overwrite)
    with staged_dir(out) as work:  # the previous demo folder stays until this one is complete
        result = _run(work, out, device, seed, source)
    return result


def _run(work: Path, out: Path, device: str, seed: int, source: str) -> dict[str, Any]:
    """The demo's steps in ``work`` (the staged folder that becomes ``out``)."""
    from threecad.methods.runner import predict, train
    from threecad.metrics import evaluate_predictions, format_table

    timings: dict[str, float] = {}
    start = time.perf_counter()
    from_raw = _dataset_from_raw(work, seed) if source in ("auto", "raw") else None
    if from_raw is None and source == "raw":
        raise ThreecadError("the raw-data preprocessing (threecad.preprocess) is not available")
    if from_raw is not None:
        used, (dataset, note) = "raw", from_raw
        note = note.replace(str(work), str(out))  # report.csv: where it will be once the folder is in place
    else:
        log.info("demo: starting from the processed synthetic dataset")
        used, dataset, note = "synth", _dataset_from_synth(work, seed), "processed synthetic dataset"
    timings["data_s"] = time.perf_counter() - start

    t = time.perf_counter()
    runs = train("patchcore", dataset, "all", out=work / "runs", device=device, size=DEMO_SIZE, seed=seed,
                 config=dict(DEMO_PATCHCORE))
    timings["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    predictions = predict(work / "runs", dataset, work / "predictions", device=device)
    timings["predict_s"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics = evaluate_predictions(dataset, predictions)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    table = format_table(metrics)
    summary = (f"{table}\n\ndata: {note}\n{len(runs)} categories, dataset {out / dataset.relative_to(work)}; "
               "times: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in timings.items()))
    write_json(work / "metrics.json", {"metrics": metrics, "timings": timings, "source": used})
    write_text(work / "metrics.txt", summary + "\n")
    return {"metrics": metrics, "table": summary, "timings": timings, "source": used}
