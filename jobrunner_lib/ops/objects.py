"""Small helpers the operator tools share: is the service running, stop a job's worker, remove a
job's Docker objects, hold the run-pass lock, who is at the keyboard.

A job's objects (docker/jobobjects.py) and the hung-container flags (jobs/hung.py) live below,
where the run side's cleanup uses them too; they are re-exported here for the tools.
"""

from __future__ import annotations

import logging
import re
import socket
import sys
import time
from pathlib import Path

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import UsageError
from jobrunner_lib.core.models import Job
from jobrunner_lib.core.values import user_name
from jobrunner_lib.docker.jobobjects import job_objects as job_objects
from jobrunner_lib.docker.jobobjects import remove_job_objects as remove_job_objects
from jobrunner_lib.jobs.hung import hung_containers as hung_containers
from jobrunner_lib.jobs.hung import hung_objects_of as hung_objects_of

log = logging.getLogger(__name__)

PID_FILE = "service.pid"
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


def operator() -> str:
    """`<user>@<host>` of whoever runs the tool (JR_USER overrides the login name)."""
    return f"{user_name()}@{socket.gethostname()}"


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
