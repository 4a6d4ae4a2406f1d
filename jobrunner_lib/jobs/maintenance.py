"""The database maintenance check (docs/lifecycle.md#database-maintenance): sets and clears
`mode=db-maintenance` from the database's own answer, as upstream's maintenance thread does.

While `mode` is db-maintenance (or manual-db-maintenance is set), the run pass keeps database
jobs pending and stops the running ones (jobs/run.py). With MAINTENANCE_CHECK_IMAGE set, the
check runs every MAINTENANCE_CHECK_INTERVAL: a run pass that finds it due records the time and
starts it as a detached process (`python -m jobrunner_lib.jobs.maintenance`), because it runs a
container that talks to the database, which takes seconds or more. A run pass must stay well under
a second; a sync pass is bounded by SYNC_TIME_LIMIT and does not run at all without a jobs
website (or while the website is down, when the check matters just as much).

The check does what upstream's `maintenance_mode()` does: with manual-db-maintenance set, `mode`
becomes db-maintenance without asking the database. Otherwise the image runs
MAINTENANCE_CHECK_COMMAND (`{current_mode}` replaced by the mode now, `None` when unset) with the
database's network and DATABASE_URL, as a database job gets them; if the last line of its
standard output contains `db-maintenance` the mode is set, otherwise it is cleared. A check that
cannot get an answer (a missing image, a non-zero exit, Docker trouble, CHECK_TIMEOUT) changes
nothing and says why in the log. It never touches manual-db-maintenance, and never clears `mode`
while manual-db-maintenance is on (read in the same transaction as the write).
"""

from __future__ import annotations

import logging
import os
import shlex
import sqlite3
import sys
import time
from collections.abc import Callable

from jobrunner_lib.core import flags as core_flags
from jobrunner_lib.core import logs
from jobrunner_lib.core.config import MAINTENANCE_CHECK_DATABASES, Config, load_config
from jobrunner_lib.core.errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_TEMPFAIL,
    ConfigError,
    JobError,
    JrError,
)
from jobrunner_lib.core.models import iso
from jobrunner_lib.jobs.outage import store_unusable
from jobrunner_lib.store import flags as store_flags

log = logging.getLogger(__name__)

# Internal flag (never sent to the website): when the last check started or ended, and how it went.
CHECK_FLAG = "maintenance-check"
# A check still running after this long is killed: it counts as a failed check.
CHECK_TIMEOUT = 300.0
ROLE = "maintenance-check"
LOCK_NAME = "maintenance-check.lock"

Spawn = Callable[..., tuple[int, float]]


class CheckFailed(JrError):
    """The database's answer could not be had; the flags are left as they are."""


def last_check(conn: sqlite3.Connection) -> core_flags.Flag | None:
    """When the last check started or ended, and how it went (None: never)."""
    return store_flags.flag_rows(conn, [CHECK_FLAG]).get(CHECK_FLAG)


def due(config: Config, conn: sqlite3.Connection, now: float) -> bool:
    """A check is configured and none has started or ended within the interval."""
    if not config.maintenance_check_image:
        return False
    last = last_check(conn)
    if last is None or last.timestamp is None:
        return True
    # A clock set back must not stop the checks.
    return not 0 <= now - last.timestamp < config.maintenance_check_interval


def start_if_due(
    config: Config,
    conn: sqlite3.Connection,
    *,
    now: Callable[[], float] = time.time,
    spawn: Spawn | None = None,
) -> int | None:
    """Start the check (detached) if it is due; its pid, or None. Called by every run pass,
    which holds the run lock, so two passes never start it twice."""
    at = now()
    if not due(config, conn, at):
        return None
    store_flags.put_flag(conn, CHECK_FLAG, f"started {iso(at)}", at=at)
    if spawn is None:
        from jobrunner_lib.jobs.processes import spawn_detached

        spawn = spawn_detached
    try:
        pid, _ = spawn(config, "jobrunner_lib.jobs.maintenance")
    except OSError:
        log.exception("Could not start the database maintenance check (tried again later)")
        return None
    log.debug("Started the database maintenance check (pid %d)", pid)
    return pid


