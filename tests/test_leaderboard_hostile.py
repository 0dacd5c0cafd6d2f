"""One hostile submission or a damaged store must not break the leaderboard for everyone.

Security issue items: stored text is data, never markup, in every view (8); a damaged store is one
error naming it, never a partial answer (9); commands that only read never create a store (12).
Every test builds its hostile input itself.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import shutil
import sqlite3
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib import cbook

from cli import cli
from leaderboard import site as site_module
from leaderboard.store import STANDARDIZED_RUNNER, Store
from leaderboard.validate import ValidationReport, read_meta
from threecad.dataset.layout import list_categories, list_samples
from threecad.errors import ThreecadError
from threecad.io import image_size
from threecad.maps.files import map_relpath, write_map

#: The strings from the issue: mathtext, a JSON prefix, Markdown pipes, HTML, LaTeX, a spreadsheet
#: formula, a newline, and a leading underscore (matplotlib drops such legend labels).
HOSTILE = ["Net $\\foo{$", '{"a":', "|x|", "<script>alert(1)</script>", "\\end{tabular}", "=1+1",
           "two\nlines", "_under"]
CATEGORY = "Aluminum_Ipad"


def _invoke(*args: str):
    return CliRunner().invoke(cli, ["leaderboard", *args])


def _label(text: str) -> str:
    """The table label of a hostile entry (method and version are both the hostile text)."""
    return f"{text} ({text})"


def _shown(text: str) -> str:
    """How a one-line view shows the text: the newline as the two characters backslash, n."""
    return text.replace("\n", "\\n")


def _hostile_store(path: Path) -> Path:
    """A store holding one evaluated entry per hostile string, in method, version, hardware and notes."""
    with Store(path) as db:
        for i, text in enumerate(HOSTILE):
            rows = [{"category": c, "protocol": p, "metric": m, "value": 0.5 + i / 100}
                    for c in (CATEGORY, "mean") for p in ("mvtec", "3cad-paper")
                    for m in ("i_auroc", "p_auroc", "aupro", "p_ap", "i_f1max", "p_f1max")]
            curves = [{"category": CATEGORY, "protocol": "mvtec", "kind": k, "x": [0, 0.1, 0.3], "y": [0, 0.5, 0.9]}
                      for k in ("roc", "pro")]
            db.add_submission({"sha256": f"{i + 1:064x}", "method": text, "version": text, "source": "evaluated",
                               "hardware": text, "meta": {"method": text, "notes": text}}, rows, curves)
    return path


@pytest.fixture()
def hostile(tmp_path) -> Path:
    return _hostile_store(tmp_path / "hostile.sqlite")


# ---------------------------------------------------------------------------------------------- item 8: meta.json
def _meta_errors(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "meta.json").write_text(text, encoding="utf-8")
    report = ValidationReport("sub", "data")
    read_meta(tmp_path, report)
    return report.errors


@pytest.mark.parametrize("meta,expected", [
    ({"method": "Net\nNet"}, '"method" contains the control character U+000A'),
    ({"method": "M", "hardware": "\x1b[2J\x1b[31mA100"}, '"hardware" contains the control character U+001B'),
    ({"method": "M\u202eevil"}, '"method" contains the control character U+202E'),
    ({"method": "M", "hardware": {"gpu": "A100"}}, '"hardware" must be a string, not an object'),
    ({"method": "M", "hardware": ["A100"]}, '"hardware" must be a string, not an array'),
    ({"method": "m" * 201}, '"method" is 201 characters long; the limit is 200'),
    ({"method": "M", "notes": "n" * 2001}, '"notes" is 2,001 characters long; the limit is 2,000'),
    ({"method": "M", "version": "v" * 101}, '"version" is 101 characters long; the limit is 100'),
])
def test_meta_json_refuses_hostile_values_naming_the_key(tmp_path, meta, expected):
    errors = _meta_errors(tmp_path, json.dumps(meta))
    assert any(e.startswith("meta.json: ") and expected in e for e in errors), errors


def test_meta_json_refuses_surrogates_and_oversized_files(tmp_path):
    errors = _meta_errors(tmp_path, '{"method": "M\\ud800"}')  # valid JSON, not encodable text
    assert any('"method" contains the control character U+D800' in e for e in errors), errors
    big = json.dumps({"method": "M", "pad": "x" * 70_000})
    assert _meta_errors(tmp_path, big) == [f"meta.json: {len(big):,} bytes; the limit is 65,536"]
    # Markup characters pass at submission time (every view escapes them), and so do limits exactly met.
    meta = {"method": "m" * 199 + "$", "version": "<script>", "hardware": '{"a":', "notes": "line 1\n\tline 2"}
    assert _meta_errors(tmp_path, json.dumps(meta)) == []


# ---------------------------------------------------------------------------------------------- item 8: every view
def _md_cells(line: str) -> list[str]:
    """Cells of a Markdown table row, split on unescaped pipes, backslash escapes undone."""
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [re.sub(r"\\(.)", r"\1", c.strip()) for c in cells]


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells: list[str] = []
        self.scripts = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        if tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_list_shows_hostile_text_literally_one_line_each(hostile):
    result = _invoke("list", "--store", str(hostile), "--source", "evaluated")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == len(HOSTILE)  # the newline did not add a line
    for line, text in zip(lines, HOSTILE):
        assert line.count(_shown(text)) == 3, line  # method, version and hardware, as stored


def test_hardware_is_parsed_only_for_standardized_runs(tmp_path):
    with Store(tmp_path / "lb.sqlite") as db:
        rows = [{"category": CATEGORY, "protocol": "mvtec", "metric": "p_auroc", "value": 0.5}]
        db.add_submission({"sha256": "a" * 64, "method": "Run", "source": "evaluated",
                           "hardware": {"gpu": "NVIDIA H200", "cpu": "x"}, "meta": {"runner": STANDARDIZED_RUNNER}}, rows)
        db.add_submission({"sha256": "b" * 64, "method": "Sub", "source": "evaluated",
                           "hardware": '{"gpu": "forged"}', "meta": {"method": "Sub"}}, rows)
    result = _invoke("list", "--store", str(tmp_path / "lb.sqlite"), "--source", "evaluated")
    assert result.exit_code == 0, result.output
    run, sub = sorted(result.output.splitlines(), key=lambda line: "Sub" in line)
    assert run.endswith("  NVIDIA H200") and sub.endswith('  {"gpu": "forged"}')


def test_markdown_and_html_tables_hold_the_text(hostile):
    result = _invoke("table", "--store", str(hostile), "--source", "evaluated", "--metric", "p_auroc")
    assert result.exit_code == 0, result.output
    rows = [_md_cells(line) for line in result.output.splitlines() if line.startswith("|")][2:]
    assert all(len(r) == 4 for r in rows), rows  # Family, Method, AI, Mean: no pipe split a cell
    assert sorted(r[1] for r in rows) == sorted(_shown(_label(t)) for t in HOSTILE)
    assert "<script>" not in result.output and "\\<script\\>" in result.output
    assert "$" not in result.output.replace("\\$", "")  # no math span for renderers that have them
    page = _invoke("table", "--store", str(hostile), "--source", "evaluated", "--metric", "p_auroc",
                   "--format", "html")
    assert page.exit_code == 0, page.output
    assert "<script" not in page.output and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.output
    parser = _Cells()
    parser.feed(page.output)
    assert parser.scripts == 0 and {_shown(_label(t)) for t in HOSTILE} <= set(parser.cells)


def test_csv_table_round_trips_and_guards_formulas(hostile):
    result = _invoke("table", "--store", str(hostile), "--source", "evaluated", "--metric", "p_auroc",
                     "--format", "csv")
    assert result.exit_code == 0, result.output
    parsed = list(csv.reader(io.StringIO(result.output)))
    assert all(len(r) == len(parsed[0]) for r in parsed)
    methods = sorted(r[1] for r in parsed[1:])
    expected = sorted(("'" + _label(t)) if t.startswith("=") else _label(t) for t in HOSTILE)
    assert methods == expected  # the newline kept inside its quoted cell; the formula shown as text


def test_latex_table_escapes_every_special_character(hostile):
    result = _invoke("table", "--store", str(hostile), "--source", "evaluated", "--metric", "p_auroc",
                     "--format", "latex")
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.count("\\end{tabular}") == 1 and text.rstrip().endswith("\\end{tabular}")
    assert "Net \\$\\textbackslash{}foo\\{\\$ (Net \\$\\textbackslash{}foo\\{\\$)" in text
    assert "\\textless{}script\\textgreater{}" in text and "\\textbar{}x\\textbar{}" in text
    body = text.split("\\midrule\n", 1)[1].split("\\bottomrule", 1)[0].splitlines()
    assert len(body) == len(HOSTILE)  # one line per entry: the newline is shown, not kept
    for line in body:
        assert len(re.split(r"(?<!\\)&", line)) == 4, line
        assert not re.search(r"(?<!\\)[$#%^~_]", line), line  # each of these would change the document


def test_export_csv_and_json_keep_the_text_and_import_restores_it(hostile, tmp_path):
    for fmt in ("csv", "json"):
        out = tmp_path / f"all.{fmt}"
        result = _invoke("export", str(out), "--store", str(hostile), "--source", "evaluated")
        assert result.exit_code == 0, result.output
        if fmt == "csv":
            rows = list(csv.DictReader(io.StringIO(out.read_text())))
            hardware = {r["hardware"] for r in rows}
            assert hardware == {("'" + t) if t.startswith("=") else t for t in HOSTILE}
        else:
            payload = json.loads(out.read_text())
            assert {s["meta"]["notes"] for s in payload["submissions"]} == set(HOSTILE)
        other = tmp_path / "new" / fmt / "lb.sqlite"  # import may create a store, folders included
        result = _invoke("import", str(out), "--store", str(other))
        assert result.exit_code == 0, result.output
        with Store(other) as db:
            stored = db.submissions("evaluated")
        assert sorted(s["method"] for s in stored) == sorted(HOSTILE)  # exact, formula guard undone
        assert sorted(s["hardware"] for s in stored) == sorted(HOSTILE)


def test_site_draws_hostile_names_as_plain_text(hostile, tmp_path, monkeypatch):
    legends: list[str] = []
    draw = site_module._png

    def record(fig):
        for ax in fig.axes:
            if ax.get_legend() is not None:
                legends.extend(t.get_text() for t in ax.get_legend().get_texts())
        for text in fig.findobj(match=lambda a: hasattr(a, "get_text")):
            assert not cbook.is_math_text(text.get_text()), text.get_text()
        return draw(fig)

    monkeypatch.setattr(site_module, "_png", record)
    out = tmp_path / "page.html"
    result = _invoke("site", str(out), "--store", str(hostile))
    assert result.exit_code == 0, result.output
    expected = {_shown(_label(t)) for t in HOSTILE}
    # Matplotlib shows "\$" as "$"; a leading space keeps "_under" in the legend.
    assert {t.replace("\\$", "$").lstrip(" ") for t in legends} == expected
    page = out.read_text()
    parser = _Cells()
    parser.feed(page)
    assert parser.scripts == 1  # the page's own sorting script, nothing else
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and expected <= set(parser.cells)


def _submission(dataset: Path, out: Path, meta: dict) -> Path:
    """Random maps for the first category's test images (submitted with ``--categories``), and ``meta``."""
    rng = np.random.default_rng(0)
    for category in list_categories(dataset)[:1]:
        for sample in list_samples(dataset, category, "test"):
            width, height = image_size(sample.image_path)
            write_map(out / map_relpath(category, sample.defect, sample.stem), rng.random((height, width),
                                                                                            dtype=np.float32))
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_hostile_but_valid_submission_end_to_end(synth_root, tmp_path):
    """The issue's report: a real submission whose method and hardware used to break site and list."""
    meta = {"method": "Net $\\foo{$", "version": "<script>", "hardware": '{"a":', "notes": "=1+1\n|x|"}
    sub = _submission(synth_root, tmp_path / "sub", meta)
    store = tmp_path / "new" / "lb.sqlite"  # submit may create a store, folders included
    result = _invoke("submit", str(sub), "--dataset", str(synth_root), "--store", str(store),
                     "--categories", list_categories(synth_root)[0])
    assert result.exit_code == 0, result.output
    listed = _invoke("list", "--store", str(store), "--source", "evaluated")
    assert listed.exit_code == 0 and listed.output.rstrip().endswith('{"a":'), listed.output
    page = tmp_path / "page.html"
    built = _invoke("site", str(page), "--store", str(store))
    assert built.exit_code == 0, built.output
    assert "Net $\\foo{$ (&lt;script&gt;)" in page.read_text()


