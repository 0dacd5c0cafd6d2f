"""The results store: one SQLite file holding every leaderboard number and where it came from.

Why SQLite: one file, no server, safe for several processes at once. Writers take the write lock up
front (``BEGIN IMMEDIATE``), the journal is WAL (readers never block the writer) and a busy timeout
makes a second writer wait instead of failing, so two ``submit`` commands running at the same time
both land. A submission is keyed by the sha256 of its content: storing the same bytes again is a
no-op, even when two processes race to store them.

The schema is versioned (table ``schema_version``) and migrated forward on open, one step at a time
inside one transaction, so an old file is upgraded in place and a failed step leaves it unchanged.

Values are fractions in [0, 1] as the evaluator returns them; tables print percentages.

Integrity: every open runs ``PRAGMA quick_check`` before reading or writing anything, so a damaged
file is one error naming it, never a partial answer; :func:`check_store` runs the full
``PRAGMA integrity_check`` (``3cad leaderboard check``). Read-only opens (``readonly=True``: list,
table, export, site, check) use SQLite's ``mode=ro`` and never create a store or its folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from leaderboard.tables import csv_cell, csv_uncell, dataset_text, one_line
from threecad.errors import ThreecadError, located
from threecad.io import write_text

log = logging.getLogger(__name__)

ENV_STORE = "THREECAD_STORE"
DEFAULT_STORE = Path("~/.threecad/leaderboard.sqlite")
BUSY_TIMEOUT_S = 120.0
SOURCES = ("evaluated", "reported")
#: ``meta["runner"]`` of standardized runs (``leaderboard.standardized``): the one writer whose ``hardware``
#: column holds a JSON object we produced ourselves (see :func:`hardware_label`).
STANDARDIZED_RUNNER = "leaderboard.standardized.standardized_run"
#: Text columns of a submission / result record: each is a string or absent, never a number or object.
TEXT_FIELDS = ("sha256", "method", "version", "family", "source", "dataset_fingerprint", "dataset_name", "created_at")
RESULT_TEXT_FIELDS = ("category", "protocol", "metric", "timestamp")
#: What ``PRAGMA quick_check`` / ``integrity_check`` may list before stopping (SQLite's own default).
MAX_CHECK_PROBLEMS = 100

#: The columns of a result row, as exported and imported.
RESULT_COLUMNS = (
    "method", "version", "family", "category", "protocol", "metric", "value", "submission_sha256",
    "dataset_fingerprint", "eval_size", "hardware", "timestamp", "source", "dataset_name",
)
#: Columns an import may lack: exports written before schema 3 have no ``dataset_name``.
OPTIONAL_IMPORT_COLUMNS = frozenset({"dataset_name"})

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
    # 2 -> 3: the dataset's name beside its fingerprint, so tables can group by dataset. Older
    # evaluated rows keep their fingerprint and get no name (shown as the fingerprint prefix);
    # the paper's rows are 3CAD by definition.
    """
    ALTER TABLE submissions ADD COLUMN dataset_name TEXT;
    ALTER TABLE results ADD COLUMN dataset_name TEXT;
    UPDATE submissions SET dataset_name = '3CAD' WHERE source = 'reported';
    UPDATE results SET dataset_name = '3CAD' WHERE source = 'reported';
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


# ---------------------------------------------------------------------------------------------- opening, checks
def _not_a_database(exc: sqlite3.DatabaseError) -> bool:
    return getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB" or "file is not a database" in str(exc)


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    return getattr(exc, "sqlite_errorname", "").startswith("SQLITE_CORRUPT") or "malformed" in str(exc)


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    """A connection to ``path``; read-only ones (``mode=ro``) need an existing file and create nothing.

    Only a writing open may create the store and its folder: a mistyped ``--store`` given to a
    command that reads must fail, not leave an empty store (and folders) behind.
    """
    if path.is_dir():
        raise ThreecadError("is a folder, not a leaderboard store file; pass the store's .sqlite file", path)
    if readonly and not path.exists():
        raise ThreecadError(f"no store at {path}; check --store (or $THREECAD_STORE): only "
                            "`3cad leaderboard submit`, `run`, `benchmark` and `import` create one")
    if not readonly:
        path.parent.mkdir(parents=True, exist_ok=True)
    target = path.absolute().as_uri() + "?mode=ro" if readonly else str(path)
    try:
        conn = sqlite3.connect(target, timeout=BUSY_TIMEOUT_S, isolation_level=None, uri=readonly)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    except sqlite3.Error as exc:
        raise ThreecadError(f"cannot open the leaderboard store ({exc})", path) from None
    return conn


