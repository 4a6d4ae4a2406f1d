"""Moving files in and out of job volumes: tar streams, volume listings, the hung-copy guard.

Pure (no Docker): builds tar streams lazily from files on disk and from `git archive`, parses
the helper's volume listing, and runs a blocking copy in a thread so that a copy which stops
making progress can be abandoned (docs/architecture.md#docker-objects-and-labels: an aborted copy can leave a container that hangs
every later call, so we give up waiting instead). Reading tar streams into files: extract.py.
"""

from __future__ import annotations

import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar

BLOCK = 512
CHUNK = 1024 * 1024
T = TypeVar("T")
# The helper lists the volume in one run and prints only ASCII: a header line, the
# NUL-terminated names as hex bytes (`od`), a `--` line, then one "size mtime" line per name in
# the same order. A name may hold any byte but NUL: it reaches us through the container's log,
# and Docker's log drivers replace bytes that are not UTF-8, so names are never printed raw.
# `-type f` skips symlinks, FIFOs and devices: find never follows a link. Names and stats are
# written by the same command for each batch of names, so the two lists stay in step (busybox's
# `xargs -0` garbles names once its input passes a few thousand of them).
LISTING_HEADER = "jr-listing-v2"
LIST_SCRIPT = (
    "cd /workspace && : > /tmp/jr-files && : > /tmp/jr-stats && find . -type f -exec sh -c "
    """'printf "%s\\0" "$@" >> /tmp/jr-files && stat -c "%s %Y" "$@" >> /tmp/jr-stats' sh {} + """
    f"&& echo {LISTING_HEADER} && od -An -v -tx1 /tmp/jr-files && echo -- && cat /tmp/jr-stats"
)


class CopyStalled(Exception):
    """A guarded copy moved no bytes for longer than the stall timeout."""


class UnsafeArchive(Exception):
    """A tar stream held something other than what we asked for (a link, a device, a bad name)."""


