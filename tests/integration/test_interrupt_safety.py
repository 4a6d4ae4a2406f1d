"""Crash safety: SIGKILL the service (or a bare jr-run-once) and every job worker at random moments.

Each round submits a small workload (a chain of 3 actions plus 3 independent ones, one of which
fails on purpose) into its own workspace and, once or twice, starts the service and SIGKILLs it
with every worker of ours at a random moment: a random job reaching a random step (preparing,
executing, finalizing, done) plus jitter, or a bare jr-run-once part-way through its pass. Then
`jr-service --until-idle` finishes the round.
Then every job must be in the state a clean run gives it, with byte-identical outputs, exactly one
log directory, exactly one start of its container (from Docker's event stream), no log line showing
it active again after it finished, and nothing left behind in Docker; at the end each store passes
`PRAGMA integrity_check`.

JR_CHAOS_ROUNDS (default 20) sets the number of rounds, run in JR_CHAOS_LANES (default 4)
independent installations at once; JR_CHAOS_SEED repeats a kill schedule.
A job's worker is killed at most twice per round, so no job legitimately runs out of its three
worker attempts.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from tests.support.chaos import (
    PHASES,
    Figures,
    Outputs,
    check_jobs,
    job_objects,
    outputs,
    reached,
)
from tests.support.cli import BIN
from tests.support.e2e import Rig, StartEvents, rig_at, wait_for
from tests.support.studies import make_study

pytestmark = [pytest.mark.docker, pytest.mark.slow]

PROJECT = """\
version: "5"
actions:
  a:
    run: python:v1 analysis/chain.sh a
    outputs:
      highly_sensitive:
        out: output/a.txt
  b:
    run: python:v1 analysis/chain.sh b a
    needs: [a]
    outputs:
      moderately_sensitive:
        out: output/b.txt
  c:
    run: r:v1 analysis/chain.sh c b
    needs: [b]
    outputs:
      minimally_sensitive:
        out: output/c.txt
  x:
    run: python:v1 analysis/solo.sh x
    outputs:
      moderately_sensitive:
        out: output/x.csv
  y:
    run: r:v1 analysis/solo.sh y
    outputs:
      highly_sensitive:
        out: output/y.csv
  bad:
    run: python:v1 analysis/bad.sh
    outputs:
      moderately_sensitive:
        out: output/bad.csv
