"""Shared pytest fixtures for jr's tests (loaded through tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fake_jobserver import FakeJobServer


@pytest.fixture(scope="session")
def docker_ready() -> None:
    """Skip the test unless Docker answers and jr's test images are built (e2e.require_docker)."""
    from tests.support.e2e import require_docker

    require_docker()


@pytest.fixture
def fake_jobserver(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeJobServer]:
    """A running fake jobs website on loopback (token "secret-token", backend "test")."""
    # An HTTP(S)_PROXY in the environment would otherwise route loopback calls to the proxy.
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    with FakeJobServer() as server:
        yield server


@pytest.fixture
def workdir(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """A private WORKDIR (and no .env) for in-process library calls and tool runs."""
    path = tmp_path / "workdir"
    monkeypatch.setenv("WORKDIR", str(path))
    monkeypatch.setenv("JR_ENV_FILE", str(tmp_path / "no.env"))
    for name in (
        "JOB_SERVER_ENDPOINT",
        "JOB_SERVER_TOKEN",
        "BACKEND",
        "HIGH_PRIVACY_STORAGE_BASE",
        "MEDIUM_PRIVACY_STORAGE_BASE",
        "WORK_DIR",
        "DEBUG_LOG_FILE",
        "STATS_DATABASE_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    return path


def remove_labelled(label: str) -> None:
    """Remove every container and volume carrying `key=value` (only this test's own objects)."""
    from jobrunner_lib.docker import engine as jr_docker

    client = jr_docker.client()
    for container in client.containers.list(all=True, filters={"label": label}):
        container.remove(force=True)
    for volume in client.volumes.list(filters={"label": label}):
        volume.remove(force=True)


@pytest.fixture
def docker_label():
    """A unique `org.jr.test=<uuid>` label for JR_EXTRA_LABELS; its objects are removed afterwards."""
    import uuid

    label = f"org.jr.test={uuid.uuid4().hex}"
    try:
        yield label
    finally:
        remove_labelled(label)
