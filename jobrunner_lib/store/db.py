"""The state store: `workdir/db.sqlite` (docs/architecture.md#the-state-store), shared safely by many processes.

WAL mode and a busy timeout let the service loop, workers and operators' tools use it at once.
Writes are short `BEGIN IMMEDIATE` transactions (taking the write lock up front means no
lock-upgrade deadlocks). The schema moves forward by PRAGMA user_version; version 1 is the old
backend's schema, so its database files are upgraded in place.

The jobs, requests and flags in it are read and written by queries.py.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY_TIMEOUT_MS = 30_000

MIGRATIONS: list[str] = [
    # 1: the old backend's schema (jobrunner/schema.sql), kept verbatim so its files upgrade.
    """
    CREATE TABLE job_request (id TEXT, original TEXT, PRIMARY KEY (id));
    CREATE TABLE job (
        id TEXT, job_request_id TEXT, state TEXT, repo_url TEXT, "commit" TEXT, workspace TEXT,
        database_name TEXT, action TEXT, action_repo_url TEXT, action_commit TEXT,
        requires_outputs_from TEXT, wait_for_job_ids TEXT, run_command TEXT, image_id TEXT,
        output_spec TEXT, outputs TEXT, unmatched_outputs TEXT, status_message TEXT,
        status_code TEXT, cancelled BOOLEAN, created_at INT, updated_at INT, started_at INT,
        completed_at INT, PRIMARY KEY (id)
    );
    CREATE INDEX idx_job__job_request_id ON job (job_request_id);
    CREATE INDEX idx_job__state ON job (state) WHERE state NOT IN ('failed', 'succeeded');
    """,
    # 2: jr's columns: who works on a job, its heartbeat, a revision for compare-and-set.
    """
    ALTER TABLE job ADD COLUMN run_by_user TEXT;
    ALTER TABLE job ADD COLUMN requires_db BOOLEAN DEFAULT 0;
    ALTER TABLE job ADD COLUMN exit_code INT;
    ALTER TABLE job ADD COLUMN worker_pid INT;
    ALTER TABLE job ADD COLUMN worker_started_at REAL;
    ALTER TABLE job ADD COLUMN heartbeat_at REAL;
    ALTER TABLE job ADD COLUMN progress_at REAL;
    ALTER TABLE job ADD COLUMN error_detail TEXT;
    ALTER TABLE job ADD COLUMN attempts INT NOT NULL DEFAULT 0;
    ALTER TABLE job ADD COLUMN rev INT NOT NULL DEFAULT 0;
    ALTER TABLE job_request ADD COLUMN created_at INT;
    CREATE INDEX idx_job__workspace_action ON job (workspace, action, created_at);
    CREATE INDEX idx_job__created_at ON job (created_at);
    CREATE TABLE flag (name TEXT PRIMARY KEY, value TEXT, updated_at INT);
    CREATE TABLE job_post (job_id TEXT PRIMARY KEY, posted_updated_at INT, posted_state TEXT);
    """,
    # 3: the inputs copied into a job's volume (path -> action), recorded before the copy, so
    # finalize never takes an input for one of the job's own outputs (outputs.claim_outputs).
    """
    ALTER TABLE job ADD COLUMN input_files TEXT;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path | str, *, migrate: bool = True) -> sqlite3.Connection:
    """Open the store (creating its directory and schema as needed), autocommit, WAL, busy timeout."""
    path = Path(path)
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = _open(path)
    try:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if "disk I/O error" not in str(exc):
            raise
        # A full disk leaves no room for the WAL index (-shm) that even a read needs; exclusive
        # locking keeps the index in memory, so the store can still be read (jr-ls works).
        conn.close()
        conn = _open(path)
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if migrate:
        if mode != "wal":
            _switch_to_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        migrate_schema(conn)
    return conn


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """Put a new store in WAL mode, waiting for a busy one as long as any other statement would.

    Two processes opening a new store at once (the service's first pass and a jr-add-job) both
    ask for the switch; it needs the file to themselves, and SQLite answers "database is locked"
    to one of them at once, without its busy timeout. Retried with a growing pause, the other
    has switched it by then (or the timeout ends with the error).
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.002
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
    )
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version; an unversioned file holding the old backend's tables counts as 1."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if (
        version == 0
        and conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='job'").fetchone()
    ):
        return 1
    return version


def migrate_schema(conn: sqlite3.Connection) -> int:
    """Apply every migration newer than the file's version, each in its own transaction."""
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return SCHEMA_VERSION
    with transaction(conn):
        current = schema_version(conn)
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {current} is newer than this jr "
                f"({SCHEMA_VERSION}): update jr"
            )
        for number in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _statements(MIGRATIONS[number - 1]):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return SCHEMA_VERSION


def _statements(script: str) -> Iterator[str]:
    for part in script.split(";"):
        if part.strip():
            yield part


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A short write transaction that takes the write lock at once (BEGIN IMMEDIATE)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
