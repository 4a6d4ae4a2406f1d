"""Host-stored job volumes (VOLUME_STORAGE=host, volumes.py) against real Docker and real git.

jr writes the code and inputs into `$VOLUMES_DIR/os-volume-<id>/` (by default under WORKDIR), which
the job's containers mount at /workspace, and reads the outputs from there itself. Whatever a job leaves there is untrusted: links out of the volume, FIFOs, files it
made private. Every Docker object made here carries test_executor's session label and is removed
after each test, pass or fail (its autouse `labelled` fixture, imported below).
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.models import State, StatusCode
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker import files as docker_files
from jobrunner_lib.docker import volumes
from jobrunner_lib.jobs.executor import LocalDockerExecutor
from jobrunner_lib.jobs.worker import drive_job
from tests.integration.test_executor import (
    DOCKER_ONLY,
    SCRIPTS,
    STORAGES,
    TEST_LABEL,
    THREE_LEVELS,
    git,
    labelled,  # noqa: F401 - an autouse fixture: labels and removes this module's objects
    make_config,
    objects_exist,
    workspaces,
    written_then_reader,
)
from tests.support.factories import Jobs

pytestmark = pytest.mark.docker

# For the few tests that hold for both storages (the default here is host storage).
BOTH = pytest.mark.parametrize("config", STORAGES, indirect=True)

HOST_SCRIPTS = {
    **SCRIPTS,
    "linketc.sh": "ln -s /etc output",
    "linkfile.sh": 'mkdir -p output && ln -s "$1" output/x.csv',
    "fifo.sh": "mkdir -p output && echo a > output/a.csv && mkfifo output/x.csv",
    "private.sh": """
        mkdir -p output/private
        echo "private,rows" > output/private/x.csv
        chmod 000 output/private/x.csv output/private
    """,
}
PRIVATE = {"moderately_sensitive": {"p": "output/private/x.csv"}}
# A line of any /etc/passwd (the host's or an image's): it must never be copied anywhere.
PASSWD_LINE = b"root:x:0:0"


def commit_scripts(repo: Path, scripts: dict[str, str], message: str) -> str:
    (repo / "analysis").mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        text = "\n".join(line.strip() for line in body.strip().splitlines()) + "\n"
        (repo / "analysis" / name).write_text(text)
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", message, cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, str]:
    """test_executor's study plus scripts that leave untrusted things in the volume."""
    repo = tmp_path_factory.mktemp("host-study") / "study"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "project.yaml").write_text("version: '3.0'\nactions: {}\n")
    return repo, commit_scripts(repo, HOST_SCRIPTS, "study")


@pytest.fixture
def config(request, tmp_path) -> Config:
    """Host storage, unless a test asks for another through an indirect parametrization."""
    storage = getattr(request, "param", "host")
    config = make_config(tmp_path, storage)
    assert config.volume_storage == storage
    return config


def recording(monkeypatch, module, name: str) -> list[tuple]:
    """Record the arguments of every call of module.name (which still runs)."""
    calls: list[tuple] = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def every_file(config: Config) -> list[Path]:
    """Every file jr wrote for researchers and operators: both workspaces trees and the logs."""
    found = []
    for base in (config.high_privacy_storage_base, config.medium_privacy_storage_base):
        for path in base.rglob("*"):
            assert not path.is_symlink(), f"{path} is a symlink"
            if path.is_file():
                found.append(path)
    return found


def assert_nowhere(config: Config, *secrets: bytes) -> None:
    files = every_file(config)
    assert any(p.name == "logs.txt" for p in files)  # the search did look at the job's log
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"{secret!r} reached {path}"


def run_as_job_user(config: Config, directory: Path, script: str) -> None:
    """Run script in `directory` (bound at /d) as uid 1000, in a labelled container."""
    api = docker.client().api
    name = f"jr-test-populate-{uuid.uuid4().hex[:12]}"
    api.create_container(
        config.helper_image,
        ["sh", "-c", f"cd /d && {script}"],
        name=name,
        user="1000:1000",
        labels=dict([TEST_LABEL]),
        host_config=api.create_host_config(
            binds={str(directory): {"bind": "/d", "mode": "rw"}}, network_mode="none"
        ),
    )
    try:
        api.start(name)
        status = api.wait(name, timeout=60)["StatusCode"]
        assert status == 0, api.logs(name).decode(errors="replace")
    finally:
        api.remove_container(name, force=True)


