"""jr-watch-logs and jr-mount as an operator runs them, against real jobs on real Docker.

Jobs are submitted with jr-add-job to a real study repo and run by real run passes (with their
detached workers). Every Docker object carries `org.jr.test=<uuid>` and is removed afterwards.
`Backend` and `ambiguous_jobs` are shared with the terminal and playbook tests.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobrunner_lib.cli.watch_logs import select_lines
from jobrunner_lib.core.config import load_config
from jobrunner_lib.core.models import Job, State, StatusCode
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.jobs.processes import reap_children, worker_alive
from jobrunner_lib.jobs.run import run_pass
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries
from tests.support.cli import BIN, run, tool_env
from tests.support.env import scrub
from tests.support.factories import insert_job, make_job, make_request
from tests.support.fixtures import remove_labelled
from tests.support.studies import make_study
from tests.support.waiting import wait_for

pytestmark = pytest.mark.docker

DOWN = {"DOCKER_HOST": "unix:///nonexistent.sock"}

LOOK_PROJECT = """\
version: "5"
actions:
  quick:
    run: python:v1 analysis/quick.sh
    outputs:
      moderately_sensitive:
        note: output/note.txt
  sleeper:
    run: python:v1 analysis/sleeper.sh
    outputs:
      moderately_sensitive:
        note: output/never.txt
  ticker:
    run: python:v1 analysis/ticker.sh
    outputs:
      moderately_sensitive:
        note: output/never-ticked.txt
  brief:
    run: python:v1 analysis/brief.sh
    outputs:
      moderately_sensitive:
        note: output/brief.txt
"""
LOOK_SCRIPTS = {
    "analysis/quick.sh": "mkdir -p output\necho hello from quick\necho quick > output/note.txt\n",
    # Bounded, so nothing outlives a crashed test for long.
    "analysis/sleeper.sh": "echo sleeper started\nexec sleep 300\n",
    "analysis/ticker.sh": "i=0\nwhile [ $i -lt 600 ]; do echo tick $i; i=$((i+1)); sleep 0.2; done\n",
    "analysis/brief.sh": "mkdir -p output\nfor i in 1 2 3 4; do echo step $i; sleep 0.5; done\n"
    "echo done > output/brief.txt\n",
}


class Backend:
    """A scratch backend: private WORKDIR, one study repo, jobs from jr-add-job run by run passes."""

    def __init__(
        self,
        root: Path,
        project: str = LOOK_PROJECT,
        scripts: dict[str, str] | None = None,
        settings: dict[str, str] | None = None,
    ):
        """Without settings, configured by environment variables; with them, by `root/.env` (as a
        checkout is), so commands run here may read and change it."""
        self.root = root
        self.workdir = root / "workdir"
        self.label = f"org.jr.test=look-{uuid.uuid4().hex[:12]}"
        self.env = {docker.EXTRA_LABELS_ENV: self.label, "NO_COLOR": "1"}
        if settings is None:
            settings = {}
            self.env.update(
                {
                    "WORKDIR": str(self.workdir),
                    "JR_ENV_FILE": str(root / "no.env"),
                    "MAX_WORKERS": "8",
                }
            )
        else:
            settings = {"WORKDIR": str(self.workdir), **settings}
            (root / ".env").write_text(
                "".join(f"{key}={value}\n" for key, value in settings.items())
            )
            self.env["JR_ENV_FILE"] = str(root / ".env")
        self.repo, _ = make_study(
            root / "study", project, LOOK_SCRIPTS if scripts is None else scripts
        )
        self.patch = pytest.MonkeyPatch()
        scrub(self.patch, *settings)
        # run_pass and the workers it spawns read the same settings from the environment.
        for name, value in self.env.items():
            self.patch.setenv(name, value)
        self.config = load_config()
        self.conn = db.connect(self.config.db_path)

    def tool_env(self, **env: str) -> dict[str, str]:
        """The environment a tool run against this backend gets."""
        return tool_env(self.workdir, **{**self.env, **env})

    def tool(self, tool: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run bin/<tool> against this backend."""
        return run(tool, *args, workdir=self.workdir, **{**self.env, **env})

    def add(self, *actions: str) -> list[str]:
        """Submit actions with jr-add-job; their job ids."""
        result = self.tool("jr-add-job", str(self.repo), *actions, "-o", "ids")
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    def job(self, job_id: str) -> Job:
        """The job as the store has it now."""
        job = db_queries.get_job(self.conn, job_id)
        assert job is not None
        return job

    def run_until(self, condition: Callable[[], object], what: str, timeout: float = 90) -> object:
        """Run passes until condition() holds."""

        def step() -> object:
            run_pass(self.config, self.conn)
            return condition()

        return wait_for(step, timeout, what)

    def container_running(self, job_id: str) -> bool:
        """Whether the job's container is running."""
        info = docker.inspect_container(docker.container_name(job_id))
        return bool(info and info["State"].get("Running"))

    def start(self, *actions: str, fault: str | None = None) -> list[str]:
        """Submit actions and run passes until each job has a running container (or, with a fault, has failed)."""
        if fault:
            self.patch.setenv("JR_FAULT", fault)
        try:
            ids = self.add(*actions)
            if fault:
                self.run_until(
                    lambda: all(self.job(i).state.is_final for i in ids), f"{actions} to fail"
                )
                return ids
            self.run_until(lambda: all(self.container_running(i) for i in ids), f"{actions} to run")
            return ids
        finally:
            self.patch.delenv("JR_FAULT", raising=False)

    def finish(self, *actions: str) -> list[str]:
        """Submit actions and run passes until each job is final."""
        ids = self.add(*actions)
        self.run_until(lambda: all(self.job(i).state.is_final for i in ids), f"{actions} to finish")
        return ids

    def close(self) -> None:
        """Stop every job, let the workers finish, remove every labelled Docker object."""
        try:
            key, value = self.label.split("=")
            for container in docker.list_containers(extra={key: value}):
                docker.kill_container(container["Id"])
            deadline = time.monotonic() + 60
            while db_queries.active_jobs(self.conn) and time.monotonic() < deadline:
                run_pass(self.config, self.conn)
                time.sleep(0.2)
            # A worker cleans up after saving the final state: let it finish before we remove.
            workers = [
                (j.worker_pid, j.worker_started_at)
                for j in db_queries.find_jobs(self.conn)
                if j.worker_pid
            ]
            while any(worker_alive(*w) for w in workers) and time.monotonic() < deadline:
                reap_children()
                time.sleep(0.2)
            reap_children()
        finally:
            remove_labelled(self.label)
            self.conn.close()
            self.patch.undo()


