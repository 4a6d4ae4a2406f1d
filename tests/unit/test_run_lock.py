"""The run lock (jobs/locks.py): one pass at a time, and a clear exit 75 for whoever waits too long."""

from __future__ import annotations

import pytest

from jobrunner_lib.core.config import Config
from jobrunner_lib.core.errors import TemporaryFailure
from jobrunner_lib.jobs.locks import holding_run_lock, take_run_lock


def test_the_run_lock_is_held_by_one_taker_at_a_time(tmp_path):
    config = Config(workdir=tmp_path / "new" / "workdir")  # made if missing
    first = take_run_lock(config)
    assert first is not None
    try:
        assert take_run_lock(config) is None
        assert take_run_lock(config, 0.1) is None  # waited, still busy
    finally:
        first.release()
    again = take_run_lock(config)
    assert again is not None
    again.release()


def test_holding_the_run_lock_while_a_pass_holds_it_is_a_temporary_failure_saying_so(tmp_path):
    config = Config(workdir=tmp_path)
    with holding_run_lock(config, 0, "busy"):
        with pytest.raises(TemporaryFailure, match="^another pass is running$"):
            with holding_run_lock(config, 0.1, "another pass is running"):
                pass  # pragma: no cover
    with holding_run_lock(config, 0, "busy"):  # released by the with-block
        assert take_run_lock(config) is None
