"""jr-run-once: one pass of the run loop; prints one row per job state change it made."""

from __future__ import annotations

import os
import re
import signal

from ..config import Config
from ..errors import TemporaryFailure
from ..logs import one_line
from ..run import run_pass
from .common import Context, Tool, run_tool

COLUMNS = ["id", "action", "workspace", "from", "to", "status_code", "message"]


def check_docker(config: Config) -> None:
    """Raise TemporaryFailure (exit 75) unless the Docker engine answers."""
    import inspect

    import requests  # lazily: only a real pass needs them
    from docker.errors import DockerException

    from .. import docker as jr_docker

    unreachable = (jr_docker.DockerUnavailable, DockerException, requests.RequestException, OSError)
    try:
        # The run contract has ping(config); accept the config-free form too.
        if inspect.signature(jr_docker.ping).parameters:
            jr_docker.ping(config)  # type: ignore[call-arg]
        else:
            jr_docker.ping()
    except unreachable as exc:
        reason = re.sub(r"^Docker is not available( \([^)]*\))?:\s*", "", one_line(str(exc)))
        raise TemporaryFailure(
            f"Docker is not reachable ({reason or type(exc).__name__}): "
            "is the Docker service running?"
        ) from None


class RunOnce(Tool):
    name = "jr-run-once"
    component = "run"
    description = """One pass of the run loop: start pending jobs whose dependencies are met while
capacity (MAX_WORKERS, job-resource weights) allows, fail jobs whose dependencies failed or that
were cancelled before starting, and restart dead or stalled job workers. The slow work happens in
detached worker processes; this pass only decides, so it returns in well under a second.
Prints one row per job state change. Exit 75 if another pass holds the lock or Docker is down."""
    epilog = """examples:
  jr-run-once                       one pass; what changed, as a table on a terminal
  jr-run-once -o ids                just the ids of the jobs that changed
  service/jr-service                the service loop (jr-sync, then jr-run-once, repeated)"""
    output = True

    def run(self, ctx: Context) -> int:
        from filelock import FileLock, Timeout  # lazily: keeps --help fast

        if os.environ.get("JR_IGNORE_SIGINT") == "1":
            # Set by service/jr-service: a Ctrl-C meant for the service (on Windows the console
            # delivers it to every attached process) must not cut a pass short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        config = ctx.config
        assert config is not None
        config.workdir.mkdir(parents=True, exist_ok=True)
        lock_path = config.run_lock_path
        lock = FileLock(str(lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise TemporaryFailure(
                f"another jr-run-once is running (lock {lock_path}); try again later"
            ) from None
        try:
            check_docker(config)
            changes = run_pass(config, ctx.conn)
        finally:
            lock.release()
        ctx.emit([change.row() for change in changes], COLUMNS)
        return 0


def main() -> None:
    """Entry point."""
    run_tool(RunOnce)
