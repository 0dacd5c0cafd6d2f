"""Safe file I/O: atomic writes, hashing and guarded image reads.

Every writer in the project goes through :func:`atomic_write` so that a killed process never
leaves a half-written file under its final name: data goes to a temporary sibling and is renamed
into place only once complete (``os.replace`` is atomic on POSIX file systems).

Permissions: ``mkstemp``/``mkdtemp`` create 0600 files and 0700 folders whatever the umask, and a
rename keeps that mode, so a dataset or a run written through them would be unreadable to every
other user. :func:`atomic_write` and :func:`staged_dir` therefore set the mode an ordinary
``open``/``mkdir`` would have given (``0o666``/``0o777`` minus :func:`current_umask`) before the
rename: the user's umask decides, as for any other tool.

Images: every read goes through :func:`open_image` (pixels) or :func:`image_header` (sizes), so
one rule holds everywhere:

* the EXIF orientation (tag 0x0112, values 2-8) is applied to sizes and pixels alike, because
  annotation tools (LabelMe) and viewers draw on the displayed, rotated view;
* images above :data:`MAX_IMAGE_PIXELS` are refused before decoding;
* a 16-bit image asked for in an 8-bit mode ('L', 'RGB') is scaled by bit depth,
  ``round(v * 255 / 65535)``, never clipped (:func:`to_uint8`); with no mode it stays 16-bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
from PIL import Image

from threecad.errors import ThreecadError

#: Images above this many pixels are refused before decoding (PIL's own guard is 89 M pixels
#: and only warns below twice that). 3CAD's raw line-scan frames are 4096 wide; 400 M pixels
#: leaves room for 4096 x 65536 scans while stopping decompression bombs.
MAX_IMAGE_PIXELS = 400_000_000
#: Most PNG chunks walked looking for an eXIf chunk after the image data (1,000,000): a real frame
#: of MAX_IMAGE_PIXELS in 8 KiB IDAT chunks has under 150,000; more means a hostile file.
MAX_PNG_CHUNKS = 1_000_000
#: Modes of a new file and a new folder before the umask is taken off (what ``open``/``mkdir`` use).
FILE_MODE, DIR_MODE = 0o666, 0o777

log = logging.getLogger(__name__)
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the system allows.

    Linux reports it in ``/proc/self/status`` (``Umask:``, since 4.7). Elsewhere the only way is
    ``os.umask`` set-and-restore; the lock keeps our own threads from interleaving two of those,
    and the value set meanwhile is 0o077, so a file another thread creates in that instant is
    too private rather than too open.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


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
        os.chmod(tmp, FILE_MODE & ~current_umask())  # mkstemp made it 0600
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
    tree. Callers check :func:`check_output_dir` first. The folder gets the umask's mode
    (mkdtemp makes it 0700); what is written inside through this module does too.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        os.chmod(tmp, DIR_MODE & ~current_umask())
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


#: EXIF orientation (tag 0x0112) -> the transpose that gives the displayed view.
ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: Stored modes with more than 8 bits per channel, and their bits.
WIDE_MODES = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}
#: Modes that :func:`read_image` fills from a 16-bit image by scaling, not by PIL's clipping convert.
EIGHT_BIT_MODES = ("L", "RGB")


class ImageHeader(NamedTuple):
    """What an image's header says: displayed size, stored PIL mode, bits per channel as stored."""

    width: int
    height: int
    mode: str
    bits: int


def _unreadable(path: Path, what: str, exc: BaseException) -> ThreecadError:
    return ThreecadError(f"unreadable {what} ({exc.__class__.__name__}: {exc})", path)


