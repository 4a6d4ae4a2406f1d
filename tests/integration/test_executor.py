"""The run side against real Docker and real git: a job driven in-process from claim to final state.

Every Docker object made here carries `org.jr.test=<session id>` (through JR_EXTRA_LABELS) and is
removed after each test, pass or fail; nothing else on the engine is touched.

Every test runs with both volume storages (VOLUME_STORAGE=host and docker, volumes.py) through
the parametrized `config` fixture; a test about one of them asks for it (DOCKER_ONLY, an
indirect parametrization of `config`), so none is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from jobrunner_lib.core.config import CHECKOUT_DIR, Config, load_config
from jobrunner_lib.core.models import Job, Msg, State, StatusCode, transition
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker import files as docker_files
from jobrunner_lib.docker import tarstream, volumes
from jobrunner_lib.jobs.executor import ExecutorState, LocalDockerExecutor
from jobrunner_lib.jobs.worker import drive_job
from jobrunner_lib.store import db
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.store import queries as db_queries
from tests.support.cli import tool_env
from tests.support.factories import Jobs
from tests.support.waiting import wait_for

pytestmark = pytest.mark.docker

SESSION = uuid.uuid4().hex[:12]
TEST_LABEL = ("org.jr.test", SESSION)

SCRIPTS = {
    "write.sh": """
        echo "hello from the job"
        echo "to stderr" >&2
        mkdir -p output
        echo "secret,rows" > output/high.csv
        echo "table" > output/moderate.csv
        echo "summary" > output/minimal.txt
    """,
    "fail.sh": "echo about to fail; exit 3",
    "read.sh": """
        mkdir -p output
        test -f output/high.csv || { echo "input missing" >&2; exit 9; }
        sed 's/secret/derived/' output/high.csv > output/derived.csv
    """,
    "named.sh": 'mkdir -p output && echo "$1" > "output/$1.csv"',
    "typo.sh": "mkdir -p output && echo x > output/other.txt",
    "probe.sh": """
        mkdir -p output
        id -u > output/uid.txt
        grep CapEff /proc/self/status > output/caps.txt
        cat /proc/net/dev > output/netdev.txt
        touch /workspace/written-by-job
        exec wget -q -T 3 -O /dev/null http://172.17.0.1:2375/
    """,
    "symlink.sh": "mkdir -p output && ln -s /etc/passwd output/passwd.csv",
    "linkdir.sh": "ln -s /etc output",
    "glob.sh": "mkdir -p output && echo a > output/a.csv && echo b > output/b.csv",
    "sleep.sh": "sleep 30",
}


def git(*args: str, cwd: Path, date: str | None = None) -> str:
    env = dict(
        os.environ,
        **({"GIT_COMMITTER_DATE": date} if date else {}),
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture(autouse=True)
def labelled(docker_ready, monkeypatch):
    """Label everything this test creates, and remove exactly that afterwards."""
    monkeypatch.setenv(docker.EXTRA_LABELS_ENV, "=".join(TEST_LABEL))
    yield
    api = docker.client().api
    for c in docker.list_containers(extra=dict([TEST_LABEL])):
        api.remove_container(c["Id"], force=True)
    for v in docker.list_volumes(extra=dict([TEST_LABEL])):
        api.remove_volume(v["Name"], force=True)


def scripts_study(repo: Path, scripts: dict[str, str]) -> tuple[Path, str]:
    """A git repo with an empty project.yaml and analysis/<name> for each script (indented
    blocks, stripped); returns (path, commit). Each test adds its own claimed jobs."""
    (repo / "analysis").mkdir(parents=True)
    (repo / "project.yaml").write_text(
        "version: '3.0'\nexpectations: {population_size: 10}\nactions: {}\n"
    )
    for name, body in scripts.items():
        text = "\n".join(line.strip() for line in body.strip().splitlines()) + "\n"
        (repo / "analysis" / name).write_text(text)
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "study", cwd=repo)
    return repo, git("rev-parse", "HEAD", cwd=repo)


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> tuple[Path, str]:
    """A git repo with analysis/*.sh scripts; returns (path, commit)."""
    return scripts_study(tmp_path_factory.mktemp("study") / "study", SCRIPTS)


STORAGES = ("host", "docker")
# For a test about one volume storage: `config` is made with that storage only.
DOCKER_ONLY = pytest.mark.parametrize("config", ["docker"], indirect=True)


def make_config(tmp_path: Path, storage: str, **extra: str) -> Config:
    """A dummy-data backend whose workdir and privacy trees live in tmp_path."""
    work = tmp_path / "workdir"
    return load_config(
        environ={
            "JR_ENV_FILE": str(tmp_path / "no.env"),
            "WORKDIR": str(work),
            "COPY_STALL_TIMEOUT": "20",
            "STATS_POLL_INTERVAL": "0.2",
            "STATS_DATABASE_FILE": str(work / "stats.sqlite"),
            "MAX_WORKERS": "2",
            "VOLUME_STORAGE": storage,
            **extra,
        }
    )


@pytest.fixture(params=STORAGES)
def config(request, tmp_path) -> Config:
    """make_config with each volume storage in turn (or the one a test asks for, indirectly)."""
    config = make_config(tmp_path, request.param)
    assert config.volume_storage == request.param
    return config


THREE_LEVELS = {
    "highly_sensitive": {"data": "output/high.csv"},
    "moderately_sensitive": {"table": "output/moderate.csv"},
    "minimally_sensitive": {"note": "output/minimal.txt"},
}


def workspaces(config: Config, ws: str = "ws") -> tuple[Path, Path]:
    return (
        config.high_privacy_storage_base / "workspaces" / ws,
        config.medium_privacy_storage_base / "workspaces" / ws,
    )


def log_dir(config: Config, job: Job) -> Path:
    (found,) = (config.high_privacy_storage_base / "logs").glob(f"*/os-job-{job.id}")
    return found


