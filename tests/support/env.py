"""The one list of settings no test may inherit from the developer's shell (or a `.env`).

Every way a test runs jr removes them first, then sets what the test means: tool subprocesses
(cli.tool_env), in-process calls (the `workdir` fixture, scrub()) and scratch backends.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from jobrunner_lib.core.config import DATABASE_NAMES

# Every setting jobrunner_lib/core/config.py reads (tests/unit/test_support_env.py fails when one
# is added there and not here), and the test-only hooks of faults.py and run_once.py.
# Not listed, on purpose: DOCKER_HOST (which Docker the tests use), JR_ENV_FILE (always set by the
# test, to a file of its own), JR_EXTRA_LABELS and JR_USER (tests set them for jr to inherit).
SCRUB = (
    # where things are
    "WORKDIR",
    "WORK_DIR",
    "HIGH_PRIVACY_STORAGE_BASE",
    "MEDIUM_PRIVACY_STORAGE_BASE",
    "VOLUMES_DIR",
    "VOLUME_STORAGE",
    "STATS_DATABASE_FILE",
    "DEBUG_LOG_FILE",
    "JOB_RESOURCE_WEIGHTS_FILE",
    # which backend, which website
    "BACKEND",
    "USING_DUMMY_DATA_BACKEND",
    "JOB_SERVER_ENDPOINT",
    "JOB_SERVER_TOKEN",
    "PRIVATE_REPO_ACCESS_TOKEN",
    "ALLOW_LOCAL_REPOS",
    "ALLOWED_GITHUB_ORGS",
    "GIT_PROXY_HOST",
    "GIT_PROXY_SCHEME",
    "ACTIONS_BASE_URL",
    # images
    "ALLOWED_IMAGES",
    "DOCKER_REGISTRY",
    "PULL_REGISTRY",
    "HELPER_IMAGE",
    "TOOLS_IMAGE",
    # loops, limits and timeouts
    "LOGLEVEL",
    "MAX_WORKERS",
    "POLL_INTERVAL",
    "JOB_LOOP_INTERVAL",
    "SYNC_TIME_LIMIT",
    "STATS_POLL_INTERVAL",
    "STATUS_REFRESH_INTERVAL",
    "COPY_STALL_TIMEOUT",
    "WORKER_STALL_TIMEOUT",
    "JOB_USER",
    "JOB_MEMORY_LIMIT",
    "JOB_CPU_COUNT",
    "JOB_PIDS_LIMIT",
    "JOB_LOG_LIMIT",
    # what a job on a real backend gets
    *(f"{name.upper()}_DATABASE_URL" for name in DATABASE_NAMES),
    "DATABASE_NETWORK",
    "TEMP_DATABASE_NAME",
    "EMIS_ORGANISATION_HASH",
    "PRESTO_TLS_CERT_PATH",
    "PRESTO_TLS_KEY_PATH",
    "STATA_LICENSE",
    # the database maintenance check (and upstream's names for it)
    "MAINTENANCE_CHECK_IMAGE",
    "MAINTENANCE_CHECK_COMMAND",
    "MAINTENANCE_CHECK_INTERVAL",
    "MAINTENANCE_POLL_INTERVAL",
    "ENABLE_MAINTENANCE_MODE_THREAD",
    # test-only hooks
    "JR_FAULT",
    "JR_PAUSE",
    "JR_PAUSE_FILE",
    "JR_IGNORE_SIGINT",
)


def _scrubbed_name(name: str) -> bool:
    # Any <NAME>_DATABASE_URL configures a database, whatever the name (config.database_urls_from).
    return name in SCRUB or name.endswith("_DATABASE_URL")


def scrubbed(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of environ without any of SCRUB (nor any <NAME>_DATABASE_URL)."""
    return {name: value for name, value in environ.items() if not _scrubbed_name(name)}


def scrub(monkeypatch: pytest.MonkeyPatch, *also: str) -> None:
    """Remove SCRUB (and `also`, and any <NAME>_DATABASE_URL) from this process's environment
    until the test ends."""
    import os

    for name in (*SCRUB, *also, *(n for n in os.environ if _scrubbed_name(n))):
        monkeypatch.delenv(name, raising=False)
