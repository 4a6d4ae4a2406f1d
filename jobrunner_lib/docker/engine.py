"""The Docker client (the Docker SDK, imported lazily) and its objects: images, volumes, containers.

Owns the names and labels of every object jr creates (docs/architecture.md#docker-objects-and-labels), and wraps each call with a
timeout and with the error translations the run side relies on: "already exists", "no such" and
"not running" are tolerated so every step can be repeated; "no space left on device" becomes a
JobError; an unreachable daemon becomes DockerUnavailable (exit 75). Files in and out of a job's
volume (copies guarded against hangs, listing, stat) are files.py's, through this client.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import JobError, TemporaryFailure
from jobrunner_lib.core.outputs import (
    MARKER as MARKER,  # re-exported: the marker is a fact of outputs
)

# Every call but waits and copies gives up after this long (the old CLI wrapper's 300 s).
TIMEOUT = 300.0
WORKSPACE = "/workspace"
EXTRA_LABELS_ENV = "JR_EXTRA_LABELS"
BROKEN_MESSAGE = "There was a (hopefully temporary) internal Docker error, please try the job again"

_client: Any = None
_client_lock = threading.Lock()


class BrokenContainerError(JobError):
    """A copy hung: the container may be unresponsive, so it must not be touched again."""

    def __init__(self, message: str, container_name: str):
        super().__init__(message)
        self.container_name = container_name


class DiskFull(JobError):
    """A disk filled up: `Out of disk space[ on <where>], please try again later`.

    `path` is the file being written when we know it (the worker names the disk from it);
    `where` names the disk when the caller already knows which one it is.
    """

    def __init__(self, where: str | None = None, path: Path | str | None = None):
        super().__init__(disk_full_message(where))
        self.where = where
        self.path = Path(path) if path else None


def disk_full_message(where: str | None = None) -> str:
    """The old backend's message, naming the disk when known (docs/reference.md#status-codes-and-messages)."""
    return f"Out of disk space{f' on {where}' if where else ''}, please try again later"


def disk_full_error(exc: BaseException) -> DiskFull | None:
    """A DiskFull for a "no space left" OSError in exc or its causes (naming its file), else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, DiskFull):
            return current
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            # shutil's copies name the destination as filename2; a plain write names nothing.
            name = current.filename2 or current.filename
            return DiskFull(path=os.fsdecode(name) if isinstance(name, (str, bytes)) else None)
        current = current.__cause__ or current.__context__
    return None


class DockerUnavailable(TemporaryFailure):
    """The Docker daemon cannot be reached; retry later (exit 75)."""


class DockerTimeout(Exception):
    """A Docker call did not answer within its timeout (an internal error for the job)."""


def container_name(job_id: str) -> str:
    """The job's container: `os-job-<id>` (also its log directory name)."""
    return f"os-job-{job_id}"


def volume_name(job_id: str) -> str:
    """The job's volume: `os-volume-<id>`."""
    return f"os-volume-{job_id}"


def host_volume_dir(config: Config, job_id: str) -> Path:
    """`$VOLUMES_DIR/os-volume-<id>`: a job volume's files when they are kept on the host."""
    return config.volumes_dir / volume_name(job_id)


def workspace_source(config: Config, job_id: str) -> str:
    """What a job's containers mount at /workspace: its host directory (VOLUME_STORAGE=host, see
    volumes.py) when it has one, else its Docker volume."""
    path = host_volume_dir(config, job_id)
    return str(path) if path.is_dir() and not path.is_symlink() else volume_name(job_id)


def helper_name(job_id: str) -> str:
    """The stopped busybox container used to copy into, list and copy out of the volume."""
    return f"{volume_name(job_id)}-manager"


def labels(
    backend: str, job_id: str, *, workspace: str | None = None, action: str | None = None
) -> dict[str, str]:
    """Labels for a job's Docker objects; job containers also get workspace and action."""
    result = {"job-runner": "true", "org.jr.backend": backend, "org.jr.job-id": job_id}
    if workspace is not None or action is not None:
        result.update(
            {"jobrunner-local": "true", "workspace": workspace or "", "action": action or ""}
        )
    result.update(extra_labels())
    return result


def extra_labels() -> dict[str, str]:
    """Labels from JR_EXTRA_LABELS="k=v,k2=v2" (tests mark their objects so they can remove them)."""
    result = {}
    for item in os.environ.get(EXTRA_LABELS_ENV, "").split(","):
        key, sep, value = item.strip().partition("=")
        if key and sep:
            result[key] = value
    return result


def client() -> Any:
    """The process's Docker client (the SDK honours DOCKER_HOST and friends)."""
    global _client
    with _client_lock:
        if _client is None:
            import docker

            try:
                _client = docker.from_env(timeout=TIMEOUT)
            except docker.errors.DockerException as exc:
                raise DockerUnavailable(f"Docker is not available: {exc}") from None
        return _client


