"""Requests into jobs (docs/lifecycle.md#creating-jobs): reuse, force, failed dependencies, errors, idempotence."""

from __future__ import annotations

import pytest

from jobrunner_lib.core.config import load_config
from jobrunner_lib.core.models import State, StatusCode
from jobrunner_lib.git import repos as git_repos
from jobrunner_lib.jobs.create import (
    JobRequestError,
    ReusableActionError,
    handle_request,
    resolve_reusable_action,
    validate_request,
)
from jobrunner_lib.pipeline.names import IMAGE_NAME_RULE
from jobrunner_lib.pipeline.rules import one_line
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries
from tests.support.factories import make_request
from tests.support.studies import SIMPLE_PROJECT, commit_files, make_study


@pytest.fixture
def setup(tmp_path):
    config = load_config(environ={"WORKDIR": str(tmp_path / "workdir")}, env_file=tmp_path / "none")
    repo, sha = make_study(tmp_path / "study")
    conn = db.connect(config.db_path)
    return config, conn, repo, sha


def request(repo, sha, actions, **kw):
    return make_request(actions=actions, repo_url=str(repo), commit=sha, **kw)


def finish(conn, jobs, state=State.SUCCEEDED):
    """Mark jobs final as the run side would."""
    for job in jobs:
        code = StatusCode.SUCCEEDED if state is State.SUCCEEDED else StatusCode.NONZERO_EXIT
        conn.execute(
            "UPDATE job SET state = ?, status_code = ? WHERE id = ?",
            (state.value, code.value, job.id),
        )


def test_a_request_creates_the_action_and_its_missing_dependencies_in_order(setup):
    config, conn, repo, sha = setup
    outcome = handle_request(config, conn, request(repo, sha, ["report"]))
    assert [j.action for j in outcome.jobs] == ["extract", "model", "report"]
    extract, model, report = outcome.jobs
    assert model.wait_for_job_ids == [extract.id] and report.wait_for_job_ids == [model.id]
    assert report.requires_outputs_from == ["model"]
    assert extract.status_code is StatusCode.CREATED
    assert model.status_code is StatusCode.WAITING_ON_DEPENDENCIES
    assert report.run_command == "r:v1 analysis/report.sh"
    assert report.output_spec == {"moderately_sensitive": {"report": "output/report.txt"}}
    assert len(db_queries.jobs_for_request(conn, outcome.jobs[0].job_request_id)) == 3


def test_the_same_request_twice_creates_nothing_new(setup):
    config, conn, repo, sha = setup
    req = request(repo, sha, ["report"])
    first = handle_request(config, conn, req)
    second = handle_request(config, conn, req)
    assert second.created is False and {j.id for j in second.jobs} == {j.id for j in first.jobs}
    assert conn.execute("SELECT COUNT(*) FROM job").fetchone()[0] == 3


def test_succeeded_dependencies_are_reused(setup):
    config, conn, repo, sha = setup
    finish(conn, handle_request(config, conn, request(repo, sha, ["model"])).jobs)
    again = handle_request(config, conn, request(repo, sha, ["report"]))
    assert [j.action for j in again.jobs] == ["report"]
    assert again.jobs[0].wait_for_job_ids == [] and again.jobs[0].status_code is StatusCode.CREATED


def test_in_flight_dependencies_are_waited_on(setup):
    config, conn, repo, sha = setup
    first = handle_request(config, conn, request(repo, sha, ["extract"])).jobs
    again = handle_request(config, conn, request(repo, sha, ["model"])).jobs
    assert [j.action for j in again] == ["model"] and again[0].wait_for_job_ids == [first[0].id]


def test_force_run_dependencies_reruns_everything(setup):
    config, conn, repo, sha = setup
    finish(conn, handle_request(config, conn, request(repo, sha, ["model"])).jobs)
    forced = handle_request(
        config, conn, request(repo, sha, ["report"], force_run_dependencies=True)
    )
    assert [j.action for j in forced.jobs] == ["extract", "model", "report"]


def test_a_failed_dependency_fails_its_dependants_naming_it(setup):
    config, conn, repo, sha = setup
    jobs = handle_request(config, conn, request(repo, sha, ["extract"])).jobs
    finish(conn, jobs, State.FAILED)
    again = handle_request(config, conn, request(repo, sha, ["model"])).jobs
    assert [(j.action, j.state) for j in again] == [("model", State.FAILED)]
    assert again[0].status_code is StatusCode.DEPENDENCY_FAILED
    assert f"extract ({jobs[0].id})" in again[0].status_message


