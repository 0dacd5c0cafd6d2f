"""``3cad data download``: fetch an archive, check it, extract it safely, then verify the dataset.

A 3CAD archive is several gigabytes on Google Drive, and connections drop. The transfer writes to
``<archive>.part`` and resumes from its size with an HTTP ``Range`` request, both within one run
(``retries``) and across runs; servers that ignore ``Range`` are detected (status 200 instead of
206) and the transfer restarts cleanly instead of appending a second copy.

A transfer is complete only when ``.part`` reaches the length the server announced: the
``Content-Length`` of a 200, the total in the ``Content-Range`` of a 206 (or a 416 whose
``bytes */N`` equals what we have). A server that announces no length cannot prove the file is
whole: ``.part`` is kept and resumed; when no attempt ends with a known length the run fails with
"length unknown" (unless ``--sha256`` was given and the ``.part`` matches it). Only a complete
transfer becomes ``<archive>`` and gets its ``.sha256``.

The archive's sha256 is checked when known (the catalogue has none: the authors published none, so
the computed digest is printed and saved next to the archive for pinning). The folder it unpacks to
is ``<dest>/<archive name without its suffix>``, a name validated once (no ``..``, ``.``, empty,
hidden or separator-bearing names). Extraction is :func:`threecad.archive.extract` (no links, no
special files, every path proven inside the target, real bytes and compression ratio counted) into
a hidden sibling folder renamed into place only when complete, so an interrupted or refused run
never leaves a half-extracted dataset that looks finished, and ``--overwrite`` keeps the old tree
until the new one is whole.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from threecad.archive import Limits, archive_stem, extract
from threecad.dataset.catalog import SOURCES
from threecad.dataset.layout import list_categories
from threecad.dataset.verify import Expect, VerifyReport, verify_dataset
from threecad.errors import ThreecadError
from threecad.io import sha256_file, staged_dir, write_text
from threecad.progress import progress

log = logging.getLogger(__name__)

#: Bytes read from the network per call (1 MiB).
_CHUNK = 1 << 20
#: Why ``_transfer`` could not call a transfer complete when the server announced no length.
LENGTH_UNKNOWN = "length unknown (the server announced no Content-Length or Content-Range total)"


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
    """(url or local path, archive file name, known sha256, from the catalogue?) for a source argument.

    The file name is not checked here: :func:`threecad.archive.archive_stem` does that for every
    source (a URL path of ``/..`` or ``/`` names the destination's parent or nothing).
    """
    if source in SOURCES:
        entry = SOURCES[source]
        return _drive_direct(entry.url), entry.filename, entry.sha256, True
    if re.match(r"^https?://", source):
        name = PurePosixPath(urllib.request.urlparse(source).path).name  # checked by archive_stem
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

    A completed ``dest`` is reused (after its checksum, when one is known). ``dest.part`` becomes
    ``dest`` only when complete (see the module docstring); otherwise it is kept for the next run.
    A checksum mismatch deletes the download, so the next run starts afresh, and raises.
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
                reason = _transfer(url, part, timeout)
                if reason is None:
                    break
                if reason == LENGTH_UNKNOWN and sha256 and sha256_file(part) == sha256.lower():
                    log.info("%s: no length announced, but the sha256 matches: complete", part)
                    break
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                if isinstance(exc, urllib.error.HTTPError) and exc.code not in (408, 429, 500, 502, 503, 504):
                    raise ThreecadError(f"HTTP {exc.code} {exc.reason} from {url}") from None
                reason = f"{exc.__class__.__name__}: {exc}"
            attempt += 1
            have = part.stat().st_size if part.exists() else 0
            if attempt > retries:
                if reason == LENGTH_UNKNOWN:
                    raise ThreecadError(
                        f"download of {url} cannot be proven complete: {reason}; kept {have:,} bytes here. Run the "
                        "same command again to resume, pass --sha256 to accept it by checksum, or download it in "
                        "a browser and pass the local file",
                        part,
                    )
                raise ThreecadError(
                    f"download interrupted at {have:,} bytes after {retries} retries ({reason}); "
                    "run the same command again to resume",
                    part,
                )
            log.warning("download incomplete at %s bytes (%s); resuming (retry %d/%d)", f"{have:,}", reason, attempt,
                        retries)
            time.sleep(backoff * attempt)
        os.replace(part, dest)
    _check_sha256(dest, sha256, delete=True)
    return dest


def _announced_total(response: http.client.HTTPResponse, offset: int) -> int | None:
    """The whole file's size as the server announced it, or None when it announced none.

    A 206 carries it in ``Content-Range: bytes a-b/TOTAL``; its ``Content-Length`` is only this
    slice (a server may send a short slice, which must not pass for the whole file).
    """
    length = re.fullmatch(r"\s*(\d+)\s*", response.headers.get("Content-Length") or "")
    if response.status == 206:
        total = re.fullmatch(r"\s*bytes\s+\d+-\d+/(\d+)\s*", response.headers.get("Content-Range") or "")
        return int(total.group(1)) if total else None
    return offset + int(length.group(1)) if length else None


def _transfer(url: str, part: Path, timeout: float) -> str | None:
    """One request, appending to ``part``; None when the file is complete, else why it is not."""
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
                return None
            log.warning("server refused to resume at %d bytes; starting over", offset)
            part.unlink()
            return "the server refused to resume"
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
        total = _announced_total(response, offset)
        bar = progress(None, desc=part.name.removesuffix(".part"), total=total, initial=offset, unit="B",
                       unit_scale=True, unit_divisor=1024)
        try:
            with open(part, mode) as handle:
                while block := response.read(_CHUNK):
                    handle.write(block)
                    bar.update(len(block))
        finally:
            bar.close()
    size = part.stat().st_size
    if total is None:
        return LENGTH_UNKNOWN
    if size > total:
        part.unlink()
        return f"received {size:,} bytes, more than the {total:,} announced; starting over"
    if size < total:
        return f"the server closed the connection at {size:,} of {total:,} bytes"
    return None


def _check_sha256(path: Path, expected: str | None, delete: bool) -> str:
    digest = sha256_file(path)
    if expected is not None and digest.lower() != expected.lower():
        if delete:
            path.unlink()
        what = "deleted it; run again to download it anew" if delete else "the file was left as it is"
        raise ThreecadError(f"sha256 mismatch: expected {expected.lower()}, got {digest} (corrupt or different file; {what})", path)
    return digest


#: Limits for a dataset archive: 2,000,000 members, 200 GiB written (3CAD is far smaller; a bomb is
#: not), and at most 1000:1 written/compressed above 8 MiB (``threecad.archive`` has the rules).
DATASET_LIMITS = Limits(max_files=2_000_000, max_bytes=200 * 2**30)


def check_replaceable(target: str | Path, archive: str | Path) -> None:
    """Refuse to replace ``target`` unless it is a plain folder holding nothing the run still needs.

    ``--overwrite`` swaps a fresh extraction in for ``target`` and deletes the old one, so
    ``target`` must not be a link or a file, and must not be (or contain) the archive, the current
    folder, the destination or its parent: a dot-named archive once made that delete the user's
    current folder.
    """
    target = Path(target)
    if target.is_symlink() or not target.is_dir():
        raise ThreecadError("exists and is not a plain folder (a file or a link); refusing to replace it, "
                            "move it away first", target)
    real = Path(os.path.realpath(target))
    dest = target.parent
    for what, path in (("the archive", Path(archive)), ("the current folder", Path.cwd()),
                       ("the destination folder", dest), ("the destination's parent", dest.parent)):
        held = Path(os.path.realpath(path))
        if held == real or real in held.parents:
            raise ThreecadError(f"refusing to replace this folder: it is or holds {what} ({path})", target)


def extract_archive(archive: str | Path, target: str | Path, limits: Limits = DATASET_LIMITS,
                    overwrite: bool = False) -> Path:
    """Safely extract ``archive`` into ``target``, all or nothing (see :mod:`threecad.archive`).

    The archive is unpacked into a hidden sibling (``threecad.io.staged_dir``) that replaces
    ``target`` only once complete, so a refused or corrupt archive leaves the old ``target`` (or
    nothing) behind, never a mix. An existing ``target`` is replaced only with ``overwrite`` and
    after :func:`check_replaceable`.
    """
    archive, target = Path(archive), Path(target)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise ThreecadError("extraction target already exists (pass --overwrite to replace it)", target)
        check_replaceable(target, archive)
    with staged_dir(target) as tmp:
        done = extract(archive, tmp, limits)
    log.info("extracted %d members (%s bytes) to %s", done.members, f"{done.bytes_written:,}", target)
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
    stem = archive_stem(filename, location)  # validated before anything is downloaded or written: the
    # archive file dest/filename and the folder dest/stem are both one plain component
    sha256 = sha256 or known_sha
    dest = Path(dest)
    remote = bool(re.match(r"^https?://", location))
    archive = dest / filename if remote else Path(location)
    target = dest / stem
    if overwrite and (target.exists() or target.is_symlink()):
        check_replaceable(target, archive)  # before a long download; extract_archive checks again
    if remote:
        archive = fetch(location, archive, sha256=sha256, retries=retries, backoff=backoff)
        digest = sha256.lower() if sha256 else sha256_file(archive)  # fetch checked a given digest
    else:
        digest = _check_sha256(archive, sha256, delete=False)
    if (target.exists() or target.is_symlink()) and not overwrite:
        log.info("%s already extracted (pass --overwrite to extract again)", target)
    else:
        extract_archive(archive, target, overwrite=overwrite)
    # Offered for pinning only once the archive has passed every check: a refused one gets no digest.
    if sha256 is None:
        log.info("sha256 %s (no published checksum; pass --sha256 %s to pin this copy)", digest, digest)
    write_text(dest / f"{filename}.sha256", f"{digest}  {filename}\n")
    root = find_dataset_root(target)
    report = None
    if verify:
        report = verify_dataset(root, expect=expect or ("full" if from_catalogue else "auto"),
                                report_path=dest / f"{stem}.verify.json")
    return DownloadResult(archive, root, digest, report)
