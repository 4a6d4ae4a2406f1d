"""The capped job log (JOB_LOG_LIMIT): the end of the log kept, cut at a line, a note on top."""

from __future__ import annotations

import io
import os
import re
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobrunner_lib.core import joblog
from jobrunner_lib.core.joblog import write_capped
from jobrunner_lib.core.values import DEFAULT_JOB_LOG_LIMIT, LogLimit

NOTE = re.compile(
    rb"\[jr: the job's log had at least (\d+) bytes \((\d+) lines?\); only the last (\d+) bytes "
    rb"\((?:(\d+) lines?|the end of a line longer than that)\) are kept here "
    rb"\(JOB_LOG_LIMIT=([^)]+)\)\]\n"
)


def split_lines(data: bytes) -> list[bytes]:
    """Lines as the log counts them: each ends with a newline, but the last may not."""
    return re.findall(rb"[^\n]*\n|[^\n]+", data)


def starts_of_lines(data: bytes) -> set[int]:
    return {0} | {i + 1 for i, byte in enumerate(data) if byte == ord("\n")}


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)] + [b""]


logs = st.lists(
    st.sampled_from(
        [b"a", b"\n", b"xyz", b"\n\n", b"\r", b"\xff", b"2026-01-01T00:00:00Z ", b"y" * 40]
    ),
    max_size=120,
).map(b"".join)


@st.composite
def limits(draw: st.DrawFn, data: bytes) -> LogLimit:
    """A limit in bytes or lines, mostly around the log's own size so that cuts are common."""
    if draw(st.booleans()):
        return LogLimit(draw(st.integers(1, len(data) + 10)), lines=True)
    return LogLimit(draw(st.integers(1, len(data) + 10)))


@settings(max_examples=500, deadline=None)
@given(
    data=logs,
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
    draw=st.data(),
    spare=st.sampled_from([0, 7, 64, 1 << 20]),
    block=st.sampled_from([1, 2, 3, 7, joblog.BLOCK]),
)
def test_capped_log_is_the_input_or_a_note_and_a_suffix_within_the_limit(
    data, cuts, draw, spare, block
):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(joblog, "BLOCK", block)  # blocks smaller than the log: moves in many steps
        check_capped(data, cuts, draw.draw(limits(data)), spare)


@pytest.mark.parametrize(
    ("data", "cuts", "limit"),
    [
        (b"xyzxyz\n", [], LogLimit(3)),  # the last line alone is longer than the limit
        (b"a\nxyzxyz", [3], LogLimit(3)),  # and has no newline
        (b"ab\ncd\n", [], LogLimit(3)),  # a whole line fits exactly
        (b"a\nb\nc\nd\n", [1, 2], LogLimit(2, lines=True)),
        (b"a\nb\nc\nd", [5], LogLimit(2, lines=True)),
        (b"\n" * 10, [4], LogLimit(1, lines=True)),
    ],
)
def test_capped_log_edge_cases(data, cuts, limit, monkeypatch):
    for block in (1, 2, joblog.BLOCK):
        monkeypatch.setattr(joblog, "BLOCK", block)
        for spare in (0, 1 << 20):
            check_capped(data, cuts, limit, spare)


def check_capped(data: bytes, cuts: list[int], limit: LogLimit, spare: int) -> None:
    """write_capped's output checked against the input, independently of how it works."""
    out = io.BytesIO()
    kept = write_capped(chunked(data, cuts), out, limit, spare=spare)
    written = out.getvalue()
    lines = split_lines(data)
    assert (kept.total_bytes, kept.total_lines) == (len(data), len(lines))
    assert kept.ends_line == (data == b"" or data.endswith(b"\n"))
    if (len(lines) if limit.lines else len(data)) <= limit.count:
        assert written == data and not kept.cut and kept.note == b""
        return

    m = NOTE.match(written)
    assert m, written[:200]
    assert kept.cut and kept.note == m.group(0) and b"\n" not in m.group(0)[:-1]
    suffix = written[m.end() :]
    assert data.endswith(suffix) and len(suffix) == kept.kept_bytes
    assert int(m.group(1)) == len(data) and int(m.group(2)) == len(lines)
    assert int(m.group(3)) == len(suffix) and m.group(5).decode() == str(limit)
    if limit.lines:
        assert m.group(4) is not None and suffix == b"".join(lines[-limit.count :])
        assert int(m.group(4)) == kept.kept_lines == limit.count == len(split_lines(suffix))
        return
    # The longest suffix within the limit that starts at a line: or, if the last line alone is
    # longer than the limit, the end of that line.
    start = len(data) - len(suffix)
    whole_lines = [s for s in starts_of_lines(data) if len(data) - limit.count <= s < len(data)]
    assert len(suffix) <= limit.count
    if whole_lines:
        assert start == min(whole_lines) and m.group(4) is not None
        assert int(m.group(4)) == kept.kept_lines == len(split_lines(suffix))
    else:
        assert len(suffix) == limit.count and m.group(4) is None
        assert b"\n" not in suffix[:-1] and data[start - 1] != ord("\n")


def test_a_log_under_the_limit_is_written_as_given_to_a_real_file(tmp_path):
    data = b"".join(b"2026-01-01T00:00:00.000000000Z line %d\n" % i for i in range(1000))
    with open(tmp_path / "logs.txt", "w+b") as out:
        kept = write_capped(iter([data[:100], data[100:]]), out, LogLimit(len(data)), spare=0)
        out.write(b"\ntrailer\n")
    assert (tmp_path / "logs.txt").read_bytes() == data + b"\ntrailer\n"
    assert not kept.cut and kept.kept_lines == 1000


