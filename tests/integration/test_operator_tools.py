"""jr-kill, jr-retry, jr-reboot-prep and jr-prune against real Docker, real git and real workers.

Jobs are submitted with bin/jr-add-job and run by calling the run pass in-process (its workers are
real detached processes); the tools run as subprocesses without a terminal, as in a pipeline.
Every Docker object made here carries `org.jr.test=<session>` and is removed afterwards; the
prune tests use a backend name of their own, so they can never select anyone else's objects.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobrunner_lib.cli.formats import read_tsv
from jobrunner_lib.core.config import CHECKOUT_DIR, Config, load_config
from jobrunner_lib.core.ids import job_id, new_request_id
from jobrunner_lib.core.models import Job, Msg, State, StatusCode, new_job, transition
from jobrunner_lib.docker import engine as docker
from jobrunner_lib.docker import volumes
from jobrunner_lib.jobs import processes, run
from jobrunner_lib.store import db
from jobrunner_lib.store import flags as store_flags
from jobrunner_lib.store import queries as db_queries
from tests.support import cli
from tests.support.factories import make_request
from tests.support.fixtures import remove_labelled
from tests.support.studies import make_study
from tests.support.waiting import wait_for

pytestmark = pytest.mark.docker

SESSION = uuid.uuid4().hex[:12]
TEST_LABEL = f"org.jr.test={SESSION}"
# The prune tests' own backend and registry: prune must only ever see what they made.
PRUNE_ENV = {
    "BACKEND": f"jrtest{SESSION}",
    "DOCKER_REGISTRY": f"jrtest-{SESSION}",
    "ALLOWED_IMAGES": "python",
    "USING_DUMMY_DATA_BACKEND": "true",
}

PROJECT = """\
version: "3.0"
expectations: {population_size: 10}
actions:
  quick:
    run: python:v1 analysis/quick.sh
    outputs:
      moderately_sensitive:
        table: output/quick.csv
  short:
    run: python:v1 analysis/short.sh
    outputs:
      moderately_sensitive:
        table: output/short.csv
  sleeper:
    run: python:v1 analysis/sleeper.sh
    outputs:
      moderately_sensitive:
        table: output/never.csv
  uses:
    run: python:v1 analysis/uses.sh
    needs: [quick]
    outputs:
      moderately_sensitive:
        table: output/uses.csv
"""
SCRIPTS = {
    "analysis/quick.sh": "mkdir -p output\necho 'id,n' > output/quick.csv\necho '1,42' >> output/quick.csv\n",
    "analysis/short.sh": "echo started\nsleep 6\nmkdir -p output\necho done > output/short.csv\n",
    "analysis/sleeper.sh": "echo going to sleep\nsleep 30\n",
    "analysis/uses.sh": "mkdir -p output\nwc -l < output/quick.csv > output/uses.csv\n",
}
QUICK_CSV = "id,n\n1,42\n"


# ---- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def env(workdir: Path, monkeypatch: pytest.MonkeyPatch, docker_ready) -> Iterator[Path]:
    """A private workdir; our labels on every Docker object; workers and objects removed after."""
    monkeypatch.setenv(docker.EXTRA_LABELS_ENV, TEST_LABEL)
    monkeypatch.setenv("JR_USER", "tester")
    monkeypatch.setenv("MAX_WORKERS", "4")
    yield workdir
    if (workdir / "db.sqlite").exists():
        conn = db.connect(workdir / "db.sqlite")
        for row in conn.execute("SELECT worker_pid, worker_started_at FROM job WHERE worker_pid"):
            processes.kill_worker(row[0], row[1])
        conn.close()
    processes.reap_children()
    remove_labelled(TEST_LABEL, images=True)


@pytest.fixture
def config(env) -> Config:
    return load_config()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    repo, _ = make_study(tmp_path_factory.mktemp("study") / "study", PROJECT, SCRIPTS)
    return repo


def tool(workdir: Path, name: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run bin/<name> without a terminal, with MAX_WORKERS kept (tool_env drops it)."""
    return cli.run(name, *args, workdir=workdir, **{"MAX_WORKERS": "4", **env})


def add_jobs(workdir: Path, repo: Path, *actions: str) -> list[str]:
    """Submit a request with jr-add-job; the new job ids."""
    result = tool(workdir, "jr-add-job", str(repo), *actions, "-o", "ids")
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def drive(
    config: Config, conn, until: Callable[[], bool], timeout: float = 60, what: str = ""
) -> None:
    """Run passes (as the service would) until the condition holds."""

    def step() -> bool:
        run.run_pass(config, conn)
        return until()

    wait_for(step, timeout, what or "the jobs")


