"""Waiting for a condition instead of sleeping for a guessed time: the one wait_for of the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "the condition",
    interval: float = 0.05,
    explain: Callable[[], str] | None = None,
) -> Any:
    """Poll until condition() is truthy and return its value; fail the test after timeout seconds.

    `explain()`, if given, adds what the test saw last to the failure (a screen, a log).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = f"\n{explain()}" if explain is not None else ""
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}{seen}")
        time.sleep(interval)
