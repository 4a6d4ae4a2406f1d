"""Killing jobs (jr-kill): a pending job never starts; a running one is failed, its worker and
container stopped and its log kept; a finished job keeps its state. Safe to repeat: a kill that
was cut short is finished by the next one.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from typing import Any

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import OperationFailed
from jobrunner_lib.core.models import Job, Msg, State, StatusCode, transition
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.ops import objects
from jobrunner_lib.store import queries as db_queries

log = logging.getLogger(__name__)


def kill_message(job: Job, who: str) -> tuple[StatusCode, str]:
    """The code and message of a killed job: `Killed by admin`, as the old backend said it on
    the website (who did it stays in jr's own log and the job's error_detail, never on the
    website); a cancelled job still says `Cancelled by user`."""
    if job.cancelled:
        return StatusCode.CANCELLED_BY_USER, Msg.CANCELLED
    return StatusCode.KILLED_BY_ADMIN, Msg.KILLED


def fail_job(conn: sqlite3.Connection, job: Job, who: str) -> tuple[Job, bool]:
    """Move an active job to failed (store.queries.change_job: a job that became final
    meanwhile is left as it is). Returns the job as saved or as found, and whether we killed it.
    """

    def kill(current: Job) -> Job | None:
        if current.state.is_final:
            return None
        code, message = kill_message(current, who)
        return transition(
            current, State.FAILED, code, message, error_detail=f"killed by {who} with jr-kill"
        )

    found, killed = db_queries.change_job(conn, job, kill)
    if found is None:
        raise OperationFailed(f"job {job.id} disappeared from the state store")
    return found, killed


def was_killed(job: Job) -> bool:
    """Killed earlier by jr-kill: a repeat makes sure its worker and container stopped."""
    return job.state.is_final and job.status_code is StatusCode.KILLED_BY_ADMIN


def needs_docker(jobs: Sequence[Job], cleanup: bool) -> bool:
    """Whether killing these jobs talks to Docker (then it must answer before any row changes:
    a half-done kill is worse than none)."""
    return cleanup or any(j.state is State.RUNNING or was_killed(j) for j in jobs)


def describe(job: Job) -> str:
    """`failed (killed_by_admin)`, `succeeded`."""
    code = job.status_code.value if job.status_code else ""
    return f"{job.state.value} ({code})" if code and job.state is State.FAILED else job.state.value


def log_exists(config: Config, job: Job) -> bool:
    """Whether the killed job's logs.txt was already written (by an earlier jr-kill)."""
    from jobrunner_lib.jobs.workspaces import log_dir

    base = config.high_privacy_storage_base
    return (log_dir(base, job.id, job.completed_at or 0) / "logs.txt").exists()


def unfinished(config: Config, job: Job) -> bool:
    """An earlier kill was interrupted: worker or container still running, or no log kept."""
    from jobrunner_lib.jobs.processes import worker_alive

    if job.worker_pid and worker_alive(job.worker_pid, job.worker_started_at):
        return True
    info = docker.inspect_container(docker.container_name(job.id))
    if info is None:
        return False
    return bool(info["State"].get("Running")) or not log_exists(config, job)


def plan(config: Config, job: Job, hung: dict[str, str], cleanup: bool) -> str | None:
    """What killing the job will do (a phrase for the plan), or None if nothing."""
    if not job.state.is_final:
        return "kill and clean up" if cleanup else "kill"
    if objects.hung_objects_of(job.id, hung):
        return None  # calls to a hung container may never return: leave it alone
    if cleanup:
        names = [name for _, name in objects.job_objects(config, job.id)]
        if names:
            return f"remove {', '.join(names)}"
    if was_killed(job) and unfinished(config, job):
        return "finish killing"
    return None


def nothing_to_do(job: Job, hung: dict[str, str]) -> str:
    """Why a job needs nothing."""
    stuck = objects.hung_objects_of(job.id, hung)
    if job.state.is_final and stuck:
        return f"already {describe(job)}; left {', '.join(stuck)} alone: flagged hung"
    return f"already {describe(job)}: nothing to do"


def keep_log(
    config: Config, conn: sqlite3.Connection, job: Job, info: dict[str, Any], was: Job
) -> str:
    """Write logs.txt + metadata.json for a killed job from its container; the log's path.

    Holding the workspace lock (its worker is stopped by now): what an interrupted finalize
    staged is removed, and an action log the worker may have written for this job is rewritten
    to say what the store says (workspaces.rewrite_action_logs).
    """
    from jobrunner_lib.jobs import finalize, workspaces

    metadata = finalize.job_metadata(
        job,
        db_queries.original_request(conn, job.job_request_id),
        finalize.redact_environment(info),
        None,
    )
    with workspaces.locked(config, job.workspace):
        logs_txt = finalize.write_job_logs(config.high_privacy_storage_base, job, metadata)
        workspaces.discard_staging(config, job.id)
        if workspaces.rewrite_action_logs(config, job, logs_txt, was.status_code):
            log.info("Action logs rewritten for the killed job", extra={"job": job})
    return str(logs_txt)


def kill_job(
    config: Config,
    conn: sqlite3.Connection,
    job: Job,
    who: str,
    hung: dict[str, str],
    *,
    cleanup: bool = False,
) -> tuple[Job, list[str]]:
    """Change the row, then stop the worker, then the container; keep the log; clean up.

    Returns the job as it is now and notes saying what was done. Docker and OS errors are the
    caller's to report (the row may already say killed: a repeat finishes the kill).
    """
    before, was = job.state, job
    job, killed = fail_job(conn, job, who)
    if killed:
        log.info(
            f"{job.status_message} (was {before.value}; {job.error_detail})", extra={"job": job}
        )
        notes = [f"killed (was {before.value})"]
    else:
        notes = [f"already {describe(job)}"]
    if killed or was_killed(job):
        stopped = objects.stop_worker(job)
        if stopped:
            notes.append(stopped)
    stuck = objects.hung_objects_of(job.id, hung)
    if stuck:
        notes.append(f"left {', '.join(stuck)} alone: flagged hung (restart Docker to clear it)")
        return job, notes
    if killed or was_killed(job):
        name = docker.container_name(job.id)
        info = docker.inspect_container(name)
        if info is not None:
            if info["State"].get("Running"):
                docker.kill_container(name)
                notes.append("container stopped")
                info = docker.inspect_container(name) or info
            if killed or not log_exists(config, job):
                notes.append(f"log kept in {keep_log(config, conn, job, info, was)}")
    if cleanup:
        removed = objects.remove_job_objects(config, job.id)
        notes.append(f"removed {', '.join(removed)}" if removed else "no container or volume left")
        if removed:
            log.info(f"Removed {', '.join(removed)}", extra={"job": job})
    return job, notes