"""
SCRIPTS = {
    # Each step copies the previous step's output and appends its own line.
    "analysis/chain.sh": (
        "set -e\nmkdir -p output\n"
        'if [ -n "${2:-}" ]; then cat "output/$2.txt" > "output/$1.txt"; fi\n'
        "sleep 0.3\n"
        'echo "step $1" >> "output/$1.txt"\n'
    ),
    "analysis/solo.sh": (
        'set -e\nmkdir -p output\nsleep 0.3\necho "id,$1" > "output/$1.csv"\n'
        'i=0; while [ $i -lt 50 ]; do echo "$i,$1$i" >> "output/$1.csv"; i=$((i + 1)); done\n'
    ),
    "analysis/bad.sh": "mkdir -p output\necho 'partial' > output/bad.csv\nsleep 0.2\nexit 3\n",
}
EXPECTED = {action: ("succeeded", "succeeded") for action in ("a", "b", "c", "x", "y")}
EXPECTED["bad"] = ("failed", "nonzero_exit")


@dataclass
class RoundFigures(Figures):
    """Figures, and how many rounds ran and how long each took."""

    rounds: int = 0
    round_seconds: list[float] = field(default_factory=list)


def kill_everything(rig: Rig, proc: subprocess.Popen[bytes]) -> list[str]:
    """SIGKILL the service or pass (with its process group), then every worker of ours."""
    rig.kill_group(proc)
    return rig.kill_workers()


def reference_run(rig: Rig, repo: Path) -> tuple[Outputs, float]:
    """Run the workload once without interruption: its outputs (checked) and its duration."""
    with StartEvents(rig) as events:
        ids = rig.add(repo, "run_all", workspace="clean")
        took = rig.until_idle(timeout=150)
        rig.wait_workers_gone()
    clean = outputs(rig, "clean")
    figures = Figures()
    check_jobs(rig, ids, "clean", EXPECTED, clean, events.starts, figures)
    assert figures == Figures(), f"the clean run itself is wrong: {figures}"
    high, medium = rig.high / "workspaces" / "clean", rig.medium / "workspaces" / "clean"
    chain = b"step a\nstep b\nstep c\n"
    assert (high / "output/c.txt").read_bytes() == (medium / "output/c.txt").read_bytes() == chain
    assert (high / "output/bad.csv").read_bytes() == b"partial\n"  # a failed job's outputs kept
    assert "output/a.txt" not in clean["medium"] and "output/y.csv" not in clean["medium"]
    return clean, took


def chaos_lane(
    rig: Rig,
    repo: Path,
    rounds: list[int],
    rng: random.Random,
    clean: Future[tuple[Outputs, float]],
    figures: RoundFigures,
    notes: list[str],
) -> None:
    """Run these rounds one after another in this rig: submit, kill once or twice, finish, check."""
    with StartEvents(rig) as events:
        for n in rounds:
            workspace = f"chaos{n:02d}"
            started = time.monotonic()
            ids = rig.add(repo, "run_all", workspace=workspace)
            figures.jobs += len(ids)
            for _ in range(rng.choice((1, 1, 1, 2))):
                if rng.random() < 0.2:
                    # A bare pass killed part-way: before, during or after its claims and spawns.
                    proc = subprocess.Popen(
                        [sys.executable, str(BIN / "jr-run-once")],
                        env=rig.env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                    delay = rng.uniform(0.1, 0.8)
                    what = f"jr-run-once killed after {delay:.2f}s"
                    time.sleep(delay)  # the random moment of the kill
                else:
                    # The service killed at a random point of a random job's life (so the kills
                    # spread over every step however fast or loaded the machine is), plus jitter.
                    action, phase = rng.choice(list(EXPECTED)), rng.choice(PHASES)
                    delay = rng.uniform(0.0, 0.3)
                    what = f"jr-service killed {delay:.2f}s after {action} reached {phase}"
                    proc = rig.start_service()
                    wait_for(
                        partial(reached, rig, ids, action, phase),
                        150,
                        f"{workspace}: {action} to reach {phase}",
                        interval=0.01,
                    )
                    time.sleep(delay)
                hit = kill_everything(rig, proc)
                figures.kills += 1
                figures.workers_killed += len(hit)
                states = sorted(f"{j['action']}:{j['status_code']}" for j in rig.jobs(ids).values())
                notes.append(f"{workspace}: {what}: workers {len(hit)}; {' '.join(states)}")
            rig.until_idle(timeout=150)
            rig.wait_workers_gone()
            figures.rounds += 1
            figures.round_seconds.append(time.monotonic() - started)
            check_jobs(rig, ids, workspace, EXPECTED, clean.result()[0], events.starts, figures)


ROUNDS = int(os.environ.get("JR_CHAOS_ROUNDS", "20"))


# About 2.5 minutes on a quiet 2-CPU machine; the limit leaves room for a busy one.
@pytest.mark.timeout(120 + 30 * ROUNDS)
def test_random_sigkills_of_service_passes_and_workers_lose_and_duplicate_nothing(tmp_path):
    rounds = ROUNDS
    lanes = max(1, min(rounds, int(os.environ.get("JR_CHAOS_LANES", "4"))))
    seed = int(os.environ.get("JR_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nchaos seed {seed} (JR_CHAOS_SEED={seed} repeats this kill schedule), {lanes} lanes")
    repo, _ = make_study(tmp_path / "study", PROJECT, SCRIPTS)
    began = time.monotonic()

    with ExitStack() as stack:
        # Lanes: independent installations (workdir, label, service) killed independently, so
        # rounds overlap in time without a kill in one reaching the jobs of another.
        rigs = []
        for lane in range(lanes + 1):
            (tmp_path / f"lane{lane}").mkdir()
            env = {"MAX_WORKERS": "6", "POLL_INTERVAL": "0.2"}
            rigs.append(stack.enter_context(rig_at(tmp_path / f"lane{lane}", **env)))
        reference_rig = rigs.pop()

        per_lane = [RoundFigures() for _ in range(lanes)]
        notes: list[list[str]] = [[] for _ in range(lanes)]
        with ThreadPoolExecutor(lanes + 1) as pool:
            # The reference, run alongside: the same workload without interruption.
            clean = pool.submit(reference_run, reference_rig, repo)
            futures = [
                pool.submit(
                    chaos_lane,
                    rigs[lane],
                    repo,
                    list(range(lane, rounds, lanes)),
                    random.Random(f"{seed}/{lane}"),
                    clean,
                    per_lane[lane],
                    notes[lane],
                )
                for lane in range(lanes)
            ]
            for future in [clean, *futures]:
                future.result()

        figures = RoundFigures()
        for f in per_lane:
            figures.add(f)
        integrity = [rig.query("PRAGMA integrity_check")[0][0] for rig in [*rigs, reference_rig]]
        clean_took = clean.result()[1]
        took = time.monotonic() - began
        times = sorted(figures.round_seconds)
        print(
            f"clean run {clean_took:.1f}s; chaos rounds {figures.rounds}, {figures.line()}; rounds took "
            f"{times[0]:.1f}-{times[-1]:.1f}s (median {times[len(times) // 2]:.1f}s); "
            f"total {took:.0f}s"
        )
        detail = "\n".join(figures.problems() + ["kill log:", *(n for lane in notes for n in lane)])
        assert set(integrity) == {"ok"}, integrity
        assert not figures.lost, detail
        assert not figures.duplicated, detail
        assert not figures.leftovers, detail
        assert figures.rounds == rounds and figures.kills >= rounds


def test_a_worker_killed_during_its_cleanup_leaves_no_docker_objects_once_passes_run_again(
    tmp_path,
):
    repo, _ = make_study(tmp_path / "study", PROJECT, SCRIPTS)
    with rig_at(tmp_path) as rig:
        # The worker saves the final state, then removes container, helper and volume: kill it
        # the moment the final state shows, i.e. inside that cleanup.
        for attempt in range(5):
            (jid,) = rig.add(repo, "x", workspace=f"cleanup{attempt}")
            assert rig.tool("jr-run-once").returncode == 0
            wait_for(
                lambda jid=jid: rig.jobs([jid])[jid]["state"] == "succeeded",
                120,
                "the job to succeed",
                interval=0.002,
            )
            hit = rig.kill_workers()
            left = job_objects(rig, [jid])
            if jid in hit and left:
                break
            rig.wait_workers_gone()
        else:
            pytest.skip("never caught a worker inside its cleanup")
        print(f"\nworker killed during cleanup; left behind: {', '.join(left)}")

        rig.until_idle(timeout=60)
        for _ in range(2):
            assert rig.tool("jr-run-once").returncode == 0
        rig.wait_workers_gone()
        assert rig.jobs([jid])[jid]["state"] == "succeeded"
        assert job_objects(rig, [jid]) == [], "a finished job's Docker objects are never removed"


# A pass saves the pid of a worker it started only after starting it. This one dies in between,
# as if SIGKILLed there (a service or a worker's pass can be).
PASS_KILLED_AFTER_SPAWN = """\
import os
from jobrunner_lib.store import db
from jobrunner_lib.jobs import processes
from jobrunner_lib.jobs import run
from jobrunner_lib.core.config import load_config

