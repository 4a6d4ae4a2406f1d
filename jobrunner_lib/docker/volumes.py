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

import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, cast

from jobrunner_lib.core import outputs
from jobrunner_lib.core.config import Config
from jobrunner_lib.core.models import Job
from jobrunner_lib.docker import copyout, extract, tarstream
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker import files as docker_files

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_DIR_FLAGS = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
# Errors of opening a directory that is a link or not a directory at all.
_NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR)
# How much one copy_file_range call moves (the progress ticks between them).
COPY_PIECE = 8 * 2**20

Owner = tuple[int | None, int | None]


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


# ---- copying in ------------------------------------------------------------------------------


def extract_on_host(
    root: Path, chunks: Iterable[bytes], owner: Owner, progress: tarstream.Progress
) -> None:
    """Write a copy-in tar stream (executor's `_volume_tar`) into a host volume directory.

    As the daemon's put_archive would: members in order, an existing name of another kind
    replaced, files and directories given the member's mode (and the owner, when given) and
    files its modification time; never through a link, so a symlink in the code cannot send an
    input out of the volume.
    """
    prefix = docker.WORKSPACE.strip("/")
    uid, gid = owner
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        with tarfile.open(
            fileobj=cast(IO[bytes], extract.IterReader(chunks, progress)),
            mode="r|",
            bufsize=tarstream.CHUNK,
        ) as tar:
            for member in tar:
                name = tarstream.safe_member_name(member.name)
                if name == prefix:
                    _set_mode(root_fd, member.mode, uid, gid)
                    continue
                if not name.startswith(prefix + "/"):
                    raise tarstream.UnsafeArchive(f"unexpected path in archive: {name!r}")
                rel = name[len(prefix) + 1 :]
                *parents, last = rel.split("/")
                parent = _open_dirs(root, root_fd, parents, uid, gid)
                try:
                    if member.isdir():
                        where = "/".join(parents)
                        os.close(_make_dir(root, parent, where, last, member.mode, uid, gid))
                    elif member.issym():
                        _clear(root, parent, rel)
                        os.symlink(member.linkname, last, dir_fd=parent)
                        if uid is not None:
                            os.chown(
                                last,
                                uid,
                                -1 if gid is None else gid,
                                dir_fd=parent,
                                follow_symlinks=False,
                            )
                    elif member.isreg():
                        _clear(root, parent, rel)
                        source = tar.extractfile(member)
                        assert source is not None  # a regular file always has data
                        _write_file(parent, last, source, member, uid, gid)
                finally:
                    if parent != root_fd:
                        os.close(parent)
    finally:
        os.close(root_fd)


def copy_into_host(
    root: Path, rel: str, source: Path, owner: Owner, progress: tarstream.Progress
) -> None:
    """Copy a host file (a job's input) to rel in a host volume directory, in the kernel.

    As the copy-in tar stream would put it: parent directories made (or made real) where
    needed, whatever is at rel replaced, never through a link; mode 0644 (0666 without an
    owner) and the source's modification time.
    """
    uid, gid = owner
    if not outputs.is_safe_relative_path(rel):
        raise tarstream.UnsafeArchive(f"unsafe path {rel!r}")
    *parents, last = rel.split("/")
    with open(source, "rb") as src:
        st = os.fstat(src.fileno())
        root_fd = os.open(root, _DIR_FLAGS)
        try:
            parent = _open_dirs(root, root_fd, parents, uid, gid)
            try:
                _clear(root, parent, rel)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
                fd = os.open(last, flags, 0o600, dir_fd=parent)
                try:
                    _copy_fd(src.fileno(), fd, progress)
                    if os.fstat(fd).st_size != st.st_size:
                        raise OSError(f"{source} changed size while being copied")
                    _set_mode(fd, 0o644 if uid is not None else 0o666, uid, gid)
                    os.utime(fd, (int(st.st_mtime), int(st.st_mtime)))
                finally:
                    os.close(fd)
            finally:
                if parent != root_fd:
                    os.close(parent)
        finally:
            os.close(root_fd)


def _set_mode(fd: int, mode: int, uid: int | None, gid: int | None) -> None:
    os.fchmod(fd, mode & 0o777)  # never set-user-ID and the like, whatever the archive says
    if uid is not None:
        os.fchown(fd, uid, gid if gid is not None else -1)


def _open_dirs(
    root: Path, root_fd: int, parts: Sequence[str], uid: int | None, gid: int | None
) -> int:
    """An fd of the directory `parts` below root_fd, made (or made real) where needed."""
    fd = root_fd
    for depth, part in enumerate(parts):
        try:
            child = _make_dir(root, fd, "/".join(parts[:depth]), part, None, uid, gid)
        finally:
            if fd != root_fd:
                os.close(fd)
        fd = child
    return fd


