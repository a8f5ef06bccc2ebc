"""The ledger: one SQLite database (stdlib sqlite3) recording every run, its step metrics and its artifacts.

Tables (schema version 3):
    meta       key -> value; holds schema_version
    runs       one row per run: status, heartbeat, pid/host, config, hardware and summary as JSON text
    metrics    (run_id, step, name) -> value; re-logging a step overwrites it, as a resumed run repeats the steps
               after its last checkpoint
    artifacts  checkpoints, tokenizers, shards a run wrote, with sha256 and size
    requests   one row per served request (tokens, FLOPs, device-seconds, energy)
    guard_events  one row per guard finding that was not allowed (v2): request, direction, category, detector,
               score, action, and a sha256 of the text checked (the text itself only if the policy says so)
    run_events  things that happened to a run besides its metrics (v3): a DiLoCo site dropped from an exchange or
               rejoining, with the step, the site and a JSON detail

Several processes use the database at once (a training run writing, `lmforge runs` reading), so it runs in WAL
mode with a busy timeout, and writes take the write lock up front (BEGIN IMMEDIATE) so a transaction never
fails half-way on a lock upgrade. Each Ledger keeps one connection (closing the last connection to a WAL
database checkpoints it, ~10 ms, too slow to pay per logged step). Times are Unix seconds. A run whose process
died without saying so (SIGKILL, OOM, power loss) is found by its pid and marked 'crashed' whenever runs are
listed or looked up.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

RUN_STATUSES = ("running", "completed", "failed", "interrupted", "crashed")
FINAL_STATUSES = RUN_STATUSES[1:]
BUSY_TIMEOUT_S = 30.0  # a writer holds the lock for milliseconds; waiting 30 s only matters on a stalled disk

SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'interrupted', 'crashed')),
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    ended_at REAL,
    pid INTEGER,
    proc_start TEXT,
    host TEXT,
    config_json TEXT,
    hardware_json TEXT,
    summary_json TEXT,
    error TEXT,
    run_dir TEXT
);
CREATE TABLE metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    time REAL NOT NULL,
    PRIMARY KEY (run_id, step, name)
) WITHOUT ROWID;
CREATE INDEX metrics_by_name ON metrics (run_id, name, step);
CREATE TABLE artifacts (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT,
    bytes INTEGER,
    created_at REAL NOT NULL
);
CREATE INDEX artifacts_by_run ON artifacts (run_id);
CREATE TABLE requests (
    id INTEGER PRIMARY KEY,
    run_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,
    created_at REAL NOT NULL,
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    flops REAL,
    device_seconds REAL,
    energy_j REAL,
    status TEXT
);
CREATE INDEX requests_by_time ON requests (created_at);
"""


SCHEMA_V2 = """
CREATE TABLE guard_events (
    id INTEGER PRIMARY KEY,
    run_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,
    created_at REAL NOT NULL,
    request_id TEXT,
    direction TEXT NOT NULL,
    category TEXT NOT NULL,
    detector TEXT NOT NULL,
    score REAL,
    action TEXT NOT NULL,
    text_sha256 TEXT NOT NULL,
    text TEXT
);
CREATE INDEX guard_events_by_time ON guard_events (created_at);
"""

SCHEMA_V3 = """
CREATE TABLE run_events (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX run_events_by_run ON run_events (run_id, id);
"""


def _statements(schema: str) -> Callable[[sqlite3.Connection], None]:
    def migrate(conn: sqlite3.Connection) -> None:
        for statement in schema.split(";"):
            if statement.strip():
                conn.execute(statement)
    return migrate


# MIGRATIONS[i] takes a database from schema version i to i + 1 (version 0 = empty file). Append, never edit.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_statements(SCHEMA_V1), _statements(SCHEMA_V2),
                                                         _statements(SCHEMA_V3)]
SCHEMA_VERSION = len(MIGRATIONS)

JSON_COLUMNS = {"config_json": "config", "hardware_json": "hardware", "summary_json": "summary"}


