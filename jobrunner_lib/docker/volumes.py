"""A job's volume: where its files live, and how they get in and out.

Every job's containers see its files at /workspace. Where those files live is VOLUME_STORAGE:

- `docker`: a Docker volume `os-volume-<id>` (docs/architecture.md#docker-objects-and-labels), labelled like the job's other
  objects. Files go in and out through the daemon's archive API, by way of a stopped helper
  container (files.py, copyout.py). Works with any daemon (Docker Desktop on Windows, a
  remote DOCKER_HOST), but each archive call costs ~35 ms however small (the daemon re-executes
  itself to work in a chroot), and a job needs at least two.
- `host` (the default on Linux with a local daemon): a directory `$VOLUMES_DIR/os-volume-<id>/`
  (VOLUMES_DIR defaults to `$WORKDIR/volumes`, private to jr's user: mode 0700) bind-mounted at
  /workspace. jr writes the code and inputs there and reads the outputs from there itself: no
  helper container, no archive call, no Docker volume. (A named volume whose local driver binds
  the directory would keep the name, but Docker loses count of its mounts when the daemon
  restarts with live-restore, and then cannot remove it: moby/moby#44422, #46148.)

Nothing a job leaves in its volume is trusted: on the host, paths are walked one directory at a
time without ever following a link (a job's `ln -s /etc output` must not make jr read or write
the host's files), only regular files are read (never a FIFO or a device node), and a file or
directory jr may not read (the job's user made it private, and jr is not root) goes through the
archive API instead, as with `docker` storage. Whether a job's volume is on the host is decided
when it is prepared and read back from the directory's existence, so a change of VOLUME_STORAGE
never strands a job prepared before it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from jobrunner_lib.core import outputs
from jobrunner_lib.core.config import Config
from jobrunner_lib.core.models import Job
from jobrunner_lib.docker import copyout, extract, tarstream
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker import files as docker_files
from jobrunner_lib.docker.hostfs import (
    Owner,
    copy_out_of_host,
    list_on_host,
)


def host_dir(config: Config, job_id: str) -> Path:
    """`$VOLUMES_DIR/os-volume-<id>`: the files of a host-stored volume."""
    return docker.host_volume_dir(config, job_id)


def on_host(config: Config, job_id: str) -> bool:
    """Whether this job's volume keeps its files on the host (prepare made its directory)."""
    return docker.workspace_source(config, job_id) != docker.volume_name(job_id)


def exists(config: Config, job_id: str) -> bool:
    """Whether the job has a volume, on the host or in Docker."""
    return on_host(config, job_id) or docker.volume_exists(docker.volume_name(job_id))


def host_owner(uid: int | None, gid: int | None) -> Owner:
    """The job user's ids when jr may give files to it (as root, or being that user), else none.

    Without an owner the volume's directories and files are made writable by everyone, as the
    archive path does without a job user; the volumes directory above them is jr's alone.
    """
    if uid is None:
        return None, None
    if os.geteuid() == 0 or (uid == os.geteuid() and gid in (None, os.getegid())):
        return uid, gid
    return None, None


# ---- the volume's life -----------------------------------------------------------------------


def create(config: Config, job_id: str) -> Path | None:
    """Create the job's volume, empty; with host storage, its directory (returned)."""
    if config.volume_storage != "host":
        docker.create_volume(docker.volume_name(job_id), docker.labels(config.backend, job_id))
        return None
    root = host_dir(config, job_id)
    config.volumes_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(config.volumes_dir, 0o700)
    root.mkdir(mode=0o700)
    return root


def remove(config: Config, job_id: str) -> None:
    """Remove the job's volume (its containers must be gone), wherever it is."""
    if on_host(config, job_id):
        remove_host_dir(config, host_dir(config, job_id))
    else:
        docker.remove_volume(docker.volume_name(job_id))


def reset(config: Config, job_id: str) -> None:
    """Remove whatever an interrupted preparation left: its helper and volume.

    With host storage and no directory left, there is nothing (a helper is only ever made
    for a directory), so no Docker call is made. Objects of an attempt made with the other
    storage before VOLUME_STORAGE changed are left to jr-prune.
    """
    leftover = on_host(config, job_id)
    if config.volume_storage != "host" or leftover:
        docker.remove_container(docker.helper_name(job_id))
    if config.volume_storage != "host":
        docker.remove_volume(docker.volume_name(job_id))
    if leftover:
        remove_host_dir(config, host_dir(config, job_id))


