"""The manifest: one table per dataset, one row per image, in one schema whoever wrote it.

``<root>/manifest.parquet`` (typed) and ``<root>/manifest.csv`` (greppable), byte-stable, are
written by every tool that creates a dataset: ``3cad data preprocess``, ``3cad data
import-folder``, ``3cad data split`` and ``3cad synth dataset``. Columns (:data:`COLUMNS`):

* where the image sits: ``category``, ``split`` (train, validation, test), ``label`` 0/1,
  ``defect`` folder, ``image`` / ``mask`` paths relative to the dataset root (``mask`` empty for a
  good image);
* what it holds: ``defect_types`` (';'-joined), ``region_count`` (8-connected regions of the
  mask), ``defect_area`` (mask pixels);
* where it came from: ``source`` (the image it was cut from or copied from; tiles of one source
  stay on one side of every split), its box ``x0 y0 x1 y1`` in the source (the whole source for an
  image that was not cut) and ``width`` ``height``;
* checksums ``image_sha256`` / ``mask_sha256`` and ``repairs`` (';'-joined problems reported for
  the source's annotations).

``split`` adds ``pool_image`` / ``pool_mask`` (:data:`POOL_COLUMNS`): where each file lies in the
pool it re-split, since without ``--materialize`` the new ``image`` paths are a plan only.
An empty text cell means "none"; an integer the writer could not know is empty (``<NA>``).

:func:`read_manifest` is the one reader, and the one conversion path for tables written before
this schema or by other tools: an anomalib ``Tabular`` table (``image_path, label_index, split,
mask_path``; also what ``import-folder`` wrote as ``import_manifest.csv``, with ``source_path``
and ``defect_types``), an older schema manifest without some columns, and the per-image list of
an older ``synth_dataset.json`` all come back in this schema, unknown values empty. A dataset
root's manifest is found by :func:`find_manifest`, which knows the older file names.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from threecad.dataset.layout import GOOD, SPLITS, Sample, list_samples
from threecad.errors import ThreecadError
from threecad.io import image_size, sha256_file, write_bytes, write_text

MANIFEST = "manifest"  # <root>/manifest.parquet and <root>/manifest.csv
COLUMNS = (
    "category", "split", "label", "defect", "defect_types", "region_count", "defect_area", "source",
    "x0", "y0", "x1", "y1", "width", "height", "image", "mask", "image_sha256", "mask_sha256", "repairs",
)  # fmt: skip
POOL_COLUMNS = ("pool_image", "pool_mask")
_INT = ("label", "region_count", "defect_area", "x0", "y0", "x1", "y1", "width", "height")
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
#: Files of older datasets that carry the per-image table, looked for after ``manifest.*``.
LEGACY_FILES = ("import_manifest.csv", "synth_dataset.json")
#: Foreign column names and the schema's (anomalib's ``Tabular`` and older import-folder tables).
_RENAMES = {"image_path": "image", "mask_path": "mask", "label_index": "label", "defect_type": "defect",
            "source_path": "source"}
#: Split names accepted when reading, mapped to ours (anomalib writes ``val``).
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
                  "test": "test"}
_LABEL_WORDS = {"good": 0, "normal": 0, "ok": 0, "0": 0, "defect": 1, "defective": 1, "abnormal": 1,
                "anomalous": 1, "anomaly": 1, "ng": 1, "1": 1}


# ---------------------------------------------------------------------------------------------- writing
def manifest_row(
    root: str | Path,
    image: str,
    *,
    category: str,
    split: str,
    defect: str,
    source: str,
    mask: str = "",
    mask_array: np.ndarray | None = None,
    defect_types: Iterable[str] = (),
    box: tuple[int, int, int, int] | None = None,
    repairs: str = "",
    hashed: bool = True,
) -> dict:
    """The schema's row for an image (and mask) already written below ``root``.

    ``image`` / ``mask`` are paths relative to ``root``; ``mask_array`` is the mask as written (bool),
    from which the region count and area come; ``box`` defaults to the whole image (it was not cut
    from anything larger). ``hashed=False`` leaves the checksums empty (a pool split without
    copying does not read every file).
    """
    from scipy import ndimage  # imported here: reading a manifest does not need it

    root = Path(root)
    if box is None:
        width, height = image_size(root / image)
        box = (0, 0, width, height)
    x0, y0, x1, y1 = (int(v) for v in box)
    regions = area = 0
    if mask and mask_array is not None:
        regions = int(ndimage.label(mask_array, structure=np.ones((3, 3)))[1])
        area = int(mask_array.sum())
    return {
        "category": category, "split": split, "label": int(defect != GOOD), "defect": defect,
        "defect_types": ";".join(defect_types), "region_count": regions, "defect_area": area, "source": source,
        "x0": x0, "y0": y0, "x1": x1, "y1": y1, "width": x1 - x0, "height": y1 - y0,
        "image": image, "mask": mask,
        "image_sha256": sha256_file(root / image) if hashed else "",
        "mask_sha256": sha256_file(root / mask) if hashed and mask else "",
        "repairs": repairs,
    }  # fmt: skip


def write_manifest(table: pd.DataFrame | list[dict], stem: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.parquet`` and ``<stem>.csv`` atomically; same table, same bytes.

    The table must hold exactly the schema's columns (:data:`COLUMNS`, and :data:`POOL_COLUMNS`
    for a split): a writer that forgets or invents one is a programming error caught here.
    """
    stem = Path(stem)
    table = pd.DataFrame(table, columns=list(COLUMNS)) if isinstance(table, list) else table
    extra = [c for c in table.columns if c not in COLUMNS]
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing or any(c not in POOL_COLUMNS for c in extra):
        raise ValueError(f"not the manifest schema: missing {missing}, unknown {extra}")
    table = table[[*COLUMNS, *(c for c in POOL_COLUMNS if c in extra)]].reset_index(drop=True)
    for column in _INT:  # whole numbers; <NA> (unknown) only where a writer could not know the value
        values = pd.to_numeric(table[column].map(lambda v: pd.NA if v is None or v is pd.NA else v)).astype("Int64")
        table[column] = values.astype("int64") if values.notna().all() else values
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), buffer, compression="zstd")
    write_bytes(stem.with_suffix(".parquet"), buffer.getvalue())
    write_text(stem.with_suffix(".csv"), table.to_csv(index=False, lineterminator="\n"))
    return stem.with_suffix(".parquet"), stem.with_suffix(".csv")


