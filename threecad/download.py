"""``3cad data download``: fetch an archive, check it, extract it safely, then verify the dataset.

A 3CAD archive is several gigabytes on Google Drive, and connections drop. The transfer writes to
``<archive>.part`` and resumes from its size with an HTTP ``Range`` request, both within one run
(``retries``) and across runs; servers that ignore ``Range`` are detected (status 200 instead of
206) and the transfer restarts cleanly instead of appending a second copy.

Nothing is extracted before the whole archive is checked: the sha256 when one is known (the
catalogue has none: the authors published none, so the computed digest is printed and saved next
to the archive for pinning), then every member name. Absolute paths, ``..`` components, links
that leave the target, device files and oversized or over-compressed members refuse the whole
archive. Extraction goes to a temporary sibling folder that is renamed into place only when
complete, so an interrupted run never leaves a half-extracted dataset that looks finished.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from threecad.catalog import SOURCES
from threecad.errors import ThreecadError
from threecad.io import sha256_file, write_text
from threecad.layout import list_categories
from threecad.progress import progress
from threecad.verify import Expect, VerifyReport, verify_dataset

log = logging.getLogger(__name__)

#: Refuse archives that would unpack to more than this (3CAD is far smaller; a bomb is not).
MAX_TOTAL_BYTES = 200 * 1024**3
MAX_MEMBERS = 2_000_000
#: Refuse a member compressed more than this many times (images barely compress; bombs do).
MAX_RATIO = 1000
_CHUNK = 1 << 20


@dataclass
class DownloadResult:
    archive: Path
    dataset_root: Path
    sha256: str
    report: VerifyReport | None


def _drive_direct(url: str) -> str:
    """A Google Drive viewer link turned into the direct-download endpoint (large files included)."""
    match = re.search(r"drive\.google\.com/(?:file/d/|open\?id=|uc\?.*id=)([\w-]+)", url)
    if not match:
        return url
    return f"https://drive.usercontent.google.com/download?id={match.group(1)}&export=download&confirm=t"


def resolve_source(source: str) -> tuple[str, str, str | None, bool]:
    """(url or local path, archive file name, known sha256, from the catalogue?) for a source argument."""
    if source in SOURCES:
        entry = SOURCES[source]
        return _drive_direct(entry.url), entry.filename, entry.sha256, True
    if re.match(r"^https?://", source):
        name = PurePosixPath(urllib.request.urlparse(source).path).name or "archive"
        if "drive.google.com" in source:
            name = "archive.zip"
        return _drive_direct(source), name, None, False
    if "://" in source:
        raise ThreecadError(f"unsupported URL scheme in {source!r}; use http(s), a local path or one of: {', '.join(SOURCES)}")
    path = Path(source)
    if not path.is_file():
        raise ThreecadError(f"not a file, an http(s) URL or a catalogue name ({', '.join(SOURCES)})", path)
    return str(path), path.name, None, False


def fetch(url: str, dest: str | Path, sha256: str | None = None, retries: int = 5, timeout: float = 60.0,
          backoff: float = 2.0) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part``; checks ``sha256`` when given.

    A completed ``dest`` is reused (after its checksum, when one is known). A checksum mismatch
    deletes the download, so the next run starts afresh, and raises.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if dest.is_file():
        log.info("%s already downloaded", dest)
    else:
        attempt = 0
        while True:
            try:
                if _transfer(url, part, timeout):
                    break
                reason = "the server closed the connection early"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                if isinstance(exc, urllib.error.HTTPError) and exc.code not in (408, 429, 500, 502, 503, 504):
                    raise ThreecadError(f"HTTP {exc.code} {exc.reason} from {url}") from None
                reason = f"{exc.__class__.__name__}: {exc}"
            attempt += 1
            have = part.stat().st_size if part.exists() else 0
            if attempt > retries:
                raise ThreecadError(
                    f"download interrupted at {have:,} bytes after {retries} retries ({reason}); "
                    "run the same command again to resume",
                    part,
                )
            log.warning("download interrupted at %s bytes (%s); resuming (retry %d/%d)", f"{have:,}", reason, attempt, retries)
            time.sleep(backoff * attempt)
        os.replace(part, dest)
    _check_sha256(dest, sha256, delete=True)
    return dest


def _transfer(url: str, part: Path, timeout: float) -> bool:
    """One request, appending to ``part``; True when the file is complete."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "threecad"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - scheme checked by resolve_source
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the part may be complete
            total = re.search(r"/(\d+)", exc.headers.get("Content-Range", "") or "")
            if total and int(total.group(1)) == offset:
                return True
            log.warning("server refused to resume at %d bytes; starting over", offset)
            part.unlink()
            return False
        raise
    with response:
        kind = response.headers.get("Content-Type", "")
        if kind.startswith("text/html"):
            raise ThreecadError(
                f"{url} answered with a web page, not an archive (Google Drive does this for quota or "
                "sign-in pages); download the archive in a browser and run `3cad data download PATH`"
            )
        mode = "ab"
        if offset and response.status == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != offset:
                raise ThreecadError(f"server resumed at the wrong offset ({response.headers.get('Content-Range')})", part)
        elif offset:
            log.warning("server ignored the Range request; downloading from the start")
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        bar = progress(None, desc=part.name.removesuffix(".part"), total=total, initial=offset, unit="B",
                       unit_scale=True, unit_divisor=1024)
        try:
            with open(part, mode) as handle:
                while block := response.read(_CHUNK):
                    handle.write(block)
                    bar.update(len(block))
        finally:
            bar.close()
    return total is None or part.stat().st_size == total