@contextmanager
def calls(what: str, *, missing_ok: bool = False, ok_if: tuple[str, ...] = ()) -> Iterator[None]:
    """Translate SDK errors: daemon gone -> DockerUnavailable, disk full -> JobError.

    missing_ok swallows "no such ..." (404); ok_if swallows errors whose text has one of the
    phrases (e.g. "is not running"), so repeated steps need no special cases.
    """
    import docker
    import requests

    try:
        yield
    except docker.errors.APIError as exc:
        text = str(exc).lower()
        if "no space left on device" in text:
            raise DiskFull("Docker's storage") from exc
        if (missing_ok and exc.status_code == 404) or any(p in text for p in ok_if):
            return
        raise
    except requests.exceptions.Timeout:
        raise DockerTimeout(f"Docker did not answer in time ({what})") from None
    except requests.exceptions.ConnectionError as exc:
        if "timed out" in str(exc).lower():  # how urllib3's read timeout usually surfaces
            raise DockerTimeout(f"Docker did not answer in time ({what})") from None
        raise DockerUnavailable(f"Docker is not available ({what}): {exc}") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # on our side of a copy
            name = exc.filename2 or exc.filename
            raise DiskFull(path=os.fsdecode(name) if name else None) from exc
        raise


def ping_socket() -> bool:
    """Ping a daemon on a local Unix socket without the SDK; False when that does not apply.

    Importing the SDK (with requests and urllib3) costs a short-lived tool ~0.1 s, and a run
    pass with nothing to start needs no more of Docker than this. Raises DockerUnavailable if
    the daemon does not answer; returns False (ask ping()) for any other DOCKER_HOST.
    """
    import socket

    from jobrunner_lib.core.values import docker_host

    host = docker_host()
    if not host.startswith("unix://") or not hasattr(socket, "AF_UNIX"):
        return False
    path = host[len("unix://") :]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status = sock.makefile("rb").readline(200)
    except OSError as exc:
        raise DockerUnavailable(f"Docker is not available: {exc.strerror or exc}") from None
    parts = status.split()
    if len(parts) < 2 or parts[1] != b"200":
        answer = status.decode(errors="replace").strip() or "no answer"
        raise DockerUnavailable(f"Docker is not available: {answer}")
    return True


def ping(*, fresh: bool = False) -> None:
    """Check the daemon answers; raise DockerUnavailable if not.

    fresh: on a new connection. A stopping daemon closes its socket first but goes on answering
    connections already open for a moment, so the process's pooled client may still get answers.
    """
    import docker

    try:
        with calls("ping"):
            if not fresh:
                client().api.ping()
                return
            try:
                new = docker.from_env(timeout=30)
            except docker.errors.DockerException as exc:
                raise DockerUnavailable(f"Docker is not available: {exc}") from None
            try:
                new.api.ping()
            finally:
                new.close()
    except docker.errors.APIError as exc:
        raise DockerUnavailable(f"Docker is not available: {exc}") from None


def image_id(image: str) -> str | None:
    """The local image's id (`sha256:…`), or None if it is not present."""
    with calls("inspect image", missing_ok=True):
        return client().api.inspect_image(image)["Id"]
    return None


def image_exists(image: str) -> bool:
    """Whether the image is present locally (jr never pulls while running jobs)."""
    return image_id(image) is not None


def create_volume(name: str, volume_labels: Mapping[str, str]) -> None:
    """Create a volume; an existing one is fine (the step may be repeated)."""
    with calls("create volume"):
        client().api.create_volume(name=name, labels=dict(volume_labels))


def remove_volume(name: str) -> None:
    """Remove a volume; a missing one is fine."""
    with calls("remove volume", missing_ok=True):
        client().api.remove_volume(name, force=True)


def volume_exists(name: str) -> bool:
    """Whether the volume exists."""
    with calls("inspect volume", missing_ok=True):
        return bool(client().api.inspect_volume(name))
    return False


def inspect_container(name: str) -> dict[str, Any] | None:
    """`docker inspect` of a container, or None if there is no such container."""
    with calls("inspect container", missing_ok=True):
        return client().api.inspect_container(name)
    return None


def _create(
    name: str, image: str, command: list[str], host_config: dict[str, Any], **kwargs: Any
) -> None:
    # "already in use": created by an earlier attempt of this step, which is fine.
    with calls("create container", ok_if=("already in use",)):
        client().api.create_container(
            image, command, name=name, host_config=host_config, detach=True, **kwargs
        )


