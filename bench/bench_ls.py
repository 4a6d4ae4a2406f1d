"""jr-ls with 10 000 jobs in the store, and one tab completion of a 3-character fragment.

Targets (issue 3): jr-ls < 300 ms, completion < 150 ms. Floor: `python -c pass` (interpreter start).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import ROOT, report, run_cmd, timed, tool_env

from jobrunner_lib.core.ids import job_id, new_request_id
from jobrunner_lib.core.models import JobRequest, State, StatusCode, new_job
from jobrunner_lib.store import db
from jobrunner_lib.store import queries as db_queries


def fill(path: Path, jobs: int) -> str:
    """Insert `jobs` finished jobs in requests of 10; return one job id."""
    conn = db.connect(path)
    states = [State.SUCCEEDED, State.FAILED]
    some = ""
    for r in range(jobs // 10):
        req = JobRequest(
            id=new_request_id(),
            repo_url="/r/study",
            commit="c" * 40,
            branch="main",
            requested_actions=["run_all"],
            cancelled_actions=[],
            workspace=f"ws{r % 20}",
            database_name="dummy",
        )
        batch = [
            new_job(
                job_id(req.id, f"a{i}"),
                req,
                f"a{i}",
                states[i % 2],
                StatusCode.SUCCEEDED,
                "done",
                at=1_700_000_000 + r * 10 + i,
            )
            for i in range(10)
        ]
        db_queries.insert_request(conn, req, batch)
        some = batch[0].id
    return some


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "workdir"
        some = fill(workdir / "db.sqlite", 10_000)
        env = tool_env(workdir)
        floor = timed(lambda: run_cmd([sys.executable, "-c", "pass"]), 7)
        ls = timed(lambda: run_cmd([sys.executable, str(ROOT / "bin" / "jr-ls")], env=env), 7)
        report("jr-ls_10k_jobs", ls, floor=floor)
        ls_all = timed(
            lambda: run_cmd([sys.executable, str(ROOT / "bin" / "jr-ls"), "--limit", "0"], env=env),
            5,
        )
        report("jr-ls_10k_jobs_all_rows", ls_all, floor=floor)
        script = (
            f"source {ROOT / 'completions' / 'jr.bash'}; COMP_WORDS=(jr-ls {some[5:8]}); COMP_CWORD=1; "
            "_jr_complete"
        )
        comp = timed(
            lambda: subprocess.run(
                ["bash", "--norc", "-c", script], env=env, check=True, stdout=subprocess.DEVNULL
            ),
            7,
        )
        bash_floor = timed(lambda: subprocess.run(["bash", "--norc", "-c", "true"], check=True), 7)
        report("completion_3char_10k_jobs", comp, floor=bash_floor)


if __name__ == "__main__":
    main()
