"""``3cad data export-hf``: a dataset folder as a Hugging Face ``DatasetDict``, fully offline.

Two copies are written, for the two ways people load data: ``disk/`` (``save_to_disk``, for
``datasets.load_from_disk``) and ``data/<split>-XXXXX-of-YYYYY.parquet`` shards with a dataset
card (``README.md``) whose YAML names them, the layout the Hub serves (``load_dataset(OUT)``,
or upload the folder as it is). The parquet shards embed the image bytes: a table that only
stored file paths would stop loading once the source folder moves, which is the mistake this
module exists to avoid (the test exports, deletes the source, reloads and compares every pixel).

Images are embedded byte for byte as stored (no re-encoding, so nothing is lost); masks are
binarised with :func:`threecad.dataset.masks.read_mask` and stored as 0/255 grayscale PNGs, so every
consumer sees the same foreground whatever the source encoding was. Masks are in the displayed
orientation (EXIF applied, as everywhere in threecad), which is also how ``datasets`` decodes an
image carrying an orientation tag. Good images have no mask
(``None``): an all-zero image per good sample would only cost space.

Columns: ``image``, ``mask``, ``label`` (ClassLabel good/defect), ``category`` (ClassLabel over the
eight 3CAD folders, then any other category names), ``defect`` (folder), ``defect_types`` (all
types in the image where known, else the folder), ``path`` (relative path in the layout), and
``source_path`` / ``box`` (the raw image and the crop box in it, where a manifest states them).
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from threecad.dataset.catalog import CATEGORY_FOLDERS, LICENSE_NOTE, canonical_category, resolve_categories
from threecad.dataset.layout import GOOD, SPLITS, Sample, list_categories
from threecad.dataset.loaders import collect_samples
from threecad.dataset.manifest import image_metadata
from threecad.dataset.masks import read_mask
from threecad.errors import ThreecadError
from threecad.io import check_output_dir, image_size, staged_dir
from threecad.progress import progress

log = logging.getLogger(__name__)

LABEL_NAMES = ("good", "defect")


@dataclass
class ExportResult:
    out: Path
    rows: dict[str, int] = field(default_factory=dict)
    shards: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"exported to {self.out}"]
        for split, n in self.rows.items():
            lines.append(f"  {split:10s} {n:6d} rows in {len(self.shards[split])} parquet shard(s)")
        return "\n".join(lines)


def features(category_names: list[str]):
    """The ``datasets.Features`` of an export (the schema is part of the contract: keep it stable)."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "label": datasets.ClassLabel(names=list(LABEL_NAMES)),
            "category": datasets.ClassLabel(names=category_names),
            "defect": datasets.Value("string"),
            "defect_types": datasets.List(datasets.Value("string")),
            "path": datasets.Value("string"),
            "source_path": datasets.Value("string"),
            "box": datasets.List(datasets.Value("int64")),
        }
    )


def _png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _rows(samples: list[Sample], root: str, meta: dict[str, dict]):
    """Generator for ``Dataset.from_generator`` (module level, so the datasets cache can hash it)."""
    root_path = Path(root)
    for sample in progress(samples, desc="export"):
        rel = sample.image_path.relative_to(root_path).as_posix()
        extra = meta.get(rel, {})
        image_bytes = sample.image_path.read_bytes()
        mask = None
        if sample.label == 1:
            # Displayed size (EXIF orientation applied), as the mask is read and as datasets decodes.
            size = image_size(sample.image_path)
            mask = {"bytes": _png(read_mask(sample.mask_path, expected_size=size)), "path": f"{sample.stem}.png"}
        types = extra.get("defect_types") or ([] if sample.defect == GOOD else [sample.defect])
        yield {
            "image": {"bytes": image_bytes, "path": sample.image_path.name},
            "mask": mask,
            "label": sample.label,
            "category": sample.category,
            "defect": sample.defect,
            "defect_types": list(types),
            "path": rel,
            "source_path": extra.get("source_path"),
            "box": extra.get("box"),
        }


