"""jr-reboot-prep: get the backend ready for a host or Docker restart, without researchers noticing.

Default: with the service stopped, every running job is stopped and put back to pending, so it
starts again from scratch after the reboot. --drain instead pauses the backend and waits for the
running jobs to finish; --resume lifts the pause.
"""

from __future__ import annotations

import argparse
import time

from jobrunner_lib.core.errors import TemporaryFailure, UsageError
from jobrunner_lib.core.models import State
from jobrunner_lib.ops import objects as service
from jobrunner_lib.ops import reboot
from jobrunner_lib.store import queries as db_queries

from .common import Context, Tool, run_tool
from .formats import RESULT_COLUMNS, result_row

POLL_SECONDS = 0.5
PROGRESS_SECONDS = 10.0


class RebootPrep(Tool):
    name = "jr-reboot-prep"
    component = "boot"
    description = """Prepare the backend for a reboot (of the host or of Docker).

Default (the service must be stopped, or --force): for every running job, kill its worker,
remove its container and volume and put it back to pending (waiting_on_reboot), so after the
reboot it starts again from scratch and the researcher need do nothing.

--drain: pause the backend (no new job starts; the service may keep running), wait until the
running jobs have finished, then report ready (exit 0); with --timeout, give up after that long
(exit 75, listing the jobs still running; the backend stays paused). --resume lifts the pause.
Neither needs --yes: both are undone by the other."""
    epilog = """examples:
  jr-reboot-prep --drain --timeout 2h     pause and wait for running jobs to finish
  jr-reboot-prep                          (service stopped) stop running jobs; they restart later
  jr-reboot-prep --resume                 after the reboot: let pending jobs start again"""
    output = True
    destructive = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument(
            "--drain", action="store_true", help="pause, then wait until no job is running"
        )
        mode.add_argument("--resume", action="store_true", help="lift the pause")
        parser.add_argument(
            "--timeout",
            metavar="D",
            help="with --drain: give up after D (e.g. 30m, 2h; default: wait forever)",
        )
        parser.add_argument(
            "--force", action="store_true", help="go ahead even though the service is running"
        )

    def run(self, ctx: Context) -> int:
        args = ctx.args
        if args.timeout is not None and not args.drain:
            raise UsageError("--timeout only goes with --drain")
        if args.resume:
            return self.resume(ctx)
        if args.drain:
            timeout = service.parse_duration(args.timeout, "--timeout") if args.timeout else None
            return self.drain(ctx, timeout)
        return self.stop_running(ctx)

    # -- default: stop running jobs and put them back to pending --

    def stop_running(self, ctx: Context) -> int:
        from jobrunner_lib.docker import engine as docker

        config = ctx.config
        assert config is not None
        pid = service.service_pid(config)
        if pid is not None and not ctx.args.force:
            raise TemporaryFailure(
                f"the service is running (pid {pid}); stop it first, or use --drain, or --force"
            )
        active = db_queries.active_jobs(ctx.conn)
        running = [j for j in active if j.state is State.RUNNING]
        if running:
            docker.ping()
        try:
            leftovers = reboot.pending_leftovers(config, ctx.conn, active)
        except docker.DockerUnavailable:
            leftovers = []  # with nothing running, a stopped Docker holds nothing of ours to clear
        if not running and not leftovers:
            ctx.say("nothing to do: no job is running")
            ctx.emit([], RESULT_COLUMNS)
            return 0
        plan = [f"About to stop {len(running)} running job(s) and put them back to pending:"]
        plan += [f"  {j.id}  {j.action}  ({j.workspace}): {j.status_message}" for j in running]
        plan.append("Their containers and volumes are removed; they start again after the reboot.")
        if leftovers:
            plan.append(f"Also removing what {len(leftovers)} pending job(s) left in Docker:")
            plan += [f"  {j.id}  {j.action}  ({j.workspace})" for j in leftovers]
        if not ctx.confirm(plan, "stop the running jobs"):
            return 0
        rows, failed = [], False
        for outcome in reboot.reset_all(config, ctx.conn, running + leftovers):
            if outcome.failed:
                failed = True
                ctx.stderr.write(f"{self.name}: {outcome.job.id}: {outcome.notes[-1]}\n")
            rows.append(result_row(outcome.job, "; ".join(outcome.notes)))
        ctx.emit(rows, RESULT_COLUMNS)
        after = "start the service"
        if reboot.paused(ctx.conn) is not None:
            after += " and run jr-reboot-prep --resume (the backend is paused)"
        ctx.say(f"ready for reboot: after it, {after}; these jobs then start again by themselves")
        return 1 if failed else 0

    # -- --drain and --resume --

    def drain(self, ctx: Context, timeout: float | None) -> int:
        config = ctx.config
        assert config is not None
        if ctx.args.dry_run:
            ctx.say(
                "dry run: would pause the backend (no new job starts) and wait until no job is "
                f"running; {len(reboot.running_jobs(ctx.conn))} running now"
            )
            return 0
        since, already = reboot.pause(ctx.conn)
        if already:
            ctx.say(f"already paused ({since}); waiting for running jobs to finish")
        else:
            ctx.say(
                f"paused: draining for reboot {since}; no new job starts "
                "(jr-reboot-prep --resume lifts it)"
            )
        started = time.monotonic()
        last_progress = started
        try:
            while True:
                running = reboot.running_jobs(ctx.conn)
                if not running and reboot.idle_under_lock(config, ctx.conn):
                    break
                waited = time.monotonic() - started
                if timeout is not None and waited >= timeout:
                    listing = "\n".join(
                        f"  {j.id}  {j.action}  ({j.workspace}): {j.status_message}"
                        for j in running
                    )
                    raise TemporaryFailure(
                        f"timed out after {service.human_duration(waited)} with {len(running)} "
                        f"job(s) still running (the backend stays paused):\n{listing}"
                    )
                if time.monotonic() - last_progress >= PROGRESS_SECONDS:
                    last_progress = time.monotonic()
                    ids = " ".join(j.id for j in running[:5]) + (" ..." if len(running) > 5 else "")
                    ctx.say(
                        f"draining: {len(running)} job(s) still running ({ids}); "
                        f"waited {service.human_duration(waited)}"
                    )
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            ctx.stderr.write(
                f"{self.name}: stopped waiting; the backend stays paused "
                "(jr-reboot-prep --resume lifts it)\n"
            )
            raise
        pending = reboot.pending_count(ctx.conn)
        ctx.say(
            f"ready for reboot: no jobs running; {pending} pending jobs will start after "
            "jr-reboot-prep --resume"
        )
        return 0

    def resume(self, ctx: Context) -> int:
        current = reboot.paused(ctx.conn)
        if current is None:
            ctx.say("not paused: nothing to do")
            return 0
        if ctx.args.dry_run:
            ctx.say(f"dry run: would lift the pause (paused {current})")
            return 0
        reboot.resume(ctx.conn)
        pending = reboot.pending_count(ctx.conn)
        ctx.say(
            f"resumed: lifted the pause (paused {current}); {pending} pending jobs may start now"
        )
        return 0


def main() -> None:
    """Entry point."""
    run_tool(RebootPrep)
