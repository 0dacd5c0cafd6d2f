"""``make demo`` / ``3cad demo``: the whole pipeline on embedded synthetic data, offline, in minutes.

Steps: synthetic raw line-scan-like images with LabelMe polygons -> ``preprocess`` (validation,
rasterised masks, the 3CAD layout and split) -> PatchCore fitted per category -> maps for every test
image -> ``evaluate`` -> a per-category table. ``source="synth"`` starts from the already processed
synthetic dataset (``3cad synth dataset``) instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from threecad.errors import ThreecadError
from threecad.io import check_output_dir, staged_dir, write_json, write_text

log = logging.getLogger(__name__)

SOURCES = ("raw", "synth")


@dataclass(frozen=True)
class DemoConfig:
    """The demo's sizes. The defaults run in < 5 minutes on 2 CPU cores and give meaningful metrics;
    tests run the same steps on a much smaller one."""

    size: int = 256  # tile size of the preprocessing and PatchCore's input size
    patchcore: dict[str, Any] = field(default_factory=lambda: {"coreset_ratio": 0.1, "batch_size": 8})
    raw_categories: int = 2
    raw_images: int = 8  # frames per category (even indices defective)
    raw_frame: tuple[int, int] = (640, 480)  # (width, height) of the small frames
    raw_large: int = 1  # line-scan-sized frames per category
    synth_categories: int = 3


def _dataset_from_raw(work: Path, seed: int, config: DemoConfig) -> tuple[Path, str]:
    """Raw synthetic frames through the real preprocessing (tiles of ``config.size``, seeded split);
    returns the dataset root and a note on what preprocessing reported."""
    from threecad.ingest.preprocess import preprocess
    from threecad.synth.raw import make_raw_dataset

    raw = make_raw_dataset(work / "raw", seed=seed, categories=config.raw_categories, images=config.raw_images,
                           size=config.raw_frame, large=config.raw_large)
    summary = preprocess(raw, work / "dataset", tile=config.size, seed=seed)
    note = (f"{summary['sources_used']} of {summary['sources']} raw frames used, {summary['tiles']} tiles "
            f"({summary['defective_tiles']} defective); problems found in the raw data: {summary['report']}")
    return work / "dataset", note


def _dataset_from_synth(work: Path, seed: int, config: DemoConfig) -> Path:
    from threecad.synth.dataset import SynthDatasetConfig, make_synthetic_dataset

    synth = SynthDatasetConfig(categories=config.synth_categories, train=24, test_good=8, test_defect=16,
                               size=(config.size, config.size))
    return make_synthetic_dataset(work / "dataset", seed=seed, config=synth)


def run_demo(out: str | Path, overwrite: bool = False, device: str = "auto", seed: int = 0,
             source: str = "raw", config: DemoConfig | None = None) -> dict[str, Any]:
    """Run the demo into ``out``; returns ``{"metrics", "table", "timings", "source"}``.

    ``source``: ``"raw"`` (synthetic raw data + preprocessing) or ``"synth"`` (the processed
    synthetic dataset). ``config``: the sizes (:class:`DemoConfig`; the default is ``make demo``'s).
    """
    out = Path(out)
    if source not in SOURCES:
        raise ThreecadError(f"unknown demo source {source!r}; expected {' or '.join(SOURCES)}")
    check_output_dir(out, overwrite)
    with staged_dir(out) as work:  # the previous demo folder stays until this one is complete
        result = _run(work, out, device, seed, source, config or DemoConfig())
    return result


def _run(work: Path, out: Path, device: str, seed: int, source: str, config: DemoConfig) -> dict[str, Any]:
    """The demo's steps in ``work`` (the staged folder that becomes ``out``)."""
    from threecad.methods.runner import predict, train
    from threecad.metrics import evaluate_predictions, format_table

    timings: dict[str, float] = {}
    start = time.perf_counter()
    if source == "raw":
        dataset, note = _dataset_from_raw(work, seed, config)
        note = note.replace(str(work), str(out))  # report.csv: where it will be once the folder is in place
    else:
        dataset, note = _dataset_from_synth(work, seed, config), "processed synthetic dataset"
    timings["data_s"] = time.perf_counter() - start

    t = time.perf_counter()
    runs = train("patchcore", dataset, "all", out=work / "runs", device=device, size=config.size, seed=seed,
                 config=dict(config.patchcore))
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
    write_json(work / "metrics.json", {"metrics": metrics, "timings": timings, "source": source})
    write_text(work / "metrics.txt", summary + "\n")
    return {"metrics": metrics, "table": summary, "timings": timings, "source": source}
