"""jr-pull-image against a real local registry (scripts/registry) and real Docker.

Each test image is built FROM jr-demo/python:v1 with a label unique to this run (so its id is
unique), pushed to the registry under a tag unique to this run, and removed locally, so the tool
really pulls it. Every image, tag and container made here is removed afterwards.
"""

from __future__ import annotations

import io
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobrunner_lib.docker import engine as docker
from tests.integration.test_look_tools import Backend
from tests.support.cli import ROOT, run

pytestmark = pytest.mark.docker

RUN = uuid.uuid4().hex[:8]
TEST_LABEL = f"org.jr.test=pull-{RUN}"
# Tags must look like vN (project.yaml rules); unique per run so parallel runs never collide.
TAG = f"v9{int(RUN, 16) % 10**6:06d}"
LOCAL = f"jr-demo/python:{TAG}"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[str]:
    """A running registry on a free loopback port: `127.0.0.1:PORT`; stopped and deleted afterwards."""
    try:
        docker.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no Docker here"
        pytest.skip(f"Docker not available: {exc}")
    if not docker.image_exists("jr-demo/python:v1"):
        pytest.skip("image jr-demo/python:v1 missing: run scripts/build-images")
    state = tmp_path_factory.mktemp("registry") / "state"
    env = {"JR_REGISTRY_STATE": str(state), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    started = subprocess.run(
        [str(ROOT / "scripts" / "registry"), "start", str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    try:
        yield started.stdout.strip()
    finally:
        subprocess.run(
            [str(ROOT / "scripts" / "registry"), "stop"], capture_output=True, env=env, timeout=60
        )


@pytest.fixture(autouse=True)
def cleanup(registry) -> Iterator[None]:
    """Remove every image this run built or pulled (they all carry the run's label)."""
    yield
    api = docker.client().api
    for image in api.images(filters={"label": TEST_LABEL}):
        api.remove_image(image["Id"], force=True)
    assert not docker.image_exists(LOCAL)


def push_variant(registry: str, variant: str) -> str:
    """Build a distinct image, push it as <registry>/jr-demo/python:TAG, drop it locally; its id."""
    dockerfile = f"FROM jr-demo/python:v1\nLABEL {TEST_LABEL} org.jr.variant={variant}\n".encode()
    client = docker.client()
    image, _ = client.images.build(
        fileobj=io.BytesIO(dockerfile), tag=f"{registry}/jr-demo/python:{TAG}", rm=True
    )
    for event in client.api.push(f"{registry}/jr-demo/python", tag=TAG, stream=True, decode=True):
        assert "error" not in event, event
    client.api.remove_image(image.id, force=True)
    return image.id


def pull(registry: str, *images: str, workdir: Path, **env: str):
    """jr-pull-image through the test registry, python and r allowed."""
    settings = {"PULL_REGISTRY": f"{registry}/jr-demo", "ALLOWED_IMAGES": "python,r", **env}
    return run("jr-pull-image", *images, workdir=workdir, **settings)


def short(image_id: str) -> str:
    return image_id.split(":")[1][:12]


def test_pull_retags_to_the_name_jobs_use_and_drops_the_pull_name(registry, tmp_path):
    first = push_variant(registry, "a")
    result = pull(registry, f"python:{TAG}", workdir=tmp_path / "workdir")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"pulled {LOCAL} {short(first)} (new)\n"
    assert f"Status: Downloaded newer image for {registry}/jr-demo/python:{TAG}" in result.stderr
    assert docker.image_id(LOCAL) == first
    assert docker.client().api.inspect_image(first)["RepoTags"] == [LOCAL]


def test_pulling_a_changed_tag_removes_the_superseded_image(registry, tmp_path):
    first = push_variant(registry, "a")
    assert pull(registry, f"python:{TAG}", workdir=tmp_path / "workdir").returncode == 0
    second = push_variant(registry, "b")
    result = pull(registry, f"python:{TAG}", workdir=tmp_path / "workdir")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"pulled {LOCAL} {short(second)} (was {short(first)})\n"
    assert f"removed superseded image {short(first)}" in result.stderr
    assert docker.image_id(LOCAL) == second and not docker.image_exists(first)
    again = pull(registry, f"python:{TAG}", workdir=tmp_path / "workdir")
    assert again.stdout == f"pulled {LOCAL} {short(second)} (unchanged)\n"


def test_a_running_jobs_image_is_kept(registry, tmp_path):
    first = push_variant(registry, "a")
    project = f"""\
version: "5"
actions:
  sleeper:
    run: python:{TAG} analysis/sleeper.sh
    outputs:
      moderately_sensitive:
        note: output/never.txt
"""
    backend = Backend(tmp_path, project, {"analysis/sleeper.sh": "exec sleep 300\n"})
    try:
        assert pull(registry, f"python:{TAG}", workdir=backend.workdir).returncode == 0
        [job_id] = backend.start("sleeper")
        push_variant(registry, "b")
        result = pull(registry, f"python:{TAG}", workdir=backend.workdir)
        assert result.returncode == 0, result.stderr
        assert (
            f"kept superseded image {short(first)} (was {LOCAL}): in use by job {job_id}"
            in result.stderr
        )
        assert docker.image_exists(first)
    finally:
        backend.close()


def test_an_image_that_is_not_allowed_exits_1_listing_the_allowed_ones(registry, tmp_path):
    result = pull(registry, "stata-mp:latest", workdir=tmp_path / "workdir")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "jr-pull-image: 'stata-mp:latest' is not an allowed image: expected one of "
        "python, r (set by ALLOWED_IMAGES), with an optional :TAG\n"
    )


def test_a_tag_missing_from_the_registry_exits_1(registry, tmp_path):
    result = pull(registry, f"python:{TAG}0", workdir=tmp_path / "workdir")
    assert result.returncode == 1
    assert "was not found in the registry" in result.stderr


def test_a_failed_image_does_not_stop_the_others_but_exits_1(registry, tmp_path):
    image = push_variant(registry, "a")
    result = pull(registry, f"python:{TAG}0", f"python:{TAG}", workdir=tmp_path / "workdir")
    assert result.returncode == 1
    assert result.stdout == f"pulled {LOCAL} {short(image)} (new)\n"
    assert (
        f"jr-pull-image: {registry}/jr-demo/python:{TAG}0 was not found in the registry"
        in result.stderr
    )


def test_registry_down_exits_75(registry, tmp_path):
    result = pull(
        registry,
        f"python:{TAG}",
        workdir=tmp_path / "workdir",
        PULL_REGISTRY=f"127.0.0.1:{free_port()}/jr-demo",
    )
    assert (result.returncode, result.stdout) == (75, "")
    assert "cannot reach the registry" in result.stderr and "connection refused" in result.stderr


def test_docker_down_exits_75(registry, tmp_path):
    result = pull(
        registry,
        f"python:{TAG}",
        workdir=tmp_path / "workdir",
        DOCKER_HOST="unix:///nonexistent.sock",
    )
    assert result.returncode == 75 and "Docker is not available" in result.stderr


def test_no_pull_registry_is_a_configuration_error_naming_it(registry, tmp_path):
    result = run("jr-pull-image", "python:v1", workdir=tmp_path / "workdir")
    assert result.returncode == 78
    assert result.stderr.startswith("jr-pull-image: PULL_REGISTRY is not set")
