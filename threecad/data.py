"""Dataset loaders for the 3CAD and MVTec layouts (PyTorch ``Dataset`` and a plain iterator).

Resizing is always explicit, because it changes what the metrics mean:

* ``"squash"``: the paper's anisotropic resize of every image to ``size x size`` (3CAD's official
  loader does this; aspect ratio is lost);
* ``"aspect"``: the longer side becomes ``size``, the aspect ratio is kept (images in a batch then
  differ in shape: use batch size 1 or a collate that pads);
* ``"native"``: no resizing at all.

Exposure is explicit too: ``exposure="mean"`` multiplies each image by ``EXPOSURE_TARGET / mean``
(:func:`normalize_exposure`). Line-scan cameras and strobes change the overall gain between frames
(the magnetic tile images come in six exposure series, mean grey levels 66 to 153 of 255); a frozen
ImageNet backbone sees such a gain as a different texture, so a memory bank or a student must cover
every gain separately. Dividing by the image mean removes the global gain and keeps local contrast,
which is what a defect changes. ``"raw"`` (the default) leaves pixels alone.

Images are returned as float32 RGB tensors in [0, 1] (grayscale replicated to three channels;
16-bit images scaled by bit depth, ``round(v * 255 / 65535)``, by :func:`threecad.io.read_image`);
normalisation belongs to the model, since backbones disagree on it. Masks are float32 {0, 1}.

A source is either a dataset folder in the layout of :mod:`threecad.layout` or a manifest table
(``.csv`` or ``.parquet``) with one row per image; :func:`tabular_frame` writes the table anomalib's
``Tabular`` dataset reads (``image_path, label_index, split, mask_path``), and the same table reads
back here, so a split made once is usable in both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image

from threecad.errors import ThreecadError
from threecad.io import atomic_write, open_image, read_image
from threecad.layout import GOOD, SPLITS, Sample, list_categories, list_samples

ResizeMode = Literal["squash", "aspect", "native"]
ExposureMode = Literal["raw", "mean"]
EXPOSURE_MODES = ("raw", "mean")
#: Mean intensity (of [0, 1]) that ``exposure="mean"`` gives every image.
EXPOSURE_TARGET = 0.45


def check_exposure(mode: str) -> str:
    """``mode`` if it is a known exposure mode, else a :class:`ThreecadError` listing them."""
    if mode not in EXPOSURE_MODES:
        raise ThreecadError(f"unknown exposure mode {mode!r}; expected one of {', '.join(EXPOSURE_MODES)}")
    return mode


def normalize_exposure(image: np.ndarray, mode: ExposureMode = "mean") -> np.ndarray:
    """``image`` (uint8 or float in [0, 1], any shape) scaled so its mean is :data:`EXPOSURE_TARGET`.

    Same dtype out, clipped to the valid range. An all-black image is left as it is. ``mode="raw"``
    returns the image unchanged.
    """
    if check_exposure(mode) == "raw":
        return image
    top = 255.0 if image.dtype == np.uint8 else 1.0
    mean = float(image.mean()) / top
    if mean <= 1e-6:
        return image
    scaled = image.astype(np.float32) * (EXPOSURE_TARGET / mean)
    if image.dtype == np.uint8:
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.clip(scaled, 0.0, 1.0).astype(image.dtype, copy=False)


def read_mask(path: str | Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as a bool (H, W) array, binarised robustly.

    Accepts 0/255 and 0/1 grayscale, anti-aliased masks (threshold at half the maximum value
    the file can hold, so 0/1 and 0/255 both work), mode '1' and palette images (foreground =
    any non-zero palette index). RGB masks are refused: they usually mean a wrong file.
    ``expected_size`` is (width, height) of the image the mask belongs to, as displayed: masks
    are read through :func:`threecad.io.open_image`, so an EXIF orientation turns them too.
    """
    path = Path(path)
    with open_image(path, "mask") as image:  # the image rule: bomb guard, EXIF orientation
        mode = image.mode
        array = np.asarray(image)
    if array.ndim == 3:
        if array.shape[2] == 2 or (array.shape[2] == 4 and mode == "LA"):
            array = array[..., 0]
        else:
            raise ThreecadError(f"mask must be single-channel, got mode {mode} with {array.shape[2]} channels", path)
    if mode in ("1", "P"):
        binary = array > 0
    else:
        top = float(array.max()) if array.size else 0.0
        # 0/1 masks hold 1 as foreground; 0..255 masks (possibly anti-aliased) use > 127.
        binary = array > (0 if top <= 1 else 127)
    if expected_size is not None and (binary.shape[1], binary.shape[0]) != tuple(expected_size):
        raise ThreecadError(
            f"mask size {binary.shape[1]}x{binary.shape[0]} differs from its image's {expected_size[0]}x{expected_size[1]}",
            path,
        )
    return binary


def target_size(width: int, height: int, size: int | None, resize: ResizeMode) -> tuple[int, int]:
    """(width, height) after resizing under the given mode."""
    if resize == "native" or size is None:
        return width, height
    if resize == "squash":
        return size, size
    if resize == "aspect":
        scale = size / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))
    raise ThreecadError(f"unknown resize mode {resize!r}; expected squash, aspect or native")


