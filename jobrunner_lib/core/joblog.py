"""A job's log kept to JOB_LOG_LIMIT: its end (the newest lines), cut at a line, with a note on top.

Pure: no Docker. The output file is also the buffer: chunks are appended to it, and whenever it
holds twice what could be kept (or `spare` bytes, whichever is more) it is compacted in place, the
part that may still be kept moved to its start. At the end the kept part is moved behind a one-line
note saying what was cut. So disk use stays within about twice the limit, memory within a few
copy blocks, and a log under the limit is written exactly as given, with no note and no copy.

Docker's own (json-file) log of a job is bounded too, to at least what logs.txt keeps, so a job
that prints without end fills neither disk (docker_log_config).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from jobrunner_lib.core.values import DEFAULT_JOB_LOG_LIMIT, LogLimit, parse_log_limit

BLOCK = 1 << 20  # bytes read at a time when moving or scanning the kept part
SPARE = 1 << 20  # never compact a buffer smaller than this: few compactions for a small limit
LIMIT_LABEL = "org.jr.log-limit"  # on a job container: the JOB_LOG_LIMIT it was made with
# Docker keeps a job's output as JSON lines: `{"log":"...","stream":"stdout","time":"..."}`, where
# control characters and `<>&` take 6 bytes each. Six bytes for every byte of logs.txt (its 31
# character timestamp included) is then always enough to keep what logs.txt keeps.
JSON_GROWTH = 6
DOCKER_LOG_FILES = 4  # rotated files: Docker keeps at least 3 full ones, at most 4
LINE_ALLOWANCE = 256  # logs.txt bytes a line, to size Docker's log for a limit in lines


@dataclass(frozen=True)
class KeptLog:
    """What write_capped wrote: the input's size, and the part of it kept."""

    total_bytes: int
    total_lines: int
    kept_bytes: int
    kept_lines: int
    ends_line: bool  # the kept output is empty or ends with a newline
    note: bytes = b""  # the line written first when something was cut

    @property
    def cut(self) -> bool:
        """True when only the end of the input was kept."""
        return self.kept_bytes < self.total_bytes


def write_capped(
    chunks: Iterable[bytes], out: BinaryIO, limit: LogLimit, *, spare: int = SPARE
) -> KeptLog:
    """Write chunks to out (opened `w+b`: it is read back) keeping at most limit of their end.

    Under the limit out gets exactly the chunks. Over it, out gets a note line then the longest
    suffix of the input within the limit that starts at a line: or, if the last line alone is
    longer than a limit in bytes, the end of that line, rather than nothing.
    """
    # out holds the input from offset `dropped` on; per chunk only what must be done (a log may
    # come a line a chunk, millions of them).
    write, in_lines, count = out.write, limit.lines, limit.count
    total = newlines = dropped = dropped_newlines = 0
    tail = b"\n"
    keep = count + 1  # bytes: the byte before the kept part says whether it starts a line
    most = max(2 * keep, spare)
    for chunk in chunks:
        if not chunk:
            continue
        write(chunk)
        total += len(chunk)
        newlines += chunk.count(b"\n")
        tail = chunk
        if in_lines:
            if newlines - dropped_newlines >= 2 * count and total - dropped >= spare:
                # Only the last `count` lines can ever be kept: drop every line before them.
                skip = newlines - dropped_newlines - count
                start = _after_newlines(out, skip, total - dropped)
                dropped += start
                dropped_newlines += skip
                _move(out, start, 0, total - dropped)
        elif total - dropped > most:
            _move(out, total - dropped - keep, 0, keep)
            dropped = total - keep
    size, buffered_newlines = total - dropped, newlines - dropped_newlines
    ends_line = tail.endswith(b"\n")
    total_lines = newlines + (not ends_line)
    if (total_lines if in_lines else total) <= count:
        return KeptLog(total, total_lines, total, total_lines, ends_line)

    # The buffer (out[:size]) starts at a line, or holds at least the last limit + 1 bytes.
    if in_lines:
        start = _after_newlines(out, buffered_newlines + (not ends_line) - count, size)
        kept_lines = count
    else:
        start = _line_start(out, size - count, size)
        kept_lines = _count_newlines(out, start, size) + (not ends_line)
    kept_bytes = size - start
    whole = _lines(kept_lines)
    if start > 0 and _byte_at(out, start - 1) != b"\n":
        whole = "the end of a line longer than that"
    # "At least": Docker's own log of the job is bounded too, and may have lost its start.
    note = (
        f"[jr: the job's log had at least {total} bytes ({_lines(total_lines)}); only the last "
        f"{kept_bytes} bytes ({whole}) are kept here (JOB_LOG_LIMIT={limit})]\n"
    ).encode()
    _move(out, start, len(note), kept_bytes)
    out.seek(0)
    out.write(note)
    out.seek(0, 2)
    return KeptLog(total, total_lines, kept_bytes, kept_lines, ends_line, note)


