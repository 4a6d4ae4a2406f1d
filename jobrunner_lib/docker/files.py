"""Files in a job's volume through Docker: copies in and out, the helper's listing, a path's stat.

Copies are tar streams (tarstream.py builds them, extract.py writes what comes out) guarded
against hangs: a copy that stops moving is abandoned and its container reported broken, never
touched again. The stopped helper container, which mounts the volume at /workspace, is created
here; every call goes through engine.py's client and its error translation.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobrunner_lib.core.config import Config
from jobrunner_lib.docker import extract, tarstream
from jobrunner_lib.docker.engine import (
    BROKEN_MESSAGE,
    WORKSPACE,
    BrokenContainerError,
    DiskFull,
    _create,
    calls,
    client,
    helper_name,
    inspect_container,
    labels,
    remove_container,
    workspace_source,
)


def create_helper(config: Config, job_id: str) -> str:
    """Create (if missing) the stopped helper container with the volume at /workspace."""
    name = helper_name(job_id)
    api = client().api
    host_config = api.create_host_config(
        binds={workspace_source(config, job_id): {"bind": WORKSPACE, "mode": "rw"}},
        network_mode="none",
        security_opt=["no-new-privileges"],
        # Root only to read whatever the job wrote (even mode 000): nothing more than that.
        cap_drop=["ALL"],
        cap_add=["DAC_READ_SEARCH"],
    )
    _create(
        name,
        config.helper_image,
        ["sh", "-c", tarstream.LIST_SCRIPT],
        host_config,
        labels=labels(config.backend, job_id),
        working_dir=WORKSPACE,
        user="0:0",
    )
    return name


def empty_host_dir(config: Config, path: Path) -> None:
    """Delete everything in a host directory through a short-lived helper container.

    For a jr that is not root, facing files the job's user made in directories of its own
    (volumes.remove_host_dir). The helper is root with only the rights to delete, no network.
    """
    api = client().api
    host_config = api.create_host_config(
        binds={str(path): {"bind": WORKSPACE, "mode": "rw"}},
        network_mode="none",
        security_opt=["no-new-privileges"],
        cap_drop=["ALL"],
        cap_add=["DAC_OVERRIDE", "FOWNER"],
    )
    name = f"{path.name}-cleaner"
    remove_container(name)
    job_id = path.name.rsplit("-", 1)[-1]
    # Globs that match nothing stay as they are, and rm -f ignores them.
    script = f"cd {WORKSPACE} && rm -rf -- * .[!.]* ..?*"
    _create(
        name,
        config.helper_image,
        ["sh", "-c", script],
        host_config,
        labels=labels(config.backend, job_id),
        user="0:0",
    )
    try:
        with calls(f"empty {path}"):
            api.start(name)
            status = api.wait(name)["StatusCode"]
            if status != 0:
                err = api.logs(name, stdout=False, stderr=True).decode(errors="replace")
                raise RuntimeError(f"emptying {path} failed ({status}): {err.strip()}")
    finally:
        remove_container(name)


def put_archive(
    container: str,
    path: str,
    chunks: Iterable[bytes],
    *,
    progress: tarstream.Progress,
    stall_timeout: float,
    what: str,
) -> None:
    """Stream a tar into a container at path, abandoning it if it stops moving (BrokenContainerError)."""
    data = tarstream.counted(chunks, progress)

    def call() -> None:
        with calls(what):
            client().api.put_archive(container, path, data)

    guarded(call, container, progress, stall_timeout, what)


def copy_file_out(
    container: str, path: str, dest: Path, *, progress: tarstream.Progress, stall_timeout: float
) -> int:
    """Copy one regular file out of a container to dest (temp file, then rename); its size."""
    what = f"copy of {path} out of {container}"

    def call() -> int:
        with calls(what):
            stream, _stat = client().api.get_archive(container, path, chunk_size=tarstream.CHUNK)
            try:
                # The pieces (one HTTP chunk each, ~32 KB) go to the file as they come.
                name = path.rsplit("/", 1)[-1]
                return extract.receive_one_file(stream, name, dest, progress)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:  # a plain write does not say which file it was
                    raise DiskFull(path=dest) from exc
                raise
            finally:
                getattr(stream, "close", lambda: None)()

    return guarded(call, container, progress, stall_timeout, what)


def guarded(
    call: Any, container: str, progress: tarstream.Progress, stall_timeout: float, what: str
) -> Any:
    try:
        return tarstream.run_guarded(call, progress, stall_timeout, what)
    except tarstream.CopyStalled:
        raise BrokenContainerError(
            f"{BROKEN_MESSAGE} (the {what} stalled for {stall_timeout:g}s)", container
        ) from None


def list_volume_files(config: Config, job_id: str) -> list[tarstream.VolumeFile]:
    """Every regular file in the job's volume with size and mtime, from one helper run."""
    helper = helper_name(job_id)
    info = inspect_container(helper)
    if info is None or not info["State"].get("StartedAt", "0001-").startswith("0001-"):
        # A helper's log accumulates over its runs, so one that has run before is replaced.
        remove_container(helper)
        create_helper(config, job_id)
    with calls("list volume"):
        api = client().api
        api.start(helper)
        status = api.wait(helper)["StatusCode"]
        out = api.logs(helper, stdout=True, stderr=False)
        if status != 0:
            err = api.logs(helper, stdout=False, stderr=True).decode(errors="replace")
            raise RuntimeError(f"listing files in {helper} failed ({status}): {err.strip()}")
    return tarstream.parse_listing(out)


# Go's os.FileMode type bits, as Docker reports them in a path stat: dir, symlink, named pipe,
# socket, device, char device, irregular. A regular file has none of them.
_GO_MODE_DIR = 1 << 31


_GO_MODE_TYPE = _GO_MODE_DIR | 1 << 27 | 1 << 25 | 1 << 24 | 1 << 26 | 1 << 21 | 1 << 19


@dataclass(frozen=True)
class PathStat:
    """What Docker says of one path in a container (the last component is not followed)."""

    size: int
    mode: int

    @property
    def is_dir(self) -> bool:
        return bool(self.mode & _GO_MODE_DIR)

    @property
    def is_file(self) -> bool:
        return not self.mode & _GO_MODE_TYPE


def stat_path(container: str, path: str) -> PathStat | None:
    """Stat one path in a (created or stopped) container with a HEAD request; None if absent.

    Docker resolves symlinks in the directories leading to it (inside the container), but not
    the last component: a caller must stat each directory to be sure none is a symlink.
    """
    import base64
    import json

    with calls(f"stat {path}"):
        api = client().api
        res = api.head(api._url("/containers/{0}/archive", container), params={"path": path})
        if res.status_code == 404:
            return None
        api._raise_for_status(res)
        header = res.headers.get("x-docker-container-path-stat")
        if not header:
            raise RuntimeError(f"Docker gave no stat for {path} in {container}")
        stat = json.loads(base64.b64decode(header))
        return PathStat(int(stat.get("size") or 0), int(stat.get("mode") or 0))