class Ledger:
    """The run ledger at `path` (created, or migrated to the current schema, on open)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.host = socket.gethostname()
        self._lock = threading.RLock()  # one connection per Ledger, shared by the threads of one process
        self._conn: sqlite3.Connection | None = None
        self._conn_pid = 0
        try:
            with self._lock:
                self._migrate(self._connection())
        except BaseException as e:
            self.close()
            if not isinstance(e, sqlite3.DatabaseError):
                raise
            raise LmforgeError(
                f"cannot open the ledger {self.path}: {e}; move the file aside and lmforge starts a new one"
            ) from e

    def _connection(self) -> sqlite3.Connection:
        """This process's connection, opened on first use (and again in a forked child, which must not share it)."""
        if self._conn is None or self._conn_pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor it them
            # WAL + NORMAL never corrupts the file; a power cut may lose the last commits, which a ledger can
            # afford for a commit without fsync
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._conn, self._conn_pid = conn, os.getpid()
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._conn_pid == os.getpid():
                self._conn.close()
            self._conn = None

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")  # two processes opening a new ledger at once: one migrates, one waits
        try:
            version = self._schema_version(conn)
            if version > SCHEMA_VERSION:
                raise LmforgeError(
                    f"the ledger {self.path} has schema version {version}, newer than this lmforge understands "
                    f"({SCHEMA_VERSION}); upgrade lmforge, or use another --workspace"
                )
            for migrate in MIGRATIONS[version:]:
                migrate(conn)
            if version < SCHEMA_VERSION:
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int:
        has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if not has_meta:
            return 0
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    @contextlib.contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """The connection, alone; with write=True inside one transaction that takes the write lock up front."""
        with self._lock:
            conn = self._connection()
            if not write:
                yield conn
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may already have rolled back (disk full, I/O error)
                    conn.execute("ROLLBACK")
                raise

    # -- runs --

    def start_run(self, name: str, kind: str, config: dict, hardware: dict, run_dir: str) -> int:
        now = time.time()
        pid = os.getpid()
        try:
            with self._db(write=True) as conn:
                cursor = conn.execute(
                    "INSERT INTO runs (name, kind, status, created_at, updated_at, pid, proc_start, host, "
                    "config_json, hardware_json, summary_json, run_dir) "
                    "VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, '{}', ?)",
                    (name, kind, now, now, pid, _process_start(pid), self.host, _dumps(config), _dumps(hardware),
                     str(run_dir)),
                )
                return int(cursor.lastrowid)
        except sqlite3.IntegrityError as e:
            raise LmforgeError(
                f"a run named {name!r} is already in the ledger {self.path}; choose another --name, or resume it"
            ) from e

    def resume_run(self, run_id: int) -> None:
        """The run continues in this process: status back to 'running' under the new pid."""
        pid = os.getpid()
        with self._db(write=True) as conn:
            conn.execute(
                "UPDATE runs SET status = 'running', pid = ?, proc_start = ?, host = ?, updated_at = ?, "
                "ended_at = NULL, error = NULL WHERE id = ?",
                (pid, _process_start(pid), self.host, time.time(), run_id),
            )

    def heartbeat(self, run_id: int) -> None:
        with self._db(write=True) as conn:
            conn.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (time.time(), run_id))

    def finish_run(
        self, run_id: int, status: str, summary: dict | None = None, error: str | None = None
    ) -> None:
        """End a run with a final status; `summary` is merged into the stored one."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"finish_run status must be one of {FINAL_STATUSES}, got {status!r}")
        now = time.time()
        with self._db(write=True) as conn:
            merged = self._merged_summary(conn, run_id, summary or {})
            conn.execute(
                "UPDATE runs SET status = ?, summary_json = ?, error = ?, ended_at = ?, updated_at = ? WHERE id = ?",
                (status, _dumps(merged), error, now, now, run_id),
            )

    def update_summary(self, run_id: int, summary: dict) -> None:
        """Merge `summary` into the run's stored summary (new keys win)."""
        with self._db(write=True) as conn:
            merged = self._merged_summary(conn, run_id, summary)
            conn.execute(
                "UPDATE runs SET summary_json = ?, updated_at = ? WHERE id = ?", (_dumps(merged), time.time(), run_id)
            )

    @staticmethod
    def _merged_summary(conn: sqlite3.Connection, run_id: int, summary: dict) -> dict:
        row = conn.execute("SELECT summary_json FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise ValueError(f"no run with id {run_id} in the ledger")
        return {**json.loads(row["summary_json"] or "{}"), **summary}

    def list_runs(self, limit: int | None = None) -> list[dict]:
        """Runs, newest first."""
        self.mark_crashed_runs()
        with self._db() as conn:
            rows = conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit if limit else -1,)).fetchall()
        return [_run_dict(row) for row in rows]

    def get_run(self, name_or_id: str | int) -> dict:
        """A run by name, or by id (an int, or a string of digits that is no run's name)."""
        self.mark_crashed_runs()
        with self._db() as conn:
            row = conn.execute("SELECT * FROM runs WHERE name = ?", (str(name_or_id),)).fetchone()
            if row is None and str(name_or_id).isdigit():
                row = conn.execute("SELECT * FROM runs WHERE id = ?", (int(name_or_id),)).fetchone()
            if row is not None:
                return _run_dict(row)
            names = [r["name"] for r in conn.execute("SELECT name FROM runs")]
        close = difflib.get_close_matches(str(name_or_id), names, n=3)
        hint = f" (did you mean {', '.join(repr(n) for n in close)}?)" if close else ""
        raise LmforgeError(f"no run named {str(name_or_id)!r}{hint}; `lmforge runs` lists them")

    def mark_crashed_runs(self) -> int:
        """Set 'crashed' on every 'running' run of this host whose process is gone; returns how many."""
        with self._db() as conn:
            running = conn.execute(
                "SELECT id, pid, proc_start, updated_at FROM runs WHERE status = 'running' AND host = ?", (self.host,)
            ).fetchall()
        dead = [row for row in running if not _process_alive(row["pid"], row["proc_start"])]
        if not dead:
            return 0
        with self._db(write=True) as conn:
            for row in dead:
                conn.execute(
                    "UPDATE runs SET status = 'crashed', ended_at = updated_at, error = ? "
                    "WHERE id = ? AND status = 'running' AND pid = ?",  # unless it was resumed meanwhile
                    (f"process {row['pid']} on {self.host} ended without finishing the run (killed or crashed); "
                     f"ended_at is its last heartbeat", row["id"], row["pid"]),
                )
        return len(dead)

    # -- metrics and artifacts --

    def log_metrics(self, run_id: int, step: int, metrics: dict[str, float]) -> None:
        """Record metrics of one step in one transaction, overwriting earlier values of the same (step, name).

        SQLite stores NaN as NULL; get_metrics turns it back into nan.
        """
        now = time.time()
        with self._db(write=True) as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO metrics (run_id, step, name, value, time) VALUES (?, ?, ?, ?, ?)",
                [(run_id, int(step), name, float(value), now) for name, value in metrics.items()],
            )
            conn.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now, run_id))

    def get_metrics(self, run_id: int, name: str | None = None) -> list[tuple[int, str, float]]:
        """(step, name, value) rows ordered by step (then name)."""
        query = "SELECT step, name, value FROM metrics WHERE run_id = ?"
        args: tuple = (run_id,)
        if name is not None:
            query += " AND name = ?"
            args += (name,)
        with self._db() as conn:
            rows = conn.execute(query + " ORDER BY step, name", args).fetchall()
        return [(step, metric, math.nan if value is None else value) for step, metric, value in rows]

    def log_requests(self, run_id: int | None, rows: list[dict[str, Any]]) -> None:
        """Served requests, one dict per request with the requests table's columns (besides id and run_id)."""
        columns = ("created_at", "model", "prompt_tokens", "completion_tokens", "flops", "device_seconds",
                   "energy_j", "status")
        with self._db(write=True) as conn:
            conn.executemany(
                f"INSERT INTO requests (run_id, {', '.join(columns)}) VALUES (?, {', '.join('?' * len(columns))})",
                [(run_id, *(row.get(c) for c in columns)) for row in rows],
            )

    def get_requests(self, run_id: int | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM requests", ()
        if run_id is not None:
            query, args = query + " WHERE run_id = ?", (run_id,)
        with self._db() as conn:
            return [dict(row) for row in conn.execute(query + " ORDER BY id", args).fetchall()]

    def log_guard_events(self, run_id: int | None, rows: list[dict[str, Any]]) -> None:
        """Guard findings, one dict per finding with the guard_events table's columns (besides id and run_id)."""
        columns = ("created_at", "request_id", "direction", "category", "detector", "score", "action",
                   "text_sha256", "text")
        with self._db(write=True) as conn:
            conn.executemany(
                f"INSERT INTO guard_events (run_id, {', '.join(columns)}) "
                f"VALUES (?, {', '.join('?' * len(columns))})",
                [(run_id, *(row.get(c) for c in columns)) for row in rows],
            )

    def get_guard_events(self, run_id: int | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM guard_events", ()
        if run_id is not None:
            query, args = query + " WHERE run_id = ?", (run_id,)
        with self._db() as conn:
            return [dict(row) for row in conn.execute(query + " ORDER BY id", args).fetchall()]

    def log_event(self, run_id: int, step: int, kind: str, detail: dict[str, Any]) -> None:
        """Something that happened to the run at this step, e.g. kind 'site_dropped' with {"site": 1, ...}."""
        with self._db(write=True) as conn:
            conn.execute("INSERT INTO run_events (run_id, created_at, step, kind, detail) VALUES (?, ?, ?, ?, ?)",
                         (run_id, time.time(), step, kind, _dumps(detail)))

    def get_events(self, run_id: int) -> list[dict[str, Any]]:
        """The run's events, oldest first: dicts with created_at, step, kind and detail (a dict)."""
        with self._db() as conn:
            rows = conn.execute("SELECT created_at, step, kind, detail FROM run_events WHERE run_id = ? ORDER BY id",
                                (run_id,)).fetchall()
        return [{**dict(row), "detail": json.loads(row["detail"])} for row in rows]

    def add_artifact(
        self, run_id: int, kind: str, path: str | Path, sha256: str | None = None, nbytes: int | None = None
    ) -> None:
        with self._db(write=True) as conn:
            conn.execute(
                "INSERT INTO artifacts (run_id, kind, path, sha256, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, kind, str(path), sha256, nbytes, time.time()),
            )

    def get_artifacts(self, run_id: int) -> list[dict]:
        """The run's artifacts, oldest first: dicts with id, run_id, kind, path, sha256, bytes, created_at."""
        with self._db() as conn:
            rows = conn.execute("SELECT * FROM artifacts WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
        return [dict(row) for row in rows]


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)  # Paths and other plain objects are stored as their text


def _run_dict(row: sqlite3.Row) -> dict:
    run = dict(row)
    for column, key in JSON_COLUMNS.items():
        text = run.pop(column)
        run[key] = json.loads(text) if text else {}
    return run


def _process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot, /proc/<pid>/stat field 22); None off Linux.

    Stored with the pid so a pid reused by an unrelated later process is not mistaken for the run.
    """
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None if it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # the command name may itself contain spaces and ')'


def _process_alive(pid: int | None, proc_start: str | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return True  # not Linux: os.kill is all we can know
    if fields[0] in ("Z", "X"):  # zombie or dead: killed, its parent has not reaped it yet
        return False
    return proc_start is None or fields[19] == proc_start
