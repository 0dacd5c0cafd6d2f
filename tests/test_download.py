"""download: a local HTTP server with Range support, resumed transfers, checksums and safe extraction.

The hostile inputs of the security review are built here and run end to end through the CLI
against a real server on 127.0.0.1: a tar chain of symbolic links that escaped DEST, archive names
whose stem is ``..``/``""``/``.`` (``--overwrite`` deleted the current folder), truncated transfers.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import shutil
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import cli
from threecad.archive import Limits
from threecad.errors import ThreecadError
from threecad.ingest.download import download_dataset, extract_archive, fetch


class _Server:
    """Serves ``files`` on 127.0.0.1; ``drop_after`` cuts the next N responses after that many bytes;
    ``no_length`` sends no Content-Length (the body ends when the connection closes); ``slice``
    answers a Range request with at most that many bytes (a valid, partial 206)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.drop_after: int | None = None
        self.drops_left = 0
        self.ignore_range = False
        self.no_length = False
        self.slice: int | None = None
        self.content_type = "application/octet-stream"
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):  # noqa: N802 - http.server's naming
                data = server.files.get(self.path)
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
                if match and not server.ignore_range:
                    start, status = int(match.group(1)), 206
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = data[start:]
                if status == 206 and server.slice is not None:
                    body = body[: server.slice]
                self.send_response(status)
                self.send_header("Content-Type", server.content_type)
                if not server.no_length:
                    self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
                self.end_headers()
                if server.drops_left and server.drop_after is not None:
                    server.drops_left -= 1
                    self.wfile.write(body[: server.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def archive_bytes(tmp_path_factory, synth_root) -> bytes:
    """A zip of the synthetic dataset wrapped in a top folder, as real archives often are."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(synth_root.rglob("*")):
            if path.is_file():
                zf.write(path, f"mydata/{path.relative_to(synth_root).as_posix()}")
    return buffer.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_extract_verify(server, archive_bytes, tmp_path, synth_root):
    server.files["/ds.zip"] = archive_bytes
    result = download_dataset(server.url("ds.zip"), tmp_path, sha256=_sha(archive_bytes), backoff=0)
    assert result.sha256 == _sha(archive_bytes)
    assert result.dataset_root == tmp_path / "ds" / "mydata"
    assert result.report is not None and result.report.ok, result.report.summary()
    assert (tmp_path / "ds.verify.json").is_file()
    assert (tmp_path / "ds.zip.sha256").read_text().split()[0] == _sha(archive_bytes)
    for path in synth_root.rglob("*.png"):
        assert (result.dataset_root / path.relative_to(synth_root)).read_bytes() == path.read_bytes()
    # a second run reuses the archive and the extracted tree: no new request
    before = len(server.requests)
    download_dataset(server.url("ds.zip"), tmp_path, sha256=_sha(archive_bytes), backoff=0)
    assert len(server.requests) == before


def test_interrupted_transfer_resumes_within_a_run(server, archive_bytes, tmp_path):
    server.files["/a.zip"] = archive_bytes
    server.drop_after, server.drops_left = len(archive_bytes) // 3, 2
    path = fetch(server.url("a.zip"), tmp_path / "a.zip", sha256=_sha(archive_bytes), retries=3, backoff=0)
    assert path.read_bytes() == archive_bytes
    ranges = [r["range"] for r in server.requests]
    third = len(archive_bytes) // 3
    assert ranges == [None, f"bytes={third}-", f"bytes={2 * third}-"]
    assert not (tmp_path / "a.zip.part").exists()


def test_interrupted_transfer_resumes_across_runs(server, archive_bytes, tmp_path):
    server.files["/a.zip"] = archive_bytes
    server.drop_after, server.drops_left = 1000, 1
    with pytest.raises(ThreecadError, match="interrupted at 1,000 bytes.*run the same command again"):
        fetch(server.url("a.zip"), tmp_path / "a.zip", retries=0, backoff=0)
    assert (tmp_path / "a.zip.part").stat().st_size == 1000 and not (tmp_path / "a.zip").exists()
    fetch(server.url("a.zip"), tmp_path / "a.zip", sha256=_sha(archive_bytes), retries=0)
    assert server.requests[-1]["range"] == "bytes=1000-"
    assert (tmp_path / "a.zip").read_bytes() == archive_bytes


def test_server_ignoring_range_restarts_cleanly(server, archive_bytes, tmp_path):
    server.files["/a.zip"] = archive_bytes
    (tmp_path / "a.zip.part").write_bytes(archive_bytes[:500])
    server.ignore_range = True
    fetch(server.url("a.zip"), tmp_path / "a.zip", sha256=_sha(archive_bytes), retries=0)
    assert server.requests[0]["range"] == "bytes=500-"
    assert (tmp_path / "a.zip").read_bytes() == archive_bytes  # not 500 bytes + a second copy


def test_complete_part_file_is_accepted(server, archive_bytes, tmp_path):
    server.files["/a.zip"] = archive_bytes
    (tmp_path / "a.zip.part").write_bytes(archive_bytes)
    fetch(server.url("a.zip"), tmp_path / "a.zip", sha256=_sha(archive_bytes), retries=0)
    assert (tmp_path / "a.zip").read_bytes() == archive_bytes


def test_corrupted_download_is_rejected_and_not_extracted(server, archive_bytes, tmp_path):
    corrupted = bytearray(archive_bytes)
    corrupted[len(corrupted) // 2] ^= 0xFF
    server.files["/ds.zip"] = bytes(corrupted)
    with pytest.raises(ThreecadError, match="sha256 mismatch.*deleted it"):
        download_dataset(server.url("ds.zip"), tmp_path, sha256=_sha(archive_bytes), backoff=0)
    assert not (tmp_path / "ds.zip").exists() and not (tmp_path / "ds").exists()
    # the next run downloads afresh and succeeds once the server is fixed
    server.files["/ds.zip"] = archive_bytes
    assert download_dataset(server.url("ds.zip"), tmp_path, sha256=_sha(archive_bytes), backoff=0).report.ok


def test_corrupt_zip_without_checksum_extracts_nothing(tmp_path, archive_bytes):
    data = bytearray(archive_bytes)
    offset = data.find(b"\x89PNG") + 200  # inside the first stored member: its CRC no longer matches
    data[offset] ^= 0xFF
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    with pytest.raises(ThreecadError, match=r"corrupt archive .*at member 'mydata/.*nothing extracted"):
        extract_archive(tmp_path / "bad.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.zip"]  # no temporary folder left behind


def test_web_page_instead_of_archive(server, tmp_path):
    server.files["/x.zip"] = b"<html>quota exceeded</html>"
    server.content_type = "text/html; charset=utf-8"
    with pytest.raises(ThreecadError, match="web page.*3cad data download PATH"):
        fetch(server.url("x.zip"), tmp_path / "x.zip", retries=0)


def _zip_with(tmp_path, name, data=b"x", symlink=False) -> Path:
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok/file.txt", b"fine")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, data)
    return path


def _tar_with(tmp_path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("ok/file.txt")
        ok.size = 4
        tf.addfile(ok, io.BytesIO(b"fine"))
        member.size = len(data)
        tf.addfile(member, io.BytesIO(data))
    return path


def _symlink(name, target, hard=False):
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: _zip_with(t, "../escape.txt"), "'..' in path"),
        (lambda t: _zip_with(t, "ok/../../escape.txt"), "'..' in path"),
        (lambda t: _zip_with(t, "/tmp/abs.txt"), "absolute path"),
        (lambda t: _zip_with(t, "C:/abs.txt"), "absolute path"),
        (lambda t: _zip_with(t, "link", b"/etc/passwd", symlink=True), "symbolic link"),
        (lambda t: _tar_with(t, tarfile.TarInfo("../escape.txt"), b"x"), "'..' in path"),
        (lambda t: _tar_with(t, tarfile.TarInfo("/abs.txt"), b"x"), "absolute path"),
        (lambda t: _tar_with(t, _symlink("ok/link", "../../outside")), "is a link"),
        (lambda t: _tar_with(t, _symlink("ok/link", "/etc/passwd")), "is a link"),
        (lambda t: _tar_with(t, _symlink("hard", "../outside", hard=True)), "hard link"),
        (lambda t: _tar_with(t, _symlink("ok/alias.txt", "file.txt")), "is a link"),  # even inside: no links
        (lambda t: _tar_with(t, _symlink("ok/same.txt", "ok/file.txt", hard=True)), "hard link"),
    ],
)
def test_unsafe_archives_are_refused(tmp_path, make, message):
    archive = make(tmp_path)
    with pytest.raises(ThreecadError, match=message):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]


def test_zip_bomb_and_size_limit_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_BZIP2) as zf:  # bzip2 packs zeros ~100,000x (deflate ~1,000x)
        zf.writestr("zeros.bin", b"\0" * (20 * 1024 * 1024))
    with pytest.raises(ThreecadError, match="expands over 1000:1"):
        extract_archive(path, tmp_path / "out")
    big = _zip_with(tmp_path, "big.bin", b"y" * 2000)
    with pytest.raises(ThreecadError, match="beyond the limit of 1,000 bytes"):
        extract_archive(big, tmp_path / "out", Limits(max_bytes=1000))

    class Usage:
        free = 1500

    monkeypatch.setattr("threecad.archive.shutil.disk_usage", lambda path: Usage)
    with pytest.raises(ThreecadError, match="beyond the 1,500 bytes free on the disk"):
        extract_archive(big, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.zip", "evil.zip"]
    Usage.free = 10_000
    assert (extract_archive(big, tmp_path / "out") / "big.bin").read_bytes() == b"y" * 2000


def test_local_tar_gz_and_cli(tmp_path, synth_root):
    archive = tmp_path / "local.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(synth_root, arcname="local")
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "download", str(archive), "--dest", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and (tmp_path / "d" / "local" / "local").is_dir()
    wrong = runner.invoke(cli, ["data", "download", str(archive), "--dest", str(tmp_path / "e"), "--sha256", "0" * 64])
    assert wrong.exit_code == 1 and "sha256 mismatch" in wrong.output
    assert archive.exists()  # a user's local file is never deleted
    shutil.rmtree(tmp_path / "d")


def _tree(root: Path, skip: Path | None = None) -> dict[str, bytes | None]:
    """Every path below ``root`` (links not followed, ``skip``'s subtree left out) with file bytes."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        out[path.relative_to(root).as_posix()] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    return out


def _one_line_error(result) -> str:
    """The CLI's one error line (log lines may precede it on stderr)."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.output, result.output
    assert sum(line.startswith("error: ") for line in lines) == 1
    return lines[-1]


def _symlink_chain_tar(extract_dir_len: int) -> bytes:
    """The PATH_MAX symlink chain: deep folders, one-letter links to them, a 254-character link that
    climbs out with many '..', an 'escape' link through it, then a file under 'escape'.

    Every link resolves inside the target *textually* (what the old check looked at), and tarfile's
    ``filter="data"`` on Python 3.11.7 gives up resolving past PATH_MAX, so the old code wrote
    ``PWNED.txt`` into DEST's parent and printed OK (checked by hand against the old extractor).
    ``extract_dir_len`` is the length of the folder extraction happens in, which sizes the chain.
    """
    steps = "abcdefghijklmnop"
    component = "d" * min(250, (4096 - extract_dir_len - 1) // (len(steps) + 1))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        def add(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes | None = None) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = kind, link, 0o777 if kind == tarfile.DIRTYPE else 0o644
            info.size = len(data or b"")
            tf.addfile(info, io.BytesIO(data) if data is not None else None)

        path = ""
        for step in steps:
            add(os.path.join(path, component), tarfile.DIRTYPE)
            add(os.path.join(path, step), tarfile.SYMTYPE, component)
            path = os.path.join(path, component)
        long_link = os.path.join(*steps, "l" * 254)
        add(long_link, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps)))
        add("escape", tarfile.SYMTYPE, os.path.join(long_link, "..", ".."))
        add("escape/PWNED.txt", data=b"written outside DEST\n")
    return buffer.getvalue()


def test_cli_symlink_chain_tar_writes_nothing_outside(server, tmp_path):
    dest = tmp_path / "dest"
    # staged_dir extracts into DEST/.chain.<8 random>.partial: size the chain for that folder
    server.files["/chain.tar"] = _symlink_chain_tar(len(str(dest)) + len("/.chain.12345678.partial"))
    (tmp_path / "user.txt").write_text("mine")
    before = _tree(tmp_path)
    result = CliRunner().invoke(cli, ["data", "download", server.url("chain.tar"), "--dest", str(dest)])
    assert not list(tmp_path.rglob("PWNED.txt"))  # the old extractor wrote tmp_path/PWNED.txt
    assert _tree(tmp_path, skip=dest) == before  # nothing outside DEST, nothing removed
    assert sorted(p.name for p in dest.iterdir()) == ["chain.tar"]  # no folder, no .partial, no digest to pin
    text = _one_line_error(result)
    assert "chain.tar" in text and "member 'a' is a link (symbolic link to 'ddd" in text


@pytest.mark.parametrize("kind", ["hardlink", "zip symlink"])
def test_cli_links_in_archives_are_refused(server, tmp_path, kind):
    if kind == "hardlink":
        name, data = "h.tar", _tar_with(tmp_path, _symlink("ok/passwd", "/etc/passwd", hard=True)).read_bytes()
    else:
        name, data = "z.zip", _zip_with(tmp_path, "ok/link", b"../../..", symlink=True).read_bytes()
    server.files[f"/{name}"] = data
    before = _tree(tmp_path)
    result = CliRunner().invoke(cli, ["data", "download", server.url(name), "--dest", str(tmp_path / "d")])
    assert _tree(tmp_path, skip=tmp_path / "d") == before
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [name]  # a refused archive is not offered for pinning
    text = _one_line_error(result)
    assert name in text and "is a link" in text and ("'ok/passwd'" in text or "'ok/link'" in text)


def _user_files(work: Path) -> None:
    """A current folder with the user's own files, and a default ``data`` holding an older dataset."""
    (work / "data" / "3CAD" / "Copper_Stator").mkdir(parents=True)
    (work / "notes.txt").write_text("my notes")
    (work / "data" / "3CAD" / "Copper_Stator" / "keep.png").write_bytes(b"png")
    (work / "data" / "results.csv").write_text("a,b\n")


@pytest.mark.parametrize("name", ["...zip", ".tar.gz", "..tar.gz", ".zip"])
def test_cli_dot_stem_archive_with_overwrite_removes_nothing(server, archive_bytes, tmp_path, monkeypatch, name):
    """Stems '..', '', '.' named the current folder or DEST: --overwrite deleted them (default --dest data)."""
    work = tmp_path / "work"
    _user_files(work)
    server.files[f"/{name}"] = archive_bytes
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    result = CliRunner().invoke(cli, ["data", "download", server.url(name), "--overwrite", "--no-verify"])
    assert _tree(tmp_path) == before  # the old code deleted work/ ('..') or work/data ('' and '.')
    assert server.requests == []  # refused before downloading anything
    text = _one_line_error(result)
    assert repr(name) in text and "rename the archive" in text


@pytest.mark.parametrize("name", ["..tar.gz", "...zip"])
def test_cli_dot_stem_local_archive_with_overwrite_removes_nothing(archive_bytes, tmp_path, monkeypatch, name):
    work = tmp_path / "work"
    _user_files(work)
    (work / "data" / name).write_bytes(archive_bytes)
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    result = CliRunner().invoke(cli, ["data", "download", f"data/{name}", "--overwrite", "--no-verify"])
    assert _tree(tmp_path) == before
    assert name in _one_line_error(result)


@pytest.mark.parametrize("path", ["/..", "/", "/a/.."])
def test_url_without_a_safe_file_name_is_refused(server, tmp_path, path):
    url = f"http://127.0.0.1:{server.httpd.server_address[1]}{path}"
    with pytest.raises(ThreecadError, match=r"^http://127.0.0.1:\d+/.*: archive file name '.*' is refused"):
        download_dataset(url, tmp_path / "d", backoff=0)
    assert not (tmp_path / "d").exists() and server.requests == []


def _local_zip(tmp_path: Path, archive_bytes: bytes) -> Path:
    path = tmp_path / "dl" / "ds.zip"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(archive_bytes)
    return path


def test_overwrite_replaces_only_a_plain_folder_holding_nothing_needed(tmp_path, archive_bytes, monkeypatch):
    archive = _local_zip(tmp_path, archive_bytes)
    dest = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("mine")
    dest.mkdir()
    (dest / "ds").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ThreecadError, match="not a plain folder"):
        download_dataset(str(archive), dest, overwrite=True, verify=False)
    assert (elsewhere / "mine.txt").read_text() == "mine"
    (dest / "ds").unlink()
    (dest / "ds" / "sub").mkdir(parents=True)
    monkeypatch.chdir(dest / "ds" / "sub")
    with pytest.raises(ThreecadError, match="holds the current folder"):
        download_dataset(str(archive), dest, overwrite=True, verify=False)
    monkeypatch.chdir(tmp_path)
    inner = dest / "ds" / "ds.zip"
    shutil.copy(archive, inner)
    with pytest.raises(ThreecadError, match="holds the archive"):
        download_dataset(str(inner), dest, overwrite=True, verify=False)
    assert inner.read_bytes() == archive_bytes and (dest / "ds" / "sub").is_dir()


def test_overwrite_keeps_the_old_tree_until_the_new_one_is_complete(tmp_path, archive_bytes):
    dest = tmp_path / "data"
    (dest / "ds").mkdir(parents=True)
    (dest / "ds" / "stale.txt").write_text("old")
    bad = tmp_path / "dl" / "ds.zip"
    bad.parent.mkdir()
    data = bytearray(archive_bytes)
    data[data.find(b"\x89PNG") + 200] ^= 0xFF  # a CRC error in the first member
    bad.write_bytes(bytes(data))
    with pytest.raises(ThreecadError, match="corrupt archive"):
        download_dataset(str(bad), dest, overwrite=True, verify=False)
    assert (dest / "ds" / "stale.txt").read_text() == "old"
    assert sorted(p.name for p in dest.iterdir()) == ["ds"]  # no .partial left, no digest for a refused archive
    bad.write_bytes(archive_bytes)
    result = download_dataset(str(bad), dest, overwrite=True)
    assert result.report.ok and not (dest / "ds" / "stale.txt").exists()
    assert result.dataset_root == dest / "ds" / "mydata"


def test_no_content_length_is_never_complete_and_resumes_next_run(server, archive_bytes, tmp_path):
    server.files["/ds.zip"] = archive_bytes
    server.no_length, server.drop_after, server.drops_left = True, 1000, 1  # closes early, length unknown
    with pytest.raises(ThreecadError, match="ds.zip.part: .*length unknown"):
        download_dataset(server.url("ds.zip"), tmp_path, retries=0, backoff=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.zip.part"]  # no archive, no .sha256
    assert (tmp_path / "ds.zip.part").stat().st_size == 1000
    server.no_length = False
    result = download_dataset(server.url("ds.zip"), tmp_path, retries=0, backoff=0)
    assert server.requests[-1]["range"] == "bytes=1000-" and result.report.ok
    assert (tmp_path / "ds.zip").read_bytes() == archive_bytes
    assert (tmp_path / "ds.zip.sha256").read_text().split()[0] == _sha(archive_bytes)


def test_no_content_length_needs_a_proof(server, tmp_path):
    data = bytes(range(256)) * 20
    server.files["/a.zip"] = data
    server.no_length = True
    # a server that can resume proves the size with its 416 "bytes */N"
    assert fetch(server.url("a.zip"), tmp_path / "a.zip", retries=1, backoff=0).read_bytes() == data
    assert [r["range"] for r in server.requests] == [None, f"bytes={len(data)}-"]
    # one that cannot: only the given sha256 can accept the bytes; without it the run fails
    server.ignore_range = True
    with pytest.raises(ThreecadError, match="cannot be proven complete: length unknown"):
        fetch(server.url("a.zip"), tmp_path / "b.zip", retries=2, backoff=0)
    assert not (tmp_path / "b.zip").exists() and (tmp_path / "b.zip.part").read_bytes() == data
    assert fetch(server.url("a.zip"), tmp_path / "b.zip", sha256=_sha(data), retries=0).read_bytes() == data


def test_short_206_slices_are_not_the_whole_file(server, tmp_path):
    """A 206 whose Content-Length covers a slice: only Content-Range's total says when it is done."""
    data = bytes(range(256)) * 20
    server.files["/a.zip"] = data
    server.slice, server.drop_after, server.drops_left = 2000, 1500, 1
    path = fetch(server.url("a.zip"), tmp_path / "a.zip", retries=3, backoff=0)
    assert path.read_bytes() == data
    assert [r["range"] for r in server.requests] == [None, "bytes=1500-", "bytes=3500-"]
