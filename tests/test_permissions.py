"""Written files and folders get the umask's mode, not mkstemp's 0600 / mkdtemp's 0700."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

import threecad.io as tio
from threecad.dataset.tabular import write_tabular
from threecad.io import atomic_write, current_umask, save_image, staged_dir, write_json, write_text
from threecad.maps.files import write_map


@pytest.fixture
def umask():
    """``os.umask`` to set one for a test; the process's own comes back whatever happens."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"),
                         [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)],
                         ids=["umask022", "umask077", "umask002"])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert current_umask() == mask
    write_json(tmp_path / "a.json", {"x": 1})
    save_image(tmp_path / "b.png", np.zeros((4, 5), np.uint8))
    with atomic_write(tmp_path / "c.bin") as handle:
        handle.write(b"c")
    write_map(tmp_path / "d.tiff", np.zeros((3, 3), np.float32))
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        write_text(tmp / "inside.txt", "x")
        (tmp / "sub").mkdir()
        save_image(tmp / "sub" / "m.png", np.zeros((2, 2), np.uint8))
    for name in ("a.json", "b.png", "c.bin", "d.tiff"):
        assert _mode(tmp_path / name) == file_mode, name
    assert _mode(out) == dir_mode
    assert _mode(out / "sub") == dir_mode
    assert _mode(out / "inside.txt") == file_mode
    assert _mode(out / "sub" / "m.png") == file_mode


def test_tabular_table_follows_the_umask(synth_root, tmp_path, umask):
    umask(0o022)
    table = write_tabular(synth_root, tmp_path / "t.csv")
    assert _mode(table) == 0o644


def test_umask_without_proc_falls_back_and_restores(monkeypatch, umask):
    """Where /proc is missing the set-and-restore path answers, and leaves the umask as it was."""
    umask(0o027)

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(tio, "open", no_proc, raising=False)
    assert current_umask() == 0o027
    monkeypatch.undo()
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # the fallback restored it