def get(conn, jid: str) -> Job:
    job = db_queries.get_job(conn, jid)
    assert job is not None
    return job


def final(conn, jid: str) -> Callable[[], bool]:
    return lambda: get(conn, jid).state.is_final


def container_state(jid: str) -> str | None:
    info = docker.inspect_container(docker.container_name(jid))
    return None if info is None else info["State"]["Status"]


def executing(conn, jid: str) -> Callable[[], bool]:
    return lambda: (
        get(conn, jid).status_code is StatusCode.EXECUTING and container_state(jid) == "running"
    )


def objects(jid: str) -> dict[str, bool]:
    return {
        "container": docker.inspect_container(docker.container_name(jid)) is not None,
        "helper": docker.inspect_container(docker.helper_name(jid)) is not None,
        "volume": volumes.exists(load_config(), jid),  # a Docker volume or a host directory
    }


def job_log(config: Config, jid: str) -> Path | None:
    found = list((config.high_privacy_storage_base / "logs").glob(f"*/os-job-{jid}/logs.txt"))
    return found[0] if found else None


def insert(conn, action: str, state: State, code: StatusCode, message: str, **fields) -> Job:
    """A job straight into the store (for cases a real run cannot set up cheaply)."""
    request = make_request(workspace="ws", actions=[action])
    jid = fields.pop("id", None) or job_id(request.id, action)
    job = new_job(
        jid,
        request,
        action,
        State.PENDING,
        StatusCode.CREATED,
        Msg.CREATED,
        run_command="python:v1 analysis/quick.sh",
        **fields,
    )
    if state is not State.PENDING:
        job = transition(job, State.RUNNING, StatusCode.EXECUTING, Msg.RUNNING)
    if state.is_final:
        job = transition(job, state, code, message)
    db_queries.insert_request(conn, request, [job])
    return job


def rows(result: subprocess.CompletedProcess[str]) -> list[dict[str, str]]:
    return read_tsv(result.stdout)


# ---- jr-kill --------------------------------------------------------------------------------


def test_kill_pending_job_never_starts_and_a_second_kill_changes_nothing(config, conn, study):
    (jid,) = add_jobs(config.workdir, study, "quick")
    result = tool(config.workdir, "jr-kill", "--yes", jid)
    assert result.returncode == 0, result.stderr
    (row,) = rows(result)
    assert (row["id"], row["state"], row["status_code"]) == (jid, "failed", "killed_by_admin")
    job = get(conn, jid)
    assert job.status_message == "Killed by admin"
    assert job.error_detail.startswith("killed by tester@") and job.error_detail.endswith(
        " with jr-kill"
    )
    assert job.completed_at is not None and job.started_at is None
    assert run.run_pass(config, conn) == []  # nothing to start
    assert objects(jid) == {"container": False, "helper": False, "volume": False}

    again = tool(config.workdir, "jr-kill", jid)  # no --yes needed: nothing to do
    assert again.returncode == 0, again.stderr
    assert rows(again)[0]["result"] == "already failed (killed_by_admin): nothing to do"
    assert get(conn, jid) == job


def test_kill_running_job_stops_worker_and_container_keeps_log_then_cleanup(config, conn, study):
    (jid,) = add_jobs(config.workdir, study, "sleeper")
    drive(config, conn, executing(conn, jid), what="the sleeper to run")
    worker = get(conn, jid)

    result = tool(config.workdir, "jr-kill", "--yes", jid[:5])
    assert result.returncode == 0, result.stderr
    assert "About to kill 1 job(s):" in result.stderr
    job = get(conn, jid)
    assert (job.state, job.status_code) == (State.FAILED, StatusCode.KILLED_BY_ADMIN)
    assert not processes.worker_alive(worker.worker_pid, worker.worker_started_at)
    assert container_state(jid) == "exited"
    assert objects(jid)["volume"]  # kept for a look until --cleanup
    log_txt = job_log(config, jid)
    assert log_txt is not None
    text = log_txt.read_text()
    assert "going to sleep" in text and "\n\nKilled by admin\n" in text
    assert (
        json.loads((log_txt.parent / "metadata.json").read_text())["status_code"]
        == "killed_by_admin"
    )
    assert run.run_pass(config, conn) == []
    assert get(conn, jid) == job

    again = tool(config.workdir, "jr-kill", "--yes", jid)
    assert again.returncode == 0, again.stderr
    assert rows(again)[0]["result"].startswith("already failed (killed_by_admin)")
    assert get(conn, jid) == job

    cleanup = tool(config.workdir, "jr-kill", "--cleanup", "--yes", jid, "-o", "jsonl")
    assert cleanup.returncode == 0, cleanup.stderr
    assert "removed" in json.loads(cleanup.stdout)["result"]
    assert objects(jid) == {"container": False, "helper": False, "volume": False}
    assert get(conn, jid) == job
    twice = tool(config.workdir, "jr-kill", "--cleanup", "--yes", jid)
    assert twice.returncode == 0 and "nothing to do" in rows(twice)[0]["result"]


