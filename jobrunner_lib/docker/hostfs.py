"""A job's files on the host (host-stored volumes), never through a link.

Nothing a job leaves in its volume is trusted: paths are walked one directory at a time with
O_NOFOLLOW (a job's `ln -s /etc output` must not make jr read or write the host's files), only
regular files are read (never a FIFO or a device node), set-user-ID bits are never applied, and
copies run in the kernel where it can (copy_file_range, then sendfile). volumes.py decides when
a volume is on the host and uses these.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, cast

from jobrunner_lib.core import outputs
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker import extract, tarstream

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_DIR_FLAGS = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
# Errors of opening a directory that is a link or not a directory at all.
_NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR)
# How much one copy_file_range call moves (the progress ticks between them).
COPY_PIECE = 8 * 2**20

Owner = tuple[int | None, int | None]


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
