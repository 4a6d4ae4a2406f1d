"""sync_pass against the fake jobs website over real loopback HTTP, with real git study repos."""

from __future__ import annotations

import logging
import sqlite3
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobrunner_lib.core.config import Config, load_config
from jobrunner_lib.core.models import ERROR_ACTION, Msg, State, StatusCode, transition
from jobrunner_lib.jobs import sync as sync_module
from jobrunner_lib.jobs.create import RetryLater
from jobrunner_lib.jobs.sync import WIRE_KEYS, SyncResult, sync_pass
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries
from jobrunner_lib.website.client import JobServerClient, JobServerUnavailable
from jobrunner_lib.website.wire import job_to_wire
from tests.support.factories import make_job, make_request
from tests.support.fake_jobserver import FakeJobServer
from tests.support.studies import SIMPLE_PROJECT, commit_files, make_study

TOKEN = "secret-token"  # the fake website's token
BAD_REPO = "https://example.com/not/github"  # becomes an __error__ job without any network


@pytest.fixture(autouse=True)
def no_token_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test logs at DEBUG (urllib3 included); no line may carry the token."""
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        assert TOKEN not in record.getMessage() + (record.exc_text or ""), record
    assert TOKEN not in caplog.text


@dataclass
class Backend:
    """The state store, the website and the client one sync pass needs."""

    server: FakeJobServer
    config: Config
    conn: sqlite3.Connection
    client: JobServerClient

    def sync(self, time_left: float = 30.0) -> SyncResult:
        return sync_pass(self.config, self.conn, self.client, deadline=time.monotonic() + time_left)

    def request(self, repo: Path | str, sha: str, actions: list[str] | None = None, **kw) -> str:
        """Add a request for a study repo on the website; return its id."""
        request = self.server.add_request(
            sha=sha,
            requested_actions=actions or ["run_all"],
            workspace={"repo": str(repo), "name": kw.pop("name", "ws")},
            **kw,
        )
        return request["identifier"]

    def bad_request(self) -> str:
        """A request that cheaply becomes an `__error__` job (its repo is not on GitHub)."""
        return self.request(BAD_REPO, "a" * 40)

    def local(self, request_id: str) -> dict[str, dict]:
        """The request's local jobs as the website should have them."""
        return {
            j.id: job_to_wire({k: getattr(j, k) for k in WIRE_KEYS})
            for j in db_queries.jobs_for_request(self.conn, request_id)
        }

    def move(self, job_id: str, *steps: tuple[State, StatusCode | None, str], at: int) -> None:
        """Change a job as the run side would, one second per step from `at`."""
        job = db_queries.get_job(self.conn, job_id)
        for offset, (state, code, message) in enumerate(steps):
            job = transition(job, state, code, message, at=at + offset)
        db_queries.save_job(self.conn, job)

    def posted_record(self) -> list[tuple]:
        return [tuple(r) for r in self.conn.execute("SELECT * FROM job_post ORDER BY job_id")]


def make_backend(tmp_path: Path, server: FakeJobServer, **env: str) -> Backend:
    config = load_config(
        environ={
            "WORKDIR": str(tmp_path / "workdir"),
            "JOB_SERVER_ENDPOINT": server.url,
            "JOB_SERVER_TOKEN": server.token,
            **env,
        },
        env_file=tmp_path / "none",
    )
    conn = db.connect(config.db_path)
    client = JobServerClient(
        server.url,
        server.token,
        config.backend,
        connect_timeout=1.0,
        read_timeout=2.0,
        total_limit=5.0,
        retries=1,
        backoff_factor=0.01,
    )
    return Backend(server, config, conn, client)


@pytest.fixture
def backend(tmp_path: Path, fake_jobserver: FakeJobServer) -> Iterator[Backend]:
    b = make_backend(tmp_path, fake_jobserver)
    yield b
    b.client.close()
    b.conn.close()


@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, str]:
    """A real git repo with a three-action project.yaml (extract -> model -> report)."""
    return make_study(tmp_path / "study")


RUNNING = (State.RUNNING, StatusCode.EXECUTING, Msg.RUNNING)
SUCCEEDED = (State.SUCCEEDED, StatusCode.SUCCEEDED, Msg.SUCCEEDED)
NONZERO = (State.FAILED, StatusCode.NONZERO_EXIT, Msg.NONZERO_EXIT)


