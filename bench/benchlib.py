"""Shared helpers for bench/ scripts: time things, print one TSV figure per line, never assert.

Line format (stdout): name, value, unit, floor, ratio, runs (median of the runs). Min and max of
every figure are appended to bench/results/minmax.tsv.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
HEADER = "name\tvalue\tunit\tfloor\tratio\truns"


def timed(fn: Callable[[], object], runs: int = 5) -> list[float]:
    """Wall-clock seconds of each of `runs` calls."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_cmd(
    args: Sequence[str], env: dict[str, str] | None = None, input: str | None = None
) -> None:
    """Run a command, failing loudly if it fails (a broken bench must not print a figure)."""
    subprocess.run(
        list(args),
        env=env,
        input=input,
        text=True,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def report(
    name: str, samples: Sequence[float], unit: str = "s", floor: Sequence[float] | None = None
) -> None:
    """Print the median (and the ratio to the floor's median, measured in the same run)."""
    value = statistics.median(samples)
    floor_value = statistics.median(floor) if floor else None
    ratio = f"{value / floor_value:.2f}" if floor_value else ""
    print(
        f"{name}\t{value:.4f}\t{unit}\t{'' if floor_value is None else f'{floor_value:.4f}'}\t{ratio}\t"
        f"{len(samples)}",
        flush=True,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "minmax.tsv", "a") as fh:
        fh.write(
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\t{name}\t{min(samples):.4f}\t"
            f"{max(samples):.4f}\t{unit}\n"
        )


def tool_env(workdir: Path) -> dict[str, str]:
    """Environment for running bin/ tools against a scratch workdir."""
    env = dict(os.environ)
    env.update({"WORKDIR": str(workdir), "JR_ENV_FILE": str(workdir / "no.env")})
    return env