def objects_exist(config: Config, job: Job) -> tuple[bool, bool]:
    """Whether the job's container and its volume (a Docker volume or a host directory) exist."""
    return (
        docker.inspect_container(docker.container_name(job.id)) is not None,
        volumes.exists(config, job.id),
    )


def test_success_copies_outputs_by_privacy_level_and_cleans_up(config, jobs):
    job = jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS)
    done = drive_job(config, job.id)

    assert (done.state, done.status_code, done.status_message) == (
        State.SUCCEEDED,
        StatusCode.SUCCEEDED,
        "Completed successfully",
    )
    assert done.outputs == {
        "output/high.csv": "highly_sensitive",
        "output/moderate.csv": "moderately_sensitive",
        "output/minimal.txt": "minimally_sensitive",
    }
    assert done.exit_code == 0 and done.image_id.startswith("sha256:")
    high, medium = workspaces(config)
    assert (high / "output/high.csv").read_text() == "secret,rows\n"
    assert (high / "output/moderate.csv").exists() and (high / "output/minimal.txt").exists()
    assert not (medium / "output/high.csv").exists()
    assert (medium / "output/moderate.csv").read_text() == "table\n"
    assert (medium / "output/minimal.txt").read_text() == "summary\n"
    assert json.loads((medium / "metadata/manifest.json").read_text()) == {
        "repo": job.repo_url,
        "workspace": "ws",
    }
    assert (high / "metadata/write.log").read_text() == (medium / "metadata/write.log").read_text()
    assert not list(high.rglob(".jr-tmp-*")) and not list(medium.rglob(".jr-tmp-*"))
    assert objects_exist(config, job) == (False, False)
    assert docker.inspect_container(docker.helper_name(job.id)) is None


