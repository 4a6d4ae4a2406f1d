"""Database maintenance mode with real Docker, real workers and real containers (issue 17, item 5).

A real-data backend (its own BACKEND name, USING_DUMMY_DATA_BACKEND=false, a DEFAULT_DATABASE_URL
that reaches nothing, no DATABASE_NETWORK: database jobs get Docker's default bridge): a database
job is stopped and put back to pending when maintenance starts while a job without the database
keeps running, and both finish once it ends; the periodic check sets and clears db-maintenance
from what a real container prints. Passes run in-process; their workers and the check are real
detached processes. Every Docker object carries this session's label and is removed afterwards.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobrunner_lib.core.config import Config, load_config
from jobrunner_lib.core.models import Job, State, StatusCode
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker.mounts import ROLE_LABEL
from jobrunner_lib.jobs import maintenance, processes, run
from jobrunner_lib.store import db
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.store import queries as db_queries
from tests.support import cli
from tests.support.factories import make_job, make_request
from tests.support.fixtures import remove_labelled
from tests.support.studies import make_study
from tests.support.waiting import wait_for

pytestmark = pytest.mark.docker

SESSION = uuid.uuid4().hex[:12]
TEST_LABEL = f"org.jr.test={SESSION}"
REAL_DATA = {
    "BACKEND": f"jrmaint{SESSION}",
    "USING_DUMMY_DATA_BACKEND": "false",
    "DEFAULT_DATABASE_URL": "mssql://nobody:secret@db.invalid:1433/x",
    "DOCKER_REGISTRY": "jr-demo",
    "ALLOWED_IMAGES": "python",
    "HELPER_IMAGE": "jr-busybox:latest",
    "MAX_WORKERS": "4",
    "STATS_DATABASE_FILE": "off",
}
SCRIPTS = {
    # A database job: it must get DATABASE_URL (and so a network); it takes a few seconds.
    "analysis/db.sh": (
        'test -n "$DATABASE_URL" || exit 9\necho extracting\nsleep 5\nmkdir -p output\n'
        "echo rows > output/db.csv\n"
    ),
    # Needs no database: gets neither DATABASE_URL nor a network.
    "analysis/plain.sh": (
        'test -z "$DATABASE_URL" || exit 9\necho modelling\nsleep 8\nmkdir -p output\n'
        "echo done > output/plain.csv\n"
    ),
}
# `{current_mode}` is the mode before the check: shown so the log says what the check was told.
SAYS_MAINTENANCE = (
    '-c \'echo "was {current_mode}"; test -n "$DATABASE_URL" && echo db-maintenance\''
)
SAYS_ALL_CLEAR = "-c 'echo \"was {current_mode}\"; echo normal operation'"
FAILS = "-c 'echo db-maintenance; echo broken >&2; exit 3'"


@pytest.fixture
def env(workdir: Path, monkeypatch: pytest.MonkeyPatch, docker_ready) -> Iterator[Path]:
    """A real-data backend in a private workdir (its settings in the environment, which the
    detached workers and checks read too); workers and objects removed afterwards."""
    monkeypatch.setenv(docker.EXTRA_LABELS_ENV, TEST_LABEL)
    monkeypatch.setenv("JR_USER", "tester")
    for name, value in REAL_DATA.items():
        monkeypatch.setenv(name, value)
    yield workdir
    if (workdir / "db.sqlite").exists():
        conn = db.connect(workdir / "db.sqlite")
        for row in conn.execute("SELECT worker_pid, worker_started_at FROM job WHERE worker_pid"):
            processes.kill_worker(row[0], row[1])
        conn.close()
    processes.reap_children()
    remove_labelled(TEST_LABEL)


@pytest.fixture
def config(env: Path) -> Config:
    return load_config()


@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, str]:
    project = 'version: "3.0"\nexpectations: {population_size: 10}\nactions: {}\n'
    return make_study(tmp_path / "study", project, SCRIPTS)


def add(conn: sqlite3.Connection, study: tuple[Path, str], action: str, *, requires_db: bool):
    """A pending job of the study running analysis/<action>.sh (as jr-add-job would create it on
    this backend: a database action gets requires_db)."""
    repo, sha = study
    request = make_request(
        "maint", [action], repo_url=str(repo), commit=sha, database_name="default"
    )
    job = make_job(
        request,
        action,
        at=int(time.time()),
        run_command=f"python:v1 analysis/{action}.sh",
        output_spec={"moderately_sensitive": {"out": f"output/{action}.csv"}},
        requires_db=requires_db,
    )
    db_queries.insert_request(conn, request, [job])
    return job.id


def get(conn: sqlite3.Connection, job_id: str) -> Job:
    job = db_queries.get_job(conn, job_id)
    assert job is not None
    return job


def container_state(job_id: str) -> str | None:
    info = docker.inspect_container(docker.container_name(job_id))
    return None if info is None else info["State"]["Status"]


def executing(conn: sqlite3.Connection, job_id: str) -> bool:
    job = get(conn, job_id)
    return job.status_code is StatusCode.EXECUTING and container_state(job_id) == "running"


def drive(config: Config, conn, until: Callable[[], bool], timeout: float, what: str) -> None:
    """Run passes, as the service does, until the condition holds."""

    def step() -> bool:
        run.run_pass(config, conn)
        return until()

    wait_for(step, timeout, what, interval=0.2)


def flags(config: Config, *args: str, **env: str):
    result = cli.run("jr-flags", *args, workdir=config.workdir, **REAL_DATA, **env)
    assert result.returncode == 0, result.stderr
    return result


def test_maintenance_stops_database_jobs_only_and_both_finish_after_it(config, study):
    conn = db.connect(config.db_path)
    try:
        db_id = add(conn, study, "db", requires_db=True)
        plain_id = add(conn, study, "plain", requires_db=False)
        drive(
            config,
            conn,
            lambda: executing(conn, db_id) and executing(conn, plain_id),
            60,
            "both jobs to run",
        )
        worker = get(conn, db_id)
        info = docker.inspect_container(docker.container_name(db_id))
        assert info is not None and info["HostConfig"]["NetworkMode"] == "bridge"

        flags(config, "set", "manual-db-maintenance")
        changes = run.run_pass(config, conn)

        stopped = get(conn, db_id)
        assert (stopped.state, stopped.status_code, stopped.status_message) == (
            State.PENDING,
            StatusCode.WAITING_DB_MAINTENANCE,
            "Waiting for database to finish maintenance",
        )
        assert stopped.started_at is None and stopped.worker_pid is None
        assert [(c.job_id, c.old_state, c.new_state) for c in changes] == [
            (db_id, "running", "pending")
        ]
        assert not processes.worker_alive(worker.worker_pid, worker.worker_started_at)
        assert container_state(db_id) is None  # its container and volume are gone
        assert not docker.volume_exists(docker.volume_name(db_id))
        assert not (config.volumes_dir / f"os-volume-{db_id}").exists()
        assert executing(conn, plain_id)  # the job without the database goes on

        # While it lasts, the database job waits and the other one finishes.
        drive(config, conn, lambda: get(conn, plain_id).state.is_final, 60, "the plain job")
        plain = get(conn, plain_id)
        assert plain.state is State.SUCCEEDED, plain.status_message
        waiting = get(conn, db_id)
        assert (waiting.state, waiting.status_code) == (
            State.PENDING,
            StatusCode.WAITING_DB_MAINTENANCE,
        )
        assert container_state(db_id) is None

        flags(config, "clear", "manual-db-maintenance")
        drive(config, conn, lambda: get(conn, db_id).state.is_final, 60, "the database job")
        done = get(conn, db_id)
        assert done.state is State.SUCCEEDED, done.status_message
        outputs = config.medium_privacy_storage_base / "workspaces" / "maint" / "output"
        assert (outputs / "db.csv").read_text() == "rows\n"
        assert (outputs / "plain.csv").read_text() == "done\n"
        logs = list((config.high_privacy_storage_base / "logs").glob(f"*/os-job-{db_id}/logs.txt"))
        assert len(logs) == 1 and logs[0].read_text().count("extracting") == 1  # the second run
    finally:
        conn.close()


def check_config(monkeypatch: pytest.MonkeyPatch, command: str) -> Config:
    monkeypatch.setenv("MAINTENANCE_CHECK_IMAGE", "jr-demo/python:v1")
    monkeypatch.setenv("MAINTENANCE_CHECK_COMMAND", command)
    return load_config()


def mode(conn: sqlite3.Connection) -> str | None:
    flag = store_flags.backend_flags(conn).get("mode")
    return flag.value if flag else None


def check_containers(config: Config) -> list:
    return docker.list_containers(config.backend, extra={ROLE_LABEL: "maintenance-check"})


def test_the_check_sets_and_clears_db_maintenance_from_a_real_containers_output(
    env, monkeypatch, caplog
):
    caplog.set_level("INFO")
    on = check_config(monkeypatch, SAYS_MAINTENANCE)
    conn = db.connect(on.db_path)
    try:
        assert maintenance.run_once(on, conn) == 0
        assert mode(conn) == "db-maintenance"
        assert "Enabling DB maintenance mode" in caplog.text
        assert maintenance.last_check(conn).value.startswith("mode=db-maintenance at ")

        # A check that fails (exit 3, whatever it printed) changes nothing.
        failing = check_config(monkeypatch, FAILS)
        assert maintenance.run_once(failing, conn) == 1
        assert mode(conn) == "db-maintenance"
        assert "the check exited with code 3: db-maintenance" in caplog.text

        off = check_config(monkeypatch, SAYS_ALL_CLEAR)
        assert maintenance.run_once(off, conn) == 0
        assert mode(conn) is None
        assert "DB maintenance mode had ended" in caplog.text

        # Manual maintenance: the database is not asked, and the mode is held.
        store_flags.put_flag(conn, "manual-db-maintenance", "on")
        assert maintenance.run_once(failing, conn) == 0
        assert mode(conn) == "db-maintenance"
        assert maintenance.run_once(off, conn) == 0
        assert mode(conn) == "db-maintenance"
        assert store_flags.get_flag(conn, "manual-db-maintenance") == "on"
        assert check_containers(on) == []
    finally:
        conn.close()


def test_a_pass_starts_the_periodic_check_detached_and_it_sets_the_mode(env, monkeypatch):
    monkeypatch.setenv("MAINTENANCE_CHECK_INTERVAL", "3600")
    config = check_config(monkeypatch, SAYS_MAINTENANCE)
    conn = db.connect(config.db_path)
    try:
        assert run.run_pass(config, conn) == []  # no jobs: the check starts all the same
        wait_for(lambda: mode(conn) == "db-maintenance", 60, "the detached check")
        last = maintenance.last_check(conn)
        assert last.value.startswith("mode=db-maintenance at ")
        log = (config.workdir / "logs" / "workers.log").read_text()
        assert " mntn Enabling DB maintenance mode" in log
        assert "secret" not in log  # the database URL never reaches a log
        # Not due again within the interval: the next passes start nothing.
        run.run_pass(config, conn)
        assert maintenance.last_check(conn) == last

        # `jr-flags clear manual-db-maintenance` makes it due at once; the database (this
        # container) now says all is well.
        check = {"MAINTENANCE_CHECK_IMAGE": "jr-demo/python:v1"}
        flags(config, "set", "manual-db-maintenance", **check)
        monkeypatch.setenv("MAINTENANCE_CHECK_COMMAND", SAYS_ALL_CLEAR)
        config = load_config()
        cleared = flags(config, "clear", "manual-db-maintenance", **check)
        assert "the maintenance check runs at the next pass" in cleared.stderr
        assert mode(conn) == "db-maintenance"
        run.run_pass(config, conn)
        wait_for(lambda: mode(conn) is None, 60, "the check to end the maintenance")
        wait_for(lambda: check_containers(config) == [], 30, "the check's container to go")
    finally:
        conn.close()
