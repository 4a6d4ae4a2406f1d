"""jr-sync: one sync pass with the jobs website; prints the jobs it created or newly reported."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import ConfigError, OperationFailed, TemporaryFailure
from jobrunner_lib.core.flags import Flag
from jobrunner_lib.jobs.sync import SyncResult, display_endpoint, sync_pass
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.website.client import (
    JobServerBadResponse,
    JobServerClient,
    JobServerError,
    JobServerUnavailable,
)

from .common import Context, Tool, run_tool

log = logging.getLogger(__name__)

COLUMNS = ["id", "request", "action", "state", "status_code"]
NO_WEBSITE = "No jobs website configured (JOB_SERVER_ENDPOINT is unset): nothing to sync"
LOCK_NAME = "jr-sync.lock"


class Sync(Tool):
    name = "jr-sync"
    component = "sync"
    description = (
        "One sync pass with the jobs website: fetch the active job requests, flag cancelled "
        "jobs, post every job's status, then create the jobs of new requests. Prints one row "
        "per job it created or whose new status it posted (nothing printed: nothing changed)."
    )
    epilog = """examples:
  jr-sync                 one pass (the service runs this every POLL_INTERVAL)
  jr-sync -v              the same, logging each HTTP call and what was posted
  jr-sync -o ids          only the ids of the jobs that changed

exit codes: 0 done, 75 the website is unreachable or another jr-sync is running (retry later),
78 the website refused JOB_SERVER_TOKEN, 1 the website's reply could not be used."""
    output = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--announce",
            action="store_true",
            help="log the endpoint at INFO (for the first pass of a service)",
        )

    def run(self, ctx: Context) -> int:
        config = ctx.config
        assert config is not None
        if not config.has_job_server:
            log.info(NO_WEBSITE)
            return 0
        assert config.job_server_endpoint and config.job_server_token
        if not ctx.args.verbose:
            # urllib3 warns on every retry; the one line for a failed pass already names the cause.
            logging.getLogger("urllib3").setLevel(logging.ERROR)
        if ctx.args.announce:
            log.info("Polling for JobRequests at: %s", display_endpoint(config.job_server_endpoint))
        deadline = time.monotonic() + config.sync_time_limit
        conn = ctx.conn

        def flags() -> Iterable[Flag]:
            # Every call carries the backend's flags as they are then (the Flags header).
            return store_flags.backend_flags(conn).values()

        with _single_pass(config), _client(config, flags) as client:
            try:
                result = sync_pass(config, ctx.conn, client, deadline=deadline)
            except JobServerError as exc:
                # Jobs created before the website went away are still news for the service loop.
                partial = getattr(exc, "sync_result", None)
                if partial is not None:
                    self.emit(ctx, partial)
                raise _tool_error(exc) from None
        self.emit(ctx, result)
        return 0

    @staticmethod
    def emit(ctx: Context, result: SyncResult) -> None:
        """One row per changed job; nothing at all (not even a header) when nothing changed."""
        if not result.changed:
            return
        rows = [
            {
                "id": j.id,
                "request": j.job_request_id,
                "action": j.action,
                "state": j.state.value,
                "status_code": j.status_code.value if j.status_code else "",
            }
            for j in result.changed.values()
        ]
        ctx.emit(rows, COLUMNS)


def _client(config: Config, flags: Callable[[], Iterable[Flag]]) -> JobServerClient:
    try:
        return JobServerClient(
            config.job_server_endpoint or "",
            config.job_server_token or "",
            config.backend,
            total_limit=config.sync_time_limit,
            flags=flags,
        )
    except ValueError as exc:  # the client's own checks of the endpoint and token
        raise ConfigError(str(exc)) from None


def _tool_error(exc: JobServerError) -> Exception:
    """The one line (and exit code) an operator sees for a failed pass."""
    if isinstance(exc, JobServerUnavailable):
        if exc.status_code is not None:  # it answered: reachable, but failing
            return TemporaryFailure(f"{exc}; will retry")
        return TemporaryFailure(f"the jobs website is unreachable ({exc}); will retry")
    if isinstance(exc, JobServerBadResponse):
        return OperationFailed(
            f"the jobs website sent a reply jr cannot use ({exc}); check JOB_SERVER_ENDPOINT"
        )
    return exc  # auth errors (78, naming JOB_SERVER_TOKEN) and other refusals (1) say enough


@contextmanager
def _single_pass(config: Config) -> Iterator[None]:
    """Hold the sync lock: two passes at once would fetch and create the same requests twice."""
    from filelock import FileLock, Timeout  # lazily: only a real pass needs it

    path = config.workdir / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise TemporaryFailure(
            f"another jr-sync is running (it holds {path}); will retry"
        ) from None
    try:
        yield
    finally:
        lock.release()


def main() -> None:
    """Entry point."""
    run_tool(Sync)