def ambiguous_jobs(conn, state: State = State.RUNNING) -> tuple[str, list[Job]]:
    """Insert two jobs (of different requests) whose ids share a 4-character fragment; return both."""
    seen: dict[str, tuple] = {}
    code, message = {
        State.RUNNING: (StatusCode.EXECUTING, "Running"),
        State.SUCCEEDED: (StatusCode.SUCCEEDED, "Completed successfully"),
    }.get(state, (StatusCode.CREATED, "Created"))
    for _ in range(50_000):
        request = make_request(workspace="ws")
        job = make_job(request, "extract", state, code=code, message=message)
        for i in range(len(job.id) - 3):
            fragment = job.id[i : i + 4]
            other = seen.get(fragment)
            # (A fragment may occur twice in one id: that is not two jobs.)
            if (
                other
                and other[1].id != job.id
                and fragment not in request.id
                and fragment not in other[0].id
            ):
                db_queries.insert_request(conn, other[0], [other[1]])
                db_queries.insert_request(conn, request, [job])
                return fragment, [other[1], job]
            seen.setdefault(fragment, (request, job))
    raise AssertionError("no two job ids sharing a fragment found")


@pytest.fixture(scope="module")
def backend(docker_ready, tmp_path_factory) -> Iterator[Backend]:
    """One scratch backend with a finished job, two running ones and one kept after an internal error."""
    scratch = Backend(tmp_path_factory.mktemp("look"))
    try:
        scratch.broken = scratch.start("quick", fault="finalize")[0]
        scratch.quick = scratch.finish("quick")[0]
        scratch.sleeper, scratch.ticker = scratch.start("sleeper", "ticker")
        yield scratch
    finally:
        scratch.close()


# ---- IDs and errors (no Docker needed) -------------------------------------------------------


@pytest.mark.parametrize("tool, extra", [("jr-watch-logs", []), ("jr-mount", ["--", "true"])])
def test_unknown_id_exits_3(store, tool, extra):
    workdir, _ = store
    result = run(tool, "zzzz", *extra, workdir=workdir)
    assert (result.returncode, result.stdout) == (3, "")
    assert result.stderr == f"{tool}: No jobs found matching 'zzzz'\n"


@pytest.mark.parametrize("tool, extra", [("jr-watch-logs", []), ("jr-mount", ["--", "true"])])
def test_ambiguous_fragment_without_a_terminal_exits_4_listing_both(store, tool, extra):
    workdir, conn = store
    fragment, jobs = ambiguous_jobs(conn)
    result = run(tool, fragment, *extra, workdir=workdir)
    assert result.returncode == 4, result.stderr
    assert all(job.id in result.stderr for job in jobs) and "--pick" in result.stderr