def _check_sha256(path: Path, expected: str | None, delete: bool) -> str:
    digest = sha256_file(path)
    if expected is not None and digest.lower() != expected.lower():
        if delete:
            path.unlink()
        what = "deleted it; run again to download it anew" if delete else "the file was left as it is"
        raise ThreecadError(f"sha256 mismatch: expected {expected.lower()}, got {digest} (corrupt or different file; {what})", path)
    return digest


def _check_name(name: str, archive: Path) -> PurePosixPath:
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or re.match(r"^[A-Za-z]:", normalised) or "\x00" in normalised:
        raise ThreecadError(f"archive member {name!r} has an absolute path; refusing to extract", archive)
    path = PurePosixPath(normalised)
    if ".." in path.parts:
        raise ThreecadError(f"archive member {name!r} leaves the target folder ('..'); refusing to extract", archive)
    return path


def _check_size(name: str, size: int, packed: int | None, totals: list[int], archive: Path, max_total: int) -> None:
    totals[0] += size
    totals[1] += 1
    if totals[0] > max_total:
        raise ThreecadError(
            f"archive unpacks to more than {max_total:,} bytes (the size limit or the free disk space); refusing to extract",
            archive,
        )
    if totals[1] > MAX_MEMBERS:
        raise ThreecadError(f"archive has more than {MAX_MEMBERS:,} members; refusing to extract", archive)
    if packed and size > _CHUNK and size / packed > MAX_RATIO:
        raise ThreecadError(f"archive member {name!r} is compressed {size // packed}x (a zip bomb?); refusing", archive)


def check_archive(archive: str | Path, max_total: int = MAX_TOTAL_BYTES, free: int | None = None) -> str:
    """Check every member of a zip or tar archive before anything is written; returns 'zip' or 'tar'.

    ``free`` (bytes available at the target) lowers the size limit, so a full disk is reported
    before extraction instead of half-way through it.
    """
    archive = Path(archive)
    if free is not None and free < max_total:
        max_total = free
    totals = [0, 0]
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_name(info.filename, archive)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ThreecadError(f"archive member {info.filename!r} is a symbolic link; refusing to extract", archive)
                _check_size(info.filename, info.file_size, info.compress_size, totals, archive, max_total)
        return "zip"
    try:
        is_tar = tarfile.is_tarfile(archive)
    except OSError:
        is_tar = False
    if not is_tar:
        raise ThreecadError("not a zip or tar archive (other formats: extract it yourself, then `3cad data verify`)", archive)
    try:
        with tarfile.open(archive) as tf:
            for member in tf:
                path = _check_name(member.name, archive)
                if member.issym() or member.islnk():
                    link = member.linkname.replace("\\", "/")
                    base = path.parent if member.issym() else PurePosixPath()
                    resolved = os.path.normpath(str(base / link)) if not link.startswith("/") else "/"
                    if resolved == "/" or resolved.startswith("..") or re.match(r"^[A-Za-z]:", link):
                        raise ThreecadError(
                            f"archive member {member.name!r} links outside the target ({member.linkname!r}); refusing",
                            archive,
                        )
                elif not (member.isfile() or member.isdir()):
                    raise ThreecadError(f"archive member {member.name!r} is a device or fifo; refusing to extract", archive)
                _check_size(member.name, member.size, None, totals, archive, max_total)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ThreecadError(f"corrupt tar archive ({exc})", archive) from None
    return "tar"


