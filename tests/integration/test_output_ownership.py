"""Outputs belong to their action (issue 16): real jobs, real Docker, both volume storages.

Each attack here needs no hostile job code, only an ordinary-looking project.yaml: a broad glob
that matches an input, a pattern reaching into `metadata/`, an output path another action owns,
a path another action declares highly_sensitive, a kill or crash in the middle of finalize.
The rules are outputs.claim_outputs / obsolete_outputs; these tests hold them to the files
that end up in the two privacy trees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.faults import PAUSE_POINTS
from jobrunner_lib.core.models import Job, State, StatusCode
from jobrunner_lib.jobs.worker import drive_job
from jobrunner_lib.store import queries as db_queries
from tests.integration.test_executor import (
    STORAGES,
    labelled,  # noqa: F401 - an autouse fixture: labels and removes this module's objects
    make_config,
    scripts_study,
    workspaces,
)
from tests.support.cli import ROOT, run, tool_env
from tests.support.e2e import wait_for
from tests.support.factories import Jobs

pytestmark = pytest.mark.docker

HIGH, MODERATE = "highly_sensitive", "moderately_sensitive"

SCRIPTS = {
    "extract.sh": 'mkdir -p output && echo "patient_id,age" > output/dataset.csv',
    "tables.sh": 'mkdir -p output && echo "n,5" > output/table_counts.csv',
    # Writes into jr's metadata/ directory, hoping a pattern will copy its files over jr's logs.
    "forge.sh": """
        mkdir -p metadata output
        echo FORGED > metadata/victim.log
        echo FORGED > metadata/forge.log
        echo FORGED > metadata/manifest.json
        echo f > output/f.csv
    """,
    "overwrite.sh": "mkdir -p output && echo OVERWRITTEN > output/dataset.csv && echo t > output/t.csv",
    # Each argument is a path to write; its content names the action and the file.
    # The first argument names the writer; each other one is a path to write, holding both.
    "write.sh": """
        who=$1; shift
        for f in "$@"; do mkdir -p "$(dirname "$f")"; echo "$who $f" > "$f"; done
    """,
    "big.sh": "mkdir -p output && dd if=/dev/zero of=output/big.csv bs=1048576 count=$1 2>/dev/null",
}


@pytest.fixture(params=STORAGES)
def config(request, tmp_path) -> Config:
    """A dummy-data backend in tmp_path, with each volume storage in turn."""
    return make_config(tmp_path, request.param)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, str]:
    """A git repo holding this module's scripts; (path, commit)."""
    return scripts_study(tmp_path_factory.mktemp("ownership") / "study", SCRIPTS)


def command(action: str, script: str | list[str]) -> str:
    """`python:v1 analysis/<script> [args]`; write.sh is given the action's name first."""
    if isinstance(script, str):
        return f"python:v1 analysis/{script}"
    name, *args = script
    if name == "write.sh":
        args = [action, *args]
    return " ".join(["python:v1", f"analysis/{name}", *args])


def run_job(
    config: Config, jobs: Jobs, action: str, script: str | list[str], spec: dict, **kw
) -> Job:
    """Add a claimed job of `action` running analysis/<script> and drive it to its end here."""
    job = jobs.add(action, command(action, script), spec, **kw)
    done = drive_job(config, job.id)
    assert done is not None and done.state.is_final, done
    return done


