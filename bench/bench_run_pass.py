"""Time one run pass over a store holding 100 000 finished jobs and 50 running ones.

Usage: .venv/bin/python bench/bench_run_pass.py [FINISHED] [RUNNING]
Prints the median of 5 passes (workers are faked as alive, so this times the pass itself: the
active-jobs query, supervision decisions and the capacity sums, not process start-up).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobrunner_lib.core.config import Config  # noqa: E402
from jobrunner_lib.core.models import Job, Msg, State, StatusCode  # noqa: E402
from jobrunner_lib.jobs.run import run_pass  # noqa: E402
from jobrunner_lib.store import db  # noqa: E402
from jobrunner_lib.store import queries as db_queries


def build(path: Path, finished: int, running: int, now: float) -> None:
    """A store with realistic finished rows (outputs, specs, messages) and live running jobs."""
    conn = db.connect(path)
    spec = {
        "moderately_sensitive": {"tables": "output/*.csv"},
        "highly_sensitive": {"c": "output/*.arrow"},
    }
    outputs = {f"output/table_{k}.csv": "moderately_sensitive" for k in range(8)}
    jobs = [
        Job(
            id=f"f{n:015d}",
            job_request_id=f"r{n // 8:015d}",
            state=State.SUCCEEDED if n % 7 else State.FAILED,
            repo_url="https://github.com/opensafely/study",
            commit="a" * 40,
            workspace=f"ws{n % 40}",
            action=f"action_{n % 30}",
            run_command="python:latest analysis/model.py --flag",
            output_spec=spec,
            outputs=outputs,
            status_message=Msg.SUCCEEDED,
            status_code=StatusCode.SUCCEEDED,
            created_at=int(now) - 10_000_000 + n,
            updated_at=int(now) - 10_000_000 + n,
        )
        for n in range(finished)
    ]
    jobs += [
        Job(
            id=f"r{n:015d}",
            job_request_id="rlive",
            state=State.RUNNING,
            workspace="ws0",
            action=f"live_{n}",
            status_code=StatusCode.EXECUTING,
            status_message=Msg.RUNNING,
            attempts=1,
            worker_pid=100_000 + n,
            worker_started_at=now,
            created_at=int(now),
            updated_at=int(now),
            wait_for_job_ids=[f"f{n:015d}"],
        )
        for n in range(running)
    ]
    with db.transaction(conn):
        db_queries.insert_jobs(conn, jobs)
    for n in range(running):
        db_queries.touch(conn, f"r{n:015d}", heartbeat=now)
    conn.close()


def main() -> None:
    """Build the store once, then time five passes over it."""
    finished = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    running = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "db.sqlite"
        build(path, finished, running, now)
        config = Config(
            workdir=Path(tmp),
            max_workers=float(running),
            job_resource_weights_file=Path(tmp) / "w.ini",
        )
        conn = db.connect(path)
        timings = []
        for _ in range(5):
            start = time.perf_counter()
            changes = run_pass(
                config,
                conn,
                spawn=lambda c, j: (0, now),
                is_alive=lambda p, s: True,
                kill=lambda p, s: None,
                now=lambda: now,
            )
            timings.append(time.perf_counter() - start)
            assert changes == [], changes
        conn.close()
    print(
        json.dumps(
            {
                "bench": "run_pass",
                "finished_jobs": finished,
                "running_jobs": running,
                "median_ms": round(statistics.median(timings) * 1000, 2),
                "all_ms": [round(t * 1000, 2) for t in timings],
            }
        )
    )


if __name__ == "__main__":
    main()
