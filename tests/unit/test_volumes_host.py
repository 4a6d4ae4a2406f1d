"""Host-stored volumes without Docker: writing the copy-in stream, listing and copying out.

Everything in a volume directory after a job ran is the job's doing, and the code copied in may
hold symlinks: none of these functions may follow a link or open anything but a regular file.
"""

from __future__ import annotations

import os
import resource
import stat
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobrunner_lib.core.config import load_config
from jobrunner_lib.core.errors import ConfigError
from jobrunner_lib.docker import hostfs, tarstream

NO_OWNER: hostfs.Owner = (None, None)
MTIME = 1_600_000_000


def symlink_entry(name: str, target: str) -> bytes:
    """A symlink member (as `git archive` emits for a committed link)."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def file_member(name: str, data: bytes, mode: int | None = None) -> bytes:
    """A regular file member; mode None: tarstream's own (0o666 without an owner)."""
    if mode is None:
        return tarstream.bytes_entry(name, data, uid=None, gid=None, mtime=MTIME)
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, MTIME
    padding = b"\0" * (-len(data) % tarstream.BLOCK)
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data + padding


def dir_member(name: str, mode: int | None = None) -> bytes:
    """A directory member; mode None: tarstream's own (0o777 without an owner)."""
    if mode is None:
        return tarstream.dir_entry(name, uid=None, gid=None)
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def stream(*members: bytes) -> Iterator[bytes]:
    """A copy-in stream as the executor sends it: the root entry, members, the end."""
    yield tarstream.dir_entry("workspace", uid=None, gid=None)
    yield from members
    yield tarstream.end_of_archive()


def extract(root: Path, *members: bytes) -> None:
    hostfs.extract_on_host(root, stream(*members), NO_OWNER, tarstream.Progress())