def files(root: Path) -> dict[str, str]:
    """path -> content of every file under root but jr's metadata/."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_text(errors="replace")
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != "metadata"
    }


def leftovers(config: Config) -> list[str]:
    """Temporary and staged files anywhere under the two privacy bases."""
    found = []
    for base in (config.high_privacy_storage_base, config.medium_privacy_storage_base):
        for p in base.rglob("*"):
            if p.name.startswith(".jr-tmp-") or p.name == ".jr-staging" and any(p.iterdir()):
                found.append(str(p.relative_to(base)))
    return found


def action_log(root: Path, action: str) -> str:
    return (root / "metadata" / f"{action}.log").read_text()


# ---- 1. an input is never claimed -------------------------------------------------------------


def test_an_input_is_never_claimed_so_patient_rows_never_reach_the_medium_tree(config, jobs):
    extract = run_job(config, jobs, "extract", "extract.sh", {HIGH: {"d": "output/dataset.csv"}})
    assert extract.state is State.SUCCEEDED
    tables = run_job(
        config,
        jobs,
        "tables",
        "tables.sh",
        {MODERATE: {"tables": "output/*.csv"}},
        needs=["extract"],
    )
    assert tables.state is State.SUCCEEDED, tables.status_message
    assert tables.outputs == {"output/table_counts.csv": MODERATE}
    assert tables.input_files == {"output/dataset.csv": "extract"}
    high, medium = workspaces(config)
    assert files(medium) == {"output/table_counts.csv": "n,5\n"}
    assert files(high)["output/dataset.csv"] == "patient_id,age\n"
    # The researcher is told which matched file was left out, and why.
    note = "Not an output: 'output/dataset.csv': it is an input, copied in from action extract"
    assert note in action_log(high, "tables") and note in action_log(medium, "tables")
    assert leftovers(config) == []


# ---- 2. nothing deletes or overwrites another action's files ------------------------------------


def test_narrowing_a_glob_never_deletes_another_actions_file(config, jobs, conn):
    run_job(config, jobs, "extract", "extract.sh", {HIGH: {"d": "output/dataset.csv"}})
    first = run_job(
        config, jobs, "tables", "tables.sh", {MODERATE: {"t": "output/*.csv"}}, needs=["extract"]
    )
    # As an older jr recorded it: the input dataset.csv as one of tables' own outputs.
    conn.execute(
        "UPDATE job SET outputs = ? WHERE id = ?",
        ('{"output/dataset.csv": "moderately_sensitive", "output/table_counts.csv": '
         '"moderately_sensitive"}', first.id),
    )  # fmt: skip
    second = run_job(
        config,
        jobs,
        "tables",
        "tables.sh",
        {MODERATE: {"t": "output/table_*.csv"}},
        needs=["extract"],
    )
    assert second.state is State.SUCCEEDED, second.status_message
    high, _ = workspaces(config)
    assert files(high)["output/dataset.csv"] == "patient_id,age\n"
    # extract's latest job still says succeeded, and a job needing it still gets its file.
    reader = run_job(
        config, jobs, "reader", ["write.sh", "output/r.csv"], {HIGH: {"r": "output/r.csv"}},
        needs=["extract"],
    )  # fmt: skip
    assert reader.state is State.SUCCEEDED, reader.status_message


def test_a_job_cannot_overwrite_another_actions_output(config, jobs):
    run_job(config, jobs, "extract", "extract.sh", {HIGH: {"d": "output/dataset.csv"}})
    other = run_job(config, jobs, "other", "overwrite.sh", {MODERATE: {"all": "output/*.csv"}})
    assert other.state is State.SUCCEEDED, other.status_message
    assert other.outputs == {"output/t.csv": MODERATE}
    high, medium = workspaces(config)
    assert files(high)["output/dataset.csv"] == "patient_id,age\n"
    assert "output/dataset.csv" not in files(medium)
    assert "it is an output of action extract" in action_log(high, "other")


def test_an_output_moving_to_another_action_is_kept_when_the_old_one_runs_again(config, jobs):
    # project v1: b writes output/x.csv. v2: a writes it, b writes output/y.csv instead.
    v1 = run_job(config, jobs, "b", ["write.sh", "output/x.csv"], {MODERATE: {"x": "output/x.csv"}})
    assert v1.state is State.SUCCEEDED
    b2 = jobs.add(
        "b", command("b", ["write.sh", "output/y.csv"]), {MODERATE: {"y": "output/y.csv"}}
    )
    a = run_job(config, jobs, "a", ["write.sh", "output/x.csv"], {MODERATE: {"x": "output/x.csv"}})
    assert a.state is State.SUCCEEDED, a.status_message  # b's newest job no longer declares x
    b = drive_job(config, b2.id)
    assert b.state is State.SUCCEEDED, b.status_message
    for root in workspaces(config):
        assert files(root) == {
            "output/x.csv": "a output/x.csv\n",
            "output/y.csv": "b output/y.csv\n",
        }


# ---- 3. jr's logs cannot be forged --------------------------------------------------------------


def test_patterns_reaching_into_metadata_never_replace_jr_logs(config, jobs):
    victim = run_job(
        config, jobs, "victim", ["write.sh", "output/v.csv"], {MODERATE: {"v": "output/v.csv"}}
    )
    spec = {
        MODERATE: {
            "v": "*/victim.log",
            "own": "*/forge.log",
            "m": "*/manifest.json",
            "f": "output/f.csv",
        }
    }
    forge = run_job(config, jobs, "forge", "forge.sh", spec)
    # The patterns into metadata/ matched only jr's files: the job's own, so unmatched.
    assert forge.status_code is StatusCode.UNMATCHED_PATTERNS
    assert forge.outputs == {"output/f.csv": MODERATE}
    for root in workspaces(config):
        assert f"job_id: {victim.id}\n" in action_log(root, "victim")
        assert f"job_id: {forge.id}\n" in action_log(root, "forge")
        assert "FORGED" not in action_log(root, "victim") + action_log(root, "forge")
    manifest = (workspaces(config)[1] / "metadata" / "manifest.json").read_text()
    assert manifest.startswith("{") and "FORGED" not in manifest
    assert sorted(p.name for p in (workspaces(config)[0] / "metadata").iterdir()) == [
        "forge.log",
        "victim.log",
    ]


# ---- privacy only goes up -------------------------------------------------------------------------


def test_a_path_another_action_declares_highly_sensitive_never_reaches_the_medium_tree(
    config, jobs
):
    # m writes output/data2.csv as moderately sensitive: it reaches the medium tree...
    m_spec = {MODERATE: {"all": "output/*.csv"}}
    m = run_job(config, jobs, "m", ["write.sh", "output/data2.csv", "output/m.csv"], m_spec)
    assert set(files(workspaces(config)[1])) == {"output/data2.csv", "output/m.csv"}
    # ...until h declares output/data*.csv highly sensitive: h's finalize removes the copy.
    h = run_job(
        config, jobs, "h", ["write.sh", "output/data1.csv"], {HIGH: {"d": "output/data*.csv"}}
    )
    assert h.state is State.SUCCEEDED, h.status_message
    assert set(files(workspaces(config)[1])) == {"output/m.csv"}
    # m again: its broad glob still matches data2.csv, which now stays high.
    m = run_job(config, jobs, "m", ["write.sh", "output/data2.csv", "output/m.csv"], m_spec)
    assert m.outputs == {"output/data2.csv": HIGH, "output/m.csv": MODERATE}
    high, medium = workspaces(config)
    assert set(files(medium)) == {"output/m.csv"}
    assert set(files(high)) == {"output/data1.csv", "output/data2.csv", "output/m.csv"}
    assert "Kept highly_sensitive: 'output/data2.csv': action h declares" in action_log(medium, "m")


# ---- 4. a kill or crash at any point of finalize ------------------------------------------------


def worker(config: Config, job: Job, tmp_path: Path, point: str) -> tuple[subprocess.Popen, int]:
    """Start the job's worker as a process that stops at `point` of finalize; (process, pid)."""
    pause_file = tmp_path / f"paused-{point}"
    env = tool_env(
        config.workdir,
        VOLUME_STORAGE=config.volume_storage,
        COPY_STALL_TIMEOUT="20",
        JR_PAUSE=point,
        JR_PAUSE_FILE=str(pause_file),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobrunner_lib.jobs.worker", job.id],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    pid = wait_for(
        lambda: pause_file.exists() and pause_file.read_text(), 120, f"the worker at {point}"
    )
    return proc, int(pid)


