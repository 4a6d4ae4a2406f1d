"""Test-only fault injection, off unless the environment asks for it.

- `JR_FAULT=<step>` makes that step of a job (prepare, execute, finalize, cleanup) fail with an
  unexpected error, as a bug would.
- `JR_PAUSE=<point>` stops the process at that point of finalize (staged, placed, logged) for
  good, after writing its pid to the file `JR_PAUSE_FILE`: a test then kills the worker, or the
  job with jr-kill, at exactly that moment.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

FAULT_ENV = "JR_FAULT"
PAUSE_ENV = "JR_PAUSE"
PAUSE_FILE_ENV = "JR_PAUSE_FILE"
FAULT_STEPS = ("prepare", "execute", "finalize", "cleanup")
PAUSE_POINTS = ("staged", "placed", "logged")


def fault(step: str) -> None:
    """Raise an unexpected error if JR_FAULT names this step."""
    if os.environ.get(FAULT_ENV) == step:
        raise RuntimeError(f"{FAULT_ENV}={step}: injected fault")


def pause(point: str) -> None:
    """Stop here until killed if JR_PAUSE names this point (its pid written to JR_PAUSE_FILE)."""
    if os.environ.get(PAUSE_ENV) != point:
        return
    Path(os.environ[PAUSE_FILE_ENV]).write_text(str(os.getpid()))
    while True:
        time.sleep(60)
