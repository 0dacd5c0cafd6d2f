"""The tile manifest: one row per tile, written as parquet (typed) and CSV (greppable), byte-stable.

Columns (see :data:`COLUMNS`): where the tile sits (``category``, ``split``, ``label`` 0/1,
``defect`` folder, ``image``/``mask`` paths relative to the dataset root), what it holds
(``defect_types`` ';'-joined, ``region_count`` 8-connected regions, ``defect_area`` pixels),
where it came from (``source`` image relative to the raw folder, box ``x0 y0 x1 y1``, ``width``,
``height``), checksums (``image_sha256``, ``mask_sha256``) and ``repairs`` (';'-joined problems
reported for the source's annotations).
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from threecad.errors import ThreecadError
from threecad.io import write_bytes, write_text

COLUMNS = (
    "category", "split", "label", "defect", "defect_types", "region_count", "defect_area", "source",
    "x0", "y0", "x1", "y1", "width", "height", "image", "mask", "image_sha256", "mask_sha256", "repairs",
)  # fmt: skip
_INT = ("label", "region_count", "defect_area", "x0", "y0", "x1", "y1", "width", "height")


def write_manifest(table: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.parquet`` and ``<stem>.csv`` atomically; same table, same bytes."""
    stem = Path(stem)
    table = table.reset_index(drop=True)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), buffer, compression="zstd")
    write_bytes(stem.with_suffix(".parquet"), buffer.getvalue())
    write_text(stem.with_suffix(".csv"), table.to_csv(index=False, lineterminator="\n"))
    return stem.with_suffix(".parquet"), stem.with_suffix(".csv")


def read_manifest(path: str | Path) -> pd.DataFrame:
    """A manifest from parquet or CSV (empty strings stay empty strings, integers stay integers)."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        elif path.suffix == ".csv":
            table = pd.read_csv(path, keep_default_na=False, dtype=str)
            for col in _INT:
                if col in table:
                    table[col] = table[col].astype("int64")
        else:
            raise ThreecadError("a manifest must be a .parquet or .csv file", path)
    except ThreecadError:
        raise
    except Exception as exc:
        raise ThreecadError(f"unreadable manifest ({exc.__class__.__name__}: {exc})", path) from None
    missing = {"category", "label", "defect", "source", "image", "mask"} - set(table.columns)
    if missing:
        raise ThreecadError(f"manifest lacks columns {sorted(missing)}", path)
    if "defect_area" not in table:
        table["defect_area"] = 0
    return table
