"""The run lock: one pass of the run loop at a time (jr-run-once, the pass a finishing worker
runs), and nothing that must not race a pass (jr-reboot-prep putting jobs back) while one runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import TemporaryFailure


def take_run_lock(config: Config, timeout: float = 0) -> Any:
    """The run lock, acquired within timeout seconds (0: only if it is free now); None if it
    stayed busy. The caller releases it (`.release()`)."""
    from filelock import FileLock, Timeout  # lazily: slow to import, and --help needs none of it

    config.workdir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(config.run_lock_path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        return None
    return lock


@contextmanager
def holding_run_lock(config: Config, timeout: float, busy: str) -> Iterator[None]:
    """Hold the run lock for a with-block; TemporaryFailure(busy) (exit 75) if it stays busy for
    timeout seconds."""
    lock = take_run_lock(config, timeout)
    if lock is None:
        raise TemporaryFailure(busy)
    try:
        yield
    finally:
        lock.release()