def test_a_new_request_becomes_jobs_and_the_website_receives_them(backend, study, caplog):
    rid = backend.request(*study)
    result = backend.sync()
    assert (result.requests_seen, result.requests_new, result.jobs_created) == (1, 1, 3)
    local = backend.local(rid)
    assert {j["action"] for j in local.values()} == {"extract", "model", "report"}
    assert backend.server.jobs_for(rid) == local
    assert set(result.changed) == set(local)
    assert "Handling new JobRequest:\nJobRequest(id=" in caplog.text
    created = [r for r in caplog.records if r.getMessage() == "Created 3 new jobs"]
    assert created and created[0].req == rid
    assert "Syncing 3 jobs back to job-server" in caplog.text


def test_a_second_pass_creates_nothing_and_reports_only_real_changes(backend, study):
    rid = backend.request(*study)
    backend.sync()
    again = backend.sync()
    assert (again.jobs_created, again.requests_new, again.changed) == (0, 0, {})
    assert (
        again.jobs_posted == 3
    )  # a listed request is always posted whole: that repairs the website
    assert len(db_queries.jobs_for_request(backend.conn, rid)) == 3
    extract = next(
        j for j in db_queries.jobs_for_request(backend.conn, rid) if j.action == "extract"
    )
    backend.move(extract.id, RUNNING, at=int(time.time()) + 5)
    third = backend.sync()
    assert list(third.changed) == [extract.id]
    assert backend.server.jobs[extract.id]["status"] == "running"


def test_a_request_the_website_stopped_listing_is_posted_only_when_it_changes(backend, study):
    rid = backend.request(*study)
    backend.sync()
    jobs = {j.action: j for j in db_queries.jobs_for_request(backend.conn, rid)}
    at = int(time.time()) + 10
    backend.move(jobs["extract"].id, RUNNING, SUCCEEDED, at=at)
    backend.move(jobs["model"].id, RUNNING, SUCCEEDED, at=at)
    backend.move(jobs["report"].id, RUNNING, NONZERO, at=at)
    backend.sync()  # still listed: the finals go out and the website now sees it as done
    assert not backend.server.is_active(rid)
    posts = len(backend.server.posts)
    quiet = backend.sync()
    assert (
        quiet.requests_seen == 0 and quiet.jobs_posted == 0 and len(backend.server.posts) == posts
    )

    # A retry that ran and failed again between two passes: final -> final, request not listed.
    retried = (State.FAILED, StatusCode.INTERNAL_ERROR, "Internal error when finalising job")
    backend.move(jobs["report"].id, (State.RUNNING, None, Msg.RETRYING), retried, at=at + 20)
    caught_up = backend.sync()
    assert caught_up.requests_seen == 0 and list(caught_up.changed) == [jobs["report"].id]
    assert [j["job_request_id"] for j in backend.server.posts[-1]] == [rid] * 3  # whole request
    assert backend.server.jobs_for(rid) == backend.local(rid)
    assert backend.server.deleted == []


def test_old_history_is_left_alone_but_an_old_job_posted_while_active_gets_its_end(backend):
    month_ago = int(time.time()) - 30 * 86400
    history, old_running = (make_request(), make_request())
    finished = make_job(history, "a", State.SUCCEEDED, code=StatusCode.SUCCEEDED, at=month_ago)
    running = make_job(old_running, "a", State.RUNNING, at=month_ago)
    # e.g. a state store from before jr
    db_queries.insert_request(backend.conn, history, [finished])
    db_queries.insert_request(backend.conn, old_running, [running])
    first = backend.sync()
    assert list(first.changed) == [running.id]  # still active, so posted although old
    backend.move(running.id, SUCCEEDED, at=int(time.time()))
    second = backend.sync()
    assert list(second.changed) == [running.id] and second.jobs_posted == 1
    assert backend.server.posts[-1][0]["status"] == "succeeded"
    assert finished.id not in {j["identifier"] for post in backend.server.posts for j in post}


