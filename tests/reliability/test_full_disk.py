"""A disk fills up under jr (issue 10, item 3).

The high-privacy storage, and separately the whole workdir (state store included), live on a
small tmpfs. A job whose outputs do not fit fails saying the disk is full and naming it; no
half-written file is left in the workspace; earlier outputs and the state store are unharmed
(`PRAGMA integrity_check`); the service keeps running and the next job succeeds once there is
room. With the state store itself on the full disk, `jr-run-once` fails the pass in one line and
changes nothing, and once space is freed the next passes carry on. (`jr-ls` should still answer
then: an expected failure until db.py opens the store without room for SQLite's WAL index.)
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.cli import run
from tests.support.e2e import Rig, rig_at, wait_for
from tests.support.studies import make_study

pytestmark = pytest.mark.docker

SOAK = os.environ.get("JR_SOAK") == "1"
FINAL = ("succeeded", "failed")
HIGH_FULL = "JobError: Out of disk space on the high privacy storage, please try again later"

PROJECT = """\
version: "5"
actions:
  small:
    run: python:v1 analysis/write.sh small 1
    outputs:
      moderately_sensitive:
        out: output/small.csv
  big:
    run: python:v1 analysis/write.sh big 12
    outputs:
      highly_sensitive:
        out: output/big.csv
  medium:
    run: python:v1 analysis/write.sh medium 1
    outputs:
      highly_sensitive:
        out: output/medium.csv
  later:
    run: python:v1 analysis/write.sh later 1
    outputs:
      moderately_sensitive:
        out: output/later.csv
  slow:
    run: python:v1 analysis/slow.sh slow 1
    outputs:
      moderately_sensitive:
        out: output/slow.csv
"""
SCRIPTS = {
    # write.sh NAME MB: NAME's output of MB mebibytes (written inside the job's volume, on its
    # own disk, VOLUMES_DIR, unless the test says otherwise: only the copy out reaches the small
    # one).
    "analysis/write.sh": (
        'mkdir -p output\ndd if=/dev/zero of="output/$1.csv" bs=1M count="$2" 2>/dev/null\n'
    ),
    "analysis/slow.sh": (
        "mkdir -p output\nsleep 3\n"
        'dd if=/dev/zero of="output/$1.csv" bs=1M count="$2" 2>/dev/null\n'
    ),
}


def skip_unless_root() -> None:
    """Mounting a tmpfs needs root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at path (created); unmounted afterwards whatever happens."""
    skip_unless_root()
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            # Something (a dying worker) still has a file open: detach it now, freed when closed.
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem holding directory to the last byte, as another program might."""
    filler = directory / "filler.bin"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as out:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    out.write(chunk[:size])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


def free_bytes(directory: Path) -> int:
    """Bytes free for writing on directory's filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def integrity(db_path: Path) -> str:
    """PRAGMA integrity_check of the state store ("ok" when sound)."""
    conn = sqlite3.connect(str(db_path), timeout=30)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def leftovers(root: Path) -> list[str]:
    """Temporary files jr left (named .jr-tmp-* while being written)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".jr-tmp*"))


def wait_final(rig: Rig, job_id: str, timeout: float = 90) -> dict:
    """Wait until the job is final and its worker has gone; its row."""

    def final() -> dict | None:
        job = rig.jobs([job_id])[job_id]
        return job if job["state"] in FINAL else None

    wait_for(final, timeout, f"job {job_id} to finish", interval=0.1)
    rig.wait_workers_gone(timeout=60)
    return rig.jobs([job_id])[job_id]


def one_job(rig: Rig, repo: Path, action: str) -> str:
    (job_id,) = rig.add(repo, action)
    return job_id


