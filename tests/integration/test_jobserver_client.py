"""JobServerClient against the fake jobs website over real loopback HTTP."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from jobrunner_lib.website.client import (
    JobServerAuthError,
    JobServerBadResponse,
    JobServerClient,
    JobServerError,
    JobServerRejected,
    JobServerUnavailable,
)
from tests.support.fake_jobserver import FakeJobServer

TOKEN = "secret-token"
WRONG_TOKEN = "wrong-token-4f0c2d"
TOTAL_LIMIT = 2.0


@pytest.fixture(autouse=True)
def no_token_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture everything (urllib3 included) at DEBUG and check no token reached a log line."""
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert TOKEN not in text and WRONG_TOKEN not in text, record
    assert TOKEN not in caplog.text and WRONG_TOKEN not in caplog.text


def make_client(server: FakeJobServer, token: str = TOKEN, **options: Any) -> JobServerClient:
    """A client with test-sized timeouts and backoff."""
    settings = {
        "connect_timeout": 1.0,
        "read_timeout": 2.0,
        "total_limit": TOTAL_LIMIT,
        "retries": 3,
        "backoff_factor": 0.01,
        **options,
    }
    return JobServerClient(server.url, token, server.backend, **settings)


@pytest.fixture
def client(fake_jobserver: FakeJobServer) -> Iterator[JobServerClient]:
    with make_client(fake_jobserver) as jobserver_client:
        yield jobserver_client


def assert_no_token(exc: BaseException) -> None:
    """Neither the message, the repr, the error list nor a logged traceback shows a token."""
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    texts.append(repr(getattr(exc, "errors", "")))
    for text in texts:
        assert TOKEN not in text and WRONG_TOKEN not in text


def wire_job(request_id: str, n: int, **overrides: object) -> dict:
    job = {
        "identifier": f"{request_id[:8]}job{n:05d}",
        "job_request_id": request_id,
        "action": f"action_{n}",
        "run_command": "python:latest analysis/model.py",
        "status": "pending",
        "status_code": "",
        "status_message": "Waiting on dependencies",
        "created_at": "2021-11-03T09:12:51Z",
        "updated_at": "2021-11-03T09:12:51Z",
        "started_at": None,
        "completed_at": None,
    }
    job.update(overrides)
    return job


# ---------------------------------------------------------------- fetching


def test_fetch_follows_next_links_to_get_250_requests_over_three_pages(fake_jobserver, client):
    added = {fake_jobserver.add_request()["identifier"] for _ in range(250)}

    found, problems = client.fetch_job_requests()

    assert problems == []
    assert [r["id"] for r in found] == sorted(
        added, key=lambda i: fake_jobserver.requests[i]["created_at"], reverse=True
    )
    calls = fake_jobserver.calls
    assert [c["path"] for c in calls] == [
        "/api/v2/job-requests/?backend=expectations",
        "/api/v2/job-requests/?backend=expectations&limit=100&offset=100",
        "/api/v2/job-requests/?backend=expectations&limit=100&offset=200",
    ]
    assert {c["authorization"] for c in calls} == {TOKEN}


def test_fetch_returns_parsed_requests_with_the_original_object(fake_jobserver, client):
    request = fake_jobserver.add_request(shape="today", requested_actions=["extract"])

    (parsed,), _ = client.fetch_job_requests()

    assert parsed["id"] == request["identifier"]
    assert parsed["requested_actions"] == ["extract"]
    assert parsed["database_name"] == "full"
    assert parsed["original"] == request


def test_fetch_skips_requests_whose_jobs_have_all_completed(fake_jobserver, client):
    done = fake_jobserver.add_request()
    active = fake_jobserver.add_request()
    client.post_jobs([wire_job(done["identifier"], 1, completed_at="2021-11-03T10:00:00Z")])

    found, _ = client.fetch_job_requests()

    assert [r["id"] for r in found] == [active["identifier"]]


