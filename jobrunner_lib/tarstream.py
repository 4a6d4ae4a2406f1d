"""Moving files in and out of job volumes: tar streams, volume listings, the hung-copy guard.

Pure (no Docker): builds tar streams lazily from files on disk and from `git archive`, reads a
one-file tar stream into a temporary file that is renamed into place, and runs a blocking copy
in a thread so that a copy which stops making progress can be abandoned (SPEC.md §6.4: an
aborted copy can leave a container that hangs every later call, so we give up waiting instead).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar

BLOCK = 512
CHUNK = 1024 * 1024
# receive_one_file writes up to CHUNK bytes in one writev, of at most this many pieces (IOV_MAX
# is 1024 on Linux).
WRITE_BATCH = 256
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

# The process umask, read once at import (reading it means setting it, which is not thread-safe).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


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
    stream: IO[bytes], *, prefix: str, uid: int | None, gid: int | None, progress: Progress
) -> Iterator[bytes]:
    """Re-emit a tar stream (e.g. `git archive`) with names under prefix and the given owner."""
    with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
        for member in tar:
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


class IterReader:
    """A read-only file object over an iterator of byte chunks, ticking progress as it reads."""

    def __init__(self, chunks: Iterable[bytes], progress: Progress, buffered: bytes = b""):
        self._chunks = iter(chunks)
        self._buffer = buffered  # read before (and counted already) by the caller
        self._pos = 0
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        """Read up to size bytes (all remaining bytes if size < 0)."""
        available = len(self._buffer) - self._pos
        while size < 0 or available < size:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                break
            self._progress.tick(len(chunk))
            # Keep only the unread tail, so a big chunk is copied once, not once per read.
            self._buffer = self._buffer[self._pos :] + chunk
            self._pos = 0
            available = len(self._buffer)
        end = len(self._buffer) if size < 0 else min(len(self._buffer), self._pos + size)
        data = self._buffer[self._pos : end]
        self._pos = end
        return data


def counted(chunks: Iterable[bytes], progress: Progress) -> Iterator[bytes]:
    """Pass chunks through, ticking progress for each (so a stalled upload is noticed)."""
    for chunk in chunks:
        if chunk:
            progress.tick(0)
            yield chunk


def extract_one_file(stream: IO[bytes], expected_name: str, dest: Path, progress: Progress) -> int:
    """Write the single regular file in a tar stream to dest atomically; return its size.

    The data goes to a temporary file beside dest that is renamed over it only when complete, so
    no reader ever sees half a file. Anything but one regular file named expected_name (a
    symlink, a directory, a device) raises UnsafeArchive: a job's files are untrusted.
    """
    with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
        member = tar.next()
        if member is None:
            raise UnsafeArchive(f"empty archive for {expected_name}")
        if member.name != expected_name:
            raise UnsafeArchive(f"archive for {expected_name} holds {member.name!r}")
        if not member.isreg():
            raise UnsafeArchive(f"{expected_name} is not a regular file")
        dest.parent.mkdir(parents=True, exist_ok=True)
        _write_member(tar, member, [dest], progress)
        if tar.next() is not None:
            raise UnsafeArchive(f"archive for {expected_name} holds more than one file")
        return member.size


def receive_one_file(
    chunks: Iterable[bytes], expected_name: str, dest: Path, progress: Progress
) -> int:
    """extract_one_file for a tar stream arriving in pieces (`get_archive`), without re-joining them.

    The same checks, made by tarfile on the header blocks alone; the member's data then goes
    from the received pieces straight to the temporary file (a writer thread overlapping disk
    and socket was tried: no faster, bench/bench_copy_out.py). Another member after the file is
    refused before the rename. Anything unusual (a sparse file, a header tarfile would reject)
    takes the extract_one_file path, which raises what it always has.
    """
    pieces = _Pieces(chunks, progress)
    member = _first_member(pieces)
    if member is None:
        reader = IterReader(pieces.rest(), progress, buffered=pieces.taken())
        return extract_one_file(reader, expected_name, dest, progress)
    if member.name != expected_name:
        raise UnsafeArchive(f"archive for {expected_name} holds {member.name!r}")
    if not member.isreg():
        raise UnsafeArchive(f"{expected_name} is not a regular file")
    dest.parent.mkdir(parents=True, exist_ok=True)

    def write(outs: Sequence[IO[bytes]]) -> None:
        fd = outs[0].fileno()  # written with os.writev: the file object's buffer stays empty
        batch: list[memoryview] = []
        batched = 0
        for part in pieces.data(member.size, member.name):
            batch.append(part)
            batched += len(part)
            if batched >= CHUNK or len(batch) >= WRITE_BATCH:
                _write_all(fd, batch)
                batch, batched = [], 0
        _write_all(fd, batch)
        # As in tarfile: the padding must be there, then a short, empty or invalid block after
        # it ends the archive.
        padding = -member.size % BLOCK
        if len(pieces.take(padding)) < padding:
            raise tarfile.ReadError("unexpected end of data")
        if _header_after(pieces.take(BLOCK)):
            raise UnsafeArchive(f"archive for {expected_name} holds more than one file")

    _write_atomically([dest], write, progress)
    return member.size


def _first_member(pieces: _Pieces) -> tarfile.TarInfo | None:
    """The first member's TarInfo, read from its header blocks; None if tarfile should decide."""
    for _ in range(8):  # a member is preceded by a few extended headers at most
        block = pieces.take(BLOCK)
        try:
            info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        except tarfile.HeaderError:
            return None  # empty, truncated or not a tar header
        if info.type not in _EXTENSION_TYPES:
            break
        if len(pieces.take(info.size + -info.size % BLOCK)) < info.size:
            return None
    else:
        return None
    headers = pieces.taken()
    if info.type == tarfile.GNUTYPE_SPARSE or b"GNU.sparse." in headers:
        return None  # a sparse file's map is read from its data blocks
    try:
        # tarfile itself reads the headers, so names and types are exactly as extract_one_file
        # sees them (PAX and GNU long names, ustar prefixes, PAX sizes).
        with tarfile.open(fileobj=io.BytesIO(headers), mode="r|") as tar:
            return tar.next()
    except (tarfile.TarError, ValueError):
        return None