@pytest.fixture
def root(tmp_path) -> Path:
    path = tmp_path / "os-volume-x"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """A host directory beside the volume that nothing may reach through a link."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


def all_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# ---- extract_on_host ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "written", "link"),
    [
        # A committed `output -> <host dir>`, then an input under it.
        (
            lambda out: [
                symlink_entry("workspace/output", out),
                file_member("workspace/output/x.csv", b"S"),
            ],
            "output/x.csv",
            "output",
        ),
        # ... with the parent's own entry between them, as the executor sends inputs.
        (
            lambda out: [
                symlink_entry("workspace/output", out),
                dir_member("workspace/output"),
                file_member("workspace/output/x.csv", b"S"),
            ],
            "output/x.csv",
            "output",
        ),
        # A link deeper down, with a directory still to make below it.
        (
            lambda out: [
                dir_member("workspace/a"),
                symlink_entry("workspace/a/output", out),
                file_member("workspace/a/output/deep/x.csv", b"S"),
            ],
            "a/output/deep/x.csv",
            "a/output",
        ),
    ],
    ids=["file-under-link", "dir-entry-over-link", "nested"],
)
def test_a_file_under_a_symlink_is_written_inside_the_volume(root, outside, members, written, link):
    extract(root, *members(str(outside)))
    assert all_files(outside) == []
    assert (root / written).read_bytes() == b"S"
    assert (root / link).is_dir() and not (root / link).is_symlink()


def test_a_file_over_a_symlink_to_a_host_file_replaces_the_link(root, outside):
    target = outside / "target.txt"
    target.write_text("keep")
    extract(
        root, symlink_entry("workspace/f.txt", str(target)), file_member("workspace/f.txt", b"new")
    )
    assert target.read_text() == "keep"
    assert not (root / "f.txt").is_symlink() and (root / "f.txt").read_bytes() == b"new"


def test_a_symlink_member_is_made_as_a_link_not_followed(root, outside):
    extract(root, symlink_entry("workspace/link", str(outside)))
    assert os.readlink(root / "link") == str(outside)
    assert all_files(outside) == []


@pytest.mark.parametrize(
    "name", ["workspace/../x", "workspace/a/../../x", "/workspace/x", "other/x", "workspacex/y"]
)
def test_a_member_outside_the_workspace_is_refused(root, tmp_path, name):
    with pytest.raises(tarstream.UnsafeArchive):
        extract(root, file_member(name, b"escaped"))
    assert not (tmp_path / "x").exists() and not (root.parent / "other").exists()
    assert "escaped" not in "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())


def test_an_existing_directory_is_replaced_by_a_file_and_a_file_by_a_directory(root):
    (root / "a" / "sub").mkdir(parents=True)
    (root / "a" / "sub" / "old.txt").write_text("old")
    (root / "d").write_text("a file")
    extract(
        root,
        file_member("workspace/a", b"now a file"),
        dir_member("workspace/d"),
        file_member("workspace/d/x.txt", b"inside"),
    )
    assert (root / "a").is_file() and (root / "a").read_bytes() == b"now a file"
    assert (root / "d").is_dir() and (root / "d" / "x.txt").read_bytes() == b"inside"


def test_a_set_user_id_or_sticky_mode_in_the_stream_is_never_applied(root):
    extract(
        root,
        dir_member("workspace/shared", 0o1777),
        file_member("workspace/shared/tool", b"#!/bin/sh\n", 0o4755),
        file_member("workspace/group", b"x", 0o2755),
    )
    modes = [
        stat.S_IMODE((root / rel).lstat().st_mode) for rel in ("shared", "shared/tool", "group")
    ]
    assert modes == [0o777, 0o755, 0o755]


def test_modes_are_applied_exactly_whatever_the_umask(root):
    old = os.umask(0o077)
    try:
        extract(
            root,
            dir_member("workspace/open"),
            file_member("workspace/open/any.txt", b"1"),
            dir_member("workspace/own", 0o750),
            file_member("workspace/own/script.sh", b"2", 0o755),
            file_member("workspace/own/private.txt", b"3", 0o640),
            file_member("workspace/made/parent.txt", b"4"),  # a parent without its own entry
        )
    finally:
        os.umask(old)

    def mode(rel: str) -> int:
        return stat.S_IMODE((root / rel).lstat().st_mode)

    # Without an owner everything is for everyone (0o666 / 0o777), as the archive path makes it.
    assert (mode("."), mode("open"), mode("open/any.txt")) == (0o777, 0o777, 0o666)
    assert (mode("own"), mode("own/script.sh"), mode("own/private.txt")) == (0o750, 0o755, 0o640)
    assert (mode("made"), mode("made/parent.txt")) == (0o777, 0o666)
    assert (root / "open/any.txt").stat().st_mtime == MTIME


# ---- list_on_host and copy_out_of_host ---------------------------------------------------------


@pytest.fixture
def job_left(root, outside) -> Path:
    """A volume as a job might leave it: files, and links and a FIFO where files are expected."""
    (outside / "secret.csv").write_text("host secret")
    (root / "a.csv").write_text("aaa")
    (root / "sub").mkdir()
    (root / "sub" / "b.csv").write_text("bb")
    os.utime(root / "sub" / "b.csv", (MTIME, MTIME))
    (root / "link.csv").symlink_to(outside / "secret.csv")
    (root / "linkdir").symlink_to(outside)
    (root / "sub" / "loop").symlink_to(root / "sub")
    os.mkfifo(root / "fifo.csv")
    return root


def test_list_on_host_lists_regular_files_only_and_never_follows_a_link(job_left):
    files = sorted(hostfs.list_on_host(job_left), key=lambda f: f.path)
    assert [(f.path, f.size) for f in files] == [("a.csv", 3), ("sub/b.csv", 2)]
    assert files[1].mtime == MTIME


def test_list_on_host_holds_few_files_open_however_many_directories(root):
    # A job may leave thousands of directories side by side; a service may open 1024 files.
    for i in range(300):
        (root / f"d{i}" / "sub").mkdir(parents=True)
        (root / f"d{i}" / "sub" / "f.csv").write_text(str(i))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(128, hard), hard))
    try:
        files = hostfs.list_on_host(root)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert sorted(f.path for f in files) == sorted(f"d{i}/sub/f.csv" for i in range(300))


def test_list_on_host_closes_every_directory_it_opened(job_left, monkeypatch):
    before = len(os.listdir("/proc/self/fd"))
    assert hostfs.list_on_host(job_left)
    real = os.scandir
    listed = []

    def scandir(fd):
        listed.append(fd)
        if len(listed) == 2:  # a directory the job made private, for a jr that is not root
            raise PermissionError(13, "Permission denied")
        return real(fd)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError):
        hostfs.list_on_host(job_left)
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.timeout(30)  # opening the FIFO would block for ever
@pytest.mark.parametrize("rel", ["link.csv", "fifo.csv", "linkdir/secret.csv", "sub/loop/b.csv"])
def test_copy_out_of_host_refuses_anything_but_a_regular_file(job_left, tmp_path, rel):
    dest = tmp_path / "out" / "x.csv"
    with pytest.raises(tarstream.UnsafeArchive):
        hostfs.copy_out_of_host(job_left, rel, dest, tarstream.Progress())
    assert not dest.exists()
    assert not (tmp_path / "out").exists() or all_files(tmp_path / "out") == []


@pytest.mark.parametrize("rel", ["../outside/secret.csv", "/etc/passwd", "sub/../a.csv"])
def test_copy_out_of_host_refuses_an_unsafe_path(job_left, tmp_path, rel):
    with pytest.raises(tarstream.UnsafeArchive):
        hostfs.copy_out_of_host(job_left, rel, tmp_path / "x.csv", tarstream.Progress())
    assert not (tmp_path / "x.csv").exists()


def test_copy_out_of_host_copies_a_regular_file_through_a_temporary_name(job_left, tmp_path):
    dest = tmp_path / "out" / "deep" / "b.csv"
    progress = tarstream.Progress()
    assert hostfs.copy_out_of_host(job_left, "sub/b.csv", dest, progress) == 2
    assert dest.read_text() == "bb"
    assert os.listdir(dest.parent) == ["b.csv"]  # the temporary file is gone
    assert progress.bytes == 2


def test_copy_out_of_host_copies_a_file_bigger_than_one_piece(root, tmp_path, monkeypatch):
    monkeypatch.setattr(hostfs, "COPY_PIECE", 4096)
    data = os.urandom(3 * 4096 + 17)
    (root / "big.bin").write_bytes(data)
    dest = tmp_path / "big.bin"
    assert hostfs.copy_out_of_host(root, "big.bin", dest, tarstream.Progress()) == len(data)
    assert dest.read_bytes() == data


# ---- copy_into_host (a job's inputs) ----------------------------------------------------------


@pytest.fixture
def an_input(tmp_path) -> Path:
    """A workspace output used as an input: bigger than one copy piece, an old mtime."""
    path = tmp_path / "workspace-output.csv"
    path.write_bytes(os.urandom(3 * 4096 + 17))
    os.utime(path, (MTIME, MTIME))
    return path


def copy_in(root: Path, rel: str, source: Path, owner: hostfs.Owner = NO_OWNER) -> int:
    progress = tarstream.Progress()
    hostfs.copy_into_host(root, rel, source, owner, progress)
    return progress.bytes


def test_copy_into_host_writes_the_input_as_the_tar_stream_did(root, an_input, monkeypatch):
    monkeypatch.setattr(hostfs, "COPY_PIECE", 4096)
    assert copy_in(root, "output/deep/x.csv", an_input) == an_input.stat().st_size
    copied = root / "output/deep/x.csv"
    assert copied.read_bytes() == an_input.read_bytes()
    assert stat.S_IMODE(copied.stat().st_mode) == 0o666  # no owner: writable by the job's user
    assert stat.S_IMODE((root / "output").stat().st_mode) == 0o777
    assert copied.stat().st_mtime == MTIME


def test_copy_into_host_gives_an_owned_input_0644(root, an_input):
    owner = (os.geteuid(), os.getegid())
    copy_in(root, "output/x.csv", an_input, owner)
    copied = root / "output/x.csv"
    assert (copied.stat().st_uid, stat.S_IMODE(copied.stat().st_mode)) == (os.geteuid(), 0o644)
    assert stat.S_IMODE((root / "output").stat().st_mode) == 0o755


def test_copy_into_host_never_writes_through_a_committed_link(root, outside, an_input):
    # The code extracted first may hold `output -> <host dir>` or a link where the input goes.
    target = outside / "target.csv"
    target.write_text("keep")
    (root / "output").symlink_to(outside)
    (root / "f.csv").symlink_to(target)
    copy_in(root, "output/x.csv", an_input)
    copy_in(root, "f.csv", an_input)
    assert all_files(outside) == ["target.csv"] and target.read_text() == "keep"
    assert not (root / "output").is_symlink() and (root / "output/x.csv").is_file()
    assert not (root / "f.csv").is_symlink()
    assert (root / "f.csv").read_bytes() == an_input.read_bytes()


def test_copy_into_host_replaces_a_directory_in_its_way(root, an_input):
    (root / "output/x.csv/inner").mkdir(parents=True)
    copy_in(root, "output/x.csv", an_input)
    assert (root / "output/x.csv").read_bytes() == an_input.read_bytes()


@pytest.mark.parametrize("rel", ["../x.csv", "/etc/x.csv", "output/../../x.csv"])
def test_copy_into_host_refuses_an_unsafe_path(root, an_input, rel):
    with pytest.raises(tarstream.UnsafeArchive):
        copy_in(root, rel, an_input)
    assert all_files(root.parent) == sorted(["os-volume-x", an_input.name])


# ---- VOLUME_STORAGE ----------------------------------------------------------------------------


def storage(tmp_path: Path, **env: str) -> str:
    return load_config(environ=env, env_file=tmp_path / "missing.env").volume_storage


def test_an_unknown_volume_storage_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="VOLUME_STORAGE='bogus' is invalid"):
        storage(tmp_path, VOLUME_STORAGE="bogus")


def test_auto_storage_is_host_on_linux_with_a_local_daemon_else_docker(tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert storage(tmp_path) == "host"
    assert storage(tmp_path, VOLUME_STORAGE="auto") == "host"
    assert storage(tmp_path, DOCKER_HOST="unix:///run/user/1000/docker.sock") == "host"
    assert storage(tmp_path, DOCKER_HOST="tcp://10.0.0.5:2376") == "docker"
    assert storage(tmp_path, DOCKER_HOST="ssh://builder") == "docker"
    monkeypatch.setenv("DOCKER_HOST", "tcp://10.0.0.5:2376")  # from the real environment too
    assert storage(tmp_path) == "docker"
    # An explicit choice wins over the guess.
    assert storage(tmp_path, VOLUME_STORAGE="Host") == "host"
    monkeypatch.delenv("DOCKER_HOST")
    assert storage(tmp_path, VOLUME_STORAGE="docker") == "docker"
    monkeypatch.setattr(sys, "platform", "darwin")  # Docker Desktop: the daemon is in a VM
    assert storage(tmp_path) == "docker"


def test_a_full_volumes_disk_is_named_as_such_only_with_host_storage(tmp_path):
    from jobrunner_lib.jobs.outage import disk_name

    env = {"WORKDIR": str(tmp_path / "work"), "VOLUMES_DIR": str(tmp_path / "vols")}
    host = load_config(environ={**env, "VOLUME_STORAGE": "host"}, env_file=tmp_path / "no.env")
    inside = tmp_path / "vols" / "os-volume-abc" / "output" / "big.bin"
    assert disk_name(host, inside) == "the job volumes storage"
    assert disk_name(host, tmp_path / "work" / "db.sqlite") == "the workdir"
    # By default the volumes live in the workdir: a file there is still the volumes'.
    default = load_config(
        environ={"WORKDIR": str(tmp_path / "work"), "VOLUME_STORAGE": "host"},
        env_file=tmp_path / "no.env",
    )
    assert disk_name(default, tmp_path / "work" / "volumes" / "x") == "the job volumes storage"
    docker = load_config(environ={**env, "VOLUME_STORAGE": "docker"}, env_file=tmp_path / "no.env")
    assert disk_name(docker, inside) is None