def _problem_lines(rows: Iterable[sqlite3.Row | tuple]) -> list[str]:
    """The rows of ``quick_check``/``integrity_check`` as one problem per line (``ok`` = none)."""
    lines = [line.strip() for row in rows for line in str(row[0]).splitlines()]
    return [line for line in lines if line and line != "ok" and not line.startswith("*** in database")]


def _run_check(conn: sqlite3.Connection, path: Path, pragma: str) -> list[str]:
    """Problems ``PRAGMA <pragma>`` reports; a file that is not SQLite at all is an error naming it."""
    try:
        return _problem_lines(conn.execute(f"PRAGMA {pragma}({MAX_CHECK_PROBLEMS})").fetchall())
    except sqlite3.DatabaseError as exc:
        if _not_a_database(exc):
            raise ThreecadError(f"not a usable leaderboard store: not an SQLite database ({exc}); "
                                "pass the right --store", path) from None
        if _damaged(exc):
            return [str(exc)]
        raise


def _quick_check(conn: sqlite3.Connection, path: Path) -> list[str]:
    """``PRAGMA quick_check``: every page's b-tree structure, in time linear in the file (milliseconds
    for a leaderboard); unlike ``integrity_check`` it skips the index-versus-table comparison."""
    return _run_check(conn, path, "quick_check")


def _schema_version(conn: sqlite3.Connection) -> int:
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0


@dataclass
class StoreCheck:
    """What ``3cad leaderboard check`` found: ``problems`` empty means intact."""

    path: Path
    problems: list[str] = field(default_factory=list)
    schema_version: int | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        if self.ok:
            counts = ", ".join(f"{n} {table}" for table, n in self.counts.items())
            return f"{self.path}: OK (integrity_check and foreign_key_check passed; schema {self.schema_version}; {counts})"
        lines = [f"{self.path}: DAMAGED, {len(self.problems)} problem(s):"]
        return "\n".join([*lines, *(f"  {p}" for p in self.problems)])


def check_store(path: str | Path | None = None) -> StoreCheck:
    """Full ``PRAGMA integrity_check`` and ``foreign_key_check`` of an existing store, read-only.

    Unlike :class:`Store`, which refuses a damaged file, this lists what is wrong (up to
    ``MAX_CHECK_PROBLEMS`` = 100 lines); a missing file or one that is not SQLite at all raises.
    """
    path = Path(path).expanduser() if path is not None else default_store_path()
    conn = _connect(path, readonly=True)
    try:
        result = StoreCheck(path, _run_check(conn, path, "integrity_check"))
        if len(result.problems) == 1:  # integrity_check may stop at the first bad page; quick_check lists more
            result.problems = max(result.problems, _quick_check(conn, path), key=len)
        if result.problems:
            return result
        try:
            for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check").fetchall():
                result.problems.append(f"table {table} row {rowid} refers to a missing {parent} row")
            result.schema_version = _schema_version(conn)
            if result.schema_version == 0:
                result.problems.append("not a leaderboard store: no schema_version table")
            else:
                present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                result.counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                                 for t in ("submissions", "results", "curves") if t in present}
        except sqlite3.DatabaseError as exc:
            result.problems.append(f"{exc.__class__.__name__}: {exc}")
        return result
    finally:
        conn.close()


