"""Shared pytest fixtures for jr's tests (loaded through tests/conftest.py)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.env import scrub
from tests.support.fake_jobserver import FakeJobServer


@pytest.fixture(scope="session")
def docker_ready() -> None:
    """Skip the test unless Docker answers and jr's test images are built (e2e.require_docker)."""
    from tests.support.e2e import require_docker

    require_docker()


@pytest.fixture
def fake_jobserver(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeJobServer]:
    """A running fake jobs website on loopback (token "secret-token", backend "expectations",
    jr's default BACKEND: it lists this backend's requests)."""
    # An HTTP(S)_PROXY in the environment would otherwise route loopback calls to the proxy.
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    with FakeJobServer() as server:
        yield server


@pytest.fixture
def workdir(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """A private WORKDIR (and no .env) for in-process library calls and tool runs."""
    path = tmp_path / "workdir"
    scrub(monkeypatch)
    monkeypatch.setenv("WORKDIR", str(path))
    monkeypatch.setenv("JR_ENV_FILE", str(tmp_path / "no.env"))
    return path


@pytest.fixture
def store(tmp_path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    """A private workdir and its state store, empty: (workdir, connection)."""
    from jobrunner_lib.store import db

    workdir = tmp_path / "workdir"
    conn = db.connect(workdir / "db.sqlite")
    yield workdir, conn
    conn.close()


@pytest.fixture
def conn(config) -> Iterator[sqlite3.Connection]:
    """A connection to the state store of the test's `config` (its module or conftest has one)."""
    from jobrunner_lib.store import db

    connection = db.connect(config.db_path)
    yield connection
    connection.close()


@pytest.fixture
def as_root() -> None:
    """For a test of what jr does as root (as the service runs on a Linux backend).

    Skipped, saying so, when the tests do not run as root; but under CI (`CI` set), which runs them
    as root, not being root fails: a skip there would hide that the test no longer runs at all.
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return
    why = "runs only as root: it tests what jr does as root, as the service runs on a backend"
    if os.environ.get("CI"):
        pytest.fail(f"{why}, and CI runs the tests as root (it does not here)")
    pytest.skip(why)


def remove_labelled(label: str, *, images: bool = False) -> None:
    """Remove every container and volume (and with images, image) carrying `label` (k=v).

    A worker may be removing the same objects at the same moment, so "in progress" and "in use"
    are waited out (30 s at most) rather than failing the test's teardown.
    """
    import time

    from jobrunner_lib.docker import engine as docker

    api = docker.client().api
    wanted = {"label": [label]}
    deadline = time.monotonic() + 30
    while True:
        containers = api.containers(all=True, filters=wanted)
        volumes = api.volumes(filters=wanted).get("Volumes") or []
        if not containers and not volumes:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not remove {containers} {volumes}")
        try:
            for c in containers:
                docker.remove_container(c["Id"])
            for v in volumes:
                docker.remove_volume(v["Name"])
        except Exception:  # noqa: BLE001 - e.g. a volume still in use by a container going away
            time.sleep(0.2)
    for image in api.images(filters=wanted) if images else []:
        try:
            api.remove_image(image["Id"], force=True)
        except Exception:  # noqa: BLE001 - already gone with its tag
            pass


@pytest.fixture
def docker_label():
    """A unique `org.jr.test=<uuid>` label for JR_EXTRA_LABELS; its objects are removed afterwards."""
    import uuid

    label = f"org.jr.test={uuid.uuid4().hex}"
    try:
        yield label
    finally:
        remove_labelled(label)
