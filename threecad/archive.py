"""The one archive extractor: dataset downloads and leaderboard submissions both unpack here.

Why one function: two extractors with different rules meant the weaker one decided what an
attacker could do (a tar chain of symbolic links escaped the dataset folder through tarfile's own
``filter="data"``, whose path check gives up past PATH_MAX on Python 3.11). The rules, for every
zip and tar (plain, gz, bz2, xz; detected from the content, not the name):

- names go through :func:`threecad.paths.unsafe_reason` (absolute, ``..``, backslash, empty or
  ``.`` parts, NUL); tar's leading ``./`` (``tar -C dir .``) is dropped first;
- no links at all (symbolic or hard, zip mode bits ``S_IFLNK`` included), no devices, fifos or
  other special members: datasets and submissions are regular files and folders;
- no member twice; encrypted zip members refused;
- every output path is resolved on disk with :func:`threecad.paths.inside` and opened with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` in a fresh folder, so nothing already there is followed or
  overwritten;
- real bytes written are counted, never headers: the total is capped by ``Limits.max_bytes`` and
  by the free disk space at the target; the ratio of bytes written to compressed bytes read is
  checked for the whole archive and for each member once past ``Limits.ratio_floor`` (8 MiB by
  default: tiny archives of small files are never refused), and extraction stops the moment it
  passes ``Limits.max_ratio`` (1000:1). The compressed position is the ``tell()`` of the archive
  file opened here and handed to zipfile/tarfile as ``fileobj``, so it is right whatever the
  compression (a bzip2 stream under a ``.tar.gz`` name included).

Any refusal raises ``error`` (a :class:`ThreecadError` subclass chosen by the caller) naming the
archive and the member; the caller owns the target folder and deletes it (``staged_dir`` for
downloads, the temporary folder for submissions), so a refused archive leaves nothing behind.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from threecad.errors import ThreecadError, shorten
from threecad.paths import check_component, inside, unsafe_reason
from threecad.progress import progress

#: Bytes copied per read; also the granularity of the running limit checks (1 MiB).
CHUNK = 1 << 20
#: Above this many bytes written (8 MiB) the compression ratio is checked, per member and overall.
RATIO_FLOOR = 8 * 2**20
#: Written / compressed bytes allowed (1000:1); images and maps barely compress, bombs do.
MAX_RATIO = 1000.0
#: Name endings that make a file an archive, longest first, and the kind each one names.
ARCHIVE_SUFFIXES = (
    (".tar.gz", "tar"), (".tar.bz2", "tar"), (".tar.xz", "tar"), (".tgz", "tar"), (".tbz2", "tar"),
    (".txz", "tar"), (".tar", "tar"), (".zip", "zip"),
)
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
#: What a corrupt member (or a full disk) raises from zipfile, tarfile and the decompressors.
_CORRUPT = (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, NotImplementedError)


@dataclass(frozen=True)
class Limits:
    """Bounds on what one archive may unpack to (the defaults suit a dataset download).

    ``max_files``: members (files and folders, 2,000,000); ``max_bytes``: bytes written (200 GiB;
    3CAD is far smaller, a bomb is not); ``max_ratio``/``ratio_floor``: see the module docstring.
    """

    max_files: int = 2_000_000
    max_bytes: int = 200 * 2**30
    max_ratio: float = MAX_RATIO
    ratio_floor: int = RATIO_FLOOR


@dataclass(frozen=True)
class Extracted:
    """What one extraction wrote: member count and real bytes (for logs and tests)."""

    members: int
    bytes_written: int


def split_suffix(name: str) -> tuple[str, str] | None:
    """(stem, kind) for an archive file name by its ending (case-insensitive), or None."""
    lower = name.lower()
    for suffix, kind in ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: len(name) - len(suffix)], kind
    return None


def archive_kind(path: str | Path) -> str | None:
    """'zip' or 'tar' from a file name's ending, or None (the content decides at extraction)."""
    found = split_suffix(Path(path).name)
    return found[1] if found else None


def archive_stem(filename: str, source: str | Path | None = None) -> str:
    """The folder name an archive extracts to: its name without the archive ending.

    Derived once and validated with :func:`threecad.paths.check_component`: ``...zip``,
    ``.tar.gz`` and ``..tar.gz`` would give ``..``, ``""`` and ``.``, and a folder named like that
    is the destination itself or its parent (which ``--overwrite`` would then delete). ``source``
    (a path or URL, as text: a URL is no path) starts the message.
    """
    suffixes = ", ".join(s for s, _ in ARCHIVE_SUFFIXES)
    try:
        check_component(filename, "archive file name")
        found = split_suffix(filename)
        if found is None:
            raise ThreecadError(f"archive file name {filename!r} does not end in an archive suffix")
        return check_component(found[0], f"folder name derived from archive file name {filename!r}")
    except ThreecadError as exc:
        where = f"{source}: " if source is not None else ""
        raise ThreecadError(f"{where}{exc}; rename the archive to a plain name ending in one of {suffixes} "
                            f"(e.g. 3CAD.zip; for a URL, download it yourself and pass the renamed file)") from None


