"""One pass of the run loop against a real (temporary) state store, with fake worker processes."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from jobrunner_lib.core.config import CHECKOUT_DIR, Config
from jobrunner_lib.core.models import Job, Msg, State, StatusCode
from jobrunner_lib.jobs import processes
from jobrunner_lib.jobs.locks import take_run_lock
from jobrunner_lib.jobs.run import WORKER_DIED, Change, after_job, run_pass
from jobrunner_lib.store import db
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.store import queries as db_queries
from tests.support.waiting import wait_for


class Workers:
    """Fake worker processes: spawning records the job, liveness is a set of pids."""

    def __init__(self, start: float):
        self.start = start
        self.next_pid = 1000
        self.alive: set[int] = set()
        self.spawned: list[str] = []
        self.killed: list[int] = []

    def spawn(self, config: Config, job_id: str) -> tuple[int, float]:
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        self.alive.add(pid)
        self.spawned.append(job_id)
        return pid, self.start

    def is_alive(self, pid: int, start_time: float | None) -> bool:
        return pid in self.alive

    def kill(self, pid: int, start_time: float | None) -> None:
        self.killed.append(pid)
        self.alive.discard(pid)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """make_config's defaults: its store, tmp_path/db.sqlite, is the `conn` fixture's."""
    return make_config(tmp_path)


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def workers(now: float) -> Workers:
    return Workers(now)


def make_config(tmp_path: Path, max_workers: float = 3, weights: str | None = None) -> Config:
    path = tmp_path / "weights.ini"
    if weights is not None:
        path.write_text(weights)
    return Config(
        workdir=tmp_path,
        max_workers=max_workers,
        job_resource_weights_file=path,
        worker_stall_timeout=300.0,
    )


def add(conn: sqlite3.Connection, job_id: str, state: State = State.PENDING, **fields: Any) -> Job:
    at = int(time.time())
    values: dict[str, Any] = {
        "job_request_id": "req1",
        "workspace": "ws",
        "action": job_id,
        "repo_url": "https://github.com/opensafely/study",
        "created_at": at - 100,
        "updated_at": at - 10,
    }
    values.update(fields)
    job = Job(id=job_id, state=state, **values)
    with db.transaction(conn):
        db_queries.insert_jobs(conn, [job])
    return job


def one_pass(
    conn: sqlite3.Connection, config: Config, workers: Workers, now: float
) -> list[Change]:
    return run_pass(
        config,
        conn,
        spawn=workers.spawn,
        is_alive=workers.is_alive,
        kill=workers.kill,
        now=lambda: now,
        rng=random.Random(1),
    )


def get(conn: sqlite3.Connection, job_id: str) -> Job:
    job = db_queries.get_job(conn, job_id)
    assert job is not None
    return job


# ---- pending jobs ---------------------------------------------------------------------------


def test_job_waits_while_its_dependency_runs(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    workers.alive.add(77)
    add(conn, "dep", State.RUNNING, worker_pid=77, worker_started_at=now, heartbeat_at=now)
    add(conn, "job", wait_for_job_ids=["dep"])
    changes = one_pass(conn, make_config(tmp_path), workers, now)
    job = get(conn, "job")
    assert (job.state, job.status_code, job.status_message) == (
        State.PENDING,
        StatusCode.WAITING_ON_DEPENDENCIES,
        "Waiting on dependencies",
    )
    assert changes == [
        Change(
            "job",
            "job",
            "ws",
            "pending",
            "pending",
            "waiting_on_dependencies",
            "Waiting on dependencies",
        )
    ]
    assert workers.spawned == []


def test_job_fails_when_a_dependency_failed_naming_it(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    add(conn, "ok", State.SUCCEEDED)
    add(conn, "bad", State.FAILED, action="generate_cohort")
    add(conn, "job", wait_for_job_ids=["ok", "bad"])
    one_pass(conn, make_config(tmp_path), workers, now)
    job = get(conn, "job")
    assert (job.state, job.status_code) == (State.FAILED, StatusCode.DEPENDENCY_FAILED)
    assert job.status_message == "Not starting as dependency failed: generate_cohort (bad)"
    assert job.completed_at == int(now)
    assert workers.spawned == []


def test_job_starts_once_its_dependencies_succeeded(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    add(conn, "dep", State.SUCCEEDED)
    add(
        conn,
        "job",
        wait_for_job_ids=["dep"],
        status_code=StatusCode.WAITING_ON_DEPENDENCIES,
        status_message=Msg.WAITING_ON_DEPENDENCIES,
    )
    changes = one_pass(conn, make_config(tmp_path), workers, now)
    job = get(conn, "job")
    assert (job.state, job.status_code, job.status_message) == (
        State.RUNNING,
        StatusCode.PREPARING,
        "Preparing",
    )
    assert (job.attempts, job.worker_pid, job.worker_started_at) == (1, 1000, now)
    assert job.started_at == int(now)
    assert workers.spawned == ["job"]
    assert [(c.old_state, c.new_state, c.status_code) for c in changes] == [
        ("pending", "running", "preparing")
    ]


def test_pause_flag_holds_pending_jobs(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    add(conn, "job")
    store_flags.set_flag(conn, "paused", "maintenance")
    one_pass(conn, make_config(tmp_path), workers, now)
    job = get(conn, "job")
    assert (job.state, job.status_code, job.status_message) == (
        State.PENDING,
        StatusCode.PAUSED,
        Msg.PAUSED,
    )
    assert workers.spawned == []
    store_flags.set_flag(conn, "paused", None)
    one_pass(conn, make_config(tmp_path), workers, now)
    assert get(conn, "job").state is State.RUNNING


def test_pause_keeps_the_waiting_on_reboot_message(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    add(conn, "job", status_code=StatusCode.WAITING_ON_REBOOT, status_message=Msg.WAITING_ON_REBOOT)
    store_flags.set_flag(conn, "paused", "reboot")
    assert one_pass(conn, make_config(tmp_path), workers, now) == []
    assert get(conn, "job").rev == 0


def test_capacity_starts_exactly_max_workers_jobs(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    for n in range(10):
        add(conn, f"job{n}")
    one_pass(conn, make_config(tmp_path, max_workers=3), workers, now)
    jobs = db_queries.active_jobs(conn)
    running = [j for j in jobs if j.state is State.RUNNING]
    waiting = [j for j in jobs if j.state is State.PENDING]
    assert len(running) == 3 and len(workers.spawned) == 3
    assert {j.id for j in running} == set(workers.spawned)
    assert all(j.worker_pid is not None for j in running)
    assert len(waiting) == 7
    assert {(j.status_code, j.status_message) for j in waiting} == {
        (StatusCode.WAITING_ON_WORKERS, "Waiting on available workers")
    }
    # Claimed jobs keep counting on the next pass.
    assert one_pass(conn, make_config(tmp_path, max_workers=3), workers, now) == []
    assert len(workers.spawned) == 3


def test_heavy_job_waits_for_resource_intensive_capacity(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    config = make_config(tmp_path, max_workers=3, weights="[ws]\nbig_.* = 2.5\n")
    workers.alive.add(5)
    add(conn, "small", State.RUNNING, worker_pid=5, worker_started_at=now, heartbeat_at=now)
    add(conn, "big_model")
    one_pass(conn, config, workers, now)
    job = get(conn, "big_model")
    assert (job.state, job.status_code, job.status_message) == (
        State.PENDING,
        StatusCode.WAITING_ON_WORKERS,
        "Waiting on available workers for resource intensive job",
    )
    # A light job still fits beside the running one.
    add(conn, "light")
    one_pass(conn, config, workers, now)
    assert get(conn, "light").state is State.RUNNING


def test_heavy_job_heavier_than_capacity_starts_when_nothing_runs(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    add(conn, "big_model")
    one_pass(conn, make_config(tmp_path, max_workers=2, weights="[ws]\nbig_.* = 4\n"), workers, now)
    assert get(conn, "big_model").state is State.RUNNING


def test_cancelled_pending_job_fails_as_cancelled_by_user(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    add(conn, "job", cancelled=True, wait_for_job_ids=["elsewhere"])
    changes = one_pass(conn, make_config(tmp_path), workers, now)
    job = get(conn, "job")
    assert (job.state, job.status_code, job.status_message) == (
        State.FAILED,
        StatusCode.CANCELLED_BY_USER,
        "Cancelled by user",
    )
    assert job.started_at == int(now) and job.completed_at == int(now)
    assert job.cancelled is True
    assert [(c.old_state, c.new_state) for c in changes] == [("pending", "failed")]
    assert workers.spawned == []


def test_no_write_when_nothing_changes(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    workers.alive.add(77)
    add(conn, "dep", State.RUNNING, worker_pid=77, worker_started_at=now, heartbeat_at=now)
    add(conn, "job", wait_for_job_ids=["dep"])
    config = make_config(tmp_path)
    one_pass(conn, config, workers, now)
    before = {j.id: (j.rev, j.updated_at) for j in db_queries.active_jobs(conn)}
    assert one_pass(conn, config, workers, now) == []
    assert {j.id: (j.rev, j.updated_at) for j in db_queries.active_jobs(conn)} == before


def test_waiting_job_gets_updated_at_refreshed_without_a_revision(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    stale = int(now) - 600
    add(conn, "dep", State.SUCCEEDED)
    add(conn, "job", status_code=StatusCode.PAUSED, status_message=Msg.PAUSED, updated_at=stale)
    store_flags.set_flag(conn, "paused", "yes")
    assert one_pass(conn, make_config(tmp_path), workers, now) == []
    job = get(conn, "job")
    assert job.rev == 0
    assert job.updated_at > stale


def test_race_with_the_new_worker_still_records_its_pid(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    add(conn, "job")

    def spawn_that_writes_first(config: Config, job_id: str) -> tuple[int, float]:
        # The worker moves the job on before the pass records who it is.
        job = get(conn, job_id)
        db_queries.save_job(
            conn, job.copy(status_code=StatusCode.EXECUTING, status_message=Msg.RUNNING)
        )
        return 4242, now

    run_pass(
        make_config(tmp_path),
        conn,
        spawn=spawn_that_writes_first,
        is_alive=workers.is_alive,
        kill=workers.kill,
        now=lambda: now,
    )
    job = get(conn, "job")
    assert (job.worker_pid, job.status_code, job.status_message) == (
        4242,
        StatusCode.EXECUTING,
        "Running",
    )


def test_spawn_failure_is_left_to_the_next_pass_without_using_an_attempt(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    add(conn, "job")

    def broken_spawn(config: Config, job_id: str) -> tuple[int, float]:
        raise OSError("fork failed")

    run_pass(
        make_config(tmp_path),
        conn,
        spawn=broken_spawn,
        is_alive=workers.is_alive,
        kill=workers.kill,
        now=lambda: now,
    )
    assert (get(conn, "job").state, get(conn, "job").worker_pid) == (State.RUNNING, None)
    one_pass(conn, make_config(tmp_path), workers, now)
    job = get(conn, "job")
    # No worker of the job ran, so none failed: a fork failure (e.g. out of memory) is the
    # machine's, and the job keeps all its attempts.
    assert (job.attempts, job.worker_pid, workers.spawned) == (1, 1000, ["job"])


# ---- supervision ----------------------------------------------------------------------------


def running_job(conn: sqlite3.Connection, now: float, attempts: int = 1, **fields: Any) -> Job:
    values: dict[str, Any] = {
        "status_code": StatusCode.EXECUTING,
        "status_message": Msg.RUNNING,
        "attempts": attempts,
        "worker_pid": 111,
        "worker_started_at": now - 50,
        "heartbeat_at": now - 5,
        "started_at": int(now) - 50,
    }
    values.update(fields)
    return add(conn, "job", State.RUNNING, **values)


def test_dead_worker_is_respawned_with_one_more_attempt(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    running_job(conn, now, attempts=1)
    changes = one_pass(conn, make_config(tmp_path), workers, now)
    job = get(conn, "job")
    assert (job.state, job.attempts, job.worker_pid, job.worker_started_at) == (
        State.RUNNING,
        2,
        1000,
        now,
    )
    assert (job.status_code, job.status_message) == (StatusCode.EXECUTING, "Running")
    assert workers.spawned == ["job"] and workers.killed == []
    assert [(c.old_state, c.new_state) for c in changes] == [("running", "running")]
    assert "worker pid 111 died" in changes[0].message


def test_a_job_whose_lock_a_worker_holds_is_left_to_it_whatever_pid_is_recorded(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    # The recorded worker (pid 111) is dead, but another process holds the job's lock: a
    # worker the store does not know yet (its pass was killed before saving it) drives it.
    from filelock import FileLock

    config = make_config(tmp_path)
    running_job(conn, now, attempts=3)
    path = config.job_lock_path("job")
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        assert one_pass(conn, config, workers, now) == []
        job = get(conn, "job")
        assert (job.state, job.attempts, job.worker_pid) == (State.RUNNING, 3, 111)
        assert workers.spawned == []
    finally:
        holder.kill()
        holder.wait()
    with FileLock(str(path), timeout=5):  # released with its holder
        pass
    one_pass(conn, config, workers, now)
    assert get(conn, "job").state is State.FAILED  # now it is the third dead worker


HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_third_dead_worker_fails_the_job_as_internal_error(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    running_job(conn, now, attempts=3)
    changes = one_pass(conn, make_config(tmp_path), workers, now)
    job = get(conn, "job")
    assert (job.state, job.status_code, job.status_message) == (
        State.FAILED,
        StatusCode.INTERNAL_ERROR,
        WORKER_DIED,
    )
    assert WORKER_DIED == "Internal error: the job's worker died 3 times; see the run log"
    assert job.completed_at == int(now)
    assert workers.spawned == []
    assert [(c.old_state, c.new_state, c.status_code) for c in changes] == [
        ("running", "failed", "internal_error")
    ]


def test_worker_deaths_count_up_to_the_limit(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    add(conn, "job")
    config = make_config(tmp_path)
    for _ in range(3):
        one_pass(conn, config, workers, now)
        workers.alive.clear()
    assert get(conn, "job").attempts == 3
    one_pass(conn, config, workers, now)
    assert get(conn, "job").status_code is StatusCode.INTERNAL_ERROR
    assert len(workers.spawned) == 3


def test_stalled_worker_is_killed_and_respawned(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    workers.alive.add(111)
    running_job(conn, now, worker_started_at=now - 2000, heartbeat_at=now - 1000)
    changes = one_pass(conn, make_config(tmp_path), workers, now)
    job = get(conn, "job")
    assert workers.killed == [111]
    assert (job.attempts, job.worker_pid) == (2, 1000)
    assert "stalled" in changes[0].message


def test_live_worker_with_fresh_heartbeat_is_left_alone(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    workers.alive.add(111)
    # No heartbeat yet, but the worker started recently: not stalled.
    running_job(conn, now, heartbeat_at=None, worker_started_at=now - 10)
    assert one_pass(conn, make_config(tmp_path), workers, now) == []
    assert get(conn, "job").rev == 0
    assert workers.killed == [] and workers.spawned == []


def test_job_finished_by_its_worker_meanwhile_is_not_respawned(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    running_job(conn, now)

    def alive_check_while_worker_finishes(pid: int, start: float | None) -> bool:
        job = get(conn, "job")
        db_queries.save_job(
            conn,
            job.copy(
                state=State.SUCCEEDED,
                status_code=StatusCode.SUCCEEDED,
                status_message=Msg.SUCCEEDED,
            ),
        )
        return False

    run_pass(
        make_config(tmp_path),
        conn,
        spawn=workers.spawn,
        is_alive=alive_check_while_worker_finishes,
        kill=workers.kill,
        now=lambda: now,
    )
    assert get(conn, "job").state is State.SUCCEEDED
    assert workers.spawned == []


def test_failed_job_frees_capacity_in_the_same_pass(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    running_job(conn, now, attempts=3)
    add(conn, "next")
    one_pass(conn, make_config(tmp_path, max_workers=1), workers, now)
    assert get(conn, "next").state is State.RUNNING


def test_pass_over_large_history_handles_only_active_jobs(
    tmp_path: Path, conn: sqlite3.Connection, workers: Workers, now: float
) -> None:
    finished = [
        Job(
            id=f"done{n:011d}",
            job_request_id=f"r{n // 10}",
            state=State.SUCCEEDED,
            workspace="ws",
            action=f"a{n % 50}",
            created_at=n,
            updated_at=n,
            status_message=Msg.SUCCEEDED,
            outputs={"output/x.csv": "moderately_sensitive"},
        )
        for n in range(20_000)
    ]
    with db.transaction(conn):
        db_queries.insert_jobs(conn, finished)
    for n in range(25):
        workers.alive.add(500 + n)
        add(
            conn,
            f"run{n}",
            State.RUNNING,
            worker_pid=500 + n,
            worker_started_at=now,
            heartbeat_at=now,
        )
        add(conn, f"new{n}", wait_for_job_ids=[f"done{n:011d}"])
    changes = one_pass(conn, make_config(tmp_path, max_workers=100), workers, now)
    assert sorted(c.job_id for c in changes) == sorted(f"new{n}" for n in range(25))
    assert len(workers.spawned) == 25


# ---- real processes (the defaults of run_pass) ----------------------------------------------


@pytest.mark.skipif(os.name == "nt", reason="uses a POSIX shell as the fake worker")
def test_spawn_worker_starts_a_detached_logged_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_python = tmp_path / "fake-python"
    fake_python.write_text('#!/bin/sh\necho "args: $*"\necho "path: $PYTHONPATH"\nexec sleep 60\n')
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    pid, started = processes.spawn_worker(make_config(tmp_path), "abcd1234abcd1234")
    try:
        assert os.getsid(pid) == pid  # its own session: a Ctrl-C to the service does not reach it
        assert processes.worker_alive(pid, started)
        log_file = tmp_path / "logs" / "workers.log"
        wait_for(lambda: "path:" in log_file.read_text(), 10, "the worker's log lines")
        text = log_file.read_text()
        assert "args: -m jobrunner_lib.jobs.worker abcd1234abcd1234" in text
        assert f"path: {CHECKOUT_DIR}{os.pathsep}" in text
    finally:
        processes.kill_worker(pid, started)
    wait_for(lambda: not processes.worker_alive(pid, started), 10, "the worker to exit")
    processes.reap_children()
    assert processes._WORKERS == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="start times come from /proc")
def test_worker_alive_rejects_a_reused_pid() -> None:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        started = processes.process_info(proc.pid)[1]
        assert started is not None and abs(started - time.time()) < 5
        assert processes.worker_alive(proc.pid, started)
        assert not processes.worker_alive(proc.pid, started - 3600)  # same pid, another process
        processes.kill_worker(proc.pid, started - 3600)  # must not kill the stranger
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not processes.worker_alive(proc.pid, started)


@pytest.mark.parametrize(
    ("website", "pending", "expect_taken", "expect_wake"),
    [
        # A warm worker takes the next job: the service has nothing to sync and need not pass.
        (False, True, True, False),
        # It takes nothing: the service must look (the queue may be empty: --until-idle ends).
        (False, False, False, True),
        # A jobs website is to hear of the ended job now, whatever the worker does next.
        (True, True, True, True),
    ],
)
def test_after_job_wakes_the_service_only_when_it_has_something_to_do(
    tmp_path: Path,
    conn: sqlite3.Connection,
    website: bool,
    pending: bool,
    expect_taken: bool,
    expect_wake: bool,
) -> None:
    config = make_config(tmp_path)
    if website:
        config = dataclasses.replace(config, job_server_endpoint="http://127.0.0.1:9/api/v2")
    if pending:
        add(conn, "next")
    lock = take_run_lock(config, 1)
    try:
        taken = after_job(config, lock, take_next=True)
    finally:
        lock.release()
    assert (taken == "next") is expect_taken
    if expect_taken:
        assert get(conn, "next").worker_pid == os.getpid()
    assert config.wake_path.exists() is expect_wake


def test_after_job_without_the_run_lock_wakes_the_service_to_pass(
    tmp_path: Path, conn: sqlite3.Connection
) -> None:
    config = make_config(tmp_path)
    add(conn, "next")
    assert after_job(config, None, take_next=True) is None
    assert get(conn, "next").state is State.PENDING  # no pass ran here: the service's will
    assert config.wake_path.exists()
