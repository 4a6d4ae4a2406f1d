"""Every change to a job is a compare-and-set decided again on the fresh row after a lost race
(store.queries.change_job): the operations and loops that use it, each racing another writer.

Each race below is a write by "another process" (a second connection) between the operation's
read of the job and its write; without change_job's retry loop every one of these tests fails.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import JobKeepsChanging, TemporaryFailure
from jobrunner_lib.core.models import Job, Msg, State, StatusCode, transition
from jobrunner_lib.jobs.driver import Driver, _NotOurs
from jobrunner_lib.jobs.run import run_pass
from jobrunner_lib.ops import kill, reboot, retry
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries
from tests.support.factories import insert_job

Change = Callable[[Job], Job]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "db.sqlite"


@pytest.fixture
def conn(path: Path) -> Iterator[sqlite3.Connection]:
    connection = db.connect(path)
    yield connection
    connection.close()


def elsewhere(path: Path, job_id: str, change: Change) -> Job:
    """Another process changes the job (its own connection, its own compare-and-set)."""
    other = db.connect(path)
    try:
        current = db_queries.get_job(other, job_id)
        assert current is not None
        return db_queries.save_job(other, change(current))
    finally:
        other.close()


@pytest.fixture
def race(monkeypatch: pytest.MonkeyPatch, path: Path) -> Callable[[Change], None]:
    """race(change): just before the operation's next write, another process makes `change`."""
    waiting: list[Change] = []
    save_job = db_queries.save_job

    def racing_save_job(conn: sqlite3.Connection, job: Job) -> Job:
        while waiting:
            elsewhere(path, job.id, waiting.pop(0))
        return save_job(conn, job)

    monkeypatch.setattr(db_queries, "save_job", racing_save_job)
    return waiting.append


def finish(job: Job) -> Job:
    """What a worker does when the job succeeds."""
    return transition(job, State.SUCCEEDED, StatusCode.SUCCEEDED, Msg.SUCCEEDED)


def step(job: Job) -> Job:
    """What a worker does when the job's container starts."""
    return transition(job, State.RUNNING, StatusCode.EXECUTING, Msg.RUNNING)


# ---- change_job itself ------------------------------------------------------------------------


def test_change_job_decides_again_on_the_row_another_process_changed(conn, path):
    job = insert_job(conn, State.RUNNING, StatusCode.PREPARING, Msg.PREPARING)
    seen: list[Job] = []

    def record_inputs(current: Job) -> Job:
        seen.append(current)
        if len(seen) == 1:
            elsewhere(path, job.id, step)  # between our read and our write
        return current.copy(input_files={"a.csv": "generate"})

    saved, changed = db_queries.change_job(conn, job, record_inputs)
    assert changed and saved is not None
    assert [j.status_code for j in seen] == [StatusCode.PREPARING, StatusCode.EXECUTING]
    # Both changes are in the row: neither overwrote the other.
    row = db_queries.get_job(conn, job.id)
    assert row == saved
    assert (row.status_code, row.input_files, row.rev) == (
        StatusCode.EXECUTING,
        {"a.csv": "generate"},
        2,
    )


def test_change_job_writes_nothing_when_the_change_says_nothing_to_do(conn):
    job = insert_job(conn, State.PENDING, StatusCode.CREATED, Msg.CREATED)
    assert db_queries.change_job(conn, job, lambda j: None) == (job, False)
    assert db_queries.change_job(conn, job, lambda j: j) == (job, False)
    assert db_queries.get_job(conn, job.id).rev == 0


def test_change_job_of_a_job_that_vanished_meanwhile_returns_none(conn, path):
    job = insert_job(conn, State.PENDING, StatusCode.CREATED, Msg.CREATED)

    def change(current: Job) -> Job:
        conn.execute("DELETE FROM job WHERE id = ?", (job.id,))
        conn.commit()
        return current.copy(status_message="x")

    assert db_queries.change_job(conn, job, change) == (None, False)


def test_change_job_gives_up_after_conflict_retries_lost_races_as_a_temporary_failure(conn, path):
    job = insert_job(conn, State.RUNNING, StatusCode.PREPARING, Msg.PREPARING)
    calls = []

    def always_beaten(current: Job) -> Job:
        calls.append(current.rev)
        elsewhere(path, job.id, lambda j: j.copy(status_message=f"moved {len(calls)}"))
        return current.copy(input_files={})

    with pytest.raises(JobKeepsChanging) as raised:
        db_queries.change_job(conn, job, always_beaten)
    assert isinstance(raised.value, TemporaryFailure)  # a tool exits 75: try again
    assert len(calls) == db_queries.CONFLICT_RETRIES
    assert calls == list(range(db_queries.CONFLICT_RETRIES))  # each time on the fresh row


# ---- jr-kill ----------------------------------------------------------------------------------


def test_kill_of_a_job_that_finished_meanwhile_leaves_it_as_it_is(conn, race):
    job = insert_job(conn, State.RUNNING, StatusCode.EXECUTING, Msg.RUNNING)
    race(finish)
    found, killed = kill.fail_job(conn, job, "bob@host")
    assert not killed
    assert (found.state, found.status_code) == (State.SUCCEEDED, StatusCode.SUCCEEDED)
    assert db_queries.get_job(conn, job.id) == found  # not killed again, not touched


def test_kill_racing_a_step_change_kills_the_job_as_it_is_now(conn, race):
    job = insert_job(conn, State.RUNNING, StatusCode.PREPARING, Msg.PREPARING)
    race(step)
    found, killed = kill.fail_job(conn, job, "bob@host")
    assert killed
    row = db_queries.get_job(conn, job.id)
    assert row == found
    assert (row.state, row.status_code, row.rev) == (State.FAILED, StatusCode.KILLED_BY_ADMIN, 2)
    assert row.status_message == Msg.KILLED
    assert row.error_detail == "killed by bob@host with jr-kill"


