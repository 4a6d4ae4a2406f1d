"""The Docker daemon stops in the middle of jobs, then comes back (issue 10, item 2).

Each test runs its own dockerd (tests/support/dockerd.py: own socket, data root and containerd,
no network) so the machine's daemon is never stopped. jr is pointed at it with DOCKER_HOST and
driven through the real tools and service. While the daemon is down `jr-run-once` exits 75 with
one line and `jr-ls` works; once it is back every job reaches a final state: a job whose container
the stopping daemon killed fails saying so, a job whose container survived (live-restore) resumes,
and a worker that exited because Docker was gone does not use up one of the job's attempts.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.dockerd import PrivateDockerd, private_dockerd
from tests.support.e2e import TEST_LABEL_KEY, Rig, rig_at, wait_for
from tests.support.studies import make_study

pytestmark = pytest.mark.docker

SOAK = os.environ.get("JR_SOAK") == "1"
RESTARTED = "JobError: the Docker daemon restarted while the job was running; please try again"
FINAL = ("succeeded", "failed")

PROJECT = """\
version: "5"
actions:
  slow_a:
    run: python:v1 analysis/slow.sh a
    outputs:
      moderately_sensitive:
        out: output/a.txt
  slow_b:
    run: python:v1 analysis/slow.sh b
    outputs:
      moderately_sensitive:
        out: output/b.txt
  later:
    run: python:v1 analysis/quick.sh later
    outputs:
      moderately_sensitive:
        out: output/later.txt
"""
SCRIPTS = {
    # Long enough to be stopped mid-run, short enough for a live-restored run to finish soon.
    "analysis/slow.sh": 'mkdir -p output\nsleep 6\necho "$1" > "output/$1.txt"\n',
    "analysis/quick.sh": 'mkdir -p output\necho "$1" > "output/$1.txt"\n',
}


@contextmanager
def backend(tmp_path: Path, *, live_restore: bool = False) -> Iterator[tuple[PrivateDockerd, Rig]]:
    """A private dockerd and a jr installation pointed at it; both removed afterwards."""
    with private_dockerd(live_restore=live_restore) as daemon:
        # Two workers: a third job waits for capacity, so it starts only after the outage.
        with rig_at(tmp_path, DOCKER_HOST=daemon.host, MAX_WORKERS="2") as rig:
            yield daemon, rig


def wait_all_final(rig: Rig, ids: list[str], timeout: float) -> dict[str, dict]:
    """Wait until every job is final and its worker has cleaned up and gone; the rows by action."""
    wait_for(
        lambda: all(j["state"] in FINAL for j in rig.jobs(ids).values()),
        timeout,
        "every job to be final",
        interval=0.2,
        explain=lambda: str(
            [(j["action"], j["state"], j["status_message"]) for j in rig.jobs(ids).values()]
        ),
    )
    rig.wait_workers_gone(timeout=60)
    return rig.by_action(ids)


def wait_executing(rig: Rig, ids: list[str], actions: set[str], timeout: float = 60) -> None:
    """Wait until these actions' containers run (their jobs say `executing`)."""
    wait_for(
        lambda: all(
            j["status_code"] == "executing" for a, j in rig.by_action(ids).items() if a in actions
        ),
        timeout,
        f"{sorted(actions)} to be executing",
        interval=0.1,
    )


def our_objects(daemon: PrivateDockerd, rig: Rig) -> tuple[list[str], list[str]]:
    """Names of this rig's containers and volumes on the private daemon."""
    filters = {"label": [f"{TEST_LABEL_KEY}={rig.label}"]}
    api = daemon.client().api
    containers = [c["Names"][0] for c in api.containers(all=True, filters=filters)]
    volumes = [v["Name"] for v in api.volumes(filters=filters).get("Volumes") or []]
    volumes += [p.name for p in sorted(rig.volumes_dir.glob("os-volume-*"))]  # host storage
    return containers, volumes


