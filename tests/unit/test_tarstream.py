"""receive_one_file: one file from a tar stream arriving in pieces, as `get_archive` sends it."""

from __future__ import annotations

import errno
import io
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobrunner_lib.docker import extract, tarstream

LONG = "long-" + "n" * 150 + ".csv"  # too long for a ustar name field: PAX or GNU headers


def archive(
    *members: tuple[str, bytes | None, bytes], fmt: int = tarfile.PAX_FORMAT, **pax: str
) -> bytes:
    """A tar stream made by Python's tarfile of (name, data or None, type) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.pax_headers = dict(pax)
            if data is not None:
                info.size = len(data)
            else:
                info.linkname = "/etc/passwd"
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def regular(name: str, data: bytes, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    return archive((name, data, tarfile.REGTYPE), fmt=fmt)


def cut(stream: bytes, size: int) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def receive(pieces: list[bytes], name: str, dest: Path) -> int:
    return extract.receive_one_file(pieces, name, dest, tarstream.Progress())


DATA = bytes(range(256)) * 40 + b"tail"  # not a whole number of blocks


@pytest.mark.parametrize(
    ("fmt", "name"),
    [
        (tarfile.USTAR_FORMAT, "a.csv"),
        (tarfile.PAX_FORMAT, "a.csv"),
        (tarfile.PAX_FORMAT, LONG),
        (tarfile.GNU_FORMAT, LONG),
        (tarfile.PAX_FORMAT, "naïve \udcff.csv"),  # UTF-8 and an undecodable byte
    ],
)
@pytest.mark.parametrize("piece", [1, 100, 511, 512, 513, 1500, 1 << 20])
def test_receive_one_file_writes_the_file_from_pieces_of_any_size(tmp_path, fmt, name, piece):
    dest = tmp_path / "out" / "copy.csv"
    progress = tarstream.Progress()
    assert extract.receive_one_file(cut(regular(name, DATA, fmt), piece), name, dest, progress)
    assert dest.read_bytes() == DATA
    assert [p.name for p in dest.parent.iterdir()] == ["copy.csv"]  # no temporary file left
    assert oct(dest.stat().st_mode & 0o777) == oct(0o666 & ~extract._UMASK)
    assert progress.bytes > len(DATA)


@given(cuts=st.lists(st.integers(0, len(regular(LONG, DATA))), max_size=12))
@settings(max_examples=200, deadline=None)
def test_receive_one_file_handles_pieces_split_anywhere(cuts):
    stream = regular(LONG, DATA)
    bounds = [0, *sorted(cuts), len(stream)]
    pieces = [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]  # some empty
    with tempfile.TemporaryDirectory() as tmp:
        assert receive(pieces, LONG, Path(tmp) / "a.csv") == len(DATA)
        assert (Path(tmp) / "a.csv").read_bytes() == DATA


def test_receive_one_file_writes_an_empty_file(tmp_path):
    assert receive([regular("empty.csv", b"")], "empty.csv", tmp_path / "e.csv") == 0
    assert (tmp_path / "e.csv").read_bytes() == b""


def test_receive_one_file_replaces_an_older_copy(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"old and longer")
    assert receive([regular("a.csv", b"new")], "a.csv", tmp_path / "a.csv") == 3
    assert (tmp_path / "a.csv").read_bytes() == b"new"


@pytest.mark.parametrize(
    "kind",
    [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE],
)
@pytest.mark.parametrize("name", ["a.csv", LONG])
def test_receive_one_file_refuses_anything_but_a_regular_file(tmp_path, kind, name):
    stream = archive((name, None, kind))
    with pytest.raises(tarstream.UnsafeArchive, match="not a regular file"):
        receive(cut(stream, 100), name, tmp_path / "a.csv")
    assert list(tmp_path.iterdir()) == []


def test_receive_one_file_refuses_a_different_name(tmp_path):
    with pytest.raises(tarstream.UnsafeArchive, match="holds 'b.csv'"):
        receive([regular("b.csv", DATA)], "a.csv", tmp_path / "a.csv")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "second", [("b.csv", b"x", tarfile.REGTYPE), (LONG, None, tarfile.SYMTYPE)]
)
def test_receive_one_file_refuses_a_second_member_and_leaves_nothing(tmp_path, second):
    stream = archive(("a.csv", DATA, tarfile.REGTYPE), second)
    (tmp_path / "a.csv").write_bytes(b"earlier copy")
    with pytest.raises(tarstream.UnsafeArchive, match="more than one file"):
        receive(cut(stream, 700), "a.csv", tmp_path / "a.csv")
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]
    assert (tmp_path / "a.csv").read_bytes() == b"earlier copy"


@pytest.mark.parametrize(
    ("end", "error"),
    [
        (0, tarfile.ReadError),  # nothing at all
        (300, tarfile.ReadError),  # inside the PAX header block
        (700, tarfile.ReadError),  # inside the PAX records
        (1300, tarfile.ReadError),  # inside the file's own header
        (1536, tarfile.ReadError),  # right after the header
        (1536 + 5000, tarfile.ReadError),  # inside the data
    ],
)
def test_receive_one_file_fails_on_a_truncated_stream_and_leaves_nothing(tmp_path, end, error):
    stream = regular(LONG, DATA)
    with pytest.raises(error):
        receive(cut(stream[:end], 256), LONG, tmp_path / "a.csv")
    assert list(tmp_path.iterdir()) == []


def test_receive_one_file_accepts_a_stream_ending_right_after_the_padding(tmp_path):
    # tarfile (and so extract_one_file) takes a missing end-of-archive for the end...
    stream = regular("a.csv", DATA)
    padded = 512 + len(DATA) + -len(DATA) % 512
    assert receive(cut(stream[:padded], 1000), "a.csv", tmp_path / "a.csv") == len(DATA)
    assert (tmp_path / "a.csv").read_bytes() == DATA
    # ... but not a missing padding.
    with pytest.raises(tarfile.ReadError):
        receive(cut(stream[: padded - 1], 1000), "a.csv", tmp_path / "b.csv")
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]


def test_receive_one_file_falls_back_to_tarfile_for_a_sparse_file(tmp_path):
    # GNU sparse 1.0 in PAX: the map is in the data blocks; tarfile expands the holes.
    stream = archive(
        ("GNUSparseFile.0/a.bin", b"1\n0\n4\n".ljust(512, b"\0") + b"abcd", tarfile.REGTYPE),
        **{
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": "a.bin",
            "GNU.sparse.realsize": "10",
        },
    )
    assert receive(cut(stream, 700), "a.bin", tmp_path / "a.bin") == 10
    assert (tmp_path / "a.bin").read_bytes() == b"abcd" + b"\0" * 6


def test_receive_one_file_stops_when_the_copy_is_abandoned(tmp_path):
    progress = tarstream.Progress()
    stream = regular("a.csv", DATA)

    def pieces():
        yield from cut(stream, 2048)[:2]
        progress.abandoned.set()  # the guard gave up waiting
        yield from cut(stream, 2048)[2:]

    with pytest.raises(tarstream.CopyStalled):
        extract.receive_one_file(pieces(), "a.csv", tmp_path / "a.csv", progress)
    assert list(tmp_path.iterdir()) == []


def test_receive_one_file_raises_a_full_disk_naming_the_file(tmp_path, monkeypatch):
    def full(fd: int, buffers: list) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(extract.os, "writev", full)
    stream = regular("a.csv", DATA * 200)
    with pytest.raises(OSError) as raised:
        receive(cut(stream, 32768), "a.csv", tmp_path / "a.csv")
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(tmp_path / "a.csv")  # so DiskFull can name the disk
    assert list(tmp_path.iterdir()) == []


def test_receive_one_file_finishes_short_writes(tmp_path, monkeypatch):
    writev = os.writev
    monkeypatch.setattr(extract.os, "writev", lambda fd, bufs: writev(fd, [bufs[0][:7]]))
    assert receive(cut(regular("a.csv", DATA), 300), "a.csv", tmp_path / "a.csv") == len(DATA)
    assert (tmp_path / "a.csv").read_bytes() == DATA


STREAMS = [
    regular("a.csv", DATA, tarfile.USTAR_FORMAT),
    regular(LONG, DATA, tarfile.GNU_FORMAT),
    regular(LONG, DATA),
    regular("b.csv", DATA),
    archive(("a.csv", None, tarfile.SYMTYPE)),
    archive(("a.csv", DATA[:600], tarfile.REGTYPE), ("b.csv", b"x", tarfile.REGTYPE)),
    regular("a.csv", b""),
    b"\x01" * 2048,  # not a tar stream
]


@given(
    which=st.integers(0, len(STREAMS) - 1),
    end=st.integers(0, 4096),
    piece=st.integers(1, 2000),
)
@settings(max_examples=300, deadline=None)
def test_receive_one_file_agrees_with_extract_one_file(which, end, piece):
    # The same outcome, error type or bytes written, however the stream is cut and split.
    stream = STREAMS[which]
    name = LONG if LONG.encode() in stream else "a.csv"
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        for how in ("receive", "extract"):
            dest = Path(tmp) / how
            try:
                if how == "receive":
                    receive(cut(stream[:end], piece), name, dest)
                else:
                    reader = io.BytesIO(stream[:end])
                    extract.extract_one_file(reader, name, dest, tarstream.Progress())
            except (tarstream.UnsafeArchive, tarfile.TarError) as exc:
                outcomes.append(type(exc))
            else:
                outcomes.append(dest.read_bytes())
    assert outcomes[0] == outcomes[1]
