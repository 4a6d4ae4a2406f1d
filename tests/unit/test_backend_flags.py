"""Backend flags and database maintenance mode (issue 17, item 5), without Docker: the flags as
stored and as the jobs website receives them, the settings, the maintenance check's decisions,
and what a run pass does with database jobs during maintenance (fake worker processes)."""

from __future__ import annotations

import datetime
import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from jobrunner_lib.core import flags as core_flags
from jobrunner_lib.core.config import Config, load_config
from jobrunner_lib.core.errors import ConfigError
from jobrunner_lib.core.flags import Flag
from jobrunner_lib.core.models import Job, Msg, State, StatusCode
from jobrunner_lib.jobs import cleanup, maintenance
from jobrunner_lib.jobs.run import run_pass
from jobrunner_lib.store import db
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.store import queries as db_queries
from jobrunner_lib.website.wire import flags_header
from tests.unit.test_run_pass import add as run_pass_add

# ---- the flags as upstream keeps and sends them ----------------------------------------------


def upstream_isoformat(ts: float) -> str:
    """upstream's models.timestamp_to_isoformat, verbatim (utcfromtimestamp is deprecated)."""
    naive = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).replace(tzinfo=None)
    return naive.isoformat() + "Z"


@pytest.mark.parametrize("ts", [1731081649.123456, 1731081649.5, 1731081649, 0.000001])
def test_flag_times_are_written_as_upstream_writes_them(ts):
    assert core_flags.timestamp_isoformat(ts) == upstream_isoformat(ts)
    assert core_flags.timestamp_isoformat(1731081649.123456) == "2024-11-08T16:00:49.123456Z"
    assert core_flags.timestamp_isoformat(1731081649) == "2024-11-08T16:00:49Z"
    assert core_flags.timestamp_isoformat(None) is None


def test_the_flags_header_is_upstreams_compact_json():
    header = flags_header(
        [
            Flag("paused", "true", 1731081649.25),
            Flag("mode", None, 1731081600),
            Flag("manual-db-maintenance", "on", None),
        ]
    )
    assert header == (
        '{"paused":{"v":"true","ts":"2024-11-08T16:00:49.250000Z"},'
        '"mode":{"v":null,"ts":"2024-11-08T16:00:00Z"},'
        '"manual-db-maintenance":{"v":"on","ts":null}}'
    )
    assert flags_header([]) == "{}"
    # What the website's status page does with it.
    state = json.loads(flags_header([Flag("mode", "db-maintenance", 1731081600)]))
    assert state.get("mode", {}).get("v", "") == "db-maintenance"
    assert flags_header([Flag("mode", "é", 0)]).isascii()


def test_names_values_and_what_they_mean():
    assert core_flags.NAMES == ("paused", "mode", "manual-db-maintenance")
    assert core_flags.check("mode", "db-maintenance") is None
    assert core_flags.check("mode", None) is None
    assert "can only be db-maintenance" in core_flags.check("mode", "manual-db-maintenance")
    assert "unknown flag 'foo'" in core_flags.check("foo", "x")
    on = {"mode": Flag("mode", "db-maintenance", 1)}
    assert core_flags.db_maintenance(on) and not core_flags.paused(on)
    manual = {"manual-db-maintenance": Flag("manual-db-maintenance", "on", 1)}
    assert core_flags.db_maintenance(manual)
    assert not core_flags.db_maintenance({"mode": Flag("mode", None, 1)})
    # An older jr stored who paused the backend as the value; "false" is off.
    assert core_flags.paused({"paused": Flag("paused", "draining for reboot since x by y", 1)})
    assert not core_flags.paused({"paused": Flag("paused", "false", 1)})


@pytest.fixture
def conn(tmp_path: Path):
    connection = db.connect(tmp_path / "db.sqlite")
    yield connection
    connection.close()