def assert_tools_while_down(rig: Rig, daemon: PrivateDockerd) -> None:
    """jr-run-once exits 75 with one line naming Docker; jr-ls still lists the jobs."""
    for _ in range(50):
        result = rig.tool("jr-run-once", timeout=60)
        # The service's own pass may hold the run lock for a moment: that is also exit 75.
        if "another jr-run-once" not in result.stderr:
            break
        time.sleep(0.1)
    assert result.returncode == 75, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"jr-run-once: Docker is not reachable ({daemon.host}: "), (
        result.stderr
    )
    listing = rig.tool("jr-ls", "--state", "running,pending", "-o", "tsv", timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert "slow_a" in listing.stdout and "slow_b" in listing.stdout


def stop_service(proc: subprocess.Popen[bytes], rig: Rig) -> str:
    """SIGTERM a looping service; it must exit 0. Its log."""
    assert proc.poll() is None, "the service died:\n" + rig.service_log(proc)[-4000:]
    proc.send_signal(signal.SIGTERM)  # the loop only: it lets its current step finish
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        # Say what the step it waits for is doing (the log and the workers' log), then stop it.
        workers = (rig.workdir / "logs" / "workers.log").read_text(errors="replace")[-3000:]
        rig.kill_group(proc)
        pytest.fail(
            f"the service did not stop in 60s after SIGTERM:\n{rig.service_log(proc)[-3000:]}"
            f"\n--- workers.log:\n{workers}"
        )
    assert code == 0, rig.service_log(proc)[-4000:]
    return rig.service_log(proc)


def test_jobs_whose_containers_the_stopping_daemon_killed_fail_saying_so_and_the_rest_run(
    tmp_path: Path,
) -> None:
    with backend(tmp_path) as (daemon, rig):
        repo, _ = make_study(tmp_path / "study", PROJECT, SCRIPTS)
        ids = rig.add(repo, "slow_a", "slow_b")
        service = rig.start_service()
        wait_executing(rig, ids, {"slow_a", "slow_b"})
        # Added now, so it is the one that waits for a worker slot through the outage.
        ids += rig.add(repo, "later")
        wait_for(
            lambda: rig.by_action(ids)["later"]["status_code"] == "waiting_on_workers",
            30,
            "the third job to wait for a worker",
        )

        took = daemon.stop()
        assert not daemon.running
        # The workers notice at once and leave their jobs as they are for the next worker.
        rig.wait_workers_gone(timeout=60)
        down = rig.by_action(ids)
        assert {a: j["state"] for a, j in down.items()} == {
            "slow_a": "running",
            "slow_b": "running",
            "later": "pending",
        }
        assert_tools_while_down(rig, daemon)

        daemon.start()
        jobs = wait_all_final(rig, ids, timeout=120)
        log = stop_service(service, rig)

        for action in ("slow_a", "slow_b"):
            job = jobs[action]
            assert (job["state"], job["status_code"], job["status_message"]) == (
                "failed",
                "job_error",
                RESTARTED,
            ), (job, log[-4000:])
            # The worker that exited because Docker was down was not counted as a failed attempt.
            assert job["attempts"] == 1, job
        assert jobs["later"]["state"] == "succeeded", jobs["later"]
        assert (rig.high / "workspaces/test/output/later.txt").read_text() == "later\n"
        # Nothing half-done was copied out of the killed jobs.
        assert not (rig.high / "workspaces/test/output/a.txt").exists()
        assert our_objects(daemon, rig) == ([], [])
        assert "Traceback" not in log, log[-4000:]
        print(f"daemon stop took {took:.1f}s")


def test_with_live_restore_a_running_job_resumes_and_succeeds(tmp_path: Path) -> None:
    with backend(tmp_path, live_restore=True) as (daemon, rig):
        repo, _ = make_study(tmp_path / "study", PROJECT, SCRIPTS)
        ids = rig.add(repo, "slow_a")
        service = rig.start_service()
        wait_executing(rig, ids, {"slow_a"})

        daemon.stop()
        rig.wait_workers_gone(timeout=60)
        assert rig.by_action(ids)["slow_a"]["state"] == "running"
        daemon.start()

        job = wait_all_final(rig, ids, timeout=90)["slow_a"]
        log = stop_service(service, rig)
        assert (job["state"], job["status_code"]) == ("succeeded", "succeeded"), (job, log[-4000:])
        assert job["attempts"] == 1, job
        assert (rig.high / "workspaces/test/output/a.txt").read_text() == "a\n"
        assert our_objects(daemon, rig) == ([], [])


@pytest.mark.skipif(not SOAK, reason="soak test: JR_SOAK=1 (make soak)")
def test_soak_repeated_outages_at_random_moments_never_strand_a_job(tmp_path: Path) -> None:
    """Many jobs; the daemon is stopped and started at random moments while jobs run.

    Outages land in every phase (preparing, running, copying outputs out); every job still ends
    either succeeded or failed with the daemon-restart message, never stuck or internal error.
    """
    count = 16
    actions = "".join(
        f"  job_{n}:\n    run: python:v1 analysis/work.sh {n}\n"
        f"    outputs:\n      moderately_sensitive:\n        out: output/{n}.txt\n"
        for n in range(count)
    )
    scripts = {
        "analysis/work.sh": (
            'mkdir -p output\nsleep "$(( 1 + $1 % 3 ))"\n'
            'dd if=/dev/zero of="output/$1.txt" bs=1M count=$(( 50 + 50 * ($1 % 3) )) 2>/dev/null\n'
        )
    }
    seed = int(os.environ.get("JR_SOAK_SEED", "0")) or random.randrange(1, 10**6)
    rng = random.Random(seed)
    with backend(tmp_path) as (daemon, rig):
        repo, _ = make_study(tmp_path / "study", f'version: "5"\nactions:\n{actions}', scripts)
        ids = rig.add(repo, *(f"job_{n}" for n in range(count)))
        service = rig.start_service()
        outages, phases = 0, []
        while outages < 8:
            # Aim each outage at a phase: copying in, running, or copying out.
            phase = rng.choice(["preparing", "executing", "finalizing"])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                jobs = rig.jobs(ids).values()
                if all(j["state"] in FINAL for j in jobs) or any(
                    j["status_code"] == phase for j in jobs
                ):
                    break
                time.sleep(0.02)
            if all(j["state"] in FINAL for j in rig.jobs(ids).values()):
                break
            time.sleep(rng.uniform(0.0, 0.3))
            daemon.stop()
            outages += 1
            phases.append(phase)
            time.sleep(rng.uniform(0.0, 2.0))
            daemon.start()
        jobs = wait_all_final(rig, ids, timeout=300)
        log = stop_service(service, rig)
        outcomes: dict[str, int] = {}
        for job in jobs.values():
            outcome = (job["state"], job["status_message"])
            assert outcome in (("succeeded", "Completed successfully"), ("failed", RESTARTED)), (
                f"seed {seed}",
                job,
                log[-4000:],
            )
            outcomes[outcome[1]] = outcomes.get(outcome[1], 0) + 1
        assert our_objects(daemon, rig) == ([], [])
        print(f"seed {seed}: outages aimed at {phases}; outcomes {outcomes}")
