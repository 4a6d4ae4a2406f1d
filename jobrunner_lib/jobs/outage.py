"""Outages a job is not to blame for, as the pass and its workers recognise them.

Docker unreachable (DockerOutage, the note a worker leaves in its job), the state store unusable
(store_unusable), and a full disk (which of the backend's disks it is). A worker that finds Docker
or the store unusable exits 75 and leaves its job as it is; a full disk fails the job with a
message naming the disk.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from jobrunner_lib.core.config import Config

# SQLite result codes (low byte) meaning the state store itself is unusable right now: busy,
# locked, read-only, I/O error, disk full, cannot open. A pass stops at once on these rather
# than logging the same failure for every job.
STORE_UNUSABLE_CODES = frozenset({5, 6, 8, 10, 13, 14})
# Free space below which a disk counts as the full one when an error does not say which it was.
NEARLY_FULL = 1 << 20


@dataclass(frozen=True)
class DockerOutage:
    """Workers of a job found Docker unreachable: kept in the job's error_detail (one line).

    The worker writes it before exiting 75, so that the pass restarts the job's worker without
    counting an attempt, and so that a later worker can tell a container stopped by a daemon
    shutdown (exit 137/143 around `first`) from a job that failed by itself.
    """

    count: int
    first: float
    last: float
    pid: int

    PREFIX = "Docker became unavailable while the job ran"
    _PATTERN = re.compile(
        r"^Docker became unavailable while the job ran \((\d+)x; first (\S+), last (\S+) "
        r"by worker pid (\d+)\)"
    )

    def note(self) -> str:
        """The error_detail text."""
        return (
            f"{self.PREFIX} ({self.count}x; first {_stamp(self.first)}, last {_stamp(self.last)} "
            f"by worker pid {self.pid})"
        )

    @classmethod
    def parse(cls, detail: str | None) -> DockerOutage | None:
        """The outage recorded in an error_detail, or None."""
        match = cls._PATTERN.match(detail or "")
        if not match:
            return None
        count, first, last, pid = match.groups()
        return cls(int(count), _unstamp(first), _unstamp(last), int(pid))

    @classmethod
    def record(cls, detail: str | None, pid: int, at: float) -> DockerOutage:
        """The outage after one more worker (pid) found Docker gone at `at`."""
        previous = cls.parse(detail)
        if previous is None:
            return cls(1, at, at, pid)
        return cls(previous.count + 1, previous.first, at, pid)


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def _unstamp(text: str) -> float:
    import calendar

    whole, _, frac = text.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{frac or 0}")


def store_unusable(exc: BaseException) -> bool:
    """Whether an exception says the state store cannot be used now (disk full, busy, I/O)."""
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in STORE_UNUSABLE_CODES
    text = str(exc).lower()
    return any(p in text for p in ("disk is full", "disk i/o", "readonly", "locked", "busy"))


def backend_disks(config: Config) -> list[tuple[Path, str]]:
    """The places jr writes to, in words, the most specific first (the privacy trees and the
    host-stored volumes may live inside the workdir)."""
    places = [
        (config.high_privacy_storage_base, "the high privacy storage"),
        (config.medium_privacy_storage_base, "the medium privacy storage"),
    ]
    if config.volume_storage == "host":
        places.append((config.volumes_dir, "the job volumes storage"))
    return [*places, (config.workdir, "the workdir")]


def disk_name(config: Config, path: Path) -> str | None:
    """Which of the backend's disks a path is on, in words; None if it is none of them."""
    for base, name in backend_disks(config):
        try:
            path.resolve().relative_to(base.resolve())
            return name
        except (OSError, ValueError):
            continue
    return None


def full_disk_name(config: Config) -> str | None:
    """The backend disk with (almost) no room left, in words; None if not exactly one is full."""
    full: dict[int, str] = {}
    # The job volumes last: on a disk they share, the other name is the one to give.
    places = sorted(backend_disks(config), key=lambda place: place[0] == config.volumes_dir)
    for base, name in places:
        try:
            st = os.statvfs(base)
        except (OSError, AttributeError):  # missing, or Windows (no statvfs)
            continue
        if st.f_bavail * st.f_frsize < NEARLY_FULL:
            # Keyed by filesystem: the privacy trees often share the workdir's disk.
            full.setdefault(os.stat(base).st_dev, name)
    return next(iter(full.values())) if len(full) == 1 else None


# ---- a reserve of room on the state store's disk ---------------------------------------------

RESERVE_NAME = "disk-reserve"
RESERVE_MAX = 32 * 2**20
SQLITE_FULL = 13


def store_full(exc: BaseException) -> bool:
    """Whether a state store error says its disk is full."""
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF == SQLITE_FULL if code is not None else "disk is full" in str(exc).lower()


def reserve_path(config: Config) -> Path:
    """`$WORKDIR/locks/disk-reserve`: room kept on the state store's disk."""
    return config.workdir / "locks" / RESERVE_NAME


def keep_reserve(config: Config) -> None:
    """Keep a reserve file on the state store's disk: 1/20 of the disk, at most 32 MiB.

    A job whose volume shares that disk can fill it; then nothing can be recorded, not even the
    job's failure, and its volume (the space) stays. Freeing the reserve (release_reserve) gives
    the worker room to record the job's end, after which its volume is removed. Made only while
    there is plenty of room; a cheap check when the file exists.
    """
    path = reserve_path(config)
    if path.exists():
        return
    tmp = path.with_name(f".{RESERVE_NAME}.{os.getpid()}")
    try:
        st = os.statvfs(config.workdir)
        size = min(RESERVE_MAX, st.f_blocks * st.f_frsize // 20)
        if size <= 0 or st.f_bavail * st.f_frsize < 4 * size:
            return  # not now: room is short already
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as out:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(out.fileno(), 0, size)  # real blocks, not a sparse file
            else:
                for _ in range(0, size, 2**20):
                    out.write(b"\0" * 2**20)
        os.replace(tmp, path)
    except (OSError, AttributeError):  # no statvfs (Windows) or no room after all
        tmp.unlink(missing_ok=True)


def release_reserve(config: Config) -> bool:
    """Delete the reserve (the state store's disk is full); whether there was one to free."""
    try:
        os.unlink(reserve_path(config))
    except OSError:
        return False
    return True