def test_kill_finished_job_keeps_its_state_and_cleanup_clears_leftovers(config, conn, study):
    (jid,) = add_jobs(config.workdir, study, "quick")
    drive(config, conn, final(conn, jid), what="quick to finish")
    done = get(conn, jid)
    assert done.state is State.SUCCEEDED
    # The worker cleans up after saving the final state; let it finish first.
    wait_for(
        lambda: not processes.worker_alive(done.worker_pid, done.worker_started_at),
        60,
        "the worker",
    )
    processes.reap_children()
    # A leftover volume, as a crash during cleanup would leave.
    docker.create_volume(docker.volume_name(jid), docker.labels(config.backend, jid))

    plain = tool(config.workdir, "jr-kill", "--yes", jid)
    assert plain.returncode == 0, plain.stderr
    assert rows(plain)[0]["result"] == "already succeeded: nothing to do"
    assert objects(jid)["volume"]

    cleanup = tool(config.workdir, "jr-kill", "--cleanup", "--yes", jid)
    assert cleanup.returncode == 0, cleanup.stderr
    assert rows(cleanup)[0]["result"] == f"already succeeded; removed {docker.volume_name(jid)}"
    assert not objects(jid)["volume"]
    assert get(conn, jid) == done  # state, timestamps and message untouched


def test_kill_cleanup_leaves_a_hung_container_alone(config, conn):
    hung = insert(conn, "h", State.FAILED, StatusCode.JOB_ERROR, "BrokenContainerError: stalled")
    docker.create_volume(docker.volume_name(hung.id), docker.labels(config.backend, hung.id))
    store_flags.set_flag(conn, f"hung:{docker.helper_name(hung.id)}", hung.id)
    result = tool(config.workdir, "jr-kill", "--cleanup", "--yes", hung.id)
    assert result.returncode == 0, result.stderr
    assert rows(result)[0]["result"] == (
        f"already failed (job_error); left {docker.helper_name(hung.id)} alone: flagged hung"
    )
    assert docker.volume_exists(docker.volume_name(hung.id))
    assert get(conn, hung.id) == hung


def test_kill_by_request_id_kills_every_job_of_the_request(config, conn, study):
    ids = add_jobs(config.workdir, study, "quick", "short")
    request = get(conn, ids[0]).job_request_id
    result = tool(config.workdir, "jr-kill", "--yes", request, "-o", "ids")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted(ids)
    assert {get(conn, i).status_code for i in ids} == {StatusCode.KILLED_BY_ADMIN}


def test_kill_reads_ids_from_stdin_and_says_cancelled_for_a_cancelled_job(config, conn, study):
    (jid,) = add_jobs(config.workdir, study, "quick")
    db_queries.set_cancelled(conn, get(conn, jid).job_request_id, ["quick"])
    result = cli.run("jr-kill", "--yes", "-", workdir=config.workdir, input=f"id\n{jid}\n")
    assert result.returncode == 0, result.stderr
    job = get(conn, jid)
    assert (job.state, job.status_code, job.status_message) == (
        State.FAILED,
        StatusCode.CANCELLED_BY_USER,
        Msg.CANCELLED,
    )


def test_kill_ambiguous_fragment_without_terminal_exits_4_and_kills_nothing(config, conn):
    one = insert(conn, "a", State.PENDING, StatusCode.CREATED, Msg.CREATED, id="zzqqaaaaaaaaaaaa")
    two = insert(conn, "b", State.PENDING, StatusCode.CREATED, Msg.CREATED, id="zzqqbbbbbbbbbbbb")
    result = tool(config.workdir, "jr-kill", "--yes", "zzqq")
    assert result.returncode == 4
    assert one.id in result.stderr and two.id in result.stderr
    assert result.stdout == ""
    assert get(conn, one.id) == one and get(conn, two.id) == two


def test_kill_unknown_id_exits_3(config, conn):
    result = tool(config.workdir, "jr-kill", "--yes", "nosuchjob")
    assert (result.returncode, result.stderr) == (
        3,
        "jr-kill: No jobs found matching 'nosuchjob'\n",
    )


def test_kill_dry_run_changes_nothing(config, conn, study):
    (jid,) = add_jobs(config.workdir, study, "quick")
    before = get(conn, jid)
    result = tool(config.workdir, "jr-kill", "--dry-run", "--cleanup", jid)
    assert result.returncode == 0, result.stderr
    assert (
        f"kill and clean up: {jid}" in result.stderr and "dry run: nothing changed" in result.stderr
    )
    assert result.stdout == ""
    assert get(conn, jid) == before


