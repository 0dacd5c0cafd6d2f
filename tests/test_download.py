"""download: a local HTTP server with Range support, resumed transfers, checksums and safe extraction."""

from __future__ import annotations

import hashlib
import http.server
import io
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
from threecad.download import check_archive, download_dataset, extract_archive, fetch
from threecad.errors import ThreecadError


class _Server:
    """Serves ``files`` on 127.0.0.1; ``drop_after`` cuts the next N responses after that many bytes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.drop_after: int | None = None
        self.drops_left = 0
        self.ignore_range = False
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
                self.send_response(status)
                self.send_header("Content-Type", server.content_type)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.drops_left and server.drop_after is not None:
                    server.drops_left -= 1
                    self.wfile.write(body[: server.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
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
    with pytest.raises(ThreecadError, match="corrupt archive, nothing extracted"):
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
        (lambda t: _zip_with(t, "../escape.txt"), "leaves the target"),
        (lambda t: _zip_with(t, "ok/../../escape.txt"), "leaves the target"),
        (lambda t: _zip_with(t, "/tmp/abs.txt"), "absolute path"),
        (lambda t: _zip_with(t, "C:/abs.txt"), "absolute path"),
        (lambda t: _zip_with(t, "link", b"/etc/passwd", symlink=True), "symbolic link"),
        (lambda t: _tar_with(t, tarfile.TarInfo("../escape.txt"), b"x"), "leaves the target"),
        (lambda t: _tar_with(t, tarfile.TarInfo("/abs.txt"), b"x"), "absolute path"),
        (lambda t: _tar_with(t, _symlink("ok/link", "../../outside")), "links outside"),
        (lambda t: _tar_with(t, _symlink("ok/link", "/etc/passwd")), "links outside"),
        (lambda t: _tar_with(t, _symlink("hard", "../outside", hard=True)), "links outside"),
    ],
)
def test_unsafe_archives_are_refused(tmp_path, make, message):
    archive = make(tmp_path)
    with pytest.raises(ThreecadError, match=message):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]


def test_safe_tar_with_inner_link_extracts(tmp_path):
    archive = _tar_with(tmp_path, _symlink("ok/alias.txt", "file.txt"))
    assert check_archive(archive) == "tar"
    out = extract_archive(archive, tmp_path / "out")
    assert (out / "ok" / "alias.txt").read_text() == "fine"


def test_zip_bomb_and_size_limit_refused(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_BZIP2) as zf:  # bzip2 packs zeros ~100,000x (deflate ~1,000x)
        zf.writestr("zeros.bin", b"\0" * (20 * 1024 * 1024))
    with pytest.raises(ThreecadError, match="compressed .*x"):
        check_archive(path)
    big = _zip_with(tmp_path, "big.bin", b"y" * 2000)
    with pytest.raises(ThreecadError, match="unpacks to more than 1,000 bytes"):
        check_archive(big, max_total=1000)
    with pytest.raises(ThreecadError, match="unpacks to more than 1,500 bytes .*free disk space"):
        check_archive(big, free=1500)
    assert check_archive(big, free=10_000) == "zip"


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