def assert_logs_agree_with_the_store(config: Config, conn, job: Job, previous: Job) -> Job:
    """Both action logs are about the job as the store has it, or still about the previous run."""
    stored = db_queries.get_job(conn, job.id)
    assert stored is not None and stored.state.is_final
    for root in workspaces(config):
        text = action_log(root, job.action)
        if f"job_id: {job.id}\n" in text:
            assert f"state: {stored.state.value}\n" in text
            assert stored.status_message in text
        else:
            assert f"job_id: {previous.id}\n" in text
    return stored


@pytest.mark.parametrize("point", PAUSE_POINTS)
def test_jr_kill_at_any_point_of_finalize_leaves_whole_files_and_logs_that_agree(
    config, conn, jobs, tmp_path, point
):
    spec = {MODERATE: {"big": "output/big.csv"}}
    previous = run_job(config, jobs, "big", ["big.sh", "1"], spec)
    job = jobs.add("big", "python:v1 analysis/big.sh 3", spec)
    proc, _pid = worker(config, job, tmp_path, point)
    try:
        killed = run(
            "jr-kill", "--yes", job.id, workdir=config.workdir, VOLUME_STORAGE=config.volume_storage
        )
        assert killed.returncode == 0, killed.stderr
    finally:
        proc.wait(timeout=60)
    stored = assert_logs_agree_with_the_store(config, conn, job, previous)
    assert stored.status_code is StatusCode.KILLED_BY_ADMIN
    if point == "logged":  # the worker had written "Completed successfully" for this job
        assert f"job_id: {job.id}\n" in action_log(workspaces(config)[1], "big")
    assert leftovers(config) == []
    # Whole files only: the output is the previous run's or this one's, never a part.
    for root in workspaces(config):
        assert os.path.getsize(root / "output/big.csv") in (2**20, 3 * 2**20)


