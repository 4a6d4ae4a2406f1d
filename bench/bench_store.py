"""The tools against a big state store: tick cost, peak memory, jr-ls and tab completion.

  tick  `bin/jr-run-once` with 100 000 finished and 50 running jobs (the running ones have a live
        worker: a `sleep` process this bench starts, with its real start time, and a fresh
        heartbeat, so the pass only supervises). Floor: `python -c pass` (interpreter start-up);
        target: under 200 ms beyond it.
  mem   peak RSS of `bin/jr-run-once` and `bin/jr-sync` (against the fake jobs website, listing
        the running jobs' request) on the same store (ru_maxrss of a child that runs only the
        tool). Floor: the RSS of `python -c pass`; target: under 100 MB.
  ls    `bin/jr-ls` with 10 000 jobs and one tab completion of a 3-character fragment (the store
        of bench_ls.py). Targets: 300 ms and 150 ms. Floors: `python -c pass`, `bash -c true`.

Usage: .venv/bin/python bench/bench_store.py [--quick] [--only tick,mem,ls]
(--quick: 10 000 finished jobs and 1 000 for jr-ls, 3 runs each.)
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import bench_ls
import bench_run_pass
from benchlib import ROOT, report, run_cmd, timed

from jobrunner_lib.jobs.processes import process_info
from tests.support.cli import tool_env

PY = sys.executable
RUNNING = 50
# Runs the tool as its only child and prints that child's peak RSS in KiB (Linux: ru_maxrss).
RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def paired(
    tool: Callable[[], object], floor: Callable[[], object], runs: int
) -> tuple[list[float], list[float]]:
    """Time tool and floor alternately, so both see the same machine (others' load comes and goes)."""
    tools, floors = [], []
    for _ in range(runs):
        floors += timed(floor, 1)
        tools += timed(tool, 1)
    return tools, floors


def build_store(workdir: Path, finished: int, worker_pid: int, worker_started: float) -> str:
    """bench_run_pass's store (realistic finished rows, 50 running jobs of request "rlive"), with
    the running jobs' worker made live and every finished job already posted to the website."""
    workdir.mkdir(parents=True, exist_ok=True)
    bench_run_pass.build(workdir / "db.sqlite", finished, RUNNING, time.time())
    conn = sqlite3.connect(workdir / "db.sqlite")
    with conn:
        conn.execute(
            "UPDATE job SET worker_pid = ?, worker_started_at = ? WHERE state = 'running'",
            (worker_pid, worker_started),
        )
        conn.execute(
            "INSERT INTO job_post SELECT id, updated_at, state FROM job WHERE state IN ('failed', 'succeeded')"
        )
    conn.close()
    return "rlive"


def fresh_heartbeats(workdir: Path) -> None:
    """Heartbeats of now, so no running job looks stalled however long the bench takes."""
    conn = sqlite3.connect(workdir / "db.sqlite")
    with conn:
        conn.execute("UPDATE job SET heartbeat_at = ? WHERE state = 'running'", (time.time(),))
    conn.close()


def run_once(env: dict[str, str]) -> None:
    """One jr-run-once that must change nothing (else the store is not what we meant to time)."""
    out = subprocess.run(
        [PY, str(ROOT / "bin" / "jr-run-once"), "-o", "ids"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0 or out.stdout.strip():
        raise SystemExit(
            f"bench: jr-run-once changed jobs or failed (exit {out.returncode}):\n{out.stdout[:500]}{out.stderr[-2000:]}"
        )


def peak_rss_mb(argv: Sequence[str], env: dict[str, str] | None = None) -> float:
    out = subprocess.run(
        [PY, "-c", RSS_WRAPPER, *argv], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip()) / 1024


def tick_and_mem(quick: bool, which: Sequence[str]) -> None:
    finished = 10_000 if quick else 100_000
    runs = 3 if quick else 7
    label = f"{finished // 1000}k"
    sleeper = subprocess.Popen(["sleep", "3600"])  # the 50 running jobs' "worker"
    try:
        started = process_info(sleeper.pid)[1]
        if started is None:
            raise SystemExit("bench: cannot read the start time of a process (needs /proc)")
        with tempfile.TemporaryDirectory(prefix="jr-bench-store-") as tmp:
            workdir = Path(tmp) / "workdir"
            request = build_store(workdir, finished, sleeper.pid, started)
            env = tool_env(workdir)
            if "tick" in which:
                fresh_heartbeats(workdir)
                run_once(env)  # warm the page cache, as a service's passes are
                ticks, floor = paired(
                    lambda: run_once(env), lambda: run_cmd([PY, "-c", "pass"]), runs
                )
                report(f"tick_run_once_{label}_finished_{RUNNING}_running", ticks, floor=floor)
                report(
                    f"tick_run_once_{label}_beyond_startup",
                    [t - f for t, f in zip(ticks, floor, strict=True)],
                )
            if "mem" in which:
                mem(workdir, env, request, label, runs)
    finally:
        sleeper.kill()
        sleeper.wait()


def mem(workdir: Path, env: dict[str, str], request: str, label: str, runs: int) -> None:
    from tests.support.fake_jobserver import FakeJobServer

    n = min(runs, 3)
    base = [peak_rss_mb([PY, "-c", "pass"]) for _ in range(n)]
    fresh_heartbeats(workdir)
    run_rss = [
        peak_rss_mb([PY, str(ROOT / "bin" / "jr-run-once"), "-o", "ids"], env) for _ in range(n)
    ]
    report(f"rss_jr_run_once_{label}", run_rss, unit="MB", floor=base)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    with FakeJobServer() as server:
        server.add_request(identifier=request)  # the website lists the running jobs' request
        sync_env = {
            **env,
            "JOB_SERVER_ENDPOINT": server.url,
            "JOB_SERVER_TOKEN": server.token,
            "NO_PROXY": "127.0.0.1,localhost",
        }
        sync_rss = [
            peak_rss_mb([PY, str(ROOT / "bin" / "jr-sync"), "-o", "ids"], sync_env)
            for _ in range(n)
        ]
        if not server.jobs:
            raise SystemExit(
                "bench: jr-sync posted nothing: the store is not what we meant to measure"
            )
    report(f"rss_jr_sync_{label}", sync_rss, unit="MB", floor=base)


def ls(quick: bool) -> None:
    """bench_ls.py's figures, with a run count and size that --quick can shrink."""
    jobs = 1_000 if quick else 10_000
    runs = 3 if quick else 7
    label = f"{jobs // 1000}k"
    with tempfile.TemporaryDirectory(prefix="jr-bench-ls-") as tmp:
        workdir = Path(tmp) / "workdir"
        some = bench_ls.fill(workdir / "db.sqlite", jobs)
        env = tool_env(workdir)
        ls_times, floor = paired(
            lambda: run_cmd([PY, str(ROOT / "bin" / "jr-ls")], env=env),
            lambda: run_cmd([PY, "-c", "pass"]),
            runs,
        )
        report(f"jr-ls_{label}_jobs", ls_times, floor=floor)
        script = (
            f"source {ROOT / 'completions' / 'jr.bash'}; COMP_WORDS=(jr-ls {some[5:8]}); COMP_CWORD=1; "
            "_jr_complete"
        )
        comp, bash_floor = paired(
            lambda: subprocess.run(
                ["bash", "--norc", "-c", script], env=env, check=True, stdout=subprocess.DEVNULL
            ),
            lambda: subprocess.run(["bash", "--norc", "-c", "true"], check=True),
            runs,
        )
        report(f"completion_3char_{label}_jobs", comp, floor=bash_floor)


PARTS = ("tick", "mem", "ls")


def run(names: Sequence[str], quick: bool) -> None:
    if "tick" in names or "mem" in names:
        tick_and_mem(quick, names)
    if "ls" in names:
        ls(quick)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller stores, 3 runs each")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts to run")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := [n for n in names if n not in PARTS]:
        parser.error(f"unknown part(s) {unknown}: choose from {list(PARTS)}")
    run(names, args.quick)


if __name__ == "__main__":
    main()