@pytest.mark.parametrize(
    "tool, args",
    [
        ("jr-watch-logs", ["ID"]),
        ("jr-watch-logs", []),
        ("jr-mount", ["ID", "--", "ls"]),
        ("jr-mount", ["--", "ls"]),
    ],
)
def test_docker_down_exits_75(store, tool, args):
    workdir, conn = store
    job = insert_job(conn, State.RUNNING, StatusCode.EXECUTING, "Running")
    result = run(tool, *[job.id if a == "ID" else a for a in args], workdir=workdir, **DOWN)
    assert result.returncode == 75, result.stderr
    assert "Docker is not available" in result.stderr and result.stdout == ""


def test_mount_of_a_job_without_a_volume_says_so_in_one_line_and_exits_1(docker_ready, store):
    workdir, conn = store
    job = insert_job(conn, State.SUCCEEDED, StatusCode.SUCCEEDED, "Completed successfully")
    result = run("jr-mount", job.id[:5], "--", "ls", workdir=workdir)
    assert result.returncode == 1
    assert result.stderr == (
        f"jr-mount: job {job.id} has no volume to mount: it is succeeded and its "
        "volume was removed when it finished\n"
    )


def test_mount_shell_without_a_terminal_is_a_usage_error(docker_ready, backend):
    result = backend.tool("jr-mount", backend.sleeper)
    assert result.returncode == 2
    assert "needs a terminal: give a command after --" in result.stderr


def test_watch_logs_of_a_finished_job_without_log_or_container_exits_1(docker_ready, store):
    workdir, conn = store
    job = insert_job(conn, State.FAILED, StatusCode.NONZERO_EXIT, "Job exited with error code 1")
    result = run("jr-watch-logs", job.id, workdir=workdir)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"jr-watch-logs: job {job.id} has no container and no saved log under "
    )


def test_watch_logs_finds_a_saved_log_in_another_month_without_docker(store):
    workdir, conn = store
    job = insert_job(conn, State.SUCCEEDED, StatusCode.SUCCEEDED, "Completed successfully")
    logs = workdir / "high_privacy" / "logs" / "2019-01" / f"os-job-{job.id}"
    logs.mkdir(parents=True)
    (logs / "logs.txt").write_text(
        "2019-01-31T23:59:59.123456789Z last words\n\nstate: succeeded\n"
    )
    result = run("jr-watch-logs", job.id, workdir=workdir, **DOWN)
    assert (result.returncode, result.stdout) == (0, "last words\n\nstate: succeeded\n")


def test_watch_logs_of_a_request_shows_each_jobs_log_prefixed_and_names_those_without_output(
    docker_ready, store
):
    workdir, conn = store
    request = make_request()
    done = make_job(
        request,
        "extract",
        State.SUCCEEDED,
        code=StatusCode.SUCCEEDED,
        message="Completed successfully",
    )
    waiting = make_job(request, "model", State.PENDING, message="Waiting on dependencies")
    db_queries.insert_request(conn, request, [done, waiting])
    logs = workdir / "high_privacy" / "logs" / "2019-01" / f"os-job-{done.id}"
    logs.mkdir(parents=True)
    (logs / "logs.txt").write_text("2019-01-31T23:59:59.1Z extracted\n")
    result = run("jr-watch-logs", request.id, workdir=workdir)
    assert (result.returncode, result.stdout) == (1, f"{done.id} extracted\n")
    assert result.stderr == (
        f"jr-watch-logs: job {waiting.id} has no output yet: it is pending "
        "(Waiting on dependencies)\n"
    )


def test_bad_tail_is_a_usage_error(store):
    workdir, _ = store
    result = run("jr-watch-logs", "--tail", "-3", "abcd", workdir=workdir)
    assert result.returncode == 2 and "--tail -3" in result.stderr


def test_select_lines_applies_tail_since_and_timestamps():
    data = (
        b"2021-11-03T09:00:00.1Z early\n2021-11-03T10:00:00.5Z late\n2021-11-03T10:00:01.0Z later\n"
        b"\nstate: succeeded\n"
    )
    since = 1635933600  # 2021-11-03T10:00:00Z: a line in that very second counts
    assert (
        select_lines(data, timestamps=False, tail=None, since=since)
        == b"late\nlater\n\nstate: succeeded\n"
    )
    assert select_lines(data, timestamps=True, tail=2, since=None) == b"\nstate: succeeded\n"
    assert select_lines(data, timestamps=True, tail=0, since=None) == b""


