"""Getting ready for a reboot (jr-reboot-prep): put running jobs back to pending (they start
again from scratch afterwards), or pause the backend until no job runs; lift the pause after.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from jobrunner_lib.core import flags as core_flags
from jobrunner_lib.core.config import Config
from jobrunner_lib.core.models import Job, Msg, State, StatusCode, iso, transition
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.jobs.locks import holding_run_lock, take_run_lock
from jobrunner_lib.ops import objects
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.store import queries as db_queries

log = logging.getLogger(__name__)

PAUSED = core_flags.PAUSED
# How long to wait for a pass in progress before putting jobs back to pending.
LOCK_TIMEOUT = 60.0


@dataclass(frozen=True)
class Outcome:
    """What resetting one job did: the job as it is now, notes, and whether part of it failed."""

    job: Job
    notes: list[str]
    failed: bool = False


def running_jobs(conn: sqlite3.Connection) -> list[Job]:
    """Jobs in state running (from the active-jobs index)."""
    return [j for j in db_queries.active_jobs(conn) if j.state is State.RUNNING]


def pending_count(conn: sqlite3.Connection) -> int:
    """How many jobs are pending."""
    return sum(1 for j in db_queries.active_jobs(conn) if j.state is State.PENDING)


def reset_for_reboot(conn: sqlite3.Connection, job: Job) -> Job | None:
    """running -> pending/waiting_on_reboot (store.queries.change_job); None if it stopped
    running meanwhile."""

    def reset(current: Job) -> Job | None:
        if current.state is not State.RUNNING:
            return None
        return transition(
            current,
            State.PENDING,
            StatusCode.WAITING_ON_REBOOT,
            Msg.WAITING_ON_REBOOT,
            worker_pid=None,
            worker_started_at=None,
            attempts=0,
        )

    saved, changed = db_queries.change_job(conn, job, reset)
    return saved if changed else None


def pending_leftovers(config: Config, conn: sqlite3.Connection, active: Sequence[Job]) -> list[Job]:
    """Pending jobs that still have Docker objects (e.g. an earlier jr-reboot-prep failed)."""
    from jobrunner_lib.docker import volumes

    pending = {j.id: j for j in active if j.state is State.PENDING}
    if not pending:
        return []
    hung = objects.hung_containers(conn)
    found: set[str] = set()
    found_objects = docker.list_containers(config.backend) + docker.list_volumes(config.backend)
    owners = [(obj.get("Labels") or {}).get("org.jr.job-id") for obj in found_objects]
    for job_id in [*owners, *volumes.host_volumes(config)]:
        if job_id in pending and not objects.hung_objects_of(job_id, hung):
            found.add(job_id)
    return [job for job_id, job in pending.items() if job_id in found]


def reset_all(config: Config, conn: sqlite3.Connection, jobs: Sequence[Job]) -> Iterator[Outcome]:
    """Put the running jobs back to pending (the row first, then their worker is stopped) and
    remove every given job's Docker objects; one Outcome per job as it is done.

    Holds the run lock throughout, so no pass claims a job just put back to pending.
    """
    from docker.errors import DockerException

    busy = (
        f"a jr-run-once pass still holds {config.run_lock_path} after {LOCK_TIMEOUT:g}s; try again"
    )
    with holding_run_lock(config, LOCK_TIMEOUT, busy):
        for job in jobs:
            failed = False
            if job.state is State.RUNNING:
                saved = reset_for_reboot(conn, db_queries.get_job(conn, job.id) or job)
                if saved is None:
                    fresh = db_queries.get_job(conn, job.id) or job
                    yield Outcome(fresh, [f"left alone: it is now {fresh.state.value}"])
                    continue
                # The row first: a worker we fail to kill sees the job is no longer its own.
                notes = ["back to pending"]
                stopped = objects.stop_worker(job)
                if stopped:
                    notes.append(stopped)
            else:
                saved, notes = job, ["pending"]
            try:
                removed = objects.remove_job_objects(config, job.id)
                if removed:
                    notes.append(f"removed {', '.join(removed)}")
            except (docker.DockerTimeout, DockerException, OSError) as exc:
                failed = True
                notes.append(f"failed to remove its objects ({exc}): run jr-reboot-prep again")
            log.info(f"Reset for reboot: {'; '.join(notes)}", extra={"job": saved})
            yield Outcome(saved, notes, failed)


def pause(conn: sqlite3.Connection) -> tuple[str, bool]:
    """Pause the backend (no new job starts) for a drain, unless it is paused already;
    (since when it is paused, and by whom when we paused it; whether it was already paused).

    The `paused` backend flag, set to `true` as upstream sets it (core/flags.py): jr-flags shows
    it and the jobs website receives it.
    """
    current = paused(conn)
    if current is not None:
        return current, True
    flag, _ = store_flags.put_flag(conn, PAUSED, core_flags.VALUES[PAUSED])
    return f"since {iso(flag.timestamp)} by {objects.operator()}", False


def paused(conn: sqlite3.Connection) -> str | None:
    """Since when the backend is paused (`since <time>`, or the text an older jr stored), or
    None when it is not."""
    flag = store_flags.backend_flags(conn).get(PAUSED)
    if flag is None or not core_flags.is_on(flag.value):
        return None
    if flag.value != core_flags.VALUES[PAUSED]:
        return flag.value
    return f"since {iso(flag.timestamp)}"


def resume(conn: sqlite3.Connection) -> None:
    """Lift the pause (the flag's row stays, cleared, with the time: the website sees when)."""
    store_flags.put_flag(conn, PAUSED, None)


def idle_under_lock(config: Config, conn: sqlite3.Connection) -> bool:
    """No job running, checked while no pass runs: a pass that read the pause flag before it
    was set has ended. False while a pass is in progress (look again shortly)."""
    lock = take_run_lock(config)
    if lock is None:
        return False
    try:
        return not running_jobs(conn)
    finally:
        lock.release()
