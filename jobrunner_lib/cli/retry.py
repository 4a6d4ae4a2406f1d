"""jr-retry: give jobs that failed with an internal error another go, reusing what they left."""

from __future__ import annotations

import argparse
import logging
import sqlite3
from collections.abc import Callable

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import ConflictError, UsageError
from jobrunner_lib.core.models import Job, Msg, State, StatusCode, transition
from jobrunner_lib.ops import objects as service
from jobrunner_lib.store import queries as db_queries

from .common import Context, Tool, run_tool
from .formats import RESULT_COLUMNS, result_row

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 10
# Fields describing the failed attempt, cleared so the next attempt starts with a clean slate.
RESET = dict(attempts=0, worker_pid=None, worker_started_at=None, error_detail=None, exit_code=None)


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
    from jobrunner_lib.docker import engine as docker
    from jobrunner_lib.docker import volumes

    return docker.inspect_container(docker.container_name(job_id)) is not None and volumes.exists(
        config, job_id
    )


def _save_change(
    conn: sqlite3.Connection, job: Job, decide: Callable[[Job], tuple[Job | None, str]]
) -> tuple[Job | None, str]:
    """Save decide(job)'s job by compare-and-set, deciding again on a fresher job after a
    racing change; (the saved job or None, what was done or why not)."""
    for _ in range(CONFLICT_RETRIES):
        new, done = decide(job)
        if new is None:
            return None, done
        try:
            saved = db_queries.save_job(conn, new)
        except ConflictError:
            fresh = db_queries.get_job(conn, job.id)
            if fresh is None:
                return None, "not retried: it disappeared from the state store"
            job = fresh
            continue
        log.info(f"Retried by {service.operator()}: {done}", extra={"job": saved})
        return saved, done
    return None, "not retried: it kept changing; try again"


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
        removed = service.remove_job_objects(config, job.id)
        new = transition(job, State.PENDING, StatusCode.CREATED, Msg.CREATED, **RESET)
        done = "back to pending: its container is gone, so it starts over"
        return new, done + (f" (removed {', '.join(removed)})" if removed else "")

    return _save_change(conn, job, decide)


def failed_dependants(conn: sqlite3.Connection, jobs: list[Job]) -> list[Job]:
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


class Retry(Tool):
    name = "jr-retry"
    component = "retry"
    description = """Retry jobs that failed with an internal error (status code internal_error),
after fixing the cause. If the job's container and volume were kept, the job goes back to
running ("Re-attempting to extract outputs") and the next jr-run-once starts a worker that carries
on from there (finalising an exited container, or following a running one); if they are gone,
the job goes back to pending and starts over. The jobs that failed waiting on it
(dependency_failed, directly or through each other, and not since requested again) go back to
pending too, waiting for it again (--no-dependants leaves them failed). Any other job is refused
with the reason (exit 1) while the eligible ones are still retried. Does not contact the jobs
website: the next jr-sync reports the jobs."""
    epilog = """examples:
  jr-retry abcd                                   retry one job (shows the plan, asks first)
  jr-retry --no-dependants abcd                   only it: what failed waiting on it stays failed
  jr-ls --status-code internal_error -o ids | jr-retry --yes -    retry every internal error"""
    takes_ids = "+"
    output = True
    destructive = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--no-dependants",
            action="store_true",
            help="leave the jobs that failed waiting on them (dependency_failed) failed",
        )

    def run(self, ctx: Context) -> int:
        from docker.errors import DockerException

        from jobrunner_lib.docker import engine as docker

        jobs = ctx.resolve_jobs(ctx.args.ids)
        if not jobs:
            raise UsageError("no job IDs given (standard input was empty)")
        eligible = [job for job in jobs if refusal(job) is None]
        with_dependants = not ctx.args.no_dependants
        dependants = failed_dependants(ctx.conn, eligible) if with_dependants else []
        coming = {job.id for job in dependants}
        rows = []
        for job in jobs:
            reason = refusal(job)
            if reason is None or job.id in coming:  # a dependant named too (a request's ID)
                continue
            ctx.stderr.write(f"{self.name}: {job.id} ({job.action}): not retried: {reason}\n")
            rows.append(result_row(job, f"not retried: {reason}"))
        refused = bool(rows)
        if refused:
            ctx.say("(only internal errors are retried; a new request reruns anything else)")
        if not eligible:
            ctx.emit(rows, RESULT_COLUMNS)
            return 1
        docker.ping()
        plan = [f"About to retry {len(eligible)} job(s):"]
        assert ctx.config is not None
        for job in eligible:
            how = "from its kept container" if resumable(ctx.config, job.id) else "from the start"
            plan.append(f"  retry {how}: {job.id}  {job.action}  ({job.workspace})")
        for job in dependants:
            plan.append(
                f"  back to pending, waiting again: {job.id}  {job.action}  ({job.workspace})"
            )
        if not ctx.confirm(plan, "retry"):
            return 1 if refused else 0
        failed = refused
        retried: list[Job] = []
        for job in eligible:
            try:
                assert ctx.config is not None
                saved, done = retry_job(ctx.config, ctx.conn, job)
            except (docker.DockerTimeout, DockerException, OSError) as exc:
                saved, done = None, f"not retried: {type(exc).__name__}: {exc}"
            if saved is None:
                failed = True
                ctx.stderr.write(f"{self.name}: {job.id} ({job.action}): {done}\n")
            rows.append(result_row(saved or job, done))
            if saved is not None:
                retried.append(saved)
        # Only the dependants of jobs actually retried, as the store has them now.
        for job in failed_dependants(ctx.conn, retried) if with_dependants else []:
            saved, done = repend(ctx.conn, job)
            if saved is None:
                failed = True
                ctx.stderr.write(f"{self.name}: {job.id} ({job.action}): {done}\n")
            rows.append(result_row(saved or job, done))
        ctx.emit(rows, RESULT_COLUMNS)
        return 1 if failed else 0


def main() -> None:
    """Entry point."""
    run_tool(Retry)
