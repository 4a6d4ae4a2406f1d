"""The state store: migrations, compare-and-set, cancellation, and many writers at once."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import sqlite3

import pytest

from jobrunner_lib.core.errors import ConflictError
from jobrunner_lib.core.models import State, StatusCode, transition
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries
from tests.support.factories import make_job, make_request


def test_fresh_file_gets_the_current_schema(tmp_path):
    conn = db.connect(tmp_path / "db.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = {r[1] for r in conn.execute("PRAGMA table_info(job)")}
    assert {"rev", "worker_pid", "heartbeat_at", "attempts", '"commit"'.strip('"')} <= cols


def test_old_backend_database_is_upgraded_in_place_keeping_its_jobs(tmp_path):
    path = tmp_path / "db.sqlite"
    old = sqlite3.connect(path)
    old.executescript(db.MIGRATIONS[0])
    old.execute(
        "INSERT INTO job (id, job_request_id, state, action, status_code, cancelled, created_at, "
        "updated_at, requires_outputs_from, wait_for_job_ids, output_spec) VALUES "
        "('abcdabcdabcdabcd', 'rrrrrrrrrrrrrrrr', 'failed', 'extract', 'StatusCode.NONZERO_EXIT', 0, 1, 2, "
        "'[]', '[]', '{}')"
    )
    old.commit()
    old.close()
    conn = db.connect(path)
    assert db.schema_version(conn) == db.SCHEMA_VERSION
    job = db_queries.get_job(conn, "abcdabcdabcdabcd")
    assert (
        job is not None and job.state is State.FAILED and job.status_code is StatusCode.NONZERO_EXIT
    )
    assert job.rev == 0 and job.attempts == 0


def test_migrating_twice_is_harmless(tmp_path):
    db.connect(tmp_path / "db.sqlite").close()
    conn = db.connect(tmp_path / "db.sqlite")
    assert db.migrate_schema(conn) == db.SCHEMA_VERSION


def test_a_newer_schema_is_refused(tmp_path):
    conn = db.connect(tmp_path / "db.sqlite")
    conn.execute(f"PRAGMA user_version = {db.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this jr"):
        db.connect(tmp_path / "db.sqlite")


def test_every_column_round_trips(tmp_path):
    conn = db.connect(tmp_path / "db.sqlite")
    req = make_request()
    job = make_job(
        req,
        "extract",
        outputs={"output/a.csv": "highly_sensitive"},
        unmatched_outputs=["x"],
        requires_outputs_from=["a"],
        wait_for_job_ids=["b" * 16],
        requires_db=True,
        output_spec={"highly_sensitive": {"a": "output/a.csv"}},
        exit_code=3,
        error_detail="d",
    )
    db_queries.insert_request(conn, req, [job])
    assert db_queries.get_job(conn, job.id) == job


def test_compare_and_set_detects_a_racing_change(tmp_path):
    conn = db.connect(tmp_path / "db.sqlite")
    req = make_request()
    job = make_job(req, "a")
    db_queries.insert_request(conn, req, [job])
    first = db_queries.save_job(
        conn, transition(job, State.RUNNING, StatusCode.PREPARING, "Preparing")
    )
    with pytest.raises(ConflictError):
        db_queries.save_job(
            conn, transition(job, State.FAILED, StatusCode.KILLED_BY_ADMIN, "Killed by admin")
        )
    assert db_queries.get_job(conn, job.id).state is State.RUNNING
    assert first.rev == 1


def test_cancel_flags_only_unfinished_jobs_and_survives_run_side_writes(tmp_path):
    conn = db.connect(tmp_path / "db.sqlite")
    req = make_request()
    done = make_job(req, "a", State.SUCCEEDED, code=StatusCode.SUCCEEDED)
    pending = make_job(req, "b")
    db_queries.insert_request(conn, req, [done, pending])
    assert db_queries.set_cancelled(conn, req.id, ["a", "b"]) == 1
    # A run-side save of a job read before the cancel must not clear the flag.
    db_queries.save_job(conn, pending.copy(status_message="Waiting on dependencies"))
    assert db_queries.get_job(conn, pending.id).cancelled is True
    assert db_queries.get_job(conn, done.id).cancelled is False


def test_workspace_state_ignores_cancelled_and_error_jobs(tmp_path):
    conn = db.connect(tmp_path / "db.sqlite")
    req1, req2 = make_request(), make_request()
    old = make_job(req1, "a", State.SUCCEEDED, code=StatusCode.SUCCEEDED, run_command="python:v1 a")
    newer = make_job(req2, "a", run_command="python:v1 a")  # pending, so cancelling flags it
    err = make_job(req2, "__error__", State.FAILED, code=None)
    db_queries.insert_request(conn, req1, [old])
    db_queries.insert_request(conn, req2, [newer, err])
    assert db_queries.latest_jobs_by_action(conn, "ws") == {"a": newer}
    assert db_queries.set_cancelled(conn, req2.id, ["a"]) == 1
    # The cancelled newer job no longer counts: the older one is the workspace's state again.
    assert db_queries.latest_jobs_by_action(conn, "ws") == {"a": old}


def _hammer(path: str, job_ids: list[str], count: int) -> None:
    conn = db.connect(path)
    for i in range(count):
        with db.transaction(conn):
            job_id = job_ids[i % len(job_ids)]
            row = conn.execute("SELECT exit_code FROM job WHERE id = ?", (job_id,)).fetchone()
            conn.execute("UPDATE job SET exit_code = ? WHERE id = ?", ((row[0] or 0) + 1, job_id))


def test_four_processes_making_500_updates_each_lose_nothing(tmp_path):
    path = tmp_path / "db.sqlite"
    conn = db.connect(path)
    req = make_request()
    jobs = [make_job(req, f"a{i}") for i in range(3)]
    db_queries.insert_request(conn, req, jobs)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_hammer, args=(str(path), [j.id for j in jobs], 500)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    total = conn.execute("SELECT SUM(exit_code) FROM job").fetchone()[0]
    assert total == 2000
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _open_fresh_stores(paths: list[str], barrier: object, errors: object) -> None:
    for path in paths:
        barrier.wait(30)  # type: ignore[attr-defined]
        try:
            conn = db.connect(path)
            with db.transaction(conn):
                conn.execute("INSERT INTO flag (name, value) VALUES (?, 'x')", (str(os.getpid()),))
            conn.close()
        except sqlite3.Error as exc:
            errors.put(f"{path}: {exc}")  # type: ignore[attr-defined]


def test_processes_creating_the_store_at_once_all_get_it(tmp_path):
    # The service's first pass and a jr-add-job on a new workdir: switching the new file to WAL
    # made SQLite answer "database is locked" at once to one of them (a round in four).
    rounds, count = 25, 5
    paths = [str(tmp_path / f"r{n}" / "db.sqlite") for n in range(rounds)]
    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(count), ctx.Queue()
    procs = [
        ctx.Process(target=_open_fresh_stores, args=(paths, barrier, errors)) for _ in range(count)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * count
    found = []
    with contextlib.suppress(queue.Empty):
        while True:
            found.append(errors.get(timeout=0.5))
    assert found == []
    for path in paths:
        conn = db.connect(path)
        assert conn.execute("SELECT COUNT(*) FROM flag").fetchone()[0] == count
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