def load_sample(
    sample: Sample, size: int | None = 256, resize: ResizeMode = "squash", exposure: ExposureMode = "raw"
) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, mask bool HxW) of one sample, resized (bilinear / nearest), exposure applied."""
    image = read_image(sample.image_path, "RGB")
    height, width = image.shape[:2]
    if sample.label == 1:
        if sample.mask_path is None:
            raise ThreecadError("defective image without a mask path", sample.image_path)
        mask = read_mask(sample.mask_path, expected_size=(width, height))
    else:
        mask = np.zeros((height, width), dtype=bool)
    tw, th = target_size(width, height, size, resize)
    if (tw, th) != (width, height):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((tw, th), Image.NEAREST)) > 127
    return prepare_image(image, size, resize, exposure), mask


def prepare_image(
    image: np.ndarray, size: int | None = 256, resize: ResizeMode = "squash", exposure: ExposureMode = "raw"
) -> np.ndarray:
    """A uint8 RGB image (HxWx3) resized to :func:`target_size` (bilinear), then ``exposure`` applied.

    What every loaded image goes through (:func:`load_sample`), and what a saved method applies to
    the images handed to its ``predict`` (:mod:`threecad.methods`): one implementation of both.
    """
    height, width = image.shape[:2]
    tw, th = target_size(width, height, size, resize)
    if (tw, th) != (width, height):
        image = np.asarray(Image.fromarray(image).resize((tw, th), Image.BILINEAR))
    return normalize_exposure(image, exposure)


MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
#: Split names accepted in manifests, mapped to ours (anomalib writes ``val``).
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
                  "test": "test"}
_LABEL_WORDS = {"good": 0, "normal": 0, "ok": 0, "0": 0, "defect": 1, "defective": 1, "abnormal": 1,
                "anomalous": 1, "anomaly": 1, "ng": 1, "1": 1}


def is_manifest(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV or parquet table, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ThreecadError("manifest not found", path)
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except Exception as exc:
        raise ThreecadError(f"unreadable manifest ({exc.__class__.__name__}: {exc})", path) from None
    raise ThreecadError(f"unknown manifest format {path.suffix!r}; expected .csv or .parquet", path)


def _cell(row: dict, *names: str) -> str:
    for name in names:
        value = row.get(name)
        if value is not None and not (isinstance(value, float) and np.isnan(value)) and str(value) != "":
            return str(value)
    return ""


def samples_from_manifest(
    path: str | Path, category: str | None = None, split: str | None = None, root: str | Path | None = None
) -> list[Sample]:
    """The rows of a manifest table as samples, filtered by category and split.

    Columns: ``image_path`` (required); ``mask_path``; the label as ``label_index`` (0/1) or
    ``label`` (0/1 or good/defect/normal/abnormal); ``split`` (train, validation or val, test);
    ``category``; ``defect`` (or ``defect_type``). Relative paths are resolved against ``root``,
    by default the manifest's folder. A missing label is 1 when the row has a mask or a
    non-``good`` defect, a missing defect is ``good`` or ``defect`` by label. The columns ``image``
    and ``mask`` of the preprocess/split manifests (:mod:`threecad.manifest`) are read as
    ``image_path`` and ``mask_path``, so those manifests load as they are.
    """
    path = Path(path)
    table = read_table(path)
    if "image_path" not in table.columns and "image" not in table.columns:
        raise ThreecadError(f"manifest has no image_path (or image) column (columns: {', '.join(map(str, table.columns))})", path)
    base = Path(root) if root is not None else path.parent
    samples: list[Sample] = []
    for number, row in enumerate(table.to_dict("records"), start=2):
        image = Path(_cell(row, "image_path", "image"))
        if str(image) in ("", "."):
            raise ThreecadError(f"row {number}: empty image_path", path)
        mask_text = _cell(row, "mask_path", "mask")
        mask = (base / mask_text) if mask_text else None
        defect = _cell(row, "defect", "defect_type")
        label_text = _cell(row, "label_index", "label").lower()
        if label_text:
            if label_text.endswith(".0"):
                label_text = label_text[:-2]
            if label_text not in _LABEL_WORDS:
                raise ThreecadError(f"row {number}: unknown label {label_text!r}; expected 0/1 or good/defect", path)
            label = _LABEL_WORDS[label_text]
        else:
            label = int(mask is not None or (defect not in ("", GOOD)))
        defect = defect or (GOOD if label == 0 else "defect")
        split_text = _cell(row, "split").lower()
        row_split = _SPLIT_ALIASES.get(split_text) if split_text else "test"
        if row_split is None:
            raise ThreecadError(f"row {number}: unknown split {split_text!r}; expected train, validation or test", path)
        row_category = _cell(row, "category") or (category or "")
        if (split is not None and row_split != split) or (category is not None and row_category != category):
            continue
        if label == 1 and mask is None:
            raise ThreecadError(f"row {number}: defective image without a mask_path", path)
        samples.append(Sample(base / image, mask, label, row_category, defect, row_split))
    return samples


def collect_samples(source: str | Path, category: str | None, split: str | None = "test") -> list[Sample]:
    """Samples of a dataset folder or a manifest (chosen by what ``source`` is).

    For a folder, ``category=None`` means every category and ``split=None`` every split.
    """
    source = Path(source)
    if is_manifest(source):
        return samples_from_manifest(source, category, split)
    categories = [category] if category is not None else list_categories(source)
    splits = [split] if split is not None else list(SPLITS)
    return [s for c in categories for sp in splits for s in list_samples(source, c, sp)]


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


#: Files in a dataset root that carry per-image metadata, looked for in this order.
METADATA_FILES = ("manifest.parquet", "manifest.csv", "import_manifest.csv", "synth_dataset.json")


def image_metadata(root: str | Path, path: str | Path | None = None) -> dict[str, dict]:
    """Per-image metadata (``defect_types``, ``source_path``, ``box``) keyed by path relative to ``root``.

    Read from ``path`` (a table with ``image_path`` or ``image`` and any of ``defect_types``
    (';'-joined or a list), ``source_path`` or ``source``, ``x0, y0, x1, y1``; or a
    ``synth_dataset.json``), by default from the first of
    :data:`METADATA_FILES` found in ``root``. Images without metadata are simply absent.
    """
    root = Path(root)
    candidates = [Path(path)] if path is not None else [root / name for name in METADATA_FILES]
    meta: dict[str, dict] = {}
    for file in candidates:
        if not file.is_file():
            if path is not None:
                raise ThreecadError("metadata file not found", file)
            continue
        if file.suffix == ".json":
            try:
                data = json.loads(file.read_text())
            except ValueError as exc:
                raise ThreecadError(f"unreadable metadata JSON ({exc})", file) from None
            for category, rows in (data.get("test") or {}).items():
                for row in rows:
                    meta[f"{category}/{row['path']}"] = {"defect_types": list(row.get("defect_types") or [])}
        else:
            table = read_table(file)
            for row in table.to_dict("records"):
                image = Path(_cell(row, "image_path", "image"))
                if str(image) in ("", "."):
                    continue
                key = (image if image.is_absolute() else (file.parent / image)).resolve()
                try:
                    rel = key.relative_to(root.resolve()).as_posix()
                except ValueError:
                    continue
                entry: dict = {}
                types = row.get("defect_types")
                if isinstance(types, str) and types:
                    entry["defect_types"] = types.split(";")
                elif types is not None and not isinstance(types, (str, float)):
                    entry["defect_types"] = [str(t) for t in types]
                source = _cell(row, "source_path", "source")
                if source:
                    entry["source_path"] = source
                box = [_cell(row, k) for k in ("x0", "y0", "x1", "y1")]
                if all(box):
                    try:
                        entry["box"] = [int(float(b)) for b in box]
                    except ValueError:
                        raise ThreecadError(f"non-numeric box {box} for {image}", file) from None
                meta[rel] = entry
        if path is None:
            break
    return meta


def iter_samples(
    root: str | Path,
    category: str | None,
    split: str = "test",
    size: int | None = 256,
    resize: ResizeMode = "squash",
    exposure: ExposureMode = "raw",
) -> Iterator[dict]:
    """Plain-Python iteration: dicts with numpy ``image``, ``mask`` and the sample's metadata.

    ``root`` is a dataset folder or a manifest table (see :func:`samples_from_manifest`).
    """
    for sample in collect_samples(root, category, split):
        image, mask = load_sample(sample, size, resize, exposure)
        yield {
            "image": image,
            "mask": mask,
            "label": sample.label,
            "category": sample.category,
            "defect": sample.defect,
            "path": str(sample.image_path),
        }


class AnomalyDataset(torch.utils.data.Dataset):
    """One split of one category as a PyTorch dataset.

    ``root`` is a dataset folder or a manifest table (then ``category=None`` keeps every row).
    Items are dicts: ``image`` (3xHxW float32 in [0, 1]), ``mask`` (1xHxW float32 {0, 1}),
    ``label`` (int), ``category``, ``defect``, ``path`` (str).
    """

    def __init__(
        self,
        root: str | Path,
        category: str | None,
        split: str = "train",
        size: int | None = 256,
        resize: ResizeMode = "squash",
        samples: list[Sample] | None = None,
        exposure: ExposureMode = "raw",
    ):
        self.exposure = check_exposure(exposure)
        self.root = Path(root)
        self.category = category
        self.split = split
        self.size = size
        self.resize = resize
        self.samples = samples if samples is not None else collect_samples(root, category, split)
        if not self.samples:
            where = self.root if category is None or is_manifest(self.root) else self.root / category
            raise ThreecadError(f"no images in split {split!r} of category {category!r}", where)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image, mask = load_sample(sample, self.size, self.resize, self.exposure)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "label": sample.label,
            "category": sample.category,
            "defect": sample.defect,
            "path": str(sample.image_path),
        }
