"""jr-mount: look inside a job: its volume at /workspace and, while it runs, its processes.

Starts a helper container (TOOLS_IMAGE: busybox + strace) with the job's volume at
/workspace (the working directory) sharing the job container's PID namespace, so `ps faux` and
`strace -fyp PID` see the job's processes. Without a command: an interactive shell on the
terminal. With `-- CMD...`: runs CMD, passes on its stdout, stderr and exit code. The helper is
removed on exit either way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any, TextIO

from jobrunner_lib.core import ids
from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import AmbiguousError, OperationFailed, UsageError
from jobrunner_lib.core.models import Job
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker import mounts, volumes
from jobrunner_lib.store import queries as db_queries

from .common import Context, Tool, run_tool
from .formats import binary, is_terminal


def jobs_with_volumes(config: Config, conn: Any) -> list[Job]:
    """Jobs of this store whose volume exists, newest first."""
    job_ids = set(volumes.host_volumes(config))
    for volume in docker.list_volumes(config.backend):
        job_id = (volume.get("Labels") or {}).get("org.jr.job-id")
        if job_id and volume.get("Name") == docker.volume_name(job_id):
            job_ids.add(job_id)
    jobs = db_queries.get_jobs(conn, sorted(job_ids))
    return sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)


def no_volume_reason(job: Job) -> str:
    """Why a job has no volume, in the operator's terms."""
    if job.state.is_final:
        return f"it is {job.state.value} and its volume was removed when it finished"
    return f"it is {job.state.value} ({job.status_message or 'no status'}) and has not been prepared yet"


