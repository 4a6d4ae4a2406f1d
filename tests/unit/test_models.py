"""The state machine: allowed transitions, timestamps, and refusal of everything else."""

from __future__ import annotations

import itertools

import pytest

from jobrunner_lib.core.errors import IllegalTransition
from jobrunner_lib.core.models import (
    ALLOWED,
    Job,
    JobRequest,
    State,
    StatusCode,
    new_job,
    project_name,
    transition,
)


def job(state: State, **kw) -> Job:
    return Job(
        id="a" * 16, job_request_id="b" * 16, state=state, created_at=100, updated_at=100, **kw
    )


@pytest.mark.parametrize(("old", "new"), list(itertools.product(State, State)))
def test_every_pair_is_either_allowed_or_refused(old, new):
    if (old, new) in ALLOWED:
        moved = transition(job(old), new, StatusCode.CREATED, "m", at=200)
        assert moved.state is new and moved.updated_at == 200
    else:
        with pytest.raises(IllegalTransition):
            transition(job(old), new, None, None, at=200)


def test_succeeded_jobs_never_move():
    for target in State:
        with pytest.raises(IllegalTransition):
            transition(job(State.SUCCEEDED), target, None, None)


def test_entering_running_sets_started_and_final_sets_completed():
    running = transition(
        job(State.PENDING), State.RUNNING, StatusCode.PREPARING, "Preparing", at=150
    )
    assert running.started_at == 150 and running.completed_at is None
    done = transition(
        running, State.SUCCEEDED, StatusCode.SUCCEEDED, "Completed successfully", at=300
    )
    assert done.completed_at == 300 and done.started_at == 150


def test_reset_to_pending_clears_start_and_completion():
    failed = job(State.FAILED, started_at=120, completed_at=130)
    reset = transition(failed, State.PENDING, StatusCode.WAITING_ON_REBOOT, "x", at=400)
    assert reset.started_at is None and reset.completed_at is None


def test_retry_keeps_the_original_start_time():
    failed = job(State.FAILED, started_at=120, completed_at=130)
    retried = transition(failed, State.RUNNING, StatusCode.FINALIZING, "Re-attempting", at=500)
    assert retried.started_at == 120 and retried.completed_at is None


def test_new_final_job_has_all_timestamps():
    req = JobRequest(
        id="r" * 16,
        repo_url="https://github.com/o/study.git",
        commit="c" * 40,
        branch="main",
        requested_actions=["a"],
        cancelled_actions=[],
        workspace="w",
        database_name="full",
    )
    created = new_job("j" * 16, req, "__error__", State.FAILED, None, "JobRequestError: x", at=42)
    assert (created.created_at, created.started_at, created.completed_at) == (42, 42, 42)
    assert created.project == "study"


def test_project_name_is_the_repo_name_without_git():
    assert project_name("https://github.com/opensafely/Covid-Vax.git") == "Covid-Vax"
