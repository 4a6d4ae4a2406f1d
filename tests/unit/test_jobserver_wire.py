"""Pure protocol encoding for the jobs website: request parsing, job encoding, batching."""

from __future__ import annotations

import copy
import subprocess
import sys
from enum import Enum
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobrunner_lib.website.client import JobServerClient
from jobrunner_lib.website.wire import group_contiguously, job_to_wire, parse_job_request

WINDOW_REQUEST = {
    "identifier": "k3v7q2m4x6z8b2c4",
    "sha": "4f0c2d9e7a1b3c5d6e8f9a0b1c2d3e4f5a6b7c8d",
    "requested_actions": ["run_model"],
    "cancelled_actions": [],
    "force_run_dependencies": False,
    "backend": "tpp",
    "created_by": "alice",
    "created_at": "2021-11-03T09:12:40.512345Z",
    "workspace": {
        "name": "covid-vax-main",
        "repo": "https://github.com/opensafely/covid-vax",
        "branch": "main",
        "db": "full",
        "created_by": "alice",
        "created_at": "2021-06-01T12:00:00Z",
    },
}


def today_request() -> dict:
    """Today's shape: top-level database_name and later fields, no workspace.db."""
    request = copy.deepcopy(WINDOW_REQUEST)
    del request["workspace"]["db"]
    request.update(
        database_name="slice", project="covid-vax", orgs=["university-x"], codelists_ok=False
    )
    return request


def test_parse_window_shape_request_reads_database_from_workspace_db():
    parsed = parse_job_request(copy.deepcopy(WINDOW_REQUEST))
    assert parsed.pop("backend") == "tpp"
    assert parsed == {
        "id": "k3v7q2m4x6z8b2c4",
        "repo_url": "https://github.com/opensafely/covid-vax",
        "commit": "4f0c2d9e7a1b3c5d6e8f9a0b1c2d3e4f5a6b7c8d",
        "branch": "main",
        "requested_actions": ["run_model"],
        "cancelled_actions": [],
        "workspace": "covid-vax-main",
        "database_name": "full",
        "force_run_dependencies": False,
        "codelists_ok": True,
        "created_by": "alice",
        "original": WINDOW_REQUEST,
    }


def test_parse_todays_shape_request_reads_top_level_database_name_and_codelists_ok():
    request = today_request()
    parsed = parse_job_request(request)
    assert parsed["database_name"] == "slice"
    assert parsed["codelists_ok"] is False
    assert parsed["original"] is request


def test_parse_prefers_top_level_database_name_over_workspace_db():
    request = copy.deepcopy(WINDOW_REQUEST)
    request["database_name"] = "slice"
    assert parse_job_request(request)["database_name"] == "slice"


def test_parse_coerces_integer_identifier_to_str_and_defaults_optional_fields():
    request = copy.deepcopy(WINDOW_REQUEST)
    request["identifier"] = 1234
    for key in ("cancelled_actions", "force_run_dependencies", "created_by"):
        del request[key]
    del request["workspace"]["branch"]
    parsed = parse_job_request(request)
    assert parsed["id"] == "1234"
    assert parsed["cancelled_actions"] == []
    assert parsed["force_run_dependencies"] is False
    assert parsed["created_by"] is None
    assert parsed["branch"] == ""


def test_parsed_request_builds_the_models_job_request():
    from jobrunner_lib.core.models import JobRequest

    job_request = JobRequest(**parse_job_request(today_request()))
    assert job_request.workspace == "covid-vax-main"


def _without(path: str) -> dict:
    request = copy.deepcopy(WINDOW_REQUEST)
    *parents, leaf = path.split(".")
    target = request
    for parent in parents:
        target = target[parent]
    del target[leaf]
    return request


def _with(key: str, value: object) -> dict:
    request = copy.deepcopy(WINDOW_REQUEST)
    request[key] = value
    return request


@pytest.mark.parametrize(
    "request_obj, reason",
    [
        ("not a request", "not an object but str"),
        ([WINDOW_REQUEST], "not an object but list"),
        (_without("identifier"), "missing 'identifier'"),
        (_with("identifier", ""), "'identifier' is empty"),
        (_with("identifier", True), "'identifier' must be str or int, got bool"),
        (_without("sha"), "missing 'sha'"),
        (_with("sha", None), "missing 'sha'"),
        (_without("workspace"), "missing 'workspace'"),
        (_with("workspace", "covid"), "'workspace' must be dict, got str"),
        (_without("workspace.name"), "missing 'workspace.name'"),
        (_without("workspace.repo"), "missing 'workspace.repo'"),
        (_without("requested_actions"), "missing 'requested_actions'"),
        (_with("requested_actions", "run_all"), "'requested_actions' must be list"),
        (_with("requested_actions", ["a", 3]), "list of strings, found int"),
        (_with("cancelled_actions", "a"), "'cancelled_actions' must be list"),
        (_with("force_run_dependencies", "yes"), "'force_run_dependencies' must be bool"),
        (_with("codelists_ok", "true"), "'codelists_ok' must be bool"),
    ],
)
def test_parse_malformed_request_raises_value_error_naming_the_problem(request_obj, reason):
    with pytest.raises(ValueError) as excinfo:
        parse_job_request(request_obj)
    assert reason in str(excinfo.value)


class FakeState(Enum):
    RUNNING = "running"