def _card(out_split_files: dict[str, list[str]], rows: dict[str, int], names: list[str], present: list[str], root: Path):
    from huggingface_hub import DatasetCard, DatasetCardData

    is_3cad = any(canonical_category(c) for c in present)
    data = DatasetCardData(
        license="unknown",
        pretty_name="3CAD (threecad export)" if is_3cad else f"{root.name} (threecad export)",
        task_categories=["image-segmentation", "image-classification"],
        tags=["anomaly-detection", "industrial-inspection", "threecad"],
        configs=[{"config_name": "default",
                  "data_files": [{"split": s, "path": f"data/{s}-*.parquet"} for s in out_split_files]}],
    )
    table = "\n".join(f"| {split} | {n} |" for split, n in rows.items())
    text = f"""---
{data.to_yaml()}
---

# {data.pretty_name}

Industrial anomaly-detection images with pixel masks, exported by `3cad data export-hf` from the
folder layout `<Category>/{{train/good, test/good, test/<defect>, ground_truth/<defect>}}`.

| split | rows |
|---|---|
{table}

## Columns
- `image`: the image, bytes as stored in the source (no re-encoding).
- `mask`: binary mask as a 0/255 grayscale PNG for defective images, `None` for good ones.
- `label`: `good` (0) or `defect` (1). `category`: one of {", ".join(names)}.
- `defect`: the defect-type folder; `defect_types`: every type in the image where known.
- `path`: the image's path in the folder layout; `source_path`, `box`: the raw image and crop box
  `[x0, y0, x1, y1]` it was cut from, where known.

Training splits hold only good images (unsupervised anomaly detection); `validation`, when
present, is carved from training normals for model selection.

## Licence
{LICENSE_NOTE if is_3cad else "The licence is whatever the source data's owners state; check before sharing."}
{"Cite: 3CAD: A Large-Scale Real-World 3C Product Dataset for Unsupervised Anomaly Detection (AAAI 2025)." if is_3cad else ""}
"""
    return DatasetCard(text)


def export_hf(
    root: str | Path,
    out: str | Path,
    categories: list[str] | None = None,
    max_shard_mb: float = 500.0,
    metadata: str | Path | None = None,
    disk: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Export a dataset folder to ``out`` (parquet shards + card, and ``disk/`` unless ``disk=False``).

    Offline: nothing touches the network (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are set while
    exporting). ``metadata`` is a table or ``synth_dataset.json`` with per-image ``defect_types``,
    ``source_path`` and ``x0, y0, x1, y1``; by default the root's own manifest is used if present.
    Built in a temporary sibling folder and renamed into place, so ``out`` is complete or absent.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    root, out = Path(root), Path(out)
    check_output_dir(out, overwrite)
    if out.resolve().is_relative_to(root.resolve()):
        raise ThreecadError("the export folder must be outside the dataset folder", out)
    cats = resolve_categories(list_categories(root), categories, root) if categories else None  # codes, aliases
    per_split = {split: [s for c in (cats or [None]) for s in collect_samples(root, c, split)] for split in SPLITS}
    per_split = {k: v for k, v in per_split.items() if v}
    if not per_split:
        raise ThreecadError("no images to export", root)
    present = sorted({s.category for v in per_split.values() for s in v})
    names = list(CATEGORY_FOLDERS) + [c for c in present if c not in CATEGORY_FOLDERS]
    feats = features(names)
    meta = image_metadata(root, metadata)

    result = ExportResult(out)
    with staged_dir(out) as tmp:
        built = {}
        progress_was = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
        try:
            for split, samples in per_split.items():
                built[split] = datasets.Dataset.from_generator(
                    _rows,
                    features=feats,
                    cache_dir=str(tmp / ".cache"),
                    gen_kwargs={"samples": samples, "root": str(root), "meta": meta},
                    split=datasets.NamedSplit(split),
                    writer_batch_size=64,  # rows held in memory: 64 full-size 3CAD images, not 1000
                )
            dataset = datasets.DatasetDict(built)
            for split, ds in dataset.items():
                size = sum(s.image_path.stat().st_size for s in per_split[split])
                shards = max(1, math.ceil(size / (max_shard_mb * 1024**2)))
                files = []
                for index in range(shards):
                    name = f"{split}-{index:05d}-of-{shards:05d}.parquet"
                    ds.shard(shards, index, contiguous=True).to_parquet(str(tmp / "data" / name))
                    files.append(f"data/{name}")
                result.rows[split] = len(ds)
                result.shards[split] = files
            if disk:
                dataset.save_to_disk(str(tmp / "disk"))
        finally:
            if progress_was:
                datasets.utils.logging.enable_progress_bar()
        _card(result.shards, result.rows, names, present, root).save(str(tmp / "README.md"))
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
    log.info("exported %s to %s", ", ".join(f"{k} {v}" for k, v in result.rows.items()), out)
    return result