def test_refused_meta_stores_nothing(synth_root, tmp_path):
    sub = _submission(synth_root, tmp_path / "sub", {"method": "M", "hardware": "A100\n\x1b[31m"})
    store = tmp_path / "lb.sqlite"
    result = _invoke("submit", str(sub), "--dataset", str(synth_root), "--store", str(store),
                     "--categories", list_categories(synth_root)[0])
    assert result.exit_code == 1 and 'meta.json: "hardware" contains the control character U+000A' in result.output
    with Store(store) as db:
        assert db.submissions("evaluated") == []


@pytest.mark.parametrize("change,message", [
    (lambda p: p["submissions"][0].update(meta="{not json"), "'meta' must be an object"),
    (lambda p: p["submissions"][0].update(method=5), "'method' must be text, not int"),
    (lambda p: p["curves"][0].update(x=["a", "b", "c"]), "'x' must be a list of finite numbers"),
])
def test_import_refuses_malformed_exports(hostile, tmp_path, change, message):
    export = tmp_path / "all.json"
    assert _invoke("export", str(export), "--store", str(hostile), "--source", "evaluated").exit_code == 0
    payload = json.loads(export.read_text())
    change(payload)
    export.write_text(json.dumps(payload))
    target = tmp_path / "target.sqlite"
    result = _invoke("import", str(export), "--store", str(target))
    assert result.exit_code == 1 and message in result.output, result.output
    listed = _invoke("list", "--store", str(target), "--source", "evaluated")
    assert listed.exit_code == 0 and listed.output == ""


