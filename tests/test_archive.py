"""threecad.archive: the one extractor (downloads and submissions). Each test builds its hostile archive."""

from __future__ import annotations

import bz2
import io
import re
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from leaderboard.validate import Limits as SubmissionLimits
from leaderboard.validate import UnsafeSubmission, open_submission, validate_submission
from threecad import archive as archive_mod
from threecad.archive import Limits, archive_kind, archive_stem, extract
from threecad.errors import ThreecadError

MiB = 2**20


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path below ``root`` (links not followed) with file contents: a before/after snapshot."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    return out


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:  # pax: names may hold anything
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    if "\x00" in name:
        info.pax_headers = {"path": name}  # a ustar header would cut the name at the NUL
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    return info


def _zip(path: Path, members: list[tuple[str, bytes, int]], method: int = zipfile.ZIP_DEFLATED) -> Path:
    """``members``: (name, data, Unix mode with type bits, or 0)."""
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def _fresh(tmp_path: Path) -> Path:
    out = tmp_path / "dest" / "out"
    out.mkdir(parents=True)
    return out


FILE = (_info("ok/file.txt"), b"fine")
HOSTILE = {
    # links of every kind, even ones that stay inside: datasets and submissions need none
    "tar inner symlink": ([FILE, (_info("ok/alias.txt", tarfile.SYMTYPE, "file.txt"), None)], "is a link (symbolic"),
    "tar hardlink outside": ([FILE, (_info("hard", tarfile.LNKTYPE, "/etc/passwd"), None)], "is a link (hard link"),
    "tar inner hardlink": ([FILE, (_info("ok/again.txt", tarfile.LNKTYPE, "ok/file.txt"), None)], "hard link"),
    "tar device": ([FILE, (_info("dev/null", tarfile.CHRTYPE), None)], "device or special file (character device"),
    "tar fifo": ([FILE, (_info("pipe", tarfile.FIFOTYPE), None)], "device or special file (fifo"),
    "tar ..": ([FILE, (_info("ok/../../escape.txt"), b"x")], "'..' in path"),
    "tar absolute": ([FILE, (_info("/tmp/abs.txt"), b"x")], "absolute path"),
    "tar drive letter": ([FILE, (_info("C:/abs.txt"), b"x")], "absolute path"),
    "tar backslash": ([FILE, (_info("ok\\..\\..\\escape.txt"), b"x")], "backslash"),
    "tar empty part": ([FILE, (_info("ok//file2.txt"), b"x")], "empty or '.' path component"),
    "tar NUL": ([FILE, (_info("ok/a\x00b"), b"x")], "NUL"),
    "tar duplicate": ([FILE, (_info("ok/file.txt"), b"evil")], "appears twice"),
    "tar duplicate via ./": ([FILE, (_info("./ok/file.txt"), b"evil")], "appears twice"),
    "tar file over folder": ([FILE, (_info("ok"), b"x")], "collides with a file or folder"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_members_are_refused(tmp_path, case):
    members, message = HOSTILE[case]
    archive = _tar(tmp_path / "evil.tar", members)
    out = _fresh(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(ThreecadError) as info:
        extract(archive, out)
    text = str(info.value)
    assert message in text and text.startswith(f"{archive}: ") and "\n" not in text
    assert repr(members[-1][0].name) in text  # names the member
    after = _tree(tmp_path)
    # Only what the extractor made below ``out`` may differ (its caller deletes it); nothing else.
    assert {k: v for k, v in after.items() if not k.startswith("dest/out/")} == before
    assert not any(Path(tmp_path, k).is_symlink() for k in after)


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize(
    "name, mode, message",
    [
        ("link", stat.S_IFLNK | 0o777, "is a link (symbolic link)"),
        ("ok/pipe", stat.S_IFIFO | 0o644, "device or special file (fifo)"),
        ("ok/dev", stat.S_IFBLK | 0o644, "device or special file (block device)"),
        ("../escape.txt", 0, "'..' in path"),
        ("ok/file.txt", stat.S_IFREG | 0o644, "appears twice"),
        ("ok/", stat.S_IFDIR | 0o755, "appears twice"),  # a folder where a file was: ambiguous
    ],
)
def test_hostile_zip_members_are_refused_before_anything_is_written(tmp_path, name, mode, message):
    archive = _zip(tmp_path / "evil.zip", [("ok/file.txt", b"fine", stat.S_IFREG | 0o644),
                                           ("ok", b"", 0) if name == "ok/" else ("other.txt", b"x", 0),
                                           (name, b"/etc/passwd", mode)])
    out = _fresh(tmp_path)
    with pytest.raises(ThreecadError, match=re.escape(message)) as info:
        extract(archive, out)
    assert str(info.value).startswith(f"{archive}: ")
    assert list(out.iterdir()) == []  # zip members are all vetted first


def test_encrypted_zip_member_refused(tmp_path):
    archive = _zip(tmp_path / "enc.zip", [("a.txt", b"x", 0)])
    data = bytearray(archive.read_bytes())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        at = data.find(signature)
        data[at + flag_at] |= 0x1
    archive.write_bytes(bytes(data))
    with pytest.raises(ThreecadError, match="'a.txt' is encrypted"):
        extract(archive, _fresh(tmp_path))


def _bz2_tar_bomb(path: Path, members: int, size: int) -> Path:
    """A tar of ``members`` zero-filled files, bzip2-compressed (one bz2 stream per piece, as pbzip2
    writes them) so a few KiB hold gigabytes; saved under a ``.tar.gz`` name to hide it."""
    zeros = bz2.compress(bytes(size))  # size is a multiple of 512: no tar padding needed
    pieces = []
    for i in range(members):
        info = tarfile.TarInfo(f"bomb/m{i:03d}.bin")
        info.size = size
        pieces += [bz2.compress(info.tobuf(format=tarfile.GNU_FORMAT)), zeros]
    pieces.append(bz2.compress(bytes(2 * 512)))
    path.write_bytes(b"".join(pieces))
    return path


def _written(message: str) -> int:
    return int(re.search(r"\(([\d,]+) bytes", message).group(1).replace(",", ""))


def test_bz2_bomb_under_tar_gz_name_stops_on_the_whole_archive_ratio(tmp_path):
    """Members just under the ratio floor (no single one is checked): the running whole-archive
    ratio stops it after ~8 MiB. 40 x 8 MiB = 320 MiB would be written otherwise; the 100 MiB
    budget keeps a broken check from filling the disk (it would fail with another message)."""
    size = Limits().ratio_floor - 512
    archive = _bz2_tar_bomb(tmp_path / "data.tar.gz", 40, size)
    assert archive.stat().st_size < 20_000
    out = _fresh(tmp_path)
    with pytest.raises(ThreecadError, match=r"archive expands over 1000:1 .*decompression bomb") as info:
        extract(archive, out, Limits(max_bytes=100 * MiB))
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert on_disk <= _written(str(info.value)) < 16 * MiB and on_disk < 2 * size
    assert "at member 'bomb/m001.bin'" in str(info.value)


def test_submission_bomb_of_64_mib_members_is_stopped_early(tmp_path, synth_root):
    """The reported bomb: bzip2 under .tar.gz, members just under the old 64 MiB per-member floor.
    Through the submission validator with its own Limits (budget 100 MiB for safety)."""
    archive = _bz2_tar_bomb(tmp_path / "sub.tar.gz", 40, 64 * MiB - 512)
    report = validate_submission(archive, synth_root, limits=SubmissionLimits(max_bytes=100 * MiB),
                                 workdir=tmp_path)
    assert not report.ok and len(report.errors) == 1
    assert "expands over 1000:1" in report.errors[0] and str(archive) in report.errors[0]
    assert _written(report.errors[0]) < 16 * MiB
    assert [p.name for p in tmp_path.iterdir()] == ["sub.tar.gz"]  # the scratch folder is gone


def test_zip_bomb_of_small_members_refused_from_its_headers(tmp_path):
    """100 members of 512 KiB zeros (each under any per-member floor), bzip2: 50 MiB from ~20 KB."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_BZIP2) as zf:
        for i in range(100):
            zf.writestr(f"z/{i}.bin", bytes(512 * 1024))
    out = _fresh(tmp_path)
    with pytest.raises(ThreecadError, match="archive expands over 1000:1"):
        extract(archive, out)
    assert list(out.iterdir()) == []


def test_one_bomb_member_in_a_larger_archive_is_caught_per_member(tmp_path):
    """Diluted by incompressible data the whole-archive ratio stays low; the member's own does not."""
    random = np.random.default_rng(0).bytes(12 * MiB)
    archive = _tar(tmp_path / "mix.tar.gz", [(_info("a/noise.bin"), random), (_info("a/zeros.bin"), bytes(40 * MiB))],
                   mode="w:gz")
    with pytest.raises(ThreecadError, match=r"member 'a/zeros.bin' expands over 1000:1"):
        extract(archive, _fresh(tmp_path), Limits(max_bytes=100 * MiB))


def test_size_file_count_and_free_disk_caps(tmp_path, monkeypatch):
    archive = _tar(tmp_path / "big.tar", [(_info(f"f{i}.bin"), b"y" * 3000) for i in range(3)])
    with pytest.raises(ThreecadError, match=r"beyond the limit of 5,000 bytes at member 'f1.bin'"):
        extract(archive, _fresh(tmp_path), Limits(max_bytes=5000))
    (tmp_path / "c").mkdir()
    with pytest.raises(ThreecadError, match=r"member 'f2.bin' is over the limit of 2 members"):
        extract(archive, tmp_path / "c", Limits(max_files=2))

    class Usage:
        free = 4000

    monkeypatch.setattr(archive_mod.shutil, "disk_usage", lambda path: Usage)
    (tmp_path / "d").mkdir()
    with pytest.raises(ThreecadError, match=r"beyond the 4,000 bytes free on the disk at .*f1.bin"):
        extract(archive, tmp_path / "d")


def test_good_archives_extract_exactly(tmp_path):
    """tar -C dir . (./ prefixes), gz/bz2/xz whatever the name, zip: same files, nothing else."""
    content = {"a/b/one.txt": b"1" * 5000, "two.bin": bytes(range(256)) * 40, "a/empty": b""}
    made = []
    for name, mode in (("t.tar.gz", "w:gz"), ("t.tgz", "w:bz2"), ("t.tar.xz", "w:xz"), ("t.tar", "w")):
        members = [(_info("."), None), (_info("./a"), None)]
        members[0][0].type = members[1][0].type = tarfile.DIRTYPE
        members += [(_info(f"./{k}"), v) for k, v in content.items()]
        made.append(_tar(tmp_path / name, members, mode))
    made.append(_zip(tmp_path / "z.zip", [("a/", b"", stat.S_IFDIR | 0o755)] + [(k, v, 0) for k, v in content.items()]))
    for i, archive in enumerate(made):
        out = tmp_path / f"out{i}"
        out.mkdir()
        done = extract(archive, out)
        files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert files == content, archive.name
        assert done.bytes_written == sum(map(len, content.values()))


def test_extract_needs_an_empty_real_folder(tmp_path):
    archive = _tar(tmp_path / "t.tar", [FILE])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ThreecadError, match="existing empty folder"):
        extract(archive, tmp_path / "full")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ThreecadError, match="existing empty folder"):
        extract(archive, tmp_path / "link")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not any((tmp_path / "elsewhere").iterdir())


def test_not_an_archive_and_corrupt_member(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK not really")
    with pytest.raises(ThreecadError, match="not a zip or tar archive"):
        extract(junk, _fresh(tmp_path))
    good = _tar(tmp_path / "t.tar.gz", [(_info("a.bin"), bytes(range(256)) * 400)], mode="w:gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[:-200])
    (tmp_path / "o2").mkdir()
    with pytest.raises(ThreecadError, match=r"corrupt archive .*at member 'a.bin'"):
        extract(cut, tmp_path / "o2")


@pytest.mark.parametrize("name", ["...zip", ".tar.gz", "..tar.gz", ".zip", "a/b.zip", "noext", "", "x\\y.zip",
                                  ".hidden.zip"])
def test_archive_stem_refuses_names_that_are_not_one_plain_folder(name):
    with pytest.raises(ThreecadError, match="rename the archive"):
        archive_stem(name, "src")


def test_archive_stem_and_kind():
    assert archive_stem("3CAD.ZIP") == "3CAD" and archive_stem("a..tar.gz") == "a."
    assert archive_stem("data.tar.bz2") == "data" and archive_stem("x.zip.zip") == "x.zip"
    assert [archive_kind(Path(n)) for n in ("a.zip", "a.tar.gz", "a.tgz", "a.tar.xz", "a.rar")] == [
        "zip", "tar", "tar", "tar", None]


def test_submission_unpacking_uses_the_shared_rules(tmp_path):
    """A submission zip with an inner symlink (the old unpacker's own rules allowed none either) and
    a tar with a duplicate member: both refused as UnsafeSubmission, scratch folder removed."""
    dup = _tar(tmp_path / "dup.tar.gz", [(_info("meta.json"), b"{}"), (_info("./meta.json"), b"{}")], mode="w:gz")
    with pytest.raises(UnsafeSubmission, match="appears twice"), open_submission(dup, workdir=tmp_path):
        pass
    dots = _tar(tmp_path / "dots.tar", [(_info("a//meta.json"), b"{}")])
    with pytest.raises(UnsafeSubmission, match="empty or '.' path component"), open_submission(dots, workdir=tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dots.tar", "dup.tar.gz"]
