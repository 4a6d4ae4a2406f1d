"""End-to-end helpers: a private jr installation driven through the real tools, as an operator would.

A `Rig` owns one WORKDIR (with the privacy trees inside it) and one unique Docker label. Every
tool, service and worker it starts carries `JR_EXTRA_LABELS=org.jr.test=<uuid>`, so every
container and volume jr makes for it can be found, and `Rig.cleanup()` removes exactly those, and
kills exactly the job workers whose environment names this WORKDIR (read from /proc).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import BIN, ROOT, tool_env
from tests.support.waiting import wait_for

SERVICE = ROOT / "service" / "jr-service"
TEST_LABEL_KEY = "org.jr.test"
IMAGES = ("jr-busybox:latest", "jr-demo/python:v1", "jr-demo/r:v1", "jr-tools:latest")


def require_docker() -> None:
    """Skip unless a Docker engine answers and the images scripts/build-images makes are present."""
    from jobrunner_lib.docker import engine as docker

    try:
        docker.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no Docker here"
        pytest.skip(f"Docker not available: {exc}")
    for image in IMAGES:
        if not docker.image_exists(image):
            pytest.skip(f"image {image} missing: run scripts/build-images")


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root: relative path -> content."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


class Rig:
    """One private jr installation: workdir, label, tools, service, and what they left behind."""

    def __init__(self, base: Path, **env: str):
        self.base = base
        self.workdir = base / "workdir"
        self.label = uuid.uuid4().hex
        self.env = tool_env(
            self.workdir,
            JR_EXTRA_LABELS=f"{TEST_LABEL_KEY}={self.label}",
            JR_USER="tester",
            POLL_INTERVAL="0.5",
            MAX_WORKERS="2",
            COPY_STALL_TIMEOUT="60",
        )
        self.env.update(env)
        self._services: list[subprocess.Popen[bytes]] = []

    # -- places --

    @property
    def high(self) -> Path:
        return self.workdir / "high_privacy"

    @property
    def medium(self) -> Path:
        return self.workdir / "medium_privacy"

    @property
    def db_path(self) -> Path:
        return self.workdir / "db.sqlite"

    def log_dirs(self, job_id: str) -> list[Path]:
        """Every `$HIGH/logs/YYYY-MM/os-job-<id>/` of the job (there should be exactly one)."""
        return sorted((self.high / "logs").glob(f"*/os-job-{job_id}"))

    # -- tools --

    def tool(self, name: str, *args: str, timeout: float = 120, **env: str):
        """Run bin/<name> with this rig's environment; a CompletedProcess with text output."""
        return subprocess.run(
            [sys.executable, str(BIN / name), *args],
            input="",
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, **env},
            cwd=str(self.base),
        )

    def add(self, repo: Path, *actions: str, workspace: str = "test") -> list[str]:
        """jr-add-job; the new job ids."""
        result = self.tool("jr-add-job", str(repo), *actions, "--workspace", workspace, "-o", "ids")
        assert result.returncode == 0, result.stderr
        ids = result.stdout.split()
        assert ids, result.stderr
        return ids

    def start_service(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """service/jr-service in its own process group; its output goes to a file in base."""
        n = len(self._services)
        out = open(self.base / f"service-{n}.log", "wb")  # noqa: SIM115 - closed by the child
        try:
            proc = subprocess.Popen(
                ["bash", str(SERVICE), *args],
                env={**self.env, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.base),
                start_new_session=True,
            )
        finally:
            out.close()
        self._services.append(proc)
        return proc

    def service_log(self, proc: subprocess.Popen[bytes]) -> str:
        n = self._services.index(proc)
        return (self.base / f"service-{n}.log").read_text(errors="replace")

    def until_idle(self, timeout: float = 120, **env: str) -> float:
        """Run `jr-service --until-idle` to the end; its duration. Fails on timeout or error."""
        start = time.monotonic()
        proc = self.start_service("--until-idle", **env)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group(proc)
            pytest.fail(
                f"jr-service --until-idle did not finish in {timeout}s:\n{self.service_log(proc)[-4000:]}"
            )
        assert rc == 0, self.service_log(proc)[-4000:]
        return time.monotonic() - start

    @staticmethod
    def kill_group(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a service and everything in its process group (its current jr-run-once too)."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    # -- the store --

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        conn = sqlite3.connect(str(self.db_path), timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def jobs(self, ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Job rows by id (all jobs, or those ids), JSON columns left as text."""
        rows = self.query("SELECT * FROM job")
        found = {row["id"]: dict(row) for row in rows}
        if ids is None:
            return found
        return {i: found[i] for i in ids}

    def by_action(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        return {job["action"]: job for job in self.jobs(ids).values()}

    def dump(self) -> str:
        """The whole database as SQL text (to compare before and after)."""
        conn = sqlite3.connect(str(self.db_path), timeout=30)
        try:
            return "\n".join(conn.iterdump())
        finally:
            conn.close()

    # -- processes --

    def worker_pids(self) -> dict[int, str]:
        """pid -> job id (the one it drives now) of every live worker with this rig's WORKDIR."""
        mine = f"WORKDIR={self.workdir}".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if b"jobrunner_lib.jobs.worker" not in argv:
                    continue
                if mine not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue  # gone meanwhile
            if state in ("Z", "X"):
                continue
            after = argv[argv.index(b"jobrunner_lib.jobs.worker") + 1 :]
            found[int(entry.name)] = after[0].decode() if after else ""
        # A worker goes on to drive the next job itself: the store says which one it has now.
        if found and self.db_path.exists():
            marks = ",".join("?" * len(found))
            rows = self.query(
                f"SELECT id, worker_pid FROM job WHERE state = 'running' AND worker_pid IN ({marks})",
                tuple(found),
            )
            found.update({row["worker_pid"]: row["id"] for row in rows})
        return found

    def kill_workers(self, tally: Counter[str] | None = None, at_most: int = 0) -> list[str]:
        """SIGKILL every worker of this rig (and its process group); the job ids hit.

        Repeats until none is left, as a dying worker's pass may have just started another.
        With at_most, a job whose workers `tally` counts as killed that often already is spared
        (its worker is left running); each kill is counted in tally.
        """
        tally = Counter() if tally is None else tally
        hit: list[str] = []
        for _ in range(50):
            pids = {
                pid: job_id
                for pid, job_id in self.worker_pids().items()
                if not at_most or tally[job_id] < at_most
            }
            if not pids:
                return hit
            for pid, job_id in pids.items():
                try:
                    if os.getpgid(pid) == pid:
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                    hit.append(job_id)
                    tally[job_id] += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        raise AssertionError(f"workers keep appearing: {self.worker_pids()}")

    def wait_workers_gone(self, timeout: float = 30) -> None:
        wait_for(lambda: not self.worker_pids(), timeout, "job workers to exit")

    # -- Docker --

    def label_filter(self, **more: str) -> dict[str, list[str]]:
        labels = [f"{TEST_LABEL_KEY}={self.label}", *(f"{k}={v}" for k, v in more.items())]
        return {"label": labels}

    def containers(self, *, running: bool = False) -> list[dict[str, Any]]:
        from jobrunner_lib.docker import engine as docker

        filters = self.label_filter()
        if running:
            filters["status"] = ["running"]
        return docker.client().api.containers(all=not running, filters=filters)

    @property
    def volumes_dir(self) -> Path:
        """Where this rig's host-stored volumes live (VOLUME_STORAGE=host)."""
        return Path(self.env.get("VOLUMES_DIR") or self.workdir / "volumes")

    def volumes(self) -> list[dict[str, Any]]:
        """Our Docker volumes, and our host-stored volumes (as {"Name", "Labels", "Path"})."""
        from jobrunner_lib.docker import engine as docker

        found = docker.client().api.volumes(filters=self.label_filter()).get("Volumes") or []
        prefix = docker.volume_name("")
        for path in sorted(self.volumes_dir.glob(f"{prefix}*")):
            job_id = path.name[len(prefix) :]
            found.append({"Name": path.name, "Labels": {"org.jr.job-id": job_id}, "Path": path})
        return found

    def cleanup(self) -> None:
        """Stop our services and workers; remove our containers and volumes; nothing else."""
        from jobrunner_lib.docker import engine as docker

        for proc in self._services:
            self.kill_group(proc)
        self.kill_workers()
        api = docker.client().api
        for c in api.containers(all=True, filters=self.label_filter()):
            try:
                api.remove_container(c["Id"], force=True)
            except Exception:  # noqa: BLE001 - already going
                pass
        for v in self.volumes():
            try:
                if "Path" in v:
                    shutil.rmtree(v["Path"])
                else:
                    api.remove_volume(v["Name"], force=True)
            except Exception:  # noqa: BLE001
                pass


@contextmanager
def rig_at(base: Path, **env: str) -> Iterator[Rig]:
    """A Rig in base, cleaned up afterwards whatever happens."""
    require_docker()
    rig = Rig(base, **env)
    try:
        yield rig
    finally:
        rig.cleanup()


class ContainerCounter:
    """Counts this rig's running job containers (`os-job-*`) in a background thread; keeps the max."""

    def __init__(self, rig: Rig, interval: float = 0.05):
        self.rig, self.interval = rig, interval
        self.max = 0
        self.samples = 0
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="container counter", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> ContainerCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                names = [
                    name.lstrip("/")
                    for c in self.rig.containers(running=True)
                    for name in c["Names"]
                    if name.lstrip("/").startswith("os-job-")
                ]
                self.samples += 1
                self.seen.update(names)
                self.max = max(self.max, len(names))
                self._stop.wait(self.interval)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


class StartEvents:
    """Records every `start` of one of this rig's job containers, from Docker's event stream."""

    def __init__(self, rig: Rig):
        from jobrunner_lib.docker import engine as docker

        filters = {**rig.label_filter(), "type": ["container"], "event": ["start"]}
        self._stream = docker.client().api.events(decode=True, filters=filters)
        self.starts: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="docker events", daemon=True)

    def __enter__(self) -> StartEvents:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.close()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            for event in self._stream:
                name = (event.get("Actor") or {}).get("Attributes", {}).get("name", "")
                if name.startswith("os-job-"):
                    job_id = name[len("os-job-") :]
                    self.starts[job_id] = self.starts.get(job_id, 0) + 1
        except Exception:  # noqa: BLE001 - the stream is closed under us at the end
            pass


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
