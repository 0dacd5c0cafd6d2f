"""The results store: one SQLite file holding every leaderboard number and where it came from.

Why SQLite: one file, no server, safe for several processes at once. Writers take the write lock up
front (``BEGIN IMMEDIATE``), the journal is WAL (readers never block the writer) and a busy timeout
makes a second writer wait instead of failing, so two ``submit`` commands running at the same time
both land. A submission is keyed by the sha256 of its content: storing the same bytes again is a
no-op, even when two processes race to store them.

The schema is versioned (table ``schema_version``) and migrated forward on open, one step at a time
inside one transaction, so an old file is upgraded in place and a failed step leaves it unchanged.

Values are fractions in [0, 1] as the evaluator returns them; tables print percentages.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from threecad.errors import ThreecadError
from threecad.io import write_text

log = logging.getLogger(__name__)

ENV_STORE = "THREECAD_STORE"
DEFAULT_STORE = Path("~/.threecad/leaderboard.sqlite")
BUSY_TIMEOUT_S = 120.0
SOURCES = ("evaluated", "reported")

#: The columns of a result row, as exported and imported.
RESULT_COLUMNS = (
    "method", "version", "family", "category", "protocol", "metric", "value", "submission_sha256",
    "dataset_fingerprint", "eval_size", "hardware", "timestamp", "source",
)

# Each entry upgrades the schema from version i to i + 1. Never edit a released step: add one.
MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: submissions and their per-category, per-protocol metric values.
    """
    CREATE TABLE submissions (
        sha256 TEXT PRIMARY KEY,
        method TEXT NOT NULL,
        version TEXT,
        family TEXT,
        source TEXT NOT NULL CHECK (source IN ('evaluated', 'reported')),
        dataset_fingerprint TEXT,
        eval_size TEXT,
        meta TEXT,
        created_at TEXT NOT NULL
    );
    CREATE TABLE results (
        id INTEGER PRIMARY KEY,
        submission_sha256 TEXT NOT NULL REFERENCES submissions(sha256),
        method TEXT NOT NULL,
        version TEXT,
        family TEXT,
        category TEXT NOT NULL,
        protocol TEXT NOT NULL,
        metric TEXT NOT NULL,
        value REAL,
        dataset_fingerprint TEXT,
        eval_size TEXT,
        timestamp TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('evaluated', 'reported')),
        UNIQUE (submission_sha256, category, protocol, metric)
    );
    """,
    # 1 -> 2: the hardware a number was measured on, curves for the site, a lookup index.
    """
    ALTER TABLE submissions ADD COLUMN hardware TEXT;
    ALTER TABLE results ADD COLUMN hardware TEXT;
    CREATE TABLE curves (
        submission_sha256 TEXT NOT NULL REFERENCES submissions(sha256),
        category TEXT NOT NULL,
        protocol TEXT NOT NULL,
        kind TEXT NOT NULL,
        x TEXT NOT NULL,
        y TEXT NOT NULL,
        PRIMARY KEY (submission_sha256, category, protocol, kind)
    );
    CREATE INDEX results_lookup ON results (protocol, metric, source);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def default_store_path() -> Path:
    """``$THREECAD_STORE`` or ``~/.threecad/leaderboard.sqlite``."""
    return Path(os.environ.get(ENV_STORE) or DEFAULT_STORE).expanduser()


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _split_statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


