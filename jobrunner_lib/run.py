"""One bounded pass of the run loop: schedule pending jobs, claim them, supervise their workers.

A pass reads only active jobs (and, by primary key, the jobs they wait for), decides, writes each
change with compare-and-set, and returns. The slow work after a claim happens in a detached worker
process (`python -m jobrunner_lib.worker <id>`); the pass only starts workers and restarts dead or
stalled ones, so it stays well under a second however much history the store holds.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import cleanup, db
from .config import CHECKOUT_DIR, Config
from .errors import ConflictError
from .models import Job, Msg, State, StatusCode, transition
from .weights import Weights, load_weights

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
CONFLICT_RETRIES = 3
WORKER_DIED = "Internal error: the job's worker died 3 times; see the run log"
# The website flags a job as stale after 30 minutes without an update (SPEC.md §3.7).
# /proc start times are derived from an integer boot time, so allow for rounding.
START_TIME_TOLERANCE = 1.0

# A worker that exited because Docker was unreachable is restarted without counting an attempt
# (the daemon being restarted is not the job's fault), but only this many times per job, so a
# worker that keeps failing that way while Docker answers the pass's ping cannot spin forever.
FREE_DOCKER_RESTARTS = 10
# SQLite result codes (low byte) meaning the state store itself is unusable right now: busy,
# locked, read-only, I/O error, disk full, cannot open. A pass stops at once on these rather
# than logging the same failure for every job.
STORE_UNUSABLE_CODES = frozenset({5, 6, 8, 10, 13, 14})

Spawn = Callable[[Config, str], tuple[int, float]]
IsAlive = Callable[[int, float | None], bool]
Kill = Callable[[int, float | None], None]


@dataclass(frozen=True)
class Change:
    """One change made by a pass (what jr-run-once prints).

    `message` is the job's new status message, or for a restarted worker a note saying why.
    """

    job_id: str
    action: str
    workspace: str
    old_state: str
    new_state: str
    status_code: str
    message: str

    def row(self) -> dict[str, str]:
        """The change as an output row (columns id, action, workspace, from, to, status_code, message)."""
        return {
            "id": self.job_id,
            "action": self.action,
            "workspace": self.workspace,
            "from": self.old_state,
            "to": self.new_state,
            "status_code": self.status_code,
            "message": self.message,
        }


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


# ---- worker processes -------------------------------------------------------------------------

_WORKERS: list[subprocess.Popen[bytes]] = []


def spawn_worker(config: Config, job_id: str) -> tuple[int, float]:
    """Start a detached `python -m jobrunner_lib.worker <id>`; return its pid and start time."""
    log_path = config.workdir / "logs" / "workers.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The bin/ launchers put the checkout on sys.path by hand; the worker needs it too.
    paths = [str(CHECKOUT_DIR), str(CHECKOUT_DIR / "lib"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    detach: dict[str, Any] = {}
    if os.name == "nt":
        detach["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS
    else:
        # Its own session: a Ctrl-C or SIGTERM aimed at the service does not reach it mid-copy.
        detach["start_new_session"] = True
    with open(log_path, "ab") as out:
        # cwd is the workdir so a worker never pins the operator's current directory (Windows).
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobrunner_lib.worker", job_id],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(config.workdir),
            close_fds=True,
            **detach,
        )
    _WORKERS.append(proc)
    started = _process_info(proc.pid)[1]
    return proc.pid, started if started is not None else time.time()


def reap_children() -> None:
    """Collect the exit status of workers this process started, so none lingers as a zombie."""
    # Polling our own Popen objects reaps exactly our workers (a waitpid(-1) loop would also
    # steal the status of any other child of a process that embeds the pass, e.g. a test).
    _WORKERS[:] = [proc for proc in _WORKERS if proc.poll() is None]


def worker_alive(pid: int, start_time: float | None) -> bool:
    """True if `pid` runs and, where the OS tells us, started at `start_time` (not a reused pid)."""
    if pid <= 0:
        return False
    running, started = _process_info(pid)
    if not running:
        return False
    if started is None or start_time is None:
        return True
    return abs(started - start_time) < START_TIME_TOLERANCE


def kill_worker(pid: int, start_time: float | None) -> None:
    """Kill a stalled worker and everything in its process group (it leads its own session)."""
    if pid <= 1 or not worker_alive(pid, start_time):
        return  # gone already, or the pid now belongs to a stranger
    if os.name == "nt":
        subprocess.run(
            ["taskkill", "/PID", str(pid), "/T", "/F"], capture_output=True, timeout=60, check=False
        )
        return
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _process_info(pid: int) -> tuple[bool, float | None]:
    """(running, start time as Unix seconds when the OS can tell us)."""
    if sys.platform.startswith("linux"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False, None
        # The command name (field 2) may hold spaces and brackets: count fields after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):  # a zombie has finished its work
            return False, None
        ticks = int(fields[19])  # field 22: start time in clock ticks since boot
        return True, _boot_time() + ticks / os.sysconf("SC_CLK_TCK")
    if os.name == "nt":
        return _windows_process_info(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:
        return True, None
    return True, None


@lru_cache(maxsize=1)
def _boot_time() -> float:
    with open("/proc/stat", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def _windows_process_info(pid: int) -> tuple[bool, float | None]:
    # os.kill(pid, 0) would send CTRL_C_EVENT on Windows, so ask the kernel directly.
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    # Declared so that 64-bit handles are not truncated to C ints.
    kernel32.GetExitCodeProcess.argtypes = [wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD)]
    kernel32.GetProcessTimes.argtypes = [wintypes.HANDLE, *[ctypes.POINTER(wintypes.FILETIME)] * 4]
    kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5, None  # ERROR_ACCESS_DENIED: it exists
    try:
        code = wintypes.DWORD()
        if kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) and code.value != 259:
            return False, None  # exited (259 is STILL_ACTIVE)
        times = [wintypes.FILETIME() for _ in range(4)]
        if not kernel32.GetProcessTimes(handle, *(ctypes.byref(t) for t in times)):
            return True, None
        ticks = (times[0].dwHighDateTime << 32) | times[0].dwLowDateTime  # 100 ns since 1601
        return True, ticks / 1e7 - 11644473600
    finally:
        kernel32.CloseHandle(handle)


# ---- the pass ---------------------------------------------------------------------------------


def run_pass(
    config: Config,
    conn: sqlite3.Connection,
    *,
    spawn: Spawn = spawn_worker,
    is_alive: IsAlive = worker_alive,
    kill: Kill = kill_worker,
    now: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> list[Change]:
    """Look at every active job once: supervise running ones, then schedule pending ones."""
    reap_children()
    weights = load_weights(config.job_resource_weights_file)
    jobs = db.active_jobs(conn)
    # Shuffled so that one big request cannot hog capacity (SPEC.md §6.1).
    (rng or random).shuffle(jobs)
    run = _Pass(config, conn, weights, spawn, is_alive, kill, now)
    run.jobs = {job.id: job for job in jobs}
    # Supervision first: a job failed for good frees its capacity for this pass's claims.
    for job in jobs:
        if job.state is State.RUNNING:
            run.handle(job)
    run.running_weight = sum(
        weights.weight(j.workspace, j.action) for j in run.jobs.values() if j.state is State.RUNNING
    )
    pending = [job for job in jobs if job.state is State.PENDING]
    if pending:
        run.paused = db.get_flag(conn, "paused") is not None
        wanted = {d for job in pending for d in job.wait_for_job_ids if d not in run.jobs}
        run.others = {dep.id: dep for dep in db.get_jobs(conn, sorted(wanted))}
        for job in pending:
            run.handle(run.jobs[job.id])
    # Finished jobs whose worker died before removing their Docker objects (bounded per pass).
    cleanup.sweep(config, conn, is_alive)
    return run.changes


class _Pass:
    """The state of one pass: the jobs as last seen, capacity in use, and the changes made."""

    def __init__(
        self,
        config: Config,
        conn: sqlite3.Connection,
        weights: Weights,
        spawn: Spawn,
        is_alive: IsAlive,
        kill: Kill,
        now: Callable[[], float],
    ):
        self.config, self.conn, self.weights = config, conn, weights
        self.spawn, self.is_alive, self.kill, self.now = spawn, is_alive, kill, now
        self.jobs: dict[str, Job] = {}
        self.others: dict[str, Job] = {}
        self.running_weight = 0.0
        self.paused = False
        self.changes: list[Change] = []

    def handle(self, job: Job) -> None:
        """Decide for one job; on a lost race re-read it and decide again; never raise."""
        for _ in range(CONFLICT_RETRIES):
            try:
                if job.state is State.RUNNING:
                    self.supervise(job)
                elif job.state is State.PENDING:
                    self.schedule(job)
                return
            except ConflictError:
                log.debug("Job changed while deciding; looking again", extra={"job": job})
                fresh = db.get_job(self.conn, job.id)
                if fresh is None:
                    return
                self.jobs[job.id] = job = fresh
            except Exception as exc:
                if store_unusable(exc):
                    # Not this job's problem: every other job would hit it too. The caller
                    # (jr-run-once) reports it in one line; the next pass carries on.
                    raise
                # One job's problem must not stop the others (nor crash the service).
                log.exception("Unexpected error while handling job", extra={"job": job})
                return

    # -- pending jobs --

    def schedule(self, job: Job) -> None:
        """Cancelled, dependencies, pause flag, capacity: then claim it."""
        if job.cancelled:
            return self.cancel(job)
        failed, waiting = self.dependencies(job)
        if failed is not None:
            message = f"{Msg.DEPENDENCY_FAILED}: {failed.action} ({failed.id})"
            return self.save(job, State.FAILED, StatusCode.DEPENDENCY_FAILED, message)
        if waiting:
            return self.wait(job, StatusCode.WAITING_ON_DEPENDENCIES, Msg.WAITING_ON_DEPENDENCIES)
        if self.paused:
            if job.status_code is StatusCode.WAITING_ON_REBOOT:
                return self.wait(job, job.status_code, job.status_message or Msg.WAITING_ON_REBOOT)
            return self.wait(job, StatusCode.PAUSED, Msg.PAUSED)
        weight = self.weights.weight(job.workspace, job.action)
        # A job heavier than the whole capacity still starts once nothing else runs; the old
        # runner left it waiting forever.
        if self.running_weight > 0 and self.running_weight + weight > self.config.max_workers:
            message = Msg.WAITING_ON_WORKERS_HEAVY if weight > 1 else Msg.WAITING_ON_WORKERS
            return self.wait(job, StatusCode.WAITING_ON_WORKERS, message)
        self.claim(job, weight)

    def dependencies(self, job: Job) -> tuple[Job | None, bool]:
        """(the first failed awaited job, whether any awaited job has not succeeded yet)."""
        waiting = False
        for dep_id in job.wait_for_job_ids:
            dep = self.jobs.get(dep_id) or self.others.get(dep_id)
            if dep is None:
                continue  # as the old runner: an unknown job id does not hold anything up
            if dep.state is State.FAILED:
                return dep, True
            waiting = waiting or dep.state is not State.SUCCEEDED
        return None, waiting

    def wait(self, job: Job, code: StatusCode, message: str) -> None:
        """Keep a job pending with this status, writing only when it changes."""
        if job.status_code is code and job.status_message == message:
            if self.now() - job.updated_at >= self.config.status_refresh_interval:
                # Keeps the website's "last updated" fresh without a revision bump.
                db.touch(
                    self.conn,
                    job.id,
                    refresh_updated_at=True,
                    refresh_after=int(self.config.status_refresh_interval),
                )
            return
        self.save(job, State.PENDING, code, message)

    def cancel(self, job: Job) -> None:
        """A job cancelled before it started passes through RUNNING (for started_at) to FAILED."""
        at = int(self.now())
        started = transition(job, State.RUNNING, job.status_code, job.status_message, at=at)
        self.save(started, State.FAILED, StatusCode.CANCELLED_BY_USER, Msg.CANCELLED, old=job)

    def claim(self, job: Job, weight: float) -> None:
        """pending -> running/preparing, then start its worker."""
        claimed = self.save(
            job,
            State.RUNNING,
            StatusCode.PREPARING,
            Msg.PREPARING,
            attempts=job.attempts + 1,
            worker_pid=None,
            worker_started_at=None,
            error_detail=None,
            exit_code=None,
        )
        self.running_weight += weight
        self.start_worker(claimed)

    # -- running jobs --

    def supervise(self, job: Job) -> None:
        """Restart a dead or stalled worker, or give up on the job after MAX_ATTEMPTS workers.

        A job with no worker recorded (a pass cut short between its claim or spawn and saving
        the pid) gets one without using up an attempt: no worker of it has failed.
        """
        pid = job.worker_pid
        died = False
        if pid is not None and self.is_alive(pid, job.worker_started_at):
            last = max(
                (t for t in (job.heartbeat_at, job.worker_started_at) if t is not None),
                default=None,
            )
            silent = self.now() - last if last is not None else 0.0
            if silent <= self.config.worker_stall_timeout:
                return
            reason = f"worker pid {pid} stalled (no heartbeat for {silent:.0f}s)"
            self.kill(pid, job.worker_started_at)
        elif worker_holds(self.config, job.id):
            # A worker we have no (live) pid for is driving it: it records itself shortly.
            log.debug("Job driven by an unrecorded worker; leaving it", extra={"job": job})
            return
        elif pid is not None:
            reason, died = f"worker pid {pid} died", True
        else:
            # A claim or spawn cut short, or jr-retry handing the job back (attempts 0).
            reason = "no worker recorded"
            return self.restart_worker(job, reason, counted=job.attempts < 1)
        outage = DockerOutage.parse(job.error_detail)
        if died and outage is not None and outage.pid == pid:
            if outage.count <= FREE_DOCKER_RESTARTS:
                # It exited because Docker was unreachable, and passes run only once Docker
                # answers again: the daemon's restart is not a failed attempt of the job.
                reason = f"worker pid {pid} exited while Docker was unavailable"
                return self.restart_worker(job, reason, counted=False)
            reason += f" ({outage.count} times Docker was unavailable)"
        if job.attempts >= MAX_ATTEMPTS:
            # Container and volume are kept, so an operator can look and use jr-retry.
            code, message = StatusCode.INTERNAL_ERROR, WORKER_DIED
            if job.cancelled:
                code, message = StatusCode.CANCELLED_BY_USER, Msg.CANCELLED
            log.error(
                f"Giving up on job: {reason} (attempt {job.attempts} of {MAX_ATTEMPTS})",
                extra={"job": job},
            )
            self.save(
                job,
                State.FAILED,
                code,
                message,
                error_detail=f"{reason}; {job.attempts} workers failed",
            )
            return
        self.restart_worker(job, reason, counted=True)

    def restart_worker(self, job: Job, reason: str, *, counted: bool) -> None:
        """Forget the old worker, count an attempt unless told not to, and start another."""
        attempts = job.attempts + 1 if counted else job.attempts
        again = db.save_job(
            self.conn, job.copy(attempts=attempts, worker_pid=None, worker_started_at=None)
        )
        self.jobs[job.id] = again
        if counted:
            note = f"Restarting worker: {reason} (attempt {again.attempts} of {MAX_ATTEMPTS})"
        else:
            note = f"Restarting worker: {reason} (not counted as an attempt)"
        level = logging.WARNING if job.worker_pid is not None else logging.INFO
        log.log(level, note, extra={"job": again})
        self.record(job, again, note)
        self.start_worker(again)

    def start_worker(self, job: Job) -> None:
        """Spawn the job's worker and record who it is; a failure is left to the next pass."""
        try:
            pid, started = self.spawn(self.config, job.id)
        except OSError:
            log.exception("Could not start a worker (the next pass retries)", extra={"job": job})
            return
        log.info(f"Started worker pid {pid}", extra={"job": job})
        for _ in range(5):
            try:
                self.jobs[job.id] = db.save_job(
                    self.conn, job.copy(worker_pid=pid, worker_started_at=started)
                )
                return
            except ConflictError:
                # The new worker already wrote the job (e.g. a heartbeat-free step change).
                fresh = db.get_job(self.conn, job.id)
                if fresh is None or fresh.state.is_final:
                    return
                job = fresh

    # -- writing --

    def save(
        self,
        job: Job,
        state: State,
        code: StatusCode,
        message: str,
        *,
        old: Job | None = None,
        **changes: Any,
    ) -> Job:
        """Move a job with the state machine, write it (compare-and-set), log and record it."""
        new = transition(job, state, code, message, at=int(self.now()), **changes)
        new = db.save_job(self.conn, new)
        self.jobs[new.id] = new
        log.info(message, extra={"job": new})
        self.record(old or job, new, message)
        return new

    def record(self, old: Job, new: Job, message: str) -> None:
        """Remember a change for the caller."""
        self.changes.append(
            Change(
                new.id,
                new.action,
                new.workspace,
                old.state.value,
                new.state.value,
                new.status_code.value if new.status_code else "",
                message,
            )
        )