def test_logs_trailer_and_full_metadata(config, jobs):
    job = jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS)
    done = drive_job(config, job.id)
    directory = log_dir(config, done)
    assert directory.parent.name == time.strftime("%Y-%m", time.gmtime(done.completed_at))

    text = (directory / "logs.txt").read_text()
    body, _, trailer = text.partition("\n\nstate: ")
    assert "Z hello from the job" in body and "Z to stderr" in body
    assert trailer.splitlines()[:1] == ["succeeded"]
    assert f"\ncommit: {job.commit}\n" in trailer and f"\njob_id: {job.id}\n" in trailer
    assert "\nrun_by_user: alice\n" in trailer and "\nexit_code: 0\n" in trailer
    assert "\nCompleted successfully\n" in trailer
    assert trailer.endswith(
        "outputs:\n  output/high.csv      - highly_sensitive\n"
        "  output/minimal.txt   - minimally_sensitive\n"
        "  output/moderate.csv  - moderately_sensitive\n"
    )

    meta = json.loads((directory / "metadata.json").read_text())
    for key in (
        "id",
        "job_request_id",
        "state",
        "repo_url",
        "commit",
        "workspace",
        "action",
        "run_command",
        "output_spec",
        "outputs",
        "status_message",
        "status_code",
        "created_at",
        "started_at",
        "completed_at",
        "job_request",
        "job_id",
        "run_by_user",
        "docker_image_id",
        "exit_code",
        "container_metadata",
        "resource_usage",
    ):
        assert key in meta, key
    assert meta["state"] == "succeeded" and meta["status_code"] == "succeeded"
    assert meta["completed_at"].endswith("Z") and meta["exit_code"] == 0
    assert meta["job_request"]["created_by"] == "alice"
    assert set(meta["resource_usage"]) == {"peak_memory_bytes", "cpu_time_seconds", "samples"}
    host = meta["container_metadata"]["HostConfig"]
    assert host["NetworkMode"] == "none" and host["CapDrop"] == ["ALL"] and host["Init"] is True
    assert "no-new-privileges" in host["SecurityOpt"] and host["PidsLimit"] == 1024
    assert meta["container_metadata"]["Config"]["User"] == "1000:1000"
    env = dict(e.split("=", 1) for e in meta["container_metadata"]["Config"]["Env"])
    assert (
        env["OPENSAFELY_BACKEND"] == "expectations"
        and env["JR_DEMO_RUNTIME"] == "xxxx-REDACTED-xxxx"
    )


def test_configured_memory_and_cpu_limits_are_applied(config, tmp_path, jobs):
    config = load_config(
        environ={
            "JR_ENV_FILE": str(tmp_path / "no.env"),
            "WORKDIR": str(tmp_path / "workdir"),
            "VOLUME_STORAGE": config.volume_storage,
            "JOB_MEMORY_LIMIT": "64M",
            "JOB_CPU_COUNT": "0.5",
            "JOB_PIDS_LIMIT": "64",
        }
    )
    done = drive_job(config, jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS).id)
    assert done.state is State.SUCCEEDED
    host = json.loads((log_dir(config, done) / "metadata.json").read_text())["container_metadata"][
        "HostConfig"
    ]
    assert (host["Memory"], host["MemorySwap"], host["NanoCpus"], host["PidsLimit"]) == (
        64 * 2**20,
        64 * 2**20,
        500_000_000,
        64,
    )


def test_nonzero_exit_fails_but_keeps_log(config, jobs):
    job = jobs.add(
        "fail", "python:v1 analysis/fail.sh", {"moderately_sensitive": {"x": "output/x.csv"}}
    )
    done = drive_job(config, job.id)
    assert (done.state, done.status_code) == (State.FAILED, StatusCode.NONZERO_EXIT)
    assert done.status_message == "Job exited with error code 3" and done.exit_code == 3
    assert "about to fail" in (workspaces(config)[0] / "metadata/fail.log").read_text()
    assert objects_exist(config, job) == (False, False)


