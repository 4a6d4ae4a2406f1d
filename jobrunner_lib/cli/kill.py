"""jr-kill: stop jobs for good. A pending job never starts; a running one is killed, its log kept."""

from __future__ import annotations

import argparse
import logging
import sqlite3
from typing import Any

from jobrunner_lib.core.errors import ConflictError, OperationFailed, TemporaryFailure, UsageError
from jobrunner_lib.core.models import Job, Msg, State, StatusCode, transition
from jobrunner_lib.ops import objects as service
from jobrunner_lib.store import queries as db_queries

from .common import Context, Tool, run_tool
from .formats import RESULT_COLUMNS, result_row

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 10


def kill_message(job: Job, who: str) -> tuple[StatusCode, str]:
    """The code and message of a killed job: a cancelled job still says `Cancelled by user`."""
    if job.cancelled:
        return StatusCode.CANCELLED_BY_USER, Msg.CANCELLED
    return StatusCode.KILLED_BY_ADMIN, f"{Msg.KILLED} (jr-kill by {who})"


def fail_job(conn: sqlite3.Connection, job: Job, who: str) -> tuple[Job, bool]:
    """Move an active job to failed (compare-and-set, re-deciding after a lost race).

    Returns the job as saved (or as found, if it became final meanwhile) and whether we killed it.
    """
    for _ in range(CONFLICT_RETRIES):
        if job.state.is_final:
            return job, False
        code, message = kill_message(job, who)
        try:
            return db_queries.save_job(conn, transition(job, State.FAILED, code, message)), True
        except ConflictError:
            fresh = db_queries.get_job(conn, job.id)
            if fresh is None:
                raise OperationFailed(f"job {job.id} disappeared from the state store") from None
            job = fresh
    raise TemporaryFailure(f"job {job.id} keeps changing; try again")


def keep_log(ctx: Context, job: Job, info: dict[str, Any], was: Job) -> str:
    """Write logs.txt + metadata.json for a killed job from its container; the log's path.

    Holding the workspace lock (its worker is stopped by now): what an interrupted finalize
    staged is removed, and an action log the worker may have written for this job is rewritten
    to say what the store says (workspaces.rewrite_action_logs).
    """
    from jobrunner_lib.jobs import finalize, workspaces

    assert ctx.config is not None
    metadata = finalize.job_metadata(
        job,
        db_queries.original_request(ctx.conn, job.job_request_id),
        finalize.redact_environment(info),
        None,
    )
    with workspaces.locked(ctx.config, job.workspace):
        logs_txt = finalize.write_job_logs(ctx.config.high_privacy_storage_base, job, metadata)
        workspaces.discard_staging(ctx.config, job.id)
        if workspaces.rewrite_action_logs(ctx.config, job, logs_txt, was.status_code):
            log.info("Action logs rewritten for the killed job", extra={"job": job})
    return str(logs_txt)


