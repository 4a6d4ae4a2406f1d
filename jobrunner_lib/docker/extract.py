"""Files written from tar streams and copies, atomically: no reader ever sees half a file.

Pure (no Docker): reads a one-file tar stream (as it arrives from `get_archive`, or as a file
object) or the wanted members of a directory archive, each into a temporary file beside its
destination that is renamed into place once complete; small files and copies go the same way.
A job's files are untrusted: anything but the regular files asked for raises UnsafeArchive.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, cast

from jobrunner_lib.docker.tarstream import BLOCK, CHUNK, CopyStalled, Progress, UnsafeArchive

# receive_one_file writes up to CHUNK bytes in one writev, of at most this many pieces (IOV_MAX
# is 1024 on Linux).
WRITE_BATCH = 256

# The process umask, read once at import (reading it means setting it, which is not thread-safe).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


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
        return extract_one_file(cast(IO[bytes], reader), expected_name, dest, progress)
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

    write_atomically([dest], write, progress)
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

    write_atomically(dests, write, progress)


def write_atomically(
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