def _open(path: Path, what: str) -> Image.Image:
    """An opened (not decoded) image whose pixel count is within :data:`MAX_IMAGE_PIXELS`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with a clear error
            image = Image.open(path)
    except FileNotFoundError:
        raise ThreecadError(f"{what} file not found", path) from None
    except Exception as exc:  # PIL raises many types for corrupt files
        raise _unreadable(path, what, exc) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise ThreecadError(
            f"image of {width}x{height} pixels exceeds the {MAX_IMAGE_PIXELS:,}-pixel limit (decompression bomb?)",
            path,
        )
    return image


def _png_exif(path: Path) -> bytes | None:
    """The eXIf chunk of a PNG wherever it lies, found by skipping chunks (nothing is decoded).

    PIL only sees an eXIf chunk after the image data once it has decoded everything, and the PNG
    extension allows it there; LabelMe applies it. Walking the chunk headers finds it cheaply.
    """
    with open(path, "rb") as handle:
        if handle.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        for _ in range(MAX_PNG_CHUNKS):
            head = handle.read(8)
            if len(head) < 8:
                return None
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"eXIf":
                return handle.read(length)
            if kind == b"IEND":
                return None
            handle.seek(length + 4, os.SEEK_CUR)  # data and CRC
    raise ThreecadError(f"PNG with more than {MAX_PNG_CHUNKS:,} chunks refused (hostile file?)", path)


def exif_orientation(image: Image.Image, path: str | Path) -> int:
    """The EXIF orientation (1-8) of an opened, not yet decoded image; 1 when absent or invalid.

    Read from the header only: the base ``Image.getexif`` (the PNG plugin's own would decode the
    whole image), then, for a PNG, an eXIf chunk after the image data. A damaged EXIF block counts
    as no orientation, as in viewers. Sizes and pixels both come from this one function.
    """
    try:
        value = Image.Image.getexif(image).get(ORIENTATION_TAG)
        if value is None and image.format == "PNG":
            data = _png_exif(Path(path))
            if data:
                exif = Image.Exif()
                exif.load(data)
                value = exif.get(ORIENTATION_TAG)
    except ThreecadError:
        raise
    except Exception as exc:
        log.debug("%s: EXIF ignored (%s)", path, exc)
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _bits(image: Image.Image) -> int:
    """Bits per channel as stored: wide modes, else a 16-bit raw mode PIL reduces (RGB;16B)."""
    if image.mode in WIDE_MODES:
        return WIDE_MODES[image.mode]
    if image.mode == "1":
        return 1
    for tile in image.tile or ():
        args = tile.args
        raw = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else "")
        if isinstance(raw, str) and ";16" in raw:
            return 16
    return 8


#: Formats whose PIL reader applies the orientation itself on decoding (TIFF, since Pillow 6).
SELF_ORIENTING = frozenset({"TIFF"})


def _displayed_size(image: Image.Image, orientation: int) -> tuple[int, int]:
    """(width, height) after the orientation, from the stored size (the TIFF tags for TIFF,
    whose reader reports the turned size already in recent Pillow versions, not in older ones)."""
    width, height = image.size
    if image.format in SELF_ORIENTING:
        tags = getattr(image, "tag_v2", {})
        width, height = int(tags.get(256, width)), int(tags.get(257, height))
    return (height, width) if orientation >= 5 else (width, height)


def image_header(path: str | Path, what: str = "image") -> ImageHeader:
    """Displayed (width, height), mode and bit depth from the header only, with the bomb guard.

    For EXIF orientations 5-8 (a quarter turn) width and height are swapped, as displayed.
    """
    path = Path(path)
    image = _open(path, what)
    try:
        width, height = _displayed_size(image, exif_orientation(image, path))
        return ImageHeader(width, height, image.mode, _bits(image))
    finally:
        image.close()


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header only."""
    header = image_header(path)
    return header.width, header.height


@contextlib.contextmanager
def open_image(path: str | Path, what: str = "image") -> Iterator[Image.Image]:
    """The decoded image in its displayed orientation, mode as stored; closed on exit.

    ``what`` names the file in errors ("unreadable mask ..."). Refuses bombs and corrupt files,
    and an image that decodes to another size than :func:`image_header` promised (Pillow 13
    decodes TIFFs with orientations 5-8 to scrambled pixels of the stored size): a wrong
    orientation would put every mask on the wrong pixels, so it is an error, never a guess.
    """
    path = Path(path)
    image = _open(path, what)
    try:
        try:
            orientation = exif_orientation(image, path)
            expected = _displayed_size(image, orientation)
            image.load()
            turn = orientation != 1 and image.format not in SELF_ORIENTING
            shown = image.transpose(_TRANSPOSE[orientation]) if turn else image
        except ThreecadError:
            raise
        except Exception as exc:
            raise _unreadable(path, what, exc) from None
        if shown.size != expected:
            raise ThreecadError(
                f"decodes to {shown.size[0]}x{shown.size[1]} pixels, but its header with EXIF orientation "
                f"{orientation} says {expected[0]}x{expected[1]}; re-save it upright without the orientation tag",
                path,
            )
        yield shown
    finally:
        image.close()


def to_uint8(array: np.ndarray, source: str | Path | None = None) -> np.ndarray:
    """A 16-bit array (uint16, or int32 holding 0..65535) scaled to uint8 by bit depth.

    ``round(v * 255 / 65535)``, computed exactly as ``(v + 128) // 257`` (65535 = 255 * 257,
    and v / 257 is never a half): 0 -> 0, 65535 -> 255, nothing clipped. PIL's ``convert`` clips
    at 255 instead, which turns a 16-bit frame white. Other integer values (negative, or above
    65535) have no bit depth to scale by and are refused; uint8 comes back unchanged.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "ui":
        raise ThreecadError(f"cannot scale {array.dtype} pixels to 8 bits; only 16-bit images are", source)
    if array.dtype.itemsize > 2 and array.size and (int(array.min()) < 0 or int(array.max()) > 65535):
        raise ThreecadError(
            f"pixel values {int(array.min())}..{int(array.max())} exceed 16 bits; cannot scale them to 8 bits", source
        )
    wide = array.astype(np.uint32)
    wide += 128
    wide //= 257
    return wide.astype(np.uint8)


def read_image(path: str | Path, mode: str | None = None) -> np.ndarray:
    """Decode an image to a numpy array in its displayed (EXIF) orientation.

    ``mode`` None keeps the stored mode (16-bit stays uint16). 'L' or 'RGB' from a 16-bit image
    is scaled by bit depth (:func:`to_uint8`; gray replicated for RGB); every other conversion
    is PIL's ``convert``.
    """
    path = Path(path)
    with open_image(path) as image:
        if mode is None or image.mode == mode:
            return np.asarray(image)
        if mode in EIGHT_BIT_MODES and image.mode in WIDE_MODES and image.mode != "F":
            gray = to_uint8(np.asarray(image), path)
            return gray if mode == "L" else np.repeat(gray[..., None], 3, axis=2)
        try:
            return np.asarray(image.convert(mode))
        except Exception as exc:
            raise _unreadable(path, "image", exc) from None


Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