# ---------------------------------------------------------------------------------------------- item 9: damage
def _big_store(path: Path) -> Path:
    with Store(path) as db:
        for i in range(60):
            db.add_submission(
                {"sha256": f"{i:064x}", "method": f"M{i}", "version": "1", "source": "evaluated",
                 "meta": {"notes": "n" * 400}},
                [{"category": c, "protocol": "mvtec", "metric": m, "value": 0.5}
                 for c in ("A", "B", "C", "D", "E", "F", "mean") for m in ("p_auroc", "i_auroc", "aupro")])
    return path


def _damage_middle(path: Path) -> None:
    """Random bytes over the middle third of the file; the 100-byte header and page 1 stay intact."""
    data = bytearray(path.read_bytes())
    start, end = len(data) // 3, 2 * len(data) // 3
    assert start > 4096
    data[start:end] = random.Random(0).randbytes(end - start)
    path.write_bytes(bytes(data))


def _shrink_a_results_leaf(path: Path) -> None:
    """Halve the cell count of one leaf page of ``results``: SQLite then reads that page's first rows
    only, with no error at all (the silent partial answer of the issue)."""
    conn = sqlite3.connect(path)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'results'").fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(path.read_bytes())
    interior = (root - 1) * page_size
    assert data[interior] == 0x05  # an interior table page: the store is big enough
    first_cell = struct.unpack(">H", data[interior + 12:interior + 14])[0]
    leaf = struct.unpack(">I", data[interior + first_cell:interior + first_cell + 4])[0]
    header = (leaf - 1) * page_size
    assert data[header] == 0x0D  # a leaf table page
    cells = struct.unpack(">H", data[header + 3:header + 5])[0]
    data[header + 3:header + 5] = struct.pack(">H", cells // 2)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_damage_middle, _shrink_a_results_leaf])
def test_damaged_store_is_one_error_naming_it_never_a_partial_answer(tmp_path, damage):
    store = _big_store(tmp_path / "lb.sqlite")
    intact = tmp_path / "intact.sqlite"
    shutil.copy(store, intact)
    damage(store)
    before = store.read_bytes()
    out = tmp_path / "export.csv"
    for args in (["list"], ["table", "--source", "evaluated", "--metric", "p_auroc"], ["export", str(out)],
                 ["site", str(tmp_path / "page.html")]):
        result = _invoke(*args, "--store", str(store))
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith(f"error: {store}: damaged leaderboard store"), (args, result.output)
        assert result.output.count("\n") == 1  # that one line, and nothing read
    assert not out.exists() and not (tmp_path / "page.html").exists()
    with pytest.raises(ThreecadError, match="damaged leaderboard store"):
        Store(store)  # a writing command refuses it too, before writing anything
    assert store.read_bytes() == before
    checked = _invoke("check", "--store", str(store))
    assert checked.exit_code == 1 and f"{store}: DAMAGED" in checked.output, checked.output
    assert len(checked.output.splitlines()) >= 2
    good = _invoke("check", "--store", str(intact))
    assert good.exit_code == 0 and good.output.startswith(f"{intact}: OK"), good.output
    assert "71 submissions, 1566 results" in good.output  # 60 entries x 21 numbers + the paper's 11 and 306


def test_files_that_are_not_a_leaderboard_store(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite at all\n" * 200)
    for command in ("list", "check"):
        result = _invoke(command, "--store", str(junk))
        assert result.exit_code == 1 and str(junk) in result.output and "not an SQLite database" in result.output
    other = tmp_path / "other.db"  # someone else's SQLite database: never add our tables to it
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE photos (name TEXT)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    for command in (["list"], ["import", str(tmp_path / "nothing.csv")]):
        result = _invoke(*command, "--store", str(other))
        assert result.exit_code == 1 and "not a leaderboard store" in result.output, result.output
    assert other.read_bytes() == before
    checked = _invoke("check", "--store", str(other))
    assert checked.exit_code == 1 and "no schema_version table" in checked.output


# ---------------------------------------------------------------------------------------------- item 12: no creation
def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize("command", [["list"], ["table"], ["export", "OUT/x.csv"], ["site", "OUT/page.html"],
                                     ["check"]])
def test_read_only_commands_never_create_a_store(tmp_path, monkeypatch, command):
    (tmp_path / "kept").mkdir()
    before = _tree(tmp_path)
    typo = tmp_path / "kept" / "tpyo" / "deeper" / "lb.sqlite"
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    result = _invoke(*args, "--store", str(typo))
    assert result.exit_code == 1 and result.output.startswith(f"error: no store at {typo}; "), result.output
    monkeypatch.setenv("THREECAD_STORE", str(typo))  # the same through the environment
    result = _invoke(*args)
    assert result.exit_code == 1 and f"no store at {typo}" in result.output
    assert _tree(tmp_path) == before