def stop_service(rig: Rig, proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM a looping service (which must still be alive) and return its log."""
    assert proc.poll() is None, "the service died:\n" + rig.service_log(proc)[-4000:]
    proc.send_signal(signal.SIGTERM)  # the loop only: it lets its current step finish
    assert proc.wait(timeout=60) == 0, rig.service_log(proc)[-4000:]
    return rig.service_log(proc)


def test_outputs_that_do_not_fit_in_high_privacy_storage_fail_the_job_saying_so(
    tmp_path: Path,
) -> None:
    with (
        tmpfs(tmp_path / "high", "8m") as high,
        rig_at(tmp_path, HIGH_PRIVACY_STORAGE_BASE=str(high), MAX_WORKERS="1") as rig,
    ):
        repo, _ = make_study(tmp_path / "study", PROJECT, SCRIPTS)
        workspace = high / "workspaces" / "test"
        service = rig.start_service()

        first = wait_final(rig, one_job(rig, repo, "small"))
        assert first["state"] == "succeeded", first
        before = (workspace / "output/small.csv").read_bytes()

        # 12 MiB into 8 MiB: the copy out fails part way through.
        big = wait_final(rig, one_job(rig, repo, "big"))
        assert (big["state"], big["status_code"], big["status_message"]) == (
            "failed",
            "job_error",
            HIGH_FULL,
        ), big
        assert sorted(os.listdir(workspace / "output")) == ["small.csv"]  # no partial file
        assert leftovers(high) == []
        assert (workspace / "output/small.csv").read_bytes() == before
        # The partial copy was removed, so there is room again: the next job just runs.
        assert free_bytes(high) > 6 << 20
        later = wait_final(rig, one_job(rig, repo, "later"))
        assert later["state"] == "succeeded", later

        # Something else fills the disk: even the job's log cannot be written now.
        filler = fill(high)
        full = wait_final(rig, one_job(rig, repo, "medium"))
        assert (full["state"], full["status_code"], full["status_message"]) == (
            "failed",
            "job_error",
            HIGH_FULL,
        ), full
        assert leftovers(high) == []
        assert sorted(os.listdir(workspace / "output")) == ["later.csv", "small.csv"]

        # Space freed: the same action now succeeds, with the service that saw it all.
        filler.unlink()
        again = wait_final(rig, one_job(rig, repo, "medium"))
        assert again["state"] == "succeeded", again
        assert (workspace / "output/medium.csv").stat().st_size == 1 << 20
        assert (workspace / "output/small.csv").read_bytes() == before

        log = stop_service(rig, service)
        assert "Traceback" not in log, log[-4000:]
        assert integrity(rig.db_path) == "ok"
        assert rig.containers() == [] and rig.volumes() == []


def test_with_the_state_store_on_a_full_disk_a_pass_fails_in_one_line_then_carries_on(
    tmp_path: Path,
) -> None:
    with (
        tmpfs(tmp_path / "workdir", "8m") as workdir,
        rig_at(tmp_path, MAX_WORKERS="1") as rig,
    ):
        assert rig.workdir == workdir
        repo, _ = make_study(tmp_path / "study", PROJECT, SCRIPTS)
        ids = rig.add(repo, "small", "later")
        before = rig.db_path.read_bytes()

        # Nothing holds the store open, so SQLite must allocate its index and log: it cannot.
        filler = fill(workdir)
        result = rig.tool("jr-run-once")
        assert result.returncode == 75, (result.returncode, result.stderr)
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "is its disk full?" in result.stderr, result.stderr
        assert rig.db_path.read_bytes() == before
        assert rig.worker_pids() == {}

        filler.unlink()
        assert integrity(rig.db_path) == "ok"
        assert {j["state"] for j in rig.jobs(ids).values()} == {"pending"}
        rig.until_idle(timeout=120)
        assert {j["state"] for j in rig.jobs(ids).values()} == {"succeeded"}
        assert integrity(rig.db_path) == "ok"


def test_jr_ls_answers_with_the_state_store_on_a_full_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "workdir", "2m") as workdir:
        assert run("jr-ls", workdir=workdir).returncode == 0  # creates the store
        fill(workdir)
        result = run("jr-ls", "-o", "tsv", workdir=workdir)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("id\t")


def test_a_workdir_that_fills_up_while_jobs_run_loses_nothing_and_jr_carries_on(
    tmp_path: Path,
) -> None:
    with (
        tmpfs(tmp_path / "workdir", "8m") as workdir,
        # The job volumes on a disk of their own (as Docker's storage is on many hosts).
        rig_at(tmp_path, MAX_WORKERS="1", VOLUMES_DIR=str(tmp_path / "volumes")) as rig,
    ):
        repo, _ = make_study(tmp_path / "study", PROJECT, SCRIPTS)
        workspace = rig.high / "workspaces" / "test"
        service = rig.start_service()
        first = wait_final(rig, one_job(rig, repo, "small"))
        assert first["state"] == "succeeded", first
        before = (workspace / "output/small.csv").read_bytes()

        # Outputs that do not fit on the workdir's disk: the job fails, the store is fine.
        big = wait_final(rig, one_job(rig, repo, "big"))
        assert (big["state"], big["status_message"]) == ("failed", HIGH_FULL), big
        assert leftovers(workdir) == []
        assert not (workspace / "output/big.csv").exists()
        assert integrity(rig.db_path) == "ok"

        # The disk fills up (the state store's too) while a job runs, with another queued.
        slow, queued = rig.add(repo, "slow", "later")
        wait_for(
            lambda: rig.jobs([slow])[slow]["status_code"] == "executing",
            60,
            "the slow job to run",
        )
        filler = fill(workdir)
        # Whatever the store could still record meanwhile, nothing may end up stuck or broken
        # once there is room again. SQLite may still find room in its log for some writes.
        wait_for(
            lambda: (
                rig.jobs([slow])[slow]["state"] in FINAL or slow not in rig.worker_pids().values()
            ),
            60,
            "the slow job to end, or its worker to give up",
        )
        filler.unlink()
        jobs = {job_id: wait_final(rig, job_id, timeout=120) for job_id in (slow, queued)}
        log = stop_service(rig, service)

        outcome = (jobs[slow]["state"], jobs[slow]["status_message"])
        assert outcome in (
            ("succeeded", "Completed successfully"),
            ("failed", HIGH_FULL),
            ("failed", "JobError: Out of disk space on the workdir, please try again later"),
        ), (jobs[slow], log[-4000:])
        assert jobs[queued]["state"] == "succeeded", (jobs[queued], log[-4000:])
        assert (workspace / "output/small.csv").read_bytes() == before
        assert leftovers(workdir) == []
        assert integrity(rig.db_path) == "ok"
        assert rig.containers() == [] and rig.volumes() == []
        passes_refused = log.count("is its disk full?")
        print(f"job finishing on a full disk: {outcome}; passes refused: {passes_refused}")


def test_a_job_that_fills_the_volumes_disk_fails_and_frees_it(tmp_path: Path) -> None:
    # Host-stored volumes on a small disk of their own: the job's own writes hit the limit.
    with (
        tmpfs(tmp_path / "volumes", "8m") as volumes,
        rig_at(tmp_path, MAX_WORKERS="1", VOLUMES_DIR=str(volumes), VOLUME_STORAGE="host") as rig,
    ):
        repo, _ = make_study(tmp_path / "study", PROJECT, SCRIPTS)
        service = rig.start_service()
        big = wait_final(rig, one_job(rig, repo, "big"))
        # dd stops at the full disk and exits non-zero: the job's own failure, said as such.
        assert (big["state"], big["status_message"]) == ("failed", "Job exited with error code 1")
        assert os.listdir(volumes) == []  # its volume is gone, and the disk free again
        assert free_bytes(volumes) > 6 << 20
        later = wait_final(rig, one_job(rig, repo, "later"))
        assert later["state"] == "succeeded", later
        log = stop_service(rig, service)
        assert "Traceback" not in log, log[-4000:]
        assert rig.containers() == [] and rig.volumes() == []


def test_a_job_filling_the_disk_it_shares_with_the_store_ends_and_frees_it(tmp_path: Path) -> None:
    # The default layout: volumes in the workdir, beside the state store. The job fills the
    # disk; without the reserve jr-run-once frees, nothing could record its end, and its volume
    # would hold the disk full for ever.
    with (
        tmpfs(tmp_path / "workdir", "8m") as workdir,
        rig_at(tmp_path, MAX_WORKERS="1", VOLUME_STORAGE="host") as rig,
    ):
        repo, _ = make_study(tmp_path / "study", PROJECT, SCRIPTS)
        service = rig.start_service()
        big = wait_final(rig, one_job(rig, repo, "big"), timeout=60)
        assert big["state"] == "failed", big
        assert big["status_message"] in (HIGH_FULL, "Job exited with error code 1"), big
        assert os.listdir(workdir / "volumes") == []  # its volume is gone, the disk free again
        assert free_bytes(workdir) > 4 << 20
        later = wait_final(rig, one_job(rig, repo, "later"), timeout=60)
        assert later["state"] == "succeeded", later
        log = stop_service(rig, service)
        assert "freed its reserve" in log, log[-4000:]
        assert "Traceback" not in log, log[-4000:]
        assert (workdir / "locks" / "disk-reserve").exists()  # made again once there was room
        assert integrity(rig.db_path) == "ok"
        assert leftovers(workdir) == [] and rig.containers() == [] and rig.volumes() == []


@pytest.mark.skipif(not SOAK, reason="soak test: JR_SOAK=1 (make soak)")
def test_soak_many_jobs_racing_for_a_small_high_privacy_disk(tmp_path: Path) -> None:
    """Jobs of random sizes fill a 16 MiB disk three at a time: each succeeds or says disk full.

    Nothing else may happen: no internal error, no half-written file, no stuck job, a sound
    store; and every action that failed for space succeeds when run again alone.
    """
    import random

    seed = int(os.environ.get("JR_SOAK_SEED", "0")) or random.randrange(1, 10**6)
    rng = random.Random(seed)
    sizes = [rng.choice([1, 2, 3, 5, 8]) for _ in range(15)]
    actions = "".join(
        f"  job_{n}:\n    run: python:v1 analysis/write.sh job_{n} {mb}\n"
        f"    outputs:\n      moderately_sensitive:\n        out: output/job_{n}.csv\n"
        for n, mb in enumerate(sizes)
    )
    with (
        tmpfs(tmp_path / "high", "16m") as high,
        rig_at(tmp_path, HIGH_PRIVACY_STORAGE_BASE=str(high), MAX_WORKERS="3") as rig,
    ):
        repo, _ = make_study(tmp_path / "study", f'version: "5"\nactions:\n{actions}', SCRIPTS)
        names = [f"job_{n}" for n in range(len(sizes))]
        ids = rig.add(repo, *names)
        rig.until_idle(timeout=300)
        jobs = rig.by_action(ids)
        full = [a for a, j in jobs.items() if j["state"] == "failed"]
        for action, job in jobs.items():
            assert (job["state"], job["status_message"]) in (
                ("succeeded", "Completed successfully"),
                ("failed", HIGH_FULL),
            ), (f"seed {seed}", action, job)
        assert leftovers(high) == []
        assert integrity(rig.db_path) == "ok"
        workspace = high / "workspaces" / "test"
        for name in full:
            # The workspace is shared by all the actions: clear room, then run it alone.
            for other in workspace.glob("output/*.csv"):
                other.unlink()
            (retry,) = rig.add(repo, name)
            rig.until_idle(timeout=120)
            assert rig.jobs([retry])[retry]["state"] == "succeeded", (f"seed {seed}", name)
        assert rig.containers() == [] and rig.volumes() == []
        print(f"seed {seed}: sizes {sizes}; {len(full)} failed for space, then succeeded alone")