def extract_archive(archive: str | Path, target: str | Path, max_total: int = MAX_TOTAL_BYTES) -> Path:
    """Safely extract ``archive`` into ``target`` (which must not exist yet), all or nothing."""
    archive, target = Path(archive), Path(target)
    if target.exists():
        raise ThreecadError("extraction target already exists", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    kind = check_archive(archive, max_total, free=shutil.disk_usage(target.parent).free)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for info in progress(zf.infolist(), desc="extract"):
                    zf.extract(info, tmp)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")  # the library's own guard, behind our check
        os.replace(tmp, target)
    except ThreecadError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ThreecadError(f"corrupt archive, nothing extracted ({exc.__class__.__name__}: {exc})", archive) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def find_dataset_root(folder: str | Path, depth: int = 3) -> Path:
    """The folder holding the category folders (archives often wrap the dataset in one top folder)."""
    folder = Path(folder)
    level = [folder]
    for _ in range(depth + 1):
        for candidate in level:
            try:
                list_categories(candidate)
                return candidate
            except ThreecadError:
                pass
        level = [p for d in level for p in sorted(d.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    raise ThreecadError("no dataset in the extracted archive (no <Category>/train or test folders)", folder)


def download_dataset(
    source: str,
    dest: str | Path = "data",
    sha256: str | None = None,
    verify: bool = True,
    expect: Expect | None = None,
    retries: int = 5,
    overwrite: bool = False,
    backoff: float = 2.0,
) -> DownloadResult:
    """Download (or take a local) archive, check it, extract it to ``dest/<archive stem>``, verify it.

    ``source`` is a catalogue name (``3cad``, ``3cad-pinyin``), an http(s) URL or a local archive.
    ``expect`` defaults to ``full`` for catalogue sources and ``auto`` otherwise. The verify report
    is written next to the archive as ``<stem>.verify.json``.
    """
    location, filename, known_sha, from_catalogue = resolve_source(source)
    sha256 = sha256 or known_sha
    dest = Path(dest)
    if re.match(r"^https?://", location):
        archive = fetch(location, dest / filename, retries=retries, backoff=backoff)
        digest = _check_sha256(archive, sha256, delete=True)  # hashed once, here
    else:
        archive = Path(location)
        digest = _check_sha256(archive, sha256, delete=False)
    if sha256 is None:
        log.info("sha256 %s (no published checksum; pass --sha256 %s to pin this copy)", digest, digest)
    write_text(dest / f"{filename}.sha256", f"{digest}  {filename}\n")
    stem = filename
    for suffix in (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".tar"):
        stem = stem.removesuffix(suffix)
    target = dest / stem
    if target.exists() and overwrite:
        check_archive(archive)  # never delete a good tree for an archive that cannot replace it
        shutil.rmtree(target)
    if target.exists():
        log.info("%s already extracted (pass --overwrite to extract again)", target)
    else:
        extract_archive(archive, target)
    root = find_dataset_root(target)
    report = None
    if verify:
        report = verify_dataset(root, expect=expect or ("full" if from_catalogue else "auto"),
                                report_path=dest / f"{stem}.verify.json")
    return DownloadResult(archive, root, digest, report)
