"""Worker processes as the run side sees them: start one, tell whether one still runs, kill one.

A worker is started detached (`python -m jobrunner_lib.jobs.worker <id>`, its own session) and known by
its pid and start time, so that a pid reused by another process is never taken for it. Whether a
worker is driving a job is also told by the job's lock, which it holds while it works.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from jobrunner_lib.core.config import CHECKOUT_DIR, Config

# /proc start times are derived from an integer boot time, so allow for rounding.
START_TIME_TOLERANCE = 1.0

_WORKERS: list[subprocess.Popen[bytes]] = []


def spawn_worker(config: Config, job_id: str) -> tuple[int, float]:
    """Start a detached `python -m jobrunner_lib.jobs.worker <id>`; return its pid and start time."""
    return spawn_detached(config, "jobrunner_lib.jobs.worker", job_id)


def spawn_detached(config: Config, module: str, *args: str) -> tuple[int, float]:
    """Start a detached `python -m <module> <args>` logging to workers.log (a worker, or the
    database maintenance check); return its pid and start time."""
    log_path = config.workdir / "logs" / "workers.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The bin/ launchers put the checkout on sys.path by hand; the worker needs it too.
    paths = [str(CHECKOUT_DIR), str(CHECKOUT_DIR / "lib"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    detach: dict[str, Any] = {}
    if os.name == "nt":
        detach["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(
            subprocess, "DETACHED_PROCESS", 0
        )
    else:
        # Its own session: a Ctrl-C or SIGTERM aimed at the service does not reach it mid-copy.
        detach["start_new_session"] = True
    with open(log_path, "ab") as out:
        # cwd is the workdir so a worker never pins the operator's current directory (Windows).
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(config.workdir),
            close_fds=True,
            **detach,
        )
    _WORKERS.append(proc)
    started = process_info(proc.pid)[1]
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
    running, started = process_info(pid)
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


def process_info(pid: int) -> tuple[bool, float | None]:
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
        return ctypes.get_last_error() == 5, None  # type: ignore[attr-defined]  # Windows only  # ERROR_ACCESS_DENIED: it exists
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