def create_job_container(
    config: Config,
    job_id: str,
    image: str,
    args: list[str],
    *,
    environment: Mapping[str, str],
    network: str,
    container_labels: Mapping[str, str],
) -> str:
    """Create (if missing) the locked-down job container; it is started by start_container."""
    name = container_name(job_id)
    api = client().api
    limits: dict[str, Any] = {}
    if config.job_memory_limit:
        # Equal swap limit: no swap, so an out-of-memory job is killed (exit 137) instead of thrashing.
        limits.update(mem_limit=config.job_memory_limit, memswap_limit=config.job_memory_limit)
    if config.job_cpu_count:
        limits["nano_cpus"] = int(config.job_cpu_count * 1e9)
    from jobrunner_lib.core import joblog

    host_config = api.create_host_config(
        binds={workspace_source(config, job_id): {"bind": WORKSPACE, "mode": "rw"}},
        network_mode=network,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        pids_limit=config.job_pids_limit,
        init=True,
        # Whatever the daemon's default: `docker logs` works (logs.txt, jr-watch-logs), and a job
        # printing without end fills Docker's disk no more than ours, keeping what logs.txt keeps.
        log_config=joblog.docker_log_config(config.job_log_limit),
        **limits,
    )
    # Values travel in the API request body, never on a command line (docs/architecture.md#docker-objects-and-labels).
    _create(
        name,
        image,
        args,
        host_config,
        # The limit logs.txt keeps, fixed with the Docker log's bound (joblog.container_limit).
        labels={**container_labels, joblog.LIMIT_LABEL: str(config.job_log_limit)},
        working_dir=WORKSPACE,
        user=config.job_user or "",
        environment=dict(environment),
    )
    return name


def start_container(name: str) -> None:
    """Start a created container; one already running is fine."""
    with calls("start container"):
        client().api.start(name)


def wait_container(name: str, timeout: float | None) -> int | None:
    """Wait up to timeout seconds for the container to stop; its exit code, or None if still running."""
    import docker

    try:
        with calls("wait container"):
            return int(client().api.wait(name, timeout=timeout)["StatusCode"])
    except DockerTimeout:
        return None
    except docker.errors.NotFound:
        raise JobError("Job container has vanished") from None


def kill_container(name: str) -> None:
    """Kill a container; a missing or stopped one is fine."""
    with calls("kill container", missing_ok=True, ok_if=("is not running",)):
        client().api.kill(name)


def remove_container(name: str) -> None:
    """Remove a container (killing it if needed); a missing one is fine."""
    with calls("remove container", missing_ok=True, ok_if=("is already in progress",)):
        client().api.remove_container(name, force=True)


def run_to_end(
    name: str,
    image: str,
    command: list[str],
    *,
    environment: Mapping[str, str],
    network: str,
    container_labels: Mapping[str, str],
    user: str | None,
    pids_limit: int,
    timeout: float,
) -> tuple[int | None, str]:
    """Run a short-lived container (locked down like a job's, without a volume) to its end:
    (its exit code, or None if it ran past `timeout` and was killed; its stdout). It is always
    removed afterwards; its environment travels in the API request body, like a job's."""
    api = client().api
    host_config = api.create_host_config(
        network_mode=network,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        pids_limit=pids_limit,
        init=True,
    )
    try:
        _create(
            name,
            image,
            command,
            host_config,
            labels=dict(container_labels),
            user=user or "",
            environment=dict(environment),
        )
        start_container(name)
        code = wait_container(name, timeout)
        if code is None:
            kill_container(name)
        with calls("container logs"):
            out = api.logs(name, stdout=True, stderr=False)
        return code, out.decode("utf-8", errors="replace")
    finally:
        remove_container(name)


def _label_filter(backend: str | None, job_id: str | None, extra: Mapping[str, str] | None) -> dict:
    wanted = {
        "job-runner": "true",
        "org.jr.backend": backend,
        "org.jr.job-id": job_id,
        **(extra or {}),
    }
    return {"label": [f"{k}={v}" for k, v in wanted.items() if v is not None]}


def list_containers(
    backend: str | None = None, *, job_id: str | None = None, extra: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Containers (running or not) carrying the job-runner label, optionally narrowed."""
    with calls("list containers"):
        return client().api.containers(all=True, filters=_label_filter(backend, job_id, extra))


def list_volumes(
    backend: str | None = None, *, job_id: str | None = None, extra: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Volumes carrying the job-runner label, optionally narrowed."""
    with calls("list volumes"):
        return (
            client().api.volumes(filters=_label_filter(backend, job_id, extra)).get("Volumes") or []
        )


def container_logs(
    name: str,
    *,
    follow: bool = False,
    timestamps: bool = True,
    tail: int | str = "all",
    since: Any = None,
    stdout: bool = True,
    stderr: bool = True,
) -> Iterator[bytes]:
    """Stream a container's stdout and/or stderr (interleaved, optionally timestamped) in chunks."""
    with calls("container logs"):
        yield from client().api.logs(
            name,
            stream=True,
            follow=follow,
            timestamps=timestamps,
            tail=tail,
            since=since,
            stdout=stdout,
            stderr=stderr,
        )


def container_stats(name: str) -> dict[str, Any] | None:
    """One immediate stats sample of a running container, or None if it is gone or stopped."""
    import docker

    with calls("container stats"):
        try:
            return client().api.stats(name, stream=False, one_shot=True)
        except docker.errors.NotFound:
            return None