# ---------------------------------------------------------------------------------------------- reading
def is_manifest(path: str | Path) -> bool:
    """A table file the reader takes (a dataset folder is not)."""
    path = Path(path)
    return path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES


def find_manifest(root: str | Path) -> Path | None:
    """The manifest of a dataset root: ``manifest.parquet``, ``manifest.csv``, or the per-image file of
    an older dataset (:data:`LEGACY_FILES`, converted by :func:`read_manifest`); None if it has none."""
    root = Path(root)
    for name in (f"{MANIFEST}.parquet", f"{MANIFEST}.csv", *LEGACY_FILES):
        path = root / name
        if path.is_file() and (path.suffix != ".json" or "test" in _read_json(path)):
            return path
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ThreecadError(f"unreadable manifest JSON ({exc})", path) from None
    if not isinstance(data, dict):
        raise ThreecadError("unreadable manifest JSON (not an object)", path)
    return data


def _synth_rows(path: Path) -> pd.DataFrame:
    """The test images listed by an older ``synth_dataset.json`` (in the dataset root), as schema rows;
    masks where the layout puts them. Training images are not listed there."""
    root, rows, data = path.parent, [], _read_json(path)
    if "test" not in data:
        raise ThreecadError(f"lists no images (only older synthetic datasets did); read {MANIFEST}.parquet "
                            "beside it instead", path)
    for category, images in data["test"].items():
        masks = {s.relpath: s.mask_path for s in list_samples(root, category, "test")}
        for entry in images:
            mask = masks.get(entry["path"])
            rows.append({"category": category, "split": "test", "label": int(entry.get("label", mask is not None)),
                         "defect": Path(entry["path"]).parts[1],
                         "defect_types": ";".join(entry.get("defect_types") or []),
                         "image": f"{category}/{entry['path']}",
                         "mask": "" if mask is None else mask.relative_to(root).as_posix()})
    return pd.DataFrame(rows, dtype=object)


