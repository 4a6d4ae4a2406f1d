"""jr-run-once: one pass of the run loop; prints one row per job state change it made."""

from __future__ import annotations

import logging
import os
import re
import signal
import sqlite3

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import TemporaryFailure
from jobrunner_lib.core.logs import squash_whitespace
from jobrunner_lib.core.values import docker_host
from jobrunner_lib.jobs.locks import holding_run_lock
from jobrunner_lib.jobs.outage import keep_reserve, release_reserve, store_full, store_unusable
from jobrunner_lib.jobs.run import Change, run_pass

from .common import Context, Tool, run_tool

log = logging.getLogger(__name__)

COLUMNS = ["id", "action", "workspace", "from", "to", "status_code", "message"]


def check_docker(config: Config) -> None:
    """Raise TemporaryFailure (exit 75) unless the Docker engine answers."""
    from jobrunner_lib.docker import engine as jr_docker

    unreachable: tuple[type[BaseException], ...] = (jr_docker.DockerUnavailable, OSError)
    try:
        # A local socket is pinged without importing the SDK (a pass that starts nothing
        # needs no more of Docker); any other DOCKER_HOST through the SDK.
        if not jr_docker.ping_socket():
            import requests
            from docker.errors import DockerException

            unreachable += (DockerException, requests.RequestException)  # read on raising
            jr_docker.ping()
    except unreachable as exc:
        raise TemporaryFailure(
            f"Docker is not reachable ({docker_host()}: {root_cause(exc)}): "
            "is the Docker service running?"
        ) from None


def _error_name(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f", {name}" if name else ""


def root_cause(exc: BaseException) -> str:
    """The most specific reason in an exception chain, e.g. `No such file or directory`.

    The SDK wraps the OS error two or three times (`Error while fetching server API version:
    ('Connection aborted.', FileNotFoundError(2, ...))`); an operator needs only the last part.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        pending.extend(a for a in current.args if isinstance(a, BaseException))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    text = re.sub(r"^Docker is not available( \([^)]*\))?:\s*", "", squash_whitespace(str(exc)))
    return text or type(exc).__name__


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
        if os.environ.get("JR_IGNORE_SIGINT") == "1":
            # Set by service/jr-service: a Ctrl-C meant for the service (on Windows the console
            # delivers it to every attached process) must not cut a pass short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        config = ctx.config
        assert config is not None
        busy = f"another jr-run-once is running (lock {config.run_lock_path}); try again later"
        with holding_run_lock(config, 0, busy):
            changes = self.one_pass(ctx, config)
        ctx.emit([change.row() for change in changes], COLUMNS)
        return 0

    @staticmethod
    def one_pass(ctx: Context, config: Config) -> list[Change]:
        """One pass, holding the run lock; a full or broken state store is a TemporaryFailure."""
        try:
            check_docker(config)
            keep_reserve(config)  # before any job this pass starts can fill the disk
            try:
                changes = run_pass(config, ctx.conn)
            except sqlite3.Error as exc:
                if not (store_full(exc) and release_reserve(config)):
                    raise
                # Room to record what happened, e.g. the job whose volume filled the disk.
                log.warning("The state store's disk is full: freed its reserve to carry on")
                changes = run_pass(config, ctx.conn)
        except sqlite3.Error as exc:
            if not store_unusable(exc) or "locked" in str(exc) or "busy" in str(exc):
                raise  # a busy store is reported by the common error mapping
            # Nothing was half-done: every change is its own transaction, rolled back by SQLite.
            raise TemporaryFailure(
                f"cannot write the state store {config.db_path} ({squash_whitespace(str(exc))}"
                f"{_error_name(exc)}): is its disk full? The next pass tries again"
            ) from None
        return changes


def main() -> None:
    """Entry point."""
    run_tool(RunOnce)