# ---- without a terminal and without --yes: every destructive tool refuses ---------------------


def test_destructive_tools_without_terminal_or_yes_exit_2_and_change_nothing(config, conn):
    pending = insert(conn, "p", State.PENDING, StatusCode.CREATED, Msg.CREATED)
    broken = insert(conn, "i", State.FAILED, StatusCode.INTERNAL_ERROR, Msg.INTERNAL_FINALIZING)
    running = insert(conn, "r", State.RUNNING, StatusCode.EXECUTING, Msg.RUNNING)
    docker.create_volume(docker.volume_name(broken.id), docker.labels(config.backend, broken.id))
    orphan = new_request_id()
    docker.create_volume(docker.volume_name(orphan), docker.labels(PRUNE_ENV["BACKEND"], orphan))
    for name, args, env in (
        ("jr-kill", [pending.id], {}),
        ("jr-kill", ["--cleanup", broken.id], {}),
        ("jr-retry", [broken.id], {}),
        ("jr-reboot-prep", [], {}),
        ("jr-prune", [], PRUNE_ENV),
    ):
        result = tool(config.workdir, name, *args, **env)
        assert result.returncode == 2, (name, result.stderr)
        assert "without a terminal to confirm: add --yes" in result.stderr, name
        assert result.stdout == "", name
    for job in (pending, broken, running):
        assert get(conn, job.id) == job
    assert docker.volume_exists(docker.volume_name(orphan))


# ---- jr-retry -------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["prepare", "execute", "finalize"])
def test_retry_after_internal_error_at_each_step_then_succeeds(
    config, conn, study, monkeypatch, step
):
    (jid,) = add_jobs(config.workdir, study, "quick")
    monkeypatch.setenv("JR_FAULT", step)
    drive(config, conn, final(conn, jid), what=f"the {step} fault")
    failed = get(conn, jid)
    assert (failed.state, failed.status_code) == (State.FAILED, StatusCode.INTERNAL_ERROR)
    kept = step != "prepare"  # a prepare fault strikes before anything is made
    assert objects(jid)["container"] is kept and objects(jid)["volume"] is kept
    monkeypatch.delenv("JR_FAULT")

    result = tool(config.workdir, "jr-retry", "--yes", jid)
    assert result.returncode == 0, result.stderr
    job = get(conn, jid)
    assert job.attempts == 0 and job.completed_at is None and job.error_detail is None
    if kept:
        assert (job.state, job.status_code, job.status_message) == (
            State.RUNNING,
            StatusCode.FINALIZING,
            Msg.RETRYING,
        )
        assert "kept container" in rows(result)[0]["result"]
    else:
        assert (job.state, job.status_code, job.status_message) == (
            State.PENDING,
            StatusCode.CREATED,
            Msg.CREATED,
        )

    drive(config, conn, final(conn, jid), what="the retried job")
    done = get(conn, jid)
    assert done.state is State.SUCCEEDED, done.status_message
    high = config.high_privacy_storage_base / "workspaces" / "test" / "output" / "quick.csv"
    medium = config.medium_privacy_storage_base / "workspaces" / "test" / "output" / "quick.csv"
    assert high.read_text() == QUICK_CSV and medium.read_text() == QUICK_CSV
    # The worker removes them just after saving the final state.
    wait_for(lambda: not any(objects(jid).values()), timeout=30, what="the worker's cleanup")


def test_retry_refuses_other_jobs_with_the_reason_but_retries_the_eligible_ones(config, conn):
    broken = insert(conn, "i", State.FAILED, StatusCode.INTERNAL_ERROR, Msg.INTERNAL_STARTING)
    exited = insert(
        conn, "n", State.FAILED, StatusCode.NONZERO_EXIT, "Job exited with error code 3"
    )
    pending = insert(conn, "p", State.PENDING, StatusCode.CREATED, Msg.CREATED)
    result = tool(config.workdir, "jr-retry", "--yes", broken.id, exited.id, pending.id)
    assert result.returncode == 1
    assert (
        f"jr-retry: {exited.id} (n): not retried: it failed with nonzero_exit "
        "(Job exited with error code 3), not internal_error"
    ) in result.stderr
    assert f"jr-retry: {pending.id} (p): not retried: it is pending" in result.stderr
    assert get(conn, exited.id) == exited and get(conn, pending.id) == pending
    # No container was kept, so the internal error starts over.
    assert get(conn, broken.id).state is State.PENDING

    only_bad = tool(config.workdir, "jr-retry", "--yes", exited.id)
    assert only_bad.returncode == 1 and "not internal_error" in only_bad.stderr


