"""bench/run_all.py --quick runs and prints well-formed figures (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.cli import ROOT, tool_env

HEADER = ["name", "value", "unit", "floor", "ratio", "runs"]


@pytest.mark.docker
def test_quick_bench_prints_well_formed_figures(tmp_path):
    env = tool_env(tmp_path / "unused-workdir")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--only", "W1,tick,ls"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == HEADER
    figures = {}
    for line in lines[1:]:
        if line.startswith("#"):
            continue
        name, value, unit, floor, ratio, runs = line.split("\t")
        assert name and unit and float(value) >= 0 and int(runs) >= 1, line
        if floor:
            assert float(floor) > 0 and float(ratio) > 0, line
        figures[name] = value
    assert {"floor_docker_run_rm", "W1_e2e", "jr-ls_1k_jobs", "completion_3char_1k_jobs"} <= set(
        figures
    )
    assert any(n.startswith("tick_run_once_") for n in figures)
    # Every figure has a verdict line when it has a target; a quick run never touches the README.
    assert any(line.startswith("# target ") for line in lines)
    assert "wrote the table" not in result.stderr