@pytest.mark.parametrize("point", PAUSE_POINTS)
def test_a_worker_killed_at_any_point_of_finalize_is_finished_by_the_next(
    config, conn, jobs, tmp_path, point
):
    spec = {MODERATE: {"big": "output/big.csv"}}
    previous = run_job(config, jobs, "big", ["big.sh", "1"], spec)
    job = jobs.add("big", "python:v1 analysis/big.sh 2", spec)
    proc, pid = worker(config, job, tmp_path, point)
    os.killpg(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    done = drive_job(config, job.id)
    assert done.state is State.SUCCEEDED, done.status_message
    stored = assert_logs_agree_with_the_store(config, conn, job, previous)
    assert f"job_id: {stored.id}\n" in action_log(workspaces(config)[0], "big")
    assert leftovers(config) == []
    for root in workspaces(config):
        assert os.path.getsize(root / "output/big.csv") == 2 * 2**20


def test_jr_kill_in_the_middle_of_a_big_copy_leaves_no_partial_file(config, conn, jobs, tmp_path):
    spec = {MODERATE: {"big": "output/big.csv"}}
    job = jobs.add("big", "python:v1 analysis/big.sh 1000", spec)
    env = tool_env(config.workdir, VOLUME_STORAGE=config.volume_storage, COPY_STALL_TIMEOUT="20")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobrunner_lib.jobs.worker", job.id],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    staging = config.high_privacy_storage_base / ".jr-staging" / job.id
    try:
        wait_for(
            lambda: any(p.name.startswith(".jr-tmp-") for p in staging.rglob("*")),
            180,
            "the copy out to begin",
            interval=0.01,
        )
        os.killpg(proc.pid, signal.SIGSTOP)  # mid-copy, for sure; jr-kill's SIGKILL still ends it
        assert any(p.name.startswith(".jr-tmp-") for p in staging.rglob("*"))
        killed = run(
            "jr-kill", "--yes", job.id, workdir=config.workdir, VOLUME_STORAGE=config.volume_storage
        )
        assert killed.returncode == 0, killed.stderr
    finally:
        proc.wait(timeout=60)
    stored = db_queries.get_job(conn, job.id)
    assert stored.status_code is StatusCode.KILLED_BY_ADMIN
    assert leftovers(config) == []
    high, medium = workspaces(config)
    assert not (high / "output/big.csv").exists() and not (medium / "output/big.csv").exists()
    for root in workspaces(config):
        log = root / "metadata" / "big.log"
        # Never "Completed successfully" for a job the store says was killed.
        assert not log.exists() or "Completed successfully" not in log.read_text()


# ---- 5. names from an older store cannot forge logs or escape metadata/ ----------------------


@pytest.mark.parametrize(
    "name",
    ["tables\n2026-01-01 00:00:00.000Z run  Completed successfully id=aaaabbbbccccdddd", "../../x", "a" * 300],
)  # fmt: skip
def test_a_stored_job_with_an_unsafe_action_name_fails_clearly_and_forges_no_log_line(
    config, jobs, caplog, name
):
    from jobrunner_lib.core.logs import JrFormatter

    with caplog.at_level("INFO"):
        done = run_job(config, jobs, name, "tables.sh", {MODERATE: {"t": "output/*.csv"}})
    assert (done.state, done.status_code) == (State.FAILED, StatusCode.JOB_ERROR)
    assert done.status_message.startswith("JobError: Action names ")
    assert done.status_message.endswith("; rename the action")
    formatter = JrFormatter("run")
    lines = [line for r in caplog.records for line in formatter.format(r).splitlines()]
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert all(
        f"id={done.id}" in formatter.format(r) for r in caplog.records if getattr(r, "job", None)
    )
    assert not (config.high_privacy_storage_base / "x.log").exists()
    for root in workspaces(config):
        assert not (root / "metadata").exists()