# Headers that only describe the member after them: PAX extended and global, GNU long names.
_EXTENSION_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


def _header_after(block: bytes) -> bool:
    """Whether a block after a member is another member's header (tarfile's test)."""
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False  # the end of the archive, a short read or garbage: tarfile stops there too
    return True


class _Pieces:
    """The front of an iterator of byte pieces: headers are copied out, data is sliced, not joined."""

    def __init__(self, chunks: Iterable[bytes], progress: Progress):
        self._chunks = iter(chunks)
        self._progress = progress
        self._current = memoryview(b"")  # the unread end of the last piece received
        self._taken = bytearray()  # everything take() returned, for a fallback to replay

    def _next(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._progress.tick(len(chunk))
                self._current = memoryview(chunk)
                return True
        return False

    def take(self, size: int) -> bytes:
        """The next size bytes, copied (fewer only where the stream ends)."""
        start = len(self._taken)
        while len(self._taken) - start < size and (self._current or self._next()):
            part = self._current[: size - (len(self._taken) - start)]
            self._taken += part
            self._current = self._current[len(part) :]
        return bytes(self._taken[start:])

    def taken(self) -> bytes:
        """Every byte take() has returned so far."""
        return bytes(self._taken)

    def data(self, size: int, name: str) -> Iterator[memoryview]:
        """The next size bytes as slices of the pieces received; ReadError if they end first."""
        while size:
            if not self._current and not self._next():
                raise tarfile.ReadError(f"unexpected end of data in {name}")  # as tarfile says
            part = self._current[:size]
            self._current = self._current[len(part) :]
            size -= len(part)
            yield part

    def rest(self) -> Iterator[bytes]:
        """What is left unread (already counted in progress)."""
        return self._chunks if not self._current else _prepend(bytes(self._current), self._chunks)


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    """os.writev until every byte is written (a write may be short)."""
    while buffers:
        written = os.writev(fd, buffers)
        while buffers and written >= len(buffers[0]):
            written -= len(buffers.pop(0))
        if written:
            buffers[0] = buffers[0][written:]


def extract_members(
    stream: IO[bytes], wanted: Mapping[str, Sequence[Path]], progress: Progress
) -> tuple[set[str], set[str]]:
    """Write the wanted members of a (directory) tar stream to their destinations atomically.

    `wanted` maps member names to one or more destinations (e.g. the high and the medium
    privacy copy, written from the one read); every other member is read past and dropped.
    Returns (names written, names that were not regular files). A hard link to a member written
    earlier is written as a copy of it; any other link, directory, FIFO or device is never
    written: the caller decides what to do about it (a job's files are untrusted).
    """
    written: dict[str, Path] = {}
    refused: set[str] = set()
    made: set[Path] = set()  # directories known to exist: one mkdir per directory, not per file
    with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
        for member in tar:
            dests = wanted.get(member.name)
            if not dests:
                continue  # tarfile skips its data when the next header is read
            for dest in dests:
                if dest.parent not in made:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    made.add(dest.parent)
            if member.isreg():
                _write_member(tar, member, dests, progress)
                written[member.name] = dests[0]
            elif member.islnk() and member.linkname in written:
                # A second name for a file already written (tar stores hard links once).
                for dest in dests:
                    atomic_copy(written[member.linkname], dest)
                written[member.name] = dests[0]
            else:
                refused.add(member.name)
    return set(written), refused


def _write_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, dests: Sequence[Path], progress: Progress
) -> None:
    """Stream one regular member's data to temporary files beside each dest, then rename them."""
    source = tar.extractfile(member)
    assert source is not None  # a regular file always has data

    def write(outs: Sequence[IO[bytes]]) -> None:
        remaining = member.size
        while remaining:
            chunk = source.read(min(CHUNK, remaining))
            if not chunk:
                raise UnsafeArchive(f"archive ended inside {member.name}")
            for out in outs:
                out.write(chunk)
            remaining -= len(chunk)

    _write_atomically(dests, write, progress)


