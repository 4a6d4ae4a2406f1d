"""jr-kill: stop jobs for good. A pending job never starts; a running one is killed, its log kept."""

from __future__ import annotations

import argparse

from jobrunner_lib.core.errors import UsageError
from jobrunner_lib.ops import kill as ops_kill
from jobrunner_lib.ops import objects as service

from .common import Context, Tool, run_tool
from .formats import RESULT_COLUMNS, result_row


class Kill(Tool):
    name = "jr-kill"
    component = "kill"
    description = """Kill jobs: a pending job never starts; a running job's worker and container
are stopped and the container's log is kept in $HIGH/logs/YYYY-MM/os-job-<id>/. Both end failed
(killed_by_admin, "Killed by admin", as the website shows it; who killed it is in jr's log); a job the user had cancelled
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
        if ops_kill.needs_docker(jobs, args.cleanup):
            docker.ping()  # before any change: a half-done kill is worse than none
        assert ctx.config is not None
        hung = service.hung_containers(ctx.conn)
        plan, work, rows = [], [], []
        for job in jobs:
            what = ops_kill.plan(ctx.config, job, hung, args.cleanup)
            if what:
                plan.append(
                    f"  {what}: {job.id}  {job.action}  ({job.workspace}, {job.state.value})"
                )
                work.append(job)
            else:
                rows.append(result_row(job, ops_kill.nothing_to_do(job, hung)))
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
                job, notes = ops_kill.kill_job(
                    ctx.config, ctx.conn, job, who, hung, cleanup=args.cleanup
                )
            except (docker.DockerTimeout, DockerException, OSError) as exc:
                notes, failed = [f"failed: {type(exc).__name__}: {exc}"], True
                ctx.stderr.write(f"{self.name}: {job.id}: {notes[0]}\n")
            rows.append(result_row(job, "; ".join(notes)))
        ctx.emit(rows, RESULT_COLUMNS)
        return 1 if failed else 0


def main() -> None:
    """Entry point."""
    run_tool(Kill)