def _make_dir(
    root: Path,
    parent: int,
    where: str,
    name: str,
    mode: int | None,
    uid: int | None,
    gid: int | None,
) -> int:
    """Open directory `name` in parent, making it (replacing a non-directory) if needed.

    mode None keeps an existing directory's mode and gives a new one 0755 (0777 without owner).
    """
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        if mode is None:
            return fd
    except FileNotFoundError:
        fd = None
    except OSError as exc:
        if exc.errno not in _NOT_A_DIR:
            raise
        _clear(root, parent, f"{where}/{name}" if where else name)
        fd = None
    if fd is None:
        os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    if mode is None:  # a new directory (an existing one was returned above)
        mode = 0o755 if uid is not None else 0o777
    _set_mode(fd, mode, uid, gid)
    return fd


def _clear(root: Path, parent: int, rel: str) -> None:
    """Remove whatever is at rel (the last part of it, in parent), a directory tree included."""
    name = rel.rsplit("/", 1)[-1]
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(root / rel)  # the directories above it were just opened without links
    else:
        os.unlink(name, dir_fd=parent)


def _write_file(
    parent: int,
    name: str,
    source: IO[bytes],
    member: tarfile.TarInfo,
    uid: int | None,
    gid: int | None,
) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=parent)
    try:
        remaining = member.size
        while remaining:
            chunk = source.read(min(tarstream.CHUNK, remaining))
            if not chunk:
                raise tarstream.UnsafeArchive(f"archive ended inside {member.name}")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            remaining -= len(chunk)
        _set_mode(fd, member.mode, uid, gid)
        os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)


# ---- looking at and copying out ----------------------------------------------------------------


def output_files(config: Config, job: Job) -> list[tarstream.VolumeFile]:
    """Every regular file in the job's volume (path relative to it, size, mtime)."""
    if on_host(config, job.id):
        try:
            return list_on_host(host_dir(config, job.id))
        except PermissionError:
            pass  # a directory jr may not read: the helper can
    return declared_files(job) or docker_files.list_volume_files(config, job.id)


def list_on_host(root: Path) -> list[tarstream.VolumeFile]:
    """The regular files under root, found without following a link. PermissionError if a
    directory cannot be read."""
    files: list[tarstream.VolumeFile] = []
    # Depth first, holding open only the directories on the way to the current one: a job may
    # leave thousands of directories side by side, far more than a service's 1024 open files.
    # Every fd opened is on the stack, or already closed.
    stack = [("", *_open_listing(root))]
    try:
        while stack:
            rel, fd, pending = stack[-1]
            if not pending:
                stack.pop()
                os.close(fd)
                continue
            entry = pending.pop()
            path = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                stack.append((path, *_open_listing(entry.name, fd)))
            elif stat.S_ISREG(st.st_mode):
                files.append(tarstream.VolumeFile(path, st.st_size, int(st.st_mtime)))
    finally:
        for _, fd, _ in stack:
            os.close(fd)
    return files


def _open_listing(path: str | Path, dir_fd: int | None = None) -> tuple[int, list[os.DirEntry]]:
    """An open directory (never through a link) and its entries, last first (they are popped)."""
    fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        with os.scandir(fd) as entries:
            return fd, list(entries)[::-1]
    except BaseException:
        os.close(fd)
        raise


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


def copy_out_of_host(root: Path, rel: str, dest: Path, progress: tarstream.Progress) -> int:
    """Copy the regular file rel under root to dest (temporary file, then rename); its size.

    UnsafeArchive if rel is not a regular file or a directory on its way is not a directory.
    """
    source = _open_regular(root, rel)
    try:
        size = os.fstat(source).st_size
        dest.parent.mkdir(parents=True, exist_ok=True)
        extract.write_atomically(
            [dest], lambda outs: _copy_fd(source, outs[0].fileno(), progress), progress
        )
        return size
    finally:
        os.close(source)


def _open_regular(root: Path, rel: str) -> int:
    parts = rel.split("/")
    if not outputs.is_safe_relative_path(rel):
        raise tarstream.UnsafeArchive(f"unsafe path {rel!r}")
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in _NOT_A_DIR:
                    raise tarstream.UnsafeArchive(f"{rel}: {part} is not a directory") from None
                raise
            os.close(fd)
            fd = child
        st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise tarstream.UnsafeArchive(f"{rel} is not a regular file")
        flags = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC
        source = os.open(parts[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(source).st_mode):  # replaced since the stat
        os.close(source)
        raise tarstream.UnsafeArchive(f"{rel} is not a regular file")
    return source


def _copy_fd(source: int, dest: int, progress: tarstream.Progress) -> None:
    """Copy all of source to dest in the kernel where it can (copy_file_range, then sendfile)."""
    for copy in (_copy_file_range, _sendfile):
        try:
            while moved := copy(source, dest):
                progress.tick(moved)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            os.lseek(source, 0, os.SEEK_SET)
            os.lseek(dest, 0, os.SEEK_SET)
            os.ftruncate(dest, 0)
    while True:
        chunk = os.read(source, tarstream.CHUNK)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(dest, view) :]
        progress.tick(len(chunk))


def _copy_file_range(source: int, dest: int) -> int:
    if not hasattr(os, "copy_file_range"):
        raise OSError(errno.ENOSYS, "no copy_file_range")
    return os.copy_file_range(source, dest, COPY_PIECE)


def _sendfile(source: int, dest: int) -> int:
    return os.sendfile(dest, source, None, COPY_PIECE)
