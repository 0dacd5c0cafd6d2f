"""The one path check (threecad.paths): textual refusals and the on-disk containment proof."""

from __future__ import annotations

import os

import pytest

from threecad.errors import ThreecadError
from threecad.paths import check_component, check_relative, inside, safe_join, unsafe_reason


@pytest.mark.parametrize(
    "name",
    ["", "/etc/passwd", "C:/x.png", "c:x", "..", "../x", "a/../../b", "a\\b.png", "..\\x", "a//b", "./a", "a/./b",
     "a\x00b", "\ud800.png", "x" * 256, "a/" + "y" * 300],
)
def test_unsafe_names_are_refused(name):
    assert unsafe_reason(name) is not None
    with pytest.raises(ThreecadError, match="refused"):
        check_relative(name, "file_name", "ann.json")


@pytest.mark.parametrize("name", ["a.png", "cat/test/scratch/001.png", "dir/", "x" * 255, "é/ü.png", "a..b/c..png", "latin\udce9.png"])
def test_plain_names_pass(name):
    assert unsafe_reason(name) is None
    assert check_relative(name).as_posix() == name.rstrip("/")


def test_component_refuses_separators_and_hidden_names():
    assert check_component("Scratch_1") == "Scratch_1"
    for bad in ("a/b", ".", "..", ".hidden", "", "/"):
        with pytest.raises(ThreecadError):
            check_component(bad, "category")


def test_error_names_the_source_file():
    with pytest.raises(ThreecadError) as info:
        check_relative("../x.png", "file_name", "coco.json")
    assert str(info.value).startswith("coco.json: file_name '../x.png'")


def test_inside_follows_links_already_on_disk(tmp_path):
    root = tmp_path / "out"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, root / "sub" / "escape")
    assert inside(root, root / "sub" / "file.png") == (root / "sub" / "file.png").resolve()
    assert inside(root, root) == root.resolve()
    # textually inside, really outside: the planted link is followed and refused
    with pytest.raises(ThreecadError, match="outside"):
        inside(root, root / "sub" / "escape" / "file.png")
    with pytest.raises(ThreecadError, match="outside"):
        safe_join(root, "sub/escape/file.png")
    # a sibling whose name starts with the root's name is not inside it
    (tmp_path / "out2").mkdir()
    with pytest.raises(ThreecadError, match="outside"):
        inside(root, tmp_path / "out2" / "x")