def test_a_flag_keeps_the_time_of_its_last_change_and_a_cleared_flag_keeps_its_row(conn):
    flag, changed = store_flags.put_flag(conn, "mode", "db-maintenance", at=100.5)
    assert (flag, changed) == (Flag("mode", "db-maintenance", 100.5), True)
    # Set again: nothing changes, not even the time (as upstream's set_flag).
    assert store_flags.put_flag(conn, "mode", "db-maintenance", at=200) == (flag, False)
    cleared, changed = store_flags.put_flag(conn, "mode", None, at=300)
    assert (cleared, changed) == (Flag("mode", None, 300), True)
    assert store_flags.backend_flags(conn) == {"mode": Flag("mode", None, 300)}
    # Internal flags (cleanup:, hung:, the check's) are never backend flags.
    store_flags.set_flag(conn, "cleanup:abc", "1")
    store_flags.put_flag(conn, maintenance.CHECK_FLAG, "started", at=1)
    assert list(store_flags.backend_flags(conn)) == ["mode"]


def test_unless_leaves_a_flag_alone_while_the_other_is_on(conn):
    store_flags.put_flag(conn, "mode", "db-maintenance", at=1)
    store_flags.put_flag(conn, "manual-db-maintenance", "on", at=1)
    assert store_flags.put_flag(conn, "mode", None, unless="manual-db-maintenance")[1] is False
    assert store_flags.get_flag(conn, "mode") == "db-maintenance"
    store_flags.put_flag(conn, "manual-db-maintenance", None, at=2)
    assert store_flags.put_flag(conn, "mode", None, unless="manual-db-maintenance")[1] is True


# ---- settings ----------------------------------------------------------------------------------

REAL = {"BACKEND": "tpp", "DEFAULT_DATABASE_URL": "mssql://db/x"}


def cfg(tmp_path: Path, **env: str) -> Config:
    return load_config(environ=env, env_file=tmp_path / "missing.env")


def test_the_check_is_off_by_default_and_configured_by_its_settings(tmp_path):
    config = cfg(tmp_path, **REAL)
    assert config.maintenance_check_image is None
    assert config.maintenance_check_command == "maintenance --current-mode {current_mode}"
    assert config.maintenance_check_interval == 300.0
    config = cfg(
        tmp_path,
        **REAL,
        MAINTENANCE_CHECK_IMAGE="jr-demo/python:v1",
        MAINTENANCE_CHECK_COMMAND="-c 'echo db-maintenance'",
        MAINTENANCE_CHECK_INTERVAL="60",
    )
    assert config.maintenance_check_image == "jr-demo/python:v1"
    assert config.maintenance_check_interval == 60.0


def test_upstreams_settings_turn_on_its_check(tmp_path):
    config = cfg(
        tmp_path, **REAL, ENABLE_MAINTENANCE_MODE_THREAD="true", MAINTENANCE_POLL_INTERVAL="120"
    )
    assert config.maintenance_check_image == "ghcr.io/opensafely-core/cohortextractor"
    assert config.maintenance_check_interval == 120.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAINTENANCE_CHECK_IMAGE": "x"}, "no database"),
        (
            {**REAL, "DEFAULT_DATABASE_URL": "", "SLICE_DATABASE_URL": "m://"},
            "DEFAULT_DATABASE_URL",
        ),
        ({**REAL, "MAINTENANCE_CHECK_COMMAND": "-c 'oops"}, "MAINTENANCE_CHECK_COMMAND="),
        ({**REAL, "MAINTENANCE_CHECK_INTERVAL": "0"}, "MAINTENANCE_CHECK_INTERVAL="),
    ],
)
def test_bad_check_settings_are_configuration_errors(tmp_path, env, message):
    env = {"MAINTENANCE_CHECK_IMAGE": "img", **env}
    with pytest.raises(ConfigError, match=message):
        cfg(tmp_path, **env)


# ---- the check's decisions (its container faked) -----------------------------------------------


@pytest.fixture
def checked(tmp_path: Path, conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch):
    """The check with the database's last line of output given by the test."""
    config = cfg(tmp_path, **REAL, MAINTENANCE_CHECK_IMAGE="img", WORKDIR=str(tmp_path))
    answers: list[str] = []
    asked: list[str | None] = []

    def ask(config: Config, current: str | None) -> str:
        asked.append(current)
        answer = answers.pop(0)
        if answer == "fail":
            raise maintenance.CheckFailed("the check exited with code 1: boom")
        return answer

    monkeypatch.setattr(maintenance, "ask_database", ask)
    return config, answers, asked