def test_retry_brings_back_the_jobs_that_failed_waiting_on_it_and_they_run(
    config, conn, study, monkeypatch
):
    quick, uses = add_jobs(config.workdir, study, "uses")  # quick first: uses needs it
    monkeypatch.setenv("JR_FAULT", "finalize")
    drive(config, conn, final(conn, quick), what="the finalize fault")
    monkeypatch.delenv("JR_FAULT")
    drive(config, conn, final(conn, uses), what="the dependant to fail")
    assert (get(conn, quick).status_code, get(conn, uses).status_code) == (
        StatusCode.INTERNAL_ERROR,
        StatusCode.DEPENDENCY_FAILED,
    )

    result = tool(config.workdir, "jr-retry", "--yes", quick)
    assert result.returncode == 0, result.stderr
    assert [(r["id"], r["result"]) for r in rows(result)] == [
        (quick, "back to running: the next pass picks up its kept container"),
        (uses, "back to pending: waits again for the job it needs"),
    ]
    back = get(conn, uses)
    assert (back.state, back.status_code, back.completed_at) == (
        State.PENDING,
        StatusCode.WAITING_ON_DEPENDENCIES,
        None,
    )
    drive(config, conn, final(conn, uses), what="the retried job and its dependant")
    assert get(conn, quick).state is State.SUCCEEDED
    assert get(conn, uses).state is State.SUCCEEDED, get(conn, uses).status_message
    out = config.medium_privacy_storage_base / "workspaces" / "test" / "output" / "uses.csv"
    assert out.read_text().strip() == "2"  # it read quick's two lines
    wait_for(lambda: not any(objects(quick).values()), timeout=30, what="the worker's cleanup")


def test_retry_dependants_through_each_other_but_not_replaced_or_cancelled_ones(config, conn):
    broken = insert(conn, "x", State.FAILED, StatusCode.INTERNAL_ERROR, Msg.INTERNAL_FINALIZING)

    def dependant(action: str, waits: Job, **fields) -> Job:
        message = f"{Msg.DEPENDENCY_FAILED}: {waits.action} ({waits.id})"
        return insert(
            conn,
            action,
            State.FAILED,
            StatusCode.DEPENDENCY_FAILED,
            message,
            wait_for_job_ids=[waits.id],
            **fields,
        )

    direct = dependant("y", broken, at=1000)
    through = dependant("z", direct, at=1001)
    replaced = dependant("r", broken, at=1002)
    newer = insert(conn, "r", State.SUCCEEDED, StatusCode.SUCCEEDED, Msg.SUCCEEDED, at=1003)
    cancelled = dependant("c", broken, at=1004, cancelled=True)
    unrelated = insert(conn, "u", State.FAILED, StatusCode.DEPENDENCY_FAILED, "other", at=1005)
    untouched = [replaced, newer, cancelled, unrelated]

    dry = tool(config.workdir, "jr-retry", "--dry-run", broken.id)
    assert dry.returncode == 0, dry.stderr
    assert f"  back to pending, waiting again: {direct.id}  y  (ws)" in dry.stderr
    assert f"  back to pending, waiting again: {through.id}  z  (ws)" in dry.stderr
    assert dry.stderr.count("back to pending, waiting again") == 2
    assert get(conn, direct.id) == direct

    kept = tool(config.workdir, "jr-retry", "--yes", "--no-dependants", broken.id)
    assert kept.returncode == 0, kept.stderr
    assert [r["id"] for r in rows(kept)] == [broken.id]
    assert get(conn, direct.id) == direct and get(conn, through.id) == through
    # Retried again (it went back to pending: no container was kept) it is not failed now; put
    # it back to test the default.
    with db.transaction(conn):
        conn.execute(
            "UPDATE job SET state = 'failed', status_code = 'internal_error' WHERE id = ?",
            (broken.id,),
        )

    # Naming a dependant too (as a request's ID would) is no refusal: it comes back with it.
    result = tool(config.workdir, "jr-retry", "--yes", broken.id, direct.id)
    assert result.returncode == 0, result.stderr
    assert "not retried" not in result.stderr
    assert [r["id"] for r in rows(result)] == [broken.id, direct.id, through.id]
    for job in (direct, through):
        assert get(conn, job.id).state is State.PENDING
    for job in untouched:
        assert get(conn, job.id) == job


# ---- jr-reboot-prep -------------------------------------------------------------------------