def test_note_says_what_was_cut_in_both_modes():
    data = b"".join(b"line %d\n" % i for i in range(10))  # 70 bytes
    out = io.BytesIO()
    write_capped([data], out, LogLimit(30), spare=0)
    assert out.getvalue() == (
        b"[jr: the job's log had at least 70 bytes (10 lines); only the last 28 bytes (4 lines) "
        b"are kept here (JOB_LOG_LIMIT=30)]\nline 6\nline 7\nline 8\nline 9\n"
    )
    out = io.BytesIO()
    write_capped([data], out, LogLimit(3, lines=True), spare=0)
    assert out.getvalue() == (
        b"[jr: the job's log had at least 70 bytes (10 lines); only the last 21 bytes (3 lines) "
        b"are kept here (JOB_LOG_LIMIT=3 lines)]\nline 7\nline 8\nline 9\n"
    )
    out = io.BytesIO()
    write_capped([b"x" * 5000], out, LogLimit(1024))
    assert out.getvalue() == (
        b"[jr: the job's log had at least 5000 bytes (1 line); only the last 1024 bytes (the end "
        b"of a line longer than that) are kept here (JOB_LOG_LIMIT=1K)]\n" + b"x" * 1024
    )


LINE = b"2026-01-01T00:00:00.000000000Z chunk %09d of the job's output\n"
LINE_SIZE = len(LINE % 0)
PER_CHUNK = 1024  # lines


def generated(size: int, out, sizes: list[int]) -> Iterator[bytes]:
    """About size bytes of lines (numbered by chunk), noting out's size on disk before each chunk."""
    for chunk in range(size // LINE_SIZE // PER_CHUNK):
        out.flush()
        sizes.append(os.fstat(out.fileno()).st_size)
        yield LINE % chunk * PER_CHUNK


def last_lines(size: int, lines: int) -> bytes:
    """The last lines of what generated(size) yields."""
    chunks = size // LINE_SIZE // PER_CHUNK
    return b"".join(
        LINE % (n // PER_CHUNK) for n in range(chunks * PER_CHUNK - lines, chunks * PER_CHUNK)
    )


def test_a_big_log_keeps_disk_within_twice_the_limit_and_memory_within_a_few_blocks(tmp_path):
    limit = LogLimit(4 * 2**20)
    sizes: list[int] = []
    tracemalloc.start()
    try:
        with open(tmp_path / "logs.txt", "w+b") as out:
            kept = write_capped(generated(50 * 2**20, out, sizes), out, limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert kept.cut and kept.total_bytes >= 49 * 2**20
    assert max(sizes) <= 2 * (limit.count + 1), max(sizes)  # compacted in place, twice the limit
    assert max(sizes) > limit.count + PER_CHUNK * LINE_SIZE
    assert peak < 3 * joblog.BLOCK, peak  # never the limit's worth in memory
    whole = limit.count // LINE_SIZE
    expected = last_lines(50 * 2**20, whole)
    assert (tmp_path / "logs.txt").read_bytes() == kept.note + expected
    assert (kept.kept_bytes, kept.kept_lines) == (len(expected), whole)


def test_a_big_log_limited_in_lines_keeps_disk_and_memory_bounded(tmp_path):
    limit = LogLimit(20_000, lines=True)  # about 1.2 MB of these lines
    sizes: list[int] = []
    tracemalloc.start()
    try:
        with open(tmp_path / "logs.txt", "w+b") as out:
            kept = write_capped(generated(50 * 2**20, out, sizes), out, limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert kept.cut and kept.kept_lines == limit.count
    assert max(sizes) <= (2 * limit.count + PER_CHUNK) * LINE_SIZE, max(sizes)
    assert peak < 3 * joblog.BLOCK, peak
    expected = last_lines(50 * 2**20, limit.count)
    assert (tmp_path / "logs.txt").read_bytes() == kept.note + expected


def test_container_limit_is_read_from_its_label_else_the_default():
    info = {"Config": {"Labels": {joblog.LIMIT_LABEL: str(LogLimit(3 * 2**20))}}}
    assert joblog.container_limit(info) == LogLimit(3 * 2**20)
    lines = {"Config": {"Labels": {joblog.LIMIT_LABEL: "500 lines"}}}
    assert joblog.container_limit(lines) == LogLimit(500, lines=True)
    for older in ({}, None, {"Config": {"Labels": None}}, {"Config": {"Labels": {"x": "y"}}}):
        assert joblog.container_limit(older) == DEFAULT_JOB_LOG_LIMIT


def test_dockers_own_log_is_json_file_and_keeps_at_least_what_logs_txt_keeps():
    for limit, kept in (
        (LogLimit(2**20), 2**20),
        (DEFAULT_JOB_LOG_LIMIT, 32 * 2**20),
        (LogLimit(1000), 1000),
        (LogLimit(100_000, lines=True), 100_000 * joblog.LINE_ALLOWANCE),
    ):
        config = joblog.docker_log_config(limit)
        assert config["type"] == "json-file"
        size, files = int(config["config"]["max-size"]), int(config["config"]["max-file"])
        # Docker keeps at least files - 1 full files; a logs.txt byte takes at most 6 in JSON.
        assert (files - 1) * size >= joblog.JSON_GROWTH * kept
        assert files * size <= 9 * kept