# ---- the volume directory's life ----------------------------------------------------------------


def test_volume_directory_is_private_and_lives_from_prepare_to_cleanup(config, conn, jobs):
    config.volumes_dir.mkdir(parents=True, mode=0o755)  # made before, too open: made private
    os.chmod(config.volumes_dir, 0o755)
    job = jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS)
    LocalDockerExecutor(config, conn).prepare(job)

    root = volumes.host_dir(config, job.id)
    assert root == config.volumes_dir / f"os-volume-{job.id}"
    assert stat.S_IMODE(config.volumes_dir.stat().st_mode) == 0o700
    assert root.is_dir() and not root.is_symlink()
    assert (root / "analysis" / "write.sh").is_file() and (root / docker.MARKER).is_file()
    container = docker.inspect_container(docker.container_name(job.id))
    assert container["State"]["Status"] == "created"
    assert [b.split(":")[:2] for b in container["HostConfig"]["Binds"]] == [
        [str(root), docker.WORKSPACE]
    ]
    assert not docker.volume_exists(docker.volume_name(job.id))  # the directory is the volume
    assert docker.inspect_container(docker.helper_name(job.id)) is None  # no helper needed

    done = drive_job(config, job.id)
    assert done.state is State.SUCCEEDED, done.status_message
    assert (workspaces(config)[0] / "output/high.csv").read_text() == "secret,rows\n"
    assert not root.exists() and os.listdir(config.volumes_dir) == []
    assert objects_exist(config, job) == (False, False)


@DOCKER_ONLY
def test_docker_storage_makes_no_volume_directory(config, jobs):
    done = drive_job(config, jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS).id)
    assert done.state is State.SUCCEEDED, done.status_message
    assert not config.volumes_dir.exists()


# ---- untrusted things a job leaves ----------------------------------------------------------------


@BOTH
def test_output_directory_linked_to_etc_is_not_followed(config, jobs):
    job = jobs.add(
        "linketc", "python:v1 analysis/linketc.sh", {"moderately_sensitive": {"p": "output/passwd"}}
    )
    done = drive_job(config, job.id)
    assert done.state is State.FAILED
    assert done.status_code in (StatusCode.UNMATCHED_PATTERNS, StatusCode.JOB_ERROR)
    for tree in workspaces(config):
        assert not (tree / "output").exists()
    assert_nowhere(config, PASSWD_LINE)


@BOTH
def test_output_linked_to_a_host_file_is_not_copied(config, jobs, tmp_path):
    secret = f"host-secret-{uuid.uuid4().hex}"
    (tmp_path / "secret.txt").write_text(secret + "\n")
    job = jobs.add(
        "linkfile",
        f"python:v1 analysis/linkfile.sh {tmp_path / 'secret.txt'}",
        {"highly_sensitive": {"x": "output/x.csv"}},
    )
    done = drive_job(config, job.id)
    assert done.state is State.FAILED
    assert done.status_code in (StatusCode.UNMATCHED_PATTERNS, StatusCode.JOB_ERROR)
    for tree in workspaces(config):
        assert not (tree / "output/x.csv").exists()
    assert_nowhere(config, secret.encode())
    assert (tmp_path / "secret.txt").read_text() == secret + "\n"


@pytest.mark.timeout(120)
def test_a_fifo_among_the_outputs_is_not_opened(config, jobs):
    job = jobs.add(
        "fifo", "python:v1 analysis/fifo.sh", {"moderately_sensitive": {"c": "output/*.csv"}}
    )
    done = drive_job(config, job.id)
    assert done.state is State.SUCCEEDED, done.status_message
    assert done.outputs == {"output/a.csv": "moderately_sensitive"}
    for tree in workspaces(config):
        assert (tree / "output/a.csv").read_text() == "a\n"
        assert not os.path.lexists(tree / "output/x.csv")


# ---- files the job made private -------------------------------------------------------------------


