"""The SQLite store: idempotence, concurrent writers, forward migration, export/import."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3

import pytest
from click.testing import CliRunner

from cli import cli
from leaderboard import store as store_module
from leaderboard.reported import reported_rows
from leaderboard.store import MIGRATIONS, SCHEMA_VERSION, Store
from threecad.errors import ThreecadError


def _sub(i: int, method: str = "M") -> dict:
    return {"sha256": f"{i:064x}", "method": method, "version": str(i), "source": "evaluated",
            "dataset_fingerprint": "sha256:abc", "eval_size": "native", "hardware": {"device": "cpu"}}


def _rows(value: float) -> list[dict]:
    return [{"category": c, "protocol": p, "metric": m, "value": value}
            for c in ("A", "B", "mean") for p in ("mvtec", "3cad-paper") for m in ("p_auroc", "i_auroc")]


def test_new_store_is_seeded_once_with_the_paper(tmp_path):
    path = tmp_path / "lb.sqlite"
    with Store(path) as db:
        assert db.schema_version() == SCHEMA_VERSION
        first = db.counts()
        assert first["results"] == len(reported_rows()) and first["submissions"] == 11
        assert db.seed_reported() == 0
    with Store(path) as db:  # reopening neither migrates nor seeds again
        assert db.counts() == first
        cfrg = {(r["category"], r["metric"]): r["value"] for r in db.results(source="reported", methods=["CFRG"])}
    assert cfrg[("mean", "p_auroc")] == pytest.approx(0.934) and cfrg[("Copper_Stator", "aupro")] == pytest.approx(0.785)
    assert ("Iron_Stator", "p_ap") in cfrg and len(cfrg) == 36


def test_add_is_idempotent_by_sha256(tmp_path):
    with Store(tmp_path / "lb.sqlite") as db:
        before = db.counts()
        assert db.add_submission(_sub(1), _rows(0.9)) is True
        after = db.counts()
        assert after["results"] == before["results"] + 12
        assert db.add_submission(_sub(1), _rows(0.1)) is False  # same content id: nothing changes
        assert db.counts() == after
        assert {r["value"] for r in db.results(submission=_sub(1)["sha256"])} == {0.9}
        assert db.results(submission=_sub(1)["sha256"])[0]["hardware"] == '{"device": "cpu"}'


def test_failed_transaction_leaves_store_unchanged(tmp_path):
    with Store(tmp_path / "lb.sqlite") as db:
        before = db.counts()
        bad = _rows(0.5) + [{"category": "A", "protocol": "mvtec", "metric": None, "value": 1.0}]
        with pytest.raises(ThreecadError, match="lacks 'metric'"):
            db.add_submission(_sub(2), bad)
        rows = _rows(0.5)
        rows[3]["value"] = "not a number"
        with pytest.raises(ValueError):
            db.add_submission(_sub(3), rows)
        assert db.counts() == before and not db.has_submission(_sub(3)["sha256"])


def _writer(path: str, start: int, count: int, barrier=None) -> None:
    with Store(path) as db:
        if barrier is not None:
            barrier.wait(60)  # both connections open: the writes really overlap
        for i in range(start, start + count):
            db.add_submission(_sub(i, f"W{start}"), _rows(i / 1000))


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "lb.sqlite")
    Store(path).close()
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: real separate connections
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(path, start, 40, barrier)) for start in (1000, 2000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with Store(path) as db:
        evaluated = db.submissions("evaluated")
        assert len(evaluated) == 80
        assert len(db.results(source="evaluated")) == 80 * 12
        assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_same_submission_from_two_processes_is_stored_once(tmp_path):
    path = str(tmp_path / "lb.sqlite")
    Store(path).close()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(path, 7, 1, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with Store(path) as db:
        assert len(db.results(submission=_sub(7)["sha256"])) == 12


def test_migration_from_version_1_keeps_data(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.executescript(MIGRATIONS[0])
    conn.execute("INSERT INTO schema_version VALUES (1)")
    conn.execute("INSERT INTO submissions (sha256, method, source, created_at) VALUES ('s1', 'Old', 'evaluated', 't')")
    conn.execute("INSERT INTO results (submission_sha256, method, category, protocol, metric, value, timestamp, "
                 "source) VALUES ('s1', 'Old', 'A', 'mvtec', 'p_auroc', 0.75, 't', 'evaluated')")
    conn.commit()
    conn.close()
    with Store(path, seed_reported=False) as db:
        assert db.schema_version() == SCHEMA_VERSION == 3
        rows = db.results()
        assert len(rows) == 1 and rows[0]["value"] == 0.75 and rows[0]["hardware"] is None
        assert db.curves() == []  # the table added by step 2 exists
        db.add_submission({**_sub(9), "hardware": {"gpu": "x"}}, _rows(0.2),
                          [{"category": "A", "protocol": "mvtec", "kind": "roc", "x": [0, 1], "y": [0, 1]}])
        assert db.curves()[0]["y"] == [0, 1]


def test_newer_schema_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "future.sqlite"
    Store(path, seed_reported=False).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(ThreecadError, match="newer than this threecad"):
        Store(path)
    (tmp_path / "junk.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ThreecadError, match="not a usable leaderboard store"):
        Store(tmp_path / "junk.sqlite")


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_export_import_round_trip(tmp_path, fmt):
    source = tmp_path / "a.sqlite"
    with Store(source) as db:
        db.add_submission(_sub(5), _rows(0.25),
                          [{"category": "A", "protocol": "mvtec", "kind": "pro", "x": [0, 0.3], "y": [0, 0.5]}])
        rows = db.results(source="evaluated")
        n = db.export(tmp_path / f"out.{fmt}")
        assert n == db.counts()["results"]
    with Store(tmp_path / "b.sqlite", seed_reported=False) as other:
        counts = other.import_(tmp_path / f"out.{fmt}")
        assert counts["added"] == 12 and counts["skipped"] == 0  # 11 reported methods + ours
        again = other.import_(tmp_path / f"out.{fmt}")
        assert again["added"] == 0 and again["skipped"] == 12
        imported = other.results(source="evaluated")
        keys = ("method", "category", "protocol", "metric", "value", "submission_sha256", "source")
        assert [{k: r[k] for k in keys} for r in imported] == [{k: r[k] for k in keys} for r in rows]
        assert other.counts()["results"] == n
        assert len(other.curves()) == (1 if fmt == "json" else 0)  # CSV carries numbers only


def test_import_rejects_bad_files(tmp_path):
    with Store(tmp_path / "lb.sqlite", seed_reported=False) as db:
        bad = tmp_path / "bad.csv"
        bad.write_text("method,value\nA,1\n")
        with pytest.raises(ThreecadError, match="missing columns"):
            db.import_(bad)
        broken = tmp_path / "bad.json"
        broken.write_text(json.dumps({"nothing": 1}))
        with pytest.raises(ThreecadError, match="not a leaderboard JSON export"):
            db.import_(broken)
        assert db.counts()["results"] == 0


def test_default_path_and_cli_export(tmp_path, monkeypatch):
    monkeypatch.setenv(store_module.ENV_STORE, str(tmp_path / "env.sqlite"))
    assert store_module.default_store_path() == tmp_path / "env.sqlite"
    runner = CliRunner()
    out = tmp_path / "all.csv"
    missing = runner.invoke(cli, ["leaderboard", "export", str(out)])  # export reads: it creates no store
    assert missing.exit_code == 1 and f"no store at {tmp_path / 'env.sqlite'}" in missing.output
    assert not (tmp_path / "env.sqlite").exists() and not out.exists()
    Store().close()  # the default path, from the environment
    result = runner.invoke(cli, ["leaderboard", "export", str(out)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "env.sqlite").is_file()
    assert len(out.read_text().splitlines()) == len(reported_rows()) + 1
    result = runner.invoke(cli, ["leaderboard", "list", "--source", "reported"])
    assert result.exit_code == 0 and result.output.count("reported") == 11