def test_unmatched_pattern_names_the_pattern_and_the_files_written(config, jobs):
    job = jobs.add(
        "typo", "python:v1 analysis/typo.sh", {"moderately_sensitive": {"t": "output/table.csv"}}
    )
    done = drive_job(config, job.id)
    assert (done.state, done.status_code) == (State.FAILED, StatusCode.UNMATCHED_PATTERNS)
    assert done.status_message == "No outputs found matching patterns:\n - output/table.csv"
    assert done.unmatched_outputs == ["output/other.txt"]
    log_text = (log_dir(config, done) / "logs.txt").read_text()
    assert "Did you mean to match one of these files instead?\n - output/other.txt\n" in log_text


def test_did_you_mean_hint_never_offers_the_studys_code_even_when_just_committed(
    config, conn, tmp_path
):
    # git archive dates every file at the commit: one made this second (or, clock skew, later)
    # would look written by the job.
    repo = tmp_path / "fresh"
    (repo / "analysis").mkdir(parents=True)
    (repo / "analysis" / "typo.sh").write_text(SCRIPTS["typo.sh"].strip() + "\n")
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", ".", cwd=repo)
    future = f"@{int(time.time()) + 600} +0000"
    git("commit", "-q", "-m", "now", cwd=repo, date=future)
    fresh = Jobs(conn, repo, git("rev-parse", "HEAD", cwd=repo))
    job = fresh.add(
        "typo", "python:v1 analysis/typo.sh", {"moderately_sensitive": {"t": "output/table.csv"}}
    )
    done = drive_job(config, job.id)
    assert done.status_code is StatusCode.UNMATCHED_PATTERNS
    assert done.unmatched_outputs == ["output/other.txt"]


def test_did_you_mean_hint_never_offers_the_jobs_inputs(config, jobs):
    first = jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS)
    assert drive_job(config, first.id).state is State.SUCCEEDED
    # An input newer than the job's start marker (clock skew, a copy in the same second) must
    # still not be mistaken for a file the job wrote.
    future = time.time() + 3600
    for path in (workspaces(config)[0] / "output").iterdir():
        os.utime(path, (future, future))
    second = jobs.add(
        "typo",
        "python:v1 analysis/typo.sh",
        {"moderately_sensitive": {"t": "output/table.csv"}},
        needs=["write"],
    )
    done = drive_job(config, second.id)
    assert done.status_code is StatusCode.UNMATCHED_PATTERNS
    assert done.unmatched_outputs == ["output/other.txt"]


def written_then_reader(config, jobs) -> Job:
    """Run `write` (three privacy levels) to success; add `read`, which needs it (not run)."""
    first = jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS)
    assert drive_job(config, first.id).state is State.SUCCEEDED
    return jobs.add(
        "read",
        "python:v1 analysis/read.sh",
        {"highly_sensitive": {"d": "output/derived.csv"}},
        needs=["write"],
    )


def test_chain_second_action_reads_first_actions_output(config, jobs, caplog):
    second = written_then_reader(config, jobs)
    with caplog.at_level("INFO"):
        done = drive_job(config, second.id)
    assert done.state is State.SUCCEEDED, done.status_message
    assert (workspaces(config)[0] / "output/derived.csv").read_text() == "derived,rows\n"
    messages = [r.getMessage() for r in caplog.records]
    assert f"Copying in code from {second.repo_url}@{second.commit}" in messages
    assert "Copying input file write: output/high.csv" in messages


def test_missing_input_file_is_a_job_error(config, jobs):
    first = jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS)
    drive_job(config, first.id)
    (workspaces(config)[0] / "output/moderate.csv").unlink()
    second = jobs.add(
        "read",
        "python:v1 analysis/read.sh",
        {"highly_sensitive": {"d": "output/d.csv"}},
        needs=["write"],
    )
    done = drive_job(config, second.id)
    assert (done.state, done.status_code) == (State.FAILED, StatusCode.JOB_ERROR)
    assert done.status_message.startswith("JobError: The file output/moderate.csv doesn't exist")