def test_root_reads_a_private_file_in_a_private_directory_on_the_host(
    as_root, config, conn, jobs, monkeypatch
):
    job = jobs.add("private", "python:v1 analysis/private.sh", PRIVATE)
    executor = LocalDockerExecutor(config, conn)
    executor.prepare(job)
    executor.execute(job)
    assert docker.wait_container(docker.container_name(job.id), 60) == 0
    private = volumes.host_dir(config, job.id) / "output" / "private"
    assert stat.S_IMODE(private.lstat().st_mode) == 0
    assert stat.S_IMODE((private / "x.csv").lstat().st_mode) == 0
    helpers = recording(monkeypatch, docker_files, "create_helper")
    listings = recording(monkeypatch, docker_files, "list_volume_files")

    done = drive_job(config, job.id)

    assert done.state is State.SUCCEEDED, done.status_message
    for tree in workspaces(config):
        assert (tree / "output/private/x.csv").read_text() == "private,rows\n"
    assert (helpers, listings) == ([], [])  # read on the host, as root may


def test_a_jr_that_may_not_read_the_files_gets_them_through_the_helper(config, jobs, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied (as a jr that is not root)")

    monkeypatch.setattr(volumes, "list_on_host", denied)
    monkeypatch.setattr(volumes, "copy_out_of_host", denied)
    helpers: list[str] = []
    create_helper = docker_files.create_helper

    def creating(config, job_id):
        helpers.append(create_helper(config, job_id))
        return helpers[-1]

    monkeypatch.setattr(docker_files, "create_helper", creating)
    listings = recording(monkeypatch, docker_files, "list_volume_files")
    job = jobs.add("private", "python:v1 analysis/private.sh", PRIVATE)
    done = drive_job(config, job.id)

    assert done.state is State.SUCCEEDED, done.status_message
    assert done.outputs == {"output/private/x.csv": "moderately_sensitive"}
    for tree in workspaces(config):
        assert (tree / "output/private/x.csv").read_text() == "private,rows\n"
    assert listings == [(config, job.id)]
    assert helpers and set(helpers) == {f"os-volume-{job.id}-manager"}
    assert docker.inspect_container(docker.helper_name(job.id)) is None  # cleaned up
    assert not volumes.host_dir(config, job.id).exists()


# ---- removing a volume directory ------------------------------------------------------------------

JOB_USER_FILES = """
    echo 1 > plain && echo 2 > .x && echo 3 > ..y
    mkdir -p nest/deep .hidden
    echo 4 > nest/deep/f && echo 5 > .hidden/g
    ln -s /d/plain link
    chmod 000 nest/deep/f nest/deep nest .hidden
"""


def job_user_dir(config: Config) -> Path:
    """A volume directory holding files, hidden files and private directories of uid 1000."""
    path = config.volumes_dir / f"os-volume-{uuid.uuid4().hex[:16]}"
    path.mkdir(parents=True)
    os.chmod(path, 0o777)
    run_as_job_user(config, path, " && ".join(JOB_USER_FILES.strip().splitlines()))
    assert sorted(os.listdir(path)) == ["..y", ".hidden", ".x", "link", "nest", "plain"]
    assert (path / "nest").stat().st_uid == 1000
    return path


def test_empty_host_dir_removes_everything_the_job_user_made(config):
    path = job_user_dir(config)
    beside = config.volumes_dir / "beside.txt"
    beside.write_text("keep")

    docker_files.empty_host_dir(config, path)

    assert path.is_dir() and os.listdir(path) == []
    assert beside.read_text() == "keep"
    assert docker.inspect_container(f"{path.name}-cleaner") is None


def test_remove_host_dir_empties_through_a_container_when_jr_may_not(config, monkeypatch):
    path = job_user_dir(config)
    real = volumes.shutil.rmtree
    attempts: list[Path] = []

    def rmtree(target, *args, **kwargs):
        attempts.append(Path(target))
        if len(attempts) == 1:  # as a jr that is not root: uid 1000's private directories
            raise PermissionError(13, "Permission denied", str(target))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(volumes.shutil, "rmtree", rmtree)
    emptied = recording(monkeypatch, docker_files, "empty_host_dir")

    volumes.remove_host_dir(config, path)

    assert not path.exists()
    assert emptied == [(config, path)]
    assert attempts == [path, path]
    assert docker.inspect_container(f"{path.name}-cleaner") is None
    volumes.remove_host_dir(config, path)  # already gone: fine


# ---- code and inputs copied in --------------------------------------------------------------------


@pytest.fixture
def linked_study(tmp_path) -> tuple[Path, str, str, Path]:
    """A repo whose second commit adds `output -> <a host directory>`: (repo, first, second, dir)."""
    repo = tmp_path / "linked"
    repo.mkdir()
    host_dir = tmp_path / "host-output"
    host_dir.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "project.yaml").write_text("version: '3.0'\nactions: {}\n")
    first = commit_scripts(
        repo, {"make.sh": "mkdir -p output && echo 'from make' > output/x.csv"}, "make"
    )
    (repo / "output").symlink_to(host_dir)
    second = commit_scripts(repo, {"use.sh": "cp output/x.csv output/y.csv"}, "link")
    assert git("ls-files", "-s", "output", cwd=repo).startswith("120000 ")  # a committed symlink
    return repo, first, second, host_dir


