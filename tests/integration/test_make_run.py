"""`make run`'s demo (scripts/run-demo) end to end, with its WORKDIR in a temporary directory.

`make run` itself is not run here: it creates the venv and builds images first. The demo's jobs
carry this test's Docker label, and the rig removes exactly those objects afterwards.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import ROOT
from tests.support.e2e import rig_at

pytestmark = pytest.mark.docker

EXPECTED = {
    "generate_dataset": ("succeeded", "succeeded"),
    "summarise": ("succeeded", "succeeded"),
    "plot": ("succeeded", "succeeded"),
    "counts": ("succeeded", "succeeded"),
    "sensitivity_check": ("failed", "nonzero_exit"),
}


def printed_path(output: str, label: str) -> Path:
    """The directory the demo printed after `label:`."""
    match = re.search(rf"^{re.escape(label)}:\s+(\S+)$", output, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{output}"
    return Path(match.group(1))


def test_run_demo_runs_the_example_study_and_shows_where_its_outputs_are(tmp_path):
    with rig_at(tmp_path) as rig:
        result = subprocess.run(
            [str(ROOT / "scripts" / "run-demo")],
            env=rig.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        out = result.stdout

        rows = rig.query("SELECT * FROM job")
        jobs = {row["action"]: row for row in rows}
        assert len(rows) == len(EXPECTED)
        assert {a: (j["state"], j["status_code"]) for a, j in jobs.items()} == EXPECTED
        assert jobs["sensitivity_check"]["status_message"] == "Job exited with error code 3"
        assert {row["workspace"] for row in rows} == {"example"}
        # jr-ls's table names every job.
        for action, job in jobs.items():
            assert action in out and job["id"] in out

        high = printed_path(out, "Outputs, all privacy levels")
        medium = printed_path(out, "Outputs, moderately/minimally")
        assert high == rig.high / "workspaces" / "example"
        assert medium == rig.medium / "workspaces" / "example"

        dataset = (high / "output/dataset.csv").read_text().splitlines()
        assert dataset[0] == "patient_id,age,sex,region" and len(dataset) == 201
        assert (high / "output/summary.csv").read_text().startswith("region,patients,mean_age\n")
        assert "summarised 200 rows" in (high / "output/summarise.log").read_text()
        assert (high / "output/plot.svg").read_text().startswith("<svg")
        assert (high / "output/counts.txt").read_text() == "total patients: 200\n"
        assert not (high / "output/sensitivity.csv").exists()
        lower = {"summary.csv", "summarise.log", "plot.svg", "counts.txt"}
        assert {p.name for p in (medium / "output").iterdir()} == lower
        for name in lower:
            assert (medium / "output" / name).read_bytes() == (high / "output" / name).read_bytes()
        assert not (medium / "output/dataset.csv").exists()

        for action, job in jobs.items():
            assert (high / "metadata" / f"{action}.log").is_file()
            (log_dir,) = rig.log_dirs(job["id"])
            assert (log_dir / "logs.txt").is_file() and (log_dir / "metadata.json").is_file()
        failed_log = (high / "metadata/sensitivity_check.log").read_text()
        assert "the demo data is too small" in failed_log and "exit_code: 3" in failed_log

        rig.wait_workers_gone()
        assert rig.containers() == [] and rig.volumes() == []