class Progress:
    """Bytes moved by copies and when they last moved; shared with the heartbeat and the guard."""

    def __init__(self) -> None:
        self.bytes = 0
        self.last_moved = time.time()  # wall clock, for the job's progress_at column
        self._last_monotonic = time.monotonic()
        self.abandoned = threading.Event()  # set when the waiting side gave up on a copy

    def tick(self, n: int = 0) -> None:
        """Record that n bytes moved (n may be 0: the copy is alive but between files)."""
        if self.abandoned.is_set():
            # The waiting side has given up: stop feeding data into a copy nobody waits for.
            raise CopyStalled("copy abandoned")
        self.bytes += n
        self.last_moved = time.time()
        self._last_monotonic = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since bytes last moved."""
        return time.monotonic() - self._last_monotonic


def run_guarded(fn: Callable[[], T], progress: Progress, stall_timeout: float, what: str) -> T:
    """Run fn in a thread; raise CopyStalled if progress stops for stall_timeout seconds.

    The thread is a daemon and is abandoned, not killed (a call blocked inside Docker cannot be
    interrupted); `progress.abandoned` tells it to stop as soon as it wakes up.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the waiting side
            result["error"] = exc

    progress.abandoned.clear()
    progress.tick(0)
    thread = threading.Thread(target=target, name=f"copy {what}", daemon=True)
    thread.start()
    poll = max(0.05, min(1.0, stall_timeout / 10))
    while thread.is_alive():
        thread.join(poll)
        if thread.is_alive() and progress.idle_for() > stall_timeout:
            progress.abandoned.set()
            raise CopyStalled(f"{what} made no progress for {stall_timeout:g}s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def end_of_archive() -> bytes:
    """The two zero blocks that end a tar stream."""
    return b"\0" * (2 * BLOCK)


def safe_member_name(name: str) -> str:
    """A tar member name normalised to a relative POSIX path; UnsafeArchive if it could escape."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise UnsafeArchive(f"unsafe path in archive: {name!r}")
    return str(path)


def dir_entry(name: str, *, uid: int | None, gid: int | None, mtime: float | None = None) -> bytes:
    """A directory member, owned by uid/gid when given (the job user must be able to write in it)."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755 if uid is not None else 0o777
    info.mtime = int(time.time() if mtime is None else mtime)
    _own(info, uid, gid)
    return _header(info)


def bytes_entry(name: str, data: bytes, *, uid: int | None, gid: int | None, mtime: float) -> bytes:
    """A small regular file member with the given content."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644 if uid is not None else 0o666
    info.mtime = int(mtime)
    _own(info, uid, gid)
    return _header(info) + data + _padding(len(data))


def _own(info: tarfile.TarInfo, uid: int | None, gid: int | None) -> None:
    if uid is not None:
        info.uid, info.uname = uid, ""
    if gid is not None:
        info.gid, info.gname = gid, ""


def file_entry(
    source: Path, name: str, *, uid: int | None, gid: int | None, progress: Progress
) -> Iterator[bytes]:
    """Stream one file from disk as a tar member, chunk by chunk (never the whole file in memory)."""
    with open(source, "rb") as f:
        st = os.fstat(f.fileno())
        info = tarfile.TarInfo(name)
        info.size = st.st_size
        info.mtime = int(st.st_mtime)
        info.mode = 0o644 if uid is not None else 0o666
        _own(info, uid, gid)
        yield _header(info)
        remaining = st.st_size
        while remaining:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                raise OSError(f"{source} shrank while being copied")
            remaining -= len(chunk)
            progress.tick(len(chunk))
            yield chunk
        yield _padding(st.st_size)


def rewrite_tar(
    stream: IO[bytes],
    *,
    prefix: str,
    uid: int | None,
    gid: int | None,
    progress: Progress,
    not_after: float | None = None,
) -> Iterator[bytes]:
    """Re-emit a tar stream (e.g. `git archive`) with names under prefix and the given owner.

    not_after caps the members' modification times (git archive gives every file the commit's
    time, which may be now or, with a skewed clock, later).
    """
    with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
        for member in tar:
            if not_after is not None:
                member.mtime = min(member.mtime, int(not_after))
            name = safe_member_name(member.name)
            member.name = f"{prefix}/{name}" if name != "." else prefix
            if member.isdir() or member.issym():
                _own(member, uid, gid)
                member.mode = member.mode if uid is not None else 0o777
                yield _header(member)
                continue
            if not member.isreg():
                continue  # git archive emits only files, dirs and symlinks; skip anything else
            _own(member, uid, gid)
            if uid is None:
                member.mode |= 0o666
            yield _header(member)
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has data
            remaining = member.size
            while remaining:
                chunk = source.read(min(CHUNK, remaining))
                if not chunk:
                    raise UnsafeArchive(f"archive ended inside {member.name}")
                remaining -= len(chunk)
                progress.tick(len(chunk))
                yield chunk
            yield _padding(member.size)


def counted(chunks: Iterable[bytes], progress: Progress) -> Iterator[bytes]:
    """Pass chunks through, ticking progress for each (so a stalled upload is noticed)."""
    for chunk in chunks:
        if chunk:
            progress.tick(0)
            yield chunk


@dataclass(frozen=True)
class VolumeFile:
    """A regular file in a job volume, relative to /workspace."""

    path: str
    size: int
    mtime: int


def parse_listing(out: bytes) -> list[VolumeFile]:
    """Parse LIST_SCRIPT output into the volume's regular files."""
    if not out.startswith(LISTING_HEADER.encode() + b"\n"):
        # A helper created by an earlier jr (before an upgrade) still runs the raw-name script.
        return _parse_raw_listing(out)
    lines = out.decode("ascii").splitlines()
    try:
        end = lines.index("--")
        raw = bytes.fromhex("".join(lines[1:end]))
    except ValueError:
        raise RuntimeError("unexpected output from the volume listing") from None
    names = [n.decode("utf-8", "surrogateescape") for n in raw.split(b"\0")[:-1]]
    return _with_stats(names, lines[end + 1 :])


def _parse_raw_listing(out: bytes) -> list[VolumeFile]:
    """The first listing format: NUL-terminated names, an empty record, then 'size mtime' lines."""
    if out.startswith(b"\0"):
        return []
    names_part, sep, stats_part = out.partition(b"\0\0")
    if not sep:
        raise RuntimeError("unexpected output from the volume listing")
    names = [n.decode("utf-8", "surrogateescape") for n in names_part.split(b"\0")]
    return _with_stats(names, stats_part.decode().splitlines())


def _with_stats(names: list[str], stats: list[str]) -> list[VolumeFile]:
    if len(stats) != len(names):
        raise RuntimeError(f"volume listing has {len(names)} names but {len(stats)} stat lines")
    files = []
    for name, line in zip(names, stats, strict=True):
        size, mtime = line.split()
        files.append(VolumeFile(name[2:] if name.startswith("./") else name, int(size), int(mtime)))
    return files