@BOTH
def test_an_input_under_a_committed_symlink_is_written_inside_the_volume(
    config, conn, linked_study
):
    repo, first, second, host_dir = linked_study
    make = Jobs(conn, repo, first).add(
        "make", "python:v1 analysis/make.sh", {"highly_sensitive": {"x": "output/x.csv"}}
    )
    assert drive_job(config, make.id).state is State.SUCCEEDED
    use = Jobs(conn, repo, second).add(
        "use",
        "python:v1 analysis/use.sh",
        {"highly_sensitive": {"y": "output/y.csv"}},
        needs=["make"],
    )
    done = drive_job(config, use.id)
    assert done.state is State.SUCCEEDED, done.status_message
    assert (workspaces(config)[0] / "output/y.csv").read_text() == "from make\n"
    assert os.listdir(host_dir) == []


def test_copy_in_gives_the_files_to_the_job_user_and_dates_the_code_before_the_marker(
    as_root, config, conn, jobs
):
    assert config.job_user == "1000:1000"  # the default, which these owners below are
    read = written_then_reader(config, jobs)
    LocalDockerExecutor(config, conn).prepare(read)

    root = volumes.host_dir(config, read.id)
    marker = (root / docker.MARKER).lstat()
    paths = [root, *root.rglob("*")]
    assert {p.relative_to(root).as_posix() for p in paths} >= {
        ".",
        "project.yaml",
        "analysis/read.sh",
        "output/high.csv",
        "output/moderate.csv",
        docker.MARKER,
    }
    for path in paths:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (1000, 1000), path
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert (root / "output/high.csv").read_text() == "secret,rows\n"
    code = [p for p in paths if p.is_file() and p.relative_to(root).parts[0] != "output"]
    code.remove(root / docker.MARKER)
    assert code
    for path in code:  # in whole seconds, as finalize compares them with the job's files
        assert int(path.lstat().st_mtime) < int(marker.st_mtime), path

    done = drive_job(config, read.id)  # the prepared job runs as uid 1000 and writes there
    assert done.state is State.SUCCEEDED, done.status_message
    assert (workspaces(config)[0] / "output/derived.csv").read_text() == "derived,rows\n"


# ---- a change of VOLUME_STORAGE --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after"),
    [("docker", "host"), ("host", "docker")],
    ids=["docker-to-host", "host-to-docker"],
)
def test_a_job_prepared_before_a_change_of_storage_completes(
    tmp_path, conn, jobs, monkeypatch, before, after
):
    prepared_with, finalized_with = make_config(tmp_path, before), make_config(tmp_path, after)
    job = jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS)
    LocalDockerExecutor(prepared_with, conn).prepare(job)
    root = volumes.host_dir(prepared_with, job.id)
    assert root.is_dir() is (before == "host")
    helpers = recording(monkeypatch, docker_files, "create_helper")

    done = drive_job(finalized_with, job.id)

    assert done.state is State.SUCCEEDED, done.status_message
    assert len(done.outputs) == 3
    high, medium = workspaces(finalized_with)
    assert (high / "output/high.csv").read_text() == "secret,rows\n"
    assert (medium / "output/moderate.csv").read_text() == "table\n"
    # Each job's files are reached as it was prepared: on the host, or through its helper.
    assert helpers == []
    assert not root.exists()
    assert objects_exist(finalized_with, job) == (False, False)
    assert docker.inspect_container(docker.helper_name(job.id)) is None
