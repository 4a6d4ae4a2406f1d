"""Retrying jobs (jr-retry): a job that failed with an internal error goes back to running (its
kept container is picked up) or to pending (it starts over); the jobs that failed waiting on it
go back to pending, waiting for it again.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import JobKeepsChanging
from jobrunner_lib.core.models import Job, Msg, State, StatusCode, transition
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.ops import objects
from jobrunner_lib.store import queries as db_queries

log = logging.getLogger(__name__)

# Fields describing the failed attempt, cleared so the next attempt starts with a clean slate.
RESET = dict(attempts=0, worker_pid=None, worker_started_at=None, error_detail=None, exit_code=None)

Decide = Callable[[Job], tuple[Job | None, str]]


@dataclass(frozen=True)
class Outcome:
    """What a retry did to one job: the job as it is now, whether it changed, and a note."""

    job: Job
    retried: bool
    note: str


def refusal(job: Job) -> str | None:
    """Why a job cannot be retried, or None if it can (only internal errors are retried)."""
    if job.state is State.FAILED and job.status_code is StatusCode.INTERNAL_ERROR:
        return None
    if job.state is State.FAILED:
        code = job.status_code.value if job.status_code else "no code"
        first_line = (job.status_message or "").split("\n")[0]
        return f"it failed with {code} ({first_line}), not internal_error"
    return f"it is {job.state.value}, not failed with internal_error"


def resumable(config: Config, job_id: str) -> bool:
    """Whether the job's container and volume are both still there to pick up from."""
    from jobrunner_lib.docker import volumes

    return docker.inspect_container(docker.container_name(job_id)) is not None and volumes.exists(
        config, job_id
    )


def _save_change(conn: sqlite3.Connection, job: Job, decide: Decide) -> tuple[Job | None, str]:
    """Save decide(job)'s job (store.queries.change_job: decided again on the fresh row after a
    racing change); (the saved job or None, what was done or why not)."""
    said = [""]

    def change(current: Job) -> Job | None:
        new, said[0] = decide(current)
        return new

    try:
        saved, changed = db_queries.change_job(conn, job, change)
    except JobKeepsChanging:
        return None, "not retried: it kept changing; try again"
    if saved is None:
        return None, "not retried: it disappeared from the state store"
    if not changed:
        return None, said[0]
    log.info(f"Retried by {objects.operator()}: {said[0]}", extra={"job": saved})
    return saved, said[0]


def retry_job(config: Config, conn: sqlite3.Connection, job: Job) -> tuple[Job | None, str]:
    """Reset one internal-error job (compare-and-set); (the saved job or None, what was done)."""

    def decide(job: Job) -> tuple[Job | None, str]:
        reason = refusal(job)
        if reason is not None:
            return None, f"not retried: {reason}"
        if resumable(config, job.id):
            # The next pass sees no live worker and starts one, which follows a still-running
            # container, starts a prepared one, or finalises an exited one.
            new = transition(job, State.RUNNING, StatusCode.FINALIZING, Msg.RETRYING, **RESET)
            return new, "back to running: the next pass picks up its kept container"
        # Whatever is left cannot be used; the job starts over from nothing.
        removed = objects.remove_job_objects(config, job.id)
        new = transition(job, State.PENDING, StatusCode.CREATED, Msg.CREATED, **RESET)
        done = "back to pending: its container is gone, so it starts over"
        return new, done + (f" (removed {', '.join(removed)})" if removed else "")

    return _save_change(conn, job, decide)


def failed_dependants(conn: sqlite3.Connection, jobs: Sequence[Job]) -> list[Job]:
    """The jobs that failed waiting on these (dependency_failed), directly or through each other.

    Only a job still its action's newest in its workspace counts (a newer request may have
    asked for the action again), and not a cancelled one. Oldest first.
    """
    found: dict[str, Job] = {}
    for workspace in sorted({job.workspace for job in jobs}):
        latest = db_queries.latest_jobs_by_action(conn, workspace)
        candidates = [
            job
            for job in latest.values()
            if job.state is State.FAILED and job.status_code is StatusCode.DEPENDENCY_FAILED
        ]
        awaited = {job.id for job in jobs if job.workspace == workspace}
        grew = True
        while grew:
            grew = False
            for job in candidates:
                if job.id not in awaited and awaited.intersection(job.wait_for_job_ids):
                    awaited.add(job.id)
                    found[job.id] = job
                    grew = True
    return sorted(found.values(), key=lambda job: (job.created_at, job.id))


def repend(conn: sqlite3.Connection, job: Job) -> tuple[Job | None, str]:
    """Put a dependency_failed job back to pending, waiting again (compare-and-set)."""

    def decide(job: Job) -> tuple[Job | None, str]:
        if job.state is not State.FAILED or job.status_code is not StatusCode.DEPENDENCY_FAILED:
            return None, f"not retried: it is now {job.state.value}"
        new = transition(
            job, State.PENDING, StatusCode.WAITING_ON_DEPENDENCIES, Msg.WAITING_ON_DEPENDENCIES
        )
        return new, "back to pending: waits again for the job it needs"

    return _save_change(conn, job, decide)


def retry(
    config: Config, conn: sqlite3.Connection, jobs: Sequence[Job], *, with_dependants: bool
) -> list[Outcome]:
    """Retry each job (a Docker or OS error refuses only that one), then put back to pending
    the failed dependants of the jobs actually retried, as the store has them now."""
    from docker.errors import DockerException

    outcomes, retried = [], []
    for job in jobs:
        try:
            saved, done = retry_job(config, conn, job)
        except (docker.DockerTimeout, DockerException, OSError) as exc:
            saved, done = None, f"not retried: {type(exc).__name__}: {exc}"
        outcomes.append(Outcome(saved or job, saved is not None, done))
        if saved is not None:
            retried.append(saved)
    for job in failed_dependants(conn, retried) if with_dependants else []:
        saved, done = repend(conn, job)
        outcomes.append(Outcome(saved or job, saved is not None, done))
    return outcomes