@pytest.fixture
def fake_service(config) -> Iterator[subprocess.Popen]:
    """A live process whose command line names jr-service, in $WORKDIR/service.pid."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "jr-service"])
    config.workdir.mkdir(parents=True, exist_ok=True)
    (config.workdir / "service.pid").write_text(f"{proc.pid}\n")
    yield proc
    proc.kill()
    proc.wait()


def test_reboot_prep_refuses_while_the_service_runs(config, conn, fake_service):
    running = insert(conn, "r", State.RUNNING, StatusCode.EXECUTING, Msg.RUNNING)
    result = tool(config.workdir, "jr-reboot-prep", "--yes")
    assert result.returncode == 75
    assert result.stderr == (
        f"jr-reboot-prep: the service is running (pid {fake_service.pid}); "
        "stop it first, or use --drain, or --force\n"
    )
    assert get(conn, running.id) == running

    fake_service.kill()
    fake_service.wait()  # a stale pid file no longer counts
    stale = tool(config.workdir, "jr-reboot-prep", "--yes")
    assert stale.returncode == 0, stale.stderr
    assert get(conn, running.id).status_code is StatusCode.WAITING_ON_REBOOT


def test_reboot_prep_puts_running_jobs_back_to_pending_and_they_rerun_after(config, conn, study):
    (jid,) = add_jobs(config.workdir, study, "short")
    drive(config, conn, executing(conn, jid), what="short to run")
    worker = get(conn, jid)

    result = tool(config.workdir, "jr-reboot-prep", "--yes")
    assert result.returncode == 0, result.stderr
    job = get(conn, jid)
    assert (job.state, job.status_code, job.status_message) == (
        State.PENDING,
        StatusCode.WAITING_ON_REBOOT,
        Msg.WAITING_ON_REBOOT,
    )
    assert job.started_at is None and job.worker_pid is None
    assert not processes.worker_alive(worker.worker_pid, worker.worker_started_at)
    assert objects(jid) == {"container": False, "helper": False, "volume": False}
    (row,) = rows(result)
    assert row["id"] == jid and row["result"].startswith("back to pending")

    service = subprocess.run(
        ["bash", str(CHECKOUT_DIR / "service" / "jr-service"), "--until-idle"],
        env=cli.tool_env(config.workdir, POLL_INTERVAL="0.2", MAX_WORKERS="4"),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert service.returncode == 0, service.stderr
    done = get(conn, jid)
    assert done.state is State.SUCCEEDED, done.status_message
    out = config.high_privacy_storage_base / "workspaces" / "test" / "output" / "short.csv"
    assert out.read_text() == "done\n"


def test_drain_pauses_waits_for_running_jobs_and_resume_lifts_it(config, conn, study):
    long_id, stuck_id = add_jobs(config.workdir, study, "short", "sleeper")
    drive(
        config,
        conn,
        lambda: executing(conn, long_id)() and executing(conn, stuck_id)(),
        what="short and sleeper to run",
    )

    timed_out = tool(config.workdir, "jr-reboot-prep", "--drain", "--timeout", "1s")
    assert timed_out.returncode == 75
    assert "job(s) still running (the backend stays paused):" in timed_out.stderr
    assert stuck_id in timed_out.stderr  # the sleeper certainly still runs
    # The `paused` backend flag, as upstream sets it (jr-flags shows it, the website receives it).
    assert store_flags.get_flag(conn, "paused") == "true"
    assert "paused: draining for reboot since " in timed_out.stderr
    assert tool(config.workdir, "jr-kill", "--yes", stuck_id).returncode == 0

    (queued,) = add_jobs(config.workdir, study, "quick")
    drain = subprocess.Popen(
        [sys.executable, str(cli.BIN / "jr-reboot-prep"), "--drain"],
        env=cli.tool_env(config.workdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def drained() -> bool:
        assert get(conn, queued).state is State.PENDING  # nothing starts while paused
        return drain.poll() is not None

    try:
        # The service keeps running passes while it drains.
        drive(config, conn, drained, timeout=60, what="the drain")
        out, err = drain.communicate(timeout=10)
    finally:
        if drain.poll() is None:
            drain.kill()
    assert drain.returncode == 0, err
    drained_at = time.time()
    assert (
        "ready for reboot: no jobs running; 1 pending jobs will start after jr-reboot-prep --resume"
        in err
    )
    long_job = get(conn, long_id)
    assert long_job.state is State.SUCCEEDED and long_job.completed_at <= drained_at
    waiting = get(conn, queued)
    assert (waiting.state, waiting.status_code, waiting.started_at) == (
        State.PENDING,
        StatusCode.PAUSED,
        None,
    )

    resumed = tool(config.workdir, "jr-reboot-prep", "--resume")
    assert resumed.returncode == 0 and "resumed: lifted the pause (paused since " in resumed.stderr
    assert store_flags.get_flag(conn, "paused") is None
    assert store_flags.backend_flags(conn)["paused"].value is None  # cleared, its time kept
    drive(config, conn, final(conn, queued), what="the queued job")
    assert get(conn, queued).state is State.SUCCEEDED


# ---- jr-prune -------------------------------------------------------------------------------


def make_container(name: str, labels: dict[str, str]) -> None:
    docker.client().api.create_container("jr-busybox:latest", ["true"], name=name, labels=labels)


def make_objects(backend: str, jid: str, *, helper: bool = False) -> None:
    """A job's container and volume (and helper), labelled as the executor labels them."""
    make_container(
        docker.container_name(jid), docker.labels(backend, jid, workspace="ws", action="a")
    )
    if helper:
        make_container(docker.helper_name(jid), docker.labels(backend, jid))
    docker.create_volume(docker.volume_name(jid), docker.labels(backend, jid))


