"""The tests' environment scrub list keeps up with the settings jr reads."""

from __future__ import annotations

import re
from pathlib import Path

from jobrunner_lib.core import config
from tests.support.env import SCRUB

# Settings the tests set themselves or must inherit (see tests/support/env.py).
KEPT = {"DOCKER_HOST", "JR_ENV_FILE", "JR_USER"}
LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def test_every_setting_config_reads_is_scrubbed_from_the_tests_environment():
    source = Path(config.__file__).read_text()
    # Every upper-case string literal in config.py names a setting, but for the log levels.
    named = set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', source)) - LOG_LEVELS
    named |= {f"{name.upper()}_DATABASE_URL" for name in config.DATABASE_NAMES}
    assert {"WORKDIR", "LOGLEVEL", "MAX_WORKERS"} <= named  # the scan still finds settings
    assert sorted(named - set(SCRUB) - KEPT) == []