def test_run_all_reruns_every_action_even_after_failures(setup):
    config, conn, repo, sha = setup
    finish(conn, handle_request(config, conn, request(repo, sha, ["extract"])).jobs, State.FAILED)
    jobs = handle_request(config, conn, request(repo, sha, ["run_all"])).jobs
    assert [(j.action, j.state) for j in jobs] == [
        ("extract", State.PENDING),
        ("model", State.PENDING),
        ("report", State.PENDING),
    ]


def test_requesting_only_scheduled_actions_succeeds_as_the_upstream_runner_answers(setup):
    config, conn, repo, sha = setup
    (scheduled,) = handle_request(config, conn, request(repo, sha, ["extract"])).jobs
    outcome = handle_request(config, conn, request(repo, sha, ["extract"]))
    ((action, state, message),) = [(j.action, j.state, j.status_message) for j in outcome.jobs]
    assert (action, state) == ("extract", State.SUCCEEDED)
    assert message == "All requested actions were already scheduled to run"
    # The answer ran nothing: it never stands for the action (its latest job is still the real one).
    assert db_queries.latest_jobs_by_action(conn, "ws")["extract"].id == scheduled.id
    finish(conn, [scheduled])
    assert db_queries.latest_succeeded_job(conn, "ws", "extract").id == scheduled.id


def test_unknown_action_becomes_one_failed_error_job(setup):
    config, conn, repo, sha = setup
    outcome = handle_request(config, conn, request(repo, sha, ["nope"]))
    (job,) = outcome.jobs
    assert (job.action, job.state) == ("__error__", State.FAILED)
    assert job.status_message == "UnknownActionError: Action 'nope' not found in project.yaml"
    assert job.completed_at == job.created_at


def test_an_unknown_action_name_from_the_website_is_shown_escaped(setup):
    config, conn, repo, sha = setup
    forged = "nope\n2026-11-28 11:20:19.328Z sync Created 3 new jobs req=forged"
    (job,) = handle_request(config, conn, request(repo, sha, [forged])).jobs
    assert job.status_message == (
        "UnknownActionError: Action 'nope\\n2026-11-28 11:20:19.328Z sync Created 3 new jobs"
        " req=forged' not found in project.yaml"
    )


def test_invalid_project_yaml_reports_every_problem(setup, tmp_path):
    config, conn, repo, _ = setup
    sha = commit_files(
        repo,
        SIMPLE_PROJECT.replace("needs: [extract]", "needs: [extrct]").replace(
            "python:v1 analysis/extract.sh", "python analysis/extract.sh"
        ),
    )
    (job,) = handle_request(config, conn, request(repo, sha, ["run_all"])).jobs
    assert job.status_message.startswith("ProjectValidationError:")
    assert "extrct" in job.status_message and "must have a version specified" in job.status_message


def test_missing_project_yaml(setup):
    config, conn, repo, _ = setup
    sha = commit_files(repo, None)
    (job,) = handle_request(config, conn, request(repo, sha, ["run_all"])).jobs
    assert job.status_message == f"JobRequestError: No project.yaml file found in {repo}"


def test_unknown_commit_is_a_clear_error_job(setup):
    config, conn, repo, _ = setup
    (job,) = handle_request(config, conn, request(repo, "f" * 40, ["run_all"])).jobs
    assert job.action == "__error__" and "Error fetching commit ffff" in job.status_message


def test_cancelled_actions_in_a_new_request_are_flagged(setup):
    config, conn, repo, sha = setup
    req = request(repo, sha, ["model"])
    req.cancelled_actions = ["model"]
    handle_request(config, conn, req)
    flags = {j.action: j.cancelled for j in db_queries.jobs_for_request(conn, req.id)}
    assert flags == {"extract": False, "model": True}


def test_run_all_when_everything_succeeded_is_nothing_to_do(setup):
    config, conn, repo, sha = setup
    finish(conn, handle_request(config, conn, request(repo, sha, ["run_all"])).jobs)
    (job,) = handle_request(config, conn, request(repo, sha, ["run_all"])).jobs
    assert (job.action, job.state, job.status_message) == (
        "run_all",
        State.SUCCEEDED,
        "All actions have already run",
    )


def test_run_all_reuses_succeeded_actions_and_reruns_the_rest(setup):
    config, conn, repo, sha = setup
    finish(conn, handle_request(config, conn, request(repo, sha, ["extract"])).jobs)
    jobs = handle_request(config, conn, request(repo, sha, ["run_all"])).jobs
    assert [j.action for j in jobs] == ["model", "report"]


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("workspace", "bad name!", "Invalid workspace name"),
        ("requested_actions", [], "At least one action"),
        ("repo_url", "https://github.com/evil/study", "organisations: opensafely"),
        ("repo_url", "https://gitlab.com/x/y", "not of the expected format"),
    ],
)
def test_request_validation(setup, field, value, needle):
    config, _conn, repo, sha = setup
    req = request(repo, sha, ["extract"])
    setattr(req, field, value)
    with pytest.raises(JobRequestError, match=needle):
        validate_request(config, req)