def test_fetch_returns_a_malformed_request_with_its_problem_for_an_answer(fake_jobserver, client):
    good = [fake_jobserver.add_request()["identifier"] for _ in range(3)]
    no_sha = fake_jobserver.add_request()
    del no_sha["sha"]
    no_workspace_name = fake_jobserver.add_request()
    del no_workspace_name["workspace"]["name"]

    found, problems = client.fetch_job_requests()

    assert sorted(r["id"] for r in found if not r.get("problem")) == sorted(good)
    assert {r["id"]: r["problem"] for r in found if r.get("problem")} == {
        no_workspace_name["identifier"]: "missing 'workspace.name'",
        no_sha["identifier"]: "missing 'sha'",
    }
    assert problems == []


def test_fetch_names_a_request_without_identifier_by_its_position(fake_jobserver, client):
    fake_jobserver.add_request()
    del fake_jobserver.add_request()["identifier"]

    found, problems = client.fetch_job_requests()

    assert len(found) == 1
    assert problems == ["request #0: missing 'identifier'"]


def test_fetch_with_a_wrong_token_raises_auth_error(fake_jobserver):
    with make_client(fake_jobserver, token=WRONG_TOKEN) as bad_client:
        with pytest.raises(JobServerAuthError, match="Invalid token.*JOB_SERVER_TOKEN") as excinfo:
            bad_client.fetch_job_requests()
    assert excinfo.value.exit_code == 78
    assert_no_token(excinfo.value)


def test_post_with_a_wrong_token_raises_auth_error(fake_jobserver):
    request = fake_jobserver.add_request()
    with make_client(fake_jobserver, token=WRONG_TOKEN) as bad_client:
        with pytest.raises(JobServerAuthError) as excinfo:
            bad_client.post_jobs([wire_job(request["identifier"], 1)])
    assert_no_token(excinfo.value)
    assert fake_jobserver.jobs == {}


def test_fetch_retries_500s_and_then_succeeds(fake_jobserver, client):
    fake_jobserver.add_request()
    fake_jobserver.set_fault("500", count=2)

    found, _ = client.fetch_job_requests()

    assert len(found) == 1
    assert [c["fault"] for c in fake_jobserver.calls] == ["500", "500", None]


def test_post_retries_a_reset_connection_and_then_succeeds(fake_jobserver, client):
    request = fake_jobserver.add_request()
    fake_jobserver.set_fault("reset", count=1)

    client.post_jobs([wire_job(request["identifier"], 1)])

    assert len(fake_jobserver.jobs) == 1
    assert [c["fault"] for c in fake_jobserver.calls] == ["reset", None]


@pytest.mark.parametrize("fault", ["500", "reset", "slow"])
@pytest.mark.parametrize("call", ["fetch", "post"])
def test_a_persistent_fault_raises_unavailable_within_the_time_limit(fake_jobserver, fault, call):
    request = fake_jobserver.add_request()
    fake_jobserver.slow_seconds = 10
    fake_jobserver.set_fault(fault)
    started = time.monotonic()
    # A long read timeout, so only the overall limit can cut the slow reply short.
    with make_client(fake_jobserver, read_timeout=30.0, total_limit=1.0) as slow_client:
        with pytest.raises(JobServerUnavailable) as excinfo:
            if call == "fetch":
                slow_client.fetch_job_requests()
            else:
                slow_client.post_jobs([wire_job(request["identifier"], 1)])
    # Far below the 10 s reply it cut short; the slack is for a loaded machine.
    assert time.monotonic() - started < 1.0 + 3.0
    assert excinfo.value.exit_code == 75
    assert_no_token(excinfo.value)


def test_slow_pages_stop_at_the_overall_limit_between_pages(fake_jobserver):
    for _ in range(250):
        fake_jobserver.add_request()
    fake_jobserver.slow_seconds = 0.4
    fake_jobserver.set_fault("slow")
    started = time.monotonic()
    with make_client(fake_jobserver, total_limit=1.0) as slow_client:
        with pytest.raises(JobServerUnavailable):
            slow_client.fetch_job_requests()
    assert time.monotonic() - started < 1.0 + 3.0  # slack for a loaded machine
    assert len(fake_jobserver.calls) <= 3  # the limit, not the last page, ended it


def test_an_unreachable_server_raises_unavailable(fake_jobserver):
    unreachable = make_client(fake_jobserver)
    fake_jobserver.stop()
    with unreachable, pytest.raises(JobServerUnavailable, match="Connection refused") as excinfo:
        unreachable.fetch_job_requests()
    assert_no_token(excinfo.value)


