"""jr-watch-logs: follow a job's output live, or show a finished job's saved log.

With IDs: each job's container output (followed until the job ends), or for a job whose container
is gone its saved `$HIGH/logs/YYYY-MM/os-job-<id>/logs.txt`. Without IDs: on a terminal, pick
among the running jobs; otherwise follow every running job at once, each line prefixed with its
job ID so the stream can be piped to grep.
"""

from __future__ import annotations

import argparse
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import OperationFailed, UsageError
from jobrunner_lib.core.models import Job, State
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.store import queries as db_queries

from .common import Context, Tool, fzf_pick, run_tool
from .formats import binary, human_age, parse_since

# `docker logs --timestamps` puts an RFC 3339 time and a space before each line.
TIMESTAMP = re.compile(
    rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d) ", re.MULTILINE
)
JOIN_SLICE = 0.2


@dataclass
class Source:
    """Where one job's output comes from: a container (live) or its saved log file."""

    job: Job
    container: str | None = None
    path: Path | None = None


def saved_log(config: Config, job: Job) -> Path | None:
    """The job's saved logs.txt: in its completion month's directory, else wherever a glob finds it."""
    from jobrunner_lib.jobs.workspaces import log_dir  # lazily: only finished jobs need it

    base = config.high_privacy_storage_base
    if job.completed_at:
        path = log_dir(base, job.id, job.completed_at) / "logs.txt"
        if path.is_file():
            return path
    found = sorted(base.glob(f"logs/*/{docker.container_name(job.id)}/logs.txt"))
    return found[-1] if found else None


def running_containers(config: Config, conn: Any) -> list[Job]:
    """Running jobs of this backend's store whose container is running now."""
    jobs = {j.id: j for j in db_queries.active_jobs(conn) if j.state is State.RUNNING}
    if not jobs:
        return []
    found = []
    for container in docker.list_containers(config.backend):
        job_id = (container.get("Labels") or {}).get("org.jr.job-id")
        # The helper container carries the same job label: only the job's own container counts.
        if (
            job_id in jobs
            and container.get("State") == "running"
            and f"/{docker.container_name(job_id)}" in (container.get("Names") or [])
        ):
            found.append(jobs[job_id])
    return sorted(found, key=lambda j: (j.started_at or 0, j.id))


def select_lines(data: bytes, *, timestamps: bool, tail: int | None, since: int | None) -> bytes:
    """Apply -t, --tail and --since to a saved log (whose container lines all carry timestamps)."""
    lines = data.splitlines(keepends=True)
    if since is not None:
        from jobrunner_lib.core.models import iso

        # Same form as the log's times to the second, so the bytes compare in time order.
        cutoff = (iso(since) or "").encode()[:19]
        lines = [line for line in lines if not TIMESTAMP.match(line) or line[:19] >= cutoff]
    if tail is not None:
        lines = lines[-tail:] if tail else []
    text = b"".join(lines)
    return text if timestamps else TIMESTAMP.sub(b"", text)


class Printer:
    """Writes output chunks to stdout, whole lines with a job-ID prefix when several jobs share it."""

    def __init__(self, out: BinaryIO, prefixed: bool):
        self.out, self.prefixed = out, prefixed
        self.lock = threading.Lock()

    def copy(self, job_id: str, chunks: Iterable[bytes]) -> None:
        """Copy a stream of chunks to the output."""
        prefix = f"{job_id} ".encode()
        pending = b""
        for chunk in chunks:
            if not self.prefixed:
                self._write(chunk)
                continue
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if lines:
                self._write(b"".join(prefix + line + b"\n" for line in lines))
        if pending:
            self._write(prefix + pending + b"\n")

    def _write(self, data: bytes) -> None:
        with self.lock:
            self.out.write(data)
            self.out.flush()


