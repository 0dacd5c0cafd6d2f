"""Safe file I/O: atomic writes, hashing and guarded image reads.

Every writer in the project goes through :func:`atomic_write` so that a killed process never
leaves a half-written file under its final name: data goes to a temporary sibling and is renamed
into place only once complete (``os.replace`` is atomic on POSIX file systems).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from threecad.errors import ThreecadError

#: Images above this many pixels are refused before decoding (PIL's own guard is 89 M pixels
#: and only warns below twice that). 3CAD's raw line-scan frames are 4096 wide; 400 M pixels
#: leaves room for 4096 x 65536 scans while stopping decompression bombs.
MAX_IMAGE_PIXELS = 400_000_000


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; rename it to ``path`` only on success.

    No fsync: the guarantee is against a killed process (the file is complete or absent), which
    is what resumable jobs need; syncing every small PNG would cost more than the work itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_dir(out: str | Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty output folder unless the user said ``--overwrite``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ThreecadError("output folder is not empty; pass --overwrite to replace it", out)


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Build a whole output folder in a hidden sibling; swap it in for ``out`` only on success.

    A killed or failing job leaves the previous ``out`` (or nothing) behind, never a half-built
    tree. Callers check :func:`check_output_dir` first.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Deterministic JSON (sorted keys) written atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n")


def save_image(path: str | Path, array: np.ndarray, **params: Any) -> None:
    """Write a uint8 image (PNG/JPEG by suffix) atomically; PNG without timestamps, so bytes are reproducible."""
    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}.get(
        path.suffix.lower()
    )
    if fmt is None:
        raise ThreecadError(f"unsupported image suffix {path.suffix!r}", path)
    image = Image.fromarray(np.ascontiguousarray(array))
    if fmt == "PNG":
        params.setdefault("compress_level", 1)  # noisy textures: level 1 is ~5x faster, ~10 % larger
    with atomic_write(path, "wb") as handle:
        image.save(handle, format=fmt, **params)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header only, with the decompression-bomb guard."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with a clear error
            with Image.open(path) as image:
                width, height = image.size
    except FileNotFoundError:
        raise ThreecadError("file not found", path) from None
    except Exception as exc:  # PIL raises many types for corrupt files
        raise ThreecadError(f"unreadable image ({exc.__class__.__name__}: {exc})", path) from None
    if width * height > MAX_IMAGE_PIXELS:
        raise ThreecadError(
            f"image of {width}x{height} pixels exceeds the {MAX_IMAGE_PIXELS:,}-pixel limit (decompression bomb?)",
            path,
        )
    return width, height


def read_image(path: str | Path, mode: str | None = None) -> np.ndarray:
    """Decode an image to a numpy array (``mode`` e.g. 'RGB' or 'L'), refusing bombs and corrupt files."""
    path = Path(path)
    image_size(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                if mode is not None and image.mode != mode:
                    image = image.convert(mode)
                return np.asarray(image)
    except ThreecadError:
        raise
    except Exception as exc:
        raise ThreecadError(f"unreadable image ({exc.__class__.__name__}: {exc})", path) from None


Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