def _job(**overrides: object) -> dict:
    job = {
        "id": "p5r7t2w4y6a3c5e7",
        "job_request_id": "k3v7q2m4x6z8b2c4",
        "action": "generate_cohort",
        "state": "running",
        "status_code": "executing",
        "status_message": "Running",
        "run_command": "cohortextractor:latest generate_cohort --output-dir=output",
        "created_at": 1635930771,
        "updated_at": 1635930842,
        "started_at": 1635930773,
        "completed_at": None,
    }
    job.update(overrides)
    return job


def test_job_to_wire_matches_the_spec_example():
    assert job_to_wire(_job()) == {
        "identifier": "p5r7t2w4y6a3c5e7",
        "job_request_id": "k3v7q2m4x6z8b2c4",
        "action": "generate_cohort",
        "run_command": "cohortextractor:latest generate_cohort --output-dir=output",
        "status": "running",
        "status_code": "executing",
        "status_message": "Running",
        "created_at": "2021-11-03T09:12:51Z",
        "updated_at": "2021-11-03T09:14:02Z",
        "started_at": "2021-11-03T09:12:53Z",
        "completed_at": None,
    }


def test_job_to_wire_sends_blank_strings_for_missing_code_message_and_command():
    wire = job_to_wire(_job(status_code=None, status_message=None, run_command=None))
    assert (wire["status_code"], wire["status_message"], wire["run_command"]) == ("", "", "")


def test_job_to_wire_truncates_fractional_seconds_and_accepts_enum_state():
    wire = job_to_wire(_job(created_at=1635930771.999, state=FakeState.RUNNING))
    assert wire["created_at"] == "2021-11-03T09:12:51Z"
    assert wire["status"] == "running"


def test_job_to_wire_uses_the_models_state_enum_value():
    from jobrunner_lib.core.models import State

    assert job_to_wire(_job(state=State.SUCCEEDED))["status"] == "succeeded"


def test_job_to_wire_refuses_a_job_without_created_at():
    with pytest.raises(ValueError, match="no created_at"):
        job_to_wire(_job(created_at=None))


def test_job_to_wire_refuses_non_numeric_timestamps():
    with pytest.raises(ValueError, match="updated_at must be unix seconds"):
        job_to_wire(_job(updated_at="2021-11-03T09:14:02Z"))


def _jobs_of(request_ids: list[str]) -> list[dict]:
    return [{"identifier": f"job{n}", "job_request_id": rid} for n, rid in enumerate(request_ids)]


@given(
    request_ids=st.lists(st.sampled_from("abcdefgh"), max_size=60),
    batch_size=st.integers(min_value=1, max_value=12),
)
def test_group_contiguously_keeps_each_request_whole_and_contiguous(request_ids, batch_size):
    jobs = _jobs_of(request_ids)
    batches = group_contiguously(jobs, batch_size)

    flat = [job for batch in batches for job in batch]
    assert sorted(j["identifier"] for j in flat) == sorted(j["identifier"] for j in jobs)
    assert all(batches), "no empty batches"
    for request_id in set(request_ids):
        holding = [
            i
            for i, batch in enumerate(batches)
            if any(j["job_request_id"] == request_id for j in batch)
        ]
        assert len(holding) == 1, f"request {request_id} split across batches"
        positions = [
            i for i, j in enumerate(batches[holding[0]]) if j["job_request_id"] == request_id
        ]
        assert positions == list(range(positions[0], positions[-1] + 1)), "not contiguous"
    for batch in batches:
        if len(batch) > batch_size:
            assert len({j["job_request_id"] for j in batch}) == 1


@given(request_ids=st.lists(st.sampled_from("abc"), max_size=30))
def test_group_contiguously_keeps_each_requests_jobs_in_their_original_order(request_ids):
    jobs = _jobs_of(request_ids)
    flat = [job for batch in group_contiguously(jobs, 5) for job in batch]
    for request_id in set(request_ids):
        mine = [j for j in jobs if j["job_request_id"] == request_id]
        assert [j for j in flat if j["job_request_id"] == request_id] == mine


def test_group_contiguously_gives_an_oversized_request_a_batch_of_its_own():
    jobs = _jobs_of(["a", "b", "b", "b", "b", "c"])
    batches = group_contiguously(jobs, 3)
    assert [[j["job_request_id"] for j in batch] for batch in batches] == [
        ["a"],
        ["b", "b", "b", "b"],
        ["c"],
    ]


def test_group_contiguously_of_nothing_is_no_batches():
    assert group_contiguously([], 200) == []


def test_group_contiguously_rejects_a_zero_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        group_contiguously(_jobs_of(["a"]), 0)


@pytest.mark.parametrize("token", ["", "   ", "tok\r", " tok", "tök"])
def test_client_refuses_empty_or_untidy_tokens_without_quoting_them(token):
    with pytest.raises(ValueError, match="JOB_SERVER_TOKEN") as excinfo:
        JobServerClient("https://jobs.example.org/api/v2/", token, "test")
    if token.strip():
        assert token.strip() not in str(excinfo.value)


def test_client_refuses_an_endpoint_that_is_not_http():
    with pytest.raises(ValueError, match="JOB_SERVER_ENDPOINT"):
        JobServerClient("jobs.example.org/api/v2/", "secret-token", "test")


def test_client_adds_the_missing_trailing_slash_to_the_endpoint():
    client = JobServerClient("https://jobs.example.org/api/v2", "secret-token", "test")
    assert client.endpoint == "https://jobs.example.org/api/v2/"
    assert "secret-token" not in repr(client)
    client.close()


def test_importing_the_module_does_not_import_requests():
    code = "import sys, jobrunner_lib.website.client; print('requests' in sys.modules, 'urllib3' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert result.stdout.split() == ["False", "False"]