def test_rerun_deletes_obsolete_outputs_from_both_trees(config, jobs):
    spec = {"moderately_sensitive": {"t": "output/*.csv"}}
    assert (
        drive_job(config, jobs.add("named", "python:v1 analysis/named.sh a", spec).id).state
        is State.SUCCEEDED
    )
    high, medium = workspaces(config)
    assert (high / "output/a.csv").exists() and (medium / "output/a.csv").exists()
    assert (
        drive_job(config, jobs.add("named", "python:v1 analysis/named.sh b", spec).id).state
        is State.SUCCEEDED
    )
    assert (high / "output/b.csv").exists() and (medium / "output/b.csv").exists()
    assert not (high / "output/a.csv").exists() and not (medium / "output/a.csv").exists()


def test_container_has_no_network_runs_as_uid_1000_without_capabilities(config, jobs):
    job = jobs.add(
        "probe", "python:v1 analysis/probe.sh", {"moderately_sensitive": {"o": "output/*.txt"}}
    )
    done = drive_job(config, job.id)
    # wget to the host cannot get out: the job fails, and the outputs it wrote are still copied.
    assert (done.state, done.status_code) == (State.FAILED, StatusCode.NONZERO_EXIT)
    high = workspaces(config)[0]
    assert (high / "output/uid.txt").read_text().strip() == "1000"
    assert (high / "output/caps.txt").read_text().split() == ["CapEff:", "0000000000000000"]
    interfaces = [
        line.split(":")[0].strip()
        for line in (high / "output/netdev.txt").read_text().splitlines()[2:]
    ]
    assert interfaces == ["lo"]


def test_missing_image_is_a_job_error(config, jobs):
    job = jobs.add("write", "python:v999 analysis/write.sh", THREE_LEVELS)
    done = drive_job(config, job.id)
    assert (done.state, done.status_code) == (State.FAILED, StatusCode.JOB_ERROR)
    assert done.status_message == "JobError: Docker image python:v999 is not currently available"
    assert objects_exist(config, job) == (False, False)


def test_internal_error_when_finalising_keeps_container_and_volume(config, jobs, monkeypatch):
    job = jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS)
    monkeypatch.setenv("JR_FAULT", "finalize")
    done = drive_job(config, job.id)
    assert (done.state, done.status_code) == (State.FAILED, StatusCode.INTERNAL_ERROR)
    assert done.status_message == "Internal error when finalising job"
    assert "JR_FAULT=finalize" in done.error_detail
    assert objects_exist(config, job) == (True, True)


def test_worker_restart_finalizes_a_job_whose_container_already_exited(config, conn, jobs):
    job = jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS)
    executor = LocalDockerExecutor(config, conn)
    executor.prepare(job)
    assert executor.status(job) is ExecutorState.PREPARED
    executor.execute(job)  # ... and then the first worker died
    assert docker.wait_container(docker.container_name(job.id), 30) == 0
    assert executor.status(job) is ExecutorState.EXECUTED
    done = drive_job(config, job.id)
    assert done.state is State.SUCCEEDED and done.outputs
    assert drive_job(config, job.id).state is State.SUCCEEDED  # a late duplicate does nothing


def test_cancelled_while_running_is_killed_and_only_logged(config, conn, jobs):
    job = jobs.add("sleep", "python:v1 analysis/sleep.sh", {"moderately_sensitive": {"x": "x.csv"}})

    def cancel_once_running() -> None:
        # Cancel only once the container runs: cancelling earlier is a different path.
        watcher = db.connect(config.db_path)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if db_queries.get_job(watcher, job.id).status_code is StatusCode.EXECUTING:
                break
            time.sleep(0.05)
        watcher.execute("UPDATE job SET cancelled = 1 WHERE id = ?", (job.id,))

    threading.Thread(target=cancel_once_running, daemon=True).start()
    started = time.monotonic()
    done = drive_job(config, job.id)
    assert time.monotonic() - started < 15
    assert (done.state, done.status_code, done.status_message) == (
        State.FAILED,
        StatusCode.CANCELLED_BY_USER,
        "Cancelled by user",
    )
    assert (log_dir(config, done) / "metadata.json").exists()
    assert not workspaces(config)[0].exists()
    assert objects_exist(config, job) == (False, False)