def test_the_check_sets_and_clears_the_mode_from_the_last_line(checked, conn):
    config, answers, asked = checked
    answers += ["db-maintenance", "db-maintenance", "", "fail"]
    assert maintenance.check(config, conn) == ("db-maintenance", True)
    assert maintenance.check(config, conn) == ("db-maintenance", False)
    assert maintenance.check(config, conn) == (None, True)
    assert asked == [None, "db-maintenance", "db-maintenance"]
    assert store_flags.backend_flags(conn)["mode"].value is None
    # A check that cannot answer changes nothing (and says so in the check's flag).
    assert maintenance.run_once(config, conn) == 1
    assert store_flags.backend_flags(conn)["mode"].value is None
    assert maintenance.last_check(conn).value.startswith("failed at ")


def test_manual_maintenance_is_not_asked_and_never_cleared_by_the_check(checked, conn):
    config, answers, asked = checked
    store_flags.put_flag(conn, "manual-db-maintenance", "on")
    assert maintenance.check(config, conn) == ("db-maintenance", True)
    assert asked == []
    assert store_flags.get_flag(conn, "manual-db-maintenance") == "on"


def test_the_check_is_started_once_per_interval_by_the_passes(tmp_path, conn):
    config = cfg(tmp_path, **REAL, MAINTENANCE_CHECK_IMAGE="img", MAINTENANCE_CHECK_INTERVAL="300")
    started: list[str] = []

    def spawn(config: Config, module: str) -> tuple[int, float]:
        started.append(module)
        return 4242, 0.0

    assert maintenance.start_if_due(config, conn, now=lambda: 1000.0, spawn=spawn) == 4242
    assert maintenance.start_if_due(config, conn, now=lambda: 1299.0, spawn=spawn) is None
    assert maintenance.start_if_due(config, conn, now=lambda: 1300.0, spawn=spawn) == 4242
    assert started == ["jobrunner_lib.jobs.maintenance"] * 2
    off = cfg(tmp_path, **REAL)
    assert maintenance.start_if_due(off, conn, now=lambda: 9999.0, spawn=spawn) is None


# ---- the run pass during maintenance -------------------------------------------------------------


class Workers:
    """Fake workers (as tests/unit/test_run_pass.py's) and a record of removed objects."""

    def __init__(self) -> None:
        self.next_pid = 1000
        self.alive: set[int] = set()
        self.spawned: list[str] = []
        self.killed: list[int] = []
        self.removed: list[str] = []
        self.fail_removal = False

    def spawn(self, config: Config, job_id: str) -> tuple[int, float]:
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        self.alive.add(pid)
        self.spawned.append(job_id)
        return pid, time.time()

    def is_alive(self, pid: int, start_time: float | None) -> bool:
        return pid in self.alive

    def kill(self, pid: int, start_time: float | None) -> None:
        self.killed.append(pid)
        self.alive.discard(pid)

    def remove(self, config: Config, job_id: str) -> list[str]:
        if self.fail_removal:
            raise RuntimeError("Docker said no")
        self.removed.append(job_id)
        return [f"os-job-{job_id}"]


def add(conn: sqlite3.Connection, job_id: str, state: State = State.PENDING, **fields: Any) -> Job:
    """test_run_pass's job, with a command (a job that runs something)."""
    return run_pass_add(conn, job_id, state, **{"run_command": "python:v1 x.sh", **fields})


def one_pass(conn: sqlite3.Connection, tmp_path: Path, workers: Workers) -> list:
    config = Config(
        workdir=tmp_path, max_workers=10, job_resource_weights_file=tmp_path / "weights.ini"
    )
    return run_pass(
        config,
        conn,
        spawn=workers.spawn,
        is_alive=workers.is_alive,
        kill=workers.kill,
        rng=random.Random(1),
        remove_objects=workers.remove,
    )


def get(conn: sqlite3.Connection, job_id: str) -> Job:
    job = db_queries.get_job(conn, job_id)
    assert job is not None
    return job