def test_cancelled_actions_flag_only_jobs_that_have_not_finished(backend, study):
    rid = backend.request(*study)
    backend.sync()
    jobs = {j.action: j for j in db_queries.jobs_for_request(backend.conn, rid)}
    at = int(time.time()) + 10
    backend.move(jobs["extract"].id, RUNNING, SUCCEEDED, at=at)
    backend.move(jobs["model"].id, RUNNING, at=at)
    backend.server.cancel(rid, ["extract", "model", "report"])  # the website's "cancel request"
    result = backend.sync()
    assert result.jobs_cancelled == 2
    cancelled = {j.action: j.cancelled for j in db_queries.jobs_for_request(backend.conn, rid)}
    assert cancelled == {"extract": False, "model": True, "report": True}
    assert backend.sync().jobs_cancelled == 0


def test_every_page_of_active_requests_is_fetched(backend):
    ids = {backend.bad_request() for _ in range(250)}
    result = backend.sync(time_left=120)
    assert result.requests_seen == 250 and result.jobs_created == 250
    gets = [c for c in backend.server.calls if c["method"] == "GET"]
    assert len(gets) == 3
    for rid in ids:
        (job,) = backend.server.jobs_for(rid).values()
        assert job["action"] == ERROR_ACTION and job["status"] == "failed"
    assert backend.sync().requests_seen == 0  # every request now has a completed job


def test_an_invalid_project_yaml_reaches_the_website_as_a_failed_error_job(backend, study):
    repo, _ = study
    sha = commit_files(repo, 'version: "3.0"\nactions:\n  broken:\n    outputs: {}\n')
    rid = backend.request(repo, sha)
    result = backend.sync()
    assert result.jobs_created == 1
    (job,) = backend.server.jobs_for(rid).values()
    assert (job["action"], job["status"], job["status_code"]) == (ERROR_ACTION, "failed", "")
    assert job["status_message"].startswith(
        "ProjectValidationError: Invalid project: project.yaml\n"
    )
    assert "broken" in job["status_message"]
    assert job["completed_at"] is not None


def test_an_unsafe_action_name_reaches_the_website_as_an_error_job_saying_why(backend, study):
    repo, _ = study
    sha = commit_files(repo, SIMPLE_PROJECT.replace("  report:", '  "../report":'))
    rid = backend.request(repo, sha)
    assert backend.sync().jobs_created == 1
    (job,) = backend.server.jobs_for(rid).values()
    assert (job["action"], job["status"]) == (ERROR_ACTION, "failed")
    assert job["status_message"] == (
        "ProjectValidationError: Invalid project: project.yaml\n"
        "project.yaml: action '../report': Action names may not contain / or \\ (the name"
        " becomes a file name, metadata/<action>.log); rename the action (line 14)"
    )


def test_a_malformed_request_gets_an_error_job_saying_why_and_the_others_are_handled(
    backend, caplog
):
    first, second = backend.bad_request(), backend.bad_request()
    broken = backend.server.add_request(workspace={"repo": BAD_REPO})
    del broken["sha"]
    # As the deployed website sends a workspace whose repository was deleted: repo is null.
    no_repo = backend.server.add_request(workspace={"repo": None})
    # No usable identifier: nothing can answer it, so it is logged and skipped.
    nameless = backend.server.add_request(identifier="has spaces and\nlines")
    result = backend.sync()
    assert (result.requests_seen, result.problems, result.jobs_created) == (4, 1, 4)
    assert set(backend.server.jobs_for(first)) and set(backend.server.jobs_for(second))
    for request, problem in ((broken, "missing 'sha'"), (no_repo, "missing 'workspace.repo'")):
        (job,) = backend.server.jobs_for(request["identifier"]).values()
        assert (job["action"], job["status"]) == ("__error__", "failed")
        assert job["status_message"] == (
            f"JobRequestError: The jobs website sent a request jr cannot run: {problem}; check "
            "the workspace on the website (its repository, branch and database)"
        )
        assert not backend.server.is_active(request["identifier"])  # answered, so it ends
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("Skipping malformed JobRequest: request ") for w in warnings)
    assert backend.server.jobs_for(nameless["identifier"]) == {}
    again = backend.sync()
    assert again.jobs_created == 0  # each is answered once