def test_symlink_output_to_host_file_does_not_leak(config, jobs):
    job = jobs.add(
        "symlink", "python:v1 analysis/symlink.sh", {"highly_sensitive": {"p": "output/*.csv"}}
    )
    done = drive_job(config, job.id)
    assert (done.state, done.status_code) == (State.FAILED, StatusCode.UNMATCHED_PATTERNS)
    for tree in workspaces(config):
        assert not (tree / "output/passwd.csv").exists()
    assert "root:" not in (log_dir(config, done) / "logs.txt").read_text()


def counting_listings(monkeypatch) -> list[str]:
    """Record each run of the volume-listing helper (it still runs)."""
    listed: list[str] = []
    real = docker_files.list_volume_files

    def listing(config, job_id):
        listed.append(job_id)
        return real(config, job_id)

    monkeypatch.setattr(docker_files, "list_volume_files", listing)
    return listed


@DOCKER_ONLY  # the helper's listing and stats: host storage reads the directory itself
def test_literal_outputs_are_found_without_running_the_listing_helper(config, jobs, monkeypatch):
    listed = counting_listings(monkeypatch)
    literal = drive_job(config, jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS).id)
    assert literal.state is State.SUCCEEDED and len(literal.outputs) == 3
    assert listed == []
    high, medium = workspaces(config)
    assert (high / "output/high.csv").read_text() == "secret,rows\n"
    assert (medium / "output/moderate.csv").read_text() == "table\n"

    globbed = jobs.add(
        "glob", "python:v1 analysis/glob.sh", {"moderately_sensitive": {"t": "output/*.csv"}}
    )
    done = drive_job(config, globbed.id)
    assert done.state is State.SUCCEEDED and sorted(done.outputs) == [
        "output/a.csv",
        "output/b.csv",
    ]
    assert listed == [globbed.id]


@DOCKER_ONLY  # host storage: test_host_volumes.py's link to /etc
def test_output_directory_symlinked_out_of_the_volume_is_not_followed(config, jobs, monkeypatch):
    # /workspace/output -> /etc: Docker would resolve output/passwd in the helper's own image.
    listed = counting_listings(monkeypatch)
    job = jobs.add(
        "linkdir", "python:v1 analysis/linkdir.sh", {"moderately_sensitive": {"p": "output/passwd"}}
    )
    done = drive_job(config, job.id)
    assert (done.state, done.status_code) == (State.FAILED, StatusCode.UNMATCHED_PATTERNS)
    assert listed == [job.id]  # the stats saw the symlink and left it to the listing
    high, medium = workspaces(config)
    assert not (high / "output").exists() and not (medium / "output").exists()


@DOCKER_ONLY  # the guard of the archive API's copies: host storage writes the files itself
def test_stalled_copy_fails_job_marks_container_hung_and_touches_nothing(config, jobs, monkeypatch):
    config = load_config(
        environ={
            "JR_ENV_FILE": "/nonexistent",
            "WORKDIR": str(config.workdir),
            "COPY_STALL_TIMEOUT": "1",
            "VOLUME_STORAGE": config.volume_storage,
        }
    )
    job = jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS)
    release = threading.Event()

    def stalling(stream, **kwargs):
        yield tarstream.dir_entry("workspace/analysis", uid=1000, gid=1000)
        release.wait(20)  # the copy hangs here

    monkeypatch.setattr(tarstream, "rewrite_tar", stalling)
    try:
        done = drive_job(config, job.id)
    finally:
        release.set()
    assert (done.state, done.status_code) == (State.FAILED, StatusCode.JOB_ERROR)
    assert done.status_message.startswith(f"BrokenContainerError: {docker.BROKEN_MESSAGE}")
    assert "stalled" in done.status_message
    helper = docker.helper_name(job.id)
    with db.connect(config.db_path) as c:
        assert store_flags.get_flag(c, f"hung:{helper}").startswith(job.id)
    assert docker.volume_exists(docker.volume_name(job.id))  # nothing was cleaned up


