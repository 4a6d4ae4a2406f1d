"""jr-prune, jr-pull-image and jr-mount when Docker goes away: exit 75, one line, nothing half done.

The daemon is either missing from the start (DOCKER_HOST at a socket that does not exist) or a
fake one (fake_dockerd.py) that answers the tool's first calls and dies at a chosen one, as a
daemon that stops mid-operation does. Every call a tool makes goes through the Docker edge
(docker/engine.py, images.py, mounts.py), so either way the tool says "Docker is not available"
and exits 75: never an internal error (70), never a failure per item (1) that goes on regardless.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from jobrunner_lib.core.models import State, StatusCode
from jobrunner_lib.store import db
from tests.cli.fake_dockerd import FakeDockerd, Route
from tests.support.cli import run
from tests.support.factories import insert_job

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")

GONE = {"DOCKER_HOST": "unix:///nonexistent.sock"}
REGISTRY = "jrtest-reg"
PRUNE_ENV = {
    "BACKEND": "jrtestoutage",
    "DOCKER_REGISTRY": REGISTRY,
    "ALLOWED_IMAGES": "python",
    "USING_DUMMY_DATA_BACKEND": "true",
}
IMAGE_ID = "sha256:" + "a" * 64
NOTHING = [
    Route("GET", "/system/df", {"LayersSize": 0, "Images": [], "Containers": [], "Volumes": []}),
    Route("GET", "/containers/json", []),
    Route("GET", "/volumes", {"Volumes": [], "Warnings": []}),
]
DANGLING = Route(
    "GET",
    "/images/json",
    [
        {
            "Id": IMAGE_ID,
            "RepoTags": ["<none>:<none>"],
            "RepoDigests": [f"{REGISTRY}/python@sha256:" + "b" * 64],
            "Labels": {},
            "Size": 1000,
        }
    ],
)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A workdir with a day-old abandoned checkout in temp/ (something prune would remove)."""
    workdir = tmp_path / "workdir"
    stale = workdir / "temp" / "abandoned-checkout"
    stale.mkdir(parents=True)
    (stale / "file").write_text("x")
    old = time.time() - 3 * 86400
    for path in (stale / "file", stale):
        os.utime(path, (old, old))
    return workdir


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    # Unix socket paths are short (108 bytes): pytest's tmp_path can be longer.
    path = Path("/tmp") / f"jr-fake-docker-{os.getpid()}-{tmp_path.name[-20:]}.sock"
    yield path
    path.unlink(missing_ok=True)


def one_line(stderr: str, prefix: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix), stderr


def test_prune_without_docker_exits_75_in_one_line_and_removes_nothing(workdir):
    result = run("jr-prune", "--yes", workdir=workdir, **PRUNE_ENV, **GONE)
    assert (result.returncode, result.stdout) == (75, ""), result.stderr
    one_line(result.stderr, "jr-prune: Docker is not available")
    assert (workdir / "temp" / "abandoned-checkout").exists()


def test_prune_when_docker_dies_while_it_lists_images_exits_75_and_removes_nothing(workdir, sock):
    with FakeDockerd(sock, NOTHING) as daemon:
        result = run("jr-prune", "--yes", workdir=workdir, DOCKER_HOST=daemon.host, **PRUNE_ENV)
    assert (result.returncode, result.stdout) == (75, ""), result.stderr
    one_line(result.stderr, "jr-prune: Docker is not available (list images): ")
    assert (workdir / "temp" / "abandoned-checkout").exists()


def test_prune_when_docker_dies_while_it_removes_an_image_stops_there_with_75(workdir, sock):
    with FakeDockerd(sock, [*NOTHING, DANGLING]) as daemon:
        result = run("jr-prune", "--yes", workdir=workdir, DOCKER_HOST=daemon.host, **PRUNE_ENV)
    assert (result.returncode, result.stdout) == (75, ""), result.stderr
    # The plan first (two items: the image, then the checkout), then the one error line.
    assert "About to remove 2 item(s)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"jr-prune: Docker is not available (remove image {IMAGE_ID}): "
    )
    assert ("DELETE", f"/images/{IMAGE_ID}") in [(r.method, r.path) for r in daemon.requests]
    # It stopped at the outage: what comes after the image is still there for the next run.
    assert (workdir / "temp" / "abandoned-checkout").exists()


def test_pull_image_when_docker_dies_before_the_retag_exits_75_and_prints_no_result(tmp_path, sock):
    source = "reg.example/jr-demo/python:v1"
    routes = [
        Route("GET", f"/images/{REGISTRY}/python:v1/json", {"message": "No such image"}, 404),
        Route("POST", "/images/create", {"status": f"Downloaded newer image for {source}"}),
        Route("GET", f"/images/{source}/json", {"Id": IMAGE_ID, "RepoTags": [source]}),
    ]
    with FakeDockerd(sock, routes) as daemon:
        result = run(
            "jr-pull-image",
            "python:v1",
            workdir=tmp_path / "workdir",
            DOCKER_HOST=daemon.host,
            PULL_REGISTRY="reg.example/jr-demo",
            DOCKER_REGISTRY=REGISTRY,
            ALLOWED_IMAGES="python",
        )
    assert (result.returncode, result.stdout) == (75, ""), result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"jr-pull-image: Docker is not available (tag {REGISTRY}/python:v1): "
    )
    assert [(r.method, r.path) for r in daemon.requests][-1] == (
        "POST",
        f"/images/{IMAGE_ID}/tag",
    )


def test_pull_image_without_docker_exits_75_in_one_line(tmp_path):
    result = run(
        "jr-pull-image",
        "python:v1",
        workdir=tmp_path / "workdir",
        PULL_REGISTRY="reg.example/jr-demo",
        ALLOWED_IMAGES="python",
        **GONE,
    )
    assert (result.returncode, result.stdout) == (75, ""), result.stderr
    one_line(result.stderr, "jr-pull-image: Docker is not available")


def test_mount_when_docker_dies_before_the_helper_starts_exits_75_in_one_line(tmp_path, sock):
    workdir = tmp_path / "workdir"
    conn = db.connect(workdir / "db.sqlite")
    job = insert_job(conn, State.RUNNING, StatusCode.EXECUTING, "Running")
    conn.close()
    routes = [
        Route("GET", f"/volumes/os-volume-{job.id}", {"Name": f"os-volume-{job.id}"}),
        Route("GET", "/images/jr-tools:latest/json", {"Id": IMAGE_ID}),
        Route("GET", f"/containers/os-job-{job.id}/json", {"State": {"Running": True}}),
        Route("POST", "/containers/create", {"Id": "c0ffee", "Warnings": []}, 201),
    ]
    with FakeDockerd(sock, routes) as daemon:
        result = run("jr-mount", job.id, "--", "ps", workdir=workdir, DOCKER_HOST=daemon.host)
    assert (result.returncode, result.stdout) == (75, ""), result.stderr
    one_line(result.stderr, "jr-mount: Docker is not available (")
    create = next(r for r in daemon.requests if r.path == "/containers/create")
    # The helper it made is jr's (jr-prune finds it) and marked as jr-mount's.
    assert create.body["Labels"]["org.jr.job-id"] == job.id
    assert create.body["Labels"]["org.jr.role"] == "mount"
    assert create.body["HostConfig"]["PidMode"] == f"container:os-job-{job.id}"