def test_requests_of_another_backend_are_never_run_nor_answered(
    tmp_path, fake_jobserver, study, caplog
):
    # The website picks what it lists by the token: with another backend's token, jr sees that
    # backend's work. Its BACKEND says which requests are its own.
    other = make_backend(tmp_path, fake_jobserver, BACKEND="other", USING_DUMMY_DATA_BACKEND="1")
    try:
        rid = other.request(*study)
        result = other.sync()
        assert (result.requests_seen, result.jobs_created, result.jobs_posted) == (0, 0, 0)
        assert db_queries.jobs_for_request(other.conn, rid) == []
        assert fake_jobserver.jobs_for(rid) == {} and fake_jobserver.is_active(rid)
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert said == [
            "Ignoring JobRequest for backend 'expectations': this is backend 'other' (is "
            "JOB_SERVER_TOKEN this backend's token?)"
        ]
        caplog.clear()
        other.sync()  # said once per request, not every pass
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    finally:
        other.client.close()
        other.conn.close()


def test_a_rejected_post_is_logged_with_its_errors_and_the_pass_goes_on(
    backend, study, caplog, monkeypatch
):
    good, bad = backend.request(*study, name="other"), backend.request(*study)
    backend.sync()
    bad_job = next(j for j in db_queries.jobs_for_request(backend.conn, bad) if j.action == "model")

    def drop_run_command(job: dict) -> dict:
        wire = job_to_wire(job)
        if wire["identifier"] == bad_job.id:
            del wire["run_command"]
        return wire

    monkeypatch.setattr(sync_module, "job_to_wire", drop_run_command)
    newer = backend.bad_request()
    at = int(time.time()) + 10
    for job in db_queries.jobs_for_request(backend.conn, bad):
        backend.move(job.id, RUNNING, at=at)
    before = backend.posted_record()
    result = backend.sync()
    assert result.problems == 1 and result.jobs_created == 1  # the pass went on to create jobs
    assert result.jobs_posted == 3 + 1  # `good`, split from the rejected batch, and `newer`
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].req == bad
    assert (
        f"job {bad_job.id} ({bad}) run_command: This field is required." in errors[0].getMessage()
    )
    assert backend.server.jobs_for(newer)  # new jobs still posted
    assert backend.server.jobs_for(good) == backend.local(good)
    assert all(j["status"] == "pending" for j in backend.server.jobs_for(bad).values())
    bad_ids = set(backend.local(bad))
    assert [r for r in backend.posted_record() if r[0] in bad_ids] == [
        r for r in before if r[0] in bad_ids
    ]  # not recorded: the next pass tries again


def test_unknown_requests_rejected_by_an_old_server_do_not_hold_back_the_others(
    tmp_path, monkeypatch, caplog, study
):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with FakeJobServer(strict_unknown_requests=True) as server:
        backend = make_backend(tmp_path, server)
        active = backend.request(*study)
        forgotten = backend.bad_request()
        backend.sync()
        del server.requests[forgotten]  # the website lost it; its job changes locally (a retry)
        job = db_queries.jobs_for_request(backend.conn, forgotten)[0]
        backend.move(job.id, (State.RUNNING, None, Msg.RETRYING), at=int(time.time()) + 10)
        fresh = backend.bad_request()
        result = backend.sync()
    # One batch held both requests: the 400 made jr post them one by one, so `active` went through.
    assert result.problems == 1 and result.jobs_posted == 3 + 1
    requests_per_post = [{j["job_request_id"] for j in post} for post in server.posts[-4:]]
    assert requests_per_post == [{active, forgotten}, {active}, {forgotten}, {fresh}]
    assert server.jobs_for(active) == backend.local(active) and server.jobs_for(fresh)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"Unknown JobRequest IDs: {forgotten}" in errors[0]


@pytest.mark.parametrize("fault", ["500", "reset"])
def test_after_five_failed_passes_the_first_good_pass_catches_up_in_full(backend, study, fault):
    rid = backend.request(*study)
    backend.sync()
    jobs = {j.action: j for j in db_queries.jobs_for_request(backend.conn, rid)}
    record = backend.posted_record()
    backend.server.set_fault(fault)  # every call fails until cleared
    newer = backend.bad_request()
    at = int(time.time()) + 10
    steps = [
        ("extract", RUNNING),
        ("extract", SUCCEEDED),
        ("model", RUNNING),
        ("model", NONZERO),
        ("report", (State.FAILED, StatusCode.DEPENDENCY_FAILED, Msg.DEPENDENCY_FAILED)),
    ]
    for n, (action, step) in enumerate(steps):
        backend.move(jobs[action].id, step, at=at + n)
        with pytest.raises(JobServerUnavailable) as failure:
            backend.sync()
        assert TOKEN not in "".join(traceback.format_exception(failure.value))
        assert backend.posted_record() == record  # nothing recorded as posted
    backend.server.set_fault(None)
    result = backend.sync()
    assert set(result.changed) == {j.id for j in jobs.values()} | set(backend.local(newer))
    assert backend.server.jobs_for(rid) == backend.local(rid)
    assert backend.server.jobs_for(newer) == backend.local(newer)
    assert backend.server.deleted == []
    assert backend.sync().changed == {}


