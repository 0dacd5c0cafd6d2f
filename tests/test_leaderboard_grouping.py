"""Issue 24: the leaderboard never ranks results of different datasets together.

Tables, ``list``, ``means`` and the site group by dataset (name + fingerprint; the paper's rows are
3CAD); a mean says over how many categories it was taken and a partial mean is never ranked against
complete ones; ``table --dataset`` picks one section by name or fingerprint prefix; stores of the
previous schema (no dataset name) migrate with their fingerprints kept.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import sqlite3
from pathlib import Path
from statistics import fmean

import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from leaderboard import submit as submit_module
from leaderboard.site import build_site
from leaderboard.store import SCHEMA_VERSION, Store
from leaderboard.submit import dataset_name, submit
from leaderboard.tables import build_tables, group_by_dataset, render_table
from threecad.dataset.catalog import CATEGORY_FOLDERS
from threecad.dataset.layout import list_categories, list_samples
from threecad.errors import ThreecadError
from threecad.io import image_size
from threecad.maps.files import map_relpath, write_map

FP_A = "sha256:aaaa1111bbbb2222cccc"  # synthetic dataset "synth", first copy
FP_B = "sha256:dddd3333eeee4444ffff"  # a different dataset that happens to have the same folder name
FP_3CAD = "sha256:3cad3cad3cad3cad"
AI, IS, CS = "Aluminum_Ipad", "Iron_Stator", "Copper_Stator"


def _invoke(*args: str):
    return CliRunner().invoke(cli, ["leaderboard", *args])


def _add(db: Store, i: int, method: str, values: dict[str, float], name: str | None, fingerprint: str | None,
         mean: float | None = None) -> None:
    """An evaluated entry: ``values`` per category for p_auroc and p_ap under both protocols, and the
    stored mean (default: the mean of ``values``, as the evaluator stores it)."""
    mean = fmean(values.values()) if mean is None else mean
    rows = [{"category": c, "protocol": p, "metric": m, "value": v}
            for c, v in [*values.items(), ("mean", mean)] for p in ("3cad-paper", "mvtec") for m in ("p_auroc", "p_ap")]
    db.add_submission({"sha256": f"{i:064x}", "method": method, "version": "1", "source": "evaluated",
                       "dataset_name": name, "dataset_fingerprint": fingerprint}, rows)


@pytest.fixture()
def store(tmp_path) -> Path:
    path = tmp_path / "lb.sqlite"
    with Store(path) as db:
        _add(db, 1, "Tiny", {AI: 0.999}, "synth", FP_A)  # one category, better than any published mean
        _add(db, 2, "Half", {AI: 0.90}, "synth", FP_B)
        _add(db, 3, "Full", {AI: 0.80, IS: 0.70}, "synth", FP_B)
        _add(db, 4, "Partial", {AI: 0.999, CS: 0.99, IS: 0.98}, "3CAD", FP_3CAD)
        _add(db, 5, "Nameless", {AI: 0.5}, None, FP_3CAD)  # an entry on the same 3CAD copy, name not recorded
    return path


# ---------------------------------------------------------------------------------------------- parsing
def _sections(text: str) -> dict[str, dict]:
    """Markdown output -> dataset label -> {"header": [...], "rows": {method: [cells]}}."""
    out, label = {}, ""
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        if lines[0].startswith("|"):
            out[label]["lines"] = lines
            continue
        label = re.sub(r"\\(.)", r"\1", lines[0].split("; dataset ", 1)[1])
        out[label] = {}
    for section in out.values():
        lines = section.pop("lines")
        section["header"] = [c.strip() for c in lines[0].strip("|").split("|")]
        section["rows"] = {}
        for line in lines[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            section["rows"][cells[1]] = dict(zip(section["header"][2:], cells[2:]))
    return out


def _bold(cell: str) -> list[bool]:
    return [part.startswith("**") for part in re.split(r"(?<!<)/", cell)]


def _number(cell: str) -> float | None:
    part = re.sub(r"\*\*|</?u>", "", cell).split("/")[0]
    return None if part == "-" else float(part)


# ---------------------------------------------------------------------------------------------- grouping
def test_each_dataset_is_its_own_section_and_ranks_alone(store):
    with Store(store, readonly=True) as db:
        text = render_table(db, pair="p_auroc/p_ap")  # the default: every source, protocol 3cad-paper
    sections = _sections(text)
    assert list(sections) == ["3CAD", "synth [aaaa1111bbbb]", "synth [dddd3333eeee]"]  # 3CAD first
    cad, tiny, pair = (sections[k] for k in sections)
    assert set(tiny["rows"]) == {"Tiny (1)"} and set(pair["rows"]) == {"Half (1)", "Full (1)"}
    # Neither synthetic entry is anywhere near the paper's rows; the nameless 3CAD-fingerprint one is.
    assert {"Partial (1)", "Nameless (1)", "CFRG [paper]"} <= set(cad["rows"]) and len(cad["rows"]) == 13
    assert not {"Tiny (1)", "Half (1)", "Full (1)"} & set(cad["rows"])
    # Best values are marked per section, against a brute-force maximum over that section only.
    for section in sections.values():
        for column in (h for h in section["header"][2:] if not h.startswith(("Mean", "mean over"))):
            values = {m: _number(r[column]) for m, r in section["rows"].items() if _number(r[column]) is not None}
            best = max(values.values())
            for method, row in section["rows"].items():
                if method in values:
                    assert _bold(row[column])[0] == (values[method] == best), (method, column)
    assert _bold(tiny["rows"]["Tiny (1)"]["AI"]) == [True, True]  # best of its own one-row section
    assert _bold(pair["rows"]["Half (1)"]["AI"])[0] and not _bold(pair["rows"]["Full (1)"]["AI"])[0]
    # 99.9 on AI beats every published AI value in the 3CAD section; CFRG's 97.5 is no longer the best.
    assert _bold(cad["rows"]["Partial (1)"]["AI"])[0] and not _bold(cad["rows"]["CFRG [paper]"]["AI"])[0]


def test_means_say_how_many_categories_and_partial_means_are_not_ranked(store):
    with Store(store, readonly=True) as db:
        sections = _sections(render_table(db, pair="p_auroc/p_ap"))
    tiny = sections["synth [aaaa1111bbbb]"]
    assert tiny["header"][-1] == "Mean (1/1)"  # every row covers the same categories: said in the header
    pair = sections["synth [dddd3333eeee]"]
    assert pair["header"][-2:] == ["Mean", "mean over"]  # rows differ: a count per row
    assert pair["rows"]["Half (1)"]["mean over"] == "1/2" and pair["rows"]["Full (1)"]["mean over"] == "2/2"
    # Half's mean (90.0, one category) is higher than Full's (75.0, both) but is not ranked against it.
    assert _number(pair["rows"]["Half (1)"]["Mean"]) == 90.0 and _number(pair["rows"]["Full (1)"]["Mean"]) == 75.0
    assert _bold(pair["rows"]["Full (1)"]["Mean"])[0] and not _bold(pair["rows"]["Half (1)"]["Mean"])[0]
    cad = sections["3CAD"]
    assert cad["rows"]["Partial (1)"]["mean over"] == "3/8" and cad["rows"]["CFRG [paper]"]["mean over"] == "8/8"
    assert _number(cad["rows"]["Partial (1)"]["Mean"]) == pytest.approx(100 * fmean([0.999, 0.99, 0.98]), abs=0.05)
    assert _bold(cad["rows"]["CFRG [paper]"]["Mean"]) == [True, True]  # the paper's best mean stays the best
    assert not any(_bold(cad["rows"]["Partial (1)"]["Mean"]))


def test_csv_latex_and_html_carry_the_dataset(store):
    with Store(store, readonly=True) as db:
        parsed = list(csv.DictReader(io.StringIO(render_table(db, metric="p_auroc", fmt="csv"))))
        latex = render_table(db, metric="p_auroc", fmt="latex")
        page = render_table(db, metric="p_auroc", fmt="html")
    by_method = {r["method"]: r for r in parsed}
    assert by_method["Tiny (1)"]["dataset"] == "synth [aaaa1111bbbb]" and by_method["Tiny (1)"]["mean_over"] == "1/1"
    assert by_method["Half (1)"]["mean_over"] == "1/2" and by_method["CFRG [paper]"]["dataset"] == "3CAD"
    assert by_method["Tiny (1)"]["ACC/p_auroc"] == "" and by_method["Partial (1)"]["ACC/p_auroc"] == "-"
    assert latex.count("\\begin{tabular}") == 3 and page.count("<table") == 3
    assert re.findall(r"<caption>[^<]*dataset ([^<]*)</caption>", page) == [
        "3CAD", "synth [aaaa1111bbbb]", "synth [dddd3333eeee]"]


def test_group_keys_follow_fingerprint_then_name():
    def row(source="evaluated", name=None, fp=None, sha="s"):
        return {"source": source, "dataset_name": name, "dataset_fingerprint": fp, "submission_sha256": sha}

    rows = [row("reported"), row(name="3CAD", fp="sha256:x1"), row(fp="sha256:x1"), row(name="a", fp="sha256:y"),
            row(name="b", fp="sha256:y"), row(name="a"), row()]
    groups = group_by_dataset(rows)
    assert [g.label for g in groups] == ["3CAD", "a", "a / b [y]", "(not recorded)"]
    assert [len(g.rows) for g in groups] == [3, 1, 2, 1]


# ---------------------------------------------------------------------------------------------- CLI
def test_table_dataset_by_name_and_fingerprint_prefix(store):
    by_name = _invoke("table", "--store", str(store), "--dataset", "3cad")
    assert by_name.exit_code == 0, by_name.output
    assert list(_sections(by_name.output)) == ["3CAD"]
    assert "Partial (1)" in by_name.output and "[paper]" in by_name.output and "Tiny" not in by_name.output
    for prefix in ("dddd3333", "sha256:dddd"):
        picked = _invoke("table", "--store", str(store), "--dataset", prefix, "--source", "evaluated")
        assert picked.exit_code == 0, picked.output
        assert list(_sections(picked.output)) == ["synth [dddd3333eeee]"]
    # A 3CAD copy's fingerprint picks the 3CAD section, the paper's rows included.
    assert list(_sections(_invoke("table", "--store", str(store), "--dataset", "3cad3cad").output)) == ["3CAD"]
    ambiguous = _invoke("table", "--store", str(store), "--dataset", "synth")
    assert ambiguous.exit_code == 1 and "ambiguous" in ambiguous.output and "synth [aaaa1111bbbb]" in ambiguous.output
    unknown = _invoke("table", "--store", str(store), "--dataset", "nope")
    assert unknown.exit_code == 1 and "no dataset 'nope'" in unknown.output and "3CAD" in unknown.output


def test_list_prints_name_and_fingerprint(store):
    result = _invoke("list", "--store", str(store))
    assert result.exit_code == 0, result.output
    lines = {line.split()[2]: line for line in result.output.splitlines()}
    assert "synth sha256:aaaa1111bbbb " in lines["Tiny"] and "synth sha256:dddd3333eeee " in lines["Half"]
    assert "3CAD sha256:3cad3cad3cad " in lines["Partial"]
    assert " sha256:3cad3cad3cad " in lines["Nameless"] and "3CAD" not in lines["Nameless"]
    assert "3CAD as published" in lines["CFRG"]


def test_means_per_dataset_with_counts_and_the_published_check(store):
    with Store(store) as db:  # a stored mean that is not the mean of its categories is shown, not hidden
        _add(db, 6, "Odd", {AI: 0.6, IS: 0.8}, "synth", FP_B, mean=0.9)
    result = _invoke("means", "--store", str(store))
    assert result.exit_code == 0, result.output
    assert "34 means checked" in result.output  # the published-mean check is kept
    text = result.output.split("Evaluated means per dataset", 1)[1]
    blocks = dict(re.findall(r"^dataset (.+)\n((?:  .*\n?)+)", text, re.M))
    assert list(blocks) == ["3CAD", "synth [aaaa1111bbbb]", "synth [dddd3333eeee]"]
    assert "Partial (1) [00000000]  protocol 3cad-paper  over 3/8 categories: P-AUROC 99.0, AP 99.0" in blocks["3CAD"]
    assert "Nameless (1) [00000000]  protocol mvtec  over 1/8 categories: P-AUROC 50.0, AP 50.0" in blocks["3CAD"]
    assert "Half (1) [00000000]  protocol mvtec  over 1/2 categories" in blocks["synth [dddd3333eeee]"]
    assert "Odd (1) [00000000]  protocol mvtec  over 2/2 categories: P-AUROC 90.0 (stored; its 2 categories " \
           "give 70.0)" in blocks["synth [dddd3333eeee]"]
    one = _invoke("means", "--store", str(store), "--dataset", "aaaa")
    assert one.exit_code == 0 and "Tiny" in one.output and "Half" not in one.output


# ---------------------------------------------------------------------------------------------- site
def test_site_has_one_section_per_dataset(store, tmp_path):
    page = build_site(store, tmp_path / "page.html").read_text()
    headings = re.findall(r'<h2 id="dataset-\d+">Dataset: ([^<]*)</h2>', page)
    assert headings == ["3CAD", "synth [aaaa1111bbbb]", "synth [dddd3333eeee]"]
    sections = dict(zip(headings, re.split(r'<h2 id="dataset-\d+">', page)[1:]))
    first = sections["3CAD"].split("</table>", 1)[0]  # Table 3 with our 3CAD entries beside the paper's rows
    assert "Partial (1)" in first and "CFRG [paper]" in first and 'data-source="evaluated"' in first
    assert "Tiny" not in sections["3CAD"] and "Half" not in sections["synth [aaaa1111bbbb]"]
    assert "Tiny" not in sections["synth [dddd3333eeee]"]
    assert "mean over" in sections["synth [dddd3333eeee]"]


# ---------------------------------------------------------------------------------------------- old stores
def _downgrade_to_schema_2(path: Path) -> None:
    """Turn a current store into what schema 2 wrote: no dataset_name columns, version 2."""
    conn = sqlite3.connect(path)
    for table in ("submissions", "results"):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN dataset_name")
    conn.execute("UPDATE schema_version SET version = 2")
    conn.commit()
    conn.close()


def test_old_store_migrates_keeping_fingerprints(tmp_path):
    path = tmp_path / "old.sqlite"
    with Store(path) as db:
        _add(db, 1, "Old", {AI: 0.7}, None, FP_A)
        before = db.counts()
    _downgrade_to_schema_2(path)
    with pytest.raises(ThreecadError, match="schema version 2 is not this"):  # a reading command asks to migrate
        Store(path, readonly=True)
    with Store(path) as db:  # a writing open migrates in place; the paper is not seeded twice
        assert db.schema_version() == SCHEMA_VERSION == 3 and db.counts() == before
        old = db.results(source="evaluated")
        assert {r["dataset_fingerprint"] for r in old} == {FP_A} and {r["dataset_name"] for r in old} == {None}
        assert {r["dataset_name"] for r in db.results(source="reported")} == {"3CAD"}
        assert {s["dataset_name"] for s in db.submissions("reported")} == {"3CAD"}
        sections = _sections(render_table(db, metric="p_auroc"))
    assert list(sections) == ["3CAD", "aaaa1111bbbb"]  # name unknown: shown as the fingerprint prefix
    listed = _invoke("list", "--store", str(path), "--source", "evaluated")
    assert listed.exit_code == 0 and " sha256:aaaa1111bbbb " in listed.output


def test_export_import_keep_the_name_and_old_csv_exports_still_import(store, tmp_path):
    with Store(store, readonly=True) as db:
        db.export(tmp_path / "all.csv")
        db.export(tmp_path / "all.json")
        expected = sorted((r["submission_sha256"], r["dataset_name"]) for r in db.results(source="evaluated"))
    for name in ("all.csv", "all.json"):
        with Store(tmp_path / f"{name}.sqlite", seed_reported=False) as other:
            other.import_(tmp_path / name)
            assert sorted((r["submission_sha256"], r["dataset_name"]) for r in other.results(source="evaluated")) \
                == expected
            names = {s["method"]: s["dataset_name"] for s in other.submissions("evaluated")}
            assert names["Tiny"] == "synth" and names["Nameless"] is None
    rows = list(csv.DictReader(io.StringIO((tmp_path / "all.csv").read_text())))
    old = tmp_path / "schema2.csv"  # what an export looked like before the dataset_name column
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[k for k in rows[0] if k != "dataset_name"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: v for k, v in r.items() if k != "dataset_name"} for r in rows)
    old.write_text(buffer.getvalue())
    with Store(tmp_path / "old.sqlite", seed_reported=False) as other:
        counts = other.import_(old)
        assert counts["rows"] == len(rows) and counts["added"] == 16  # 11 paper entries and our 5
        assert {r["dataset_name"] for r in other.results(source="evaluated")} == {None}
        assert {r["dataset_name"] for r in other.results(source="reported")} == {"3CAD"}  # 3CAD by definition
        assert {r["dataset_fingerprint"] for r in other.results(source="evaluated")} == {FP_A, FP_B, FP_3CAD}
    assert json.loads((tmp_path / "all.json").read_text())["schema_version"] == SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------- naming
def _maps(dataset: Path, out: Path, category: str) -> Path:
    rng = np.random.default_rng(0)
    for sample in list_samples(dataset, category, "test"):
        width, height = image_size(sample.image_path)
        write_map(out / map_relpath(category, sample.defect, sample.stem), rng.random((height, width),
                                                                                        dtype=np.float32))
    (out / "meta.json").write_text(json.dumps({"method": "Rand"}))
    return out


def test_submit_records_the_folder_name_and_never_calls_a_subset_3cad(synth_root, tmp_path):
    category = list_categories(synth_root)[0]
    sub = _maps(synth_root, tmp_path / "sub", category)
    copy = tmp_path / "3cad"  # a folder named like the dataset, holding a 2-category synthetic set
    shutil.copytree(synth_root, copy)
    assert dataset_name(synth_root) == synth_root.name and dataset_name(copy) == "3cad (not full 3CAD)"
    with Store(tmp_path / "lb.sqlite") as db:
        submit(sub, synth_root, db, categories=[category], fingerprint=FP_A)
        submit(sub, synth_root, tmp_path / "other.sqlite", categories=[category], fingerprint=FP_B,
               name="my synth")
        assert db.submissions("evaluated")[0]["dataset_name"] == synth_root.name
        assert {r["dataset_name"] for r in db.results(source="evaluated")} == {synth_root.name}
        tables = build_tables(db.results(), ("p_auroc",), "3cad-paper")
        assert [t.dataset for t in tables] == ["3CAD", f"{synth_root.name} [aaaa1111bbbb]"]
    with Store(tmp_path / "other.sqlite", readonly=True) as other:
        assert other.submissions("evaluated")[0]["dataset_name"] == "my synth"


class _Report:
    def __init__(self, strict: bool, ok: bool):
        self.strict, self.ok, self.fingerprint = strict, ok, FP_3CAD


@pytest.mark.parametrize("ok,expected", [(True, "3CAD"), (False, "copy")])
def test_a_verified_full_copy_is_named_3cad(tmp_path, monkeypatch, ok, expected):
    root = tmp_path / "copy"
    for folder in CATEGORY_FOLDERS:  # all eight categories present: only then is the full check run
        (root / folder / "train").mkdir(parents=True)
    calls = []
    monkeypatch.setattr(submit_module, "_verified", lambda path: calls.append(path) or _Report(True, ok))
    assert dataset_name(root) == expected and len(calls) == 1
    shutil.rmtree(root / CATEGORY_FOLDERS[0])
    assert dataset_name(root) == "copy" and len(calls) == 1  # seven categories: not 3CAD, nothing verified



def test_a_hostile_dataset_name_is_text_in_every_view(tmp_path):
    hostile = "<script>x</script>|$a$\nb"
    path = tmp_path / "lb.sqlite"
    with Store(path) as db:
        _add(db, 1, "M", {AI: 0.5}, hostile, FP_A)
    md = _invoke("table", "--store", str(path), "--source", "evaluated")
    assert md.exit_code == 0, md.output
    title = md.output.splitlines()[0]
    assert title.endswith("dataset \\<script\\>x\\</script\\>\\|\\$a\\$\\\\nb \\[aaaa1111bbbb\\]"), title
    page = build_site(path, tmp_path / "page.html").read_text()
    assert "<script>x" not in page and "Dataset: &lt;script&gt;x&lt;/script&gt;|$a$\\nb [aaaa1111bbbb]</h2>" in page
    listed = _invoke("list", "--store", str(path), "--source", "evaluated")
    assert listed.output.count("\n") == 1 and "<script>x</script>|$a$\\nb sha256:aaaa1111bbbb" in listed.output
    picked = _invoke("table", "--store", str(path), "--dataset", hostile, "--format", "csv")
    # CSV keeps the text exactly, newline inside its quoted cell (like method names)
    assert picked.exit_code == 0 and list(csv.DictReader(io.StringIO(picked.output)))[0]["dataset"] == \
        f"{hostile} [aaaa1111bbbb]"


def test_means_without_a_store_is_the_published_check_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no default store there
    monkeypatch.delenv("THREECAD_STORE", raising=False)
    result = _invoke("means")
    assert result.exit_code == 0 and "34 means checked" in result.output, result.output
    assert "Evaluated means" not in result.output and not (tmp_path / ".threecad").exists()
    asked = _invoke("means", "--dataset", "3CAD")  # a dataset needs a store: never answered from nothing
    assert asked.exit_code == 1 and "no store at" in asked.output