def check(config: Config, conn: sqlite3.Connection) -> tuple[str | None, bool]:
    """Check once and set `mode` from the answer; (the mode now, whether it changed).

    Raises CheckFailed (nothing changed) when the database's answer could not be had.
    """
    log.info("checking if db undergoing maintenance...")
    flags = store_flags.backend_flags(conn)
    manual = flags.get(core_flags.MANUAL_DB_MAINTENANCE)
    if manual is not None and core_flags.is_on(manual.value):
        # Manually set: the database is not asked (upstream's manual override).
        log.info(f"manually set db mode: {core_flags.DB_MAINTENANCE}")
        new: str | None = core_flags.DB_MAINTENANCE
    else:
        mode = flags.get(core_flags.MODE)
        current = mode.value if mode is not None else None
        last_line = ask_database(config, current)
        if core_flags.DB_MAINTENANCE in last_line:
            if current != core_flags.DB_MAINTENANCE:
                log.warning("Enabling DB maintenance mode")
            else:
                log.warning("DB maintenance mode is currently enabled")
            new = core_flags.DB_MAINTENANCE
        else:
            if current == core_flags.DB_MAINTENANCE:
                log.info("DB maintenance mode had ended")
            new = None
    flag, changed = store_flags.put_flag(
        conn, core_flags.MODE, new, unless=core_flags.MANUAL_DB_MAINTENANCE if new is None else None
    )
    log.info(f"db mode: {flag.value}")
    return flag.value, changed


def ask_database(config: Config, current_mode: str | None) -> str:
    """Run the check's container; the last line of its standard output."""
    from jobrunner_lib.core.models import Job, State
    from jobrunner_lib.docker import engine as docker
    from jobrunner_lib.docker.mounts import ROLE_LABEL
    from jobrunner_lib.jobs.executor import job_environment, job_network

    image = config.maintenance_check_image
    if not image:
        raise CheckFailed("no MAINTENANCE_CHECK_IMAGE is set")
    if not docker.image_exists(image):
        raise CheckFailed(
            f"the image {image} (MAINTENANCE_CHECK_IMAGE) is not present; jr never pulls it "
            f"while running: docker pull {image}"
        )
    database = next(
        (name for name in MAINTENANCE_CHECK_DATABASES if config.database_urls.get(name)), "default"
    )
    # What a database job gets: DATABASE_URL (and the other database settings) and the network.
    probe = Job(
        id=ROLE, job_request_id="", state=State.RUNNING, requires_db=True, database_name=database
    )
    command = [
        word.replace("{current_mode}", str(current_mode))
        for word in shlex.split(config.maintenance_check_command)
    ]
    labels = {
        "job-runner": "true",
        "org.jr.backend": config.backend,
        ROLE_LABEL: ROLE,
        **docker.extra_labels(),
    }
    for left in docker.list_containers(config.backend, extra={ROLE_LABEL: ROLE}):
        # Left by a check that was killed (we hold the check's lock: none is running).
        docker.remove_container(left["Id"])
    code, out = docker.run_to_end(
        f"jr-{ROLE}-{os.urandom(3).hex()}",
        image,
        command,
        environment=job_environment(config, probe, image),
        network=job_network(config, probe),
        container_labels=labels,
        user=config.job_user,
        pids_limit=config.job_pids_limit,
        timeout=CHECK_TIMEOUT,
    )
    lines = out.strip().split("\n")
    if code is None:
        raise CheckFailed(f"the check did not end within {CHECK_TIMEOUT:g}s and was killed")
    if code != 0:
        shown = logs.squash_whitespace(" | ".join(lines[-3:]))[:300]
        raise CheckFailed(f"the check exited with code {code}: {shown or 'no output'}")
    return lines[-1]


def run_once(config: Config, conn: sqlite3.Connection) -> int:
    """One check under its lock, its outcome recorded; the exit code of the process."""
    from filelock import FileLock, Timeout

    from jobrunner_lib.docker.engine import DockerUnavailable

    path = config.workdir / "locks" / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        log.info("A database maintenance check is already running")
        return EXIT_OK
    try:
        try:
            mode, changed = check(config, conn)
        except Exception as exc:
            if store_unusable(exc):
                raise
            failed = "The database maintenance check failed, flags left as they are"
            if isinstance(exc, (JrError, JobError)):  # an expected failure: one line says it
                log.error(f"{failed}: {exc}")
            else:
                log.exception(failed)
            why = logs.squash_whitespace(f"{type(exc).__name__}: {exc}")
            store_flags.put_flag(conn, CHECK_FLAG, f"failed at {iso(time.time())}: {why}")
            return EXIT_TEMPFAIL if isinstance(exc, DockerUnavailable) else EXIT_FAILED
        store_flags.put_flag(
            conn, CHECK_FLAG, f"{core_flags.MODE}={mode or ''} at {iso(time.time())}"
        )
        if changed:
            # The service loop wakes: a pass stops or starts database jobs, a sync tells the website.
            try:
                config.wake_path.touch()
            except OSError:
                pass
        return EXIT_OK
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m jobrunner_lib.jobs.maintenance` runs the check once."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python -m jobrunner_lib.jobs.maintenance", file=sys.stderr)
        return 2
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"maintenance check: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup_process("mntn", config)
    from jobrunner_lib.store import db

    try:
        conn = db.connect(config.db_path)
        try:
            return run_once(config, conn)
        finally:
            conn.close()
    except Exception:
        log.exception("The database maintenance check crashed")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