def running(conn: sqlite3.Connection, workers: Workers, job_id: str, code: StatusCode, **kw) -> Job:
    pid, workers.next_pid = workers.next_pid, workers.next_pid + 1
    workers.alive.add(pid)
    return add(
        conn,
        job_id,
        State.RUNNING,
        status_code=code,
        status_message="x",
        started_at=int(time.time()) - 50,
        worker_pid=pid,
        worker_started_at=time.time(),
        heartbeat_at=time.time(),
        attempts=1,
        **kw,
    )


@pytest.mark.parametrize("flag", ["mode", "manual-db-maintenance"])
def test_maintenance_holds_and_stops_database_jobs_only(tmp_path, conn, flag):
    workers = Workers()
    store_flags.put_flag(conn, flag, core_flags.VALUES[flag])
    add(conn, "db_pending", requires_db=True)
    add(conn, "plain_pending")
    db_run = running(conn, workers, "db_running", StatusCode.EXECUTING, requires_db=True)
    running(conn, workers, "db_finalizing", StatusCode.FINALIZING, requires_db=True)
    running(conn, workers, "plain_running", StatusCode.EXECUTING)

    changes = one_pass(conn, tmp_path, workers)

    held = get(conn, "db_pending")
    assert (held.state, held.status_code, held.status_message) == (
        State.PENDING,
        StatusCode.WAITING_DB_MAINTENANCE,
        "Waiting for database to finish maintenance",
    )
    stopped = get(conn, "db_running")
    assert (stopped.state, stopped.status_code, stopped.status_message) == (
        State.PENDING,
        StatusCode.WAITING_DB_MAINTENANCE,
        Msg.WAITING_DB_MAINTENANCE,
    )
    assert (stopped.started_at, stopped.worker_pid, stopped.attempts) == (None, None, 0)
    assert workers.killed == [db_run.worker_pid]
    assert workers.removed == ["db_running"]
    assert get(conn, "db_finalizing").state is State.RUNNING  # done with the database
    assert get(conn, "plain_running").state is State.RUNNING
    assert workers.spawned == ["plain_pending"]
    assert {(c.job_id, c.old_state, c.new_state, c.status_code) for c in changes} >= {
        ("db_running", "running", "pending", "waiting_db_maintenance"),
        ("db_pending", "pending", "pending", "waiting_db_maintenance"),
    }

    # Cleared: both database jobs start again.
    store_flags.put_flag(conn, "mode", None)
    store_flags.put_flag(conn, "manual-db-maintenance", None)
    one_pass(conn, tmp_path, workers)
    assert get(conn, "db_pending").state is State.RUNNING
    assert get(conn, "db_running").state is State.RUNNING
    assert sorted(workers.spawned) == ["db_pending", "db_running", "plain_pending"]


def test_a_stopped_job_whose_objects_stay_is_not_claimed_until_they_are_gone(tmp_path, conn):
    workers = Workers()
    store_flags.put_flag(conn, "mode", "db-maintenance")
    running(conn, workers, "db", StatusCode.PREPARING, requires_db=True)
    workers.fail_removal = True
    one_pass(conn, tmp_path, workers)
    assert get(conn, "db").state is State.PENDING
    assert "db" in cleanup.owed(conn)

    store_flags.put_flag(conn, "mode", None)
    one_pass(conn, tmp_path, workers)  # removal still fails: it waits
    assert get(conn, "db").state is State.PENDING and workers.spawned == []
    workers.fail_removal = False
    one_pass(conn, tmp_path, workers)
    assert get(conn, "db").state is State.RUNNING and workers.spawned == ["db"]
    assert workers.removed == ["db"] and "db" not in cleanup.owed(conn)


def test_a_cancelled_database_job_is_left_to_its_worker(tmp_path, conn):
    workers = Workers()
    store_flags.put_flag(conn, "mode", "db-maintenance")
    running(conn, workers, "db", StatusCode.EXECUTING, requires_db=True, cancelled=True)
    one_pass(conn, tmp_path, workers)
    assert get(conn, "db").state is State.RUNNING and workers.killed == []