def _lines(count: int) -> str:
    return f"{count} line{'' if count == 1 else 's'}"


def _byte_at(out: BinaryIO, offset: int) -> bytes:
    out.seek(offset)
    return out.read(1)


def _blocks(out: BinaryIO, start: int, end: int) -> Iterable[tuple[int, bytes]]:
    """(offset, data) for out[start:end], a block at a time."""
    offset = start
    while offset < end:
        out.seek(offset)
        data = out.read(min(BLOCK, end - offset))
        if not data:
            raise OSError(f"log buffer ended at {offset} bytes, expected {end}")
        yield offset, data
        offset += len(data)


def _count_newlines(out: BinaryIO, start: int, end: int) -> int:
    return sum(data.count(b"\n") for _, data in _blocks(out, start, end))


def _after_newlines(out: BinaryIO, skip: int, end: int) -> int:
    """The offset just after the skip-th newline of out[:end] (0 if skip is 0)."""
    if skip <= 0:
        return 0
    for offset, data in _blocks(out, 0, end):
        found = data.count(b"\n")
        if found >= skip:
            at = 0
            while (found := data.count(b"\n", at, at + 4096)) < skip:  # counted in C, mostly
                skip -= found
                at += 4096
            at -= 1
            for _ in range(skip):
                at = data.index(b"\n", at + 1)
            return offset + at + 1
        skip -= found
    raise ValueError("fewer newlines in the log buffer than counted")


def _line_start(out: BinaryIO, start: int, end: int) -> int:
    """The first offset at or after start where a line begins, if one does before end; else start."""
    if start == 0 or _byte_at(out, start - 1) == b"\n":
        return start
    for offset, data in _blocks(out, start, end):
        at = data.find(b"\n")
        if at >= 0:
            return offset + at + 1 if offset + at + 1 < end else start
    return start


def _move(out: BinaryIO, src: int, dst: int, length: int) -> None:
    """Move out[src:src+length] to dst (block by block, either direction) and cut out after it."""
    if src != dst and length:
        if dst < src:
            offsets = range(0, length, BLOCK)
        else:
            offsets = range((length - 1) // BLOCK * BLOCK, -1, -BLOCK)
        for offset in offsets:
            out.seek(src + offset)
            data = out.read(min(BLOCK, length - offset))
            out.seek(dst + offset)
            out.write(data)
    out.truncate(dst + length)
    out.seek(dst + length)


def container_limit(info: Mapping[str, Any] | None) -> LogLimit:
    """The JOB_LOG_LIMIT a job container was made with (its label); the default for older ones."""
    labels = ((info or {}).get("Config") or {}).get("Labels") or {}
    return parse_log_limit(labels.get(LIMIT_LABEL) or "") or DEFAULT_JOB_LOG_LIMIT


def docker_log_config(limit: LogLimit) -> dict[str, Any]:
    """Docker's log of a job: json-file (so `docker logs` works), bounded to keep what logs.txt does.

    Docker keeps at least DOCKER_LOG_FILES - 1 full files, so each holds 1/(files - 1) of the JSON
    that logs.txt's part can take; a limit in lines is sized at LINE_ALLOWANCE bytes a line.
    """
    kept = limit.count * LINE_ALLOWANCE if limit.lines else limit.count
    file_size = -(-kept * JSON_GROWTH // (DOCKER_LOG_FILES - 1))
    return {
        "type": "json-file",
        "config": {"max-size": str(file_size), "max-file": str(DOCKER_LOG_FILES)},
    }
