"""End to end with real Docker: a request on the (test) jobs website runs, and the website sees it."""

from __future__ import annotations

import calendar
import subprocess
import time

import pytest

from tests.support.cli import ROOT, tool_env
from tests.support.studies import make_study

PROJECT = """\
version: "5"
actions:
  slow:
    run: python:v1 analysis/slow.sh
    outputs:
      moderately_sensitive:
        out: output/slow.txt
  quick:
    run: python:v1 analysis/quick.sh
    needs: [slow]
    outputs:
      highly_sensitive:
        out: output/quick.csv
  big:
    run: python:v1 analysis/big.sh
    outputs:
      highly_sensitive:
        out: output/big.bin
  reader:
    run: python:v1 analysis/reader.sh
    needs: [big]
    outputs:
      moderately_sensitive:
        out: output/size.txt
  broken:
    run: python:v1 analysis/broken.sh
    outputs:
      moderately_sensitive:
        out: output/never.txt
"""
FILES = {
    "analysis/slow.sh": "mkdir -p output\nsleep 9\necho done > output/slow.txt\n",
    # A large file copied out of one job and into the next while `slow` runs beside them.
    "analysis/big.sh": "mkdir -p output\ndd if=/dev/zero of=output/big.bin bs=1M count=400 2>/dev/null\n",
    "analysis/reader.sh": "wc -c < output/big.bin > output/size.txt\n",
    "analysis/quick.sh": "mkdir -p output\necho a,b > output/quick.csv\n",
    "analysis/broken.sh": "echo failing >&2\nexit 2\n",
}


def _ts(text: str | None) -> int | None:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")) if text else None


@pytest.mark.docker
def test_website_request_runs_and_the_website_ends_with_every_final_state(
    tmp_path, fake_jobserver, docker_label
):
    repo, sha = make_study(tmp_path / "study", PROJECT, FILES)
    request = fake_jobserver.add_request(
        sha=sha,
        requested_actions=["run_all"],
        workspace={"name": "e2e", "repo": str(repo), "branch": "main"},
    )
    env = tool_env(
        tmp_path / "workdir",
        JOB_SERVER_ENDPOINT=fake_jobserver.url,
        JOB_SERVER_TOKEN=fake_jobserver.token,
        POLL_INTERVAL="1",
        STATUS_REFRESH_INTERVAL="2",
        MAX_WORKERS="3",
        JR_EXTRA_LABELS=docker_label,
    )
    started = time.monotonic()
    result = subprocess.run(
        [str(ROOT / "service" / "jr-service"), "--until-idle"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    print(f"service ran the request in {time.monotonic() - started:.1f}s")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {
        j["action"]: j
        for j in fake_jobserver.jobs.values()
        if j["job_request_id"] == request["identifier"]
    }
    assert {a: (j["status"], j["status_code"]) for a, j in jobs.items()} == {
        "slow": ("succeeded", "succeeded"),
        "quick": ("succeeded", "succeeded"),
        "big": ("succeeded", "succeeded"),
        "reader": ("succeeded", "succeeded"),
        "broken": ("failed", "nonzero_exit"),
    }
    medium = tmp_path / "workdir" / "medium_privacy" / "workspaces" / "e2e"
    assert (medium / "output" / "size.txt").read_text().strip() == str(400 * 2**20)
    assert jobs["broken"]["status_message"] == "Job exited with error code 2"
    assert all(j["completed_at"] and j["run_command"] for j in jobs.values())
    assert not fake_jobserver.is_active(request["identifier"])
    # "Last updated by runner": while `slow` ran, each post carried a fresh updated_at, never
    # more than the refresh interval plus a poll or two behind.
    history = [
        job
        for _at, job in fake_jobserver.history[jobs["slow"]["identifier"]]
        if job["status"] == "running"
    ]
    stamps = sorted({_ts(job["updated_at"]) for job in history})
    assert len(stamps) >= 3, stamps
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    # With a 2 s refresh the gaps stay far below the minute jr allows (docs/reference.md#last-updated);
    # the bound leaves room for a loaded machine.
    assert max(gaps) <= 15, gaps
    assert fake_jobserver.token not in result.stderr


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_local_jobs_start_and_finish_while_the_website_stalls_sync(tmp_path, docker_label):
    # A website that drip-feeds its answer holds jr-sync for its whole SYNC_TIME_LIMIT (here
    # 120 s); the service's run passes must not wait for it: a job added meanwhile runs to the end.
    import os
    import signal

    from tests.integration.test_website_as_deployed import DripServer
    from tests.support.cli import run
    from tests.support.waiting import wait_for

    drip = DripServer("headers", interval=1.0, lifetime=150)
    drip.thread.start()
    repo, _ = make_study(tmp_path / "study")
    workdir = tmp_path / "workdir"
    settings = dict(
        JOB_SERVER_ENDPOINT=f"http://127.0.0.1:{drip.port}/api/v2/",
        JOB_SERVER_TOKEN="a-real-looking-token",
        SYNC_TIME_LIMIT="120",
        POLL_INTERVAL="1",
        JR_EXTRA_LABELS=docker_label,
    )
    service = subprocess.Popen(
        [str(ROOT / "service" / "jr-service")],
        env=tool_env(workdir, **settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "service.err.log", "w"),
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: (
                "running jr-sync" in (tmp_path / "service.err.log").read_text()
                or (workdir / "service.pid").exists()
            ),
            30,
            "the service to start",
        )
        added = run("jr-add-job", str(repo), "extract", "-o", "ids", workdir=workdir, **settings)
        assert added.returncode == 0, added.stderr
        (job_id,) = added.stdout.split()

        def state() -> str:
            shown = run("jr-ls", job_id, "-o", "tsv", workdir=workdir, **settings)
            return shown.stdout.splitlines()[1].split("\t")[4] if shown.returncode == 0 else ""

        wait_for(lambda: state() == "succeeded", 90, "the job to finish while sync is stuck")
        log = (tmp_path / "service.err.log").read_text()
        assert "jr-sync failed" not in log  # the one jr-sync was still stuck on the website
    finally:
        os.killpg(service.pid, signal.SIGKILL)
        service.wait()
        drip.stop.set()
        drip.sock.close()