class Kill(Tool):
    name = "jr-kill"
    component = "kill"
    description = """Kill jobs: a pending job never starts; a running job's worker and container
are stopped and the container's log is kept in $HIGH/logs/YYYY-MM/os-job-<id>/. Both end failed
(killed_by_admin, "Killed by admin (jr-kill by <user>@<host>)"); a job the user had cancelled
says "Cancelled by user". Finished jobs keep their state and message. The container and volume
are kept for a look (jr-mount) unless --cleanup, which also clears leftovers of finished jobs.
Does not contact the jobs website: the next jr-sync reports the new state. Safe to repeat."""
    epilog = """examples:
  jr-kill abcd                          kill a job (shows the plan, asks first)
  jr-kill --yes k3v7q2m4x6z8b2c4        kill every job of a request without asking
  jr-kill --cleanup --yes abcd          kill it and remove its container and volume
  jr-ls --state failed -o ids | jr-kill --cleanup --dry-run -    what would be cleared"""
    takes_ids = "+"
    output = True
    destructive = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--cleanup",
            action="store_true",
            help="also remove each job's container, volume and helper (finished jobs too)",
        )

    def run(self, ctx: Context) -> int:
        from docker.errors import DockerException

        from jobrunner_lib.docker import engine as docker

        args = ctx.args
        jobs = ctx.resolve_jobs(args.ids)
        if not jobs:
            raise UsageError("no job IDs given (standard input was empty)")
        if args.cleanup or any(j.state is State.RUNNING or self.was_killed(j) for j in jobs):
            docker.ping()  # before any change: a half-done kill is worse than none
        hung = service.hung_containers(ctx.conn)
        plan, work, rows = [], [], []
        for job in jobs:
            what = self.plan_for(ctx, job, hung)
            if what:
                plan.append(
                    f"  {what}: {job.id}  {job.action}  ({job.workspace}, {job.state.value})"
                )
                work.append(job)
            else:
                rows.append(result_row(job, self.nothing_to_do(job, hung)))
        if not work:
            ctx.say("nothing to do")
            ctx.emit(rows, RESULT_COLUMNS)
            return 0
        verb = "kill" if any(not j.state.is_final for j in work) else "clean up"
        if not ctx.confirm([f"About to {verb} {len(work)} job(s):", *plan], verb):
            return 0
        who, failed = service.operator(), False
        for job in work:
            try:
                job, notes = self.kill(ctx, job, who, hung)
            except (docker.DockerTimeout, DockerException, OSError) as exc:
                notes, failed = [f"failed: {type(exc).__name__}: {exc}"], True
                ctx.stderr.write(f"{self.name}: {job.id}: {notes[0]}\n")
            rows.append(result_row(job, "; ".join(notes)))
        ctx.emit(rows, RESULT_COLUMNS)
        return 1 if failed else 0

    @staticmethod
    def was_killed(job: Job) -> bool:
        """Killed earlier by jr-kill: a repeat makes sure its worker and container stopped."""
        return job.state.is_final and job.status_code is StatusCode.KILLED_BY_ADMIN

    def plan_for(self, ctx: Context, job: Job, hung: dict[str, str]) -> str | None:
        """What will be done to the job (a phrase for the plan), or None if nothing."""
        if not job.state.is_final:
            return "kill and clean up" if ctx.args.cleanup else "kill"
        if service.hung_objects_of(job.id, hung):
            return None  # calls to a hung container may never return: leave it alone
        if ctx.args.cleanup:
            assert ctx.config is not None
            names = [name for _, name in service.job_objects(ctx.config, job.id)]
            if names:
                return f"remove {', '.join(names)}"
        if self.was_killed(job) and self.unfinished(ctx, job):
            return "finish killing"
        return None

    def unfinished(self, ctx: Context, job: Job) -> bool:
        """An earlier kill was interrupted: worker or container still running, or no log kept."""
        from jobrunner_lib.docker import engine as docker
        from jobrunner_lib.jobs.processes import worker_alive

        if job.worker_pid and worker_alive(job.worker_pid, job.worker_started_at):
            return True
        info = docker.inspect_container(docker.container_name(job.id))
        if info is None:
            return False
        return bool(info["State"].get("Running")) or not self.log_exists(ctx, job)

    def nothing_to_do(self, job: Job, hung: dict[str, str]) -> str:
        """Why a job needs nothing."""
        stuck = service.hung_objects_of(job.id, hung)
        if job.state.is_final and stuck:
            return f"already {self.describe(job)}; left {', '.join(stuck)} alone: flagged hung"
        return f"already {self.describe(job)}: nothing to do"

    def kill(self, ctx: Context, job: Job, who: str, hung: dict[str, str]) -> tuple[Job, list[str]]:
        """Change the row, then stop the worker, then the container; keep the log; clean up."""
        from jobrunner_lib.docker import engine as docker

        before, was = job.state, job
        job, killed = fail_job(ctx.conn, job, who)
        if killed:
            log.info(f"{job.status_message} (was {before.value})", extra={"job": job})
            notes = [f"killed (was {before.value})"]
        else:
            notes = [f"already {self.describe(job)}"]
        if killed or self.was_killed(job):
            stopped = service.stop_worker(job)
            if stopped:
                notes.append(stopped)
        stuck = service.hung_objects_of(job.id, hung)
        if stuck:
            notes.append(
                f"left {', '.join(stuck)} alone: flagged hung (restart Docker to clear it)"
            )
            return job, notes
        if killed or self.was_killed(job):
            name = docker.container_name(job.id)
            info = docker.inspect_container(name)
            if info is not None:
                if info["State"].get("Running"):
                    docker.kill_container(name)
                    notes.append("container stopped")
                    info = docker.inspect_container(name) or info
                if killed or not self.log_exists(ctx, job):
                    notes.append(f"log kept in {keep_log(ctx, job, info, was)}")
        if ctx.args.cleanup:
            assert ctx.config is not None
            removed = service.remove_job_objects(ctx.config, job.id)
            notes.append(
                f"removed {', '.join(removed)}" if removed else "no container or volume left"
            )
            if removed:
                log.info(f"Removed {', '.join(removed)}", extra={"job": job})
        return job, notes

    def log_exists(self, ctx: Context, job: Job) -> bool:
        """Whether the killed job's logs.txt was already written (by an earlier jr-kill)."""
        from jobrunner_lib.jobs.workspaces import log_dir

        assert ctx.config is not None
        base = ctx.config.high_privacy_storage_base
        return (log_dir(base, job.id, job.completed_at or 0) / "logs.txt").exists()

    @staticmethod
    def describe(job: Job) -> str:
        """`failed (killed_by_admin)`, `succeeded`."""
        code = job.status_code.value if job.status_code else ""
        return (
            f"{job.state.value} ({code})" if code and job.state is State.FAILED else job.state.value
        )


def main() -> None:
    """Entry point."""
    run_tool(Kill)