def test_local_repos_are_refused_on_a_production_backend(setup, tmp_path):
    _config, _conn, repo, sha = setup
    prod = load_config(
        environ={"BACKEND": "tpp", "WORKDIR": str(tmp_path / "w"), "FULL_DATABASE_URL": "x"},
        env_file=tmp_path / "none",
    )
    with pytest.raises(JobRequestError, match="local path"):
        validate_request(prod, request(repo, sha, ["extract"], database_name="full"))


def test_database_must_be_configured_on_a_real_backend(setup, tmp_path):
    _config, _conn, _repo, sha = setup
    prod = load_config(
        environ={"BACKEND": "tpp", "WORKDIR": str(tmp_path / "w"), "DEFAULT_DATABASE_URL": "x"},
        env_file=tmp_path / "none",
    )
    req = make_request(actions=["x"], repo_url="https://github.com/opensafely/study", commit=sha)
    req.database_name = "full"
    with pytest.raises(JobRequestError, match="Database name 'full' is not currently defined"):
        validate_request(prod, req)


@pytest.mark.parametrize(
    "image",
    ["../other/act", "other/act", "/abs/act", "https://evil.example/act", "a..b", "..", "-x",
     "", "x" * 101, "act\n", "act?x=1"],
)  # fmt: skip
def test_a_reusable_action_name_that_is_not_plain_is_refused_before_any_git_call(
    tmp_path, monkeypatch, image
):
    config = load_config(environ={"WORKDIR": str(tmp_path / "w")}, env_file=tmp_path / "none")

    def no_git(*args, **kwargs):
        raise AssertionError("git must not be asked about this repository")

    for name in ("tag_commit", "ensure_commit", "commit_reachable_from", "read_file"):
        monkeypatch.setattr(git_repos, name, no_git)
    with pytest.raises(ReusableActionError) as info:
        resolve_reusable_action(config, "km\nx", image, "v1", [])
    shown = one_line(image, 60)  # escaped and cut short
    assert str(info.value) == (
        f"in 'km\\nx: {shown}:v1': `{shown}` is not a valid reusable action name: {IMAGE_NAME_RULE}"
    )


@pytest.mark.parametrize(
    ("name", "ok"),
    [("default", True), ("include_t1oo", True), ("INCLUDE_T1OO", True), ("full", False),
     ("../x", False), ("", False)],
)  # fmt: skip
def test_a_request_names_its_database_by_any_configured_name(setup, tmp_path, name, ok):
    _config, _conn, _repo, sha = setup
    prod = load_config(
        environ={
            "BACKEND": "tpp",
            "WORKDIR": str(tmp_path / "w"),
            "DEFAULT_DATABASE_URL": "mssql://d",
            "INCLUDE_T1OO_DATABASE_URL": "mssql://t",
        },
        env_file=tmp_path / "none",
    )
    req = make_request(actions=["x"], repo_url="https://github.com/opensafely/study", commit=sha)
    req.database_name = name
    if ok:
        validate_request(prod, req)
    else:
        with pytest.raises(JobRequestError, match=f"Database name {name!r} is"):
            validate_request(prod, req)


DB_PROJECT = """\
version: "5"
actions:
  dataset:
    run: ehrql:v1 generate-dataset analysis/dataset.py --output output/dataset.csv
    outputs:
      highly_sensitive:
        data: output/dataset.csv
  tables:
    run: python:v1 analysis/tables.py
    outputs:
      moderately_sensitive:
        table: output/table.csv
"""


@pytest.mark.parametrize(
    ("actions", "stale"), [(["dataset"], True), (["run_all"], True), (["tables"], False)]
)
def test_stale_codelists_fail_a_request_that_runs_a_database_action(
    setup, tmp_path, actions, stale
):
    _config, conn, _repo, _sha = setup
    config = load_config(
        environ={"WORKDIR": str(tmp_path / "workdir"), "ALLOWED_IMAGES": "python,ehrql"},
        env_file=tmp_path / "none",
    )
    repo, sha = make_study(tmp_path / "dbstudy", DB_PROJECT, {"analysis/tables.py": "x\n"})
    outcome = handle_request(config, conn, request(repo, sha, actions, codelists_ok=False))
    if stale:
        (job,) = outcome.jobs
        assert (job.action, job.state, job.status_code) == (
            "__error__",
            State.FAILED,
            StatusCode.STALE_CODELISTS,
        )
        assert job.status_message.startswith(
            "Codelists are out of date (required by action dataset): update them"
        )
    else:  # a request that runs no database action is not affected
        assert [j.action for j in outcome.jobs] == ["tables"]
        assert outcome.jobs[0].state is State.PENDING