class WatchLogs(Tool):
    name = "jr-watch-logs"
    component = "logs"
    description = """Follow running jobs' output live (the container's stdout and stderr) until the job
ends; for a finished job whose container is gone, show its saved log. Without an ID: on a terminal,
pick among the running jobs; otherwise follow every running job at once, each line prefixed with
its job ID. Ctrl-C stops (exit 130)."""
    epilog = """examples:
  jr-watch-logs abcd                  follow job abcd… until it ends
  jr-watch-logs -t --tail 20 abcd     with timestamps, starting from its last 20 lines
  jr-watch-logs --no-follow abcd      what it has printed so far, then exit
  jr-watch-logs                       pick a running job (on a terminal)
  jr-watch-logs | grep -i error       every running job, lines prefixed with the job ID"""
    takes_ids = "*"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "-t", "--timestamps", action="store_true", help="show each line's time (UTC)"
        )
        parser.add_argument(
            "--tail", type=int, metavar="N", help="start from the last N lines (default: all)"
        )
        parser.add_argument(
            "--since", metavar="AGE|DATE", help="only lines since: 30m, 2h, 1d or 2021-11-03"
        )
        parser.add_argument(
            "--no-follow", action="store_true", help="print what there is so far, then exit"
        )

    def run(self, ctx: Context) -> int:
        args = ctx.args
        if args.tail is not None and args.tail < 0:
            raise UsageError(f"--tail {args.tail}: expected a number of lines, 0 or more")
        since = parse_since(args.since) if args.since else None
        if args.ids:
            return self.watch(ctx, ctx.resolve_jobs(args.ids), since)
        assert ctx.config is not None
        docker.ping()
        running = running_containers(ctx.config, ctx.conn)
        if not running:
            raise OperationFailed("No running jobs found")
        if ctx.interactive:
            running = self.pick_running(running)
            prefixed = len(running) > 1
        else:
            prefixed = True  # a pipe gets the same shape however many jobs run
            ctx.say(f"following {len(running)} running job(s): " + ", ".join(j.id for j in running))
        sources = [Source(job, container=docker.container_name(job.id)) for job in running]
        return self.show(ctx, sources, since, prefixed=prefixed)

    def pick_running(self, running: Sequence[Job]) -> list[Job]:
        """An fzf picker of running jobs (TAB marks several); never empty, only on a terminal."""
        now = time.time()
        lines = [
            f"{j.id}  {j.action}  {j.workspace}  {human_age(now - (j.started_at or now))}"
            for j in running
        ]
        ids = set(
            fzf_pick(
                lines, prompt="watch> ", header="id  action  workspace  running for", multi=True
            )
        )
        return [j for j in running if j.id in ids]

    def watch(self, ctx: Context, jobs: Sequence[Job], since: int | None) -> int:
        """Show the named jobs; with several (a request), skip those without output, saying so."""
        if len(jobs) == 1:
            return self.show(ctx, [self.source(ctx, jobs[0])], since, prefixed=False)
        sources, skipped = [], 0
        for job in jobs:
            try:
                sources.append(self.source(ctx, job))
            except OperationFailed as exc:
                ctx.stderr.write(f"{self.name}: {exc}\n")
                skipped += 1
        if not sources:
            raise OperationFailed(f"none of the {len(jobs)} jobs has any output yet")
        code = self.show(ctx, sources, since, prefixed=True)
        return 1 if skipped else code

    def source(self, ctx: Context, job: Job) -> Source:
        """Where to read a job's output: its container, else its saved log; fail if neither exists."""
        assert ctx.config is not None
        # A finished job's saved log is its complete record (with the trailer) and needs no Docker.
        path = saved_log(ctx.config, job) if job.state.is_final else None
        if path is not None:
            return Source(job, path=path)
        name = docker.container_name(job.id)
        info = docker.inspect_container(name)
        # A created container has not started: following it would end at once, saying nothing.
        if info is not None and (job.state.is_final or info["State"].get("Status") != "created"):
            return Source(job, container=name)
        if not job.state.is_final:
            raise OperationFailed(
                f"job {job.id} has no output yet: it is {job.state.value} "
                f"({job.status_message or 'no status'})"
            )
        raise OperationFailed(
            f"job {job.id} has no container and no saved log under "
            f"{ctx.config.high_privacy_storage_base / 'logs'}"
        )

    def show(
        self, ctx: Context, sources: Sequence[Source], since: int | None, *, prefixed: bool
    ) -> int:
        """Print saved logs, then stream every container (a thread each) until all have ended."""
        args = ctx.args
        printer = Printer(binary(ctx.stdout), prefixed)
        for src in sources:
            if src.path is not None:
                data = select_lines(
                    src.path.read_bytes(), timestamps=args.timestamps, tail=args.tail, since=since
                )
                printer.copy(src.job.id, [data])
        live = [src for src in sources if src.container is not None]
        if not live:
            return 0
        follow = not args.no_follow
        if len(live) == 1:
            self.stream(ctx, printer, live[0], since, follow)
            return 0
        errors: list[BaseException] = []

        def pump(src: Source) -> None:
            try:
                self.stream(ctx, printer, src, since, follow)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                errors.append(exc)

        threads = [
            threading.Thread(target=pump, args=(src,), name=f"logs {src.job.id}", daemon=True)
            for src in live
        ]
        for thread in threads:
            thread.start()
        # Joined in slices so Ctrl-C reaches the main thread at once (the streams are daemons).
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(JOIN_SLICE)
            if any(isinstance(e, BrokenPipeError) for e in errors):
                raise BrokenPipeError()
        if errors:
            raise errors[0]
        return 0

    def stream(
        self, ctx: Context, printer: Printer, src: Source, since: int | None, follow: bool
    ) -> None:
        """Copy one container's output (following it while it runs)."""
        assert src.container is not None
        args = ctx.args
        chunks = docker.container_logs(
            src.container,
            follow=follow,
            timestamps=args.timestamps,
            tail="all" if args.tail is None else args.tail,
            since=since,
        )
        printer.copy(src.job.id, chunks)
        if follow:
            ctx.say(f"job {src.job.id}: its container has stopped")


def main() -> None:
    """Entry point."""
    run_tool(WatchLogs)
