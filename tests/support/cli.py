"""Run the real bin/jr-* tools as subprocesses, the way an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.env import scrubbed

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "bin"


def tool_env(workdir: Path, **extra: str) -> dict[str, str]:
    """An environment for a tool run: a private workdir, no .env, nothing inherited that matters."""
    env = scrubbed(os.environ)
    env.update({"WORKDIR": str(workdir), "JR_ENV_FILE": str(workdir / "no.env"), "NO_COLOR": "1"})
    env.update(extra)
    return env


def run(
    tool: str,
    *args: str,
    workdir: Path,
    input: str | None = None,
    timeout: float = 120,
    **extra_env: str,
) -> subprocess.CompletedProcess[str]:
    """Run bin/<tool> with the venv's python; capture stdout and stderr as text."""
    return subprocess.run(
        [sys.executable, str(BIN / tool), *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=tool_env(workdir, **extra_env),
        cwd=str(workdir.parent),
    )