class FailingPosts(JobServerClient):
    """The real client, but while `failing` the website resets every POST (GETs still work)."""

    server: FakeJobServer
    failing = True

    def post_jobs(self, jobs: list[dict], *, batch_size: int = 200) -> None:
        self.server.set_fault("reset" if self.failing else None)
        try:
            super().post_jobs(jobs, batch_size=batch_size)
        finally:
            self.server.set_fault(None)


def test_jobs_created_while_posts_fail_reach_the_website_later(backend):
    client = FailingPosts(
        backend.server.url, TOKEN, backend.config.backend, total_limit=5.0, retries=0
    )
    client.server = backend.server
    backend.client = client
    rid = backend.bad_request()
    with pytest.raises(JobServerUnavailable) as failure:
        backend.sync()
    partial = failure.value.sync_result
    assert partial.jobs_created == 1 and set(partial.changed) == set(backend.local(rid))
    assert backend.posted_record() == [] and backend.server.jobs_for(rid) == {}
    client.failing = False
    result = backend.sync()
    assert result.jobs_created == 0 and set(result.changed) == set(backend.local(rid))
    assert backend.server.jobs_for(rid) == backend.local(rid)


def test_status_posts_go_out_before_any_job_is_created(backend, study, monkeypatch):
    known = backend.request(*study)
    backend.sync()
    posts_before = len(backend.server.posts)
    seen: list[int] = []
    real = sync_module.handle_request

    def spy(config, conn, request):
        seen.append(len(backend.server.posts))
        return real(config, conn, request)

    monkeypatch.setattr(sync_module, "handle_request", spy)
    backend.bad_request()
    backend.sync()
    assert seen == [posts_before + 1]
    assert known in {j["job_request_id"] for j in backend.server.posts[posts_before]}


def test_creation_stops_when_the_time_limit_is_near_but_posts_still_go_out(
    tmp_path, fake_jobserver, study
):
    backend = make_backend(tmp_path, fake_jobserver, SYNC_TIME_LIMIT="20")  # keeps 5s to post
    known = backend.request(*study)
    backend.sync()
    newer = backend.bad_request()
    posts = len(fake_jobserver.posts)
    result = backend.sync(time_left=3)
    assert result.requests_deferred == 1 and result.jobs_created == 0
    assert (
        len(fake_jobserver.posts) == posts + 1
        and fake_jobserver.posts[-1][0]["job_request_id"] == known
    )
    assert backend.sync().jobs_created == 1 and fake_jobserver.jobs_for(newer)


def test_a_request_that_cannot_be_fetched_or_crashes_is_skipped_and_retried(
    backend, caplog, monkeypatch
):
    offline, crashing, fine = backend.bad_request(), backend.bad_request(), backend.bad_request()
    real = sync_module.handle_request

    def flaky(config, conn, request):
        if request.id == offline:
            raise RetryLater("Network error fetching https://example.com/x")
        if request.id == crashing:
            raise sqlite3.OperationalError("database is locked")
        return real(config, conn, request)

    monkeypatch.setattr(sync_module, "handle_request", flaky)
    result = backend.sync()
    assert (result.jobs_created, result.requests_deferred, result.problems) == (1, 1, 1)
    assert backend.server.jobs_for(fine)
    by_req = {
        r.req: r for r in caplog.records if r.levelno >= logging.WARNING and hasattr(r, "req")
    }
    assert "Network error fetching" in by_req[offline].getMessage()
    assert "database is locked" in by_req[crashing].getMessage()
    monkeypatch.setattr(sync_module, "handle_request", real)
    assert backend.sync().jobs_created == 2