def _read_file(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ThreecadError("manifest not found", path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _synth_rows(path)
    if suffix not in MANIFEST_SUFFIXES:
        raise ThreecadError(f"unknown manifest format {path.suffix!r}; expected .csv or .parquet", path)
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        return pd.read_parquet(path)
    except Exception as exc:
        raise ThreecadError(f"unreadable manifest ({exc.__class__.__name__}: {exc})", path) from None


def _text(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (list, tuple, np.ndarray)):
        return ";".join(str(v) for v in value)
    return str(value)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Any manifest (see the module docstring) as a table in the schema, rows checked.

    Paths stay as written (relative to the manifest's folder, or absolute). A missing label is 1
    when the row has a mask or a non-``good`` defect; a missing defect is ``good`` or ``defect`` by
    label; a missing split is ``test``; a missing category is empty (the caller's).
    """
    path = Path(path)
    raw = _read_file(path).rename(columns=lambda c: _RENAMES.get(str(c), str(c)))
    raw = raw.loc[:, ~raw.columns.duplicated()]  # a table holding both image and image_path: the first
    if "image" not in raw.columns:
        raise ThreecadError(f"manifest has no image_path (or image) column (columns: {', '.join(map(str, raw.columns))})",
                            path)
    text = {c: [_text(v) for v in raw[c]] if c in raw.columns else [""] * len(raw)
            for c in COLUMNS + POOL_COLUMNS if c not in _INT}
    labels, splits, defects = [], [], []
    for number in range(len(raw)):
        where = f"row {number + 2}"
        if text["image"][number] in ("", "."):
            raise ThreecadError(f"{where}: empty image_path", path)
        defect = text["defect"][number]
        label_text = _text(raw["label"].iloc[number]).lower() if "label" in raw.columns else ""
        label_text = label_text[:-2] if label_text.endswith(".0") else label_text
        if label_text:
            if label_text not in _LABEL_WORDS:
                raise ThreecadError(f"{where}: unknown label {label_text!r}; expected 0/1 or good/defect", path)
            label = _LABEL_WORDS[label_text]
        else:
            label = int(bool(text["mask"][number]) or defect not in ("", GOOD))
        if label == 1 and not text["mask"][number]:
            raise ThreecadError(f"{where}: defective image without a mask_path", path)
        split_text = text["split"][number].lower()
        split = _SPLIT_ALIASES.get(split_text) if split_text else "test"
        if split is None:
            raise ThreecadError(f"{where}: unknown split {split_text!r}; expected {', '.join(SPLITS)}", path)
        labels.append(label)
        splits.append(split)
        defects.append(defect or (GOOD if label == 0 else "defect"))
    text.update(split=splits, defect=defects)
    table = pd.DataFrame({c: text[c] for c in text if c in COLUMNS}, columns=[c for c in COLUMNS if c not in _INT])
    for column in _INT:
        if column == "label":
            values = pd.Series(labels, dtype="int64")
        elif column in raw.columns:
            cells = raw[column].map(lambda v: pd.NA if _text(v) == "" else v)
            try:
                values = pd.to_numeric(cells).astype("Int64")
            except (TypeError, ValueError):
                raise ThreecadError(f"manifest column {column} holds a value that is not a whole number", path) from None
        else:
            values = pd.Series([pd.NA] * len(raw), dtype="Int64")
        table[column] = values.astype("int64") if values.notna().all() else values
    for column in POOL_COLUMNS:
        if column in raw.columns:
            table[column] = text[column]
    return table[[*COLUMNS, *(c for c in POOL_COLUMNS if c in raw.columns)]]


def samples_from_manifest(
    path: str | Path, category: str | None = None, split: str | None = None, root: str | Path | None = None
) -> list[Sample]:
    """The rows of a manifest (:func:`read_manifest`) as samples, filtered by category and split.

    Relative paths are resolved against ``root``, by default the manifest's folder; a row without a
    category takes ``category``.
    """
    path = Path(path)
    table = read_manifest(path)
    base = Path(root) if root is not None else path.parent
    samples = []
    for row in table.to_dict("records"):
        row_category = row["category"] or (category or "")
        if (split is not None and row["split"] != split) or (category is not None and row_category != category):
            continue
        mask = base / row["mask"] if row["mask"] else None
        samples.append(Sample(base / row["image"], mask, int(row["label"]), row_category, row["defect"], row["split"]))
    return samples


def image_metadata(root: str | Path, path: str | Path | None = None) -> dict[str, dict]:
    """Per-image metadata (``defect_types``, ``source_path``, ``box``) keyed by path relative to ``root``.

    Read from the manifest ``path`` (any table :func:`read_manifest` takes), by default the root's
    own (:func:`find_manifest`). Images without metadata, or outside ``root``, are simply absent.
    """
    root = Path(root)
    if path is None:
        path = find_manifest(root)
        if path is None:
            return {}
    path = Path(path)
    if not path.is_file():
        raise ThreecadError("metadata file not found", path)
    meta: dict[str, dict] = {}
    for row in read_manifest(path).to_dict("records"):
        image = Path(row["image"])
        try:
            rel = (image if image.is_absolute() else path.parent / image).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            continue
        entry: dict = {}
        if row["defect_types"]:
            entry["defect_types"] = row["defect_types"].split(";")
        if row["source"]:
            entry["source_path"] = row["source"]
        box = [row[k] for k in ("x0", "y0", "x1", "y1")]
        if not any(pd.isna(v) for v in box):
            entry["box"] = [int(v) for v in box]
        meta[rel] = entry
    return meta