def test_worker_process_runs_a_job_to_success(config, jobs):
    job = jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS)
    env = tool_env(
        config.workdir, PYTHONPATH=str(CHECKOUT_DIR), VOLUME_STORAGE=config.volume_storage
    )
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "jobrunner_lib.jobs.worker", job.id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert " run  Completed successfully status=succeeded" in proc.stderr
    assert f"id={job.id}" in proc.stderr
    with db.connect(config.db_path) as c:
        assert db_queries.get_job(c, job.id).state is State.SUCCEEDED
    print(f"worker process, trivial job end to end: {elapsed:.2f}s")


def test_second_worker_exits_quietly_while_the_lock_is_held(config, jobs):
    import filelock

    job = jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS)
    path = config.workdir / "locks" / f"job-{job.id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path)):
        again = drive_job(config, job.id)
    assert (again.state, again.rev) == (State.RUNNING, job.rev)
    assert objects_exist(config, job) == (False, False)


def test_worker_exits_75_and_leaves_the_job_when_docker_is_unreachable(config, jobs, tmp_path):
    job = jobs.add("write", "python:v1 analysis/write.sh", THREE_LEVELS)
    env = tool_env(
        config.workdir,
        PYTHONPATH=str(CHECKOUT_DIR),
        VOLUME_STORAGE=config.volume_storage,
        DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "jobrunner_lib.jobs.worker", job.id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 75, proc.stderr
    assert "Docker is not available" in proc.stderr
    with db.connect(config.db_path) as c:
        after = db_queries.get_job(c, job.id)
    # The job keeps its state; the worker only notes the outage (so the next worker can tell a
    # daemon restart from a job failure, and the pass does not count the attempt).
    assert (after.state, after.status_code) == (State.RUNNING, StatusCode.PREPARING)
    assert (after.error_detail or "").startswith("Docker became unavailable while the job ran")
    assert after.heartbeat_at is not None


def test_worker_leaves_a_job_killed_by_an_operator_while_it_runs(config, conn, jobs):
    job = jobs.add("sleep", "python:v1 analysis/sleep.sh", {"moderately_sensitive": {"x": "x.csv"}})
    outcome: list[Job] = []
    worker = threading.Thread(target=lambda: outcome.append(drive_job(config, job.id)), daemon=True)
    worker.start()

    def executing() -> bool:
        info = docker.inspect_container(docker.container_name(job.id))
        running = bool(info and info["State"].get("Running"))
        return running and db_queries.get_job(conn, job.id).status_code is StatusCode.EXECUTING

    # Killed once its container runs: the worker then only waits for it, saving nothing until it
    # stops. (A fixed delay raced the worker's own saves and the container's start.)
    wait_for(lambda: executing() or not worker.is_alive(), 60, "the job's container to run")
    current = db_queries.get_job(conn, job.id)
    assert current.status_code is StatusCode.EXECUTING, current.status_message
    db_queries.save_job(
        conn, transition(current, State.FAILED, StatusCode.KILLED_BY_ADMIN, Msg.KILLED)
    )
    docker.kill_container(docker.container_name(job.id))
    worker.join(60)
    (done,) = outcome
    assert (done.state, done.status_code) == (State.FAILED, StatusCode.KILLED_BY_ADMIN)
    assert not (config.high_privacy_storage_base / "logs").exists()  # not finalized by the worker
