"""anomalib's ``Tabular`` dataset table: a split made here, usable there (and read back here)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from threecad.dataset.layout import Sample
from threecad.dataset.loaders import collect_samples
from threecad.dataset.manifest import MANIFEST_SUFFIXES
from threecad.errors import ThreecadError
from threecad.io import atomic_write


def tabular_frame(samples: Iterable[Sample], relative_to: str | Path | None = None) -> pd.DataFrame:
    """anomalib's ``Tabular`` table: ``image_path, label_index, split, mask_path`` (+ category, defect).

    Splits are written as anomalib names them (``train``, ``val``, ``test``); good images get an
    empty ``mask_path``. Paths are relative to ``relative_to`` where they lie below it (pass the
    same folder as anomalib's ``root``), else absolute.
    """
    base = Path(relative_to).resolve() if relative_to is not None else None

    def rel(p: Path | None) -> str:
        if p is None:
            return ""
        p = Path(p).resolve()
        if base is not None and p.is_relative_to(base):
            return p.relative_to(base).as_posix()
        return p.as_posix()

    rows = [
        {
            "image_path": rel(s.image_path),
            "label_index": int(s.label),
            "split": "val" if s.split == "validation" else s.split,
            "mask_path": rel(s.mask_path) if s.label == 1 else "",
            "category": s.category,
            "defect": s.defect,
        }
        for s in samples
    ]
    columns = ["image_path", "label_index", "split", "mask_path", "category", "defect"]
    return pd.DataFrame(rows, columns=columns).astype({"label_index": "int64"})


def write_tabular(source: str | Path, out: str | Path, category: str | None = None) -> Path:
    """Write the ``Tabular`` table of a dataset (all splits) to ``out`` (.csv or .parquet), atomically."""
    out = Path(out)
    if out.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ThreecadError("table must end in .csv or .parquet", out)
    frame = tabular_frame(collect_samples(source, category, None), relative_to=out.parent)
    with atomic_write(out, "wb") as handle:
        if out.suffix.lower() == ".csv":
            handle.write(frame.to_csv(index=False).encode())
        else:
            frame.to_parquet(handle, index=False)
    return out