class Mount(Tool):
    name = "jr-mount"
    component = "mount"
    description = """Open a shell (or run a command) in a helper container (with CAP_SYS_PTRACE) that has the job's
volume at /workspace and shares the job container's processes, so `ps faux` and `strace -fyp PID`
work on the job. Also works on a finished job whose volume was kept (then without its processes).
The helper is removed when the shell or command ends; jr-mount exits with its exit code."""
    epilog = """examples:
  jr-mount abcd                       a shell in job abcd…'s volume (needs a terminal)
  jr-mount abcd -- ls -la             list the job's files
  jr-mount abcd -- ps faux            the job's processes
  jr-mount abcd -- strace -fyp 7      what process 7 of the job is doing (Ctrl-C stops)
  jr-mount abcd -- cat output/x.log | less"""
    takes_ids = "*"

    def __init__(self) -> None:
        self.command: list[str] = []

    def build_parser(self) -> argparse.ArgumentParser:
        """The shared parser, with the `-- CMD...` tail shown in the usage line."""
        parser = super().build_parser()
        parser.usage = "%(prog)s [-h] [-v | -q] [--pick] [ID] [-- CMD...]"
        return parser

    def main(self, argv: Sequence[str] | None = None, **streams: Any) -> int:
        """Split off `-- CMD...` (argparse would mix it with the ID), then run as every tool does."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if "--" in argv:
            cut = argv.index("--")
            self.command, argv = argv[cut + 1 :], argv[:cut]
        return super().main(argv, **streams)

    def run(self, ctx: Context) -> int:
        config = ctx.config
        assert config is not None
        shell = not self.command
        job = self.choose_job(ctx, config)
        if shell:
            self.check_terminal(ctx)
        if not volumes.exists(config, job.id):
            raise OperationFailed(f"job {job.id} has no volume to mount: {no_volume_reason(job)}")
        if not docker.image_exists(config.tools_image):
            raise OperationFailed(
                f"image {config.tools_image} (TOOLS_IMAGE) is not available: "
                "run scripts/build-images, or pull it"
            )
        target = docker.container_name(job.id)
        info = docker.inspect_container(target)
        running = bool(info and info["State"].get("Running"))
        if not running:
            ctx.say(
                f"job {job.id} is {job.state.value} and its container is not running: "
                "mounting its volume only (no processes to see)"
            )
        name = mounts.mount_name(job.id)
        mounts.create_mount_container(
            config.backend,
            job.id,
            name,
            image=config.tools_image,
            source=docker.workspace_source(config, job.id),  # a Docker volume or a host directory
            command=self.command or ["sh"],
            pid_of=target if running else None,
            shell=shell,
        )
        try:
            if shell:
                ctx.say(f"{name}: the job's volume is at /workspace; `exit` ends the shell")
                return self.attach_shell(name)
            return self.run_command(ctx, name)
        finally:
            docker.remove_container(name)

    def check_terminal(self, ctx: Context) -> None:
        """An interactive shell needs a real terminal (or winpty under mintty)."""
        if is_terminal(ctx.stdin) and is_terminal(ctx.stdout):
            return
        if os.name == "nt" and shutil.which("winpty"):
            return  # git-bash's mintty: attach through winpty
        raise UsageError(
            "an interactive shell needs a terminal: give a command after --, "
            "e.g. jr-mount ID -- ls -la"
        )

    def choose_job(self, ctx: Context, config: Config) -> Job:
        """The one job to mount: from the ID arguments, or picked among jobs with a volume."""
        args = ctx.args
        if args.ids:
            jobs = ctx.resolve_jobs(args.ids)
            if len(jobs) == 1:
                return jobs[0]
            # A request ID stands for all its jobs: only those with a volume can be mounted.
            docker.ping()
            candidates = [j for j in jobs if volumes.exists(config, j.id)]
            if not candidates:
                raise OperationFailed(
                    f"none of the {len(jobs)} jobs matching {' '.join(args.ids)} "
                    "has a volume to mount"
                )
            return self.pick(ctx, " ".join(args.ids), candidates)
        docker.ping()
        candidates = jobs_with_volumes(config, ctx.conn)
        if not candidates:
            raise OperationFailed(
                "No job has a volume to mount (finished jobs' volumes are removed)"
            )
        if not ctx.interactive:
            listing = "\n".join(
                f"  {ids.Target('job', j.id, (j,)).describe()}" for j in candidates[:50]
            )
            raise UsageError(f"give the ID of the job to mount; jobs with a volume:\n{listing}")
        # Like the old tool's menu: without an ID, always show what is being mounted.
        return self.pick(ctx, "mount", candidates, always=True)

    def pick(self, ctx: Context, label: str, jobs: Sequence[Job], *, always: bool = False) -> Job:
        """One of several jobs: the picker on a terminal, else exit 4 listing them."""
        if len(jobs) == 1 and not always:
            return jobs[0]
        targets = [ids.Target("job", j.id, (j,)) for j in jobs]
        if not ctx.interactive:
            listing = "\n".join(f"  {t.describe()}" for t in targets[:50])
            raise AmbiguousError(
                f"'{label}' matches {len(jobs)} jobs with a volume; give one job ID "
                f"or use --pick:\n{listing}"
            )
        return ctx.pick(label, targets).jobs[0]

    def attach_shell(self, name: str) -> int:
        """Hand the terminal to the helper's shell through the docker CLI (it owns raw TTY mode)."""
        docker_cli = shutil.which("docker")
        if docker_cli is None:
            raise OperationFailed(
                "the docker command is needed for an interactive shell; "
                "or give a command after --, e.g. jr-mount ID -- ls -la"
            )
        prefix = (
            [shutil.which("winpty") or "winpty"]
            if os.name == "nt" and not sys.stdin.isatty()
            else []
        )
        return subprocess.call([*prefix, docker_cli, "start", "--attach", "--interactive", name])

    def run_command(self, ctx: Context, name: str) -> int:
        """Start the helper, pass its stdout and stderr on as they come, return its exit code."""
        docker.start_container(name)
        errors: list[BaseException] = []
        stderr_copy = threading.Thread(
            target=self._copy,
            args=(name, "stderr", ctx.stderr, errors),
            name="stderr",
            daemon=True,
        )
        stderr_copy.start()
        self._copy(name, "stdout", ctx.stdout, errors)
        stderr_copy.join(30)
        if errors:
            raise errors[0]
        return mounts.wait_exit(name)

    @staticmethod
    def _copy(name: str, which: str, stream: TextIO, errors: list[BaseException]) -> None:
        out = binary(stream)
        try:
            # Logs, not attach: the SDK lifts its read timeout for log streams only, and a
            # quiet `strace` may say nothing for minutes.
            for chunk in docker.container_logs(
                name,
                follow=True,
                timestamps=False,
                stdout=which == "stdout",
                stderr=which == "stderr",
            ):
                out.write(chunk)
                out.flush()
        except Exception as exc:  # noqa: BLE001 - reported by the caller (Ctrl-C passes through)
            errors.append(exc)


def main() -> None:
    """Entry point."""
    run_tool(Mount)
