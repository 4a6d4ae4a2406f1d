"""Small helpers the operator tools share: is the service running, stop a job's worker, remove a
job's Docker objects, hold the run-pass lock, who is at the keyboard.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import socket
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import TemporaryFailure, UsageError
from jobrunner_lib.core.models import Job
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.store import queries as db_queries

log = logging.getLogger(__name__)

PID_FILE = "service.pid"
HUNG_PREFIX = "hung:"
# How long a killed worker may take to disappear before we go on without waiting.
WORKER_EXIT_WAIT = 5.0


def pid_file(config: Config) -> Path:
    """`$WORKDIR/service.pid`, written by service/jr-service while it runs."""
    return config.workdir / PID_FILE


def service_pid(config: Config) -> int | None:
    """The pid of the running service, or None (no pid file, a dead pid, or a reused one)."""
    try:
        fields = pid_file(config).read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return None
    if not fields or not fields[0].isdigit():
        return None
    pid = int(fields[0])
    from jobrunner_lib.jobs.processes import worker_alive

    if pid <= 1 or not worker_alive(pid, None):
        return None
    if sys.platform.startswith("linux"):
        # A stale file whose pid now belongs to another program must not block anything.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if b"jr-service" not in cmdline:
            return None
    return pid


def stop_worker(job: Job, wait: float = WORKER_EXIT_WAIT) -> str | None:
    """Kill the job's worker and its process group if it still runs; say what happened (or None)."""
    from jobrunner_lib.jobs.processes import kill_worker, worker_alive

    pid, started = job.worker_pid, job.worker_started_at
    if not pid or not worker_alive(pid, started):
        return None
    try:
        kill_worker(pid, started)
    except PermissionError:
        # It will notice the job row changed on its next look (every few seconds) and stop.
        return f"could not kill worker pid {pid} (permission denied); it stops by itself"
    deadline = time.monotonic() + wait
    while worker_alive(pid, started) and time.monotonic() < deadline:
        time.sleep(0.05)
    return f"killed worker pid {pid}"


def job_objects(config: Config, job_id: str) -> list[tuple[str, str]]:
    """(kind, name) of the job's objects that exist: container, helper, volume (a Docker volume's
    name, or a host-stored volume's directory)."""
    from jobrunner_lib.docker import volumes

    found = []
    for kind, name in (
        ("container", docker.container_name(job_id)),
        ("helper", docker.helper_name(job_id)),
    ):
        if docker.inspect_container(name) is not None:
            found.append((kind, name))
    if docker.volume_exists(docker.volume_name(job_id)):
        found.append(("volume", docker.volume_name(job_id)))
    if volumes.on_host(config, job_id):
        found.append(("volume", str(volumes.host_dir(config, job_id))))
    return found


def remove_job_objects(config: Config, job_id: str) -> list[str]:
    """Remove the job's containers, helper and volume (containers first); the names removed."""
    from jobrunner_lib.docker import volumes

    present = job_objects(config, job_id)
    for kind, name in present:
        if kind != "volume":
            docker.remove_container(name)
    for kind, name in present:
        if kind == "volume" and name == docker.volume_name(job_id):
            docker.remove_volume(name)
        elif kind == "volume":
            volumes.remove_host_dir(config, Path(name))
    return [name for _, name in present]


def hung_containers(conn: sqlite3.Connection) -> dict[str, str]:
    """Containers the copy guard flagged as hung (`hung:<name>` flags): name -> flag value."""
    return {
        name[len(HUNG_PREFIX) :]: value
        for name, value in db_queries.flags(conn, HUNG_PREFIX).items()
    }


def hung_objects_of(job_id: str, hung: dict[str, str]) -> list[str]:
    """Which of the job's containers are flagged hung (calls to them may never return)."""
    return [n for n in (docker.container_name(job_id), docker.helper_name(job_id)) if n in hung]


@contextmanager
def run_lock(config: Config, timeout: float) -> Iterator[None]:
    """Hold jr-run-once's lock, so no pass starts or claims a job while we change things."""
    from filelock import FileLock, Timeout  # lazily: only the tools that change jobs need it

    config.workdir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(config.run_lock_path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise TemporaryFailure(
            f"a jr-run-once pass still holds {config.run_lock_path} after {timeout:g}s; try again"
        ) from None
    try:
        yield
    finally:
        lock.release()


def try_run_lock(config: Config) -> object | None:
    """Take jr-run-once's lock if it is free right now; the held lock (call .release()) or None."""
    from filelock import FileLock, Timeout

    config.workdir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(config.run_lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def operator() -> str:
    """`<user>@<host>` of whoever runs the tool (JR_USER overrides the login name)."""
    user = os.environ.get("JR_USER")
    if not user:
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no login name is not worth failing for
            user = "unknown"
    return f"{user}@{socket.gethostname()}"


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, option: str) -> float:
    """`45s`, `30m`, `2h`, `1d`, `1w` or plain seconds, as seconds (UsageError naming the option)."""
    m = _DURATION.match(text.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"{option} {text!r}: expected a duration like 45s, 30m, 2h or 1d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def human_size(size: float | None) -> str:
    """Bytes as `512B`, `1.5KB`, `20MB`, `3.2GB` (Docker's decimal units); empty when unknown."""
    if size is None or size < 0:
        return ""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            if unit == "B" or size >= 10:
                return f"{size:.0f}{unit}"
            return f"{size:.1f}{unit}"
        size /= 1000
    return ""  # pragma: no cover


def human_duration(seconds: float) -> str:
    """`45s`, `3m20s`, `2h05m`."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