def _write_atomically(
    dests: Sequence[Path], write: Callable[[Sequence[IO[bytes]]], None], progress: Progress
) -> None:
    """Have write fill a temporary file beside each dest, then rename them all into place."""
    temps = [temp_path(dest) for dest in dests]
    try:
        with ExitStack() as stack:
            write([stack.enter_context(open(tmp, "wb")) for tmp in temps])
        for tmp in temps:
            os.chmod(tmp, 0o666 & ~_UMASK)
        if progress.abandoned.is_set():
            raise CopyStalled("copy abandoned")  # the job has been failed; leave no file
        for tmp, dest in zip(temps, dests, strict=True):
            os.replace(tmp, dest)
    except OSError as exc:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC and not exc.filename:
            # A failed write names no file; say where, so the disk that filled can be named.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dests[0])) from exc
        raise
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise


def temp_path(dest: Path) -> Path:
    """A temporary name beside dest, unique to this process and thread, never over NAME_MAX.

    dest's own name may already be 255 bytes long (the most a file system allows), so a long
    name is replaced by a digest rather than prefixed.
    """
    name = dest.name
    if len(os.fsencode(name)) > 100:
        name = hashlib.sha256(os.fsencode(name)).hexdigest()[:24]
    return dest.parent / f".jr-tmp-{name}.{os.getpid()}.{threading.get_ident()}"


def atomic_write(dest: Path, data: bytes | str) -> None:
    """Write a small file through a temporary name in the same directory and os.replace."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        with open(tmp, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_copy(source: Path, dest: Path) -> None:
    """Copy a file through a temporary name in dest's directory and os.replace."""
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