def build_image(tag: str, variant: str) -> str:
    """A tiny image tagged `tag`, labelled as scripts/build-images labels them; its id."""
    api = docker.client().api
    dockerfile = io.BytesIO(b"FROM jr-busybox:latest\n")
    labels = {"org.jr.image": tag, "org.jr.test": SESSION, "variant": variant}
    for _ in api.build(fileobj=dockerfile, tag=tag, labels=labels, rm=True, decode=True):
        pass
    return api.inspect_image(tag)["Id"]


def test_prune_removes_only_this_backends_leftovers_of_finished_jobs(config, conn):
    backend = PRUNE_ENV["BACKEND"]
    done = insert(conn, "done", State.SUCCEEDED, StatusCode.SUCCEEDED, Msg.SUCCEEDED)
    broken = insert(
        conn, "broken", State.FAILED, StatusCode.INTERNAL_ERROR, Msg.INTERNAL_FINALIZING
    )
    busy = insert(conn, "busy", State.RUNNING, StatusCode.EXECUTING, Msg.RUNNING)
    hung = insert(conn, "hung", State.FAILED, StatusCode.JOB_ERROR, "BrokenContainerError: x")
    looked = insert(conn, "looked", State.FAILED, StatusCode.KILLED_BY_ADMIN, Msg.KILLED)
    unknown = job_id(new_request_id(), "gone")
    make_objects(backend, done.id, helper=True)
    for job_ in (broken.id, busy.id, unknown, looked.id):
        make_objects(backend, job_)
    # An operator's open jr-mount session on a finished job's volume.
    mount = f"jr-mount-{looked.id}-{SESSION[:6]}"
    api = docker.client().api
    api.create_container(
        "jr-busybox:latest",
        ["sleep", "120"],
        name=mount,
        labels={**docker.labels(backend, looked.id), "org.jr.role": "mount"},
        host_config=api.create_host_config(
            binds={docker.volume_name(looked.id): {"bind": "/workspace"}}, network_mode="none"
        ),
    )
    api.start(mount)
    make_objects(backend, hung.id, helper=True)
    store_flags.set_flag(
        conn, f"hung:{docker.helper_name(hung.id)}", f"{hung.id} 2021-11-03T09:12:51Z"
    )
    store_flags.set_flag(conn, "hung:os-volume-nosuchjob-manager", "x")
    other = job_id(new_request_id(), "other")
    make_objects(f"other{SESSION}", other)
    plain = f"jrtest-plain-{SESSION}"
    make_container(plain, {"org.jr.test": SESSION})
    docker.client().api.create_volume(name=plain, labels={"org.jr.test": SESSION})
    repo = f"{PRUNE_ENV['DOCKER_REGISTRY']}/python:v1"
    old_image = build_image(repo, "old")
    new_image = build_image(repo, "new")  # takes the tag: the old one is left dangling
    temp = config.workdir / "temp"
    (temp / "tmp-old").mkdir(parents=True)
    (temp / "tmp-old" / "code.py").write_text("x" * 1000)
    (temp / "tmp-new").mkdir()
    two_days_ago = time.time() - 2 * 86400
    for path in (temp / "tmp-old" / "code.py", temp / "tmp-old"):
        os.utime(path, (two_days_ago, two_days_ago))

    def present() -> dict[str, bool]:
        api = docker.client().api
        names = {n.lstrip("/") for c in api.containers(all=True) for n in c["Names"]}
        vols = {v["Name"] for v in api.volumes().get("Volumes") or []}
        images = {i["Id"] for i in api.images()}
        found = {n: n in names for n in (plain, mount)}
        for jid in (done.id, broken.id, busy.id, unknown, hung.id, other, looked.id):
            found[f"c-{jid}"] = docker.container_name(jid) in names
            found[f"v-{jid}"] = docker.volume_name(jid) in vols
        found["h-done"] = docker.helper_name(done.id) in names
        found["h-hung"] = docker.helper_name(hung.id) in names
        found["vol-plain"] = plain in vols
        found["old-image"], found["new-image"] = old_image in images, new_image in images
        found["tmp-old"], found["tmp-new"] = (
            (temp / "tmp-old").exists(),
            (temp / "tmp-new").exists(),
        )
        return found

    everything = present()
    assert all(everything.values())

    dry = tool(config.workdir, "jr-prune", "--dry-run", **PRUNE_ENV)
    assert dry.returncode == 0, dry.stderr
    planned = {(r["kind"], r["job_id"] or r["name"]) for r in rows(dry)}
    assert planned == {
        ("container", done.id),
        ("helper", done.id),
        ("volume", done.id),
        ("container", unknown),
        ("volume", unknown),
        ("image", f"{repo.split(':')[0]}@{old_image[:19]}"),
        ("temp", str(temp / "tmp-old")),
        ("flag", "hung:os-volume-nosuchjob-manager"),
    }
    assert {r["result"] for r in rows(dry)} == {"would remove"}
    assert present() == everything

    result = tool(config.workdir, "jr-prune", "--yes", **PRUNE_ENV)
    assert result.returncode == 0, result.stderr
    assert f"warning: hung container {docker.helper_name(hung.id)} (job {hung.id}" in result.stderr
    assert f"warning: jr-mount is open on job {looked.id}" in result.stderr
    assert "reclaimed " in result.stderr
    assert {(r["kind"], r["job_id"] or r["name"]) for r in rows(result)} == planned
    assert {r["result"] for r in rows(result)} == {"removed"}
    gone = {k for k, v in present().items() if not v}
    assert gone == {
        f"c-{done.id}",
        f"v-{done.id}",
        "h-done",
        f"c-{unknown}",
        f"v-{unknown}",
        "old-image",
        "tmp-old",
    }
    assert store_flags.get_flag(conn, "hung:os-volume-nosuchjob-manager") is None
    assert store_flags.get_flag(conn, f"hung:{docker.helper_name(hung.id)}") is not None

    again = tool(config.workdir, "jr-prune", "--yes", **PRUNE_ENV)
    assert again.returncode == 0 and rows(again) == [] and "nothing to prune" in again.stderr

    recent = tool(config.workdir, "jr-prune", "--yes", "--older-than", "30d", **PRUNE_ENV)
    assert recent.returncode == 0 and rows(recent) == []  # the internal error is too recent
    failed = tool(config.workdir, "jr-prune", "--yes", "--include-failed", **PRUNE_ENV)
    assert failed.returncode == 0, failed.stderr
    assert {(r["kind"], r["job_id"]) for r in rows(failed)} == {
        ("container", broken.id),
        ("volume", broken.id),
    }
    left = present()
    assert not left[f"c-{broken.id}"] and left[f"c-{busy.id}"] and left[f"v-{busy.id}"]
    assert left[f"c-{other}"] and left[plain] and left["vol-plain"] and left["new-image"]