@pytest.mark.parametrize(
    "body",
    [b"<html><body>Bad Gateway</body></html>", b'{"results": 5}', b"[]", b""],
    ids=["html", "results-not-a-list", "list", "empty"],
)
def test_a_garbage_page_raises_bad_response(fake_jobserver, client, body):
    fake_jobserver.garbage_body = body
    fake_jobserver.set_fault("garbage")
    with pytest.raises(JobServerBadResponse) as excinfo:
        client.fetch_job_requests()
    assert_no_token(excinfo.value)


def test_a_garbage_reply_to_a_post_raises_bad_response(fake_jobserver, client):
    request = fake_jobserver.add_request()
    fake_jobserver.set_fault("garbage")
    with pytest.raises(JobServerBadResponse):
        client.post_jobs([wire_job(request["identifier"], 1)])


# ---------------------------------------------------------------- posting


def test_post_450_jobs_across_requests_keeps_every_job(fake_jobserver, client):
    request_ids = [fake_jobserver.add_request()["identifier"] for _ in range(30)]
    # Interleaved on purpose: sent as-is, rule 3 would delete most of them.
    jobs = [wire_job(rid, n) for n in range(15) for rid in request_ids]

    client.post_jobs(jobs, batch_size=200)

    assert len(fake_jobserver.jobs) == 450
    assert fake_jobserver.deleted == []
    assert [len(body) for body in fake_jobserver.posts] == [195, 195, 60]


def test_the_fake_server_loses_jobs_of_a_non_contiguous_payload(fake_jobserver):
    first, second = (fake_jobserver.add_request()["identifier"] for _ in range(2))
    payload = [wire_job(first, 1), wire_job(second, 1), wire_job(first, 2)]

    reply = requests.post(
        fake_jobserver.url + "jobs/", json=payload, headers={"Authorization": TOKEN}
    )

    assert reply.status_code == 200
    assert sorted(fake_jobserver.jobs) == sorted(
        [payload[1]["identifier"], payload[2]["identifier"]]
    )
    assert fake_jobserver.deleted == [payload[0]["identifier"]]


def test_posting_again_updates_jobs_and_records_their_history(fake_jobserver, client):
    request_id = fake_jobserver.add_request()["identifier"]
    client.post_jobs([wire_job(request_id, 1)])
    client.post_jobs([wire_job(request_id, 1, status="running", status_message="Running")])

    (job,) = fake_jobserver.jobs.values()
    assert job["status"] == "running"
    assert [entry["status"] for _, entry in fake_jobserver.history[job["identifier"]]] == [
        "pending",
        "running",
    ]


def test_post_of_a_job_without_run_command_raises_rejected_with_per_item_errors(
    fake_jobserver, client
):
    request_id = fake_jobserver.add_request()["identifier"]
    broken = wire_job(request_id, 2)
    del broken["run_command"]

    with pytest.raises(JobServerRejected, match="run_command: This field is required") as excinfo:
        client.post_jobs([wire_job(request_id, 1), broken])

    assert excinfo.value.errors == [{}, {"run_command": ["This field is required."]}]
    assert fake_jobserver.jobs == {}
    assert_no_token(excinfo.value)


def test_post_for_an_unknown_request_is_ignored_like_todays_server(fake_jobserver, client):
    client.post_jobs([wire_job("unknownrequest01", 1)])
    assert fake_jobserver.jobs == {}


def test_post_for_an_unknown_request_is_rejected_by_a_strict_server(fake_jobserver, client):
    fake_jobserver.strict_unknown_requests = True
    with pytest.raises(JobServerRejected) as excinfo:
        client.post_jobs([wire_job("unknownrequest01", 1)])
    assert excinfo.value.errors == ["Unknown JobRequest IDs: unknownrequest01"]


def test_posting_no_jobs_sends_nothing(fake_jobserver, client):
    client.post_jobs([])
    assert fake_jobserver.calls == []


def test_endpoint_without_trailing_slash_still_reaches_the_api(fake_jobserver):
    with JobServerClient(fake_jobserver.url.rstrip("/"), TOKEN, "test") as plain:
        assert plain.fetch_job_requests() == ([], [])