class Store:
    """Open (creating and migrating as needed) the SQLite store at ``path``.

    ``seed_reported`` loads the paper's Tables 3 and 4 as ``reported`` entries on first open (a
    no-op afterwards: they are keyed by their own content hash like any submission).
    """

    def __init__(self, path: str | Path | None = None, seed_reported: bool = True):
        self.path = Path(path).expanduser() if path is not None else default_store_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ThreecadError(f"not a usable leaderboard store ({exc})", self.path) from None
        if seed_reported:
            self.seed_reported()

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the write lock from its first statement (no lost updates)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def schema_version(self) -> int:
        exists = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if not exists:
            return 0
        row = self.conn.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        if self.schema_version() == SCHEMA_VERSION:
            return
        with self.transaction() as conn:  # re-read under the lock: another process may have migrated
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise ThreecadError(
                    f"store schema version {version} is newer than this threecad ({SCHEMA_VERSION}); upgrade threecad",
                    self.path,
                )
            if version == 0:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            for step in range(version, SCHEMA_VERSION):
                log.info("migrating store %s from schema %d to %d", self.path, step, step + 1)
                for statement in _split_statements(MIGRATIONS[step]):
                    conn.execute(statement)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    # ------------------------------------------------------------------ writing
    def has_submission(self, sha256: str) -> bool:
        return self.conn.execute("SELECT 1 FROM submissions WHERE sha256 = ?", (sha256,)).fetchone() is not None

    def add_submission(
        self,
        submission: dict[str, Any],
        results: Iterable[dict[str, Any]],
        curves: Iterable[dict[str, Any]] = (),
        replace_results: bool = False,
    ) -> bool:
        """Store a submission and its results in one transaction; ``False`` if its sha256 was already there.

        ``submission`` needs ``sha256``, ``method`` and ``source``; optional ``version``, ``family``,
        ``dataset_fingerprint``, ``eval_size``, ``hardware``, ``meta`` (dicts are stored as JSON).
        Each result needs ``category``, ``protocol``, ``metric``, ``value``; submission fields fill the rest.
        With ``replace_results`` an existing submission gets these results added (standardized runs
        that resume category by category); otherwise an existing submission is left untouched.
        """
        sub = _normalise_submission(submission)
        rows = [_result_row(sub, r) for r in results]
        curve_rows = [
            (sub["sha256"], c["category"], c["protocol"], c["kind"], json.dumps(c["x"]), json.dumps(c["y"]))
            for c in curves
        ]
        with self.transaction() as conn:
            exists = self.has_submission(sub["sha256"])
            if exists and not replace_results:
                return False
            if not exists:
                conn.execute(
                    "INSERT INTO submissions (sha256, method, version, family, source, dataset_fingerprint, "
                    "eval_size, meta, created_at, hardware) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    tuple(sub[k] for k in ("sha256", "method", "version", "family", "source",
                                           "dataset_fingerprint", "eval_size", "meta", "created_at", "hardware")),
                )
            conn.executemany(
                f"INSERT OR REPLACE INTO results ({', '.join(RESULT_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(RESULT_COLUMNS))})",
                [tuple(r[c] for c in RESULT_COLUMNS) for r in rows],
            )
            conn.executemany("INSERT OR REPLACE INTO curves VALUES (?, ?, ?, ?, ?, ?)", curve_rows)
        return not exists

    def delete_submission(self, sha256: str) -> int:
        """Remove a submission and everything stored with it; returns the number of result rows removed."""
        with self.transaction() as conn:
            n = conn.execute("DELETE FROM results WHERE submission_sha256 = ?", (sha256,)).rowcount
            conn.execute("DELETE FROM curves WHERE submission_sha256 = ?", (sha256,))
            conn.execute("DELETE FROM submissions WHERE sha256 = ?", (sha256,))
        return n

    def seed_reported(self) -> int:
        """Load the paper's published results, one entry per method (idempotent); returns entries added."""
        from leaderboard import reported

        by_method: dict[str, list[dict[str, Any]]] = {}
        for row in reported.reported_rows():
            by_method.setdefault(row["method"], []).append(row)
        added = 0
        for method, rows in by_method.items():
            digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
            if self.has_submission(digest):
                continue
            sub = {
                "sha256": digest, "method": method, "version": "paper", "family": rows[0]["family"],
                "source": "reported", "eval_size": "256x256",
                "meta": {"paper": reported.PAPER, "protocol": reported.PROTOCOL},
            }
            added += self.add_submission(sub, rows)
        return added

    # ------------------------------------------------------------------ reading
    def results(
        self,
        source: str | None = None,
        protocol: str | None = None,
        metrics: Iterable[str] | None = None,
        methods: Iterable[str] | None = None,
        submission: str | None = None,
    ) -> list[dict[str, Any]]:
        """Result rows as dicts (``source`` ``all`` or ``None`` for both sources)."""
        where, args = [], []
        if source not in (None, "all"):
            if source not in SOURCES:
                raise ThreecadError(f"unknown source {source!r}; expected evaluated, reported or all")
            where.append("source = ?")
            args.append(source)
        if protocol is not None:
            where.append("protocol = ?")
            args.append(protocol)
        for column, values in (("metric", metrics), ("method", methods)):
            if values is not None:
                values = list(values)
                where.append(f"{column} IN ({', '.join('?' * len(values))})")
                args.extend(values)
        if submission is not None:
            where.append("submission_sha256 = ?")
            args.append(submission)
        sql = f"SELECT {', '.join(RESULT_COLUMNS)} FROM results"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY id", args)]

    def submissions(self, source: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM submissions"
        args: tuple = ()
        if source not in (None, "all"):
            sql += " WHERE source = ?"
            args = (source,)
        out = []
        for row in self.conn.execute(sql + " ORDER BY created_at, sha256", args):
            item = dict(row)
            item["meta"] = json.loads(item["meta"]) if item.get("meta") else {}
            item["n_results"] = self.conn.execute(
                "SELECT COUNT(*) FROM results WHERE submission_sha256 = ?", (item["sha256"],)
            ).fetchone()[0]
            out.append(item)
        return out

    def curves(self, submission: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM curves", ()
        if submission is not None:
            sql, args = sql + " WHERE submission_sha256 = ?", (submission,)
        return [
            {**dict(r), "x": json.loads(r["x"]), "y": json.loads(r["y"])}
            for r in self.conn.execute(sql + " ORDER BY submission_sha256, category, protocol, kind", args)
        ]

    def categories_done(self, sha256: str, protocols: Iterable[str]) -> set[str]:
        """Categories of a submission that have results under every one of ``protocols``."""
        protocols = list(protocols)
        rows = self.conn.execute(
            f"SELECT category FROM results WHERE submission_sha256 = ? AND protocol IN "
            f"({', '.join('?' * len(protocols))}) GROUP BY category HAVING COUNT(DISTINCT protocol) = ?",
            (sha256, *protocols, len(protocols)),
        )
        return {r[0] for r in rows}

    def counts(self) -> dict[str, int]:
        return {
            t: self.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("submissions", "results", "curves")
        }

    # ------------------------------------------------------------------ sharing
    def export(self, path: str | Path, fmt: str | None = None, source: str | None = None) -> int:
        """Write results as CSV (one row per number) or JSON (submissions, results and curves)."""
        path = Path(path)
        fmt = fmt or ("json" if path.suffix.lower() == ".json" else "csv")
        rows = self.results(source=source)
        if fmt == "csv":
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            write_text(path, buffer.getvalue())
        elif fmt == "json":
            shas = {r["submission_sha256"] for r in rows}
            payload = {
                "format": "threecad-leaderboard",
                "schema_version": SCHEMA_VERSION,
                "submissions": [s for s in self.submissions() if s["sha256"] in shas],
                "results": rows,
                "curves": [c for c in self.curves() if c["submission_sha256"] in shas],
            }
            for sub in payload["submissions"]:
                sub.pop("n_results", None)
            write_text(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")
        else:
            raise ThreecadError(f"unknown export format {fmt!r}; expected csv or json")
        return len(rows)

    def import_(self, path: str | Path) -> dict[str, int]:
        """Merge an export (CSV or JSON) into this store; submissions already present are skipped."""
        path = Path(path)
        if not path.is_file():
            raise ThreecadError("import file not found", path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ThreecadError(f"unreadable import file ({exc})", path) from None
        subs: dict[str, dict[str, Any]] = {}
        curves: dict[str, list[dict[str, Any]]] = {}
        if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
            try:
                payload = json.loads(text)
                rows = payload["results"]
                subs = {s["sha256"]: s for s in payload.get("submissions", [])}
                for c in payload.get("curves", []):
                    curves.setdefault(c["submission_sha256"], []).append(c)
            except (ValueError, KeyError, TypeError) as exc:
                raise ThreecadError(f"not a leaderboard JSON export ({exc})", path) from None
        else:
            reader = csv.DictReader(io.StringIO(text))
            missing = set(RESULT_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise ThreecadError(f"not a leaderboard CSV export: missing columns {', '.join(sorted(missing))}", path)
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    row["value"] = None if row["value"] in ("", None) else float(row["value"])
                except ValueError:
                    raise ThreecadError(f"line {line}: value {row['value']!r} is not a number", path) from None
                rows.append({k: (None if v == "" else v) for k, v in row.items()})
        grouped: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if not row.get("submission_sha256"):
                raise ThreecadError("a row has no submission_sha256", path)
            grouped.setdefault(row["submission_sha256"], []).append(row)
        added = skipped = 0
        for sha, sub_rows in grouped.items():
            first = sub_rows[0]
            sub = subs.get(sha) or {k: first.get(k) for k in (
                "method", "version", "family", "dataset_fingerprint", "eval_size", "hardware", "source")}
            sub = {**sub, "sha256": sha, "method": sub.get("method") or first["method"],
                   "source": sub.get("source") or first["source"]}
            if self.add_submission(sub, sub_rows, curves.get(sha, ())):
                added += 1
            else:
                skipped += 1
        return {"added": added, "skipped": skipped, "rows": len(rows)}


def _json_or_none(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _normalise_submission(sub: dict[str, Any]) -> dict[str, Any]:
    for key in ("sha256", "method", "source"):
        if not sub.get(key):
            raise ThreecadError(f"submission record lacks {key!r}")
    if sub["source"] not in SOURCES:
        raise ThreecadError(f"source must be evaluated or reported, not {sub['source']!r}")
    out = {k: sub.get(k) for k in ("sha256", "method", "version", "family", "source", "dataset_fingerprint")}
    out["eval_size"] = _json_or_none(sub.get("eval_size"))
    out["hardware"] = _json_or_none(sub.get("hardware"))
    out["meta"] = _json_or_none(sub.get("meta"))
    out["created_at"] = sub.get("created_at") or now()
    return out


def _result_row(sub: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    for key in ("category", "protocol", "metric"):
        if not result.get(key):
            raise ThreecadError(f"result row lacks {key!r}: {result}")
    value = result.get("value")
    row = {c: result.get(c) for c in RESULT_COLUMNS}
    row["value"] = None if value is None else float(value)
    row["submission_sha256"] = sub["sha256"]
    for key in ("method", "version", "family", "dataset_fingerprint", "eval_size", "hardware", "source"):
        if row.get(key) is None:
            row[key] = sub.get(key)
    row["eval_size"] = _json_or_none(row["eval_size"])
    row["hardware"] = _json_or_none(row["hardware"])
    row["timestamp"] = row.get("timestamp") or sub["created_at"]
    return row
