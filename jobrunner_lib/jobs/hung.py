"""Containers the copy guard flagged as hung: `hung:<container name>` flags in the state store.

A copy that stalled may have left its container so that every call to it blocks; the job's
worker fails the job and sets the flag (`<job id> <time>`) instead of touching it again. The
cleanup sweep, jr-kill, jr-reboot-prep and jr-prune leave flagged containers alone; jr-prune
drops a flag once its container is gone (restarting Docker clears a hung container).
"""

from __future__ import annotations

import sqlite3

from jobrunner_lib.docker import engine as docker
from jobrunner_lib.store import flags as store_flags

PREFIX = "hung:"


def flag_name(container: str) -> str:
    """The flag that marks a container as hung."""
    return PREFIX + container


def hung_containers(conn: sqlite3.Connection) -> dict[str, str]:
    """Containers the copy guard flagged as hung (`hung:<name>` flags): name -> flag value."""
    return {name[len(PREFIX) :]: value for name, value in store_flags.flags(conn, PREFIX).items()}


def hung_objects_of(job_id: str, hung: dict[str, str]) -> list[str]:
    """Which of the job's containers are flagged hung (calls to them may never return)."""
    return [n for n in (docker.container_name(job_id), docker.helper_name(job_id)) if n in hung]