def test_a_wrong_endpoint_raises_job_server_error_naming_the_status(fake_jobserver):
    wrong = fake_jobserver.url.replace("/api/v2/", "/api/v1/")
    with JobServerClient(wrong, TOKEN, "test") as lost, pytest.raises(JobServerError, match="404"):
        lost.fetch_job_requests()


# ---------------------------------------------------------------- the fake itself


def _call(server: FakeJobServer, method: str, path: str, **kwargs: object) -> requests.Response:
    return requests.request(method, server.url + path, allow_redirects=False, timeout=5, **kwargs)


@pytest.mark.parametrize(
    "headers, detail",
    [
        ({}, "Authorization header is missing"),
        ({"Authorization": ""}, "Authorization header is empty"),
        ({"Authorization": "Bearer " + TOKEN}, "Invalid token"),
    ],
)
def test_fake_post_jobs_answers_403_as_the_website_does(fake_jobserver, headers, detail):
    reply = _call(fake_jobserver, "POST", "jobs/", json=[], headers=headers)
    assert (reply.status_code, reply.json()) == (403, {"detail": detail})


def test_fake_redirects_paths_without_trailing_slash_and_refuses_other_methods(fake_jobserver):
    assert _call(fake_jobserver, "GET", "job-requests?backend=expectations").headers[
        "Location"
    ] == ("/api/v2/job-requests/?backend=expectations")
    assert _call(fake_jobserver, "POST", "jobs", json=[]).status_code == 301
    assert _call(fake_jobserver, "PUT", "jobs/", json=[]).status_code == 405
    assert _call(fake_jobserver, "POST", "job-requests/", json=[]).status_code == 405


def test_fake_lists_every_backends_requests_without_a_token(fake_jobserver):
    ours = fake_jobserver.add_request()
    theirs = fake_jobserver.add_request(backend="other")

    anonymous = _call(fake_jobserver, "GET", "job-requests/").json()
    authenticated = _call(
        fake_jobserver, "GET", "job-requests/", headers={"Authorization": TOKEN}
    ).json()

    assert {r["identifier"] for r in anonymous["results"]} == {
        ours["identifier"],
        theirs["identifier"],
    }
    assert [r["identifier"] for r in authenticated["results"]] == [ours["identifier"]]


def test_fake_cancel_adds_actions_to_cancelled_actions(fake_jobserver):
    request = fake_jobserver.add_request(requested_actions=["a", "b"])
    fake_jobserver.cancel(request["identifier"], ["a"])
    fake_jobserver.cancel(request["identifier"])
    assert request["cancelled_actions"] == ["a", "b"]


# ---------------------------------------------------------------- the Flags header


def test_every_call_carries_the_flags_as_they_are_then(fake_jobserver):
    from jobrunner_lib.core.flags import Flag

    stored = [Flag("mode", "db-maintenance", 1731081649.5)]
    request = fake_jobserver.add_request()
    with make_client(fake_jobserver, flags=lambda: list(stored)) as client:
        client.fetch_job_requests()
        stored.append(Flag("paused", None, 1731081600))
        client.post_jobs([wire_job(request["identifier"], 1)])
    assert [(c["method"], c["flags"]) for c in fake_jobserver.calls] == [
        ("GET", '{"mode":{"v":"db-maintenance","ts":"2024-11-08T16:00:49.500000Z"}}'),
        (
            "POST",
            '{"mode":{"v":"db-maintenance","ts":"2024-11-08T16:00:49.500000Z"},'
            '"paused":{"v":null,"ts":"2024-11-08T16:00:00Z"}}',
        ),
    ]
    assert fake_jobserver.jobrunner_state == {
        "mode": {"v": "db-maintenance", "ts": "2024-11-08T16:00:49.500000Z"},
        "paused": {"v": None, "ts": "2024-11-08T16:00:00Z"},
    }


def test_a_client_given_no_flags_sends_no_header(fake_jobserver, client):
    client.fetch_job_requests()
    assert [c["flags"] for c in fake_jobserver.calls] == [None]
    assert fake_jobserver.jobrunner_state is None