def remove_host_dir(config: Config, path: Path) -> None:
    """Remove a volume directory and everything in it; a missing one is fine.

    Files the job's user made in directories of its own cannot be removed by a jr that is not
    root: a short-lived helper container (root, with only the rights to delete) empties the
    directory first.
    """
    try:
        shutil.rmtree(path)  # never follows a link (the fd-based version, on Linux)
    except FileNotFoundError:
        return
    except PermissionError:
        docker_files.empty_host_dir(config, path)
        shutil.rmtree(path, ignore_errors=False)


def host_volumes(config: Config) -> dict[str, Path]:
    """job id -> directory, for every host-stored volume in VOLUMES_DIR."""
    prefix = docker.volume_name("")
    try:
        entries = list(os.scandir(config.volumes_dir))
    except FileNotFoundError:
        return {}
    return {
        e.name[len(prefix) :]: Path(e.path)
        for e in entries
        if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False)
    }


# ---- looking at and copying out ----------------------------------------------------------------


def output_files(config: Config, job: Job) -> list[tarstream.VolumeFile]:
    """Every regular file in the job's volume (path relative to it, size, mtime)."""
    if on_host(config, job.id):
        try:
            return list_on_host(host_dir(config, job.id))
        except PermissionError:
            pass  # a directory jr may not read: the helper can
    return declared_files(job) or docker_files.list_volume_files(config, job.id)


def declared_files(job: Job) -> list[tarstream.VolumeFile] | None:
    """The job's outputs without listing a Docker-stored volume, when that is safe; None to list.

    Listing runs the helper container (a container start, ~0.2 s). When every output pattern is a
    literal path (the common case) a few stats say all we need: each pattern names a regular
    file and no directory on the way is a symlink (Docker follows those). Anything else (a glob,
    a missing file, a symlink, a directory) returns None, and the full listing decides as usual.
    From copyout.DIRECTORY_MIN_FILES outputs on, the listing is needed anyway: only it tells
    whether a directory archive would also carry big unwanted files.
    """
    patterns = list(
        dict.fromkeys(p for group in job.output_spec.values() for p in (group or {}).values())
    )
    if not patterns or len(patterns) >= copyout.DIRECTORY_MIN_FILES:
        return None
    if any("*" in p or outputs.name_problem(p) for p in patterns):
        return None
    helper = docker.helper_name(job.id)
    if docker.inspect_container(helper) is None:
        return None  # a host-stored volume whose directory jr may not read: list it
    directories = sorted(
        {"/".join(p.split("/")[:depth]) for p in patterns for depth in range(1, p.count("/") + 1)}
    )
    for directory in directories:
        found = docker_files.stat_path(helper, f"{docker.WORKSPACE}/{directory}")
        if found is None or not found.is_dir:
            return None
    files = []
    for path in patterns:
        found = docker_files.stat_path(helper, f"{docker.WORKSPACE}/{path}")
        if found is None or not found.is_file:
            return None
        files.append(tarstream.VolumeFile(path, found.size, 0))
    return files


def copy_outputs(
    config: Config,
    job: Job,
    files: Sequence[tarstream.VolumeFile],
    destinations: Mapping[str, Sequence[Path]],
    *,
    progress: tarstream.Progress,
    starting: Callable[[str], None] = lambda path: None,
) -> None:
    """Copy each path in destinations out of the job's volume to each of its destinations.

    Raises tarstream.UnsafeArchive for a path that is not a regular file.
    """
    helper = docker.helper_name(job.id)
    if not on_host(config, job.id):
        copyout.copy_outputs(
            helper,
            files,
            destinations,
            progress=progress,
            stall_timeout=config.copy_stall_timeout,
            starting=starting,
        )
        return
    root = host_dir(config, job.id)
    for path, (first, *others) in destinations.items():
        starting(path)
        try:
            copy_out_of_host(root, path, first, progress)
        except PermissionError:
            # Private to the job's user: the helper (root, allowed to read) copies it.
            docker_files.create_helper(config, job.id)
            docker_files.copy_file_out(
                helper,
                f"{docker.WORKSPACE}/{path}",
                first,
                progress=progress,
                stall_timeout=config.copy_stall_timeout,
            )
        for other in others:
            extract.atomic_copy(first, other)