def test_prune_bad_older_than_is_a_usage_error(config):
    result = tool(config.workdir, "jr-prune", "--older-than", "soon", **PRUNE_ENV)
    assert result.returncode == 2
    assert result.stderr.startswith("jr-prune: --older-than 'soon': expected an age like 7d")


def test_reboot_prep_resume_when_not_paused_says_so(config):
    result = tool(config.workdir, "jr-reboot-prep", "--resume")
    assert (result.returncode, result.stderr) == (0, "not paused: nothing to do\n")


# ---- bad input: one line, the right exit code ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("jr-kill", ["-"], "jr-kill: no job IDs given (standard input was empty)\n"),
        ("jr-retry", ["-"], "jr-retry: no job IDs given (standard input was empty)\n"),
        ("jr-kill", ["ab"], "jr-kill: ID fragment 'ab' is too short: give at least 3 characters\n"),
        (
            "jr-reboot-prep",
            ["--timeout", "1h"],
            "jr-reboot-prep: --timeout only goes with --drain\n",
        ),
        (
            "jr-reboot-prep",
            ["--drain", "--timeout", "later"],
            "jr-reboot-prep: --timeout 'later': expected a duration like 45s, 30m, 2h or 1d\n",
        ),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(workdir, name, args, message):
    result = cli.run(name, *args, workdir=workdir)
    assert (result.returncode, result.stderr, result.stdout) == (2, message, "")


def test_drain_and_resume_together_is_a_usage_error(workdir):
    result = cli.run("jr-reboot-prep", "--drain", "--resume", workdir=workdir)
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
