"""Docker objects a job still owes: removed by a later pass when the worker died before removing them.

A worker records `cleanup:<job id>` before it touches Docker and clears it once the job's
container, helper and volume are gone. A job can end (its final state saved) and its worker be
killed before cleanup finishes; nothing else revisits a finished job, so without this its
volume (which may hold highly sensitive files) would stay until an operator ran jr-prune.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.models import StatusCode, now
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.store import queries as db_queries

log = logging.getLogger(__name__)

PREFIX = "cleanup:"
MAX_PER_PASS = 5
# Objects of these jobs are kept on purpose: for jr-retry, or until `jr-kill --cleanup`.
KEPT_CODES = frozenset({StatusCode.INTERNAL_ERROR, StatusCode.KILLED_BY_ADMIN})


def owe(conn: sqlite3.Connection, job_id: str) -> None:
    """Note that the job's Docker objects must be removed once it ends."""
    store_flags.set_flag(conn, PREFIX + job_id, str(now()))


def settled(conn: sqlite3.Connection, job_id: str) -> None:
    """The job owes nothing any more (its objects are gone, or kept on purpose)."""
    store_flags.set_flag(conn, PREFIX + job_id, None)


def owed(conn: sqlite3.Connection) -> set[str]:
    """The ids of the jobs whose Docker objects may still be there."""
    return {name[len(PREFIX) :] for name in store_flags.flags(conn, PREFIX)}


def sweep(
    config: Config, conn: sqlite3.Connection, is_alive: Callable[[int, float | None], bool]
) -> list[str]:
    """Remove the objects of finished jobs whose worker died before doing so; the job ids cleaned."""
    owed = store_flags.flags(conn, PREFIX)
    if not owed:
        return []
    # Lazily: only needed when something is owed.
    from jobrunner_lib.docker.engine import DockerUnavailable
    from jobrunner_lib.docker.jobobjects import remove_job_objects
    from jobrunner_lib.jobs.hung import hung_containers, hung_objects_of

    hung = hung_containers(conn)
    cleaned: list[str] = []
    for name in sorted(owed):
        job = db_queries.get_job(conn, name[len(PREFIX) :])
        if job is None:
            settled(conn, name[len(PREFIX) :])
            continue
        if not job.state.is_final:
            continue
        if job.worker_pid and is_alive(job.worker_pid, job.worker_started_at):
            continue  # its worker is still cleaning up
        if job.status_code in KEPT_CODES or hung_objects_of(job.id, hung):
            settled(conn, job.id)
            continue
        try:
            removed = remove_job_objects(config, job.id)
        except DockerUnavailable:
            break
        except Exception:  # noqa: BLE001 - one stuck object must not stop the pass
            log.exception(
                "Could not clean up after the job's worker; will try again", extra={"job": job}
            )
            continue
        settled(conn, job.id)
        if removed:
            log.info(
                "Cleaned up after a worker that died: removed %s",
                ", ".join(removed),
                extra={"job": job},
            )
        cleaned.append(job.id)
        if len(cleaned) >= MAX_PER_PASS:
            break
    return cleaned