# ---- jr-retry ---------------------------------------------------------------------------------


def test_retry_of_a_job_someone_reset_meanwhile_does_nothing(conn, race, monkeypatch):
    monkeypatch.setattr(retry, "resumable", lambda config, job_id: True)  # no Docker here
    job = insert_job(conn, State.FAILED, StatusCode.INTERNAL_ERROR, Msg.INTERNAL)
    race(lambda j: transition(j, State.PENDING, StatusCode.CREATED, Msg.CREATED, attempts=0))
    saved, done = retry.retry_job(Config(), conn, job)
    assert saved is None
    assert done == "not retried: it is pending, not failed with internal_error"
    row = db_queries.get_job(conn, job.id)
    assert (row.state, row.status_code, row.rev) == (State.PENDING, StatusCode.CREATED, 1)


def test_retry_of_a_dependant_someone_put_back_meanwhile_does_nothing(conn, race):
    job = insert_job(conn, State.FAILED, StatusCode.DEPENDENCY_FAILED, Msg.DEPENDENCY_FAILED)
    race(
        lambda j: transition(
            j, State.PENDING, StatusCode.WAITING_ON_DEPENDENCIES, Msg.WAITING_ON_DEPENDENCIES
        )
    )
    saved, done = retry.repend(conn, job)
    assert (saved, done) == (None, "not retried: it is now pending")
    assert db_queries.get_job(conn, job.id).rev == 1


# ---- jr-reboot-prep ---------------------------------------------------------------------------


def test_reset_for_reboot_of_a_job_that_finished_meanwhile_leaves_it(conn, race):
    job = insert_job(conn, State.RUNNING, StatusCode.EXECUTING, Msg.RUNNING)
    race(finish)
    assert reboot.reset_for_reboot(conn, job) is None
    row = db_queries.get_job(conn, job.id)
    assert (row.state, row.rev) == (State.SUCCEEDED, 1)


def test_reset_for_reboot_racing_a_step_change_resets_the_job_as_it_is_now(conn, race):
    job = insert_job(conn, State.RUNNING, StatusCode.PREPARING, Msg.PREPARING)
    race(lambda j: step(j).copy(worker_pid=4242))
    saved = reboot.reset_for_reboot(conn, job)
    assert saved is not None
    row = db_queries.get_job(conn, job.id)
    assert row == saved
    assert (row.state, row.status_code, row.worker_pid, row.rev) == (
        State.PENDING,
        StatusCode.WAITING_ON_REBOOT,
        None,
        2,
    )


# ---- the worker's Driver ----------------------------------------------------------------------


def driver(conn: sqlite3.Connection, job: Job) -> Driver:
    return Driver(Config(), conn, executor=None, job=job)  # type: ignore[arg-type]  # save() only


def test_driver_save_applies_its_change_again_on_the_row_another_process_changed(conn, race):
    job = insert_job(conn, State.RUNNING, StatusCode.PREPARING, Msg.PREPARING)
    race(lambda j: j.copy(worker_pid=4242))  # the pass records who the worker is
    saved = driver(conn, job).save(lambda j: j.copy(input_files={"a.csv": "generate"}))
    row = db_queries.get_job(conn, job.id)
    assert row == saved
    assert (row.worker_pid, row.input_files, row.rev) == (4242, {"a.csv": "generate"}, 2)


def test_driver_save_stops_driving_a_job_killed_meanwhile(conn, race):
    job = insert_job(conn, State.RUNNING, StatusCode.EXECUTING, Msg.RUNNING)
    race(lambda j: transition(j, State.FAILED, StatusCode.KILLED_BY_ADMIN, Msg.KILLED))
    with pytest.raises(_NotOurs):
        driver(conn, job).save(lambda j: j.copy(input_files={}))
    assert db_queries.get_job(conn, job.id).status_code is StatusCode.KILLED_BY_ADMIN


# ---- the run pass -----------------------------------------------------------------------------


def test_a_pass_that_loses_a_race_decides_again_and_claims_the_job_in_the_same_pass(
    conn, path, tmp_path
):
    job = insert_job(conn, State.PENDING, StatusCode.CREATED, Msg.CREATED)
    spawned: list[str] = []
    raced: list[bool] = []

    def now() -> float:
        # The pass asks the time when it writes its decision: another pass got there first.
        if not raced:
            raced.append(True)
            elsewhere(
                path,
                job.id,
                lambda j: transition(
                    j, State.PENDING, StatusCode.WAITING_ON_WORKERS, Msg.WAITING_ON_WORKERS
                ),
            )
        return time.time()

    def spawn(config: Any, job_id: str) -> tuple[int, float]:
        spawned.append(job_id)
        return 4242, time.time()

    changes = run_pass(
        Config(workdir=tmp_path, job_resource_weights_file=tmp_path / "none.ini"),
        conn,
        spawn=spawn,
        is_alive=lambda pid, started: pid == 4242,
        kill=lambda pid, started: None,
        now=now,
        rng=random.Random(1),
    )
    assert raced and spawned == [job.id]
    row = db_queries.get_job(conn, job.id)
    assert (row.state, row.status_code, row.worker_pid) == (
        State.RUNNING,
        StatusCode.PREPARING,
        4242,
    )
    assert [(c.old_state, c.new_state) for c in changes] == [("pending", "running")]
