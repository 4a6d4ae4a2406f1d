"""Crash chaos (issue 10, item 1): SIGKILL the whole service at random moments of a 50-job workload.

The workload (one project.yaml of 50 actions): a chain of 10, a fan-out (one root, 30 actions
needing it, one combining them all), 5 independent actions, one that fails on purpose, and one
writing a 1 GiB highly sensitive file with one more reading it back for a small digest. It runs
once undisturbed in its own installation (the reference) while, in another, the service is
started and its whole process group SIGKILLed at random moments, again and again: just after it
starts (its pass claiming jobs and starting workers), a random time later, or when a random job
reaches a random step (preparing or copying in, executing, finalizing or copying out, done and
cleaning up), plus jitter. In about one kill in three every job worker is SIGKILLed too, as a
power cut would (they run in their own sessions, so killing the service alone leaves them
running), but never one job's workers more than twice: after three dead workers the runner gives
up on a job, rightly. Whenever the latest workload is down to its last two jobs (and the kills
are not done) it is submitted again in a new workspace, so that the kills keep finding every step
under way. Then `jr-service --until-idle` finishes everything. A workspace's outputs are hashed
as soon as all its jobs have ended, and its 1 GiB file deleted, to keep the disk use at a few GB.

Every job must end as in the reference, with the same output bytes, one log directory, one start
of its container, no log line showing it active after it finished, and no container or volume
left; the store must pass `PRAGMA integrity_check`. The figures line is printed even under -q.

JR_CRASH_KILLS (default 10; `make soak` 50) sets the number of kills; JR_CRASH_SEED repeats a
kill schedule.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.chaos import (
    PHASES,
    Figures,
    Outputs,
    check_jobs,
    outputs,
    reached,
)
from tests.support.e2e import Rig, StartEvents, rig_at
from tests.support.studies import make_study

pytestmark = [pytest.mark.docker, pytest.mark.slow]

KILLS = int(os.environ.get("JR_CRASH_KILLS", "10"))
LEVELS = ("highly_sensitive", "moderately_sensitive", "minimally_sensitive")
CHAIN = [f"c{n:02d}" for n in range(1, 11)]
FAN = [f"f{n:02d}" for n in range(1, 31)]
SOLO = [f"s{n}" for n in range(1, 6)]
BIG_SIZE = 1 << 30
# The runner gives up on a job after its third dead worker (run.MAX_ATTEMPTS): a legitimate end.
WORKER_KILLS_PER_JOB = 2


def action(name: str, run: str, level: str, path: str, needs: list[str] | None = None) -> str:
    """One action of project.yaml."""
    text = f"  {name}:\n    run: {run}\n"
    if needs:
        text += f"    needs: [{', '.join(needs)}]\n"
    return text + f"    outputs:\n      {level}:\n        out: {path}\n"


def project() -> str:
    """project.yaml: the 50 actions."""
    actions = []
    for n, name in enumerate(CHAIN):
        image = ("python:v1", "r:v1")[n % 2]
        prev = CHAIN[n - 1] if n else ""
        actions.append(
            action(
                name,
                f"{image} analysis/chain.sh {name} {prev}".rstrip(),
                LEVELS[n % 3],
                f"output/{name}.txt",
                [prev] if prev else None,
            )
        )
    actions.append(action("fan", "python:v1 analysis/fan.sh", LEVELS[0], "output/fan.txt"))
    for n, name in enumerate(FAN):
        image = ("r:v1", "python:v1")[n % 2]
        run = f"{image} analysis/leaf.sh {name}"
        actions.append(action(name, run, LEVELS[(n + 1) % 3], f"output/{name}.csv", ["fan"]))
    actions.append(
        action("combine", "python:v1 analysis/combine.sh", LEVELS[1], "output/all.csv", FAN)
    )
    for n, name in enumerate(SOLO):
        run = f"{('python:v1', 'r:v1')[n % 2]} analysis/solo.sh {name}"
        actions.append(action(name, run, LEVELS[(n + 2) % 3], f"output/{name}.csv"))
    actions.append(action("bad", "python:v1 analysis/bad.sh", LEVELS[1], "output/bad.csv"))
    actions.append(action("big", "python:v1 analysis/big.sh", LEVELS[0], "output/big.bin"))
    actions.append(
        action("digest", "r:v1 analysis/digest.sh", LEVELS[1], "output/big_digest.txt", ["big"])
    )
    return 'version: "5"\nactions:\n' + "".join(actions)


SCRIPTS = {
    # Each step copies the previous step's output and appends its own line.
    "analysis/chain.sh": (
        "set -e\nmkdir -p output\n"
        'if [ -n "${2:-}" ]; then cat "output/$2.txt" > "output/$1.txt"; fi\n'
        'echo "step $1" >> "output/$1.txt"\n'
    ),
    "analysis/fan.sh": "set -e\nmkdir -p output\nseq 1 500 > output/fan.txt\n",
    "analysis/leaf.sh": 'set -e\nmkdir -p output\nsed "s/^/$1,/" output/fan.txt > "output/$1.csv"\n',
    "analysis/combine.sh": "set -e\nmkdir -p output\ncat output/f*.csv > output/all.csv\n",
    "analysis/solo.sh": (
        'set -e\nmkdir -p output\necho "id,$1" > "output/$1.csv"\n'
        'i=0; while [ $i -lt 50 ]; do echo "$i,$1$i" >> "output/$1.csv"; i=$((i + 1)); done\n'
    ),
    "analysis/bad.sh": "mkdir -p output\necho 'partial' > output/bad.csv\nexit 3\n",
    # 1 GiB in 1 MiB blocks, each a numbered header and the same 1 MiB of digits: not constant,
    # so a misplaced or repeated block changes the bytes.
    "analysis/big.sh": (
        "set -e\nmkdir -p output\n"
        "seq 1 200000 | head -c 1048567 > big.block\n"
        "i=0; while [ $i -lt 1024 ]; do printf '%08d\\n' $i; cat big.block; i=$((i + 1)); done"
        " > output/big.bin\n"
        "rm big.block\n"
    ),
    "analysis/digest.sh": (
        "set -e\nmkdir -p output\nsha256sum output/big.bin > output/big_digest.txt\n"
        "stat -c %s output/big.bin >> output/big_digest.txt\n"
    ),
}
EXPECTED = {name: ("succeeded", "succeeded") for name in [*CHAIN, "fan", *FAN, "combine"]}
EXPECTED.update({name: ("succeeded", "succeeded") for name in [*SOLO, "big", "digest"]})
EXPECTED["bad"] = ("failed", "nonzero_exit")
RIG_ENV = {"MAX_WORKERS": "6", "POLL_INTERVAL": "0.2"}


def reference_run(rig: Rig, repo: Path) -> tuple[Outputs, float]:
    """The workload once without interruption: its outputs (checked) and its duration."""
    with StartEvents(rig) as events:
        ids = rig.add(repo, "run_all", workspace="clean")
        took = rig.until_idle(timeout=600)
        rig.wait_workers_gone()
    assert len(ids) == len(EXPECTED) == 50
    clean = outputs(rig, "clean")
    figures = Figures()
    check_jobs(rig, ids, "clean", EXPECTED, clean, events.starts, figures)
    assert not figures.problems(), f"the clean run itself is wrong: {figures.problems()}"
    high, medium = rig.high / "workspaces" / "clean", rig.medium / "workspaces" / "clean"
    chain = "".join(f"step {name}\n" for name in CHAIN).encode()
    assert (high / "output/c10.txt").read_bytes() == chain
    assert (medium / "output/all.csv").stat().st_size > 30 * 500 * 6
    # The 1 GiB file was copied out whole, and copied in whole to the job that read it back.
    assert (high / "output/big.bin").stat().st_size == BIG_SIZE
    digest = (medium / "output/big_digest.txt").read_text().split()
    assert digest == [clean["high"]["output/big.bin"], "output/big.bin", str(BIG_SIZE)]
    assert "output/big.bin" not in clean["medium"]
    (high / "output/big.bin").unlink()  # its hash is all the comparison needs
    return clean, took


class Chaos:
    """Starts and SIGKILLs one rig's service (and at times its workers) on a random schedule."""

    def __init__(self, rig: Rig, repo: Path, rng: random.Random):
        self.rig, self.repo, self.rng = rig, repo, rng
        self.figures = Figures()
        self.workspaces: dict[str, list[str]] = {}
        # The outputs of each workspace whose jobs have all ended, hashed as soon as they had.
        self.outputs: dict[str, Outputs] = {}
        self.worker_kills: Counter[str] = Counter()
        self.notes: list[str] = []

    def submit(self) -> None:
        """The workload again, in a new workspace."""
        workspace = f"chaos{len(self.workspaces) + 1:02d}"
        self.workspaces[workspace] = ids = self.rig.add(self.repo, "run_all", workspace=workspace)
        self.figures.jobs += len(ids)

    def active(self) -> dict[str, list[dict[str, str]]]:
        """workspace -> its jobs not yet ended, for every workspace with some."""
        found: dict[str, list[dict[str, str]]] = {}
        for workspace, ids in self.workspaces.items():
            if workspace not in self.outputs:
                jobs = self.rig.jobs(ids).values()
                found[workspace] = [j for j in jobs if j["state"] in ("pending", "running")]
        return found

    def settle(self) -> None:
        """Hash the outputs of each workspace that has just ended, then free its 1 GiB file."""
        for workspace, left in self.active().items():
            if not left:
                self.outputs[workspace] = outputs(self.rig, workspace)
                (self.rig.high / "workspaces" / workspace / "output/big.bin").unlink(
                    missing_ok=True
                )

    def run(self, kills: int) -> None:
        """Kill the service `kills` times, then let it finish every job."""
        self.submit()
        while self.figures.kills < kills:
            self.settle()
            active = self.active()
            # The next workload starts while the last one's slowest jobs (the 1 GiB digest) end.
            if len(active.get(list(self.workspaces)[-1], [])) <= 2:
                self.submit()
                active = self.active()
            moment, what = self.moment(active)
            proc = self.rig.start_service()
            started = time.monotonic()
            moment()
            self.rig.kill_group(proc)
            after = time.monotonic() - started
            hit: list[str] = []
            if self.rng.random() < 1 / 3:
                hit = self.rig.kill_workers(self.worker_kills, at_most=WORKER_KILLS_PER_JOB)
                what += f"; workers killed too: {' '.join(sorted(hit)) or 'none'}"
            self.figures.kills += 1
            self.figures.workers_killed += len(hit)
            states = Counter(j["status_code"] for jobs in self.active().values() for j in jobs)
            at = time.strftime("%H:%M:%S", time.gmtime())
            self.notes.append(
                f"{at}Z kill {self.figures.kills} after {after:.2f}s ({what}); still active: "
                f"{', '.join(f'{n} {code}' for code, n in sorted(states.items())) or 'none'}"
            )
        self.rig.until_idle(timeout=900)
        self.rig.wait_workers_gone(timeout=120)
        self.settle()

    def moment(self, active: dict[str, list[dict[str, str]]]) -> tuple[Callable[[], None], str]:
        """A random moment to kill at (a function that returns then), and its description."""
        rng = self.rng
        pick = rng.random()
        if pick < 0.2:
            # Right after the start: the service's first pass claiming jobs and starting workers.
            delay = rng.uniform(0.0, 1.2)
            return lambda: time.sleep(delay), f"{delay:.2f}s after the start"
        if pick < 0.45:
            delay = rng.uniform(1.0, 6.0)
            return lambda: time.sleep(delay), f"{delay:.2f}s after the start"
        # A random job that can move on now reaching a random step it has not reached yet,
        # weighted towards the 1 GiB copies (out of `big`, into `digest`), which take long
        # enough to be caught part-way.
        jobs = [(w, j) for w, left in active.items() for j in left]
        movers = [(w, j) for w, j in jobs if j["status_code"] != "waiting_on_dependencies"]
        heavy = [(w, j) for w, j in movers if j["action"] in ("big", "digest")]
        workspace, job = rng.choice(heavy if heavy and rng.random() < 0.3 else movers or jobs)
        ids, name = self.workspaces[workspace], job["action"]
        ahead = [p for p in PHASES if not reached(self.rig, ids, name, p)] or ["done"]
        phase = rng.choice(ahead)
        slow = (name, phase) in (
            ("big", "executing"),
            ("big", "finalizing"),
            ("digest", "preparing"),
        )
        jitter = rng.uniform(0.0, 4.0 if slow else 0.3)

        def moment() -> None:
            deadline = time.monotonic() + 10
            while not reached(self.rig, ids, name, phase) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(jitter)

        return moment, f"{jitter:.2f}s after {workspace}/{name} reached {phase} (or 10s)"