# ---- real jobs -----------------------------------------------------------------------------


def test_mount_lists_the_jobs_files(backend):
    result = backend.tool("jr-mount", backend.sleeper[:6], "--", "ls", "/workspace")
    assert result.returncode == 0, result.stderr
    assert {"analysis", "project.yaml"} <= set(result.stdout.split())


def test_mount_ps_shows_the_running_jobs_process(backend):
    result = backend.tool("jr-mount", backend.sleeper, "--", "ps", "-o", "pid,user,args")
    assert result.returncode == 0, result.stderr
    assert "sleep 300" in result.stdout and "jobuser" in result.stdout


def test_mount_can_strace_the_jobs_process(backend):
    ps = backend.tool("jr-mount", backend.sleeper, "--", "ps", "-o", "pid,args").stdout
    pid = next(line.split()[0] for line in ps.splitlines() if line.split()[1:] == ["sleep", "300"])
    result = backend.tool("jr-mount", backend.sleeper, "--", "timeout", "2", "strace", "-p", pid)
    assert f"Process {pid} attached" in result.stderr


def test_mount_passes_on_stdout_stderr_and_exit_code_and_removes_its_helper(backend):
    result = backend.tool(
        "jr-mount", backend.sleeper, "--", "sh", "-c", "echo out; echo err >&2; exit 7"
    )
    assert (result.returncode, result.stdout, result.stderr) == (7, "out\n", "err\n")
    key, value = backend.label.split("=")
    assert docker.list_containers(extra={key: value, "org.jr.role": "mount"}) == []


def test_mount_of_a_stopped_job_with_a_kept_volume_mounts_the_volume_only(backend):
    assert backend.job(backend.broken).status_code is StatusCode.INTERNAL_ERROR
    result = backend.tool("jr-mount", backend.broken, "--", "ls", "output")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "note.txt\n"
    assert "container is not running: mounting its volume only" in result.stderr


def test_mount_without_an_id_and_no_terminal_lists_jobs_with_a_volume(backend):
    result = backend.tool("jr-mount", "--", "ls")
    assert result.returncode == 2
    assert backend.sleeper in result.stderr and backend.broken in result.stderr
    assert backend.quick not in result.stderr


def test_watch_logs_of_a_finished_job_shows_its_saved_log(backend):
    result = backend.tool("jr-watch-logs", backend.quick)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hello from quick\n")
    assert "Completed successfully" in result.stdout and f"job_id: {backend.quick}" in result.stdout
    stamped = backend.tool("jr-watch-logs", "-t", backend.quick).stdout
    assert stamped.split(" ", 1)[0].endswith("Z") and stamped.split(" ", 1)[1].startswith(
        "hello from quick"
    )


def test_watch_logs_of_a_failed_job_with_its_container_kept_shows_the_container_output(backend):
    result = backend.tool("jr-watch-logs", backend.broken)
    assert (result.returncode, result.stdout) == (0, "hello from quick\n")


def test_watch_logs_no_follow_prints_what_a_running_job_has_so_far(backend):
    result = backend.tool("jr-watch-logs", "--no-follow", "--tail", "2", backend.ticker)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("tick ") for line in lines)


def test_watch_logs_follows_a_job_until_it_ends_and_exits_0(backend):
    [brief] = backend.add("brief")
    # The worker runs the job; this test only watches.
    backend.run_until(lambda: backend.container_running(brief), "brief to run")
    result = backend.tool("jr-watch-logs", brief)
    assert result.returncode == 0, result.stderr
    assert "step 4\n" in result.stdout
    assert f"job {brief}: its container has stopped" in result.stderr


def test_watch_logs_without_an_id_and_no_terminal_follows_every_running_job_with_id_prefixes(
    backend,
):
    proc = subprocess.Popen(
        [sys.executable, str(BIN / "jr-watch-logs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=backend.tool_env(),
        stdin=subprocess.DEVNULL,
    )
    try:
        seen: set[str] = set()
        assert proc.stdout is not None
        for line in proc.stdout:
            job_id, _, text = line.partition(" ")
            assert job_id in (backend.sleeper, backend.ticker), line
            seen.add(job_id)
            if seen == {backend.sleeper, backend.ticker} and text.startswith("tick"):
                break
        assert seen == {backend.sleeper, backend.ticker}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
        assert "following 2 running job(s)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watch_logs_with_no_running_jobs_says_so_and_exits_1(docker_ready, store):
    workdir, _ = store
    result = run("jr-watch-logs", workdir=workdir)
    assert (result.returncode, result.stderr) == (1, "jr-watch-logs: No running jobs found\n")
