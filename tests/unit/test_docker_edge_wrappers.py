"""The Docker edge's image and jr-mount wrappers (docker/images.py, docker/mounts.py) against a fake
daemon: what they send, what they make of its answers, and DockerUnavailable when it dies."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from jobrunner_lib.docker import engine, images, mounts
from tests.cli.fake_dockerd import FakeDockerd, Route

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")

IMAGE = "sha256:" + "d" * 64


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Start a fake daemon with the given routes; the process's client points at it."""
    started: list[FakeDockerd] = []
    path = Path("/tmp") / f"jr-fake-docker-{os.getpid()}-{tmp_path.name[-20:]}.sock"

    def start(*routes: Route) -> FakeDockerd:
        daemon = FakeDockerd(path, routes)
        started.append(daemon)
        monkeypatch.setenv("DOCKER_HOST", daemon.host)
        monkeypatch.setattr(engine, "_client", None)  # a fresh client for this daemon
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
    if engine._client is not None:
        engine._client.close()
    path.unlink(missing_ok=True)


def test_remove_image_says_whether_it_removed_and_names_a_conflict(fake):
    fake(
        Route("DELETE", "/images/gone", {"message": "No such image: gone"}, 404),
        Route("DELETE", "/images/used", {"message": "conflict: image is being used by c1"}, 409),
        Route("DELETE", f"/images/{IMAGE}", [{"Deleted": IMAGE}]),
    )
    assert images.remove_image(IMAGE) is True
    assert images.remove_image("gone", missing_ok=True) is False
    with pytest.raises(images.ImageInUse, match="^conflict: image is being used by c1$"):
        images.remove_image("used")


def test_a_missing_image_inspects_as_none(fake):
    fake(Route("GET", "/images/nope:v1/json", {"message": "No such image: nope:v1"}, 404))
    assert images.inspect_image("nope:v1") is None


def test_untagging_keeps_the_parents_and_tagging_moves_the_name(fake):
    daemon = fake(
        Route("DELETE", "/images/reg/python:v1", [{"Untagged": "reg/python:v1"}]),
        Route("POST", f"/images/{IMAGE}/tag", b"", 201),
    )
    images.remove_image("reg/python:v1", noprune=True)
    images.tag(IMAGE, "jr/python", "v1")
    untag, tag = daemon.requests[-2:]
    assert untag.query["noprune"] == ["True"]
    assert tag.query == {"repo": ["jr/python"], "tag": ["v1"], "force": ["1"]}


@pytest.mark.parametrize(
    "call",
    [
        images.disk_usage,
        images.all_containers,
        lambda: images.list_images(dangling=True),
        lambda: images.inspect_image("x"),
        lambda: images.tag(IMAGE, "jr/python", "v1"),
        lambda: images.remove_image(IMAGE, missing_ok=True),
        lambda: list(images.pull("reg/python", "v1")),
        lambda: mounts.wait_exit("jr-mount-x"),
    ],
)
def test_every_call_is_docker_unavailable_once_the_daemon_died(fake, call):
    fake()
    engine.ping()  # connected, then the daemon goes away at the next call
    with pytest.raises(engine.DockerUnavailable, match=r"^Docker is not available \("):
        call()


def test_the_mount_helper_has_only_ptrace_no_network_and_the_jobs_processes(fake):
    daemon = fake(Route("POST", "/containers/create", {"Id": "c1", "Warnings": []}, 201))
    mounts.create_mount_container(
        "be",
        "job1",
        "jr-mount-job1-abc",
        image="jr-tools:latest",
        source="os-volume-job1",
        command=["ps", "faux"],
        pid_of="os-job-job1",
        shell=False,
    )
    (create,) = [r for r in daemon.requests if r.path == "/containers/create"]
    host = create.body["HostConfig"]
    assert create.query["name"] == ["jr-mount-job1-abc"]
    assert host["CapAdd"] == ["SYS_PTRACE"] and not host.get("Privileged")
    assert host["NetworkMode"] == "none" and host["PidMode"] == "container:os-job-job1"
    assert host["Binds"] == ["os-volume-job1:/workspace:rw"]
    assert create.body["Cmd"] == ["ps", "faux"] and create.body["WorkingDir"] == "/workspace"
    assert mounts.is_mount(create.body["Labels"])
    assert create.body["Labels"]["org.jr.backend"] == "be"


def test_mount_names_are_fresh_for_each_helper():
    assert mounts.mount_name("job1") != mounts.mount_name("job1")
    assert mounts.mount_name("job1").startswith("jr-mount-job1-")