# 1-1.5 minutes with 10 kills on a busy 2-CPU machine (4 with 50); the limit leaves room.
@pytest.mark.timeout(600 + 30 * KILLS)
def test_sigkilled_service_and_workers_lose_and_duplicate_no_job(tmp_path, capsys):
    seed = int(os.environ.get("JR_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    repo, _ = make_study(tmp_path / "study", project(), SCRIPTS)
    began = time.monotonic()
    with ExitStack() as stack:
        rigs = []
        for name in ("reference", "chaos"):
            (tmp_path / name).mkdir()
            rigs.append(stack.enter_context(rig_at(tmp_path / name, **RIG_ENV)))
        reference_rig, rig = rigs
        chaos = Chaos(rig, repo, random.Random(seed))
        with StartEvents(rig) as events, ThreadPoolExecutor(1) as pool:
            # The reference runs alongside the chaos, in its own installation.
            reference = pool.submit(reference_run, reference_rig, repo)
            chaos.run(KILLS)
            clean, clean_took = reference.result()
        figures = chaos.figures
        for workspace, ids in chaos.workspaces.items():
            got = chaos.outputs[workspace]
            check_jobs(rig, ids, workspace, EXPECTED, clean, events.starts, figures, got)
        integrity = [r.query("PRAGMA integrity_check")[0][0] for r in rigs]
        line = (
            f"crash chaos: {figures.line()}, seed {seed} (JR_CRASH_SEED repeats it); "
            f"{time.monotonic() - began:.0f}s (the reference run {clean_took:.0f}s)"
        )
        with capsys.disabled():
            print(f"\n{line}")
        detail = "\n".join([line, *figures.problems(), "kill log:", *chaos.notes])
        (tmp_path / "crash-chaos.txt").write_text(detail + "\n")  # kept by pytest for a look
        assert integrity == ["ok", "ok"], integrity
        assert not figures.lost, detail
        assert not figures.duplicated, detail
        assert not figures.leftovers, detail
        assert figures.kills == KILLS
