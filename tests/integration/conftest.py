"""Fixtures shared by the executor tests (test_executor.py, test_host_volumes.py).

Each module brings its own `config` and `study`; these build on whichever the test's module has.
"""

from __future__ import annotations

import pytest

from jobrunner_lib.store import db
from tests.support.factories import Jobs


@pytest.fixture
def conn(config):
    connection = db.connect(config.db_path)
    yield connection
    connection.close()


@pytest.fixture
def jobs(conn, study):
    return Jobs(conn, *study)