def worker_holds(config: Config, job_id: str) -> bool:
    """Whether some worker holds the job's lock (is driving it) right now."""
    from filelock import FileLock, Timeout

    path = config.job_lock_path(job_id)
    if not path.exists():
        return False
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:  # e.g. the locks directory is being removed: nobody can hold it then
        return False
    lock.release()
    return False


def run_lock(config: Config, timeout: float) -> Any:
    """The run lock (one pass at a time), acquired within timeout; None if it stayed busy."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(config.run_lock_path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock


def after_job(config: Config, lock: Any, *, take_next: bool = False) -> str | None:
    """A job just ended: run a pass now (lock: the run lock, held by the caller, or None if busy).

    Without the lock no pass runs (someone else's is running). Either way the wake file is
    touched afterwards, so the service loop syncs the new state and passes again without
    sleeping. With take_next the first job the pass starts is recorded as driven by this process
    (the finishing worker, warm and connected) instead of a new one; its id is returned.
    """
    taken: list[str] = []
    try:
        if lock is None:
            return None
        conn = db.connect(config.db_path)

        def spawn(config: Config, job_id: str) -> tuple[int, float]:
            if take_next and not taken:
                taken.append(job_id)
                # This process may be old: a fresh heartbeat keeps the job from looking stalled
                # until its own heartbeat thread starts.
                db.touch(conn, job_id, heartbeat=time.time())
                started = _process_info(os.getpid())[1]
                return os.getpid(), started if started is not None else time.time()
            return spawn_worker(config, job_id)

        try:
            run_pass(config, conn, spawn=spawn)
        finally:
            conn.close()
        return taken[0] if taken else None
    finally:
        try:
            config.wake_path.touch()
        except OSError:
            pass
