"""Fixtures shared by the executor tests (test_executor.py, test_host_volumes.py).

Each module brings its own `config` and `study`; these build on whichever the test's module has
(`conn`, the state store of that `config`, is tests/support/fixtures.py's).
"""

from __future__ import annotations

import pytest

from tests.support.factories import Jobs


@pytest.fixture
def jobs(conn, study):
    return Jobs(conn, *study)
