"""jr-retry: give jobs that failed with an internal error another go, reusing what they left."""

from __future__ import annotations

import argparse

from jobrunner_lib.core.errors import UsageError
from jobrunner_lib.ops.retry import failed_dependants, refusal, resumable, retry

from .common import Context, Tool, run_tool
from .formats import RESULT_COLUMNS, result_row


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
        for outcome in retry(ctx.config, ctx.conn, eligible, with_dependants=with_dependants):
            if not outcome.retried:
                failed = True
                ctx.stderr.write(
                    f"{self.name}: {outcome.job.id} ({outcome.job.action}): {outcome.note}\n"
                )
            rows.append(result_row(outcome.job, outcome.note))
        ctx.emit(rows, RESULT_COLUMNS)
        return 1 if failed else 0


def main() -> None:
    """Entry point."""
    run_tool(Retry)