def _one_line(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {' '.join(str(exc).split())}"


class _Meter:
    """Real bytes written against the limits, checked after every read, before the chunk is written.

    ``sequential``: a tar is read front to back, so the raw file position is the compressed bytes
    consumed so far. A zip's members are read where their headers point, so the bytes read inside
    each member are summed (capped at the file size, so members overlapping the same compressed
    data cannot dilute the ratio).
    """

    def __init__(self, archive: Path, raw: BinaryIO, limits: Limits, dest: Path, error: type[ThreecadError],
                 sequential: bool):
        self.archive, self.raw, self.limits, self.error, self.sequential = archive, raw, limits, error, sequential
        self.size = max(1, os.fstat(raw.fileno()).st_size)
        free = shutil.disk_usage(dest).free
        self.cap = min(limits.max_bytes, free)
        self.cap_text = (f"the limit of {limits.max_bytes:,} bytes" if limits.max_bytes <= free
                         else f"the {free:,} bytes free on the disk at {dest}")
        self.written = self.members = self.base = self.mark = self.member_written = 0
        self.name = ""

    def count(self, name: str) -> None:
        self.members += 1
        if self.members > self.limits.max_files:
            raise self.error(f"member {name!r} is over the limit of {self.limits.max_files:,} members", self.archive)

    def begin(self, name: str) -> None:
        self.name, self.mark, self.member_written = name, self.raw.tell(), 0

    def end(self) -> None:
        if not self.sequential:
            self.base += max(0, self.raw.tell() - self.mark)

    def add(self, n: int) -> None:
        self.written += n
        self.member_written += n
        here = self.raw.tell()
        member_packed = max(0, here - self.mark)
        total_packed = here if self.sequential else self.base + member_packed
        self.check(self.written, min(total_packed, self.size), self.member_written, member_packed)

    def _over(self, written: int, packed: int) -> bool:
        return written > self.limits.ratio_floor and written > self.limits.max_ratio * max(1, packed)

    def check(self, written: int, packed: int, member_written: int = 0, member_packed: int = 0) -> None:
        """Refuse past the size cap or the ratio (also called once with a zip's declared sizes)."""
        at = f" at member {self.name!r}" if self.name else ""
        ratio = f"{self.limits.max_ratio:.0f}:1"
        if written > self.cap:
            raise self.error(f"archive expands beyond {self.cap_text}{at}", self.archive)
        if self._over(written, packed):
            raise self.error(f"archive expands over {ratio} ({written:,} bytes written from {packed:,} compressed "
                             f"bytes read; decompression bomb?){at}", self.archive)
        if self._over(member_written, member_packed):
            raise self.error(f"member {self.name!r} expands over {ratio} ({member_written:,} bytes from "
                             f"{member_packed:,} compressed; decompression bomb?)", self.archive)


class _Writer:
    """Vets member names and creates folders and files below a fresh ``root``."""

    def __init__(self, archive: Path, root: Path, error: type[ThreecadError]):
        self.archive, self.root, self.error = archive, root, error
        self.seen: set[str] = set()
        self.current = ""

    def vet(self, name: str, is_dir: bool, link: str | None = None, special: str | None = None) -> str | None:
        """The safe relative name of a member, or None for the archive's own root entry (``.``, ``./``)."""
        self.current = name
        rel = name
        while rel.startswith("./"):
            rel = rel[2:]  # tar -C dir . writes ./a/b
        root_entry = bool(name) and rel in ("", ".")
        why = None if root_entry else unsafe_reason(rel)
        if why:
            raise self.error(f"member {name!r} is refused: {why}", self.archive)
        if link is not None:
            raise self.error(f"member {shorten(repr(name), 120)} is a link ({shorten(link, 120)}); links are not "
                             "allowed in an archive", self.archive)
        if special is not None:
            raise self.error(f"member {name!r} is a device or special file ({special}); only regular files and "
                             f"folders are allowed", self.archive)
        if root_entry:
            if is_dir:
                return None
            raise self.error(f"member {name!r} is refused: a file cannot be the archive's root", self.archive)
        key = rel.rstrip("/")
        if key in self.seen:
            raise self.error(f"member {name!r} appears twice; refusing an ambiguous archive", self.archive)
        self.seen.add(key)
        return key

    def _resolved(self, rel: str, name: str) -> Path:
        path = self.root / rel
        try:
            inside(self.root, path)
        except ThreecadError as exc:
            raise self.error(f"member {name!r}: {exc}", self.archive) from None
        return path

    def folder(self, rel: str, name: str) -> None:
        self._resolved(rel, name).mkdir(parents=True, exist_ok=True)
        self._resolved(rel, name)  # what was just made is a real folder below root, not a link

    def file(self, rel: str, name: str, src: IO[bytes], meter: _Meter) -> None:
        path = self._resolved(rel, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._resolved(rel, name)
        try:
            fd = os.open(path, _OPEN_FLAGS, 0o666)  # never follows or reuses what is already there
        except FileExistsError:
            raise self.error(f"member {name!r} collides with a file or folder already extracted", self.archive) from None
        meter.begin(name)
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                meter.add(len(chunk))  # raises before the chunk is written
                out.write(chunk)
        meter.end()


def _zip_special(mode: int) -> str | None:
    """Why a zip member's Unix mode bits are not a regular file or folder, or None."""
    kind = stat.S_IFMT(mode)
    if not kind or stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None  # 0: no Unix type bits (zip tools on other systems)
    return {stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket"}.get(kind, f"file type {kind:o}")


def _extract_zip(zf: zipfile.ZipFile, writer: _Writer, meter: _Meter) -> None:
    infos = zf.infolist()
    plan = []
    for info in infos:  # every member vetted before anything is written
        mode = info.external_attr >> 16
        link = "symbolic link" if stat.S_ISLNK(mode) else None
        rel = writer.vet(info.filename, info.is_dir(), link=link, special=_zip_special(mode))
        if info.flag_bits & 0x1:
            raise writer.error(f"member {info.filename!r} is encrypted; use an unencrypted archive", writer.archive)
        meter.count(info.filename)
        if rel is not None:
            plan.append((rel, info))
    # Headers may lie, so this only refuses early; the running count while writing is the real check.
    meter.check(sum(i.file_size for i in infos), min(meter.size, sum(i.compress_size for i in infos)))
    for rel, info in progress(plan, desc="extract"):
        writer.current = info.filename
        if info.is_dir():
            writer.folder(rel, info.filename)
            continue
        with zf.open(info) as src:
            writer.file(rel, info.filename, src, meter)


def _extract_tar(tf: tarfile.TarFile, writer: _Writer, meter: _Meter) -> None:
    for member in progress(tf, desc="extract"):  # streamed: every limit applies as it goes
        link = special = None
        if member.issym():
            link = f"symbolic link to {member.linkname!r}"
        elif member.islnk():
            link = f"hard link to {member.linkname!r}"
        elif not (member.isreg() or member.isdir()):
            special = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                       tarfile.FIFOTYPE: "fifo"}.get(member.type, f"tar type {member.type!r}")
        rel = writer.vet(member.name, member.isdir(), link=link, special=special)
        meter.count(member.name)
        if rel is None:
            continue
        if member.isdir():
            writer.folder(rel, member.name)
            continue
        src = tf.extractfile(member)
        if src is None:
            raise writer.error(f"member {member.name!r} is unreadable", writer.archive)
        with src:
            writer.file(rel, member.name, src, meter)


def extract(archive: str | Path, dest: str | Path, limits: Limits = Limits(),
            error: type[ThreecadError] = ThreecadError) -> Extracted:
    """Unpack a zip or tar ``archive`` into ``dest``, an existing EMPTY folder, under the rules above.

    On a refusal or a corrupt member ``error`` is raised and what was written so far stays in
    ``dest``: the caller made ``dest`` for this call and removes it, which is what makes the whole
    operation all or nothing (``threecad.io.staged_dir`` does that for a download).
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise error("archive not found (or not a file)", archive)
    if dest.is_symlink() or not dest.is_dir() or any(dest.iterdir()):
        raise ThreecadError("extraction folder must be an existing empty folder (not a link)", dest)
    writer = _Writer(archive, dest, error)
    try:
        with open(archive, "rb") as raw:
            is_zip = zipfile.is_zipfile(raw)
            raw.seek(0)
            meter = _Meter(archive, raw, limits, dest, error, sequential=not is_zip)
            if is_zip:
                with zipfile.ZipFile(raw) as zf:
                    _extract_zip(zf, writer, meter)
            else:
                try:
                    tf = tarfile.open(fileobj=raw, mode="r:*")  # the raw file stays ours: tell() = bytes read
                except tarfile.ReadError:
                    raise error("not a zip or tar archive (zip, tar, tar.gz, tar.bz2 and tar.xz are supported; "
                                "extract other formats yourself)", archive) from None
                with tf:
                    _extract_tar(tf, writer, meter)
    except _CORRUPT as exc:
        at = f" at member {writer.current!r}" if writer.current else ""
        raise error(f"corrupt archive or unwritable target{at} ({_one_line(exc)}); nothing extracted",
                    archive) from None
    return Extracted(meter.members, meter.written)