def spawn(config, job_id):
    processes.spawn_worker(config, job_id)
    os._exit(9)

config = load_config()
run.run_pass(config, db.connect(config.db_path), spawn=spawn)
"""


def test_a_pass_killed_between_starting_a_worker_and_recording_it_loses_no_job(tmp_path):
    project = "version: '5'\nactions:\n  slow:\n    run: python:v1 analysis/slow.sh\n"
    project += "    outputs:\n      moderately_sensitive:\n        out: output/slow.csv\n"
    script = "mkdir -p output\nsleep 8\necho done > output/slow.csv\n"
    repo, _ = make_study(tmp_path / "study", project, {"analysis/slow.sh": script})
    with rig_at(tmp_path) as rig:
        (jid,) = rig.add(repo, "slow", workspace="orphan")
        cut = subprocess.run(
            [sys.executable, "-c", PASS_KILLED_AFTER_SPAWN], env=rig.env, timeout=60
        )
        assert cut.returncode == 9
        assert rig.jobs([jid])[jid]["worker_pid"] is None  # started, not recorded
        rig.until_idle(timeout=120)
        rig.wait_workers_gone()
        job = rig.jobs([jid])[jid]
        assert (job["state"], job["status_code"]) == ("succeeded", "succeeded"), job
        assert job_objects(rig, [jid]) == []
