"""One sync pass with 1 000 active jobs (100 requests x 10) on the fake jobs website.

Figures: the in-process pass (floor: the same GET and POSTs by the bare client, so the ratio is
jr's own overhead), the same with 100 000 finished jobs of history in the store (the cost of
finding unposted changes), and a whole `bin/jr-sync` run (floor: interpreter start).
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, report, run_cmd, timed, tool_env

from jobrunner_lib.core.config import Config, load_config
from jobrunner_lib.core.ids import job_id, new_request_id
from jobrunner_lib.core.models import JobRequest, State, StatusCode, new_job
from jobrunner_lib.jobs.sync import WIRE_KEYS, sync_pass
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries
from jobrunner_lib.website.client import JobServerClient
from jobrunner_lib.website.wire import job_to_wire
from tests.support.fake_jobserver import FakeJobServer

REQUESTS, JOBS_PER_REQUEST, HISTORY = 100, 10, 100_000


def make_request(request_id: str) -> JobRequest:
    return JobRequest(
        id=request_id,
        repo_url="https://github.com/opensafely/study",
        commit="c" * 40,
        branch="main",
        requested_actions=["run_all"],
        cancelled_actions=[],
        workspace="ws",
        database_name="full",
    )


def fill_active(conn: sqlite3.Connection, server: FakeJobServer) -> None:
    """Active requests known to both the store and the website, with pending and running jobs."""
    for _ in range(REQUESTS):
        request = make_request(server.add_request()["identifier"])
        jobs = [
            new_job(
                job_id(request.id, f"a{i}"),
                request,
                f"a{i}",
                State.PENDING,
                StatusCode.CREATED,
                "Created",
                run_command=f"python:v1 analysis/a{i}.py",
            )
            for i in range(JOBS_PER_REQUEST)
        ]
        db_queries.insert_request(conn, request, jobs)


def fill_history(conn: sqlite3.Connection) -> None:
    """Finished jobs of requests the website no longer lists, already posted."""
    at = int(time.time()) - 30 * 86400
    with db.transaction(conn):
        for r in range(HISTORY // 10):
            request = make_request(new_request_id())
            jobs = [
                new_job(
                    job_id(request.id, f"a{i}"),
                    request,
                    f"a{i}",
                    State.SUCCEEDED,
                    StatusCode.SUCCEEDED,
                    "Completed successfully",
                    at=at + r,
                    run_command=f"python:v1 analysis/a{i}.py",
                )
                for i in range(10)
            ]
            db_queries.insert_jobs(conn, jobs)
            conn.executemany(
                "INSERT INTO job_post VALUES (?, ?, ?)",
                [(j.id, j.updated_at, j.state.value) for j in jobs],
            )


def bare_client_pass(client: JobServerClient, wire: list[dict]) -> None:
    """The network floor: what any sync must do for these jobs (one fetch, the same POSTs)."""
    client.fetch_job_requests()
    client.post_jobs(wire)


def measure(name: str, tmp: Path, server: FakeJobServer, history: bool) -> None:
    workdir = tmp / name
    config: Config = load_config(
        environ={
            "WORKDIR": str(workdir),
            "JOB_SERVER_ENDPOINT": server.url,
            "JOB_SERVER_TOKEN": server.token,
        },
        env_file=tmp / "none",
    )
    conn = db.connect(config.db_path)
    server.requests.clear()
    server.jobs.clear()
    fill_active(conn, server)
    if history:
        fill_history(conn)
    with JobServerClient(server.url, server.token, config.backend) as client:
        sync_pass(
            config, conn, client, deadline=time.monotonic() + 60
        )  # first pass: all new to the site
        passes = timed(lambda: sync_pass(config, conn, client, deadline=time.monotonic() + 60), 5)
        wire = [
            job_to_wire({k: getattr(j, k) for k in WIRE_KEYS}) for j in db_queries.active_jobs(conn)
        ]
        floor = timed(lambda: bare_client_pass(client, wire), 5)
    report(name, passes, floor=floor)
    if not history:
        env = {
            **tool_env(workdir),
            "JOB_SERVER_ENDPOINT": server.url,
            "JOB_SERVER_TOKEN": server.token,
        }
        start = timed(lambda: run_cmd([sys.executable, "-c", "pass"]), 5)
        tool = timed(lambda: run_cmd([sys.executable, str(ROOT / "bin" / "jr-sync")], env=env), 5)
        report("jr-sync_1000_active_jobs", tool, floor=start)
    conn.close()


def main() -> None:
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"  # loopback must never go through a proxy
    with tempfile.TemporaryDirectory() as tmp, FakeJobServer() as server:
        measure("sync_pass_1000_active_jobs", Path(tmp), server, history=False)
        measure("sync_pass_1000_active_100k_history", Path(tmp), server, history=True)


if __name__ == "__main__":
    main()
