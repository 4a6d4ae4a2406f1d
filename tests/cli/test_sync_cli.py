"""bin/jr-sync as an operator (and the service loop) runs it, against the fake jobs website."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from filelock import FileLock

from jobrunner_lib.cli.formats import read_tsv
from tests.support.cli import run
from tests.support.fake_jobserver import FakeJobServer
from tests.support.studies import make_study

NO_WEBSITE = "No jobs website configured (JOB_SERVER_ENDPOINT is unset): nothing to sync"
BAD_REPO = "https://example.com/not/github"


def sync(workdir: Path, server: FakeJobServer | None = None, *args: str, **env: str):
    """Run jr-sync against the server (its endpoint and token unless overridden)."""
    if server is not None:
        env = {"JOB_SERVER_ENDPOINT": server.url, "JOB_SERVER_TOKEN": server.token, **env}
    return run("jr-sync", *args, workdir=workdir, **env)


def one_line(stderr: str) -> str:
    """The only stderr line, which must not be a traceback."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_without_a_website_it_says_so_once_and_changes_nothing(workdir):
    result = sync(workdir)
    assert (result.returncode, result.stdout) == (0, "")
    assert one_line(result.stderr).endswith(f" sync {NO_WEBSITE}")


def test_new_jobs_are_printed_once_and_an_idle_pass_prints_nothing(
    workdir, fake_jobserver, tmp_path
):
    repo, sha = make_study(tmp_path / "study")
    workspace = {"repo": str(repo), "name": "ws"}
    study = fake_jobserver.add_request(sha=sha, workspace=workspace)["identifier"]
    broken = fake_jobserver.add_request(workspace={"repo": BAD_REPO})["identifier"]
    first = sync(workdir, fake_jobserver)
    assert first.returncode == 0, first.stderr
    rows = read_tsv(first.stdout)
    assert list(rows[0]) == ["id", "request", "action", "state", "status_code"]
    assert sorted((r["request"], r["action"], r["state"]) for r in rows) == sorted(
        [
            (study, "extract", "pending"),
            (study, "model", "pending"),
            (study, "report", "pending"),
            (broken, "__error__", "failed"),
        ]
    )
    assert {r["id"] for r in rows} == set(fake_jobserver.jobs)
    assert "Handling new JobRequest:" in first.stderr
    assert f"Created 3 new jobs req={study}" in first.stderr
    assert "Traceback" not in first.stderr
    second = sync(workdir, fake_jobserver, "-o", "ids")
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    verbose = sync(workdir, fake_jobserver, "-v")  # every HTTP call logged, never the token
    assert (verbose.returncode, verbose.stdout) == (0, "")
    assert "Syncing 3 jobs back to job-server" in verbose.stderr
    assert fake_jobserver.token not in first.stderr + verbose.stderr


def test_a_refused_token_exits_78_naming_the_setting(workdir, fake_jobserver):
    wrong = "wrong-token-0123456789"
    result = sync(workdir, fake_jobserver, JOB_SERVER_TOKEN=wrong)
    assert (result.returncode, result.stdout) == (78, "")
    line = one_line(result.stderr)
    assert line.startswith("jr-sync: ") and "JOB_SERVER_TOKEN" in line
    assert wrong not in result.stderr and fake_jobserver.token not in result.stderr


def test_an_unreachable_website_exits_75_with_one_line(workdir):
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = sync(
        workdir,
        JOB_SERVER_ENDPOINT=f"http://127.0.0.1:{port}/api/v2/",
        JOB_SERVER_TOKEN="secret-token-for-nobody",
        NO_PROXY="127.0.0.1",
    )
    assert (result.returncode, result.stdout) == (75, "")
    line = one_line(result.stderr)
    assert line.startswith("jr-sync: the jobs website is unreachable (GET http://127.0.0.1:")
    assert line.endswith("); will retry") and "secret-token-for-nobody" not in line


def test_server_errors_exit_75_and_leave_the_jobs_for_the_next_pass(workdir, fake_jobserver):
    fake_jobserver.set_fault("500")
    result = sync(workdir, fake_jobserver)
    assert (result.returncode, result.stdout) == (75, "")
    assert "answered 500" in one_line(result.stderr)


@pytest.mark.parametrize("body", [b"<html>Service temporarily rerouted</html>", b'{"count": 1}'])
def test_a_reply_that_is_not_the_api_exits_1_with_one_clear_line(workdir, fake_jobserver, body):
    fake_jobserver.garbage_body = body
    fake_jobserver.set_fault("garbage")
    result = sync(workdir, fake_jobserver)
    assert (result.returncode, result.stdout) == (1, "")
    line = one_line(result.stderr)
    assert line.startswith("jr-sync: the jobs website sent a reply jr cannot use (GET ")
    assert line.endswith("check JOB_SERVER_ENDPOINT")


def test_a_second_jr_sync_at_the_same_time_exits_75(workdir, fake_jobserver):
    workdir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(workdir / "jr-sync.lock")):
        result = sync(workdir, fake_jobserver)
    assert (result.returncode, result.stdout) == (75, "")
    assert "another jr-sync is running" in one_line(result.stderr)