class Store:
    """Open (creating and migrating as needed) the SQLite store at ``path``.

    ``seed_reported`` loads the paper's Tables 3 and 4 as ``reported`` entries on first open (a
    no-op afterwards: they are keyed by their own content hash like any submission).

    ``readonly`` is for commands that only read: the store must already exist (else "no store at
    PATH"), nothing is created (not even its folder), migrated or seeded, and SQLite itself refuses
    writes (``mode=ro``). Either way the file is checked with ``PRAGMA quick_check`` first.
    """

    def __init__(self, path: str | Path | None = None, seed_reported: bool = True, readonly: bool = False):
        self.path = Path(path).expanduser() if path is not None else default_store_path()
        self.readonly = readonly
        self.conn = _connect(self.path, readonly)
        try:
            problems = _quick_check(self.conn, self.path)
            if problems:
                raise ThreecadError(
                    f"damaged leaderboard store: PRAGMA quick_check found {len(problems)} problem(s), first: "
                    f"{problems[0]}; nothing was read. Run `3cad leaderboard check --store {self.path}` for the "
                    "list and restore the file from a backup or an export", self.path)
            needs_migration = self._check_schema()  # before anything is written, even the journal mode
            if not readonly:
                self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            if needs_migration:
                self._migrate()
            if seed_reported and not readonly:
                self.seed_reported()
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise ThreecadError(f"not a usable leaderboard store ({exc})", self.path) from None
        except BaseException:
            self.conn.close()
            raise

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
        if self.readonly:
            raise ThreecadError("the store was opened read-only; this command cannot change it", self.path)
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def schema_version(self) -> int:
        return _schema_version(self.conn)

    def _check_schema(self) -> bool:
        """Whether the file needs migrating; an error for a file this threecad must not touch."""
        version = self.schema_version()
        if version == SCHEMA_VERSION:
            return False
        if version > SCHEMA_VERSION:
            raise ThreecadError(
                f"store schema version {version} is newer than this threecad ({SCHEMA_VERSION}); upgrade threecad",
                self.path,
            )
        if version == 0:
            tables = [r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            if tables:  # someone else's database: never add our tables to it
                raise ThreecadError(f"an SQLite file but not a leaderboard store (it holds tables "
                                    f"{', '.join(map(repr, tables[:5]))}); pass the right --store", self.path)
        if self.readonly:
            raise ThreecadError(
                f"store schema version {version} is not this threecad's ({SCHEMA_VERSION}); a writing command "
                "(`3cad leaderboard import`, `submit` or `run`) migrates an older store in place", self.path)
        return True

    def _migrate(self) -> None:
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
        ``dataset_fingerprint``, ``dataset_name`` (what tables group by with the fingerprint; None when
        unknown, shown as the fingerprint prefix), ``eval_size``, ``hardware``, ``meta`` (dicts are
        stored as JSON).
        Each result needs ``category``, ``protocol``, ``metric``, ``value``; submission fields fill the rest.
        With ``replace_results`` an existing submission gets these results added (standardized runs
        that resume category by category); otherwise an existing submission is left untouched.
        """
        sub = _normalise_submission(submission)
        rows = [_result_row(sub, r) for r in results]
        curve_rows = [_curve_row(sub, c) for c in curves]
        with self.transaction() as conn:
            exists = self.has_submission(sub["sha256"])
            if exists and not replace_results:
                return False
            if not exists:
                conn.execute(
                    "INSERT INTO submissions (sha256, method, version, family, source, dataset_fingerprint, "
                    "eval_size, meta, created_at, hardware, dataset_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    tuple(sub[k] for k in ("sha256", "method", "version", "family", "source", "dataset_fingerprint",
                                           "eval_size", "meta", "created_at", "hardware", "dataset_name")),
                )
            conn.executemany(
                f"INSERT OR REPLACE INTO results ({', '.join(RESULT_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(RESULT_COLUMNS))})",
                [tuple(r[c] for c in RESULT_COLUMNS) for r in rows],
            )
            conn.executemany("INSERT OR REPLACE INTO curves VALUES (?, ?, ?, ?, ?, ?)", curve_rows)
        return not exists

    def seed_reported(self) -> int:
        """Load the paper's published results, one entry per method (idempotent); returns entries added."""
        from leaderboard import reported

        by_method: dict[str, list[dict[str, Any]]] = {}
        for row in reported.reported_rows():  # the digest covers these rows only: adding fields changes no key
            by_method.setdefault(row["method"], []).append(row)
        added = 0
        for method, rows in by_method.items():
            digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
            if self.has_submission(digest):
                continue
            sub = {
                "sha256": digest, "method": method, "version": "paper", "family": rows[0]["family"],
                "source": "reported", "eval_size": "256x256", "dataset_name": reported.DATASET,
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
            item["meta"] = self._decode(item.get("meta"), "meta", item["sha256"]) or {}
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
            {**dict(r), "x": self._decode(r["x"], "curve x", r["submission_sha256"]),
             "y": self._decode(r["y"], "curve y", r["submission_sha256"])}
            for r in self.conn.execute(sql + " ORDER BY submission_sha256, category, protocol, kind", args)
        ]

    def _decode(self, text: str | None, what: str, sha256: str) -> Any:
        """A JSON column this module wrote itself (``meta``, curve points) read back.

        Only columns that :meth:`add_submission` always fills with ``json.dumps`` output are decoded;
        free-text columns (``hardware``, ``eval_size``, names) are never parsed. A value that does not
        decode means the file was edited or damaged: an error naming the store, not a traceback.
        """
        if text is None or text == "":
            return None
        try:
            return json.loads(text)
        except (TypeError, ValueError):
            raise ThreecadError(f"submission {sha256[:12]}: stored {what} is not the JSON this store writes; "
                                "the file was edited or damaged (run `3cad leaderboard check`)", self.path) from None

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
            writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
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
            missing = set(RESULT_COLUMNS) - set(reader.fieldnames or ()) - OPTIONAL_IMPORT_COLUMNS
            if missing:
                raise ThreecadError(f"not a leaderboard CSV export: missing columns {', '.join(sorted(missing))}", path)
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    row["value"] = None if row["value"] in ("", None) else float(row["value"])
                except ValueError:
                    raise ThreecadError(f"line {line}: value {row['value']!r} is not a number", path) from None
                rows.append({k: (None if v in ("", None) else csv_uncell(v)) for k, v in row.items()
                             if k in RESULT_COLUMNS})
        grouped: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if not row.get("submission_sha256"):
                raise ThreecadError("a row has no submission_sha256", path)
            grouped.setdefault(row["submission_sha256"], []).append(row)
        records = []
        for sha, sub_rows in grouped.items():
            first = sub_rows[0]
            sub = subs.get(sha) or {k: first.get(k) for k in (
                "method", "version", "family", "dataset_fingerprint", "dataset_name", "eval_size", "hardware",
                "source")}
            sub = {**sub, "sha256": sha, "method": sub.get("method") or first.get("method"),
                   "source": sub.get("source") or first.get("source")}
            with located(path):  # every record checked before the first is written
                checked = _normalise_submission(sub)
                for row in sub_rows:
                    _result_row(checked, row)
                for curve in curves.get(sha, ()):
                    _curve_row(checked, curve)
            records.append((sub, sub_rows, curves.get(sha, ())))
        added = sum(self.add_submission(*record) for record in records)
        return {"added": added, "skipped": len(records) - added, "rows": len(rows)}


@contextmanager
def opened_store(store: Store | str | Path | None, readonly: bool = False) -> Iterator[Store]:
    """``store`` itself when it is an open :class:`Store` (the caller keeps it open), otherwise the
    store at that path (the default store for ``None``), closed on exit. Library functions take
    either, so a caller running many jobs can keep one connection."""
    if isinstance(store, Store):
        yield store
        return
    with Store(store, readonly=readonly) as db:
        yield db


def hardware_label(sub: dict[str, Any]) -> str:
    """What ``3cad leaderboard list`` shows as an entry's hardware: the stored text, literally.

    The one exception is a standardized run (``meta["runner"]`` is :data:`STANDARDIZED_RUNNER`):
    its column holds the JSON object that ``leaderboard.standardized.hardware_info`` returned, shown as the
    GPU name or "<cpu> xN". A submitted ``hardware`` is never parsed, whatever it looks like, and a
    run's column that does not decode to an object is shown as it is.
    """
    text = sub.get("hardware") or ""
    meta = sub.get("meta")
    if isinstance(meta, dict) and meta.get("runner") == STANDARDIZED_RUNNER:
        try:
            info = json.loads(text)
        except (TypeError, ValueError):
            info = None
        if isinstance(info, dict):
            text = str(info.get("gpu") or f"{info.get('cpu', '?')} x{info.get('cpu_count', '?')}")
    return one_line(text)


def format_submissions(subs: Iterable[dict[str, Any]]) -> str:
    """One line per stored submission (``3cad leaderboard list``): sha256 prefix, source, method,
    version, evaluation size, dataset (name and ``sha256:`` fingerprint prefix, see
    :func:`~leaderboard.tables.dataset_text`), results, time, hardware. Every text field goes through
    :func:`~leaderboard.tables.one_line`, so a name cannot add lines or terminal escapes."""
    lines = []
    for sub in subs:
        lines.append(f"{one_line(sub['sha256'][:12])}  {one_line(sub['source']):9s}  {one_line(sub['method']):12s} "
                     f"{one_line(sub['version'] or '-'):14s} {one_line(sub['eval_size'] or '-'):14s} "
                     f"{dataset_text(sub):28s} {sub['n_results']:4d} results  {one_line(sub['created_at'])}  "
                     f"{hardware_label(sub)}")
    return "".join(line + "\n" for line in lines)


def _json_or_none(value: Any) -> str | None:
    """Text as given; structured values (the hardware dict of a standardized run) as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _text_or_none(record: dict[str, Any], key: str, what: str) -> str | None:
    """``record[key]`` if it is text (or absent): SQLite would happily store a number or a list in a
    TEXT column, and every reader formats these columns as strings."""
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise ThreecadError(f"{what} {key!r} must be text, not {type(value).__name__} {str(value)[:40]!r}")
    return value


def _normalise_submission(sub: dict[str, Any]) -> dict[str, Any]:
    for key in ("sha256", "method", "source"):
        if not sub.get(key):
            raise ThreecadError(f"submission record lacks {key!r}")
    if sub["source"] not in SOURCES:
        raise ThreecadError(f"source must be evaluated or reported, not {sub['source']!r}")
    out = {k: _text_or_none(sub, k, "submission record") for k in TEXT_FIELDS}
    if out["source"] == "reported" and out["dataset_name"] is None:  # an import from before schema 3
        from leaderboard.reported import DATASET

        out["dataset_name"] = DATASET
    if sub.get("meta") is not None and not isinstance(sub["meta"], dict):
        raise ThreecadError(f"submission record {str(sub['sha256'])[:12]}: 'meta' must be an object, "
                            f"not {type(sub['meta']).__name__}")
    out["eval_size"] = _json_or_none(sub.get("eval_size"))
    out["hardware"] = _json_or_none(sub.get("hardware"))
    out["meta"] = None if sub.get("meta") is None else json.dumps(sub["meta"], sort_keys=True)
    out["created_at"] = out["created_at"] or now()
    return out


def _result_row(sub: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    for key in ("category", "protocol", "metric"):
        if not result.get(key):
            raise ThreecadError(f"result row lacks {key!r}: {result}")
    value = result.get("value")
    row = {c: result.get(c) for c in RESULT_COLUMNS}
    row["value"] = None if value is None else float(value)
    if row["value"] is not None and not math.isfinite(row["value"]):
        raise ThreecadError(f"result row {result.get('category')}/{result.get('metric')}: value {value!r} "
                            "is not a finite number")
    row["submission_sha256"] = sub["sha256"]
    for key in ("method", "version", "family", "dataset_fingerprint", "dataset_name", "eval_size", "hardware",
                "source"):
        if row.get(key) is None:
            row[key] = sub.get(key)
    for key in (*RESULT_TEXT_FIELDS, "method", "version", "family", "dataset_fingerprint", "dataset_name", "source"):
        _text_or_none(row, key, "result row")
    if row["source"] not in SOURCES:
        raise ThreecadError(f"result row source must be evaluated or reported, not {row['source']!r}")
    row["eval_size"] = _json_or_none(row["eval_size"])
    row["hardware"] = _json_or_none(row["hardware"])
    row["timestamp"] = row.get("timestamp") or sub["created_at"]
    return row


def _curve_row(sub: dict[str, Any], curve: dict[str, Any]) -> tuple:
    """One ``curves`` row; the points must be two equally long lists of finite numbers (the site
    plots them, so an imported export cannot smuggle in anything else)."""
    for key in ("category", "protocol", "kind"):
        if not curve.get(key) or not isinstance(curve[key], str):
            raise ThreecadError(f"curve of submission {sub['sha256'][:12]} lacks a text {key!r}")
    points = []
    for axis in ("x", "y"):
        values = curve.get(axis)
        if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ThreecadError(f"curve {curve['category']}/{curve['kind']} of submission {sub['sha256'][:12]}: "
                                f"{axis!r} must be a list of finite numbers")
        points.append([float(v) for v in values])
    if len(points[0]) != len(points[1]):
        raise ThreecadError(f"curve {curve['category']}/{curve['kind']} of submission {sub['sha256'][:12]}: "
                            "'x' and 'y' differ in length")
    return (sub["sha256"], curve["category"], curve["protocol"], curve["kind"], json.dumps(points[0]),
            json.dumps(points[1]))
