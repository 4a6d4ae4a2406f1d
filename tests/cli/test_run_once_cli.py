"""jr-run-once as an operator runs it: exit codes, stderr lines and output rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from filelock import FileLock

from jobrunner_lib.core.models import Job, State
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries
from tests.support.cli import run


def add_jobs(workdir: Path, *jobs: Job) -> None:
    conn = db.connect(workdir / "db.sqlite")
    try:
        with db.transaction(conn):
            db_queries.insert_jobs(conn, jobs)
    finally:
        conn.close()


def read_jobs(workdir: Path) -> dict[str, Job]:
    conn = db.connect(workdir / "db.sqlite")
    try:
        return {job.id: job for job in db_queries.find_jobs(conn)}
    finally:
        conn.close()


def job(job_id: str, state: State = State.PENDING, **fields: object) -> Job:
    return Job(
        id=job_id,
        job_request_id="req1",
        state=state,
        workspace="ws",
        action=job_id,
        created_at=1_700_000_000,
        updated_at=1_700_000_000,
        **fields,
    )  # type: ignore[arg-type]


def test_second_run_while_the_lock_is_held_exits_75(tmp_path: Path) -> None:
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    lock_path = workdir / ".run.lock"
    with FileLock(str(lock_path)):
        result = run("jr-run-once", workdir=workdir)
    assert result.returncode == 75
    assert result.stderr == (
        f"jr-run-once: another jr-run-once is running (lock {lock_path}); try again later\n"
    )
    assert result.stdout == ""


def test_docker_unreachable_exits_75_with_one_line_and_touches_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "workdir"
    add_jobs(workdir, job("pendingjob"), job("cancelled1", cancelled=True))
    before = read_jobs(workdir)
    result = run("jr-run-once", workdir=workdir, DOCKER_HOST="unix:///nonexistent.sock")
    assert result.returncode == 75
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("jr-run-once: Docker is not reachable (")
    assert lines[0].endswith("): is the Docker service running?")
    assert result.stdout == ""
    assert read_jobs(workdir) == before


@pytest.mark.docker
def test_pass_prints_one_row_per_change(tmp_path: Path) -> None:
    workdir = tmp_path / "workdir"
    # Changes that need no worker: a failed dependency and a cancellation before start.
    add_jobs(
        workdir,
        job("failedjob", State.FAILED),
        job("waiter", wait_for_job_ids=["failedjob"]),
        job("cancelled1", cancelled=True),
    )
    result = run("jr-run-once", "-o", "jsonl", workdir=workdir)
    assert result.returncode == 0, result.stderr
    rows = sorted((json.loads(line) for line in result.stdout.splitlines()), key=lambda r: r["id"])
    assert rows == [
        {
            "id": "cancelled1",
            "action": "cancelled1",
            "workspace": "ws",
            "from": "pending",
            "to": "failed",
            "status_code": "cancelled_by_user",
            "message": "Cancelled by user",
        },
        {
            "id": "waiter",
            "action": "waiter",
            "workspace": "ws",
            "from": "pending",
            "to": "failed",
            "status_code": "dependency_failed",
            "message": "Not starting as dependency failed: failedjob (failedjob)",
        },
    ]
    # Every change is logged on stderr with the job's tags.
    assert (
        " run  Cancelled by user status=cancelled_by_user action=cancelled1 id=cancelled1"
        in result.stderr
    )
    again = run("jr-run-once", "-o", "ids", workdir=workdir)
    assert (again.returncode, again.stdout) == (0, "")
    tsv = run("jr-run-once", workdir=workdir)
    assert tsv.stdout == "id\taction\tworkspace\tfrom\tto\tstatus_code\tmessage\n"


@pytest.mark.docker
def test_malformed_weights_file_is_a_config_error(tmp_path: Path) -> None:
    workdir = tmp_path / "workdir"
    weights = tmp_path / "weights.ini"
    weights.write_text("[ws]\nbroken(= 2\n")
    add_jobs(workdir, job("pendingjob"))
    result = run("jr-run-once", workdir=workdir, JOB_RESOURCE_WEIGHTS_FILE=str(weights))
    assert result.returncode == 78
    assert result.stderr.startswith(
        f"jr-run-once: job resource weights file {weights}, [ws] broken(:"
    )
    pending = read_jobs(workdir)["pendingjob"]
    assert (pending.state, pending.rev) == (State.PENDING, 0)
