"""A private Docker daemon for tests that stop, kill or restart Docker.

The machine's own daemon is never touched: `PrivateDockerd` runs a second `dockerd` with its own
socket, data root, exec root and pid file in a short temporary directory, with no bridge and no
iptables rules (jobs use network none), and its own managed containerd under the exec root. It
needs root. `cleanup()` stops it (SIGTERM, then SIGKILL), kills whatever it left running (found by
the unique directory in their command line, so never anything of the main daemon), unmounts
everything under the directory and removes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# A unix socket path must fit in 108 bytes; containerd's socket sits deepest, under exec/containerd.
MAX_SOCKET_PATH = 100
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
DEFAULT_IMAGES = ("jr-busybox:latest", "jr-demo/python:v1")


def _short_tempdir() -> Path:
    """A fresh directory whose path is short enough for the daemons' unix sockets."""
    base = Path(tempfile.gettempdir())
    if len(str(base)) > 40:
        base = Path("/tmp")
    return Path(tempfile.mkdtemp(prefix="jrd-", dir=str(base)))


def _pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains text (our unique directory)."""
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


class PrivateDockerd:
    """One private dockerd in its own directory; start, stop and start it again on the same data."""

    def __init__(self, base: Path | None = None, *, live_restore: bool = False):
        self.base = base or _short_tempdir()
        self.live_restore = live_restore
        self.sock = self.base / "docker.sock"
        self.data_root = self.base / "data"
        self.exec_root = self.base / "exec"
        self.pidfile = self.base / "docker.pid"
        self.log_path = self.base / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None
        if len(str(self.exec_root / "containerd" / "containerd.sock.ttrpc")) > MAX_SOCKET_PATH:
            raise RuntimeError(f"{self.base} is too long a path for the daemons' sockets")

    @property
    def host(self) -> str:
        """The value for DOCKER_HOST."""
        return f"unix://{self.sock}"

    def command(self) -> list[str]:
        """The dockerd command line: everything it owns lives under self.base."""
        config = self.base / "daemon.json"
        if not config.exists():
            # An empty config file, so the machine's /etc/docker/daemon.json (hosts, bridge) is
            # not read: it could point this daemon at the main one's socket or network.
            config.write_text("{}\n")
        # Its own network namespace: with --bridge=none a daemon deletes any `docker0` it sees,
        # which in the host's namespace would be the main daemon's bridge.
        netns = ["unshare", "--net", "--"] if shutil.which("unshare") else []
        return [
            *netns,
            shutil.which("dockerd") or "dockerd",
            "--config-file",
            str(config),
            "--host",
            self.host,
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.pidfile),
            # No docker0 bridge and no iptables rules: nothing that could clash with the main
            # daemon's networking. Jobs run with network none.
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--ip6tables=false",
            "--userland-proxy=false",
            # Off (the default): a stopping daemon stops its containers. On: they keep running.
            f"--live-restore={'true' if self.live_restore else 'false'}",
        ]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the daemon (on whatever data it already has) and wait until it answers."""
        if self.running:
            return
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Its own session: a Ctrl-C at the test runner does not reach it, cleanup stops it.
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with {self.proc.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                self.client().ping()
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"dockerd did not answer in {timeout}s:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.1)

    @property
    def running(self) -> bool:
        """Whether the daemon process this object started is still alive."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> float:
        """SIGTERM the daemon (as a service manager would) and wait for it to exit; its duration.

        Without live-restore its containerd and shims stop too, and we wait for them; with it they
        stay, running the containers, until the daemon comes back.
        """
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if not self.live_restore:
            self._wait_children_gone(timeout)
        self._close_client()
        return time.monotonic() - start

    def kill(self) -> None:
        """SIGKILL the daemon (a crash); its containerd and shims are left as a crash leaves them."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._close_client()

    def client(self) -> Any:
        """A Docker SDK client for this daemon (not the process-wide one jr uses)."""
        import docker

        if self._client is None:
            self._client = docker.DockerClient(base_url=self.host, timeout=60)
        return self._client

    def _close_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing a client to a dead daemon
                pass
            self._client = None

    def load_images(self, images: Sequence[str]) -> None:
        """Copy images from the main daemon: `docker save ... | docker -H <ours> load`."""
        main_env = dict(os.environ)
        ours_env = {**os.environ, "DOCKER_HOST": self.host}
        ours_env.pop("DOCKER_CONTEXT", None)
        save = subprocess.Popen(["docker", "save", *images], stdout=subprocess.PIPE, env=main_env)
        try:
            load = subprocess.run(
                ["docker", "load", "-q"],
                stdin=save.stdout,
                capture_output=True,
                text=True,
                env=ours_env,
                timeout=300,
                check=False,
            )
        finally:
            assert save.stdout is not None
            save.stdout.close()
            save_rc = save.wait(timeout=300)
        if save_rc != 0 or load.returncode != 0:
            raise RuntimeError(f"loading {images} failed: save {save_rc}, load {load.stderr}")

    def log_tail(self, lines: int = 40) -> str:
        """The end of the daemon's log (for failure messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait_children_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in _pids_mentioning(str(self.base))):
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)

    def cleanup(self) -> None:
        """Stop the daemon, kill what it left, unmount everything under base and remove base."""
        try:
            if self.running:
                # Containers first: with live-restore their processes would outlive the daemon.
                try:
                    for container in self.client().containers.list(all=True):
                        container.remove(force=True)
                except Exception:  # noqa: BLE001 - the daemon may be half-dead; carry on
                    pass
            self.stop(timeout=30)
        finally:
            self._close_client()
            # containerd, shims and runc processes carry our directory in their command lines.
            for _ in range(20):
                pids = [p for p in _pids_mentioning(str(self.base)) if _alive(p)]
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            self._unmount_all()
            shutil.rmtree(self.base, ignore_errors=True)

    def _unmount_all(self) -> None:
        """Unmount overlay, shm and netns mounts under base, deepest first."""
        prefix = str(self.base) + "/"
        for _ in range(5):
            with open("/proc/self/mounts", encoding="utf-8") as fh:
                points = [
                    line.split()[1].encode().decode("unicode_escape") for line in fh if line.strip()
                ]
            ours = sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)
            if not ours:
                return
            for point in ours:
                if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
                    subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def skip_unless_possible() -> None:
    """Skip unless we are root on Linux with dockerd installed and the main daemon's images."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("a private dockerd needs root")
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.skip("dockerd and the docker CLI are needed")
    from tests.support.e2e import require_docker

    require_docker()


@contextmanager
def private_dockerd(
    images: Sequence[str] = DEFAULT_IMAGES, *, live_restore: bool = False
) -> Iterator[PrivateDockerd]:
    """A started private dockerd holding the given images; removed afterwards whatever happens."""
    skip_unless_possible()
    daemon = PrivateDockerd(live_restore=live_restore)
    try:
        daemon.start()
        daemon.load_images(images)
        yield daemon
    finally:
        daemon.cleanup()
